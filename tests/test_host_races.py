"""
Host calls made at the same moment (two web requests, a CLI pause while a
Celery task asks for "sync now", two processes) never lose each other's
changes: each reads the sync, changes what it read and writes it
compare-and-set on its revision, and reads again when another writer came
first.

The races are made certain, not left to luck: a store shared by the racing
threads holds each thread's first write until every thread is about to
write, so each has read the sync before any wrote it. The same store logs
every write in commit order with the revision its writer read and the one
it replaced: a write that replaced a revision its writer never read is a
lost update.
"""

from __future__ import annotations

import faulthandler
import itertools
import multiprocessing
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import attrs
import pytest

import cohortsync as cs
from cohortsync.exceptions import ConfigurationError, ConflictError
from cohortsync.storage import BulkSyncWrites, MemoryStorage, SQLiteStorage, Storage, SyncRecord
from cohortsync.testing import FakeClock, RecordingDestination
from host_project.storage import AuditedStorage
from single_sync import Members

START = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)


@attrs.frozen
class Write:
    """One write the racing store let through, in commit order."""

    read: int
    """The revision the writer had read (the record it wrote carries it)."""
    replaced: int
    """The revision stored when the write happened."""
    sync: cs.Sync


class RacingStore:
    """
    A store shared by racing threads: each thread's first write waits until
    every thread of the race is about to write, and every write is logged
    with the revision its writer read and the one it replaced.

    Everything else goes to the store it wraps, so the scheduler uses that
    store's own ``save_sync_at``.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.writes: list[Write] = []
        self.read_pause = 0.0
        self._gate: Any = None
        self._waited = threading.local()
        self._commit = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def arm(self, gate: Any) -> None:
        """
        Hold the next write of each thread (or process) at *gate*, a
        ``threading.Barrier`` or a ``multiprocessing`` one, until it lets
        every writer through.
        """
        self._gate = gate
        self._waited = threading.local()

    def race(self, *calls: Callable[[], object]) -> list[object]:
        """
        Each call in a thread of its own, their first writes held until all
        of them are about to write; each call's answer or exception.
        """
        self.arm(threading.Barrier(len(calls), timeout=10))
        answers: list[object] = [None] * len(calls)

        def run(i: int) -> None:
            try:
                answers[i] = calls[i]()
            except Exception as exc:  # noqa: BLE001 - the answer of that call
                answers[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._gate = None
        return answers

    def get_sync(self, sync_id: str) -> SyncRecord:
        record = self.inner.get_sync(sync_id)
        if self.read_pause:
            time.sleep(self.read_pause)  # another thread may write meanwhile
        return record

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        self._hold()
        with self._commit:
            replaced = self.inner.get_sync(record.id).revision
            self.inner.save_sync(record, expected_generation=expected_generation)
            self.writes.append(Write(record.revision, replaced, record.sync))

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        self._hold()
        with self._commit:
            replaced = self.inner.get_sync(record.id).revision
            self.inner.save_sync_at(record, expected_revision=expected_revision)  # type: ignore[attr-defined]
            self.writes.append(Write(record.revision, replaced, record.sync))

    def _hold(self) -> None:
        gate = self._gate
        if gate is not None and not getattr(self._waited, "done", False):
            self._waited.done = True
            gate.wait(timeout=30)

    def lost(self) -> list[Write]:
        """The writes that replaced a revision their writer had not read."""
        return [w for w in self.writes if w.read != w.replaced]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Storage]]:
    """Fresh stores of each shipped kind (threads share one, as web workers do)."""
    if request.param == "memory":
        yield MemoryStorage
        return
    if request.param == "sqlite":
        counter = itertools.count()
        yield lambda: SQLiteStorage(tmp_path / f"race-{next(counter)}.db")
        return
    dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
    if not dsn:
        if os.environ.get("CI"):
            pytest.fail("COHORTSYNC_TEST_POSTGRES_DSN is not set, and CI must run these")
        pytest.skip("no PostgreSQL server (COHORTSYNC_TEST_POSTGRES_DSN)")
    psycopg = pytest.importorskip("psycopg")
    from cohortsync.storage import PostgresStorage

    schemas: list[str] = []

    def postgres() -> Storage:
        schemas.append(f"cs_test_{secrets.token_hex(6)}")
        return PostgresStorage(dsn, schema=schemas[-1])

    yield postgres
    with psycopg.connect(dsn, autocommit=True) as admin:
        for schema in schemas:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def hosts(
    make_store: Callable[[], Storage], policy: cs.SyncPolicy | None = None, *, count: int = 2
) -> tuple[RacingStore, list[cs.Scheduler]]:
    """
    *count* schedulers (one per web worker) on one racing store holding sync "s1".
    """
    store = RacingStore(make_store())
    clock = FakeClock(START)
    schedulers = []
    for _ in range(count):
        scheduler = cs.Scheduler(cast("Storage", store), clock=clock, seed=1)
        scheduler.add_destination("dest", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=Members(["u1"])))
        schedulers.append(scheduler)
    schedulers[0].create_sync("c", "dest", policy or cs.SyncPolicy.hourly(), sync_id="s1")
    return store, schedulers


class TestTwoCallsAtOnce:
    """Two host calls that read the same sync both take effect, in either order."""

    def test_pause_and_full_resync(self, make_store: Callable[[], Storage]) -> None:
        """A pause and a full resync at once: paused, and the resync kept for the resume."""
        store, (web, cli) = hosts(make_store)
        try:
            answers = store.race(
                lambda: web.request_full_resync("s1"), lambda: cli.pause_sync("s1")
            )
            record = store.inner.get_sync("s1")
        finally:
            web.close()

        assert all(isinstance(a, cs.Sync) for a in answers), answers
        assert (cs.SyncStatus.PAUSED, True) == (record.sync.status, record.full_resync)
        assert [] == store.lost()
        assert 2 == len(store.writes)  # the loser read again and wrote once

    def test_resume_and_full_resync(self, make_store: Callable[[], Storage]) -> None:
        """A resume and a full resync of a paused sync at once: active, due now, full."""
        store, (web, cli) = hosts(make_store)
        try:
            web.pause_sync("s1")
            answers = store.race(
                lambda: web.request_full_resync("s1"), lambda: cli.resume_sync("s1")
            )
            record = store.inner.get_sync("s1")
        finally:
            web.close()

        assert all(isinstance(a, cs.Sync) for a in answers), answers
        assert (cs.SyncStatus.ACTIVE, True, START) == (
            record.sync.status,
            record.full_resync,
            record.next_due,
        )
        assert [] == store.lost()

    def test_delete_is_never_undone_by_sync_now(self, make_store: Callable[[], Storage]) -> None:
        """A delete and a "sync now" at once: deleted; the sync now ran first or is refused."""
        store, (web, cli) = hosts(make_store)
        try:
            answers = store.race(lambda: web.sync_now("s1"), lambda: cli.delete_sync("s1"))
            record = store.inner.get_sync("s1")
            next_run = web.next_run("s1")
        finally:
            web.close()

        assert isinstance(answers[1], cs.Sync), answers
        assert isinstance(answers[0], (cs.Sync, ConfigurationError)), answers
        assert (cs.SyncStatus.DELETED, None) == (record.sync.status, next_run)
        assert [] == store.lost()

    def test_update_keeps_a_full_resync(self, make_store: Callable[[], Storage]) -> None:
        """An update and a full resync at once: the new generation, and the resync kept."""
        store, (web, cli) = hosts(make_store)
        daily = cs.SyncPolicy.daily()
        try:
            answers = store.race(
                lambda: web.request_full_resync("s1"), lambda: cli.update_sync("s1", daily)
            )
            record = store.inner.get_sync("s1")
        finally:
            web.close()

        assert all(isinstance(a, cs.Sync) for a in answers), answers
        assert (2, daily, True) == (record.sync.generation, record.sync.policy, record.full_resync)
        assert [] == store.lost()

    def test_a_pause_never_drops_a_deletion(self, make_store: Callable[[], Storage]) -> None:
        """A delete that removes what was delivered and a pause at once: the teardown is kept."""
        policy = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)
        store, (web, cli) = hosts(make_store, policy)
        try:
            answers = store.race(lambda: web.pause_sync("s1"), lambda: cli.delete_sync("s1"))
            record = store.inner.get_sync("s1")
        finally:
            web.close()

        assert all(isinstance(a, cs.Sync) for a in answers), answers
        assert cs.Trigger.TEARDOWN == record.next_trigger
        assert [] == store.lost()

    def test_an_upsert_and_a_pause(self, make_store: Callable[[], Storage]) -> None:
        """apply_syncs changing a sync while a host pauses it: updated once, still paused."""
        store, (deploy, web) = hosts(make_store)
        spec = cs.SyncSpec("c", "dest", cs.SyncPolicy.daily(), sync_id="s1")
        try:
            answers = store.race(lambda: deploy.apply_syncs([spec]), lambda: web.pause_sync("s1"))
            record = store.inner.get_sync("s1")
        finally:
            web.close()

        assert not any(isinstance(a, Exception) for a in answers), answers
        # A declaration never resumes a sync: whichever came first, it stays paused.
        assert (cs.SyncStatus.PAUSED, 2) == (record.sync.status, record.sync.generation)
        assert [] == store.lost()


class TestARunCompletingMeanwhile:
    """A run that completes between a host call's read and its write is not written over."""

    def test_a_write_read_before_the_completion_conflicts(
        self, make_store: Callable[[], Storage]
    ) -> None:
        """The completion bumps the revision: a save at the revision read before it is refused."""
        store = make_store()
        clock = FakeClock(START)
        scheduler = cs.Scheduler(store, clock=clock, seed=1)
        try:
            scheduler.add_destination("dest", RecordingDestination())
            scheduler.add_cohort(cs.Cohort(id="c", name="C", source=Members(["u1"])))
            scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s1")
            read = store.get_sync("s1")  # a host call's read ...
            (run,) = scheduler.run_due()  # ... a run completes ...
            completed = store.get_sync("s1")
            paused = attrs.evolve(read, sync=attrs.evolve(read.sync, status=cs.SyncStatus.PAUSED))
            writes: BulkSyncWrites = cast("Any", store)
            with pytest.raises(ConflictError):  # ... and the stale write is refused
                writes.save_sync_at(paused, expected_revision=read.revision)
            # The scheduler's own call re-reads: the run's schedule survives the pause.
            scheduler.pause_sync("s1")
            after = store.get_sync("s1")
        finally:
            scheduler.close()

        assert cs.RunStatus.SUCCEEDED == run.status
        assert read.revision + 1 == completed.revision
        assert completed.next_due == after.next_due != read.next_due
        assert cs.SyncStatus.PAUSED == after.sync.status


class TestManyCallsAtOnce:
    """Hammering one sync from two threads loses no write."""

    def test_pause_resume_and_full_resyncs(self, make_store: Callable[[], Storage]) -> None:
        """
        200 calls from two threads (pauses and resumes; full resyncs and
        confirmed removals): every call that returned wrote once, no write
        replaced a revision its writer had not read, and the sync is as the
        last write left it.
        """
        store, (web, cli) = hosts(make_store)
        store.read_pause = 0.0005  # reads and writes of the two threads interleave
        counts = {"ok": 0, "conflict": 0}
        lock = threading.Lock()

        def hammer(calls: list[Callable[[], cs.Sync]]) -> None:
            for call in calls:
                try:
                    call()
                except ConflictError:
                    outcome = "conflict"  # bounded retries, all lost to the other thread
                else:
                    outcome = "ok"
                with lock:
                    counts[outcome] += 1

        toggles = [
            (lambda: cli.pause_sync("s1")) if i % 2 == 0 else (lambda: cli.resume_sync("s1"))
            for i in range(100)
        ]
        flags = [
            (lambda: web.request_full_resync("s1"))
            if i % 2 == 0
            else (lambda: web.confirm_removals("s1"))
            for i in range(100)
        ]
        try:
            store.race(lambda: hammer(toggles), lambda: hammer(flags))
            record = store.inner.get_sync("s1")
        finally:
            web.close()

        assert 200 == counts["ok"] + counts["conflict"]
        assert [] == store.lost()
        assert counts["ok"] == len(store.writes)
        assert store.writes[-1].sync == record.sync
        assert record.full_resync  # requested, and never written back to False


class AlwaysBeaten(MemoryStorage):
    """A store where another writer changes the sync just before each save_sync_at."""

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        current = self.get_sync(record.id)
        self.save_sync(current, expected_generation=current.sync.generation)
        super().save_sync_at(record, expected_revision=expected_revision)


class PausedMeanwhile(MemoryStorage):
    """A store where a host pauses the sync right after the clock check read it."""

    pause: Callable[[], object] | None = None

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        found = super().scheduled_after(now)
        if self.pause is not None:
            pause, self.pause = self.pause, None
            pause()
        return found


class TestConflictsThatPersist:
    """A call that another writer beats at every attempt gives up, saying so."""

    def test_the_call_raises_after_five_attempts(self) -> None:
        """ConflictError names the sync, the revision compared and the attempts; nothing changed."""
        store, (web, _) = hosts(AlwaysBeaten)

        with pytest.raises(ConflictError) as caught:
            web.pause_sync("s1")

        error = caught.value
        assert ("s1", "revision", 5) == (error.sync_id, error.counter, error.attempts)
        assert "during each of 5 attempts" in str(error)
        assert cs.SyncStatus.ACTIVE == store.inner.get_sync("s1").sync.status

    def test_a_store_refusal_reads_as_one(self) -> None:
        """A store's own ConflictError is one attempt, worded for the writer that read."""
        generation = ConflictError("s1", 1, 2)
        revision = ConflictError("s1", 4, 5, counter="revision")

        assert ("generation", 1) == (generation.counter, generation.attempts)
        assert "is at generation 2, not 1" in str(generation)
        assert "is at revision 5, not 4" in str(revision)


class TestAStoreWrittenFor01:
    """A store without save_sync_at still takes every host call, through save_sync."""

    def test_host_calls_are_saved_with_save_sync(self, clock: FakeClock) -> None:
        """Pause, resume, a full resync, an update and a delete: each one save_sync."""
        storage = AuditedStorage(MemoryStorage(), tenant="t")
        scheduler = cs.Scheduler(cast("Storage", storage), clock=clock, seed=1)
        scheduler.add_destination("dest", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=Members(["u1"])))
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s1")

        scheduler.pause_sync("s1")
        scheduler.request_full_resync("s1")
        scheduler.resume_sync("s1")
        scheduler.update_sync("s1", DAILY)
        scheduler.delete_sync("s1")

        assert [("save_sync", "t/s1")] * 5 == [e for e in storage.audit if e[0] == "save_sync"]
        record = storage.get_sync("s1")
        assert (cs.SyncStatus.DELETED, 2, True) == (
            record.sync.status,
            record.sync.generation,
            record.full_resync,
        )


class TestClockCheck:
    """The schedule recomputed after the clock went back never undoes a host call."""

    def test_a_pause_made_meanwhile_stays(self, clock: FakeClock) -> None:
        """A pause between the clock check's read and its write: still paused afterwards."""
        store = PausedMeanwhile()
        scheduler = cs.Scheduler(store, clock=clock, seed=1)
        scheduler.add_destination("dest", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=Members(["u1"])))
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s1")
        clock.set(clock.now() + timedelta(days=365))
        scheduler.run_due()
        clock.set(clock.now() - timedelta(days=365), backwards=True)
        store.pause = lambda: scheduler.pause_sync("s1", "by an operator")

        scheduler.run_due()

        sync = scheduler.get_sync("s1")
        assert (cs.SyncStatus.PAUSED, "by an operator") == (sync.status, sync.status_reason)


# -- two processes -----------------------------------------------------------------------

Call = Callable[[cs.Scheduler, str], object]
DAILY = cs.SyncPolicy.daily()

ROUNDS: tuple[tuple[str, Call, Call], ...] = (
    ("r1", lambda s, i: s.request_full_resync(i), lambda s, i: s.pause_sync(i)),
    ("r2", lambda s, i: s.sync_now(i), lambda s, i: s.delete_sync(i)),
    ("r3", lambda s, i: s.request_full_resync(i), lambda s, i: s.update_sync(i, DAILY)),
)
"""Per round: the sync, what the first process calls, what the second one calls."""


def _open(where: tuple[str, str, str | None]) -> Storage:
    kind, path_or_dsn, schema = where
    if kind == "sqlite":
        return SQLiteStorage(path_or_dsn)
    from cohortsync.storage import PostgresStorage

    assert schema is not None  # every PostgreSQL test works in a schema of its own
    return PostgresStorage(path_or_dsn, schema=schema)


def _on(storage: Storage) -> cs.Scheduler:
    scheduler = cs.Scheduler(storage, clock=FakeClock(START), seed=1)
    scheduler.add_destination("dest", RecordingDestination())
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=Members(["u1"])))
    return scheduler


def race_worker(where: tuple[str, str, str | None], role: int, gate: Any, out: Any) -> None:
    """
    One host process: each round's call, its first write held at *gate*
    until the other process is about to write too. Each answer (an error's
    repr included) goes to *out*; a process stuck for 90 s exits.
    """
    faulthandler.dump_traceback_later(90, exit=True)
    answers: list[str] = []
    store = RacingStore(_open(where))
    try:
        scheduler = _on(cast("Storage", store))
        for sync_id, *calls in ROUNDS:
            store.arm(gate)
            try:
                calls[role](scheduler, sync_id)
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                answers.append(repr(exc))
            else:
                answers.append("ok")
    finally:
        store.close()
        out.put((role, answers))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str, str | None]]:
    """A store several processes open: one SQLite file, or one PostgreSQL schema."""
    if request.param == "sqlite":
        yield ("sqlite", os.fspath(tmp_path / "shared.db"), None)
        return
    dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
    if not dsn:
        if os.environ.get("CI"):
            pytest.fail("COHORTSYNC_TEST_POSTGRES_DSN is not set, and CI must run these")
        pytest.skip("no PostgreSQL server (COHORTSYNC_TEST_POSTGRES_DSN)")
    psycopg = pytest.importorskip("psycopg")
    schema = f"cs_test_{secrets.token_hex(6)}"
    try:
        yield ("postgres", dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


class TestTwoProcesses:
    """Two host processes on one store, calling at once: neither loses the other's change."""

    def test_each_round_keeps_both_changes(self, shared_store: tuple[str, str, str | None]) -> None:
        """Pause with a full resync, delete with "sync now", update with a full resync."""
        storage = _open(shared_store)
        scheduler = _on(storage)
        for sync_id, *_ in ROUNDS:
            scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id=sync_id)
        ctx = multiprocessing.get_context("spawn")
        gate, out = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=race_worker, args=(shared_store, role, gate, out))
            for role in range(2)
        ]
        for p in procs:
            p.start()
        try:
            answers = dict(out.get(timeout=150) for _ in procs)
            records = {sync_id: storage.get_sync(sync_id) for sync_id, *_ in ROUNDS}
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            scheduler.close()

        assert ["ok", "ok", "ok"] == answers[1], answers
        assert "ok" == answers[0][0] == answers[0][2], answers
        assert answers[0][1] == "ok" or "a deleted sync cannot run" in answers[0][1], answers
        r1, r2, r3 = records["r1"], records["r2"], records["r3"]
        assert (cs.SyncStatus.PAUSED, True) == (r1.sync.status, r1.full_resync)
        assert (cs.SyncStatus.DELETED, None) == (r2.sync.status, r2.next_due)
        assert (2, DAILY, True) == (r3.sync.generation, r3.sync.policy, r3.full_resync)
