"""
The Scheduler: when syncs run, the sync life cycle, leases and missed runs.
"""

from __future__ import annotations

import itertools
import logging
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cohortsync as cs
from cohortsync import exceptions
from cohortsync._schedule import spread_ratio
from cohortsync.storage import Completion, Lease, SQLiteStorage
from cohortsync.testing import FakeClock, MemoryStorage, RecordingDestination

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

NEW_YORK = ZoneInfo("America/New_York")


class Members:
    """
    A mutable membership source the tests change between runs.
    """

    def __init__(self, keys: set[str] | None = None) -> None:
        self.keys = set(keys or {"u1", "u2", "u3"})
        self.reads = 0

    def members(self) -> list[str]:
        self.reads += 1
        return sorted(self.keys)


@attrs.define
class Env:
    scheduler: cs.Scheduler
    clock: FakeClock
    storage: MemoryStorage
    destination: RecordingDestination
    source: Members

    def create(self, policy: cs.SyncPolicy, sync_id: str = "s1") -> cs.Sync:
        return self.scheduler.create_sync("c1", "dest", policy, sync_id=sync_id)

    def runs(self, sync_id: str = "s1") -> list[cs.SyncRun]:
        return list(reversed(self.scheduler.history(sync_id)))


def make_env(clock: FakeClock, destination: RecordingDestination | None = None) -> Env:
    storage = MemoryStorage()
    scheduler = cs.Scheduler(storage, clock=clock, seed=0)
    source = Members()
    dest = destination or RecordingDestination()
    scheduler.add_destination("dest", dest)
    scheduler.add_cohort(cs.Cohort(id="c1", name="Cohort one", source=source))
    return Env(scheduler, clock, storage, dest, source)


@pytest.fixture
def env(clock: FakeClock) -> Env:
    return make_env(clock)


def on_grid(when: datetime, period: timedelta, offset: int) -> bool:
    seconds = int((when - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds())
    return (seconds - offset) % int(period.total_seconds()) == 0


class TestFirstRun:
    def test_hourly_first_run_is_due_immediately(self, env: Env) -> None:
        """An hourly sync's first run is due the moment it is created."""
        env.create(cs.SyncPolicy.hourly())

        assert env.clock.now() == env.scheduler.next_run("s1")
        runs = env.scheduler.run_due()
        assert [cs.Trigger.SCHEDULED] == [r.trigger for r in runs]
        assert {"u1", "u2", "u3"} == env.destination.members

    def test_second_run_lands_on_the_slot_within_one_period(self, env: Env) -> None:
        """After the immediate first run the sync moves onto its slot, less than a period later."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.run_due()
        record = env.storage.get_sync("s1")

        second = env.scheduler.next_run("s1")
        assert second is not None
        assert env.clock.now() < second <= env.clock.now() + HOUR
        assert on_grid(second, HOUR, record.offset)

    def test_daily_runs_stay_at_the_same_time_of_day(self, env: Env) -> None:
        """Daily runs after the first keep one offset, exactly a day apart."""
        env.create(cs.SyncPolicy.daily())
        env.scheduler.run_due()
        starts = []
        for _ in range(5):
            due = env.scheduler.next_run("s1")
            assert due is not None
            env.clock.set(due)
            starts.append(env.scheduler.run_due()[0].started_at)

        assert [DAY] * 4 == [b - a for a, b in itertools.pairwise(starts)]

    def test_one_time_runs_once_then_completes(self, env: Env) -> None:
        """A one-time sync runs once, as soon as possible, then is completed."""
        env.create(cs.SyncPolicy.one_time())

        runs = env.scheduler.run_due()
        env.clock.advance(DAY * 3)

        assert [cs.Trigger.ONE_TIME] == [r.trigger for r in runs]
        assert [] == env.scheduler.run_due()
        assert cs.SyncStatus.COMPLETED == env.scheduler.get_sync("s1").status
        assert env.scheduler.next_run("s1") is None

    def test_realtime_runs_every_minute_boundary(self, env: Env) -> None:
        """A real-time sync runs now, then at every minute boundary."""
        env.clock.set(env.clock.now() + timedelta(seconds=17))
        env.create(cs.SyncPolicy.realtime())
        env.scheduler.run_due()
        slots = []
        for _ in range(3):
            due = env.scheduler.next_run("s1")
            assert due is not None
            slots.append(due)
            env.clock.set(due)
            env.scheduler.run_due()

        assert [0, 0, 0] == [s.second for s in slots]
        assert [timedelta(minutes=1)] * 2 == [b - a for a, b in itertools.pairwise(slots)]


class TestSlotOffsets:
    def test_offset_is_stable_until_the_sync_is_updated(self, env: Env) -> None:
        """The slot offset survives runs and a new Scheduler, and changes on update."""
        env.create(cs.SyncPolicy.hourly())
        before = env.storage.get_sync("s1").offset
        env.scheduler.run_due()
        other = cs.Scheduler(env.storage, clock=env.clock)

        assert before == env.storage.get_sync("s1").offset
        other.add_cohort(env.scheduler.cohort("c1"))
        other.add_destination("dest", env.destination)
        updated = other.update_sync("s1", cs.SyncPolicy.daily())
        assert 2 == updated.generation
        assert env.clock.now() == other.next_run("s1")

    def test_hash_offsets_are_the_same_in_any_scheduler(self, clock: FakeClock) -> None:
        """With hash allocation, the same sync id gets the same offset everywhere."""
        offsets = []
        for _ in range(2):
            e = make_env(clock)
            e.scheduler.slot_allocation = "hash"
            e.create(cs.SyncPolicy.daily(), sync_id="stable")
            offsets.append(e.storage.get_sync("stable").offset)

        assert offsets[0] == offsets[1]

    @pytest.mark.parametrize("allocation", ["hashed", "", None])
    def test_unknown_allocation_refused(self, clock: FakeClock, allocation: object) -> None:
        """slot_allocation is 'balanced' or 'hash'; anything else is a ConfigurationError."""
        with pytest.raises(exceptions.ConfigurationError) as info:
            cs.Scheduler(MemoryStorage(), clock=clock, slot_allocation=allocation)  # type: ignore[arg-type]

        assert ("slot_allocation", allocation) == (info.value.field, info.value.value)

    @pytest.mark.parametrize("allocation", ["balanced", "hash"])
    def test_known_allocations(
        self, clock: FakeClock, allocation: Literal["balanced", "hash"]
    ) -> None:
        """Both documented allocations are accepted."""
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock, slot_allocation=allocation)

        assert allocation == scheduler.slot_allocation

    def test_balanced_allocation_is_flat(self, env: Env) -> None:
        """Balanced allocation puts as many syncs in each minute as in any other."""
        for i in range(1_440 * 3):
            env.create(cs.SyncPolicy.daily(), sync_id=f"d{i}")
        offsets = [r.offset for r in env.storage.list_syncs()]

        assert 1.0 == spread_ratio(offsets, 86_400)

    def test_deleting_frees_the_slot(self, env: Env) -> None:
        """A deleted sync's minute is the first one handed out again."""
        for i in range(60):
            env.create(cs.SyncPolicy.hourly(), sync_id=f"h{i}")
        freed = env.storage.get_sync("h7").offset // 60
        env.scheduler.delete_sync("h7")
        env.create(cs.SyncPolicy.hourly(), sync_id="new")

        assert freed == env.storage.get_sync("new").offset // 60


class TestMissedAndLateRuns:
    def test_three_days_down_gives_one_catch_up_then_the_grid(self, env: Env) -> None:
        """After all workers were down three days, one catch-up run, then back on the slot grid."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.run_due()
        offset = env.storage.get_sync("s1").offset
        env.clock.advance(DAY * 3)

        runs = env.scheduler.run_due()
        due = env.scheduler.next_run("s1")

        assert [cs.Trigger.CATCH_UP] == [r.trigger for r in runs]
        assert due is not None
        assert on_grid(due, HOUR, offset)
        assert env.clock.now() < due <= env.clock.now() + HOUR

    def test_a_few_seconds_late_still_runs_the_slot(self, env: Env) -> None:
        """A run started seconds after its slot runs that slot, not the next one."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.run_due()
        slot = env.scheduler.next_run("s1")
        assert slot is not None
        env.clock.set(slot + timedelta(seconds=7))

        runs = env.scheduler.run_due()

        assert [(cs.Trigger.SCHEDULED, slot)] == [(r.trigger, r.slot) for r in runs]

    def test_an_overrun_coalesces_the_slots_it_overlapped(self, clock: FakeClock) -> None:
        """A run longer than its period delays the next one: the last slot it overlapped
        runs at once, the others are counted as coalesced, none vanishes."""
        slow = {"on": True}

        class Slow(RecordingDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                if slow["on"]:
                    clock.advance(HOUR * 2.5)
                return super().add(batch)

        e = make_env(clock, Slow())
        e.create(cs.SyncPolicy.hourly())
        first = e.scheduler.run_due()[0]
        due = e.scheduler.next_run("s1")
        slow["on"] = False
        second = e.scheduler.run_due()[0]
        after = e.scheduler.next_run("s1")

        assert due is not None
        assert after is not None
        assert first.started_at < due <= first.finished_at
        assert "overran" in first.notes[-1]
        # Three grid slots passed during the run: the last runs next, two are counted.
        assert 2 == first.coalesced
        assert (due, 0) == (second.slot, second.coalesced)
        assert second.finished_at < after <= second.finished_at + HOUR

    def test_clock_moving_backwards_runs_nothing_twice(self, env: Env) -> None:
        """A clock stepping back does not re-run slots already recorded."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.run_due()
        env.clock.advance(HOUR * 2)
        env.scheduler.run_due()
        env.clock.set(env.clock.now() - HOUR * 3, backwards=True)

        assert [] == env.scheduler.run_due()
        assert 2 == len(env.runs())


class TestLeases:
    def test_a_crashed_workers_lease_expires_and_the_slot_runs_once(self, env: Env) -> None:
        """A lease abandoned by a crashed worker makes the sync due again after expiry."""
        env.create(cs.SyncPolicy.hourly())
        (lease,) = env.storage.claim_due(env.clock.now(), "crashed", timedelta(minutes=5), 1)

        assert [] == env.scheduler.run_due()
        env.clock.advance(timedelta(minutes=5))
        assert [] == env.scheduler.run_due()  # at expiry: still held
        env.clock.advance(timedelta(seconds=1))
        runs = env.scheduler.run_due()

        assert [lease.slot] == [r.slot for r in runs]
        with pytest.raises(exceptions.LeaseLostError):
            env.storage.complete_run(
                lease,
                Completion(run=attrs.evolve(runs[0], id="late"), next_due=None),
            )
        assert 1 == len(env.runs())

    def test_a_run_never_happens_twice_for_one_slot(self, env: Env) -> None:
        """Two schedulers on one store run each due slot exactly once."""
        other = cs.Scheduler(env.storage, clock=env.clock, owner="other")
        other.add_cohort(env.scheduler.cohort("c1"))
        other.add_destination("dest", env.destination)
        for i in range(20):
            env.create(cs.SyncPolicy.hourly(), sync_id=f"s{i}")
        ran = []
        for _ in range(24):
            ran += env.scheduler.run_due(limit=7) + other.run_due(limit=7)
            ran += env.scheduler.run_due() + other.run_due()
            env.clock.advance(HOUR)

        slots = [(r.sync_id, r.slot) for r in ran]
        assert len(slots) == len(set(slots))
        assert 20 * 24 <= len(slots) <= 20 * 25


class TestLifeCycle:
    def test_pause_stops_and_resume_runs_now(self, env: Env) -> None:
        """A paused sync is not run; resuming runs it immediately."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.run_due()
        env.scheduler.pause_sync("s1", "holiday")
        env.clock.advance(DAY)

        assert [] == env.scheduler.run_due()
        assert env.scheduler.next_run("s1") is None
        env.scheduler.resume_sync("s1")
        assert [cs.Trigger.MANUAL] == [r.trigger for r in env.scheduler.run_due()]

    def test_sync_now_runs_immediately_and_keeps_the_slot(self, env: Env) -> None:
        """ "Sync now" runs at once and then returns to the slot grid."""
        env.create(cs.SyncPolicy.daily())
        env.scheduler.run_due()
        slot = env.scheduler.next_run("s1")
        assert slot is not None
        env.clock.set(slot - timedelta(seconds=30))
        env.scheduler.sync_now("s1")

        assert [cs.Trigger.MANUAL] == [r.trigger for r in env.scheduler.run_due()]
        assert slot == env.scheduler.next_run("s1")

    def test_update_bumps_generation_and_runs_now(self, env: Env) -> None:
        """Updating a sync gives it a new generation and a run due now."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.run_due()
        env.clock.advance(timedelta(minutes=3))
        env.scheduler.update_sync("s1", cs.SyncPolicy.daily())

        runs = env.scheduler.run_due()
        assert [2] == [r.generation for r in runs]
        assert [cs.Cadence.DAILY] == [r.cadence for r in runs]

    def test_update_to_an_ineligible_policy_changes_nothing(self, clock: FakeClock) -> None:
        """An update refused by eligibility leaves the sync as it was."""
        e = make_env(clock, RecordingDestination("facebook_ads"))
        e.scheduler.add_mapping(
            "hashed", cs.IdentifierMapping([(cs.IdentifierKind.EMAIL_SHA256, lambda k: k)])
        )
        e.scheduler.create_sync(
            "c1", "dest", cs.SyncPolicy.hourly(), sync_id="s1", mapping_id="hashed"
        )

        with pytest.raises(exceptions.IneligibleSyncError) as info:
            e.scheduler.update_sync("s1", cs.SyncPolicy.realtime())
        assert {"realtime_destination"} == {r.code for r in info.value.reasons}
        assert 1 == e.scheduler.get_sync("s1").generation

    def test_delete_leaves_the_destination_by_default(self, env: Env) -> None:
        """Deleting a sync stops it and leaves the destination as it is."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.run_due()
        env.scheduler.delete_sync("s1")
        env.clock.advance(DAY)

        assert [] == env.scheduler.run_due()
        assert cs.SyncStatus.DELETED == env.scheduler.get_sync("s1").status
        assert {"u1", "u2", "u3"} == env.destination.members

    def test_deleted_syncs_cannot_be_resumed(self, env: Env) -> None:
        """A deleted sync stays deleted."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.delete_sync("s1")

        with pytest.raises(exceptions.ConfigurationError):
            env.scheduler.resume_sync("s1")


class TestOneTimeRetries:
    def test_a_failing_one_time_sync_is_retried_then_failed(self, clock: FakeClock) -> None:
        """A one-time sync that keeps failing is retried with backoff, then marked failed."""
        e = make_env(clock)

        def broken() -> list[str]:
            raise OSError("warehouse down")

        e.scheduler.add_cohort(cs.Cohort(id="c1", name="Cohort one", source=broken), replace=True)
        e.create(cs.SyncPolicy.one_time(one_time_attempts=3))
        dues = []
        for _ in range(5):
            e.scheduler.run_due()
            due = e.scheduler.next_run("s1")
            if due is None:
                break
            dues.append(due - clock.now())
            clock.set(due)

        statuses = [r.status for r in e.runs()]
        assert [cs.RunStatus.FAILED] * 3 == statuses
        assert cs.SyncStatus.FAILED == e.scheduler.get_sync("s1").status
        assert dues[0] < dues[1]


class TestQueries:
    def test_upcoming_lists_every_run_until(self, env: Env) -> None:
        """upcoming() lists the first immediate run and each hourly slot after."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.run_due()

        upcoming = env.scheduler.upcoming(env.clock.now() + timedelta(hours=5))

        assert 5 == len(upcoming)
        assert [HOUR] * 4 == [b.at - a.at for a, b in itertools.pairwise(upcoming)]

    def test_preview_counts_without_sending(self, env: Env) -> None:
        """preview() reports adds and removes and sends nothing."""
        env.create(cs.SyncPolicy.hourly())
        env.scheduler.run_due()
        env.source.keys = {"u2", "u3", "u4", "u5"}
        sent = len(env.destination.batches)

        preview = env.scheduler.preview("s1")

        assert (2, 1, 4, 3) == (preview.adds, preview.removes, preview.size, preview.delivered)
        assert ("u4", "u5") == preview.sample_adds
        assert sent == len(env.destination.batches)

    def test_unknown_ids_raise_not_found(self, env: Env) -> None:
        """Unknown sync, cohort and destination ids raise typed not-found errors."""
        with pytest.raises(exceptions.SyncNotFoundError):
            env.scheduler.next_run("nope")
        with pytest.raises(exceptions.CohortNotFoundError):
            env.scheduler.create_sync("nope", "dest", cs.SyncPolicy.hourly())
        with pytest.raises(exceptions.DestinationNotFoundError):
            env.scheduler.create_sync("c1", "nope", cs.SyncPolicy.hourly())

    def test_naive_datetimes_are_rejected(self, env: Env) -> None:
        """A naive datetime anywhere in the API is a TypeError."""
        with pytest.raises(TypeError):
            env.scheduler.upcoming(datetime(2030, 1, 1))  # noqa: DTZ001 - the point of the test
        with pytest.raises(TypeError):
            FakeClock(datetime(2030, 1, 1))  # noqa: DTZ001

    def test_a_naive_clock_is_rejected(self, env: Env) -> None:
        """A host clock returning naive datetimes is refused, not trusted."""

        class NaiveClock:
            def now(self) -> datetime:
                return datetime(2030, 1, 1)  # noqa: DTZ001 - the point of the test

            def sleep(self, seconds: float) -> None:
                pass

        scheduler = cs.Scheduler(MemoryStorage(), clock=NaiveClock())
        with pytest.raises(TypeError):
            scheduler.run_due()


class TestRecommend:
    def test_quiet_realtime_sync_is_advised_hourly(self, env: Env) -> None:
        """A real-time sync whose runs mostly update nobody is advised to go hourly."""
        env.create(cs.SyncPolicy.realtime())
        for _ in range(40):
            env.scheduler.run_due()
            env.clock.advance(timedelta(minutes=1))

        advice = env.scheduler.recommend("s1")

        assert advice is not None
        assert (cs.Cadence.HOURLY, 40, 39) == (
            advice.suggested_cadence,
            advice.runs_considered,
            advice.zero_update_runs,
        )

    def test_busy_realtime_sync_gets_no_advice(self, env: Env) -> None:
        """A real-time sync that changes most minutes is left alone."""
        env.create(cs.SyncPolicy.realtime())
        for i in range(40):
            env.source.keys.add(f"n{i}")
            env.scheduler.run_due()
            env.clock.advance(timedelta(minutes=1))

        assert env.scheduler.recommend("s1") is None


class TestLongWaits:
    def test_a_long_rate_limit_wait_keeps_the_lease(self) -> None:
        """During a 15-minute Retry-After wait no other worker can take the run over."""
        storage = MemoryStorage()
        grabbed: list[list[Lease]] = []

        class WatchedClock(FakeClock):
            def sleep(self, seconds: float) -> None:
                super().sleep(seconds)
                # Another worker looks for due work at the end of the wait,
                # before this worker wakes up.
                grabbed.append(storage.claim_due(self.now(), "other", timedelta(minutes=5), 10))

        class Throttled(RecordingDestination):
            calls = 0

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                self.calls += 1
                if self.calls == 1:
                    raise exceptions.RateLimitedError("slow down", retry_after=900)
                return super().add(batch)

        clock = WatchedClock(datetime(2030, 1, 1, tzinfo=timezone.utc))
        scheduler = cs.Scheduler(storage, clock=clock, seed=0)
        scheduler.add_destination("dest", Throttled())
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=Members()))
        scheduler.create_sync("c1", "dest", cs.SyncPolicy.hourly(), sync_id="s1")

        runs = scheduler.run_due()

        assert [[]] == grabbed
        assert [cs.RunStatus.SUCCEEDED] == [r.status for r in runs]


class _Feed:
    """A source with a change feed: a log of changes, the cursor an index into it."""

    def __init__(self, keys: set[str]) -> None:
        self.keys = set(keys)
        self.log: list[tuple[set[str], set[str]]] = []

    def members(self) -> list[str]:
        return sorted(self.keys)

    def cursor(self) -> str:
        return str(len(self.log))

    def changes_since(self, cursor: str) -> cs.Changes:
        added: set[str] = set()
        removed: set[str] = set()
        for entered, left in self.log[int(cursor) :]:
            added = (added - left) | (entered - removed)
            removed = (removed - entered) | (left - added)
        return cs.Changes(tuple(sorted(added)), tuple(sorted(removed)), self.cursor())

    def change(self, add: set[str], remove: set[str]) -> None:
        self.keys = (self.keys | add) - remove
        self.log.append((add, remove))


class _Flaky(RecordingDestination):
    """Raises a host bug on adds while ``broken``: the outcome of the request is unknown."""

    broken = False

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        if self.broken:
            msg = "connection reset after sending"
            raise OSError(msg)
        return super().add(batch)


def _sent(env: Env, run: cs.SyncRun) -> dict[cs.Operation, set[str]]:
    out: dict[cs.Operation, set[str]] = {op: set() for op in cs.Operation}
    for b in env.destination.batches:
        if b.run_id == run.id:
            out[b.operation].update(b.keys)
    return out


NO_GUARD = cs.MassRemovalGuard(enabled=False)
AUDIENCES = st.lists(
    st.frozensets(st.sampled_from([f"u{i}" for i in range(12)])), min_size=1, max_size=4
)


class TestPreviewIsWhatARunDoes:
    """preview() asks the same planner as a run: what it shows is what the next run sends."""

    @settings(max_examples=40, deadline=None)
    @given(
        audiences=AUDIENCES,
        full_sync_only=st.booleans(),
        resync_at=st.none() | st.integers(0, 3),
    )
    def test_counts_match_the_next_run(
        self, audiences: list[frozenset[str]], full_sync_only: bool, resync_at: int | None
    ) -> None:
        """Adds, removes and full re-sends previewed are exactly what the next run sends."""
        clock = FakeClock(datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc))
        caps = cs.Capabilities(full_sync_only=full_sync_only, max_batch_size=5)
        env = make_env(clock, RecordingDestination(caps))
        env.create(cs.SyncPolicy.hourly(guard=NO_GUARD))
        env.scheduler.run_due()
        for step, audience in enumerate(audiences):
            env.source.keys = set(audience)
            if step == resync_at:
                env.scheduler.request_full_resync("s1")
            clock.advance(HOUR)

            preview = env.scheduler.preview("s1")
            (run,) = env.scheduler.run_due()

            sent = _sent(env, run)
            assert preview.adds + (0 if full_sync_only else preview.resent) == len(
                sent[cs.Operation.ADD]
            )
            if full_sync_only:
                assert preview.resent == len(sent[cs.Operation.EXISTING])
            assert preview.removes == len(sent[cs.Operation.REMOVE])
            assert run.full_sync == preview.full_sync
            assert set(preview.sample_adds) <= sent[cs.Operation.ADD]
            assert set(preview.sample_removes) <= sent[cs.Operation.REMOVE]

    def test_a_change_feed_is_previewed_from_the_feed(self, clock: FakeClock) -> None:
        """A real-time sync with a change feed previews the changes since its cursor."""
        feed = _Feed({"u1", "u2", "u3"})
        env = make_env(clock)
        env.scheduler.add_cohort(cs.Cohort(id="c1", name="Cohort one", source=feed), replace=True)
        env.create(cs.SyncPolicy.realtime(guard=NO_GUARD))
        env.scheduler.run_due()
        feed.change({"u4", "u5"}, {"u1"})
        clock.advance(timedelta(minutes=1))

        preview = env.scheduler.preview("s1")
        (run,) = env.scheduler.run_due()

        assert (True, None) == (preview.from_feed, preview.size)
        assert (2, 1) == (preview.adds, preview.removes)
        assert (2, 1) == (run.added, run.removed)

    def test_batches_left_in_flight_are_previewed(self, clock: FakeClock) -> None:
        """Members a failed run left in flight are in the preview, as the next run re-sends them."""
        flaky = _Flaky()
        env = make_env(clock, flaky)
        env.create(cs.SyncPolicy.hourly(guard=NO_GUARD))
        env.scheduler.run_due()
        env.source.keys = {"u1", "u2", "u3", "u4"}
        flaky.broken = True
        clock.advance(HOUR)
        (failed,) = env.scheduler.run_due()
        assert cs.RunStatus.FAILED is failed.status
        assert env.storage.pending_batches("s1")
        flaky.broken = False
        env.source.keys = {"u1", "u2", "u3"}  # u4 left again before the retry

        preview = env.scheduler.preview("s1")
        clock.advance(HOUR)
        (run,) = env.scheduler.run_due()

        assert any(n.startswith("recovered_in_flight") for n in preview.notes)
        assert (0, 1) == (preview.adds, preview.removes)
        assert (0, 1) == (run.added, run.removed)
        assert {"u1", "u2", "u3"} == env.destination.members

    def test_an_ineligible_sync_previews_the_pause(self, clock: FakeClock) -> None:
        """A real-time sync whose cohort type cannot be real-time previews the skipped run."""
        env = make_env(clock)
        env.create(cs.SyncPolicy.realtime(on_ineligible=cs.OnIneligible.PAUSE))
        env.scheduler.add_cohort(
            cs.Cohort(id="c1", name="Cohort one", type=cs.CohortType.FUNNEL, source=env.source),
            replace=True,
        )

        preview = env.scheduler.preview("s1")

        assert (False, False) == (preview.proceed, preview.eligibility.eligible)
        assert "realtime_cohort_type" in preview.notes
        assert cs.SyncStatus.ACTIVE is env.scheduler.get_sync("s1").status


class TestStorageDefault:
    """Without a store the scheduler keeps state in memory, creates no file, and says so."""

    def test_no_storage_creates_no_file_in_the_working_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
    ) -> None:
        """Scheduler() with a sync run leaves the working directory empty."""
        monkeypatch.chdir(tmp_path)

        scheduler = cs.Scheduler(clock=clock)
        scheduler.add_destination("dest", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=Members()))
        scheduler.create_sync("c1", "dest", cs.SyncPolicy.hourly(), sync_id="s1")
        scheduler.run_due()
        scheduler.close()

        assert [] == list(tmp_path.iterdir())
        assert isinstance(scheduler.storage, MemoryStorage)

    def test_no_storage_logs_a_warning(self, caplog: pytest.LogCaptureFixture) -> None:
        """Memory by omission is a production mistake: a WARNING names the fix."""
        with caplog.at_level(logging.WARNING, logger="cohortsync"):
            cs.Scheduler()

        [record] = caplog.records
        assert logging.WARNING == record.levelno
        assert "SQLiteStorage(path)" in record.getMessage()

    def test_memory_on_purpose_is_silent(self, caplog: pytest.LogCaptureFixture) -> None:
        """Passing MemoryStorage() says memory is intended: nothing is logged."""
        with caplog.at_level(logging.DEBUG, logger="cohortsync"):
            cs.Scheduler(MemoryStorage())

        assert [] == caplog.records

    def test_a_path_still_means_an_sqlite_file_there(self, tmp_path: Path) -> None:
        """Scheduler(path) opens SQLiteStorage at that path, and nowhere else."""
        with cs.Scheduler(tmp_path / "here.db") as scheduler:
            assert isinstance(scheduler.storage, SQLiteStorage)

        assert (tmp_path / "here.db").exists()


class TestTriggersOnUnevenDays:
    """
    A daily sync in a time zone is a catch-up when it starts after the slot
    that follows its own, whatever the day's length at a DST change; and
    upcoming() names each run as it will be recorded (outsider findings).
    """

    def _late_run(self, created: datetime, runs_at: datetime) -> tuple[cs.Trigger, cs.SyncRun]:
        clock = FakeClock(created.astimezone(timezone.utc))
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        scheduler.add_destination("d", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1"]))
        policy = cs.SyncPolicy.daily("America/New_York", at=time(9, 15))
        scheduler.create_sync("c", "d", policy, sync_id="x")
        scheduler.run_due()
        clock.set(runs_at.astimezone(timezone.utc))
        (listed,) = [u.trigger for u in scheduler.upcoming(clock.now()) if u.sync_id == "x"][:1]
        (run,) = scheduler.run_due()
        return listed, run

    def test_after_the_next_slot_of_a_23_hour_day_is_a_catch_up(self) -> None:
        """Spring: 35 minutes after the following slot, 23 h 35 min after its own."""
        listed, run = self._late_run(
            datetime(2030, 3, 8, 12, tzinfo=NEW_YORK), datetime(2030, 3, 10, 9, 50, tzinfo=NEW_YORK)
        )
        assert (cs.Trigger.CATCH_UP, cs.Trigger.CATCH_UP, 1) == (listed, run.trigger, run.coalesced)

    def test_before_the_next_slot_of_a_25_hour_day_is_scheduled(self) -> None:
        """Autumn: 25 minutes before the following slot, 24 h 35 min after its own."""
        listed, run = self._late_run(
            datetime(2030, 11, 1, 12, tzinfo=NEW_YORK),
            datetime(2030, 11, 3, 8, 50, tzinfo=NEW_YORK),
        )
        assert (cs.Trigger.SCHEDULED, cs.Trigger.SCHEDULED, 0) == (
            listed,
            run.trigger,
            run.coalesced,
        )

    def test_upcoming_names_real_time_runs_realtime(self) -> None:
        """Every listed slot of a real-time sync is a realtime run, as its runs record."""
        clock = FakeClock(datetime(2030, 1, 7, 10, 0, 30, tzinfo=timezone.utc))
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        scheduler.add_destination("d", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", size=10, source=lambda: ["u1"]))
        scheduler.create_sync("c", "d", cs.SyncPolicy.realtime(), sync_id="rt")
        scheduler.run_due()
        listed = scheduler.upcoming(clock.now() + timedelta(minutes=3))
        assert 3 == len(listed)
        assert {cs.Trigger.REALTIME} == {u.trigger for u in listed}
        clock.advance(timedelta(minutes=1))
        (run,) = scheduler.run_due()
        assert (listed[0].at, cs.Trigger.REALTIME) == (run.slot, run.trigger)
