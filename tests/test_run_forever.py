"""
The worker loop: an idle worker sleeps until the next due time or lease
expiry instead of polling the store.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta, timezone

import cohortsync as cs
from cohortsync.storage import Lease, MemoryStorage
from cohortsync.testing import FakeClock
from single_sync import Members, build


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


START = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)


class StopOnAdd(cs.Destination):
    """Sets *stop* while the run sending its *nth* add is in progress."""

    capabilities = cs.Capabilities(name="stop-on-add")

    def __init__(self, stop: threading.Event, nth: int) -> None:
        self.stop = stop
        self.nth = nth
        self.adds = 0

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.adds += 1
        if self.adds == self.nth:
            self.stop.set()
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()


class AsyncStopOnAdd(cs.AsyncDestination):
    """The same, for an AsyncScheduler: sets an asyncio stop event."""

    capabilities = cs.Capabilities(name="stop-on-add")

    def __init__(self, stop: asyncio.Event, nth: int) -> None:
        self.stop = stop
        self.nth = nth
        self.adds = 0

    async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.adds += 1
        if self.adds == self.nth:
            self.stop.set()
        return cs.DeliveryResult.ok()

    async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()


def five_due(scheduler: cs.Scheduler, destination: cs.Destination | cs.AsyncDestination) -> None:
    """Five hourly syncs, all due now, to *destination*."""
    scheduler.add_destination("d", destination)
    for i in range(5):
        scheduler.add_cohort(cs.Cohort(id=f"c{i}", name=f"C{i}", source=lambda i=i: [f"u{i}"]))
    scheduler.create_syncs([cs.SyncSpec(f"c{i}", "d", cs.SyncPolicy.hourly()) for i in range(5)])


def run_count(storage: MemoryStorage) -> int:
    return sum(len(storage.history(r.id)) for r in storage.list_syncs())


class TestStopping:
    """
    A worker told to stop ends after the run in progress and gives back at
    once what it had claimed but not started (found by an outsider attack:
    ``cohortsync worker`` ran every sync it had claimed, and kept claiming,
    after SIGTERM).
    """

    def test_sync_worker_gives_back_its_claims(self) -> None:
        """Stopped during its second run, of five due: two runs, three left for others now."""
        clock = FakeClock(START)
        storage = MemoryStorage()
        stop = threading.Event()
        scheduler = cs.Scheduler(storage, clock=clock)
        five_due(scheduler, StopOnAdd(stop, nth=2))

        scheduler.run_forever(stop, idle=60)

        assert 2 == run_count(storage)
        other = cs.Scheduler(storage, clock=clock)  # the clock has not moved: no lease expired
        other.add_destination("d", StopOnAdd(threading.Event(), nth=0))
        for i in range(5):
            other.add_cohort(cs.Cohort(id=f"c{i}", name=f"C{i}", source=lambda i=i: [f"u{i}"]))
        assert 3 == len(other.run_due())

    def test_stop_set_before_a_claimed_batch_runs_nothing_of_it(self) -> None:
        """A batch claimed as the stop comes gives every claim back."""
        clock = FakeClock(START)
        storage = MemoryStorage()
        stop = threading.Event()
        scheduler = cs.Scheduler(storage, clock=clock)
        five_due(scheduler, StopOnAdd(threading.Event(), nth=0))
        stop.set()

        assert [] == scheduler._run_due(None, 5, stop)
        assert 5 == len(scheduler.run_due())

    def test_async_worker_starts_no_other_run(self) -> None:
        """AsyncScheduler.run_forever: the lanes finish their runs and claim nothing more."""
        clock = FakeClock(START)
        storage = MemoryStorage()

        async def go() -> tuple[int, int]:
            stop = asyncio.Event()
            async with cs.AsyncScheduler(storage, clock=clock, max_concurrent_runs=1) as aio:
                five_due(aio.scheduler, AsyncStopOnAdd(stop, nth=2))
                await asyncio.wait_for(aio.run_forever(stop, idle=60), 10)
                ran = run_count(storage)
                return ran, len(await aio.run_due())

        ran, left = asyncio.run(go())

        assert (2, 3) == (ran, left)
