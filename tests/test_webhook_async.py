"""
The webhook over httpx and over asyncio: ``HttpxTransport`` under
``WebhookDestination``, ``AsyncWebhookDestination`` over
``AsyncHttpxTransport``, against the real HTTP server of
``webhook_server``, one request at a time and end to end through both
schedulers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import httpx
import pytest

import cohortsync as cs
from cohortsync._destination import Batch, DeliveryResult, Operation, Rejection
from cohortsync.destinations import (
    AsyncHttpTransport,
    AsyncHttpxTransport,
    AsyncioTransport,
    AsyncWebhookDestination,
    HttpResponse,
    HttpTransport,
    HttpxTransport,
    UrllibTransport,
    WebhookDestination,
)
from cohortsync.exceptions import (
    AuthenticationError,
    BadDataError,
    ConfigurationError,
    DeliveryError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from cohortsync.testing import FakeClock, MemoryStorage
from webhook_server import (
    QUERY_TOKEN,
    SECRET,
    Server,
    chain,
    make_batch,
    serving,
)

T = TypeVar("T")
START = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def server() -> Iterator[Server]:
    with serving() as srv:
        yield srv


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* on a fresh event loop, as a host's ``asyncio.run`` would."""
    return asyncio.run(coro)


def hook_url(server: Server, path: str) -> str:
    """The route's URL with a token in its query string, as some vendors want."""
    return server.url(path) + f"?token={QUERY_TOKEN}"


@attrs.frozen
class Kind:
    """
    One way to post a batch to the server: the blocking destination over
    HttpxTransport, or the asynchronous one over AsyncHttpxTransport, each
    called as its host would and closed after.
    """

    name: str
    send: Callable[[str, Batch, float], DeliveryResult]

    def __str__(self) -> str:
        return self.name


def send_blocking(url: str, batch: Batch, timeout: float) -> DeliveryResult:
    with HttpxTransport() as transport:
        dest = WebhookDestination(
            url, headers={"Authorization": SECRET}, timeout=timeout, transport=transport
        )
        return dest.remove(batch) if batch.operation is Operation.REMOVE else dest.add(batch)


def send_async(url: str, batch: Batch, timeout: float) -> DeliveryResult:
    """Through AsyncWebhookDestination's default transport, AsyncioTransport."""

    async def go() -> DeliveryResult:
        async with AsyncWebhookDestination(
            url, headers={"Authorization": SECRET}, timeout=timeout
        ) as dest:
            assert isinstance(dest._transport, AsyncioTransport)
            if batch.operation is Operation.REMOVE:
                return await dest.remove(batch)
            return await dest.add(batch)

    return run(go())


def send_async_httpx(url: str, batch: Batch, timeout: float) -> DeliveryResult:
    async def go() -> DeliveryResult:
        async with (
            AsyncHttpxTransport() as transport,
            AsyncWebhookDestination(
                url, headers={"Authorization": SECRET}, timeout=timeout, transport=transport
            ) as dest,
        ):
            if batch.operation is Operation.REMOVE:
                return await dest.remove(batch)
            return await dest.add(batch)

    return run(go())


KINDS = [
    Kind("httpx", send_blocking),
    Kind("async-asyncio", send_async),
    Kind("async-httpx", send_async_httpx),
]


@pytest.fixture(params=KINDS, ids=str)
def send(request: pytest.FixtureRequest, server: Server) -> Callable[..., DeliveryResult]:
    kind: Kind = request.param

    def post(path: str, users: list[str], *, timeout: float = 2.0, **batch: Any) -> DeliveryResult:
        return kind.send(hook_url(server, path), make_batch(users, **batch), timeout)

    return post


Send = Callable[..., DeliveryResult]


class TestMessages:
    def test_add_posts_the_cohort_webhook_shape(self, server: Server, send: Send) -> None:
        """An add posts exactly the webhook fields, with in_cohort true."""
        result = send("/ok", ["u1", "u2"])

        assert DeliveryResult.ok() == result
        assert [
            {
                "cohort_id": "power-users",
                "cohort_name": "Power users",
                "in_cohort": True,
                "computed_time": "2024-05-01T12:00:00+00:00",
                "message_id": "idem-key-0001",
                "users": ["u1", "u2"],
            }
        ] == [r.body for r in server.requests]

    def test_remove_sends_in_cohort_false(self, server: Server, send: Send) -> None:
        """Removals are the same message with in_cohort false."""
        send("/ok", ["u9"], operation=Operation.REMOVE, key="k-remove")

        (request,) = server.requests
        assert (False, "k-remove", ["u9"]) == (
            request.body["in_cohort"],
            request.body["message_id"],
            request.body["users"],
        )

    def test_headers_and_query(self, server: Server, send: Send) -> None:
        """The idempotency key, JSON type and the host's headers go out; the query is kept."""
        send("/ok", ["u1"])

        headers = {k.lower(): v for k, v in server.requests[0].headers.items()}
        assert ("idem-key-0001", "application/json", SECRET, "cohortsync") == (
            headers["idempotency-key"],
            headers["content-type"],
            headers["authorization"],
            headers["user-agent"],
        )
        assert f"/ok?token={QUERY_TOKEN}" == server.requests[0].path

    def test_one_message_id_per_batch(self, server: Server, send: Send) -> None:
        """Each batch has its own message_id; a re-sent batch repeats it exactly."""
        send("/ok", ["u1"], key="key-a")
        send("/ok", ["u2"], key="key-b")
        send("/ok", ["u1"], key="key-a")

        assert ["key-a", "key-b", "key-a"] == [r.body["message_id"] for r in server.requests]
        assert ["key-a", "key-b", "key-a"] == [
            r.headers["Idempotency-Key"] for r in server.requests
        ]
        assert server.requests[0].body == server.requests[2].body


class TestAnswers:
    def test_rejections(self, send: Send) -> None:
        """A 2xx may reject members; unknown users and repeats are ignored."""
        result = send("/rejected", ["u1", "u2", "u3"])

        assert (
            Rejection("u2", "unknown user"),
            Rejection("u3", "rejected by webhook"),
        ) == result.rejected

    def test_rate_limited_seconds(self, send: Send) -> None:
        """429 with Retry-After in seconds."""
        with pytest.raises(RateLimitedError) as info:
            send("/429-seconds", ["u1"])

        assert 7.0 == info.value.retry_after

    def test_rate_limited_http_date(self, send: Send) -> None:
        """429 with an HTTP-date, measured against the server's own Date header."""
        with pytest.raises(RateLimitedError) as info:
            send("/429-date", ["u1"])

        assert 30.0 == info.value.retry_after

    def test_server_error_is_transient(self, send: Send) -> None:
        """A 500 is worth retrying, and is not a rate limit."""
        with pytest.raises(TransientError, match="HTTP 500") as info:
            send("/500", ["u1"])

        assert (TransientError, None) == (type(info.value), info.value.retry_after)

    def test_transient_honours_retry_after(self, send: Send) -> None:
        """A 503 with Retry-After tells the engine how long to wait."""
        with pytest.raises(TransientError, match="HTTP 503") as info:
            send("/503", ["u1"])

        assert 12.0 == info.value.retry_after

    def test_timeout_is_transient(self, send: Send) -> None:
        """A server that does not answer in time gives a TransientError, quickly."""
        with pytest.raises(TransientError, match="timed out"):
            send("/slow", ["u1"], timeout=0.2)

    @pytest.mark.parametrize(
        ("path", "error"),
        [
            ("/401", AuthenticationError),
            ("/403", AuthenticationError),
            ("/400", BadDataError),
            ("/422", BadDataError),
            ("/404", PermanentError),
        ],
    )
    def test_client_errors(self, send: Send, path: str, error: type[Exception]) -> None:
        """Credentials refused pause the sync, bad data is bisected, other 4xx fail the run."""
        with pytest.raises(error, match=f"HTTP {path[1:]}") as info:
            send(path, ["u1"])

        assert error is type(info.value)

    def test_redirects_are_not_followed(self, server: Server, send: Send) -> None:
        """A redirect is a PermanentError, and nothing is posted where it points."""
        with pytest.raises(PermanentError, match="HTTP 302"):
            send("/redirect", ["u1"])

        assert ["/redirect"] == [urlsplit(r.path).path for r in server.requests]

    @pytest.mark.parametrize("kind", KINDS, ids=str)
    def test_connection_refused_is_transient(self, kind: Kind) -> None:
        """Nobody listening is a transient failure, not a crash."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        with pytest.raises(TransientError, match="failed"):
            kind.send(f"http://127.0.0.1:{port}/hook", make_batch(["u1"]), 2.0)


def all_errors(kind: Kind, server: Server) -> list[BaseException]:
    raised: list[BaseException] = []
    for path in ["/401", "/400", "/500", "/429-seconds", "/404", "/redirect", "/slow"]:
        with pytest.raises(DeliveryError) as info:
            kind.send(hook_url(server, path), make_batch(["u1"]), 0.2)
        raised.append(info.value)
    return raised


class TestSecrets:
    @pytest.mark.parametrize("kind", KINDS, ids=str)
    def test_never_in_errors_or_logs(
        self, kind: Kind, server: Server, caplog: pytest.LogCaptureFixture
    ) -> None:
        """
        Neither the header secret nor the query token leak, in our logs or
        httpx's, even when the server echoes them back.
        """
        caplog.set_level(logging.DEBUG)
        kind.send(hook_url(server, "/ok"), make_batch(["u1"]), 2.0)

        raised = all_errors(kind, server)

        texts = [f"{e!s} {e!r}" for error in raised for e in chain(error)]
        texts += [r.getMessage() for r in caplog.records]
        httpx_lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
        if "httpx" in kind.name:  # httpx logs each URL at INFO: shown without its query
            assert any(server.url("/ok?...") in line for line in httpx_lines)
        assert any(r.name == "cohortsync.destinations" for r in caplog.records)
        assert any("***" in t for t in texts)  # the echo really happened and was blanked
        assert [] == [t for t in texts if "s3cr3t" in t or QUERY_TOKEN in t]

    def test_other_httpx_requests_are_logged_as_they_are(
        self, server: Server, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The URL filter touches only our transports' requests: the host's logs stay its own."""
        caplog.set_level(logging.INFO, logger="httpx")

        with httpx.Client() as client:
            client.post(hook_url(server, "/ok"), json={"message_id": "host's own"})

        assert [f'HTTP Request: POST {hook_url(server, "/ok")} "HTTP/1.0 204 No Content"'] == [
            r.getMessage() for r in caplog.records if r.name == "httpx"
        ]

    def test_repr(self) -> None:
        """The async destination shows where it posts, never its headers or query."""
        dest = AsyncWebhookDestination(
            f"https://hooks.example.com/c?token={QUERY_TOKEN}", headers={"Authorization": SECRET}
        )

        assert "AsyncWebhookDestination('https://hooks.example.com/c?...')" == repr(dest)


class TestHttpxTransport:
    def test_host_client_is_used_and_left_open(self, server: Server) -> None:
        """A host's client sends (with its own defaults) and stays the host's to close."""
        with httpx.Client(headers={"X-Tenant": "acme"}) as client:
            transport = HttpxTransport(client)
            dest = WebhookDestination(server.url("/ok"), transport=transport)

            dest.add(make_batch(["u1"]))
            transport.close()

            assert not client.is_closed
        assert "acme" == server.requests[0].headers["X-Tenant"]

    def test_host_client_that_follows_redirects_does_not(self, server: Server) -> None:
        """Redirects stay unfollowed even on a client set to follow them."""
        with httpx.Client(follow_redirects=True) as client:
            dest = WebhookDestination(server.url("/redirect"), transport=HttpxTransport(client))

            with pytest.raises(PermanentError, match="HTTP 302"):
                dest.add(make_batch(["u1"]))

        assert ["/redirect"] == [r.path for r in server.requests]

    def test_own_client_closed_by_close(self, server: Server) -> None:
        """close() closes the client the transport made; a post after it is a PermanentError."""
        transport = HttpxTransport()
        transport.close()
        transport.close()  # repeating is harmless

        with pytest.raises(PermanentError, match="closed"):
            transport.post(server.url("/ok"), b"{}", {}, 1.0)
        assert [] == server.requests

    def test_refuses_other_schemes(self) -> None:
        """Like urllib's, the transport never opens file: URLs, even when called directly."""
        with (
            HttpxTransport() as transport,
            pytest.raises(ConfigurationError, match="http or https"),
        ):
            transport.post("file:///etc/passwd", b"{}", {}, 1.0)

    @pytest.mark.parametrize("make", [httpx.AsyncClient, object], ids=["async", "object"])
    def test_bad_client(self, make: Callable[[], object]) -> None:
        """Anything but an httpx.Client is refused, by name."""
        with pytest.raises(ConfigurationError) as info:
            HttpxTransport(make())  # type: ignore[arg-type]

        assert "client" == info.value.field

    def test_repr_and_protocol(self) -> None:
        """It is an HttpTransport; its repr says whose client it uses."""
        with HttpxTransport() as own, httpx.Client() as client:
            assert isinstance(own, HttpTransport)
            assert ("HttpxTransport()", "HttpxTransport(client=<host's>)") == (
                repr(own),
                repr(HttpxTransport(client)),
            )


class TestAsyncHttpxTransport:
    def test_host_client_is_used_and_left_open(self, server: Server) -> None:
        """A host's client sends (with its own defaults) and stays the host's to close."""

        async def go() -> bool:
            async with httpx.AsyncClient(headers={"X-Tenant": "acme"}) as client:
                transport = AsyncHttpxTransport(client)
                dest = AsyncWebhookDestination(server.url("/ok"), transport=transport)
                await dest.add(make_batch(["u1"]))
                await dest.aclose()
                await transport.aclose()
                return client.is_closed

        assert False is run(go())
        assert "acme" == server.requests[0].headers["X-Tenant"]

    def test_host_client_that_follows_redirects_does_not(self, server: Server) -> None:
        """Redirects stay unfollowed even on a client set to follow them."""

        async def go() -> None:
            async with httpx.AsyncClient(follow_redirects=True) as client:
                dest = AsyncWebhookDestination(
                    server.url("/redirect"), transport=AsyncHttpxTransport(client)
                )
                await dest.add(make_batch(["u1"]))

        with pytest.raises(PermanentError, match="HTTP 302"):
            run(go())
        assert ["/redirect"] == [r.path for r in server.requests]

    def test_one_client_per_loop_closed_with_its_loop(self, server: Server) -> None:
        """
        One destination used from two event loops in turn gets a client on each,
        and each is closed when asyncio.run shuts its loop down.
        """
        transport = AsyncHttpxTransport()
        dest = AsyncWebhookDestination(server.url("/ok"), transport=transport)
        clients: list[httpx.AsyncClient] = []

        async def go(key: str) -> None:
            await dest.add(make_batch(["u1"], key=key))
            await dest.add(make_batch(["u2"], key=key + "-2"))
            clients.append(transport._clients[asyncio.get_running_loop()].client)

        run(go("first"))
        run(go("second"))

        assert 2 == len({id(c) for c in clients})
        assert [True, True] == [c.is_closed for c in clients]
        assert 4 == len(server.requests)

    def test_aclose_closes_and_refuses_more(self, server: Server) -> None:
        """aclose() closes the running loop's client; a post after it is a PermanentError."""
        transport = AsyncHttpxTransport()

        async def go() -> httpx.AsyncClient:
            await transport.post(server.url("/ok"), b'{"message_id": "m"}', {}, 1.0)
            client = transport._clients[asyncio.get_running_loop()].client
            await transport.aclose()
            await transport.aclose()  # repeating is harmless
            with pytest.raises(PermanentError, match="closed"):
                await transport.post(server.url("/ok"), b"{}", {}, 1.0)
            return client

        assert run(go()).is_closed
        assert 1 == len(server.requests)

    def test_destination_does_not_close_a_host_transport(self, server: Server) -> None:
        """The destination's aclose() leaves a transport the host passed open."""
        transport = AsyncHttpxTransport()

        async def go() -> None:
            async with AsyncWebhookDestination(server.url("/ok"), transport=transport) as dest:
                await dest.add(make_batch(["u1"], key="one"))
            await transport.post(server.url("/ok"), b'{"message_id": "two"}', {}, 1.0)
            await transport.aclose()

        run(go())

        assert 2 == len(server.requests)

    def test_refuses_other_schemes(self) -> None:
        """The transport never opens file: URLs, even when called directly."""
        with pytest.raises(ConfigurationError, match="http or https"):
            run(AsyncHttpxTransport().post("file:///etc/passwd", b"{}", {}, 1.0))

    @pytest.mark.parametrize("make", [httpx.Client, object], ids=["blocking", "object"])
    def test_bad_client(self, make: Callable[[], object]) -> None:
        """Anything but an httpx.AsyncClient is refused, by name."""
        with pytest.raises(ConfigurationError) as info:
            AsyncHttpxTransport(make())  # type: ignore[arg-type]

        assert "client" == info.value.field

    def test_repr_and_protocol(self) -> None:
        """It is an AsyncHttpTransport; its repr says whose client it uses."""
        assert isinstance(AsyncHttpxTransport(), AsyncHttpTransport)
        assert ("AsyncHttpxTransport()", "AsyncHttpxTransport(client=<host's>)") == (
            repr(AsyncHttpxTransport()),
            repr(AsyncHttpxTransport(httpx.AsyncClient())),
        )


@attrs.define
class ScriptedTransport:
    """A host's async transport: records calls, and answers or raises from a script."""

    answer: HttpResponse | BaseException
    calls: list[tuple[str, bytes, dict[str, str], float]] = attrs.Factory(list)

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        self.calls.append((url, body, dict(headers), timeout))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class BlockingTransport:
    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        return HttpResponse(200)


class TestAsyncDestination:
    def test_host_transport_is_awaited(self) -> None:
        """A host's transport gets the URL, JSON body, headers and timeout."""
        transport = ScriptedTransport(HttpResponse(200))
        dest = AsyncWebhookDestination(
            "https://hooks.example.com/c?sig=1", transport=transport, timeout=3.5
        )

        assert DeliveryResult.ok() == run(dest.add(make_batch(["u1"])))

        ((url, body, headers, timeout),) = transport.calls
        assert ("https://hooks.example.com/c?sig=1", 3.5) == (url, timeout)
        assert b'"users":["u1"]' in body
        assert "idem-key-0001" == headers["Idempotency-Key"]

    @pytest.mark.parametrize(
        "error",
        [ConnectionResetError("peer reset"), asyncio.TimeoutError()],
        ids=["os-error", "asyncio-timeout"],
    )
    def test_escaped_errors_are_transient(self, error: BaseException) -> None:
        """A socket error or asyncio's timeout escaping the transport is a TransientError."""
        dest = AsyncWebhookDestination("https://x.example", transport=ScriptedTransport(error))

        with pytest.raises(TransientError, match="failed"):
            run(dest.add(make_batch(["u1"])))

    def test_cancellation_is_not_a_failure(self, server: Server) -> None:
        """Cancelling a request in flight cancels it: no TransientError hides the cancellation."""

        async def go() -> None:
            async with AsyncWebhookDestination(server.url("/slow"), timeout=5.0) as dest:
                task = asyncio.ensure_future(dest.add(make_batch(["u1"])))
                done, _ = await asyncio.wait({task}, timeout=0.3)  # the server holds it
                assert set() == done
                task.cancel()
                await task

        with pytest.raises(asyncio.CancelledError):
            run(go())

    def test_aclose_without_httpx_transport_is_harmless(self) -> None:
        """aclose() on a destination with a host transport does nothing to it."""
        transport = ScriptedTransport(HttpResponse(200))

        async def go() -> None:
            async with AsyncWebhookDestination("https://x.example", transport=transport) as dest:
                await dest.add(make_batch(["u1"]))
            await dest.add(make_batch(["u2"]))

        run(go())

        assert 2 == len(transport.calls)

    @pytest.mark.parametrize(
        "transport",
        [BlockingTransport(), UrllibTransport(), object()],
        ids=["blocking", "urllib", "object"],
    )
    def test_refuses_a_blocking_transport(self, transport: object) -> None:
        """A transport without async def post would block the loop: refused, by name."""
        with pytest.raises(ConfigurationError, match="async def post") as info:
            AsyncWebhookDestination("https://x.example", transport=transport)  # type: ignore[arg-type]

        assert "transport" == info.value.field

    def test_blocking_destination_refuses_an_async_transport(self) -> None:
        """WebhookDestination would get coroutines from an async transport: refused."""
        with pytest.raises(ConfigurationError, match="AsyncWebhookDestination") as info:
            WebhookDestination("https://x.example", transport=AsyncHttpxTransport())  # type: ignore[arg-type]

        assert "transport" == info.value.field

    def test_is_an_async_destination(self) -> None:
        """Both schedulers accept it as an AsyncDestination; its capabilities are the webhook's."""
        dest = AsyncWebhookDestination("https://x.example", batch_size=50)

        cs._destination.check_destination_kind(dest)
        assert isinstance(dest, cs.AsyncDestination)
        assert ("Webhook", True, 50) == (
            dest.capabilities.name,
            dest.capabilities.supports_realtime,
            dest.capabilities.max_batch_size,
        )


def audience(server: Server) -> set[str]:
    """What the receiver holds after applying every message in order."""
    held: set[str] = set()
    for request in server.requests:
        users = set(request.body["users"])
        held = held | users if request.body["in_cohort"] else held - users
    return held


@attrs.define
class Hour:
    """An hourly sync of a changing cohort, on a fake clock and an in-memory store."""

    members: set[str]
    clock: FakeClock = attrs.Factory(lambda: FakeClock(START))
    storage: MemoryStorage = attrs.Factory(MemoryStorage)

    def source(self) -> list[str]:
        return sorted(self.members)

    def cohort(self) -> cs.Cohort:
        return cs.Cohort(id="power-users", name="Power users", source=self.source)


MEMBERS = {f"user-{i:02d}" for i in range(7)}


class TestThroughAsyncScheduler:
    def test_adds_then_removes(self, server: Server) -> None:
        """Through AsyncScheduler the audience follows the cohort, one message per batch."""
        hour = Hour(set(MEMBERS))

        async def go() -> list[list[cs.SyncRun]]:
            async with cs.AsyncScheduler(hour.storage, clock=hour.clock) as scheduler:
                scheduler.add_cohort(hour.cohort())
                scheduler.add_destination(
                    "hook",
                    AsyncWebhookDestination(
                        hook_url(server, "/ok"), headers={"Authorization": SECRET}, batch_size=3
                    ),
                )
                sync = await scheduler.create_sync("power-users", "hook", cs.SyncPolicy.hourly())
                first = await scheduler.run_due()
                hour.members -= {"user-00", "user-01"}
                hour.clock.advance(timedelta(hours=1))
                second = await scheduler.run_due()
                return [first, second, await scheduler.history(sync.id)]

        first, second, history = run(go())

        assert [(cs.RunStatus.SUCCEEDED, 7, 0, 3)] == [
            (r.status, r.added, r.removed, r.batches) for r in first
        ]
        assert [(cs.RunStatus.SUCCEEDED, 0, 2, 1)] == [
            (r.status, r.added, r.removed, r.batches) for r in second
        ]
        assert 2 == len(history)
        assert MEMBERS - {"user-00", "user-01"} == audience(server)
        assert 4 == len({r.body["message_id"] for r in server.requests})

    def test_rate_limits_are_waited_out(self, server: Server) -> None:
        """Each batch's 429 Retry-After: 7 is waited on the clock, then the batch goes through."""
        hour = Hour(set(MEMBERS))

        async def go() -> list[cs.SyncRun]:
            async with cs.AsyncScheduler(hour.storage, clock=hour.clock) as scheduler:
                scheduler.add_cohort(hour.cohort())
                scheduler.add_destination(
                    "hook",
                    AsyncWebhookDestination(server.url("/rate-limited-once"), batch_size=4),
                )
                await scheduler.create_sync("power-users", "hook", cs.SyncPolicy.hourly())
                return await scheduler.run_due()

        (only,) = run(go())

        assert (cs.RunStatus.SUCCEEDED, 7, 2) == (only.status, only.added, only.batches)
        assert START + timedelta(seconds=14) <= hour.clock.now()
        assert 4 == len(server.requests)
        assert MEMBERS == audience(server)

    def test_rejections_make_a_partial_run(self, server: Server) -> None:
        """Members the webhook refuses are recorded as rejected, the rest delivered."""
        hour = Hour({"u1", "u2", "u3"})

        async def go() -> list[cs.SyncRun]:
            async with cs.AsyncScheduler(hour.storage, clock=hour.clock) as scheduler:
                scheduler.add_cohort(hour.cohort())
                scheduler.add_destination("hook", AsyncWebhookDestination(server.url("/rejected")))
                await scheduler.create_sync("power-users", "hook", cs.SyncPolicy.hourly())
                return await scheduler.run_due()

        (only,) = run(go())

        assert (cs.RunStatus.PARTIAL, 1, 2) == (only.status, only.added, only.rejected)

    def test_refused_credentials_pause_the_sync(self, server: Server) -> None:
        """A 401 pauses the sync, with the cause and without the secret in the history."""
        hour = Hour(set(MEMBERS))

        async def go() -> tuple[cs.SyncRun, cs.Sync]:
            async with cs.AsyncScheduler(hour.storage, clock=hour.clock) as scheduler:
                scheduler.add_cohort(hour.cohort())
                scheduler.add_destination(
                    "hook",
                    AsyncWebhookDestination(
                        hook_url(server, "/401"), headers={"Authorization": SECRET}
                    ),
                )
                sync = await scheduler.create_sync("power-users", "hook", cs.SyncPolicy.hourly())
                (only,) = await scheduler.run_due()
                return only, await scheduler.get_sync(sync.id)

        only, sync = run(go())

        assert ("AuthenticationError", cs.SyncStatus.PAUSED) == (only.error_type, sync.status)
        assert "s3cr3t" not in str(only.error_message)
        assert QUERY_TOKEN not in str(only.error_message)


class TestThroughBlockingScheduler:
    def test_async_destination(self, server: Server) -> None:
        """
        A plain Scheduler drives the async destination on its own loop, and
        stopping that loop closes the client made there.
        """
        hour = Hour(set(MEMBERS))
        transport = AsyncHttpxTransport()
        clients: list[httpx.AsyncClient] = []

        with cs.Scheduler(hour.storage, clock=hour.clock) as scheduler:
            scheduler.add_cohort(hour.cohort())
            scheduler.add_destination(
                "hook",
                AsyncWebhookDestination(server.url("/ok"), batch_size=3, transport=transport),
            )
            scheduler.create_sync("power-users", "hook", cs.SyncPolicy.hourly())
            (only,) = scheduler.run_due()
            clients += [made.client for made in transport._clients.values()]
            assert [False] == [c.is_closed for c in clients]

        assert (cs.RunStatus.SUCCEEDED, 7, 3) == (only.status, only.added, only.batches)
        assert MEMBERS == audience(server)
        assert [True] == [c.is_closed for c in clients]

    def test_blocking_destination_over_httpx(self, server: Server) -> None:
        """WebhookDestination over HttpxTransport: adds, then removes, one message per batch."""
        hour = Hour(set(MEMBERS))

        with (
            HttpxTransport() as transport,
            cs.Scheduler(hour.storage, clock=hour.clock) as scheduler,
        ):
            scheduler.add_cohort(hour.cohort())
            scheduler.add_destination(
                "hook",
                WebhookDestination(
                    hook_url(server, "/ok"),
                    headers={"Authorization": SECRET},
                    batch_size=3,
                    transport=transport,
                ),
            )
            scheduler.create_sync("power-users", "hook", cs.SyncPolicy.hourly())
            first = scheduler.run_due()
            hour.members -= {"user-03"}
            hour.clock.advance(timedelta(hours=1))
            second = scheduler.run_due()

        assert [(7, 0), (0, 1)] == [(r.added, r.removed) for r in first + second]
        assert {cs.RunStatus.SUCCEEDED} == {r.status for r in first + second}
        assert MEMBERS - {"user-03"} == audience(server)
        assert 4 == len({r.body["message_id"] for r in server.requests})


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestWithoutHttpx:
    def test_destinations_do_not_import_httpx(self) -> None:
        """Importing cohortsync.destinations, and using its webhook names, loads no httpx."""
        result = python(
            """
            import sys
            import cohortsync.destinations as d
            d.WebhookDestination("https://x.example")
            d.AsyncWebhookDestination, d.AsyncHttpTransport, d.HttpTransport
            sys.exit("httpx" in sys.modules)
            """
        )

        assert 0 == result.returncode, result.stderr

    def test_check_notices(self) -> None:
        """The check itself sees httpx once an httpx transport is made."""
        result = python(
            """
            import sys
            import cohortsync.destinations as d
            d.AsyncHttpxTransport()
            sys.exit("httpx" in sys.modules)
            """
        )

        assert 1 == result.returncode, result.stderr

    def test_async_default_loads_neither_httpx_nor_urllib(self) -> None:
        """
        The async webhook's default transport is the standard library's
        asyncio: no httpx, and not the blocking side's urllib.request or
        http.client either.
        """
        result = python(
            """
            import sys
            import cohortsync.destinations as d
            d.AsyncWebhookDestination("https://x.example")
            loaded = {"httpx", "urllib.request", "http.client"} & set(sys.modules)
            print(sorted(loaded))
            """
        )

        assert 0 == result.returncode, result.stderr
        assert "[]" == result.stdout.strip()

    def test_without_httpx_the_extra_is_named(self) -> None:
        """
        With httpx blocked both webhooks work on their default transports,
        and the httpx names say which extra to install.
        """
        result = python(
            """
            import sys
            sys.modules["httpx"] = None
            from cohortsync.destinations import AsyncWebhookDestination, WebhookDestination
            WebhookDestination("https://x.example")
            print(repr(AsyncWebhookDestination("https://x.example")._transport))
            try:
                from cohortsync.destinations import HttpxTransport
            except ImportError as e:
                print("ImportError:", e)
            """
        )

        assert 0 == result.returncode, result.stderr
        assert [
            "AsyncioTransport()",
            (
                "ImportError: cohortsync.destinations.HttpxTransport and AsyncHttpxTransport need "
                'httpx, which is not installed: pip install "cohortsync[httpx]"'
            ),
        ] == result.stdout.splitlines()
