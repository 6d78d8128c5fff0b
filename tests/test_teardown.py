"""
Deleting a sync leaves nothing behind: a delete during a run, teardown after
a crash, removals that may not have arrived, and destinations that cannot
remove. The CSV directory destination after a crash is pinned in
``test_csvdir.py`` and, with real SIGKILLs, in ``reliability/test_csv_crash.py``;
the SIGKILL variants of the scenarios below in ``reliability/test_delete_crash.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import cohortsync as cs
from cohortsync.destinations import catalog
from cohortsync.exceptions import IneligibleSyncError
from cohortsync.storage import MemoryStorage, SQLiteStorage, Storage
from cohortsync.testing import FakeClock, RecordingDestination

START = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)
MEMBERS = [f"u{i:02d}" for i in range(30)]
TEARDOWN = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)


class Crash(BaseException):
    """The worker process dies here: nothing in the engine catches it."""


class Remote(RecordingDestination):
    """
    A destination that outlives every worker, with a hook called before each
    add is acknowledged (after the vendor received it).
    """

    def __init__(self, capabilities: cs.Capabilities | None = None) -> None:
        super().__init__(capabilities or cs.Capabilities(max_batch_size=10))
        self.on_add: Callable[[cs.Batch], None] = lambda batch: None

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        result = super().add(batch)
        self.on_add(batch)
        return result


def worker(storage: Storage, clock: FakeClock, remote: Remote) -> cs.Scheduler:
    scheduler = cs.Scheduler(storage, clock=clock, seed=1)
    scheduler.add_destination("dest", remote)
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: MEMBERS))
    return scheduler


@pytest.fixture(params=["memory", "sqlite"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Storage]]:
    """A factory of handles on one store: each worker opens its own."""
    if request.param == "memory":
        shared = MemoryStorage()
        yield lambda: shared
        shared.close()
        return
    opened: list[Storage] = []

    def open_store() -> Storage:
        opened.append(SQLiteStorage(tmp_path / "cohortsync.db"))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


def drain(scheduler: cs.Scheduler, clock: FakeClock, sync_id: str = "s1") -> list[cs.SyncRun]:
    """Run whatever the sync has due until nothing is scheduled."""
    runs: list[cs.SyncRun] = []
    for _ in range(10):
        due = scheduler.next_run(sync_id)
        if due is None:
            return runs
        clock.set(max(due, clock.now()))
        runs += scheduler.run_due()
    raise AssertionError(f"still scheduled after {runs}")


class TestDeleteDuringARun:
    """18.1: deleting a sync never races the run holding its lease."""

    @pytest.mark.parametrize("during_batch", [1, 2, 3])
    def test_remove_delivered_during_the_first_run_removes_everything(
        self, stores: Callable[[], Storage], during_batch: int
    ) -> None:
        """
        A second Scheduler deletes the sync while the first run sends batch
        *during_batch* (of three): the run finishes, a teardown follows, and
        nothing is left at the destination. (Batch 1 used to leave all 30.)
        """
        clock = FakeClock(START)
        remote = Remote()
        first = worker(stores(), clock, remote)
        first.create_sync("c", "dest", TEARDOWN, sync_id="s1")
        admin = worker(stores(), clock, remote)

        def delete_once(batch: cs.Batch) -> None:
            if batch.sequence == during_batch and admin.get_sync("s1").status is (
                cs.SyncStatus.ACTIVE
            ):
                admin.delete_sync("s1")

        remote.on_add = delete_once
        (run,) = first.run_due()
        runs = [run, *drain(first, clock)]

        assert set() == remote.audience("s1")
        assert cs.SyncStatus.DELETED == first.get_sync("s1").status
        teardown = [r for r in runs if r.trigger is cs.Trigger.TEARDOWN]
        assert 1 == len(teardown)
        assert (cs.RunStatus.SUCCEEDED, 30) == (teardown[0].status, teardown[0].removed)
        slots = [r.slot for r in first.history("s1")]
        assert len(slots) == len(set(slots))

    def test_leave_during_the_first_run_keeps_what_was_delivered(
        self, stores: Callable[[], Storage]
    ) -> None:
        """With OnDelete.LEAVE the run may finish; nothing is removed, the sync is deleted."""
        clock = FakeClock(START)
        remote = Remote()
        first = worker(stores(), clock, remote)
        first.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s1")
        admin = worker(stores(), clock, remote)
        remote.on_add = lambda batch: (
            admin.delete_sync("s1") if batch.sequence == 1 else None  # type: ignore[func-returns-value]
        )

        first.run_due()

        assert cs.SyncStatus.DELETED == first.get_sync("s1").status
        assert None is first.next_run("s1")
        assert set(MEMBERS) == remote.audience("s1")
        assert [] == drain(first, clock)


class TestTeardownAfterACrash:
    """18.2: teardown removes the delivered state plus every pending add."""

    @pytest.mark.parametrize("crash_in_batch", [1, 2, 3])
    def test_members_of_the_batch_in_flight_are_removed(
        self, stores: Callable[[], Storage], crash_in_batch: int
    ) -> None:
        """
        The worker dies after the destination received batch *crash_in_batch*
        but before it was recorded; the sync is deleted; the teardown removes
        that batch's members too. (They used to stay, with teardown `succeeded`.)
        """
        clock = FakeClock(START)
        remote = Remote()
        doomed = worker(stores(), clock, remote)
        doomed.create_sync("c", "dest", TEARDOWN, sync_id="s1")

        def die(batch: cs.Batch) -> None:
            if batch.sequence == crash_in_batch:
                raise Crash

        remote.on_add = die
        with pytest.raises(Crash):
            doomed.run_due()
        remote.on_add = lambda batch: None
        received = remote.audience("s1")
        assert len(received) == 10 * crash_in_batch

        survivor = worker(stores(), clock, remote)
        survivor.delete_sync("s1")
        clock.advance(timedelta(minutes=10))  # the dead worker's lease expires
        runs = drain(survivor, clock)

        assert set() == remote.audience("s1")
        assert cs.SyncStatus.DELETED == survivor.get_sync("s1").status
        (teardown,) = [r for r in runs if r.trigger is cs.Trigger.TEARDOWN]
        assert cs.RunStatus.SUCCEEDED == teardown.status
        assert len(received) == teardown.removed


class TestTeardownThatCannotRemove:
    """18.5: a destination that cannot remove is refused, and a teardown says so."""

    def test_remove_delivered_on_qualtrics_is_ineligible(self) -> None:
        """The Qualtrics preset cannot remove: REMOVE_DELIVERED is refused with its code."""
        clock = FakeClock(START)
        remote = Remote(catalog.QUALTRICS)
        scheduler = worker(MemoryStorage(), clock, remote)

        result = scheduler.check("c", "dest", TEARDOWN)
        with pytest.raises(IneligibleSyncError) as raised:
            scheduler.create_sync("c", "dest", TEARDOWN)

        assert "removals_unsupported" in {r.code for r in result.reasons}
        assert "removals_unsupported" in {r.code for r in raised.value.reasons}
        # LEAVE is fine: the destination keeps what it has, as promised.
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly())

    def test_update_to_remove_delivered_is_refused_too(self) -> None:
        """The rule applies when the policy changes, not only at creation."""
        clock = FakeClock(START)
        scheduler = worker(MemoryStorage(), clock, Remote(catalog.QUALTRICS))
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s1")

        with pytest.raises(IneligibleSyncError):
            scheduler.update_sync("s1", policy=TEARDOWN)

        assert cs.OnDelete.LEAVE == scheduler.get_sync("s1").policy.on_delete

    def test_a_teardown_that_could_not_remove_says_so(self) -> None:
        """
        The destination lost its removals after the sync was created (the
        host re-registered it): the teardown is `failed`, notes why, and the
        sync is deleted with that reason. (It used to report `succeeded`,
        "removed what it delivered", with every member still there.)
        """
        clock = FakeClock(START)
        remote = Remote()
        scheduler = worker(MemoryStorage(), clock, remote)
        scheduler.create_sync("c", "dest", TEARDOWN, sync_id="s1")
        scheduler.run_due()
        cannot = Remote(cs.Capabilities(max_batch_size=10, supports_removals=False))
        scheduler.add_destination("dest", cannot, replace=True)

        scheduler.delete_sync("s1")
        (teardown,) = drain(scheduler, clock)

        assert cs.Trigger.TEARDOWN == teardown.trigger
        assert cs.RunStatus.FAILED == teardown.status
        assert 0 == teardown.removed
        assert ("removals_unsupported: 30 member(s) remain",) == teardown.notes
        sync = scheduler.get_sync("s1")
        assert cs.SyncStatus.DELETED == sync.status
        assert "removals_unsupported" in (sync.status_reason or "")
        assert [] == cannot.batches  # nothing was sent: it could not be
        assert set(MEMBERS) == remote.audience("s1")


class Flaky(cs.Destination):
    """A remote that can die after receiving an add, or before receiving a removal."""

    capabilities = cs.Capabilities(name="remote", max_batch_size=10)

    def __init__(self) -> None:
        self.audience: set[str] = set()
        self.adds = self.removes = 0
        self.die_after_add: int | None = None
        self.die_before_remove: int | None = None

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.adds += 1
        self.audience.update(batch.identifiers)
        if self.adds == self.die_after_add:
            raise Crash
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.removes += 1
        if self.removes == self.die_before_remove:
            raise Crash
        self.audience.difference_update(batch.identifiers)
        return cs.DeliveryResult.ok()


class TestARemovalThatMayNotHaveArrived:
    """
    A pending removal may not have reached the destination either: a member
    named in any pending record is re-sent towards what the cohort says
    (found by the SIGKILL delete scenarios; it used to be forgotten).
    """

    def test_a_teardown_killed_while_removing_an_in_flight_add(self) -> None:
        """Crash with an add in flight, delete, teardown killed before that removal: none left."""
        clock = FakeClock(START)
        storage = MemoryStorage()
        remote = Flaky()

        def scheduler() -> cs.Scheduler:
            s = cs.Scheduler(storage, clock=clock, seed=1)
            s.add_cohort(cs.Cohort(id="c", name="C", source=lambda: MEMBERS[:20]))
            s.add_destination("remote", remote)
            return s

        scheduler().create_sync("c", "remote", TEARDOWN, sync_id="s")
        remote.die_after_add = 2
        with pytest.raises(Crash):
            scheduler().run_due()
        scheduler().delete_sync("s")
        clock.advance(timedelta(minutes=6))
        remote.die_before_remove = 2
        with pytest.raises(Crash):
            scheduler().run_due()
        clock.advance(timedelta(minutes=6))
        final = scheduler()
        (teardown,) = final.run_due()

        assert set() == remote.audience
        assert cs.SyncStatus.DELETED == final.get_sync("s").status
        assert cs.RunStatus.SUCCEEDED == teardown.status
        assert 1 == len(final.history("s"))  # the first slot was never recorded...
        # ...but what it applied is accounted for, across both killed attempts.
        assert ("takeover: includes +10 -10 delivered by an interrupted attempt",) == (
            teardown.notes
        )
        assert (10, 20) == (teardown.added, teardown.removed)

    def test_a_leaver_whose_recovery_removal_was_killed_is_removed_later(self) -> None:
        """A member of a crashed add leaves; the run removing it dies; the next run removes it."""
        clock = FakeClock(START)
        storage = MemoryStorage()
        remote = Flaky()
        members = set(MEMBERS[:20])

        def scheduler() -> cs.Scheduler:
            s = cs.Scheduler(storage, clock=clock, seed=1)
            s.add_cohort(cs.Cohort(id="c", name="C", source=lambda: sorted(members)))
            s.add_destination("remote", remote)
            return s

        scheduler().create_sync("c", "remote", cs.SyncPolicy.hourly(), sync_id="s")
        remote.die_after_add = 2
        with pytest.raises(Crash):
            scheduler().run_due()
        members -= set(MEMBERS[10:20])
        clock.advance(timedelta(minutes=6))
        remote.die_before_remove = 1
        with pytest.raises(Crash):
            scheduler().run_due()
        clock.advance(timedelta(minutes=6))
        scheduler().run_due()

        assert members == remote.audience

    def test_deleting_twice_is_one_teardown(self) -> None:
        """A second delete_sync while the teardown is pending changes nothing."""
        clock = FakeClock(START)
        remote = Remote()
        scheduler = worker(MemoryStorage(), clock, remote)
        scheduler.create_sync("c", "dest", TEARDOWN, sync_id="s1")
        scheduler.run_due()
        scheduler.delete_sync("s1")
        scheduler.delete_sync("s1")

        runs = drain(scheduler, clock)

        assert [cs.Trigger.TEARDOWN] == [r.trigger for r in runs]
        assert set() == remote.audience("s1")
