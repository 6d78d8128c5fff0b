"""
Regression tests for the "truthful runs" defects outsiders found: each test
names the defect it pins and fails on the code before the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest

import cohortsync as cs
from cohortsync.exceptions import (
    ConfigurationError,
    SourceError,
    StorageError,
    SyncNotFoundError,
)
from cohortsync.storage import Completion, Lease, MemoryStorage, SQLiteStorage, Storage, SyncRecord
from cohortsync.testing import FakeClock, Fault, FaultyDestination, RecordingDestination

START = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
EMAIL = cs.IdentifierKind.EMAIL


class Members:
    """A membership source the test edits; holds objects so tests can plant junk."""

    def __init__(self, keys: Iterable[object] = ()) -> None:
        self.keys: object = list(keys)

    def members(self) -> Iterable[str]:
        return cast("Iterable[str]", self.keys)


def build(
    clock: FakeClock,
    source: object,
    *,
    destination: cs.Destination | None = None,
    policy: cs.SyncPolicy | None = None,
    storage: Storage | None = None,
    mapping: cs.IdentifierMapping | None = None,
    sync_id: str = "s1",
    **options: Any,
) -> cs.Scheduler:
    scheduler = cs.Scheduler(storage or MemoryStorage(), clock=clock, seed=1, **options)
    scheduler.add_destination("dest", destination or RecordingDestination())
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=source))
    if mapping is not None:
        scheduler.add_mapping("m", mapping)
    scheduler.create_sync(
        "c",
        "dest",
        policy or cs.SyncPolicy.hourly(),
        sync_id=sync_id,
        mapping_id=None if mapping is None else "m",
    )
    return scheduler


def run_next(scheduler: cs.Scheduler, clock: FakeClock, sync_id: str = "s1") -> cs.SyncRun:
    due = scheduler.next_run(sync_id)
    assert due is not None
    if due > clock.now():
        clock.set(due)
    runs = [r for r in scheduler.run_due() if r.sync_id == sync_id]
    assert 1 == len(runs), runs
    return runs[0]


# -- 1. members sharing one destination identifier -----------------------------------


class TestSharedIdentifiers:
    """
    The delivered state is tracked per identifier: an identifier leaves the
    destination only when no member maps to it any more (defect 12.1).
    """

    @pytest.fixture
    def shared(self, clock: FakeClock) -> tuple[cs.Scheduler, Members, RecordingDestination]:
        emails = {"u1": "ann@example.com", "u2": "ANN@example.com", "u3": "bob@example.com"}
        source = Members(["u1", "u2", "u3"])
        dest = RecordingDestination(cs.Capabilities(max_batch_size=10))
        mapping = cs.IdentifierMapping([(EMAIL, emails.get)])
        return build(clock, source, destination=dest, mapping=mapping), source, dest

    def test_one_request_per_identifier_and_collisions_counted(
        self, clock: FakeClock, shared: tuple[cs.Scheduler, Members, RecordingDestination]
    ) -> None:
        """Two members with one email: the batch holds it once; the run counts the collision."""
        scheduler, _, dest = shared

        run = run_next(scheduler, clock)

        (batch,) = dest.calls(cs.Operation.ADD)
        assert sorted(set(batch.identifiers)) == sorted(batch.identifiers)
        assert ["ann@example.com", "bob@example.com"] == sorted(batch.identifiers)
        assert (2, 1, cs.RunStatus.SUCCEEDED) == (run.added, run.collisions, run.status)

    def test_identifier_stays_while_another_member_needs_it(
        self, clock: FakeClock, shared: tuple[cs.Scheduler, Members, RecordingDestination]
    ) -> None:
        """One of two members sharing an email leaves: nothing is removed; the last one does."""
        scheduler, source, dest = shared
        run_next(scheduler, clock)
        source.keys = ["u2", "u3"]

        left_one = run_next(scheduler, clock)

        assert [] == dest.calls(cs.Operation.REMOVE)
        assert {"ann@example.com", "bob@example.com"} == dest.audience()
        assert (0, 0, 1) == (left_one.added, left_one.removed, left_one.collisions)
        assert (0, 0) == (scheduler.preview("s1").adds, scheduler.preview("s1").removes)
        source.keys = ["u3"]

        left_both = run_next(scheduler, clock)

        assert {"bob@example.com"} == dest.audience()
        assert 1 == left_both.removed

    def test_a_leaver_and_a_joiner_with_one_identifier_send_nothing(
        self, clock: FakeClock, shared: tuple[cs.Scheduler, Members, RecordingDestination]
    ) -> None:
        """u1 leaves while u2 (same email) joins: the identifier stays, no remove, no re-add."""
        scheduler, source, dest = shared
        source.keys = ["u1", "u3"]
        run_next(scheduler, clock)
        source.keys = ["u2", "u3"]

        run = run_next(scheduler, clock)

        assert 1 == len(dest.batches)
        assert {"ann@example.com", "bob@example.com"} == dest.audience()
        assert (0, 0) == (run.added, run.removed)
        source.keys = ["u3"]
        run_next(scheduler, clock)
        assert {"bob@example.com"} == dest.audience()

    def test_realtime_change_feed_keeps_a_shared_identifier(self, clock: FakeClock) -> None:
        """A change feed reporting one of two sharers leaving removes nothing."""

        class Feed:
            def __init__(self) -> None:
                self.keys = {"u1", "u2"}
                self.log: list[tuple[int, set[str], set[str]]] = []

            def members(self) -> Iterable[str]:
                return sorted(self.keys)

            def cursor(self) -> str:
                return str(len(self.log))

            def changes_since(self, cursor: str) -> cs.Changes:
                added: set[str] = set()
                removed: set[str] = set()
                for _, a, r in self.log[int(cursor) :]:
                    added = (added - r) | a
                    removed = (removed - a) | r
                return cs.Changes(added=added, removed=removed, cursor=self.cursor())

            def leave(self, key: str) -> None:
                self.keys.discard(key)
                self.log.append((len(self.log), set(), {key}))

        feed = Feed()
        dest = RecordingDestination(cs.Capabilities(max_batch_size=10))
        emails = {"u1": "ann@example.com", "u2": "ann@example.com"}
        scheduler = build(
            clock,
            feed,
            destination=dest,
            policy=cs.SyncPolicy.realtime(),
            mapping=cs.IdentifierMapping([(EMAIL, emails.get)]),
        )
        run_next(scheduler, clock)
        clock.advance(90)
        feed.leave("u1")

        run = run_next(scheduler, clock)

        assert {"ann@example.com"} == dest.audience()
        assert (0, 1) == (run.removed, run.collisions)

    def test_batches_never_hold_an_identifier_twice_across_chunks(self, clock: FakeClock) -> None:
        """Sharers in different batches (and existing members re-sent in full) are sent once."""
        emails = {f"u{i:02d}": f"person{i % 3}@example.com" for i in range(12)}
        dest = RecordingDestination(cs.Capabilities(max_batch_size=2))
        scheduler = build(
            clock,
            Members(sorted(emails)),
            destination=dest,
            mapping=cs.IdentifierMapping([(EMAIL, emails.get)]),
        )

        first = run_next(scheduler, clock)
        scheduler.request_full_resync("s1")
        full = run_next(scheduler, clock)

        sent = [i for b in dest.calls(cs.Operation.ADD) for i in b.identifiers]
        assert 6 == len(sent)  # three identifiers, each sent once per run
        assert (3, 9) == (first.added, first.collisions)
        assert 3 == full.added


# -- 2. a source returning a str ----------------------------------------------------------


class TestSourceShape:
    """A snapshot that is not a collection of keys is a SourceError naming the cohort (12.2)."""

    @pytest.mark.parametrize("junk", ["u1", b"u1", {"u1": 1}, bytearray(b"u1")])
    def test_str_bytes_and_mappings_are_refused(self, clock: FakeClock, junk: object) -> None:
        """`lambda: "u1"` is refused instead of delivering "u" and "1"."""
        dest = RecordingDestination()
        scheduler = build(clock, lambda: junk, destination=dest)

        run = run_next(scheduler, clock)

        assert (cs.RunStatus.FAILED, "SourceError") == (run.status, run.error_type)
        assert "'c'" in (run.error_message or "") or "c" in (run.error_message or "")
        assert [] == dest.batches
        with pytest.raises(SourceError, match="not a collection of member keys"):
            scheduler.preview("s1")


# -- 3. skipped members and `succeeded` ---------------------------------------------------


class TestSkippedIsNotSucceeded:
    """A run that skipped members is `partial`; nothing valid at all is `failed` (12.3)."""

    def test_integer_keys_fail_the_run_with_the_reason(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Django-style integer primary keys: the run fails, says why, and logs a warning."""
        dest = RecordingDestination()
        scheduler = build(clock, lambda: [1, 2, 3], destination=dest)

        with caplog.at_level(logging.WARNING, logger="cohortsync"):
            run = run_next(scheduler, clock)

        assert (cs.RunStatus.FAILED, 3, "SourceError") == (
            run.status,
            run.skipped,
            run.error_type,
        )
        assert "not a str (int)" in (run.error_message or "")
        assert [] == dest.batches
        assert any("invalid member key" in r.getMessage() for r in caplog.records)
        assert 3 == len(scheduler.export_history("s1")[0]["members"])  # type: ignore[arg-type]

    def test_some_skipped_members_make_a_partial_run(self, clock: FakeClock) -> None:
        """One unresolvable member among three: `partial`, not `succeeded`."""
        emails = {"u1": "a@example.com", "u2": "b@example.com"}
        scheduler = build(
            clock,
            Members(["u1", "u2", "u3"]),
            mapping=cs.IdentifierMapping([(EMAIL, emails.get)]),
        )

        run = run_next(scheduler, clock)

        assert (cs.RunStatus.PARTIAL, 2, 1) == (run.status, run.added, run.skipped)


# -- 4. split batches and their write-ahead records ------------------------------------


class TestSplitBatchRecords:
    """Every batch a destination sees is covered by exactly one pending record (12.4)."""

    def test_a_rejected_member_is_never_removed_later(self, clock: FakeClock) -> None:
        """A bad member isolated by bisection is rejected; no later run "removes" it."""
        dest = FaultyDestination(cs.Capabilities(max_batch_size=8), always=Fault.bad_data(["u3"]))
        storage = MemoryStorage()
        scheduler = build(
            clock, Members([f"u{i}" for i in range(8)]), destination=dest, storage=storage
        )

        first = run_next(scheduler, clock)
        assert [] == storage.pending_batches("s1")
        second = run_next(scheduler, clock)

        assert (7, 1) == (first.added, first.rejected)
        assert [] == dest.calls(cs.Operation.REMOVE)
        assert 0 == second.removed
        assert "u3" not in dest.audience()

    def test_a_crash_while_bisecting_leaves_only_the_halves_recorded(
        self, clock: FakeClock
    ) -> None:
        """A crash after the left half was sent: the parent's record is gone, the half's stays."""

        class Crash(BaseException):
            pass

        class Bisecting(FaultyDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                if len(batch.members) == 2:
                    raise Crash  # the process dies while sending a quarter
                return super().add(batch)

        storage = MemoryStorage()
        dest = Bisecting(cs.Capabilities(max_batch_size=8), always=Fault.bad_data(["u0"]))
        scheduler = build(
            clock, Members([f"u{i}" for i in range(8)]), destination=dest, storage=storage
        )
        clock.set(scheduler.next_run("s1") or clock.now())
        with pytest.raises(Crash):
            scheduler.run_due()

        pending = storage.pending_batches("s1")
        assert [["u0", "u1"]] == [[m.key for m in p.members] for p in pending]


# -- 5. one broken sync never stops the others ---------------------------------------------


class TestIsolation:
    """A sync that cannot be claimed or recorded is isolated; the others run (12.5)."""

    def test_update_at_the_instant_of_the_last_run_does_not_wedge(self, clock: FakeClock) -> None:
        """update_sync with the clock unmoved: the sync keeps running, and so do the others."""
        dest = RecordingDestination()
        scheduler = build(clock, Members(["a"]), destination=dest, policy=cs.SyncPolicy.realtime())
        for n in range(2, 6):
            scheduler.create_sync("c", "dest", cs.SyncPolicy.realtime(), sync_id=f"s{n}")
        scheduler.run_due()
        scheduler.update_sync("s1", cs.SyncPolicy.realtime(rejection_attempts=4))

        runs = 0
        for _ in range(16):
            runs += len(scheduler.run_due())
            clock.advance(MINUTE)

        assert 1 + 5 * 15 == runs  # the updated sync at once, then all five every minute

    def test_a_sync_whose_run_cannot_be_recorded_does_not_stop_the_others(
        self, clock: FakeClock
    ) -> None:
        """complete_run fails for one sync: the others still run; it gets a failed record."""

        class Flaky(MemoryStorage):
            def complete_run(self, lease: Lease, completion: Completion) -> None:
                if lease.sync_id == "broken" and not completion.run.notes[-1:] == (
                    "isolated: the run could not be completed; other syncs went on",
                ):
                    raise StorageError("disk full (injected)")
                super().complete_run(lease, completion)

        scheduler = build(clock, Members(["a"]), storage=Flaky(), sync_id="broken")
        for n in range(3):
            scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id=f"ok{n}")

        runs = scheduler.run_due()

        assert {"broken", "ok0", "ok1", "ok2"} == {r.sync_id for r in runs}
        broken = scheduler.history("broken")[0]
        assert (cs.RunStatus.FAILED, "StorageError") == (broken.status, broken.error_type)

    def test_repeated_identical_failures_pause_the_sync(self, clock: FakeClock) -> None:
        """The same non-transient failure five runs in a row pauses the sync with the reason."""
        dest = FaultyDestination(always=Fault.permanent())
        scheduler = build(clock, Members(["a"]), destination=dest)

        runs = [run_next(scheduler, clock) for _ in range(5)]

        assert [cs.RunStatus.FAILED] * 5 == [r.status for r in runs]
        sync = scheduler.get_sync("s1")
        assert cs.SyncStatus.PAUSED == sync.status
        assert "failed 5 runs in a row with PermanentError" in (sync.status_reason or "")
        assert None is scheduler.next_run("s1")

    def test_transient_outages_never_pause(self, clock: FakeClock) -> None:
        """A destination that is down (transient errors) is retried every period, not paused."""
        dest = FaultyDestination(always=Fault.server_error())
        scheduler = build(
            clock,
            Members(["a"]),
            destination=dest,
            policy=cs.SyncPolicy.hourly(retry=cs.RetryPolicy(max_retries=0)),
        )

        for _ in range(7):
            run_next(scheduler, clock)

        assert cs.SyncStatus.ACTIVE == scheduler.get_sync("s1").status


# -- 6. remote text no store can hold ------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage()
    elif request.param == "sqlite":
        store = SQLiteStorage(tmp_path / "s.db")
        yield store
        store.close()
    else:
        dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
        if not dsn:
            pytest.skip("PostgreSQL tests need COHORTSYNC_TEST_POSTGRES_DSN (CI sets it)")
        from cohortsync.storage import PostgresStorage

        store = PostgresStorage(dsn, schema=f"t_{os.urandom(5).hex()}")
        yield store
        store.close()


class TestUnstorableText:
    """Every string that reaches a store is validated or sanitised at the boundary (12.6)."""

    @pytest.mark.parametrize("junk", ["bad\x00reason", "bad\udc80reason"])
    def test_rejection_reasons_with_nul_or_surrogates_are_recorded(
        self, clock: FakeClock, any_store: Storage, junk: str
    ) -> None:
        """A vendor answering 200 with NUL or a lone surrogate in a reason: recorded, not wedged."""

        class Junky(RecordingDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                super().add(batch)
                return cs.DeliveryResult.partial([cs.Rejection(batch.identifiers[0], junk)])

        scheduler = build(clock, Members(["a", "b"]), destination=Junky(), storage=any_store)

        first = run_next(scheduler, clock)
        second = run_next(scheduler, clock)

        assert (cs.RunStatus.PARTIAL, 1) == (first.status, first.rejected)
        assert second.error_type is None
        (entry,) = scheduler.ledger("s1")
        assert entry.reason.startswith("bad\\")
        entry.reason.encode("utf-8")

    @pytest.mark.parametrize("bad_id", ["x\udc80", "a\x00b"])
    def test_ids_no_store_can_hold_are_configuration_errors(
        self, clock: FakeClock, any_store: Storage, bad_id: str
    ) -> None:
        """A sync id with a lone surrogate is a typed error in every call, never UnicodeError."""
        scheduler = build(clock, Members(["a"]), storage=any_store)
        for call in (
            lambda: scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id=bad_id),
            lambda: scheduler.get_sync(bad_id),
            lambda: scheduler.history(bad_id),
            lambda: scheduler.next_run(bad_id),
            lambda: scheduler.sync_now(bad_id),
        ):
            with pytest.raises(ConfigurationError):
                call()


# -- 7. run_forever sleeps -------------------------------------------------------------------


class CountingStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        self.claims += 1
        return super().claim_due(now, owner, lease_for, limit)


class TestRunForeverSleeps:
    """An idle worker sleeps until the next due time or lease expiry (12.7)."""

    def test_no_spin_while_another_worker_holds_the_only_due_sync(self, clock: FakeClock) -> None:
        """With the only due sync leased elsewhere, the loop sleeps until the lease expires."""
        storage = CountingStorage()
        scheduler = build(clock, Members(["a"]), storage=storage, lease_for=timedelta(minutes=5))
        storage.claim_due(clock.now(), "other-worker", timedelta(minutes=5), 1)  # held elsewhere
        stop = StopAfter(clock, timedelta(minutes=6))

        scheduler.run_forever(stop, idle=3600)

        assert storage.claims < 20
        assert 1 == len(scheduler.history("s1"))  # taken over after the crashed lease expired

    def test_sleeps_until_the_next_slot(self, clock: FakeClock) -> None:
        """Between hourly runs the loop calls claim_due a handful of times, not thousands."""
        storage = CountingStorage()
        scheduler = build(clock, Members(["a"]), storage=storage)
        stop = StopAfter(clock, timedelta(hours=3))

        scheduler.run_forever(stop, idle=3600)

        assert 3 <= len(scheduler.history("s1")) <= 4
        assert storage.claims < 30


class StopAfter:
    """A stop event that is set once the fake clock passes a deadline."""

    def __init__(self, clock: FakeClock, after: timedelta) -> None:
        self.clock = clock
        self.deadline = clock.now() + after

    def is_set(self) -> bool:
        return self.clock.now() >= self.deadline


# -- 8. slot accounting ----------------------------------------------------------------------


class TestSlotAccounting:
    """Slot counts change with the sync write or not at all (12.8)."""

    def test_failed_update_and_delete_leave_counts_alone(self, clock: FakeClock) -> None:
        """An update that loses a race and a delete that fails change no bucket count."""

        class Racing(MemoryStorage):
            fail_save = False

            def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
                if self.fail_save:
                    raise cs.exceptions.ConflictError(record.id, expected_generation, 99)
                super().save_sync(record, expected_generation=expected_generation)

        storage = Racing()
        scheduler = build(clock, Members(["a"]), storage=storage, policy=cs.SyncPolicy.daily())
        bucket = storage.get_sync("s1").slot_bucket
        assert bucket is not None

        def occupied() -> list[int]:
            return [storage.least_loaded_slot(86_400, 1_440, b) for b in (bucket, bucket + 1)]

        before = occupied()
        storage.fail_save = True
        with pytest.raises(cs.exceptions.ConflictError):
            scheduler.update_sync("s1", cs.SyncPolicy.daily(rejection_attempts=4))
        with pytest.raises(cs.exceptions.ConflictError):
            scheduler.delete_sync("s1")
        storage.fail_save = False

        assert before == occupied()
        assert bucket + 1 == occupied()[0]  # the sync still holds its bucket


# -- 9. coalesced slots and triggers -----------------------------------------------------------


class TestEverySlotAccountedFor:
    """Every slot is run or counted; triggers follow the documented definitions (12.9)."""

    def test_celery_beat_ticks_at_57_seconds_lose_no_slot(self, clock: FakeClock) -> None:
        """Ticks at :57 with runs ending after the minute: every real-time slot runs or counts."""

        class Slow(RecordingDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                clock.advance(5)  # ends after the next minute boundary
                return super().add(batch)

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                clock.advance(5)
                return super().remove(batch)

        source = Members(["a"])
        scheduler = build(clock, source, destination=Slow(), policy=cs.SyncPolicy.realtime())
        clock.set(START + timedelta(seconds=57))
        for minute in range(20):
            source.keys = ["a"] if minute % 2 else ["a", f"b{minute}"]
            scheduler.run_due()
            clock.set(START + timedelta(minutes=minute + 1, seconds=57))

        runs = sorted(scheduler.history("s1"), key=lambda r: r.slot)
        accounted = len(runs) + sum(r.coalesced for r in runs)
        slots = {START + timedelta(minutes=m) for m in range(1, 21)}
        assert {r.slot for r in runs[1:]} <= slots
        assert len(slots) + 1 <= accounted + 1  # creation run + every minute slot
        assert {cs.Trigger.REALTIME} == {r.trigger for r in runs[1:]}

    def test_a_realtime_run_hours_late_is_a_catch_up(self, clock: FakeClock) -> None:
        """A real-time slot run three hours late is `catch_up`, with the skipped slots counted."""
        scheduler = build(clock, Members(["a"]), policy=cs.SyncPolicy.realtime())
        run_next(scheduler, clock)
        clock.advance(3 * HOUR)

        (late,) = scheduler.run_due()

        assert cs.Trigger.CATCH_UP == late.trigger
        assert 179 <= late.coalesced <= 181


# -- 10. history after a takeover ----------------------------------------------------------


class TestTakeoverAccounting:
    """A slot's run record accounts for what every attempt delivered (12.10)."""

    def test_the_takeover_record_includes_the_killed_attempt(self, clock: FakeClock) -> None:
        """Killed after two batches: the takeover's record counts all six members, with a note."""

        class Killed(BaseException):
            pass

        class DiesOnce(RecordingDestination):
            armed = True

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                if self.armed and len(self.batches) == 2:
                    self.armed = False
                    raise Killed
                return super().add(batch)

        storage = MemoryStorage()
        dest = DiesOnce(cs.Capabilities(max_batch_size=2))
        scheduler = build(
            clock, Members([f"u{i}" for i in range(6)]), destination=dest, storage=storage
        )
        with pytest.raises(Killed):
            scheduler.run_due()
        clock.advance(timedelta(minutes=6))  # the killed worker's lease expires
        worker = cs.Scheduler(storage, clock=clock, seed=2)
        worker.add_destination("dest", dest)
        worker.add_cohort(cs.Cohort(id="c", name="C", source=Members([f"u{i}" for i in range(6)])))

        (run,) = worker.run_due()

        assert (6, 3) == (run.added, run.batches)
        assert any(n.startswith("takeover: includes +4") for n in run.notes)
        assert [run] == worker.history("s1")


# -- 11. clock jumps -----------------------------------------------------------------------


class TestClockJumps:
    """A wrong clock never silences a sync for more than a period after it is corrected (12.11)."""

    def test_a_year_forward_then_corrected(self, clock: FakeClock) -> None:
        """Runs at a clock a year ahead, then the clock is corrected: hourly runs resume."""
        scheduler = build(clock, Members(["a"]))
        run_next(scheduler, clock)
        clock.set(START + timedelta(days=365))
        scheduler.run_due()
        clock.set(START + 2 * HOUR, backwards=True)

        scheduler.run_due()  # notices the schedule is from the future
        due = scheduler.next_run("s1")

        assert due is not None
        assert due <= clock.now() + HOUR
        clock.set(due)
        assert 1 == len(scheduler.run_due())

    def test_realtime_keeps_running_when_the_clock_goes_back_three_hours(
        self, clock: FakeClock
    ) -> None:
        """A clock moved back three hours: real-time runs go on every minute, not in 3 h."""
        scheduler = build(clock, Members(["a"]), policy=cs.SyncPolicy.realtime())
        run_next(scheduler, clock)
        clock.advance(3 * HOUR)
        scheduler.run_due()
        clock.set(clock.now() - 3 * HOUR, backwards=True)

        ran = 0
        for _ in range(5):
            clock.advance(MINUTE)
            ran += len(scheduler.run_due())

        assert ran >= 4
        slots = [r.slot for r in scheduler.history("s1")]
        assert len(slots) == len(set(slots))


# -- 13. flags set during a run ------------------------------------------------------------------


class TestFlagsDuringARun:
    """Flags a host sets during a run are never lost, whatever run it is (12.13)."""

    @pytest.mark.parametrize("first_run", [True, False])
    def test_full_resync_requested_during_a_run(self, clock: FakeClock, first_run: bool) -> None:
        """request_full_resync during the first (or a later) run: the next run is full."""
        holder: dict[str, cs.Scheduler] = {}

        class Asks(RecordingDestination):
            ask = first_run

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                if self.ask:
                    self.ask = False
                    holder["s"].request_full_resync("s1")
                return super().add(batch)

        source = Members(["a", "b"])
        dest = Asks()
        scheduler = build(clock, source, destination=dest)
        holder["s"] = scheduler
        run_next(scheduler, clock)
        if not first_run:
            dest.ask = True
            source.keys = ["a", "b", "c"]
            run_next(scheduler, clock)

        following = run_next(scheduler, clock)

        assert following.full_sync
        assert "full_resync" in following.notes


# -- 14. the end of time -------------------------------------------------------------------------


class TestEndOfTime:
    """All instant arithmetic saturates (12.14)."""

    def test_run_due_in_the_last_minutes_of_year_9999(self) -> None:
        """Leases and backoffs near datetime.max do not raise OverflowError."""
        clock = FakeClock(datetime(9999, 12, 31, 23, 50, tzinfo=timezone.utc))
        scheduler = build(clock, Members(["a"]), policy=cs.SyncPolicy.realtime())

        (run,) = scheduler.run_due()
        clock.advance(timedelta(minutes=9, seconds=30))
        scheduler.run_due()

        assert cs.RunStatus.SUCCEEDED == run.status


# -- 15. rate limits mean any window -----------------------------------------------------------


class TestRateLimitWindows:
    """`RateLimit(n, s)` allows at most n requests in any window of s seconds (12.15, 18.4)."""

    @pytest.mark.parametrize(
        ("requests", "per"), [(18, 1.0), (10, 1.0), (24, 86_400.0), (100, 10.0)]
    )
    def test_no_window_holds_more_than_the_limit(
        self, clock: FakeClock, requests: int, per: float
    ) -> None:
        """Reserved send times never put more than `requests` in any `per`-second window."""
        from cohortsync._delivery import RateLimiter

        limiter = RateLimiter(cs.RateLimit(requests=requests, per_seconds=per), clock)
        times: list[datetime] = []
        for _ in range(requests * 3 + 1):
            limiter.acquire()
            times.append(clock.now())

        window = timedelta(seconds=per)
        assert all(times[i + requests] - times[i] >= window for i in range(len(times) - requests))
        assert times[requests] - times[0] == window  # and no slower than it must be

    @pytest.mark.parametrize("preset", ["tiktok_ads", "hubspot", "marketo", "twitter_ads"])
    def test_catalog_presets_keep_their_first_window(self, clock: FakeClock, preset: str) -> None:
        """TikTok's 24 calls a day: at most 24 in the first 24 hours (was 47)."""
        from cohortsync._delivery import RateLimiter
        from cohortsync.destinations import catalog

        limit = catalog.PRESETS[preset].rate_limit
        assert limit is not None
        limiter = RateLimiter(limit, clock)
        start = clock.now()
        sent = []
        while clock.now() - start < timedelta(seconds=limit.per_seconds):
            limiter.acquire()
            sent.append(clock.now())
        in_first_window = [t for t in sent if t - start < timedelta(seconds=limit.per_seconds)]
        assert limit.requests == len(in_first_window)


# -- 16. smaller defects ---------------------------------------------------------------------------


class TestSmallerDefects:
    """The smaller items of the truthful-runs issue (12.16)."""

    def test_realtime_reconciles_in_the_first_run_of_each_hour(self, clock: FakeClock) -> None:
        """When the :00 slot is coalesced, the hour's reconciliation happens at the next run."""
        calls: list[str] = []

        class Feed:
            def members(self) -> Iterable[str]:
                calls.append("snapshot")
                return ["a"]

            def cursor(self) -> str:
                return "0"

            def changes_since(self, cursor: str) -> cs.Changes:
                calls.append("feed")
                return cs.Changes(added=(), removed=(), cursor="0")

        scheduler = build(clock, Feed(), policy=cs.SyncPolicy.realtime())
        run_next(scheduler, clock)  # 10:00 full
        clock.set(START + timedelta(minutes=58))
        scheduler.run_due()
        calls.clear()
        clock.set(START + timedelta(hours=1, minutes=1, seconds=5))  # 11:00 coalesced

        scheduler.run_due()

        assert ["snapshot"] == calls

    def test_a_closed_memory_store_refuses_work(self) -> None:
        """MemoryStorage.close() makes the store unusable, like every other store."""
        store = MemoryStorage()
        store.close()
        with pytest.raises(StorageError):
            store.list_syncs()

    def test_update_can_switch_back_to_the_identity_mapping(self, clock: FakeClock) -> None:
        """mapping_id=None means the identity mapping; leaving it out keeps the current one."""
        emails = {"a": "a@example.com"}
        scheduler = build(
            clock, Members(["a"]), mapping=cs.IdentifierMapping([(EMAIL, emails.get)])
        )
        kept = scheduler.update_sync("s1", cs.SyncPolicy.hourly(rejection_attempts=4))
        identity = scheduler.update_sync("s1", mapping_id=None)
        assert ("m", None) == (kept.mapping_id, identity.mapping_id)

    def test_registering_an_id_twice_is_an_error(self, clock: FakeClock) -> None:
        """The same cohort, destination or mapping id twice raises unless replace=True."""
        scheduler = build(clock, Members(["a"]))
        cohort = cs.Cohort(id="c", name="Other", source=lambda: ["x"])
        with pytest.raises(ConfigurationError, match="already registered"):
            scheduler.add_cohort(cohort)
        with pytest.raises(ConfigurationError, match="already registered"):
            scheduler.add_destination("dest", RecordingDestination())
        scheduler.add_mapping("m2", cs.IdentifierMapping.identity())
        with pytest.raises(ConfigurationError, match="already registered"):
            scheduler.add_mapping("m2", cs.IdentifierMapping.identity())
        assert cohort is scheduler.add_cohort(cohort, replace=True)
        assert "Other" == scheduler.cohort("c").name

    def test_history_of_an_unknown_sync_raises(self, clock: FakeClock) -> None:
        """history() of an unknown sync raises like next_run() does."""
        scheduler = build(clock, Members(["a"]))
        with pytest.raises(SyncNotFoundError):
            scheduler.history("nope")
        with pytest.raises(SyncNotFoundError):
            scheduler.ledger("nope")

    def test_a_path_is_accepted_as_storage(self, tmp_path: Path) -> None:
        """Scheduler("file.db") opens an SQLite store; other junk is refused at once."""
        with cs.Scheduler(str(tmp_path / "file.db")) as scheduler:
            assert isinstance(scheduler.storage, SQLiteStorage)
        with pytest.raises(ConfigurationError, match="storage"):
            cs.Scheduler(42)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="clock"):
            cs.Scheduler(MemoryStorage(), clock=datetime.now)  # type: ignore[arg-type]

    def test_an_async_adapter_is_refused_when_registered(self) -> None:
        """`async def add` fails at add_destination with what to do, not at run time."""

        class Async(cs.Destination):
            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:  # type: ignore[override]
                return cs.DeliveryResult.ok()

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        scheduler = cs.Scheduler(MemoryStorage())
        with pytest.raises(ConfigurationError, match="async def add"):
            scheduler.add_destination("a", Async())


def _unused(_: Callable[..., object]) -> None:  # keeps imports used in typing-only spots
    pass
