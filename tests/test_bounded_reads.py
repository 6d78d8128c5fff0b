"""
Issue 19: no call reads every sync. upcoming(), syncs(), simulate() and an idle
worker's round read as many sync rows with 2,000 syncs as with 10, on every
shipped store; iter_upcoming() gives what the old all-syncs computation gave.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cohortsync as cs
from cohortsync import _schedule
from cohortsync._policy import Cadence
from cohortsync._scheduler import MAX_UPCOMING_PER_SYNC, Upcoming
from cohortsync._sync import Sync, SyncStatus, Trigger
from cohortsync.storage import MemoryStorage, SQLiteStorage, Storage, SyncRecord, _sql
from cohortsync.testing import FakeClock, RecordingDestination, simulate
from host_project.storage import AuditedStorage, DictStorage
from strategies import offsets, policies

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
UNTIL = T0 + timedelta(minutes=10)
DUE = 3
"""Syncs due before UNTIL, whatever the store holds."""


# -- counting what a store reads ------------------------------------------------------


class CountingDict(dict[str, SyncRecord]):
    """MemoryStorage's records by id, counting each record looked at."""

    reads = 0

    def __getitem__(self, key: str) -> SyncRecord:
        self.reads += 1
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.reads += 1
        return super().get(key, default)

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            self.reads += 1
            yield key

    def values(self) -> Any:
        self.reads += len(self)
        return super().values()

    def items(self) -> Any:
        self.reads += len(self)
        return super().items()


class Steps:
    """An SQLite progress handler counting virtual-machine steps."""

    def __init__(self) -> None:
        self.taken = 0

    def __call__(self) -> int:
        self.taken += 1
        return 0  # go on


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many sync rows the SQL stores decode (every read of a sync goes through it)."""
    count = [0]
    original = _sql.decode_sync

    def counting(row: Any, instants: Any) -> SyncRecord:
        count[0] += 1
        return original(row, instants)

    monkeypatch.setattr(_sql, "decode_sync", counting)
    return count


Reads = Callable[[], int]
StoreFactory = Callable[[], tuple[Storage, Reads]]


@pytest.fixture
def postgres() -> Iterator[Callable[[], Storage]]:
    dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
    if not dsn:
        if os.environ.get("CI"):
            pytest.fail("COHORTSYNC_TEST_POSTGRES_DSN is not set, and CI must run these")
        pytest.skip("no PostgreSQL server (COHORTSYNC_TEST_POSTGRES_DSN)")
    psycopg = pytest.importorskip("psycopg")
    from cohortsync.storage import PostgresStorage

    stores: list[Storage] = []

    def make() -> Storage:
        store = PostgresStorage(dsn, schema=f"cs_test_{secrets.token_hex(6)}")
        stores.append(store)
        return store

    yield make
    with psycopg.connect(dsn, autocommit=True) as admin:
        for store in stores:
            store.close()
            admin.execute(f"DROP SCHEMA IF EXISTS {store.schema} CASCADE")  # type: ignore[attr-defined]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path, decoded: list[int]) -> StoreFactory:
    """Fresh stores of each shipped kind, each with a count of the sync rows it has read."""
    counter = itertools.count()
    if request.param == "memory":

        def memory() -> tuple[Storage, Reads]:
            records = CountingDict()
            return MemoryStorage(syncs=records), lambda: records.reads

        return memory
    if request.param == "sqlite":

        def sqlite() -> tuple[Storage, Reads]:
            store = SQLiteStorage(tmp_path / f"store-{next(counter)}.db")
            return store, lambda: decoded[0]

        return sqlite
    make_postgres = request.getfixturevalue("postgres")
    return lambda: (make_postgres(), lambda: decoded[0])


def populate(store: Storage, n: int) -> None:
    """*n* syncs: DUE hourly ones due in the next minutes, the rest daily, due tomorrow."""
    for i in range(n):
        due = i < DUE
        policy = cs.SyncPolicy.hourly() if due else cs.SyncPolicy.daily()
        sync = Sync(
            id=f"due-{i}" if due else f"idle-{i:05}",
            cohort_id="c",
            destination_id="dest",
            policy=policy,
            created_at=T0 - timedelta(days=1),
            updated_at=T0 - timedelta(days=1),
        )
        store.create_sync(
            SyncRecord(
                sync=sync,
                next_due=T0 + timedelta(minutes=i + 1)
                if due
                else T0 + timedelta(days=1, seconds=i),
                offset=(i + 1) * 60 if due else i,
                anchor=T0 - timedelta(days=1),
                scheduled_from=T0 - timedelta(minutes=1),
            )
        )


def reads_of_each_call(make_store: StoreFactory, n: int) -> dict[str, int]:
    """Sync rows read by each call, on a store holding *n* syncs."""
    store, reads = make_store()
    populate(store, n)
    clock = FakeClock(T0)
    scheduler = cs.Scheduler(store, clock=clock, seed=1)
    scheduler.add_destination("dest", RecordingDestination())
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1", "u2"]))
    counts: dict[str, int] = {}

    def measure(name: str, call: Callable[[], object]) -> object:
        before = reads()
        result = call()
        counts[name] = reads() - before
        return result

    upcoming = measure("upcoming(until)", lambda: scheduler.upcoming(UNTIL))
    assert [f"due-{i}" for i in range(DUE)] == [u.sync_id for u in upcoming]  # type: ignore[attr-defined]
    far = measure(
        "first 2 of iter_upcoming(30 days)",
        lambda: list(islice(scheduler.iter_upcoming(T0 + timedelta(days=30)), 2)),
    )
    assert ["due-0", "due-1"] == [u.sync_id for u in far]  # type: ignore[attr-defined]
    two = measure(
        "upcoming(30 days, limit=2)", lambda: scheduler.upcoming(T0 + timedelta(days=30), limit=2)
    )
    assert far == two
    page = measure("syncs(limit=5)", lambda: scheduler.syncs(limit=5))
    assert 5 == len(page)  # type: ignore[arg-type]
    runs = measure("simulate(10 minutes)", lambda: simulate(scheduler, until=UNTIL))
    assert {f"due-{i}" for i in range(DUE)} == {r.sync_id for r in runs}  # type: ignore[attr-defined]
    measure("idle run_due()", scheduler.run_due)
    wake = measure("idle next_due()", store.next_due)
    assert T0 + timedelta(hours=1) < wake  # type: ignore[operator]
    store.close()
    print(f"{type(store).__name__} with {n} syncs: {counts}")
    return counts


class TestReadsDoNotGrowWithTheStore:
    """Each call reads as many sync rows with 2,000 syncs as with 10."""

    def test_same_reads_with_10_and_2000_syncs(self, make_store: StoreFactory) -> None:
        small = reads_of_each_call(make_store, 10)
        large = reads_of_each_call(make_store, 2_000)

        # A stream's first page holds 16 syncs: all of the small store's 10.
        stream = "first 2 of iter_upcoming(30 days)"
        assert (10, 16) == (small.pop(stream), large.pop(stream))
        assert small == large
        # What they are: the rows shown (3 due, 2 asked for, 5 listed), and no
        # more than a run's claim, record and completion per run.
        assert DUE == large["upcoming(until)"]
        assert 5 == large["syncs(limit=5)"]
        assert 2 == large["upcoming(30 days, limit=2)"]
        assert large["simulate(10 minutes)"] <= 10 * DUE
        assert large["idle run_due()"] + large["idle next_due()"] <= 1

    def test_sqlite_executes_as_much_with_10_and_2000_syncs(self, tmp_path: Path) -> None:
        """
        SQLite runs as many virtual-machine steps with 2,000 syncs as with 10
        (each statement a range of an index, never a scan of the table).
        """
        steps = {}
        for n in (10, 2_000):
            store = SQLiteStorage(tmp_path / f"{n}.db")
            populate(store, n)
            scheduler = cs.Scheduler(store, clock=FakeClock(T0))
            step = Steps()
            store._threaded().main.set_progress_handler(step, 1)
            scheduler.upcoming(UNTIL)
            scheduler.syncs(limit=5)
            scheduler.run_due()
            store.next_due()
            steps[n] = step.taken
            store.close()

        assert steps[10] == steps[2_000]

    def test_sqlite_idle_next_due_reads_one_row(self, tmp_path: Path) -> None:
        """An idle next_due() on SQLite reads the first row of the due index, not a page of 64."""
        steps = {}
        for n in (3, 10, 200):
            store = SQLiteStorage(tmp_path / f"{n}.db")
            populate(store, n)
            step = Steps()
            store._threaded().main.set_progress_handler(step, 1)
            assert T0 + timedelta(minutes=1) == store.next_due()
            steps[n] = step.taken
            store.close()

        assert steps[3] == steps[10] == steps[200]

    def test_sqlite_steady_run_reads_as_much_with_50_and_3000_delivered(
        self, tmp_path: Path
    ) -> None:
        """
        A run that adds and removes three members executes as many SQLite steps
        whether the sync has delivered 50 members or 3,000 (the identifier
        check reads its index, not every delivered row of the sync).
        """
        steps = {}
        for n in (50, 3_000):
            members = [f"user-{i:05}" for i in range(n)]
            store = SQLiteStorage(tmp_path / f"{n}.db")
            clock = FakeClock(T0)
            scheduler = cs.Scheduler(store, clock=clock)
            scheduler.add_destination("dest", RecordingDestination())
            source = cs.CallableSource(members.copy)  # the list as it is at each read
            scheduler.add_cohort(cs.Cohort(id="c", name="C", source=source))
            scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s")
            scheduler.run_due()  # the first sync: every member
            for generation in range(2):
                members[:3] = [f"join-{generation}-{k}" for k in range(3)]
                clock.advance(timedelta(seconds=1))
                scheduler.sync_now("s")
                step = Steps()
                store._threaded().main.set_progress_handler(step, 1)
                (run,) = scheduler.run_due()
                store._threaded().main.set_progress_handler(None, 1)
                assert (3, 3) == (run.added, run.removed)
            steps[n] = step.taken
            store.close()

        assert steps[50] == steps[3_000]

    def test_a_0_1_store_is_read_once_per_call(self) -> None:
        """A store without paged reads gets the same answers, from one list_syncs()."""
        old = AuditedStorage(MemoryStorage(), tenant="t")
        new = MemoryStorage()
        for store in (old, new):
            populate(store, 40)  # type: ignore[arg-type]
        schedulers = [cs.Scheduler(s, clock=FakeClock(T0)) for s in (old, new)]  # type: ignore[arg-type]

        for scheduler in schedulers:
            assert not hasattr(old, "due_between")
            assert [u.sync_id for u in scheduler.upcoming(UNTIL)] == [
                f"due-{i}" for i in range(DUE)
            ]
        assert schedulers[0].syncs(after="due-2", limit=4) == schedulers[1].syncs(
            after="due-2", limit=4
        )
        assert schedulers[0].syncs() == schedulers[1].syncs()
        assert 40 == len(schedulers[0].syncs())


class TestPagedSyncs:
    """syncs() pages by id; iter_syncs() streams them all."""

    def test_pages_cover_every_sync_once(self) -> None:
        store = MemoryStorage()
        populate(store, 50)
        scheduler = cs.Scheduler(store, clock=FakeClock(T0))
        pages: list[cs.Sync] = []
        after = None
        while page := scheduler.syncs(after=after, limit=7):
            pages.extend(page)
            after = page[-1].id

        assert scheduler.syncs() == pages
        assert pages == list(scheduler.iter_syncs())
        assert [s.id for s in pages] == sorted(s.id for s in pages)
        assert 50 == len(pages)

    def test_bad_arguments(self) -> None:
        scheduler = cs.Scheduler(MemoryStorage(), clock=FakeClock(T0))
        with pytest.raises(cs.exceptions.ConfigurationError):
            scheduler.syncs(limit=-1)
        with pytest.raises(cs.exceptions.ConfigurationError):
            scheduler.syncs(after="")
        with pytest.raises(cs.exceptions.ConfigurationError):
            scheduler.upcoming(UNTIL, limit=-1)


# -- iter_upcoming against the old computation ---------------------------------------


def all_syncs_upcoming(records: list[SyncRecord], until: datetime, now: datetime) -> list[Upcoming]:
    """
    The 0.1 computation over every stored sync, with the overdue rule: the
    oracle. An overdue sync runs once (a catch-up if it missed a period), then
    from the first slot after *now*.
    """
    out: list[Upcoming] = []
    for record in records:
        if record.sync.status is not SyncStatus.ACTIVE or record.next_due is None:
            continue
        at: datetime | None = record.next_due
        trigger = record.next_trigger
        for _ in range(MAX_UPCOMING_PER_SYNC):
            if at is None or at > until:
                break
            if record.sync.policy.cadence is Cadence.ONE_TIME or trigger is Trigger.TEARDOWN:
                out.append(Upcoming(at, record.id, trigger))
                break
            # Each run as it will be recorded: a real-time slot is a realtime
            # run, and a missed one started now is a catch-up once the slot
            # after it has passed (on an uneven grid: counted in slots).
            following = None
            if at < now and _schedule.uneven_grid(record.sync):
                following = _schedule.next_slot_after(record.sync, record.anchor, record.offset, at)
            trigger = _schedule.effective_trigger(
                trigger, record.sync.cadence, at, max(at, now), next_slot=following
            )
            out.append(Upcoming(at, record.id, trigger))
            at = _schedule.next_slot_after(record.sync, record.anchor, record.offset, max(at, now))
            trigger = Trigger.SCHEDULED
    out.sort(key=lambda u: (u.at, u.sync_id))
    return out


IDS = ("a", "b", "B", "a-1", "10", "9", "\u00e9t\u00e9", "z", "\u4e2d", "s")


@st.composite
def stored_syncs(draw: st.DrawFn) -> list[SyncRecord]:
    records = []
    for sync_id in draw(st.lists(st.sampled_from(IDS), unique=True, max_size=len(IDS))):
        policy = draw(policies())
        anchor = T0 - timedelta(minutes=draw(st.integers(0, 3 * 24 * 60)))
        minutes = st.integers(-120, 30 * 60)
        sync = Sync(
            id=sync_id,
            cohort_id="c",
            destination_id="dest",
            policy=policy,
            status=draw(st.sampled_from(SyncStatus)),
            created_at=anchor,
            updated_at=anchor,
        )
        records.append(
            SyncRecord(
                sync=sync,
                next_due=draw(st.none() | minutes.map(lambda m: T0 + timedelta(minutes=m))),
                next_trigger=draw(st.sampled_from(Trigger)),
                offset=draw(offsets(policy)),
                anchor=anchor,
            )
        )
    return records


class TestIterUpcoming:
    """iter_upcoming() is the old all-syncs computation, streamed."""

    @settings(max_examples=60, deadline=None)
    @given(
        records=stored_syncs(),
        until=st.integers(-180, 30 * 60).map(lambda m: T0 + timedelta(minutes=m)),
        limit=st.integers(0, 40),
        clones=st.integers(0, 12),
    )
    def test_matches_the_all_syncs_computation(
        self, records: list[SyncRecord], until: datetime, limit: int, clones: int
    ) -> None:
        # Clones of one sync with the same due time make ties that cross page
        # boundaries (the first page holds 16 syncs).
        if records and clones:
            first = records[0]
            records += [
                attrs.evolve(first, sync=attrs.evolve(first.sync, id=f"{first.id}~{k:02}"))
                for k in range(clones)
            ]
        store = MemoryStorage()
        for record in records:
            store.create_sync(record)
        expected = all_syncs_upcoming(store.list_syncs(), until, T0)
        for storage in (store, DictStorage()):
            if storage is not store:
                for record in records:
                    storage.create_sync(record)  # derived paged reads: one list_syncs
            scheduler = cs.Scheduler(storage, clock=FakeClock(T0))

            assert expected == list(scheduler.iter_upcoming(until))
            assert expected == scheduler.upcoming(until)
            assert expected[:limit] == scheduler.upcoming(until, limit=limit)

    @pytest.mark.parametrize(
        "policy",
        [
            cs.SyncPolicy.hourly(),
            cs.SyncPolicy.realtime(),
            cs.SyncPolicy.every(timedelta(minutes=15)),
        ],
    )
    def test_an_overdue_sync_is_listed_once_then_from_now(self, policy: cs.SyncPolicy) -> None:
        """
        Workers down for three days: the sync runs once (a catch-up) and then
        on its grid. upcoming() used to list every missed slot (an outside
        test found 8.77 million past runs for 1,000 hourly syncs after a year).
        """
        clock = FakeClock(T0)
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock, seed=0)
        scheduler.add_destination("dest", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1"]))
        scheduler.create_sync("c", "dest", policy, sync_id="s")
        scheduler.run_due()
        due = scheduler.next_run("s")
        assert due is not None
        clock.advance(timedelta(days=3))
        now = clock.now()

        listed = scheduler.upcoming(now + timedelta(hours=1))

        assert (due, cs.Trigger.CATCH_UP) == (listed[0].at, listed[0].trigger)
        assert all(u.at > now for u in listed[1:])
        assert listed[1].at == _schedule.next_slot_after(
            scheduler.get_sync("s"),
            scheduler.storage.get_sync("s").anchor,
            scheduler.storage.get_sync("s").offset,
            now,
        )
        # What the engine then does: one catch-up run, then the listed slots.
        runs = scheduler.run_due()
        assert [(due, cs.Trigger.CATCH_UP)] == [(r.slot, r.trigger) for r in runs]
        assert listed[1].at == scheduler.next_run("s")

    def test_a_sync_run_while_the_stream_is_read_is_listed_once(
        self, make_store: StoreFactory
    ) -> None:
        """
        A worker runs syncs the stream has read already: each moves to a later
        next_due, where the store's order brings it up again. It used to be
        listed there too (an outside test: 6,690 duplicate runs in a 3-hour
        calendar of 20,000 hourly syncs); it shows as it was, once.
        """
        store, _ = make_store()
        clock = FakeClock(T0)

        def scheduler() -> cs.Scheduler:
            made = cs.Scheduler(store, clock=clock, seed=1)
            made.add_destination("dest", RecordingDestination())
            made.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1"]))
            return made

        reader, worker = scheduler(), scheduler()
        hourly = cs.SyncPolicy.hourly(first_run="next_slot")
        # 2,000 slots an hour apart spread over the hour: 100 runs listed
        # cover about 3 minutes, read in pages of 16, 32, 64 ... syncs, so
        # most syncs are still unread when the worker runs the first 2 minutes.
        reader.create_syncs(
            cs.SyncSpec("c", "dest", hourly, sync_id=f"h{i:04}") for i in range(2000)
        )
        until = T0 + timedelta(hours=3)
        before = reader.upcoming(until)

        stream = reader.iter_upcoming(until)
        listed = list(itertools.islice(stream, 100))
        clock.advance(timedelta(minutes=2))
        ran = worker.run_due()
        listed += stream

        assert ran, "the worker ran syncs the stream had read"
        assert {r.sync_id for r in ran} <= {u.sync_id for u in listed[:100]}
        assert before == listed

    def test_keeps_the_cap_per_sync(self) -> None:
        """A real-time sync lists at most MAX_UPCOMING_PER_SYNC runs, as before."""
        store = MemoryStorage()
        sync = Sync(
            id="rt",
            cohort_id="c",
            destination_id="dest",
            policy=cs.SyncPolicy.realtime(),
            created_at=T0,
            updated_at=T0,
        )
        store.create_sync(SyncRecord(sync=sync, next_due=T0, anchor=T0))
        store.create_sync(attrs.evolve(store.get_sync("rt"), sync=attrs.evolve(sync, id="rt2")))
        until = T0 + timedelta(days=8)
        scheduler = cs.Scheduler(store, clock=FakeClock(T0))

        upcoming = scheduler.upcoming(until)

        assert 2 * MAX_UPCOMING_PER_SYNC == len(upcoming)
        assert all_syncs_upcoming(store.list_syncs(), until, T0) == upcoming
