"""
The host's FastAPI application, served for real: uvicorn in-process, an
:class:`~cohortsync.AsyncScheduler` in its lifespan on a SQLite file with the
system clock, and a strict fake vendor on a second real HTTP server. What a
deploy does to it: serve, sync, stop in the middle of a slow delivery, and
let a synchronous worker finish the job.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import attrs
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

import cohortsync as cs
from cohortsync.storage import SQLiteStorage
from host_project.web import BATCH_SIZE, VendorAudience, create_app

_KEY = re.compile(r"\A[0-9a-f]{32}\Z")
_PATH = re.compile(r"\A/audiences/(?P<audience>[\w-]+)/members\Z")
_USER = re.compile(r"\Au\d+\Z")


@attrs.define
class StrictVendor:
    """
    A push vendor's audience API that refuses anything off-contract: a
    request's shape, a batch larger than agreed, a user twice, an
    idempotency key that is not 32 hex digits or that comes back with another
    payload. It applies each key once, after ``delay`` seconds, whether or
    not the client is still there to read the answer (as real APIs do).
    """

    delay: float = 0.0
    audiences: dict[str, set[str]] = attrs.Factory(dict)
    payloads: dict[str, tuple[str, str, tuple[str, ...]]] = attrs.Factory(dict)
    """Each idempotency key and the (audience, op, users) it was first sent with."""
    replays: int = 0
    """Requests repeating a key already applied (answered, not applied again)."""
    in_flight: int = 0
    violations: list[str] = attrs.Factory(list)
    slow_request: threading.Event = attrs.Factory(threading.Event)
    """Set when a request arrives while ``delay`` is over a second."""
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def receive(self, path: str, key: str | None, body: bytes) -> int:
        """The status the vendor answers *body* with; applies it if valid."""
        problem, parsed = self._check(path, key, body)
        if problem is not None or parsed is None or key is None:
            with self.lock:
                self.violations.append(problem or "unparsed")
            return 400
        with self.lock:
            self.in_flight += 1
        if self.delay > 1:
            self.slow_request.set()
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
            first = self.payloads.setdefault(key, parsed)
            if first != parsed:
                self.violations.append(f"key {key} re-sent with another payload")
                return 422
            if first is not parsed:
                self.replays += 1
                return 200
            audience, op, users = parsed
            held = self.audiences.setdefault(audience, set())
            if op == "add":
                held.update(users)
            else:
                held.difference_update(users)
        return 200

    def _check(
        self, path: str, key: str | None, body: bytes
    ) -> tuple[str | None, tuple[str, str, tuple[str, ...]] | None]:
        matched = _PATH.match(path)
        if matched is None:
            return f"unknown path {path}", None
        if key is None or not _KEY.match(key):
            return f"bad idempotency key {key!r}", None
        try:
            payload = json.loads(body)
        except ValueError:
            return "body is not JSON", None
        if not isinstance(payload, dict) or set(payload) != {"op", "users"}:
            return f"unexpected fields {payload!r}", None
        op, users = payload["op"], payload["users"]
        if op not in {"add", "remove"} or not isinstance(users, list):
            return f"bad op or users: {op!r}", None
        if not 1 <= len(users) <= BATCH_SIZE or len(set(users)) != len(users):
            return f"batch of {len(users)} users, or a user twice", None
        if not all(isinstance(u, str) and _USER.match(u) for u in users):
            return "a user id is not a vendor user id", None
        return None, (matched["audience"], op, tuple(users))

    def audience(self, name: str) -> set[str]:
        with self.lock:
            return set(self.audiences.get(name, set()))

    def keys_per_user(self) -> dict[str, set[str]]:
        """Every idempotency key each user was sent under."""
        with self.lock:
            seen: dict[str, set[str]] = {}
            for key, (_, _, users) in self.payloads.items():
                for user in users:
                    seen.setdefault(user, set()).add(key)
            return seen


def _handler(vendor: StrictVendor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the shared client expects

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = vendor.receive(self.path, self.headers.get("Idempotency-Key"), body)
            try:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the client gave up waiting (a cancelled request): applied anyway

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
            pass

    return Handler


@pytest.fixture
def vendor() -> Iterator[tuple[StrictVendor, str]]:
    state = StrictVendor(delay=0.02)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, name="vendor", daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@attrs.define
class Served:
    """The host application under uvicorn, in a thread of this process."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self) -> float:
        """Ask uvicorn to exit, as SIGTERM does; the seconds it took to stop."""
        started = time.monotonic()
        self.server.should_exit = True
        self.thread.join(10)
        return time.monotonic() - started


def serve(app: FastAPI) -> Served:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="on",
        loop="asyncio",
        http="h11",
        ws="none",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return Served(server, thread, f"http://127.0.0.1:{port}")


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _given_back(db: Path) -> tuple[datetime, set[str]]:
    """
    Check the store as the stopped server left it: the sync still due at its
    slot, no lease, one (succeeded) run; return the slot and the keys of the
    batches recorded as in flight.
    """
    storage = SQLiteStorage(db)
    try:
        record = storage.get_sync("pu")
        slot = record.next_due
        assert (None, cs.Trigger.MANUAL) == (record.lease, record.next_trigger)
        assert slot is not None
        assert slot <= datetime.now(timezone.utc)  # still due: the slot was given back
        assert [cs.RunStatus.SUCCEEDED] == [run.status for run in storage.history("pu")]
        # In flight when it stopped: recorded, so the next run re-sends them.
        return slot, {batch.idempotency_key for batch in storage.pending_batches("pu")}
    finally:
        storage.close()


def _take_over(
    db: Path, vendor_url: str, members: set[str]
) -> tuple[list[cs.SyncRun], list[cs.SyncRun]]:
    """
    What a synchronous worker (cron, Celery) on the same file does next: its
    runs, then the sync's history.
    """
    worker = cs.Scheduler(SQLiteStorage(db))
    try:
        worker.add_cohort(
            cs.Cohort(id="power-users", name="Power users", source=lambda: sorted(members))
        )
        worker.add_destination("vendor", VendorAudience(vendor_url))
        return worker.run_due(), worker.history("pu")  # at once: no lease to wait out
    finally:
        worker.close()


class TestFastAPIHost:
    def test_serve_sync_stop_mid_delivery_and_hand_over(
        self, tmp_path: Path, vendor: tuple[StrictVendor, str]
    ) -> None:
        """
        Syncs made through the API reach the vendor; stopping the server in
        the middle of a slow round is prompt, leaves no lease and no failed
        run, and a synchronous worker then completes the audience, re-sending
        only under the original keys.
        """
        fake, vendor_url = vendor
        db = tmp_path / "cohortsync.db"
        members = {f"u{i}" for i in range(120)}  # the host's database: 5 batches
        app = create_app(db, vendor_url, lambda: sorted(members), idle=0.2)
        served = serve(app)
        try:
            with httpx.Client(base_url=served.url, timeout=10) as api:
                created = api.post(
                    "/syncs",
                    json={"cohort_id": "power-users", "destination_id": "vendor", "sync_id": "pu"},
                )
                assert 201 == created.status_code, created.text
                wait_for(lambda: fake.audience("pu") == members, 10, "the first round")
                wait_for(lambda: api.get("/syncs/pu/runs").json(), 5, "the run record")
                first = api.get("/syncs/pu/runs").json()

                members.update(f"u{i}" for i in range(120, 320))  # 8 more batches
                fake.delay = 3.0  # a slow vendor: 3 s per request
                assert 202 == api.post("/syncs/pu/run-now").status_code
                assert 404 == api.post("/syncs/nope/run-now").status_code
                assert fake.slow_request.wait(5), "the slow round did not start"
        finally:
            stopped_in = served.stop()

        assert not served.thread.is_alive()
        assert [{"status": "succeeded", "trigger": "scheduled", "added": 120}] == first
        # Well under one slow answer: in-flight requests were cancelled, not awaited.
        assert stopped_in < 2.0

        slot, pending = _given_back(db)
        # The vendor applies them anyway (their answers are lost): the worst case.
        wait_for(lambda: fake.in_flight == 0, 5, "the vendor to finish the abandoned requests")
        abandoned = set(fake.payloads) & pending
        assert abandoned

        fake.delay = 0.0
        took_over, history = _take_over(db, vendor_url, members)

        assert [(slot, cs.RunStatus.SUCCEEDED, 200)] == [
            (run.slot, run.status, run.added) for run in took_over
        ]
        assert [cs.RunStatus.SUCCEEDED] * 2 == [run.status for run in history]
        assert members == fake.audience("pu")
        assert [] == fake.violations
        assert len(abandoned) == fake.replays  # re-sent once each, under the same key
        # Whatever was sent twice was sent under its first key, with its first payload.
        assert {} == {user: keys for user, keys in fake.keys_per_user().items() if len(keys) != 1}
