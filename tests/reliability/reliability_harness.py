"""
What the reliability tests share, and the worker process they start.

Run as ``python -m reliability_harness CONFIG_JSON`` (with this folder on
``PYTHONPATH``), it is one worker process: it builds a :class:`Scheduler` on
the store named in the config and does what the config's ``mode`` says
(crash at a step, recover, or serve as one of K concurrent workers). Each
worker registers the same cohorts and destinations, as every worker of a
real host does.

The "remote system" is :class:`RemoteAudience`: every batch it receives is
appended (and fsynced) to a JSON-lines file before it answers, so what the
destination holds outlives any worker and can be replayed by the test.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import json
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import cohortsync as cs
from cohortsync.events import RunFinished, RunStarted
from cohortsync.exceptions import LeaseLostError
from cohortsync.storage import (
    AppliedBatch,
    BatchedRuns,
    Claim,
    Completion,
    Lease,
    SQLiteStorage,
    Storage,
)
from cohortsync.testing import FakeClock, Fault, FaultyDestination, SharedFakeClock

DSN_VARIABLE = "COHORTSYNC_TEST_POSTGRES_DSN"
HERE = Path(__file__).resolve().parent
T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
ONE_US = timedelta(microseconds=1)


# -- figures ---------------------------------------------------------------------------

COUNTS = ("trials", "faults", "duplicates", "losses")


class Figures:
    """
    Counts per scenario, summed over the tests that ran.
    """

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def record(
        self,
        scenario: str,
        *,
        trials: int,
        faults: int,
        duplicates: int,
        losses: int,
        **extra: int,
    ) -> None:
        row = self.rows.setdefault(scenario, dict.fromkeys(COUNTS, 0))
        for key, value in {
            "trials": trials,
            "faults": faults,
            "duplicates": duplicates,
            "losses": losses,
            **extra,
        }.items():
            row[key] = row.get(key, 0) + value


# -- stores ----------------------------------------------------------------------------


def open_store(spec: str) -> Storage:
    """
    Open ``sqlite:PATH`` or ``postgres:SCHEMA`` (the DSN comes from the environment,
    never from a command line where ``ps`` would show its password).
    """
    kind, _, where = spec.partition(":")
    if kind == "sqlite":
        return SQLiteStorage(where)
    if kind == "postgres":
        from cohortsync.storage import PostgresStorage

        return PostgresStorage(os.environ[DSN_VARIABLE], schema=where)
    raise ValueError(f"unknown store spec {spec!r}")


class DelegatingStorage:
    """
    A store that hands every call to *inner*; subclasses override the calls
    they watch or break. Calls it does not define are looked up on *inner*, so
    the wrapper keeps up with the Storage protocol as it grows.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def as_storage(self) -> Storage:
        return cast("Storage", self)

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        return self.inner.claim_due(now, owner, lease_for, limit)

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        return self.inner.extend_lease(lease, now, lease_for)

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        self.inner.complete_run(lease, completion)

    # What Scheduler.run_due calls since 0.2 (the store's own, so a wrapper
    # watching claims and completions must watch these too).

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        return _batched(self.inner).claim_runs(now, owner, lease_for, limit)

    def complete_runs(
        self, completions: Sequence[tuple[Lease, Completion]]
    ) -> list[Exception | None]:
        return _batched(self.inner).complete_runs(completions)

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> Any:
        return self.inner.apply_batch(lease, batch)


def _batched(store: Storage) -> BatchedRuns:
    assert isinstance(store, BatchedRuns), store  # every shipped store has them
    return store


def die() -> None:
    """
    ``kill -9`` this process: no cleanup, no ``finally``, no flushing.
    """
    os.kill(os.getpid(), signal.SIGKILL)


# Where a run can be killed. ``acked`` is inside the destination, after the
# remote system recorded the batch and before it answered; the others are
# around the store calls of a run.
STEPS = (
    "claim",  # after claim_due (or claim_runs) returned the lease
    "acked",  # batch 3 recorded remotely, not yet acknowledged to the worker
    "before_apply",  # batch 3 acknowledged, apply_batch not called
    "applied_first",  # apply_batch 1 committed
    "applied_last",  # apply_batch 5 (the last) committed
    "extend_before",  # extend_lease called, not yet committed
    "extend_after",  # extend_lease committed, not yet returned
    "before_complete",  # every batch applied, complete_run(s) not called
    "completed",  # complete_run(s) committed
)
CRASH_BATCH = 3
BATCHES = 5
RESENDS = {"acked": 1, "before_apply": 1}
"""Batches the remote system must see twice after a crash at each step."""


class CrashingStorage(DelegatingStorage):
    """
    Kills its own process with SIGKILL at one step of a run.
    """

    def __init__(self, inner: Storage, step: str) -> None:
        super().__init__(inner)
        self.step = step
        self.applied = 0

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        leases = self.inner.claim_due(now, owner, lease_for, limit)
        if leases and self.step == "claim":
            die()
        return leases

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> Any:
        self.applied += 1
        if self.step == "before_apply" and self.applied == CRASH_BATCH:
            die()
        result = self.inner.apply_batch(lease, batch)
        if (self.step == "applied_first" and self.applied == 1) or (
            self.step == "applied_last" and self.applied == BATCHES
        ):
            die()
        return result

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        if self.step == "extend_before":
            die()
        extended = self.inner.extend_lease(lease, now, lease_for)
        if self.step == "extend_after":
            die()
        return extended

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        if self.step == "before_complete":
            die()
        self.inner.complete_run(lease, completion)
        if self.step == "completed":
            die()

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        claims = super().claim_runs(now, owner, lease_for, limit)
        if claims and self.step == "claim":
            die()
        return claims

    def complete_runs(
        self, completions: Sequence[tuple[Lease, Completion]]
    ) -> list[Exception | None]:
        if self.step == "before_complete":
            die()
        answers = super().complete_runs(completions)
        if self.step == "completed":
            die()
        return answers


# -- the remote system -----------------------------------------------------------------


class RemoteAudience(cs.Destination):
    """
    A destination whose remote side is a JSON-lines file: one line per batch
    received (sync, operation, idempotency key, identifiers, pid), appended
    with one ``write`` under ``O_APPEND`` (so lines from several processes
    never interleave) and fsynced before the batch is acknowledged.

    Args:
        path: The file.
        fsync: Flush each line to disk. A SIGKILL cannot lose what the kernel
            already has, so the concurrency tests switch this off for speed.
        latency: Real seconds each call takes, drawn uniformly from this range.
        clock: With *clock_step*, each call also moves this (shared fake) clock:
            a slow remote system, in simulated time.
        crash_at: Kill the process after recording this call (1-based).
    """

    capabilities = cs.Capabilities(name="remote log", max_batch_size=500)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = True,
        latency: tuple[float, float] = (0.0, 0.0),
        clock: SharedFakeClock | None = None,
        clock_step: timedelta = timedelta(0),
        crash_at: int | None = None,
        seed: int = 0,
    ) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync
        self.latency = latency
        self.clock = clock
        self.clock_step = clock_step
        self.crash_at = crash_at
        self.calls = 0
        self._rng = random.Random(seed)

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self._receive(batch)

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self._receive(batch)

    def _receive(self, batch: cs.Batch) -> cs.DeliveryResult:
        if self.latency[1] > 0:
            time.sleep(self._rng.uniform(*self.latency))
        line = {
            "sync": batch.context.sync_id,
            "run": batch.context.run_id,
            "op": batch.operation.value,
            "key": batch.idempotency_key,
            "ids": batch.identifiers,
            "pid": os.getpid(),
        }
        append_line(self.path, line, fsync=self.fsync)
        self.calls += 1
        if self.crash_at == self.calls:
            die()
        if self.clock is not None and self.clock_step:
            self.clock.advance(self.clock_step)
        return cs.DeliveryResult.ok()


def append_line(path: str, record: dict[str, Any], *, fsync: bool = False) -> None:
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """
    Every complete line of a JSON-lines file (a torn last line, from a process
    killed mid-write, is not a line the remote system received).
    """
    if not Path(path).exists():
        return []
    lines = Path(path).read_text().splitlines(keepends=True)
    return [_whole_record(raw) for raw in lines if raw.endswith("\n")]


def _whole_record(line: str) -> dict[str, Any]:
    """
    The record a line ends with. A process killed mid-write leaves a torn
    record with no newline; the next process's record is appended right
    after it, on the same line. The torn part was never received: drop it.
    """
    try:
        record: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        start = line.rfind("{", 0, len(line) - 1)
        while start > 0:
            try:
                record = json.loads(line[start:])
            except json.JSONDecodeError:  # noqa: PERF203 - a rare torn line
                start = line.rfind("{", 0, start)
            else:
                return record
        raise
    return record


def replay(sends: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    """
    The audience the remote system holds per sync, by replaying what it received.
    """
    audiences: dict[str, set[str]] = {}
    for send in sends:
        audience = audiences.setdefault(send["sync"], set())
        if send["op"] == "remove":
            audience.difference_update(send["ids"])
        else:
            audience.update(send["ids"])
    return audiences


def resent(sends: Iterable[dict[str, Any]]) -> dict[str, int]:
    """
    Idempotency keys the remote system received more than once, with how often.
    """
    counts = Counter(send["key"] for send in sends)
    return {key: n for key, n in counts.items() if n > 1}


# -- cohorts -----------------------------------------------------------------------------


class FileCohort:
    """
    A membership source read from a JSON list in a file that the test edits
    between worker processes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def members(self) -> list[str]:
        keys: list[str] = json.loads(self.path.read_text())
        return keys


def epoch_members(cohort_id: str, epoch: int, size: int) -> set[str]:
    """
    Who is in *cohort_id* during *epoch*: about three quarters of *size*
    candidates, a different three quarters each epoch (stable across processes).
    """
    out = set()
    for i in range(size):
        digest = hashlib.blake2b(f"{cohort_id}:{epoch}:{i}".encode(), digest_size=2).digest()
        if digest[0] % 4:
            out.add(f"{cohort_id}-u{i:04d}")
    return out


EPOCH_SECONDS = 600


class EpochCohort:
    """
    A cohort that changes every ten simulated minutes, until *freeze*.
    """

    def __init__(self, cohort_id: str, clock: cs.Clock, size: int, freeze: datetime) -> None:
        self.cohort_id = cohort_id
        self.clock = clock
        self.size = size
        self.freeze = freeze

    def members(self) -> set[str]:
        return epoch_members(
            self.cohort_id, epoch_at(min(self.clock.now(), self.freeze)), self.size
        )


def epoch_at(when: datetime) -> int:
    return int((when - T0).total_seconds()) // EPOCH_SECONDS


# -- worker processes --------------------------------------------------------------------


def worker_command(config: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "reliability_harness", json.dumps(config)]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    return env


def start_worker(config: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own interpreter and module
        worker_command(config),
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def run_worker(config: dict[str, Any], timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        worker_command(config),
        env=worker_env(),
        capture_output=True,
        timeout=timeout,
        check=False,
    )


CRASH_SYNC = "crash-sync"
CRASH_COHORT = "crash-cohort"
CRASH_LEASE = timedelta(minutes=5)
CRASH_REMOTE_STEP = timedelta(minutes=2)
"""Each batch takes two simulated minutes: the third one needs the lease extended."""


class AsyncRemoteAudience(cs.AsyncDestination):
    """
    :class:`RemoteAudience` as an asynchronous adapter: the same remote file,
    reached from the event loop of an :class:`~cohortsync.AsyncScheduler`.
    """

    capabilities = RemoteAudience.capabilities

    def __init__(
        self, remote: RemoteAudience, *, latency: tuple[float, float] = (0.0, 0.0), seed: int = 0
    ) -> None:
        self.remote = remote
        self.latency = latency
        self._rng = random.Random(seed)

    async def _wait(self) -> None:
        # A real await, so the request leaves the loop (and other runs go on).
        await asyncio.sleep(self._rng.uniform(*self.latency) if self.latency[1] > 0 else 0)

    async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        await self._wait()
        return self.remote.add(batch)

    async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        await self._wait()
        return self.remote.remove(batch)


def crash_scheduler(
    config: dict[str, Any], *, crash: bool, kind: str = "sync"
) -> cs.Scheduler | cs.AsyncScheduler:
    """
    The crash trial's worker: a :class:`~cohortsync.Scheduler` (*kind*
    ``"sync"``) or an :class:`~cohortsync.AsyncScheduler` with an
    asynchronous adapter of the same remote (``"async"``).
    """
    clock = SharedFakeClock(config["clock"])
    store = open_store(config["store"])
    step = config.get("step") if crash else None
    storage = store if step is None else CrashingStorage(store, step).as_storage()
    scheduler: cs.Scheduler | cs.AsyncScheduler
    if kind == "async":
        scheduler = cs.AsyncScheduler(storage, clock=clock, lease_for=CRASH_LEASE, seed=0)
    else:
        scheduler = cs.Scheduler(storage, clock=clock, lease_for=CRASH_LEASE, seed=0)
    scheduler.add_cohort(
        cs.Cohort(id=CRASH_COHORT, name="Crash", source=FileCohort(config["cohort"]))
    )
    remote = RemoteAudience(
        config["remote"],
        clock=clock,
        clock_step=CRASH_REMOTE_STEP,
        crash_at=CRASH_BATCH if step == "acked" else None,
    )
    if kind == "async":
        scheduler.add_destination("remote", AsyncRemoteAudience(remote))
    else:
        scheduler.add_destination("remote", remote)
    return scheduler


def crash_mode(config: dict[str, Any]) -> None:
    """
    Run what is due with the crashing store: the process should never return.
    """
    scheduler = crash_scheduler(config, crash=True, kind=config.get("kind", "sync"))
    if isinstance(scheduler, cs.AsyncScheduler):
        runs = asyncio.run(scheduler.run_due())
    else:
        runs = scheduler.run_due()
    print(json.dumps({"survived": True, "runs": len(runs)}))


def recover_mode(config: dict[str, Any]) -> None:
    """
    A fresh worker after a crash: wait (in simulated time) until the dead
    worker's lease expired, run what is due, then run the next slot.
    """
    scheduler = crash_scheduler(config, crash=False)
    assert isinstance(scheduler, cs.Scheduler)
    clock = scheduler.clock
    assert isinstance(clock, SharedFakeClock)
    record = scheduler.storage.get_sync(CRASH_SYNC)
    if record.lease is not None:
        clock.set(max(clock.now(), record.lease.expires_at + ONE_US))
    runs = scheduler.run_due()
    next_due = scheduler.next_run(CRASH_SYNC)
    if next_due is not None and next_due > clock.now():
        clock.set(next_due)
    runs += scheduler.run_due()
    print(json.dumps({"runs": [r.status.value for r in runs]}))
    scheduler.close()


# -- the concurrency worker ----------------------------------------------------------------

CONCURRENT_LEASE = timedelta(seconds=20)
COHORT_SIZE = 40


def concurrency_syncs(hourly: int, realtime: int) -> list[tuple[str, cs.SyncPolicy]]:
    return [(f"h{i:02d}", cs.SyncPolicy.hourly()) for i in range(hourly)] + [
        (f"r{i:02d}", cs.SyncPolicy.realtime()) for i in range(realtime)
    ]


def concurrency_scheduler(
    config: dict[str, Any], *, owner: str
) -> cs.Scheduler | cs.AsyncScheduler:
    clock = SharedFakeClock(config["clock"])
    store = open_store(config["store"])
    freeze = datetime.fromisoformat(config["freeze"])
    events = config["events"]

    def listen(event: object) -> None:
        if isinstance(event, RunStarted):
            record = {"e": "start", "sync": event.sync_id, "slot": event.slot.isoformat()}
        elif isinstance(event, RunFinished):
            record = {"e": "finish", "sync": event.run.sync_id, "slot": event.run.slot.isoformat()}
        else:
            return
        append_line(events, {**record, "owner": owner})

    options: dict[str, Any] = {
        "clock": clock,
        "owner": owner,
        "lease_for": CONCURRENT_LEASE,
        "listeners": [listen],
        "seed": config.get("seed", 0),
    }
    scheduler: cs.Scheduler | cs.AsyncScheduler
    if config.get("kind") == "async":
        scheduler = cs.AsyncScheduler(store, max_concurrent_runs=4, **options)
        remote = RemoteAudience(config["remote"], fsync=False, seed=os.getpid())
        scheduler.add_destination(
            "remote", AsyncRemoteAudience(remote, latency=(0.001, 0.005), seed=os.getpid())
        )
    else:
        scheduler = cs.Scheduler(store, **options)
        scheduler.add_destination(
            "remote",
            RemoteAudience(config["remote"], fsync=False, latency=(0.001, 0.005), seed=os.getpid()),
        )
    for sync_id, _ in concurrency_syncs(config["hourly"], config["realtime"]):
        scheduler.add_cohort(
            cs.Cohort(
                id=f"c-{sync_id}",
                name=sync_id,
                source=EpochCohort(f"c-{sync_id}", clock, COHORT_SIZE, freeze),
            )
        )
    return scheduler


def worker_mode(config: dict[str, Any]) -> None:
    """
    One of K workers: call ``run_due()`` until the stop file appears.
    """
    scheduler = concurrency_scheduler(config, owner=config["owner"])
    if isinstance(scheduler, cs.AsyncScheduler):
        asyncio.run(_async_worker(scheduler, Path(config["stop"])))
        return
    stop = Path(config["stop"])
    while not stop.exists():
        try:
            ran = scheduler.run_due()
        except LeaseLostError:  # pragma: no cover - run_due handles it; belt and braces
            ran = []
        if not ran:
            time.sleep(0.002)
    scheduler.close()


async def _async_worker(scheduler: cs.AsyncScheduler, stop: Path) -> None:
    """:func:`worker_mode` for an AsyncScheduler: ``await run_due()`` until told to stop."""
    while not stop.exists():  # noqa: ASYNC240 - one stat per round, as the sync worker does
        ran = await scheduler.run_due()
        if not ran:
            await asyncio.sleep(0.002)
    await scheduler.aclose()


# -- a real HTTP receiver that misbehaves on a schedule ----------------------------------

RETRY_AFTER = 7
"""Seconds a 429 asks to wait: a value no backoff delay ever equals."""
MAX_REJECTIONS = 2
"""The receiver rejects a user at most this often, so no member becomes a dead letter."""


class Plan:
    """
    What the receiver does with request number *n* (0-based): one of ``ok``,
    ``slow`` (apply, then answer after the client gave up), ``hang`` (never
    answer, apply nothing), ``503``, ``429`` (with ``Retry-After``), ``401``,
    ``reject`` (200, some users rejected) or ``drop`` (200, nothing kept).
    """

    def __init__(
        self,
        script: dict[int, str] | None = None,
        weights: dict[str, float] | None = None,
        *,
        always: str = "ok",
        seed: int = 0,
    ) -> None:
        self.script = dict(script or {})
        self.weights = dict(weights or {})
        self.always = always
        self.rng = random.Random(seed)
        self.stopped = False

    def __call__(self, n: int, in_cohort: bool) -> str:
        if self.stopped:
            return "ok"
        if n in self.script:
            return self.script[n]
        if self.weights:
            kinds = [*self.weights, "ok"]
            rest = max(0.0, 1.0 - sum(self.weights.values()))
            kind = self.rng.choices(kinds, [*self.weights.values(), rest])[0]
            # Only adds are dropped at random: a dropped removal is a limitation
            # of its own (see test_faults), not something a resync repairs.
            return "ok" if kind == "drop" and not in_cohort else kind
        return self.always


class AudienceHandler(BaseHTTPRequestHandler):
    server: AudienceServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.receive(self, json.loads(body))

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up waiting: that was the point
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Keep test output quiet."""


_ANSWERS: dict[str, tuple[int, bytes, dict[str, str]]] = {
    "503": (503, b"upstream unavailable", {}),
    "429": (429, b"slow down", {"Retry-After": str(RETRY_AFTER)}),
}


class AudienceServer(ThreadingHTTPServer):
    """
    A cohort-webhook receiver on a loopback port that keeps the audience it
    was sent (per cohort) and misbehaves as its :class:`Plan` says, counting
    every fault it injects.
    """

    daemon_threads = False  # server_close() joins every handler thread

    def __init__(self, plan: Plan, *, slow_for: float = 1.5) -> None:
        super().__init__(("127.0.0.1", 0), AudienceHandler)
        self.plan = plan
        self.slow_for = slow_for
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0
        self.audiences: dict[str, set[str]] = {}
        self.injected: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.dropped: set[str] = set()
        self.bodies: list[bytes] = []
        self.headers_seen: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def audience(self, cohort_id: str) -> set[str]:
        with self.lock:
            return set(self.audiences.get(cohort_id, set()))

    def _apply(self, data: dict[str, Any], users: Iterable[str]) -> None:
        audience = self.audiences.setdefault(data["cohort_id"], set())
        if data["in_cohort"]:
            audience.update(users)
        else:
            audience.difference_update(users)

    def receive(self, handler: AudienceHandler, data: dict[str, Any]) -> None:
        with self.lock:
            kind, refused = self._decide(handler, data)
        if kind == "hang":
            self.release.wait(60)
            handler.close_connection = True
        elif kind == "slow":
            self.release.wait(self.slow_for)
            handler.reply(200)
        elif kind == "401":
            # Echo the credentials back, as careless servers do: they must not leak.
            echoed = f"invalid credentials: {handler.headers.get('Authorization')}"
            handler.reply(401, echoed.encode())
        elif kind == "reject":
            rejected = [{"user": u, "reason": "unknown user"} for u in refused]
            handler.reply(200, json.dumps({"rejected": rejected}).encode())
        else:
            handler.reply(*_ANSWERS.get(kind, (200, b"{}", {})))

    def _decide(self, handler: AudienceHandler, data: dict[str, Any]) -> tuple[str, list[str]]:
        """
        Pick what to do with one request, count it, and apply what it keeps.
        """
        users: list[str] = data["users"]
        n = self.requests
        self.requests += 1
        self.headers_seen.append(dict(handler.headers.items()))
        kind = self.plan(n, data["in_cohort"])
        refused: list[str] = []
        if kind == "reject":
            refused = [u for u in users if self.rejected[u] < MAX_REJECTIONS][:2]
            kind = "reject" if refused else "ok"
            self.rejected.update(refused)
        if kind != "ok":
            self.injected[kind] += 1
        if kind in ("ok", "slow", "reject"):
            self._apply(data, [u for u in users if u not in refused])
        elif kind == "drop":
            self.dropped.update(users)
        return kind, refused

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-answer is part of the plan, not an error."""

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@contextmanager
def serving(plan: Plan, *, slow_for: float = 1.5) -> Iterator[AudienceServer]:
    server = AudienceServer(plan, slow_for=slow_for)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join()


# -- the soak ---------------------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """
    The worker "dies" mid-run: a BaseException, so no ``except Exception`` in
    the library records a run for it, as with a real crash.
    """


class CrashingAtRandom(DelegatingStorage):
    """
    Abandons a run at random around ``apply_batch``: before it (the batch was
    acknowledged, not applied) or after it (applied, the run not completed).
    """

    def __init__(self, inner: Storage, rng: random.Random, probability: float) -> None:
        super().__init__(inner)
        self.rng = rng
        self.probability = probability
        self.crashes = 0

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> Any:
        crash_before = self.rng.random() < self.probability / 2
        crash_after = self.rng.random() < self.probability / 2
        if crash_before:
            self.crashes += 1
            raise SimulatedCrash
        result = self.inner.apply_batch(lease, batch)
        if crash_after:
            self.crashes += 1
            raise SimulatedCrash
        return result


def max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


SOAK_FAULTS = {
    Fault.timeout(): 0.03,
    Fault.server_error(): 0.03,
    Fault.rate_limited(retry_after=30.0): 0.03,
    Fault.reject(share=0.05): 0.03,
    Fault.permanent(): 0.01,
    Fault.auth(): 0.005,
}
SOAK_STEP = timedelta(minutes=5)


class Soak:
    """
    Days of simulated time over a few hundred syncs on one SQLite file, with
    random destination faults, random crashes mid-run, random restarts (new
    Scheduler objects on the same store) and random cohort churn.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.rng = random.Random(config["seed"])
        self.clock = FakeClock(T0)
        self.destination = FaultyDestination(
            cs.Capabilities(max_batch_size=100), random_faults=SOAK_FAULTS, seed=config["seed"]
        )
        self.syncs = [(f"h{i:03d}", cs.SyncPolicy.hourly()) for i in range(config["hourly"])] + [
            (f"d{i:03d}", cs.SyncPolicy.daily()) for i in range(config["daily"])
        ]
        self.population = {s: [f"{s}-m{j:04d}" for j in range(300)] for s, _ in self.syncs}
        self.cohorts = {
            s: set(self.rng.sample(keys, self.rng.randint(20, 200)))
            for s, keys in self.population.items()
        }
        self.counters: Counter[str] = Counter()
        self.rss: dict[str, int] = {}
        self.scheduler, self.storage = self.make()
        for sync_id, policy in self.syncs:
            self.scheduler.create_sync(sync_id, "dest", policy, sync_id=sync_id)

    def make(self) -> tuple[cs.Scheduler, CrashingAtRandom]:
        """
        A worker starting up: a new store object and a new Scheduler on the file.
        """
        storage = CrashingAtRandom(
            SQLiteStorage(self.config["store"]), self.rng, self.config["crash_probability"]
        )
        scheduler = cs.Scheduler(
            storage.as_storage(),
            clock=self.clock,
            retention=timedelta(days=self.config["retention_days"]),
            seed=self.rng.randrange(1 << 30),
        )
        scheduler.add_destination("dest", self.destination)
        for sync_id, _ in self.syncs:
            source = functools.partial(self.members, sync_id)
            scheduler.add_cohort(cs.Cohort(id=sync_id, name=sync_id, source=source))
        return scheduler, storage

    def members(self, sync_id: str) -> list[str]:
        return sorted(self.cohorts[sync_id])

    def run_round(self) -> None:
        try:
            self.counters["runs"] += len(self.scheduler.run_due())
        except SimulatedCrash:
            self.counters["crashes"] += 1
            self.scheduler, self.storage = self.make()
        self.destination.batches.clear()  # the test's own record, not the library's memory
        self.clock.slept.clear()

    def hourly_chores(self) -> None:
        """
        Cohorts churn, the host resumes paused syncs, and sometimes restarts.
        """
        rng = self.rng
        for sync_id in rng.sample(sorted(self.cohorts), len(self.cohorts) // 3):
            members = self.cohorts[sync_id]
            leaving = rng.sample(sorted(members), min(len(members) - 1, rng.randint(0, 8)))
            joining = rng.sample(self.population[sync_id], rng.randint(0, 8))
            self.cohorts[sync_id] = (members - set(leaving)) | set(joining)
        self.resume_paused()
        if rng.random() < self.config["restart_probability"]:
            self.counters["restarts"] += 1
            self.scheduler.close()
            self.scheduler, self.storage = self.make()

    def resume_paused(self) -> None:
        for record in self.scheduler.storage.list_syncs():
            if record.sync.status is cs.SyncStatus.PAUSED:
                self.counters["resumed"] += 1
                self.scheduler.resume_sync(record.id)

    def run(self) -> None:
        days = self.config["days"]
        ticks = int(timedelta(days=days) / SOAK_STEP)
        checkpoint = int(timedelta(days=self.config["checkpoint_day"]) / SOAK_STEP)
        for tick in range(1, ticks + 1):
            # Retry backoff and rate-limit waits move the fake clock too: never back.
            self.clock.set(max(self.clock.now(), T0 + tick * SOAK_STEP))
            if tick % 12 == 0:  # every simulated hour
                self.hourly_chores()
            self.run_round()
            if tick == checkpoint:
                gc.collect()
                self.rss["checkpoint"] = max_rss_kib()
        gc.collect()
        self.rss["end"] = max_rss_kib()

    def settle(self) -> None:
        """
        Faults stop; one more simulated day runs every sync at least once more.
        """
        self.destination.random_faults = {}
        self.storage.probability = 0.0
        self.resume_paused()
        final = self.clock.now() + timedelta(days=1)
        while self.clock.now() < final:
            self.clock.advance(SOAK_STEP)
            self.run_round()


def soak_mode(config: dict[str, Any]) -> None:
    """
    Run a :class:`Soak` and print its report as JSON.
    """
    started = time.monotonic()
    soak = Soak(config)
    soak.run()
    injected = Counter(kind.value for _, kind in soak.destination.faults_injected)
    soak.settle()
    report = report_soak(soak, injected)
    report["elapsed"] = time.monotonic() - started
    print(json.dumps(report))


def report_soak(soak: Soak, injected: Counter[str]) -> dict[str, Any]:
    scheduler = soak.scheduler
    destination = soak.destination
    cohorts = soak.cohorts
    counters = soak.counters
    now = scheduler.clock.now()
    mismatched: list[str] = []
    lost = 0
    duplicate_slots = 0
    dead = 0
    oldest: datetime | None = None
    history_rows = 0
    statuses: Counter[str] = Counter()
    for record in scheduler.storage.list_syncs():
        dead_letters = scheduler.storage.dead_letters(record.id)
        dead += len(dead_letters)
        expected = cohorts[record.id] - dead_letters
        delivered = set(scheduler.storage.iter_delivered(record.id))
        audience = destination.audience(record.id)
        if not expected == audience == delivered:
            mismatched.append(record.id)
            lost += len(expected ^ audience)
        statuses[record.sync.status.value] += 1
        runs = scheduler.history(record.id)
        duplicate_slots += len(runs) - len({run.slot for run in runs})
        for run in runs:
            history_rows += 1
            oldest = run.finished_at if oldest is None else min(oldest, run.finished_at)
    with closing(sqlite3.connect(soak.config["store"])) as conn:
        (orphans,) = conn.execute(
            "SELECT count(*) FROM batches WHERE run_id NOT IN (SELECT id FROM runs)"
        ).fetchone()
    return {
        "runs": counters["runs"],
        "crashes": counters["crashes"],
        "restarts": counters["restarts"],
        "resumed": counters["resumed"],
        "injected": dict(injected),
        "rss_kib": soak.rss,
        "mismatched": mismatched,
        "lost": lost,
        "duplicate_slots": duplicate_slots,
        "dead_letters": dead,
        "statuses": dict(statuses),
        "history_rows": history_rows,
        "oldest_age_hours": None if oldest is None else (now - oldest).total_seconds() / 3600,
        "orphan_batches": orphans,
    }


# -- a claim batch killed before its records are stored ---------------------------------

BATCH_SYNCS = [f"b{i}" for i in range(6)]
BATCH_MEMBERS = 1_200
"""Members per sync: three batches of the remote's 500."""


def batch_members(sync_id: str) -> list[str]:
    return [f"{sync_id}-m{i:05d}" for i in range(BATCH_MEMBERS)]


def batch_scheduler(config: dict[str, Any], *, crash: bool) -> cs.Scheduler:
    clock = SharedFakeClock(config["clock"])
    store = open_store(config["store"])
    step = config.get("step") if crash else None
    storage = store if step in (None, "acked") else CrashingStorage(store, step).as_storage()
    scheduler = cs.Scheduler(storage, clock=clock, lease_for=CRASH_LEASE, seed=0)
    for sync_id in BATCH_SYNCS:
        members = batch_members(sync_id)
        scheduler.add_cohort(cs.Cohort(id=f"c-{sync_id}", name=sync_id, source=lambda m=members: m))
    # "acked": killed inside the fifth run's second batch, four runs waiting to be stored.
    crash_at = 4 * 3 + 2 if crash and step == "acked" else None
    scheduler.add_destination("remote", RemoteAudience(config["remote"], crash_at=crash_at))
    return scheduler


def batch_setup_mode(config: dict[str, Any]) -> None:
    scheduler = batch_scheduler(config, crash=False)
    for sync_id in BATCH_SYNCS:
        scheduler.create_sync(f"c-{sync_id}", "remote", cs.SyncPolicy.hourly(), sync_id=sync_id)
    scheduler.close()


def batch_crash_mode(config: dict[str, Any]) -> None:
    """One claim of every sync: the process should die before their records are stored."""
    scheduler = batch_scheduler(config, crash=True)
    runs = scheduler.run_due(claim_batch=len(BATCH_SYNCS))
    print(json.dumps({"survived": True, "runs": len(runs)}))


def batch_recover_mode(config: dict[str, Any]) -> None:
    scheduler = batch_scheduler(config, crash=False)
    clock = scheduler.clock
    assert isinstance(clock, SharedFakeClock)
    expiry = [r.lease.expires_at for r in scheduler.storage.list_syncs() if r.lease is not None]
    if expiry:
        clock.set(max(clock.now(), *expiry) + ONE_US)
    runs = scheduler.run_due()
    print(json.dumps({"runs": [[r.sync_id, r.status.value, r.added] for r in runs]}))
    scheduler.close()


def bulk_create_mode(config: dict[str, Any]) -> None:
    """
    Wait for the start file, then create ``count`` hourly syncs in bulk in
    chunks of ``chunk``, ids prefixed with ``prefix`` and numbered from
    ``first`` (with ``declare``, through ``apply_syncs``): several of these
    at once are creators racing for the same slot buckets.
    """
    start = Path(config["start"])
    deadline = time.monotonic() + 60
    while not start.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no start signal")
        time.sleep(0.005)
    scheduler = cs.Scheduler(open_store(config["store"]), clock=FakeClock(T0))
    scheduler.add_destination("dest", RemoteAudience(os.devnull))
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ()))
    hourly = cs.SyncPolicy.hourly(first_run="next_slot")
    first = config.get("first", 0)
    specs = (
        cs.SyncSpec("c", "dest", hourly, sync_id=f"{config['prefix']}-{i:05d}")
        for i in range(first, first + config["count"])
    )
    with scheduler:
        if config.get("declare"):
            # A replica declaring its syncs at start-up: other replicas
            # declare many of the same ids at the same time.
            scheduler.apply_syncs(specs, prefix=f"{config['prefix']}-", chunk=config["chunk"])
        else:
            scheduler.create_syncs(specs, chunk=config["chunk"])


MODES = {
    "bulk_create": bulk_create_mode,
    "crash": crash_mode,
    "recover": recover_mode,
    "worker": worker_mode,
    "soak": soak_mode,
    "batch_setup": batch_setup_mode,
    "batch_crash": batch_crash_mode,
    "batch_recover": batch_recover_mode,
}


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    MODES[config["mode"]](config)


if __name__ == "__main__":
    main(sys.argv)
