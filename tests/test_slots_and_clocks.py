"""
Every slot is run or counted, and the schedule survives wrong clocks, clocks
before 1970 and the end of year 9999.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import cohortsync as cs
from cohortsync.storage import MemoryStorage, Placement, SQLiteStorage, SyncRecord
from cohortsync.testing import FakeClock, RecordingDestination
from single_sync import Members, build, run_next

START = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)

MINUTE = timedelta(minutes=1)

HOUR = timedelta(hours=1)


class TestSlotAccounting:
    """Slot counts change with the sync write or not at all (12.8)."""

    def test_failed_update_and_delete_leave_counts_alone(self, clock: FakeClock) -> None:
        """An update that loses a race and a delete that fails change no bucket count."""

        class Racing(MemoryStorage):
            fail_save = False

            def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
                if self.fail_save:
                    raise cs.exceptions.ConflictError(
                        record.id, expected_revision, 99, counter="revision"
                    )
                super().save_sync_at(record, expected_revision=expected_revision)

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


class TestCreatePlacedByTheStore:
    """create_sync lets the store pick the bucket inside the write when the first run is now."""

    class Counting(MemoryStorage):
        """Counts how a create reached the store."""

        picks = 0
        placed = 0
        placed_under_lock = 0

        def least_loaded_slot(self, period: int, buckets: int, preferred: int) -> int:
            self.picks += 1
            return super().least_loaded_slot(period, buckets, preferred)

        def create_sync_least_loaded(self, record: SyncRecord, buckets: int) -> SyncRecord:
            self.placed += 1
            return super().create_sync_least_loaded(record, buckets)

        def create_syncs_placed(
            self, ids: Sequence[str], place: Placement
        ) -> tuple[list[SyncRecord], list[str]]:
            self.placed_under_lock += 1
            return super().create_syncs_placed(ids, place)

    @pytest.mark.parametrize(
        ("policy", "placed"),
        [
            (cs.SyncPolicy.daily(), 1),
            (cs.SyncPolicy.hourly(), 1),
            (cs.SyncPolicy.every(timedelta(minutes=15)), 1),
            (cs.SyncPolicy.daily(first_run="next_slot"), 0),
            (cs.SyncPolicy.daily(at=time(6, 0)), 0),
            (cs.SyncPolicy.realtime(), 0),
        ],
        ids=["daily", "hourly", "every", "next-slot", "chosen-time", "realtime"],
    )
    def test_which_path(self, clock: FakeClock, policy: cs.SyncPolicy, placed: int) -> None:
        """
        One store call for a spread sync due now; one placement under the
        store's slot lock for one due at its slot (its slot decides when it
        is due); no pick for the others.
        """
        storage = self.Counting()
        scheduler = cs.Scheduler(storage, clock=clock)
        scheduler.add_cohort(
            cs.Cohort(id="c", name="c", type=cs.CohortType.BEHAVIORAL, source=Members(["a"]))
        )
        scheduler.add_destination("d", RecordingDestination())

        sync = scheduler.create_sync("c", "d", policy)

        assert placed == storage.placed
        at_slot = policy.first_run is cs.FirstRun.NEXT_SLOT
        assert (1 if at_slot else 0) == storage.placed_under_lock
        assert 0 == storage.picks
        assert clock.now() == scheduler.next_run(sync.id) or at_slot

    def test_the_same_spread_as_one_pick_at_a_time(self, clock: FakeClock) -> None:
        """Daily syncs created through the store's pick fill the buckets as picks would."""
        storage = MemoryStorage()
        scheduler = cs.Scheduler(storage, clock=clock)
        scheduler.add_cohort(
            cs.Cohort(id="c", name="c", type=cs.CohortType.BEHAVIORAL, source=Members(["a"]))
        )
        scheduler.add_destination("d", RecordingDestination())
        for i in range(3_000):
            scheduler.create_sync("c", "d", cs.SyncPolicy.daily(), sync_id=f"s{i}")

        counts = storage.slot_counts(86_400, 1_440)
        assert 3_000 == sum(counts)
        assert {2, 3} == set(counts)
        offsets = [storage.get_sync(f"s{i}").offset for i in range(3_000)]
        assert all(o // 60 == storage.get_sync(f"s{i}").slot_bucket for i, o in enumerate(offsets))


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


class TestRealtimeReconciliation:
    """A real-time sync reconciles with a full snapshot in the first run of each hour."""

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

    def test_one_warning_per_round_not_per_sync(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """
        A clock corrected under many syncs logs one WARNING per round (an
        outside test got 1,001 lines for 1,001 syncs), the per-sync detail at DEBUG.
        """
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock, seed=0)
        scheduler.add_destination("d", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["a"]))
        for i in range(50):
            scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id=f"s{i}")
        clock.set(START + timedelta(days=365))
        scheduler.run_due()
        clock.set(START + 2 * HOUR, backwards=True)

        with caplog.at_level("DEBUG", logger="cohortsync"):
            scheduler.run_due()

        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert 1 == len(warnings), [r.getMessage() for r in warnings]
        assert "50 sync(s) rescheduled" in warnings[0].getMessage()
        assert 50 == sum("schedule computed at" in r.getMessage() for r in caplog.records)
        assert all(
            (due := scheduler.next_run(f"s{i}")) is not None and due <= clock.now() + HOUR
            for i in range(50)
        )


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


class TestClocksBeforeTheEpoch:
    """A sync created while the clock read 1970 or earlier runs, on SQLite too."""

    @pytest.mark.parametrize("year", [1969, 1970])
    def test_a_sync_created_in_the_sixties_runs(self, tmp_path: Path, year: int) -> None:
        """On SQLite a sync created at or before 1970 runs (its row was called damaged)."""
        clock = FakeClock(datetime(year, 1, 1, tzinfo=timezone.utc))
        with SQLiteStorage(tmp_path / "s.db") as storage:
            destination = RecordingDestination()
            scheduler = build(clock, Members(["u1"]), destination=destination, storage=storage)

            (run,) = scheduler.run_due()
            clock.set(datetime(2030, 1, 1, tzinfo=timezone.utc))  # the clock is corrected
            later = scheduler.run_due()

            assert cs.RunStatus.SUCCEEDED == run.status
            assert {"u1"} == destination.audience("s1")
            assert 1 == len(later)


class TestUpcomingAtTheEndOfTime:
    """upcoming() in the last hour of year 9999 lists what is left."""

    def test_upcoming_lists_what_is_left(self) -> None:
        """upcoming() in the last hour of year 9999 lists runs instead of raising ValueError."""
        clock = FakeClock(datetime(9999, 12, 31, 23, 0, tzinfo=timezone.utc))
        scheduler = build(clock, Members(["u1"]), destination=RecordingDestination())
        scheduler.run_due()

        upcoming = scheduler.upcoming(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc))

        assert all(u.sync_id == "s1" for u in upcoming)


class _IndiaClock:
    """A host clock that answers in UTC+05:30 (aware, but not UTC)."""

    def __init__(self, inner: FakeClock) -> None:
        self.inner = inner

    def now(self) -> datetime:
        return self.inner.now().astimezone(timezone(timedelta(hours=5, minutes=30)))

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


class _ContextRecorder(cs.Destination):
    capabilities = cs.Capabilities(name="contexts")

    def __init__(self) -> None:
        self.computed: list[datetime] = []

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.computed.append(batch.context.computed_at)
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self.add(batch)


class TestHostClocksInOtherZones:
    """
    Every instant the engine hands out is UTC, whatever zone the host's clock
    answers in (found by an outside test: events and batch contexts kept the
    clock's zone while run records were converted).
    """

    def test_events_and_batch_contexts_are_utc(self) -> None:
        inner = FakeClock(datetime(2030, 1, 7, 10, 50, tzinfo=timezone.utc))
        scheduler = cs.Scheduler(MemoryStorage(), clock=_IndiaClock(inner))
        events: list[object] = []
        scheduler.add_listener(events.append)
        destination = _ContextRecorder()
        scheduler.add_destination("d", destination)
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1", "u2"]))
        scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
        (run,) = scheduler.run_due()
        assert run.status is cs.RunStatus.SUCCEEDED
        instants = [run.started_at, run.finished_at]
        instants += [e.at for e in events if isinstance(getattr(e, "at", None), datetime)]  # type: ignore[attr-defined]
        instants += destination.computed
        assert destination.computed
        assert len(instants) > 3
        for instant in instants:
            assert instant.tzinfo is timezone.utc, instant
            assert instant == inner.now()


class TestTheBeginningOfTime:
    """
    A clock in the first hours of year 1 (a zeroed RTC, a bad NTP answer)
    never takes a sync off the schedule. Found by an outside test: the run
    noted "no_next_slot: the clock is at the end of time" and the sync never
    ran again, not even after the clock was corrected.
    """

    @pytest.mark.parametrize(
        "policy",
        [
            cs.SyncPolicy.hourly(),
            cs.SyncPolicy.daily(),
            cs.SyncPolicy.daily("America/New_York"),
            cs.SyncPolicy.daily("Asia/Tokyo"),
        ],
        ids=["hourly", "daily", "daily-new-york", "daily-tokyo"],
    )
    @pytest.mark.parametrize("minutes", [0, 3, 59, 600, 1439])
    def test_a_sync_created_at_year_one_keeps_its_schedule(
        self, policy: cs.SyncPolicy, minutes: int
    ) -> None:
        start = datetime(1, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=minutes)
        clock = FakeClock(start)
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        scheduler.add_destination("d", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u"]))
        scheduler.create_sync("c", "d", policy, sync_id="s")
        (run,) = scheduler.run_due()
        assert run.status is cs.RunStatus.SUCCEEDED
        assert not any(note.startswith("no_next_slot") for note in run.notes), run.notes
        nxt = scheduler.next_run("s")
        assert nxt is not None
        assert nxt > start
        clock.set(datetime(2030, 1, 7, tzinfo=timezone.utc))
        assert len(scheduler.run_due()) == 1  # corrected: one catch-up run
        assert scheduler.next_run("s") is not None


class TestInstantsOutsideTheUtcRange:
    """
    A valid local datetime whose UTC instant a datetime cannot hold is a
    ConfigurationError naming the argument (found by an outside test: a bare
    OverflowError 'date value out of range').
    """

    @pytest.mark.parametrize(
        "value",
        [
            datetime.min.replace(tzinfo=timezone(timedelta(hours=5, minutes=30))),
            datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
            datetime.max.replace(tzinfo=ZoneInfo("America/New_York")),
            datetime.min.replace(tzinfo=ZoneInfo("Asia/Tokyo")),
        ],
    )
    def test_clock_and_upcoming_refuse_it_by_name(self, value: datetime) -> None:
        with pytest.raises(cs.exceptions.ConfigurationError, match="start"):
            FakeClock(value)
        clock = FakeClock(datetime(2030, 1, 1, tzinfo=timezone.utc))
        with pytest.raises(cs.exceptions.ConfigurationError, match="when"):
            clock.set(value)
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        with pytest.raises(cs.exceptions.ConfigurationError, match="until"):
            scheduler.upcoming(value)
