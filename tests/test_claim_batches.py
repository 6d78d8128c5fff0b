"""
Claim batches (SPEC 9, issue 14): a claim hands each run what it needs, the
records of a batch are stored together, and nothing about a run's truth
depends on the batch it came in.

Each test here is a finding of an outside attack on the batched path, or a
guarantee the batch must keep.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone

import pytest

import cohortsync as cs
from cohortsync.events import RunFinished
from cohortsync.exceptions import ConfigurationError, StorageError
from cohortsync.storage import Completion, Lease, MemoryStorage, SQLiteStorage, Storage
from cohortsync.testing import FakeClock, RecordingDestination

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
LEASE = timedelta(minutes=5)
SYNCS = [f"s{i:02d}" for i in range(12)]
SLOW = "s05"


@pytest.fixture(params=["memory", "sqlite"])
def storage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Storage:
    if request.param == "memory":
        return MemoryStorage()
    return SQLiteStorage(tmp_path_factory.mktemp("claims") / "c.db")


def _scheduler(
    storage: Storage, clock: FakeClock, destination: cs.Destination, owner: str
) -> cs.Scheduler:
    scheduler = cs.Scheduler(storage, clock=clock, lease_for=LEASE, owner=owner, seed=0)
    scheduler.add_destination("d", destination)
    for sync_id in SYNCS:
        members = [f"{sync_id}-m{i}" for i in range(12 if sync_id == SLOW else 2)]
        scheduler.add_cohort(
            cs.Cohort(id=f"c-{sync_id}", name=sync_id, source=lambda m=members: m),
            replace=True,
        )
    return scheduler


class SlowOne(RecordingDestination):
    """
    Two members a batch; every batch of the slow sync takes two minutes, and
    during its fifth another worker runs what is due.
    """

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(cs.Capabilities(name="slow", max_batch_size=2))
        self.clock = clock
        self.calls = 0
        self.other: cs.Scheduler | None = None
        self.other_runs: list[cs.SyncRun] = []

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        if batch.context.sync_id == SLOW:
            self.calls += 1
            self.clock.advance(timedelta(minutes=2))
            if self.calls == 5 and self.other is not None:
                self.other_runs = self.other.run_due()
        return super().add(batch)


class TestALongRunInABatch:
    """
    Outside attack F1: one slow run must not let the leases of the runs
    waiting behind it (records not stored, or not started) run out.
    """

    def test_no_lease_runs_short_and_every_slot_has_one_truthful_record(
        self, storage: Storage, caplog: pytest.LogCaptureFixture
    ) -> None:
        clock = FakeClock(T0)
        slow = SlowOne(clock)
        first = _scheduler(storage, clock, slow, owner="first")
        for sync_id in SYNCS:
            first.create_sync(f"c-{sync_id}", "d", cs.SyncPolicy.one_time(), sync_id=sync_id)
        finished: list[cs.SyncRun] = []
        first.add_listener(lambda e: finished.append(e.run) if isinstance(e, RunFinished) else None)
        slow.other = _scheduler(storage, clock, RecordingDestination(), owner="second")
        slow.other.add_listener(
            lambda e: finished.append(e.run) if isinstance(e, RunFinished) else None
        )
        with caplog.at_level(logging.WARNING, logger="cohortsync"):
            runs = first.run_due(claim_batch=len(SYNCS))

        assert not [r for r in caplog.records if "lost the lease" in r.getMessage()]
        assert sorted(SYNCS) == sorted(r.sync_id for r in [*runs, *slow.other_runs])
        assert sorted(r.id for r in finished) == sorted(r.id for r in [*runs, *slow.other_runs])
        for sync_id in SYNCS:
            (record,) = first.history(sync_id)
            assert cs.RunStatus.SUCCEEDED is record.status
            assert not [n for n in record.notes if n.startswith("takeover")], record.notes
        # The runs before the slow one were stored by the first worker, the
        # claims after it were given back and taken by the second.
        assert {"s00", "s01", "s02", "s03", "s04", SLOW} == {r.sync_id for r in runs}
        assert set(SYNCS[6:]) == {r.sync_id for r in slow.other_runs}


class FailsFor(MemoryStorage):
    """A store whose complete_run fails for one sync (a store error on its record)."""

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        if lease.sync_id == "s03":
            raise StorageError("disk full on this record")
        super().complete_run(lease, completion)


class TestOneRecordFails:
    """
    Outside attack F2: one record the store fails to write fails alone, also
    when complete_runs is derived (one complete_run each).
    """

    def test_the_others_are_stored_returned_and_reported(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        clock = FakeClock(T0)
        storage = FailsFor()
        scheduler = _scheduler(storage, clock, RecordingDestination(), owner="w")
        for sync_id in SYNCS[:8]:
            scheduler.create_sync(f"c-{sync_id}", "d", cs.SyncPolicy.hourly(), sync_id=sync_id)
        finished: list[str] = []
        scheduler.add_listener(
            lambda e: finished.append(e.run.sync_id) if isinstance(e, RunFinished) else None
        )
        with caplog.at_level(logging.WARNING, logger="cohortsync"):
            runs = scheduler.run_due(claim_batch=8)

        assert not [r for r in caplog.records if "lost the lease" in r.getMessage()]
        good = [s for s in SYNCS[:8] if s != "s03"]
        assert good == sorted(finished)
        assert good == sorted(r.sync_id for r in runs if r.status is cs.RunStatus.SUCCEEDED)
        for sync_id in good:
            assert 1 == len(scheduler.history(sync_id))


class TestArguments:
    """
    Outside attack F4: bad claim_batch and limit values are typed errors, never
    a store error or a silent no-op.
    """

    @pytest.mark.parametrize("value", [0, -1, 1.5, "3", True, float("inf"), 2**63])
    def test_a_bad_claim_batch(self, storage: Storage, value: object) -> None:
        scheduler = cs.Scheduler(storage, clock=FakeClock(T0))
        with pytest.raises(ConfigurationError, match="claim_batch"):
            scheduler.run_due(claim_batch=value)  # type: ignore[arg-type]

    @pytest.mark.parametrize("value", [-1, 1.5, "3", True])
    def test_a_bad_limit(self, storage: Storage, value: object) -> None:
        scheduler = cs.Scheduler(storage, clock=FakeClock(T0))
        with pytest.raises(ConfigurationError, match="limit"):
            scheduler.run_due(limit=value)  # type: ignore[arg-type]


class TickingClock(FakeClock):
    """A clock that moves 40 seconds every time it is read."""

    def now(self) -> datetime:
        moment = super().now()
        self.advance(timedelta(seconds=40))
        return moment


class TestAlwaysProgress:
    """
    A batch whose claims look old at once (a clock that jumps on every read,
    a lease shorter than a run) still runs its first claim: run_due never
    spins giving everything back.
    """

    def test_run_due_returns_with_every_sync_run(self) -> None:
        clock = TickingClock(T0)
        storage = MemoryStorage()
        scheduler = cs.Scheduler(storage, clock=clock, lease_for=timedelta(seconds=60))
        scheduler.add_destination("d", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["a", "b"]))
        for sync_id in SYNCS[:4]:
            scheduler.create_sync("c", "d", cs.SyncPolicy.one_time(), sync_id=sync_id)
        result: list[list[cs.SyncRun]] = []
        worker = threading.Thread(
            target=lambda: result.append(scheduler.run_due(claim_batch=4)), daemon=True
        )
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "run_due kept giving its claims back"
        assert sorted(SYNCS[:4]) == sorted(r.sync_id for r in result[0])
