"""
The worker loop: an idle worker sleeps until the next due time or lease
expiry instead of polling the store.
"""

from __future__ import annotations

from datetime import datetime, timedelta

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
