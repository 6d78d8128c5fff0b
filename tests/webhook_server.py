"""
A real HTTP server for the webhook tests (``http.server`` in a thread), the
routes it answers, and the batches and secrets the tests send it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

import attrs

from cohortsync._destination import (
    Batch,
    Identifier,
    IdentifierKind,
    Member,
    Operation,
    RunContext,
)

SECRET = "Bearer s3cr3t-XYZ"  # noqa: S105 - a planted fake secret the tests hunt for
QUERY_TOKEN = "tok3n-QQQ"  # noqa: S105 - same as SECRET
FIXED_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
COMPUTED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

CONTEXT = RunContext(
    run_id="run-1",
    sync_id="sync-1",
    generation=3,
    cohort_id="power-users",
    cohort_name="Power users",
    computed_at=COMPUTED_AT,
    full_sync=False,
)


def make_batch(
    users: list[str],
    operation: Operation = Operation.ADD,
    key: str = "idem-key-0001",
    context: RunContext = CONTEXT,
) -> Batch:
    members = tuple(Member(u, Identifier(IdentifierKind.USER_ID, u)) for u in users)
    return Batch(
        context=context, operation=operation, members=members, sequence=0, idempotency_key=key
    )


@attrs.frozen
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


def reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def echo_request(handler: BaseHTTPRequestHandler, status: int) -> None:
    """
    A careless server that echoes the request, credentials included.
    """
    echoed = f"invalid payload; you sent {handler.path} with {dict(handler.headers.items())}"
    reply(handler, status, echoed.encode())


def rate_limited_with_date(handler: BaseHTTPRequestHandler) -> None:
    # Make the response's Date header deterministic: Retry-After is 30 s after it.
    handler.date_time_string = lambda timestamp=None: FIXED_DATE  # type: ignore[method-assign]
    reply(handler, 429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"})


def slow(handler: BaseHTTPRequestHandler) -> None:
    # Never answer in time; the fixture releases us at teardown.
    cast("Server", handler.server).release.wait(5)


def rejecting(handler: BaseHTTPRequestHandler) -> None:
    body = {
        "rejected": [
            {"user": "u2", "reason": "unknown user"},
            {"user": "never-sent", "reason": "ignored"},
            "u3",
            {"user": "u2", "reason": "duplicate entry"},
        ]
    }
    reply(handler, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})


def rate_limited_once(handler: BaseHTTPRequestHandler) -> None:
    """429 with Retry-After: 7 the first time a message_id comes, then accepted."""
    server = cast("Server", handler.server)
    message_id = server.requests[-1].body["message_id"]
    if message_id in server.limited:
        reply(handler, 204)
    else:
        server.limited.add(message_id)
        reply(handler, 429, headers={"Retry-After": "7"})


ROUTES: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {
    "/ok": lambda h: reply(h, 204),
    "/ok-not-json": lambda h: reply(h, 200, b"<html>thanks</html>"),
    "/slow": slow,
    "/500": lambda h: reply(h, 500),
    "/503": lambda h: reply(h, 503, headers={"Retry-After": "12"}),
    "/408": lambda h: reply(h, 408),
    "/429-seconds": lambda h: reply(h, 429, headers={"Retry-After": "7"}),
    "/429-date": rate_limited_with_date,
    "/429-bare": lambda h: reply(h, 429),
    "/401": lambda h: echo_request(h, 401),
    "/403": lambda h: reply(h, 403),
    "/400": lambda h: echo_request(h, 400),
    "/422": lambda h: reply(h, 422),
    "/413": lambda h: reply(h, 413),
    "/404": lambda h: reply(h, 404),
    "/redirect": lambda h: reply(h, 302, headers={"Location": "/ok"}),
    "/rejected": rejecting,
    "/rate-limited-once": rate_limited_once,
}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        server = cast("Server", self.server)
        server.requests.append(
            Recorded(path=self.path, headers=dict(self.headers.items()), body=json.loads(body))
        )
        ROUTES[urlsplit(self.path).path](self)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Keep test output quiet."""


class Server(ThreadingHTTPServer):
    # Join handler threads on close, so no thread outlives its test.
    daemon_threads = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[Recorded] = []
        self.release = threading.Event()
        self.limited: set[str] = set()

    def url(self, path: str) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}{path}"


@contextmanager
def serving() -> Iterator[Server]:
    """A server answering on a free port for the block, shut down (threads joined) after it."""
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join()


def chain(error: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__
