"""
One sync that cannot be claimed, recorded or run never stops the others; a
sync failing the same way run after run is paused.
"""

from __future__ import annotations

from datetime import timedelta

import cohortsync as cs
from cohortsync.exceptions import (
    StorageError,
)
from cohortsync.storage import Completion, Lease, MemoryStorage
from cohortsync.testing import FakeClock, Fault, FaultyDestination, RecordingDestination
from single_sync import Members, build, run_next

MINUTE = timedelta(minutes=1)


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
