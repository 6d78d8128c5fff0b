"""
Batches in flight: one write-ahead record per request the destination sees,
and a takeover's run record counts what the killed attempt delivered.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

import cohortsync as cs
from cohortsync.storage import MemoryStorage
from cohortsync.testing import FakeClock, Fault, FaultyDestination, RecordingDestination
from single_sync import Members, build, run_next


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


class TestRejectedMembersDoNotShiftResentBatches:
    """
    A member rejected by an interrupted attempt is owed again by the next run;
    the batch left in flight is still re-sent whole, under its own key.
    """

    def test_in_flight_batch_keeps_its_key(self) -> None:
        """Batch 1 rejects u005, batch 2 is cut short: batch 2 comes again under its key."""
        import cohortsync as cs
        from cohortsync.storage import MemoryStorage
        from cohortsync.testing import FakeClock

        class Killed(BaseException):
            pass

        class Vendor(cs.Destination):
            capabilities = cs.Capabilities(name="vendor", max_batch_size=10)

            def __init__(self) -> None:
                self.contents: dict[str, tuple[str, ...]] = {}
                self.die = True

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                seen = self.contents.setdefault(batch.idempotency_key, tuple(batch.identifiers))
                assert seen == tuple(batch.identifiers)
                if self.die and batch.sequence == 2:
                    raise Killed
                return cs.DeliveryResult.partial(
                    cs.Rejection(i, "unknown") for i in batch.identifiers if i == "u005"
                )

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        clock = FakeClock()
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        vendor = Vendor()
        scheduler.add_destination("v", vendor)
        members = [f"u{i:03d}" for i in range(30)]
        scheduler.add_cohort(cs.Cohort(id="c", name="c", source=lambda: members))
        scheduler.create_sync("c", "v", cs.SyncPolicy.hourly(), sync_id="x")
        with pytest.raises(Killed):
            scheduler.run_due()
        vendor.die = False
        clock.advance(timedelta(minutes=5, seconds=1))  # the dead run's lease expires

        scheduler.run_due()

        keys_of: dict[str, list[str]] = {}
        for key, identifiers in vendor.contents.items():
            for identifier in identifiers:
                keys_of.setdefault(identifier, []).append(key)
        twice = {i: k for i, k in keys_of.items() if len(k) > 1 and i != "u005"}
        assert {} == twice
        assert set(members) == set(keys_of)
