"""
Tests for diff delivery: what each run sends, how it survives faults and
crashes, and what the history says about it (SPEC sections 6, 7, 8 and 10).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import cast

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohortsync import (
    Batch,
    Cadence,
    Capabilities,
    Changes,
    Cohort,
    CohortType,
    DeliveryResult,
    Destination,
    IdentifierKind,
    IdentifierMapping,
    MassRemovalGuard,
    OnDelete,
    OnIneligible,
    Operation,
    RateLimit,
    Rejection,
    RetryPolicy,
    RunStatus,
    Scheduler,
    SyncPolicy,
    SyncRun,
    SyncStatus,
    Trigger,
)
from cohortsync._delivery import idempotency_key
from cohortsync._schedule import stable_offset
from cohortsync.destinations import PROCESS_RATE_LIMITS, RateLimits
from cohortsync.events import (
    BatchDelivered,
    EligibilityChanged,
    Event,
    GuardTripped,
    Listener,
    RunFinished,
    RunPlanned,
    RunStarted,
    SyncFailed,
)
from cohortsync.exceptions import ConfigurationError
from cohortsync.storage import IssueKind
from cohortsync.storage._protocol import AppliedBatch, Claim, Completion, Lease
from cohortsync.testing import (
    FakeClock,
    Fault,
    FaultyDestination,
    MemoryStorage,
    RecordedBatch,
    RecordingDestination,
)
from strategies import destination_faults, member_keys, membership_histories

START = datetime.fromisoformat("2030-01-01T00:00:00+00:00")
SYNC = "s1"
LEASE = timedelta(minutes=5)
SMALL = Capabilities(max_batch_size=3)
"""Three members a batch, so a handful of members makes several batches."""


def keys(n: int, prefix: str = "m", start: int = 0) -> list[str]:
    """
    *n* member keys that sort in creation order: ``m0000``, ``m0001``, ...
    """
    return [f"{prefix}{i:04d}" for i in range(start, start + n)]


class Source:
    """
    A membership source the test edits between runs. Holds ``object``s so
    tests can plant keys that are not valid.
    """

    def __init__(self, members: Iterable[object] = ()) -> None:
        self.keys: list[object] = list(members)

    def set(self, members: Iterable[object]) -> None:
        self.keys = list(members)

    def members(self) -> Iterable[str]:
        return cast("list[str]", list(self.keys))


class Harness:
    """
    One scheduler, one cohort (``c``) and one destination (``dest``), with a
    sync ``s1`` between them; ``restart()`` builds a new scheduler on the same
    store, as a restarted worker process would.
    """

    def __init__(
        self,
        clock: FakeClock,
        members: Iterable[object] = (),
        *,
        destination: Destination | None = None,
        policy: SyncPolicy | None = None,
        storage: MemoryStorage | None = None,
        source: object = None,
        mapping: IdentifierMapping | None = None,
        listeners: Iterable[Listener] = (),
        cohort_type: CohortType = CohortType.BEHAVIORAL,
    ) -> None:
        self.clock = clock
        self.storage = storage if storage is not None else MemoryStorage()
        self.source = source if source is not None else Source(members)
        self.destination = destination or RecordingDestination(SMALL)
        self.mapping = mapping
        self.listeners = list(listeners)
        self.cohort_type = cohort_type
        self.scheduler = self._build()
        self.scheduler.create_sync(
            "c",
            "dest",
            policy or SyncPolicy.hourly(),
            sync_id=SYNC,
            mapping_id=None if mapping is None else "mapping",
        )

    def _build(self) -> Scheduler:
        scheduler = Scheduler(self.storage, clock=self.clock, seed=1, listeners=self.listeners)
        scheduler.add_destination("dest", self.destination)
        self.set_cohort_type(self.cohort_type, scheduler)
        if self.mapping is not None:
            scheduler.add_mapping("mapping", self.mapping)
        return scheduler

    def set_cohort_type(self, cohort_type: CohortType, scheduler: Scheduler | None = None) -> None:
        (scheduler or self.scheduler).add_cohort(
            Cohort(id="c", name="C", type=cohort_type, source=self.source), replace=True
        )

    def restart(self) -> None:
        self.scheduler = self._build()

    @property
    def recording(self) -> RecordingDestination:
        assert isinstance(self.destination, RecordingDestination)
        return self.destination

    def set_members(self, members: Iterable[object]) -> None:
        assert isinstance(self.source, Source)
        self.source.set(members)

    def run_now(self) -> SyncRun:
        """
        Run what is due now: exactly one run.
        """
        runs = self.scheduler.run_due()
        assert 1 == len(runs), runs
        return runs[0]

    def run_next(self, members: Iterable[object] | None = None) -> SyncRun:
        """
        Move the clock to the sync's next due time (never backwards) and run it.
        """
        if members is not None:
            self.set_members(members)
        due = self.scheduler.next_run(SYNC)
        assert due is not None, "the sync is not scheduled"
        self.clock.set(max(due, self.clock.now()))
        return self.run_now()

    def delivered(self, sync_id: str = SYNC) -> set[str]:
        return set(self.storage.iter_delivered(sync_id))

    def audience(self, sync_id: str = SYNC) -> set[str]:
        return self.recording.audience(sync_id)

    def batches(self, run: SyncRun) -> list[RecordedBatch]:
        return [b for b in self.recording.batches if b.run_id == run.id]


def sent(batches: Iterable[RecordedBatch], operation: Operation) -> list[str]:
    return [k for b in batches if b.operation is operation for k in b.keys]


def operations(batches: Iterable[RecordedBatch]) -> list[Operation]:
    return [b.operation for b in batches]


# --- What each run sends ---------------------------------------------------


class TestDiffDelivery:
    """
    The first run sends the whole cohort; later runs send only who entered and left.
    """

    def test_first_run_sends_the_whole_cohort_as_adds(self, clock: FakeClock) -> None:
        """The first run adds every member once, in key order, in full batches."""
        h = Harness(clock, reversed(keys(10)))

        run = h.run_now()

        assert (RunStatus.SUCCEEDED, 10, 0, 4) == (run.status, run.added, run.removed, run.batches)
        assert [Operation.ADD] * 4 == operations(h.batches(run))
        assert keys(10) == sent(h.batches(run), Operation.ADD)
        assert set(keys(10)) == h.audience() == h.delivered()

    def test_later_runs_send_only_who_entered_and_left(self, clock: FakeClock) -> None:
        """A later run removes who left and adds who entered, nobody else."""
        h = Harness(clock, keys(10))
        h.run_now()

        run = h.run_next(keys(12)[3:])

        assert ["m0000", "m0001", "m0002"] == sent(h.batches(run), Operation.REMOVE)
        assert ["m0010", "m0011"] == sent(h.batches(run), Operation.ADD)
        assert (2, 3, 2) == (run.added, run.removed, run.batches)
        assert set(keys(12)[3:]) == h.audience() == h.delivered()

    def test_a_run_without_changes_sends_nothing(self, clock: FakeClock) -> None:
        """No change since the last run: no batch at all."""
        h = Harness(clock, keys(10))
        h.run_now()

        run = h.run_next()

        assert (RunStatus.SUCCEEDED, 0, 0, 0) == (run.status, run.added, run.removed, run.batches)
        assert [] == h.batches(run)

    def test_removes_go_before_adds(self, clock: FakeClock) -> None:
        """Within a run, every remove batch is sent before the first add batch."""
        h = Harness(clock, keys(10))
        h.run_now()

        run = h.run_next(keys(11, start=7))  # 7 leave, 8 enter

        assert [Operation.REMOVE] * 3 + [Operation.ADD] * 3 == operations(h.batches(run))
        assert [1, 2, 3, 4, 5, 6] == [b.sequence for b in h.batches(run)]
        assert (8, 7) == (run.added, run.removed)

    @pytest.mark.parametrize("max_batch_size", [1, 3, 7, 1_000])
    def test_no_batch_exceeds_the_destinations_batch_size(
        self, clock: FakeClock, max_batch_size: int
    ) -> None:
        """Batches are as full as the destination allows and never fuller."""
        h = Harness(
            clock,
            keys(25),
            destination=RecordingDestination(Capabilities(max_batch_size=max_batch_size)),
        )
        h.run_now()
        run = h.run_next(keys(25, start=10))

        for b in h.recording.batches:
            assert len(b.keys) <= max_batch_size
        assert math.ceil(10 / max_batch_size) * 2 == run.batches
        assert math.ceil(25 / max_batch_size) + run.batches == len(h.recording.batches)

    @pytest.mark.parametrize(
        "capabilities",
        [Capabilities(full_sync_only=True, max_batch_size=3), "amazon_s3"],
        ids=["full_sync_only", "amazon_s3"],
    )
    def test_full_sync_only_destinations_get_the_whole_membership_every_run(
        self, clock: FakeClock, capabilities: Capabilities | str
    ) -> None:
        """Full-sync destinations get exiting (REMOVE), entering (ADD) and existing (EXISTING)."""
        h = Harness(clock, keys(5), destination=RecordingDestination(capabilities))
        first = h.run_now()
        second = h.run_next(keys(5, start=2))  # m0000, m0001 exit; m0005, m0006 enter
        third = h.run_next()

        assert keys(5) == sent(h.batches(first), Operation.ADD)
        assert {Operation.ADD} == set(operations(h.batches(first)))
        assert ["m0000", "m0001"] == sent(h.batches(second), Operation.REMOVE)
        assert ["m0005", "m0006"] == sent(h.batches(second), Operation.ADD)
        assert ["m0002", "m0003", "m0004"] == sent(h.batches(second), Operation.EXISTING)
        ops = operations(h.batches(second))
        assert ops == sorted(ops, key=[Operation.REMOVE, Operation.ADD, Operation.EXISTING].index)
        assert keys(5, start=2) == sent(h.batches(third), Operation.EXISTING)
        assert {Operation.EXISTING} == set(operations(h.batches(third)))
        assert (2, 2, 0, 0) == (second.added, second.removed, third.added, third.removed)
        assert set(keys(5, start=2)) == h.audience() == h.delivered()


class TestDeliveryProperties:
    """
    Replaying what was sent reproduces the cohort, with or without faults.
    """

    @given(history=membership_histories())
    def test_replaying_every_runs_batches_reproduces_the_cohort(
        self, history: list[frozenset[str]]
    ) -> None:
        """Applying each run's removes and adds to an empty set gives the cohort after each run."""
        h = Harness(
            FakeClock(START),
            destination=RecordingDestination(Capabilities(max_batch_size=4)),
            policy=SyncPolicy.hourly(guard=MassRemovalGuard.disabled()),
        )
        replayed: set[str] = set()
        for members in history:
            run = h.run_next(members)
            batches = h.batches(run)
            ops = operations(batches)
            assert ops == sorted(ops, key=[Operation.REMOVE, Operation.ADD].index)
            for b in batches:
                assert len(b.keys) <= 4
                if b.operation is Operation.REMOVE:
                    assert replayed >= set(b.keys)  # only members that were there
                    replayed.difference_update(b.keys)
                else:
                    assert not replayed & set(b.keys)  # only members that were not
                    replayed.update(b.keys)
            assert set(members) == replayed == h.delivered()
            assert RunStatus.SUCCEEDED == run.status

    @given(
        history=membership_histories(),
        faults=destination_faults(),
        seed=st.integers(0, 2**16),
        parallel=st.sampled_from([1, 3]),
    )
    def test_converges_after_random_destination_faults(
        self,
        history: list[frozenset[str]],
        faults: dict[Fault, float],
        seed: int,
        parallel: int,
    ) -> None:
        """After faulty runs, one clean run makes the audience the cohort; the state never lies."""
        destination = FaultyDestination(
            Capabilities(max_batch_size=4, max_parallel=parallel), random_faults=faults, seed=seed
        )
        h = Harness(
            FakeClock(START),
            destination=destination,
            policy=SyncPolicy.hourly(
                guard=MassRemovalGuard.disabled(),
                retry=RetryPolicy(max_retries=2),
                rejection_attempts=1_000,  # a flaky rejection must not become a dead letter here
            ),
        )
        for members in history:
            run = h.run_next(members)
            assert h.audience() == h.delivered()
            assert run.status is not RunStatus.SUCCEEDED or set(members) == h.audience()
            if h.scheduler.get_sync(SYNC).status is SyncStatus.PAUSED:
                # Five identical failures in a row pause it; the host resumes.
                last = h.scheduler.history(SYNC, limit=5)
                assert len({(r.error_type, r.error_message) for r in last}) == 1
                h.scheduler.resume_sync(SYNC)

        destination.random_faults = {}
        run = h.run_next()

        assert RunStatus.SUCCEEDED == run.status
        assert set(history[-1]) == h.audience() == h.delivered()
        assert not {e.key for e in h.storage.ledger(SYNC)} & history[-1]


# --- Crashes ----------------------------------------------------------------


class Crash(BaseException):
    """
    The process dies here: a BaseException, so nothing in the engine catches it.
    """


@attrs.define
class CrashingStorage(MemoryStorage):
    """
    A MemoryStorage whose process "dies" at the *n*-th call (0-based) of one
    method, either before the store did the work or right after.
    """

    crash_method: str = ""
    crash_call: int = -1
    crash_after: bool = False
    crashed_key: str | None = None
    calls: dict[str, int] = attrs.Factory(dict)

    def _call(self, method: str) -> int:
        n = self.calls.get(method, 0)
        self.calls[method] = n + 1
        return n

    def _dies(self, method: str, n: int, *, after: bool) -> bool:
        return (method, n, after) == (self.crash_method, self.crash_call, self.crash_after)

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        claims = super().claim_runs(now, owner, lease_for, limit)
        if claims and self._dies("claim_runs", self._call("claim_runs"), after=True):
            raise Crash  # claimed, then died before running
        return claims

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        n = self._call("apply_batch")
        if self._dies("apply_batch", n, after=False):
            self.crashed_key = batch.idempotency_key
            raise Crash
        version = super().apply_batch(lease, batch)
        if self._dies("apply_batch", n, after=True):
            raise Crash
        return version

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        n = self._call("complete_run")
        if self._dies("complete_run", n, after=False):
            raise Crash
        super().complete_run(lease, completion)
        if self._dies("complete_run", n, after=True):
            raise Crash

    def disarm(self) -> None:
        self.crash_method = ""


# Two runs: 10 members in 4 add batches; then 4 leave and 5 enter (2 remove
# batches, 2 add batches). A crash at each step of either run.
CRASH_HISTORY = (keys(10), keys(11, start=4))
CRASH_POINTS = [
    *(("claim_runs", n, True) for n in range(2)),
    *(("apply_batch", n, after) for n in range(8) for after in (False, True)),
    *(("complete_run", n, after) for n in range(2) for after in (False, True)),
]


class TestCrashRecovery:
    """
    A worker dying at any step loses no change and re-sends at most the in-flight batch.
    """

    @pytest.mark.parametrize(
        ("method", "call", "after"),
        CRASH_POINTS,
        ids=[f"{m}-{n}-{'after' if a else 'before'}" for m, n, a in CRASH_POINTS],
    )
    def test_a_new_worker_completes_the_crashed_slot(
        self, clock: FakeClock, method: str, call: int, after: bool
    ) -> None:
        """After a crash and the lease's expiry, a new worker makes the audience the cohort."""
        storage = CrashingStorage(crash_method=method, crash_call=call, crash_after=after)
        h = Harness(clock, storage=storage)
        crashes = 0
        slots: list[datetime] = []
        for members in CRASH_HISTORY:
            h.set_members(members)
            due = h.scheduler.next_run(SYNC)
            assert due is not None
            clock.set(max(due, clock.now()))
            slots.append(due)
            try:
                h.scheduler.run_due()
            except Crash:
                crashes += 1
                storage.disarm()
                h.restart()
                assert [] == h.scheduler.run_due()  # the dead worker's lease still holds
                if due not in {run.slot for run in h.scheduler.history(SYNC)}:
                    clock.advance(LEASE + timedelta(seconds=1))
                    recovered = h.run_now()
                    assert due == recovered.slot
            assert set(members) == h.audience() == h.delivered()

        assert 1 == crashes
        resent = h.recording.resent_keys()
        if method == "apply_batch" and not after:
            assert [storage.crashed_key] == resent  # acknowledged, not applied: sent once more
        else:
            assert [] == resent
        history = h.scheduler.history(SYNC)
        assert sorted(slots) == sorted(run.slot for run in history)  # one record per slot

    def test_a_store_error_fails_the_run_and_the_next_run_resends_the_batch(
        self, clock: FakeClock
    ) -> None:
        """A store error after an acknowledgement fails the run; the next re-sends, same key."""

        class StoreDownError(Exception):
            pass

        @attrs.define
        class FailingStorage(MemoryStorage):
            failures: int = 0
            failed_key: str | None = None

            def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
                if batch.sequence == 2 and self.failed_key is None:
                    self.failed_key = batch.idempotency_key
                    raise StoreDownError("database went away")
                return super().apply_batch(lease, batch)

        storage = FailingStorage()
        h = Harness(clock, keys(10), storage=storage)

        failed = h.run_now()
        retried = h.run_next()

        assert (RunStatus.PARTIAL, "StoreDownError", 3) == (
            failed.status,
            failed.error_type,
            failed.added,
        )
        assert (RunStatus.SUCCEEDED, 7) == (retried.status, retried.added)
        assert [storage.failed_key] == h.recording.resent_keys()
        assert set(keys(10)) == h.audience() == h.delivered()


# --- Idempotency keys ------------------------------------------------------

_KEYS_SCRIPT = textwrap.dedent(
    """
    import json
    from datetime import datetime
    from cohortsync import Capabilities, Cohort, Scheduler, SyncPolicy
    from cohortsync.storage import MemoryStorage
    from cohortsync.testing import FakeClock, RecordingDestination

    clock = FakeClock(datetime.fromisoformat("2030-01-01T00:00:00+00:00"))
    members = {f"user-{i}" for i in range(50)}
    scheduler = Scheduler(MemoryStorage(), clock=clock, seed=1)
    dest = scheduler.add_destination("dest", RecordingDestination(Capabilities(max_batch_size=7)))
    scheduler.add_cohort(Cohort(id="c", name="C", source=lambda: set(members)))
    scheduler.create_sync("c", "dest", SyncPolicy.hourly(), sync_id="s1")
    scheduler.run_due()
    members -= {f"user-{i}" for i in range(0, 50, 3)}
    members |= {f"new-{i}" for i in range(20)}
    clock.set(scheduler.next_run("s1"))
    scheduler.run_due()
    print(json.dumps([[b.operation.value, b.idempotency_key] for b in dest.batches]))
    """
)


class TestIdempotencyKeys:
    """
    A batch's idempotency key is a stable hash of sync, generation, operation and content.
    """

    def test_keys_are_the_same_in_processes_with_different_hash_seeds(self) -> None:
        """Two processes with different PYTHONHASHSEED send the same batches under the same keys."""
        outputs = []
        for seed in ("1", "2"):
            env = {**os.environ, "PYTHONHASHSEED": seed}
            done = subprocess.run(  # noqa: S603 - our own interpreter and script
                [sys.executable, "-c", _KEYS_SCRIPT],
                capture_output=True,
                text=True,
                env=env,
                check=True,
                timeout=60,
            )
            outputs.append(json.loads(done.stdout))

        assert outputs[0] == outputs[1]
        assert 8 + 3 + 3 == len(outputs[0])  # 50 adds in 8; then 17 removes, 20 adds
        assert len(outputs[0]) == len({key for _, key in outputs[0]})

    def test_keys_depend_on_sync_generation_operation_and_content(self) -> None:
        """Changing any one of the four inputs changes the key; nothing else does."""
        base = idempotency_key("s1", 1, Operation.ADD, ["a", "b"])

        assert base == idempotency_key("s1", 1, Operation.ADD, ["a", "b"])
        assert 32 == len(base)
        variants = [
            idempotency_key("s2", 1, Operation.ADD, ["a", "b"]),
            idempotency_key("s1", 2, Operation.ADD, ["a", "b"]),
            idempotency_key("s1", 1, Operation.REMOVE, ["a", "b"]),
            idempotency_key("s1", 1, Operation.ADD, ["a", "c"]),
            idempotency_key("s1", 1, Operation.ADD, ["ab"]),
            idempotency_key("s1", 1, Operation.ADD, ["a"]),
        ]
        assert 6 == len(set(variants) - {base})

    @given(st.lists(member_keys(8), max_size=20), st.text(max_size=8))
    def test_keys_are_the_digest_of_each_value_in_turn(self, values: list[str], basis: str) -> None:
        """Hashing the joined values gives the digest of one update per value: keys
        recorded in flight by an earlier version are still recognised."""
        h = hashlib.sha256()
        h.update(f"s1\x1f3\x1fadd\x1f{basis}\x1f".encode())
        for value in values:
            h.update(value.encode("utf-8", "surrogatepass"))
            h.update(b"\x1e")

        assert h.hexdigest()[:32] == idempotency_key("s1", 3, Operation.ADD, values, basis)


# --- Retries, rate limits, bisection -------------------------------------------


def backoff_bounds(attempt: int, policy: RetryPolicy) -> tuple[float, float]:
    """
    The shortest and longest wait before retry *attempt*: jitter only lengthens.
    """
    base = policy.initial * policy.multiplier**attempt
    return min(policy.max_delay, base), min(policy.max_delay, base * (1 + policy.jitter))


class TestRetries:
    """
    Transient errors are retried on the policy's schedule; rate limits do not use it up.
    """

    @pytest.mark.parametrize("failures", [1, 4, 8])
    def test_waits_follow_the_retry_policy(self, clock: FakeClock, failures: int) -> None:
        """k server errors, then success: k waits of 1, 2, 4, ... seconds, within the jitter."""
        dest = FaultyDestination(SMALL, script={n: Fault.server_error() for n in range(failures)})
        h = Harness(clock, keys(3), destination=dest)

        run = h.run_now()

        assert (RunStatus.SUCCEEDED, failures, 3) == (run.status, run.retries, run.added)
        assert failures == len(clock.slept)
        for attempt, waited in enumerate(clock.slept):
            low, high = backoff_bounds(attempt, RetryPolicy())
            assert low <= waited <= high
        assert failures + 1 == dest.call_count

    def test_without_jitter_the_waits_double_exactly(self, clock: FakeClock) -> None:
        """With jitter 0 the waits are exactly 1, 2, 4, 8 seconds."""
        dest = FaultyDestination(SMALL, script={n: Fault.timeout() for n in range(4)})
        h = Harness(
            clock,
            keys(3),
            destination=dest,
            policy=SyncPolicy.hourly(retry=RetryPolicy(jitter=0.0)),
        )

        h.run_now()

        assert [1.0, 2.0, 4.0, 8.0] == clock.slept

    def test_gives_up_after_eight_retries(self, clock: FakeClock) -> None:
        """Nine failed calls (eight retries) fail the run; nothing is recorded as delivered."""
        dest = FaultyDestination(SMALL, always=Fault.server_error())
        h = Harness(clock, keys(3), destination=dest)

        run = h.run_now()

        assert (RunStatus.FAILED, "TransientError", 8, 0) == (
            run.status,
            run.error_type,
            run.retries,
            run.added,
        )
        assert 9 == dest.call_count
        assert 8 == len(clock.slept)
        assert clock.slept[-1] > 120  # the last wait is past two minutes
        assert set() == h.delivered()
        assert SyncStatus.ACTIVE == h.scheduler.get_sync(SYNC).status

    def test_retries_exhausted_on_a_later_batch_keep_the_earlier_ones(
        self, clock: FakeClock
    ) -> None:
        """Only the acknowledged batch advances the state; the failed one is sent again next run."""
        dest = FaultyDestination(SMALL, script={n: Fault.server_error() for n in range(1, 10)})
        h = Harness(clock, keys(6), destination=dest)

        failed = h.run_now()

        assert (RunStatus.PARTIAL, "TransientError", 3) == (
            failed.status,
            failed.error_type,
            failed.added,
        )
        assert set(keys(3)) == h.delivered() == h.audience()
        retried = h.run_next()
        assert (RunStatus.SUCCEEDED, 3) == (retried.status, retried.added)
        assert set(keys(6)) == h.delivered() == h.audience()

    def test_retry_after_longer_than_the_backoff_is_honoured(self, clock: FakeClock) -> None:
        """A 503 with Retry-After: 30 waits 30 s, not the 1 s backoff."""
        dest = FaultyDestination(SMALL, script={0: Fault.server_error(retry_after=30.0)})
        h = Harness(clock, keys(3), destination=dest)

        run = h.run_now()

        assert [30.0] == clock.slept
        assert (RunStatus.SUCCEEDED, 1) == (run.status, run.retries)

    def test_retry_after_shorter_than_the_backoff_is_not_a_shortcut(self, clock: FakeClock) -> None:
        """A Retry-After shorter than the backoff waits the backoff."""
        dest = FaultyDestination(SMALL, script={0: Fault.server_error(retry_after=0.1)})
        h = Harness(clock, keys(3), destination=dest)

        h.run_now()

        assert 1 == len(clock.slept)
        assert 1.0 <= clock.slept[0] <= 1.1

    def test_rate_limit_waits_do_not_use_the_retry_budget(self, clock: FakeClock) -> None:
        """Twenty 429s with Retry-After: 7, then success: twenty 7 s waits and no retry counted."""
        dest = FaultyDestination(
            SMALL, script={n: Fault.rate_limited(retry_after=7) for n in range(20)}
        )
        h = Harness(clock, keys(3), destination=dest)

        run = h.run_now()

        assert (RunStatus.SUCCEEDED, 0, 3) == (run.status, run.retries, run.added)
        assert [7.0] * 20 == clock.slept
        assert START + timedelta(seconds=140) == clock.now()

    def test_rate_limits_and_a_full_retry_budget_in_one_batch(self, clock: FakeClock) -> None:
        """Twenty 429s and then eight 503s still succeed: only the 503s count as retries."""
        script = {n: Fault.rate_limited(retry_after=7) for n in range(20)}
        script.update({n: Fault.server_error() for n in range(20, 28)})
        h = Harness(clock, keys(3), destination=FaultyDestination(SMALL, script=script))

        run = h.run_now()

        assert (RunStatus.SUCCEEDED, 8, 3) == (run.status, run.retries, run.added)
        assert 28 == len(clock.slept)


def bisection_calls(size: int, bad: set[int], offset: int = 0) -> int:
    """
    Calls needed to isolate the *bad* positions of a batch of *size* by halving.
    """
    if not bad & set(range(offset, offset + size)):
        return 1
    if size == 1:
        return 1
    half = size // 2
    return 1 + bisection_calls(half, bad, offset) + bisection_calls(size - half, bad, offset + half)


class TestBisection:
    """
    A batch refused as a whole for bad data is split until the bad members are isolated.
    """

    def test_isolates_exactly_the_bad_members(self, clock: FakeClock) -> None:
        """Two bad members in a batch of 100: those two are rejected, 98 delivered."""
        members = [f"u{i:02d}" for i in range(100)]
        dest = FaultyDestination(always=Fault.bad_data({"u13", "u77"}))
        h = Harness(clock, members, destination=dest)

        run = h.run_now()

        assert (RunStatus.PARTIAL, 98, 2) == (run.status, run.added, run.rejected)
        assert ["u13", "u77"] == [e.key for e in h.scheduler.ledger(SYNC)]
        assert all(e.reason.startswith("bad_data") for e in h.scheduler.ledger(SYNC))
        assert set(members) - {"u13", "u77"} == h.audience() == h.delivered()
        assert bisection_calls(100, {13, 77}) == dest.call_count
        assert 0 == run.retries


# --- Authentication and permanent errors ---------------------------------------


class TestAuthenticationError:
    """
    Credentials refused: the sync is paused with a clear reason until resumed.
    """

    def test_pauses_the_sync_and_resume_continues(self, clock: FakeClock) -> None:
        """A 401 on the second batch: run partial, sync paused; resume delivers the rest."""
        dest = FaultyDestination(SMALL, script={1: Fault.auth()})
        events: list[Event] = []
        h = Harness(clock, keys(6), destination=dest, listeners=[events.append])

        run = h.run_now()

        sync = h.scheduler.get_sync(SYNC)
        assert (RunStatus.PARTIAL, "AuthenticationError", 3) == (
            run.status,
            run.error_type,
            run.added,
        )
        assert SyncStatus.PAUSED == sync.status
        assert sync.status_reason is not None
        assert "authentication" in sync.status_reason
        assert [run] == h.scheduler.history(SYNC)
        assert None is h.scheduler.next_run(SYNC)
        assert [SyncStatus.PAUSED] == [e.status for e in events if isinstance(e, SyncFailed)]
        clock.advance(timedelta(days=1))
        assert [] == h.scheduler.run_due()

        h.scheduler.resume_sync(SYNC)
        resumed = h.run_now()

        assert (Trigger.MANUAL, RunStatus.SUCCEEDED, 3) == (
            resumed.trigger,
            resumed.status,
            resumed.added,
        )
        assert SyncStatus.ACTIVE == h.scheduler.get_sync(SYNC).status
        assert set(keys(6)) == h.audience() == h.delivered()

    def test_on_the_first_call_the_run_failed(self, clock: FakeClock) -> None:
        """Nothing delivered before the 401: the run is failed, not partial."""
        h = Harness(clock, keys(3), destination=FaultyDestination(SMALL, script={0: Fault.auth()}))

        run = h.run_now()

        assert (RunStatus.FAILED, 0) == (run.status, run.added)
        assert SyncStatus.PAUSED == h.scheduler.get_sync(SYNC).status


class TestPermanentError:
    """
    A permanent error fails the run without advancing the state for its batch.
    """

    def test_fails_the_run_and_the_next_run_sends_again(self, clock: FakeClock) -> None:
        """A batch refused for good: run failed, nothing delivered, no retry; the sync active."""
        dest = FaultyDestination(SMALL, script={0: Fault.permanent()})
        h = Harness(clock, keys(3), destination=dest)

        run = h.run_now()

        assert (RunStatus.FAILED, "PermanentError", 0, 0) == (
            run.status,
            run.error_type,
            run.added,
            run.retries,
        )
        assert 1 == dest.call_count
        assert set() == h.delivered() == h.audience()
        assert SyncStatus.ACTIVE == h.scheduler.get_sync(SYNC).status
        retried = h.run_next()
        assert (RunStatus.SUCCEEDED, 3) == (retried.status, retried.added)

    def test_on_a_later_batch_only_that_batch_is_not_applied(self, clock: FakeClock) -> None:
        """Batches acknowledged before the permanent error stay delivered; no later one is sent."""
        dest = FaultyDestination(SMALL, script={1: Fault.permanent()})
        h = Harness(clock, keys(9), destination=dest)

        run = h.run_now()

        assert (RunStatus.PARTIAL, 3) == (run.status, run.added)
        assert 2 == dest.call_count
        assert set(keys(3)) == h.delivered() == h.audience()


# --- The rejected-member ledger --------------------------------------------------


class TestRejectionLedger:
    """
    Rejected members are retried on later runs a bounded number of times, then dead letters.
    """

    def test_rejections_become_dead_letters_after_the_bound(self, clock: FakeClock) -> None:
        """A member rejected on three runs is a dead letter and is not sent again."""
        dest = FaultyDestination(
            SMALL, always=Fault.reject(identifiers={"m0001"}, reason="no such user")
        )
        h = Harness(clock, keys(3), destination=dest)

        runs = [h.run_now(), h.run_next(), h.run_next(), h.run_next()]

        assert [RunStatus.PARTIAL] * 3 + [RunStatus.SUCCEEDED] == [r.status for r in runs]
        assert [1, 1, 1, 0] == [r.rejected for r in runs]
        assert 3 == sum(b.keys.count("m0001") for b in dest.batches)
        (entry,) = h.scheduler.ledger(SYNC)
        assert ("m0001", "no such user", 3, True) == (
            entry.key,
            entry.reason,
            entry.attempts,
            entry.dead,
        )
        assert {"m0001"} == h.storage.dead_letters(SYNC)
        assert {"m0000", "m0002"} == h.audience() == h.delivered()

    def test_the_bound_follows_the_policy(self, clock: FakeClock) -> None:
        """rejection_attempts=1: dead after the first rejection."""
        dest = FaultyDestination(SMALL, always=Fault.reject(identifiers={"m0001"}))
        h = Harness(
            clock, keys(3), destination=dest, policy=SyncPolicy.hourly(rejection_attempts=1)
        )

        h.run_now()
        later = h.run_next()

        assert 0 == later.batches
        assert [True] == [e.dead for e in h.scheduler.ledger(SYNC)]

    def test_a_rejection_that_clears_leaves_the_ledger(self, clock: FakeClock) -> None:
        """A member rejected once and accepted on the next run leaves the ledger."""
        dest = FaultyDestination(SMALL, script={0: Fault.reject(identifiers={"m0001"})})
        h = Harness(clock, keys(3), destination=dest)

        first = h.run_now()
        assert [(1, False)] == [(e.attempts, e.dead) for e in h.scheduler.ledger(SYNC)]
        second = h.run_next()

        assert (RunStatus.PARTIAL, RunStatus.SUCCEEDED) == (first.status, second.status)
        assert (1, 0) == (second.added, second.rejected)
        assert [] == h.scheduler.ledger(SYNC)
        assert set(keys(3)) == h.audience() == h.delivered()

    def test_rejections_the_cohort_no_longer_needs_leave_the_ledger(self, clock: FakeClock) -> None:
        """A rejected add whose member left, a rejected removal whose member returned: forgotten."""
        script = {
            0: Fault.reject(identifiers={"m0001"}),
            1: Fault.reject(identifiers={"m0000"}),
        }
        h = Harness(clock, keys(2), destination=FaultyDestination(SMALL, script=script))
        h.run_now()
        assert ["m0001"] == [e.key for e in h.scheduler.ledger(SYNC)]

        left = h.run_next(["m0002"])

        assert (RunStatus.PARTIAL, 1, 0, 1) == (
            left.status,
            left.added,
            left.removed,
            left.rejected,
        )
        assert ["m0000"] == [e.key for e in h.scheduler.ledger(SYNC)]
        back = h.run_next(["m0000", "m0002"])
        assert (RunStatus.SUCCEEDED, 0) == (back.status, back.batches)
        assert [] == h.scheduler.ledger(SYNC)
        assert {"m0000", "m0002"} == h.audience() == h.delivered()

    def test_export_lists_skipped_and_rejected_members_with_reasons(self, clock: FakeClock) -> None:
        """A scheduled sync's export names each skipped and rejected member and why."""
        dest = FaultyDestination(
            SMALL, always=Fault.reject(identifiers={"m0001"}, reason="unknown user")
        )
        h = Harness(clock, [*keys(3), ""], destination=dest)
        h.run_now()

        (row,) = h.scheduler.export_history(SYNC)

        assert "partial" == row["status"]
        assert [
            {"key": "m0001", "kind": "rejected", "reason": "unknown user"},
            {"key": "", "kind": "skipped", "reason": "invalid_key: empty"},
        ] == row["members"]
        # Plain text, not IssueKind members: the export is JSON-ready data.
        members = row["members"]
        assert isinstance(members, list)
        assert [str, str] == [type(m["kind"]) for m in members]
        json.dumps(row)

    def test_export_of_a_realtime_sync_has_no_member_lists(self, clock: FakeClock) -> None:
        """Member-level lists are for scheduled syncs only (real-time runs are too many)."""
        dest = FaultyDestination(SMALL, always=Fault.reject(identifiers={"m0001"}))
        h = Harness(clock, keys(3), destination=dest, policy=SyncPolicy.realtime())
        h.run_now()

        (row,) = h.scheduler.export_history(SYNC)

        assert "members" not in row
        assert 1 == row["rejected"]


# --- The mass-removal guard ----------------------------------------------------------


class TestMassRemovalGuard:
    """
    Removals that look like an accident are held until the host confirms.
    """

    def test_an_empty_source_removes_nothing(self, clock: FakeClock) -> None:
        """The source returns no members: the run is guarded and the audience stays."""
        events: list[Event] = []
        h = Harness(clock, keys(10), listeners=[events.append])
        h.run_now()

        run = h.run_next([])

        assert (RunStatus.GUARDED, 0, 0) == (run.status, run.removed, run.batches)
        assert (
            "mass_removal_guard: would remove 10 of 10 (source returned no members)",
        ) == run.notes
        assert set(keys(10)) == h.audience() == h.delivered()
        (tripped,) = [e for e in events if isinstance(e, GuardTripped)]
        assert (10, 10, True) == (tripped.delivered, tripped.removing, tripped.source_empty)

    def test_removing_more_than_half_of_a_large_audience_is_held(self, clock: FakeClock) -> None:
        """1,001 of 2,000 leaving: removals held with the numbers; adds still go."""
        h = Harness(clock, keys(2_000), destination=RecordingDestination())
        h.run_now()

        run = h.run_next(keys(1_004, start=1_001))  # 1,001 leave, 5 enter

        assert (RunStatus.GUARDED, 0, 5) == (run.status, run.removed, run.added)
        assert ("mass_removal_guard: would remove 1001 of 2000",) == run.notes
        assert set(keys(2_005)) == h.audience() == h.delivered()

    def test_removing_exactly_half_is_not_held(self, clock: FakeClock) -> None:
        """1,000 of 2,000 leaving is not more than half: sent."""
        h = Harness(clock, keys(2_000), destination=RecordingDestination())
        h.run_now()

        run = h.run_next(keys(1_000, start=1_000))

        assert (RunStatus.SUCCEEDED, 1_000) == (run.status, run.removed)

    def test_small_audiences_are_not_guarded(self, clock: FakeClock) -> None:
        """998 of 999 leaving an audience below 1,000: sent."""
        h = Harness(clock, keys(999), destination=RecordingDestination())
        h.run_now()

        run = h.run_next(keys(1))

        assert (RunStatus.SUCCEEDED, 998) == (run.status, run.removed)
        assert {"m0000"} == h.audience() == h.delivered()

    def test_confirmed_removals_are_sent_by_the_next_run(self, clock: FakeClock) -> None:
        """After confirm_removals the next run sends them; the guard is armed again afterwards."""
        h = Harness(clock, keys(10))
        h.run_now()
        h.run_next([])
        assert RunStatus.GUARDED == h.run_next().status  # still held, run after run

        clock.advance(1)
        h.scheduler.confirm_removals(SYNC)
        confirmed = h.run_now()

        assert (Trigger.MANUAL, RunStatus.SUCCEEDED, 10) == (
            confirmed.trigger,
            confirmed.status,
            confirmed.removed,
        )
        assert set() == h.audience() == h.delivered()
        assert not h.scheduler.get_sync(SYNC).guard_released
        h.run_next(keys(10))
        assert RunStatus.GUARDED == h.run_next([]).status

    def test_a_disabled_guard_lets_everything_through(self, clock: FakeClock) -> None:
        """MassRemovalGuard.disabled(): an empty source empties the destination."""
        h = Harness(clock, keys(10), policy=SyncPolicy.hourly(guard=MassRemovalGuard.disabled()))
        h.run_now()

        run = h.run_next([])

        assert (RunStatus.SUCCEEDED, 10) == (run.status, run.removed)
        assert set() == h.audience() == h.delivered()

    def test_a_source_that_raises_midway_changes_nothing(self, clock: FakeClock) -> None:
        """The source fails after yielding some keys: run failed, nothing sent or removed."""

        class Broken:
            fail = False

            def members(self) -> Iterator[str]:
                yield from keys(3)
                if self.fail:
                    raise ConnectionError("warehouse went away")
                yield from keys(7, start=3)

        source = Broken()
        h = Harness(
            clock, source=source, policy=SyncPolicy.hourly(guard=MassRemovalGuard.disabled())
        )
        h.run_now()
        sent_before = len(h.recording.batches)
        source.fail = True

        run = h.run_next()

        assert (RunStatus.FAILED, "SourceError", 0, 0) == (
            run.status,
            run.error_type,
            run.added,
            run.removed,
        )
        assert run.error_message is not None
        assert "ConnectionError" in run.error_message
        assert sent_before == len(h.recording.batches)
        assert set(keys(10)) == h.audience() == h.delivered()


# --- Deleting a sync ------------------------------------------------------------------


class TestOnDelete:
    """
    Deleting a sync leaves the destination alone, or removes exactly what the sync delivered.
    """

    def test_leave_keeps_the_audience(self, clock: FakeClock) -> None:
        """OnDelete.LEAVE: nothing is sent, the sync is deleted at once."""
        h = Harness(clock, keys(5), policy=SyncPolicy.hourly(on_delete=OnDelete.LEAVE))
        h.run_now()
        sent_before = len(h.recording.batches)

        h.scheduler.delete_sync(SYNC)
        clock.advance(timedelta(days=1))

        assert [] == h.scheduler.run_due()
        assert SyncStatus.DELETED == h.scheduler.get_sync(SYNC).status
        assert sent_before == len(h.recording.batches)
        assert set(keys(5)) == h.audience()

    def test_remove_delivered_removes_only_this_syncs_members(self, clock: FakeClock) -> None:
        """Two syncs share a destination and members: deleting one removes only what it sent."""
        dest = FaultyDestination(
            Capabilities(max_batch_size=3), always=Fault.reject(identifiers={"m0002"})
        )
        h = Harness(
            clock,
            keys(6),
            destination=dest,
            policy=SyncPolicy.hourly(on_delete=OnDelete.REMOVE_DELIVERED),
        )
        h.scheduler.add_cohort(Cohort(id="other", name="Other", source=lambda: keys(6, start=3)))
        h.scheduler.create_sync("other", "dest", SyncPolicy.hourly(), sync_id="s2")
        h.scheduler.run_due()
        assert {"m0000", "m0001", "m0003", "m0004", "m0005"} == h.audience()
        assert {"m0003", "m0004", "m0005", "m0006", "m0007", "m0008"} == h.audience("s2")
        sent_before = len(dest.batches)

        clock.advance(1)
        h.scheduler.delete_sync(SYNC)
        teardown = h.run_now()

        removals = dest.batches[sent_before:]
        assert (Trigger.TEARDOWN, RunStatus.SUCCEEDED, 5) == (
            teardown.trigger,
            teardown.status,
            teardown.removed,
        )
        assert {Operation.REMOVE} == set(operations(removals))
        assert {SYNC} == {b.sync_id for b in removals}
        assert ["m0000", "m0001", "m0003", "m0004", "m0005"] == sent(removals, Operation.REMOVE)
        assert set() == h.audience() == h.delivered()
        assert set(keys(6, start=3)) == h.audience("s2") == h.delivered("s2")
        assert SyncStatus.DELETED == h.scheduler.get_sync(SYNC).status
        assert None is h.scheduler.next_run(SYNC)

    def test_a_failed_teardown_is_retried_as_a_teardown(self, clock: FakeClock) -> None:
        """The removal run fails: it is retried later as a removal, never as a normal run."""
        dest = FaultyDestination(SMALL, script={1: Fault.permanent()})
        h = Harness(
            clock, keys(3), destination=dest, policy=SyncPolicy.hourly(on_delete="remove_delivered")
        )
        h.run_now()
        clock.advance(1)
        h.scheduler.delete_sync(SYNC)

        failed = h.run_now()
        retried = h.run_next()

        assert (Trigger.TEARDOWN, RunStatus.FAILED) == (failed.trigger, failed.status)
        assert (Trigger.TEARDOWN, RunStatus.SUCCEEDED, 3) == (
            retried.trigger,
            retried.status,
            retried.removed,
        )
        assert SyncStatus.DELETED == h.scheduler.get_sync(SYNC).status
        assert set() == h.audience() == h.delivered()

    def test_a_teardown_paused_for_authentication_resumes_as_a_teardown(
        self, clock: FakeClock
    ) -> None:
        """A 401 during the removal run pauses it; resuming removes, it does not deliver again."""
        dest = FaultyDestination(SMALL, script={1: Fault.auth()})
        h = Harness(
            clock, keys(3), destination=dest, policy=SyncPolicy.hourly(on_delete="remove_delivered")
        )
        h.run_now()
        clock.advance(1)
        h.scheduler.delete_sync(SYNC)
        paused = h.run_now()
        assert SyncStatus.PAUSED == h.scheduler.get_sync(SYNC).status
        clock.advance(1)

        h.scheduler.resume_sync(SYNC)
        resumed = h.run_now()

        assert (Trigger.TEARDOWN, RunStatus.FAILED) == (paused.trigger, paused.status)
        assert (Trigger.TEARDOWN, 3) == (resumed.trigger, resumed.removed)
        assert SyncStatus.DELETED == h.scheduler.get_sync(SYNC).status
        assert set() == h.audience() == h.delivered()

    def test_a_teardown_that_keeps_failing_fails_the_sync(self, clock: FakeClock) -> None:
        """Removals refused five times: the sync is failed with the reason, not left running."""
        dest = FaultyDestination(SMALL, script={n: Fault.permanent() for n in range(1, 10)})
        h = Harness(
            clock, keys(3), destination=dest, policy=SyncPolicy.hourly(on_delete="remove_delivered")
        )
        h.run_now()
        clock.advance(1)
        h.scheduler.delete_sync(SYNC)

        runs = [h.run_now()] + [h.run_next() for _ in range(4)]

        assert [Trigger.TEARDOWN] * 5 == [r.trigger for r in runs]
        assert [RunStatus.FAILED] * 5 == [r.status for r in runs]
        sync = h.scheduler.get_sync(SYNC)
        assert SyncStatus.FAILED == sync.status
        assert sync.status_reason is not None
        assert sync.status_reason.startswith("removing the delivered members failed 5 times")
        assert None is h.scheduler.next_run(SYNC)
        assert set(keys(3)) == h.audience() == h.delivered()


class TestHostRequestedRuns:
    """
    Runs the host asks for never collide with a run recorded at the same instant.
    """

    def test_sync_now_at_the_instant_of_the_last_run(self, clock: FakeClock) -> None:
        """With the clock unmoved since the last run, "sync now" runs at once, in the next slot."""
        h = Harness(clock, keys(3))
        first = h.run_now()

        h.scheduler.sync_now(SYNC, full=True)

        (manual,) = h.scheduler.run_due()
        assert (Trigger.MANUAL, first.slot + timedelta(microseconds=1), 3) == (
            manual.trigger,
            manual.slot,
            manual.added,
        )
        assert [manual, first] == h.scheduler.history(SYNC)

    @pytest.mark.parametrize("action", ["update", "sync_now", "resume", "full_resync"])
    def test_every_host_call_at_the_instant_of_the_last_run(
        self, clock: FakeClock, action: str
    ) -> None:
        """update, sync now, resume and full resync share one "due now": no call wedges the sync."""
        h = Harness(clock, keys(3))
        first = h.run_now()
        if action == "update":
            h.scheduler.update_sync(SYNC, SyncPolicy.hourly(rejection_attempts=4))
        elif action == "sync_now":
            h.scheduler.sync_now(SYNC)
        elif action == "resume":
            h.scheduler.pause_sync(SYNC)
            h.scheduler.resume_sync(SYNC)
        else:
            h.scheduler.request_full_resync(SYNC)

        (again,) = h.scheduler.run_due()
        clock.advance(timedelta(hours=2))
        later = h.scheduler.run_due()

        assert first.slot < again.slot
        assert 1 == len(later)
        assert 3 == len(h.scheduler.history(SYNC))


# --- Full resends ----------------------------------------------------------------------


class TestFullResend:
    """
    Expiring memberships are refreshed in time; a host can ask for a full resync.
    """

    def test_memberships_with_a_ttl_are_resent_before_they_expire(self, clock: FakeClock) -> None:
        """A 30-day TTL: every member is re-added once within the 30 days, before expiry."""
        dest = RecordingDestination(
            Capabilities(membership_ttl=timedelta(days=30), max_batch_size=100)
        )
        h = Harness(clock, keys(20), destination=dest, policy=SyncPolicy.daily())
        h.run_now()

        runs = []
        while clock.now() < START + timedelta(days=30):
            runs.append(h.run_next())

        refreshes = [r for r in runs if "ttl_refresh" in r.notes]
        assert 1 == len(refreshes)
        (refresh,) = refreshes
        assert refresh.started_at - START < timedelta(days=30)
        assert (20, True) == (refresh.added, refresh.full_sync)
        assert keys(20) == sent(h.batches(refresh), Operation.ADD)
        assert 0 == sum(r.batches for r in runs if r is not refresh)

    def test_a_requested_full_resync_resends_everything_once(self, clock: FakeClock) -> None:
        """request_full_resync: the next run re-adds every member; the one after only changes."""
        h = Harness(clock, keys(5))
        h.run_now()
        clock.advance(1)

        h.scheduler.request_full_resync(SYNC)
        full = h.run_now()
        after = h.run_next()

        assert (Trigger.MANUAL, True, ("full_resync",), 5) == (
            full.trigger,
            full.full_sync,
            full.notes,
            full.added,
        )
        assert keys(5) == sent(h.batches(full), Operation.ADD)
        assert (False, 0) == (after.full_sync, after.batches)


# --- Identifier mapping -------------------------------------------------------------------


class TestIdentifierMapping:
    """
    Members are sent under the identifier their mapping resolves, by priority.
    """

    def test_priority_fallback_skips_and_removal_identifiers(self, clock: FakeClock) -> None:
        """Email first, phone second, skip the rest; removals use the identifier delivered."""
        emails = {"u1": " U1@Example.com", "u2": "u2@example.com"}
        phones = {"u2": "+44 20 7946 0000", "u3": "+1 415 555 0100"}
        mapping = IdentifierMapping(
            [(IdentifierKind.EMAIL, emails.get), (IdentifierKind.PHONE, phones.get)]
        )
        dest = RecordingDestination(
            Capabilities(accepted_identifiers={IdentifierKind.EMAIL, IdentifierKind.PHONE})
        )
        h = Harness(clock, ["u1", "u2", "u3", "u4"], destination=dest, mapping=mapping)

        run = h.run_now()

        # A run that skipped a member is never plain `succeeded`.
        assert (RunStatus.PARTIAL, 3, 1) == (run.status, run.added, run.skipped)
        assert {"u1@example.com", "u2@example.com", "+14155550100"} == h.audience()
        assert {"u1", "u2", "u3"} == h.delivered()
        issues = h.storage.run_issues(run.id)
        assert [("u4", IssueKind.SKIPPED, "unresolved_mapping")] == [
            (i.key, i.kind, i.reason) for i in issues
        ]

        emails["u1"] = "changed@example.com"
        left = h.run_next(["u2", "u3", "u4"])

        assert [["u1@example.com"]] == [list(b.identifiers) for b in h.batches(left)]
        assert (1, 1) == (left.removed, left.skipped)
        assert {"u2@example.com", "+14155550100"} == h.audience()


# --- Change feeds -----------------------------------------------------------------------


class FeedSource:
    """
    A source with a change feed: a log of changes, the cursor an index into it.
    ``sneak()`` changes the members without logging (a change the feed missed).
    """

    def __init__(self, members: Iterable[str]) -> None:
        self.keys = set(members)
        self.log: list[tuple[frozenset[str], frozenset[str]]] = []
        self.member_reads = 0
        self.feed_reads = 0

    def members(self) -> Iterable[str]:
        self.member_reads += 1
        return sorted(self.keys)

    def cursor(self) -> str:
        return str(len(self.log))

    def changes_since(self, cursor: str) -> Changes:
        self.feed_reads += 1
        added: set[str] = set()
        removed: set[str] = set()
        for entered, left in self.log[int(cursor) :]:
            for key in entered:
                if key in removed:
                    removed.discard(key)
                else:
                    added.add(key)
            for key in left:
                if key in added:
                    added.discard(key)
                else:
                    removed.add(key)
        return Changes(tuple(added), tuple(removed), self.cursor())

    def change(self, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        entered, left = frozenset(add), frozenset(remove)
        self.keys |= entered
        self.keys -= left
        self.log.append((entered, left))

    def sneak(self, add: Iterable[str] = ()) -> None:
        self.keys |= set(add)


class TestChangeFeed:
    """
    Real-time syncs with a change feed deliver O(changes) a minute and reconcile hourly.
    """

    def test_minute_runs_read_the_feed_not_the_snapshot(self, clock: FakeClock) -> None:
        """After the first full run, minute runs call changes_since only and send the changes."""
        source = FeedSource(keys(10))
        h = Harness(clock, source=source, policy=SyncPolicy.realtime())
        first = h.run_now()
        assert (1, 0, 10) == (source.member_reads, source.feed_reads, first.added)

        runs = []
        for minute in range(1, 6):
            source.change(add=[f"new{minute}"], remove=[f"m{minute:04d}"])
            runs.append(h.run_next())

        assert (1, 5) == (source.member_reads, source.feed_reads)
        assert [(1, 1)] * 5 == [(r.added, r.removed) for r in runs]
        assert [2] * 5 == [r.batches for r in runs]
        assert [Trigger.REALTIME] * 5 == [r.trigger for r in runs]
        assert source.keys == h.audience() == h.delivered()
        quiet = h.run_next()
        assert (0, 1) == (quiet.batches, source.member_reads)

    def test_the_top_of_the_hour_reconciles_the_full_snapshot(self, clock: FakeClock) -> None:
        """A change the feed missed is delivered by the hourly full-snapshot run."""
        source = FeedSource(keys(10))
        h = Harness(clock, source=source, policy=SyncPolicy.realtime())
        h.run_now()
        source.sneak(add=["missed"])
        h.run_next()
        assert "missed" not in h.audience()
        clock.set(START + timedelta(minutes=59, seconds=30))
        h.run_next()  # one catch-up run for the minutes in between, from the feed
        assert 1 == source.member_reads

        reconcile = h.run_next()

        assert START + timedelta(hours=1) == reconcile.slot
        assert (2, 1) == (source.member_reads, reconcile.added)
        assert source.keys == h.audience() == h.delivered()
        h.run_next()
        assert 2 == source.member_reads

    def test_guarded_feed_removals_are_sent_once_confirmed(self, clock: FakeClock) -> None:
        """A feed run removing most of a large audience is held until confirmed, then sent."""
        source = FeedSource(keys(2_000))
        h = Harness(
            clock, source=source, policy=SyncPolicy.realtime(), destination=RecordingDestination()
        )
        h.run_now()
        source.change(remove=keys(1_500))

        guarded = h.run_next()
        still = h.run_next()

        assert (RunStatus.GUARDED, RunStatus.GUARDED) == (guarded.status, still.status)
        assert (1, 2) == (source.member_reads, source.feed_reads)
        assert 2_000 == len(h.audience())
        clock.advance(1)
        h.scheduler.confirm_removals(SYNC)
        confirmed = h.run_now()
        assert (RunStatus.SUCCEEDED, 1_500) == (confirmed.status, confirmed.removed)
        assert source.keys == h.audience() == h.delivered()

    def test_a_failed_feed_run_reads_the_same_window_again(self, clock: FakeClock) -> None:
        """The cursor advances only with a run that delivered everything."""
        source = FeedSource(keys(3))
        dest = FaultyDestination(SMALL, script={1: Fault.permanent()})
        h = Harness(clock, source=source, policy=SyncPolicy.realtime(), destination=dest)
        h.run_now()
        source.change(add=["late"])

        failed = h.run_next()
        retried = h.run_next()

        assert (RunStatus.FAILED, RunStatus.SUCCEEDED, 1) == (
            failed.status,
            retried.status,
            retried.added,
        )
        assert source.keys == h.audience() == h.delivered()


# --- Sorted sources and bad input -----------------------------------------------------------


class TestSortedSource:
    """
    Sources that promise sorted keys are merge-diffed, and held to the promise.
    """

    def test_a_sorted_source_delivers_like_any_other(self, clock: FakeClock) -> None:
        """A sorted source gives the same batches as an unsorted one."""
        source = _Sorted(keys(10))
        plain = Harness(clock, keys(10))
        merged = Harness(FakeClock(START), source=source)
        plain.run_now()
        merged.run_now()
        plain.run_next(keys(10, start=4))
        source.keys = keys(10, start=4)
        merged.run_next()

        assert [(b.operation, b.keys) for b in plain.recording.batches] == [
            (b.operation, b.keys) for b in merged.recording.batches
        ]

    def test_a_source_that_breaks_its_sorted_promise_fails_the_run(self, clock: FakeClock) -> None:
        """Out-of-order keys from a sorted source: run failed with SourceError, nothing sent."""
        h = Harness(clock, source=_Sorted(["b", "c", "a"]))

        run = h.run_now()

        assert (RunStatus.FAILED, "SourceError", 0) == (run.status, run.error_type, run.batches)
        assert [] == h.recording.batches
        assert set() == h.delivered()


class _Sorted:
    sorted_keys = True

    def __init__(self, members: list[str]) -> None:
        self.keys = members

    def members(self) -> Iterable[str]:
        return iter(self.keys)


class _Ghost(RecordingDestination):
    """
    Accepts everything and also "rejects" an identifier it was never sent.
    """

    def _handle(self, batch: Batch) -> DeliveryResult:
        super()._handle(batch)
        return DeliveryResult.partial([Rejection("ghost", "no such user")])


class _Broken(Destination):
    """
    Returns something that is not a DeliveryResult.
    """

    capabilities = Capabilities(name="broken")

    def add(self, batch: Batch) -> DeliveryResult:
        return cast("DeliveryResult", {"ok": True})

    def remove(self, batch: Batch) -> DeliveryResult:
        return DeliveryResult.ok()


class TestBadInput:
    """
    Unusable keys are skipped and recorded; a misbehaving destination cannot corrupt the state.
    """

    @pytest.mark.parametrize("unhashable", [False, True])
    def test_invalid_keys_are_skipped_and_recorded(
        self, clock: FakeClock, unhashable: bool
    ) -> None:
        """None, ints, '', 2,000-char and unhashable keys are skipped; valid members sent once."""
        huge = "x" * 2_000
        bad: list[object] = [None, 7, "", huge]
        if unhashable:
            bad.append(["a", "list"])
        h = Harness(clock, ["m1", *bad, "m2", "m1", "m2"])

        run = h.run_now()

        assert (RunStatus.PARTIAL, 2, len(bad)) == (run.status, run.added, run.skipped)
        assert "invalid_keys" in run.notes
        assert {"m1", "m2"} == h.audience() == h.delivered()
        reasons = {i.reason for i in h.storage.run_issues(run.id)}
        expected = {
            "invalid_key: not a str (NoneType)",
            "invalid_key: not a str (int)",
            "invalid_key: empty",
            "invalid_key: longer than 1024 characters",
        }
        if unhashable:
            expected.add("invalid_key: not a str (list)")
        assert expected == reasons
        shown = {i.key for i in h.storage.run_issues(run.id)}
        assert huge not in shown
        assert all(len(key) <= 100 for key in shown)
        again = h.run_next()
        assert (0, 0, len(bad)) == (again.added, again.removed, again.skipped)

    def test_rejections_for_members_not_sent_are_ignored(self, clock: FakeClock) -> None:
        """A rejection of an identifier that was not in the batch changes nothing and is noted."""
        h = Harness(clock, keys(3), destination=_Ghost(Capabilities(max_batch_size=3)))

        run = h.run_now()

        assert (RunStatus.SUCCEEDED, 3, 0) == (run.status, run.added, run.rejected)
        assert ("rejections_for_unsent_members",) == run.notes
        assert set(keys(3)) == h.audience() == h.delivered()
        assert [] == h.scheduler.ledger(SYNC)

    def test_a_result_that_is_not_a_delivery_result_fails_the_run(self, clock: FakeClock) -> None:
        """add() returning a dict: run failed with PermanentError, nothing recorded as delivered."""
        h = Harness(clock, keys(3), destination=_Broken())

        run = h.run_now()

        assert (RunStatus.FAILED, "PermanentError") == (run.status, run.error_type)
        assert run.error_message is not None
        assert "not DeliveryResult" in run.error_message
        assert set() == h.delivered()
        assert SyncStatus.ACTIVE == h.scheduler.get_sync(SYNC).status


# --- Pacing ----------------------------------------------------------------------------


class _Slow(Destination):
    """
    Counts calls in flight. Each call waits (up to 50 ms of real time) for
    three calls to be in flight, then takes 5 ms: if the engine allowed more
    than three at once, the count would show it, however loaded the machine.
    """

    capabilities = Capabilities(max_batch_size=2, max_parallel=3)

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.in_flight = 0
        self.peak = 0
        self.received: list[str] = []

    def add(self, batch: Batch) -> DeliveryResult:
        with self.cond:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.in_flight >= 3, timeout=0.05)
        time.sleep(0.005)
        with self.cond:
            self.in_flight -= 1
            self.received.extend(batch.keys)
        return DeliveryResult.ok()

    def remove(self, batch: Batch) -> DeliveryResult:
        return self.add(batch)


class TestPacing:
    """
    Requests stay within the destination's parallelism and rate limit.
    """

    def test_at_most_max_parallel_requests_in_flight(self, clock: FakeClock) -> None:
        """max_parallel=3: three calls at a time at most, and every batch is applied."""
        dest = _Slow()
        h = Harness(clock, keys(40), destination=dest)

        run = h.run_now()

        assert 3 == dest.peak
        assert (RunStatus.SUCCEEDED, 20, 40) == (run.status, run.batches, run.added)
        assert keys(40) == sorted(dest.received)
        assert set(keys(40)) == h.delivered()

    def test_the_rate_limit_is_shared_by_every_sync_to_the_destination(
        self, clock: FakeClock
    ) -> None:
        """Two syncs, 2 requests/s: six requests, never more than two in any second."""
        dest = RecordingDestination(
            Capabilities(max_batch_size=2, rate_limit=RateLimit(requests=2, per_seconds=1))
        )
        h = Harness(clock, keys(6), destination=dest)
        h.scheduler.add_cohort(Cohort(id="other", name="Other", source=lambda: keys(6, prefix="o")))
        h.scheduler.create_sync("other", "dest", SyncPolicy.hourly(), sync_id="s2")

        runs = h.scheduler.run_due()

        assert [3, 3] == [r.batches for r in runs]
        assert [1.0, 1.0] == clock.slept
        assert START + timedelta(seconds=2) == clock.now()

    def test_the_rate_limit_is_shared_by_every_scheduler_in_the_process(
        self, clock: FakeClock
    ) -> None:
        """Two Scheduler objects (two workers of one process) share one limit by default."""
        _run_two_workers(clock, [PROCESS_RATE_LIMITS, PROCESS_RATE_LIMITS])

        # Two requests from each worker, two a second together: the second
        # worker waits out the first one's second.
        assert [1.0] == clock.slept
        assert START + timedelta(seconds=1) == clock.now()


def _run_two_workers(clock: FakeClock, registries: list[RateLimits]) -> list[Scheduler]:
    """
    Two schedulers on one clock, each sending two requests to its own
    2-requests-a-second destination "dest", one after the other.
    """
    limit = RateLimit(requests=2, per_seconds=1)
    workers = []
    for n, registry in enumerate(registries):
        scheduler = Scheduler(MemoryStorage(), clock=clock, seed=0, rate_limits=registry)
        dest = RecordingDestination(Capabilities(max_batch_size=2, rate_limit=limit))
        scheduler.add_destination("dest", dest)
        members = keys(4, prefix=f"w{n}")
        scheduler.add_cohort(Cohort(id="c", name="C", source=lambda m=members: m))
        scheduler.create_sync("c", "dest", SyncPolicy.hourly(), sync_id="s")
        workers.append(scheduler)
    for scheduler in workers:
        assert [2] == [run.batches for run in scheduler.run_due()]
    return workers


class TestRateLimitRegistry:
    """Schedulers share a destination's limit exactly when they share a RateLimits registry."""

    def test_schedulers_sharing_a_registry_share_the_limit(self, clock: FakeClock) -> None:
        """Four requests through one registry at 2/s take a second."""
        registry = RateLimits()

        _run_two_workers(clock, [registry, registry])

        assert [1.0] == clock.slept

    def test_schedulers_with_their_own_registries_do_not(self, clock: FakeClock) -> None:
        """Each registry has its own limiter: neither worker waits for the other."""
        _run_two_workers(clock, [RateLimits(), RateLimits()])

        assert [] == clock.slept
        assert START == clock.now()

    def test_the_default_is_the_process_registry(self) -> None:
        """A scheduler given no registry uses the documented process-wide one."""
        assert PROCESS_RATE_LIMITS is Scheduler(MemoryStorage()).rate_limits

    def test_a_registry_holds_limiters_only_while_a_scheduler_uses_them(
        self, clock: FakeClock
    ) -> None:
        """A long-lived registry does not grow with every scheduler ever built."""
        registry = RateLimits()
        workers = _run_two_workers(clock, [registry, registry])
        assert "RateLimits(limiters=1)" == repr(registry)

        del workers
        gc.collect()

        assert "RateLimits(limiters=0)" == repr(registry)

    def test_anything_else_is_refused(self) -> None:
        """rate_limits= takes a RateLimits, not the limit itself."""
        with pytest.raises(ConfigurationError) as info:
            Scheduler(MemoryStorage(), rate_limits=RateLimit(2, 1.0))  # type: ignore[arg-type]

        assert "rate_limits" == info.value.field


# --- History, events, logs ---------------------------------------------------------------------


class TestHistoryAndEvents:
    """
    Every run is recorded truthfully, events reach listeners, logs carry no member keys.
    """

    def test_a_run_with_rejections_is_partial(self, clock: FakeClock) -> None:
        """One rejected member out of ten: partial, never succeeded."""
        dest = FaultyDestination(SMALL, script={2: Fault.reject(identifiers={"m0007"})})
        h = Harness(clock, keys(10), destination=dest)

        run = h.run_now()

        assert (RunStatus.PARTIAL, 9, 1, None) == (
            run.status,
            run.added,
            run.rejected,
            run.error_type,
        )
        assert [run] == h.scheduler.history(SYNC)

    def test_events_reach_listeners(self, clock: FakeClock) -> None:
        """Run started and finished, batch delivered, guard, eligibility and sync-failed events."""
        events: list[Event] = []
        dest = FaultyDestination(SMALL, script={3: Fault.auth()})
        h = Harness(
            clock,
            keys(5),
            destination=dest,
            policy=SyncPolicy.realtime(),
            listeners=[events.append],
        )
        first = h.run_now()  # 2 batches
        h.run_next([])  # guarded
        h.set_cohort_type(CohortType.FUNNEL)
        h.run_next(keys(6))  # falls back to hourly; one add batch
        h.run_next(keys(7))  # 401: paused

        kinds = {type(e) for e in events}
        assert {
            RunStarted,
            RunPlanned,
            BatchDelivered,
            RunFinished,
            GuardTripped,
            EligibilityChanged,
            SyncFailed,
        } == kinds
        assert 4 == sum(isinstance(e, RunStarted) for e in events)
        assert 4 == sum(isinstance(e, RunFinished) for e in events)
        delivered = [e for e in events if isinstance(e, BatchDelivered)]
        assert [3, 2, 1] == [e.size for e in delivered]
        assert {first.id} == {e.run_id for e in delivered[:2]}
        (changed,) = [e for e in events if isinstance(e, EligibilityChanged)]
        assert (False, ("realtime_cohort_type",), Cadence.HOURLY) == (
            changed.eligible,
            changed.codes,
            changed.cadence,
        )
        assert [e.run for e in events if isinstance(e, RunFinished)][::-1] == h.scheduler.history(
            SYNC
        )

    def test_a_listener_that_raises_does_not_break_the_run(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A failing listener is logged; the run and other listeners carry on."""
        seen: list[Event] = []

        def broken(event: Event) -> None:
            raise RuntimeError("listener bug")

        h = Harness(clock, keys(5), listeners=[broken, seen.append])

        run = h.run_now()

        assert (RunStatus.SUCCEEDED, 5) == (run.status, run.added)
        assert 5 == len(seen)  # started, planned, 2 batches, finished
        assert "event listener" in caplog.text

    def test_info_logs_never_contain_member_keys(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Retries, rate limits, rejections, skips, the guard and failures log no member key."""
        caplog.set_level(logging.INFO, logger="cohortsync")
        members = [f"member-XYZ-{i:03d}" for i in range(12)]
        script = {
            0: Fault.server_error(),
            1: Fault.rate_limited(retry_after=3),
            2: Fault.reject(identifiers={members[1]}),
            3: Fault.bad_data({members[4]}),
            6: Fault.permanent(),
        }
        dest = FaultyDestination(Capabilities(max_batch_size=4), script=script)
        h = Harness(clock, [*members, "", None], destination=dest)

        h.run_now()
        h.run_next([])
        h.run_next(members[:2])

        assert "member-XYZ" not in caplog.text
        assert any(r.levelno == logging.INFO for r in caplog.records)


# --- Eligibility re-checked at every run ----------------------------------------------------


def _hour_offset(instant: datetime) -> int:
    return instant.minute * 60 + instant.second


class TestEligibilityRecheck:
    """
    A real-time sync that stops being eligible falls back to hourly (or pauses) and comes back.
    """

    def test_falls_back_to_hourly_and_comes_back(self, clock: FakeClock) -> None:
        """A real-time sync whose cohort becomes a funnel runs hourly on one slot, then returns."""
        h = Harness(clock, keys(3), policy=SyncPolicy.realtime())
        h.run_now()
        h.set_cohort_type(CohortType.FUNNEL)

        fallback = h.run_next(keys(4))

        assert ("realtime_cohort_type", "fallback_hourly") == fallback.notes
        assert (RunStatus.SUCCEEDED, 1) == (fallback.status, fallback.added)
        sync = h.scheduler.get_sync(SYNC)
        assert ("hourly", "realtime") == (sync.cadence.value, sync.policy.cadence.value)
        due = h.scheduler.next_run(SYNC)
        assert due is not None
        assert stable_offset(SYNC, 3600) == _hour_offset(due)
        assert timedelta(0) < due - clock.now() <= timedelta(hours=1)
        hourly = h.run_next(keys(5))
        assert (Trigger.SCHEDULED, "hourly", 1) == (
            hourly.trigger,
            hourly.cadence.value,
            hourly.added,
        )
        assert ("realtime_cohort_type", "fallback_hourly") == hourly.notes
        due = h.scheduler.next_run(SYNC)
        assert due is not None
        assert stable_offset(SYNC, 3600) == _hour_offset(due)

        h.set_cohort_type(CohortType.BEHAVIORAL)
        back = h.run_next()

        assert ("eligible_again",) == back.notes
        assert None is h.scheduler.get_sync(SYNC).effective_cadence
        due = h.scheduler.next_run(SYNC)
        assert due is not None
        assert (0, 0) == (due.second, due.microsecond)
        assert timedelta(0) < due - clock.now() <= timedelta(minutes=1)

    @pytest.mark.parametrize(
        "policy",
        [SyncPolicy.cron("*/5 * * * *"), SyncPolicy.every(timedelta(minutes=10))],
        ids=["cron", "every"],
    )
    def test_a_sub_hourly_sync_falls_back_too(self, clock: FakeClock, policy: SyncPolicy) -> None:
        """A sync more often than hourly whose cohort becomes a funnel runs hourly, then returns."""
        h = Harness(clock, keys(3), policy=policy)
        h.run_now()
        h.set_cohort_type(CohortType.FUNNEL)

        fallback = h.run_next(keys(4))

        assert ("sub_hourly_cohort_type", "fallback_hourly") == fallback.notes
        sync = h.scheduler.get_sync(SYNC)
        assert ("hourly", policy.cadence.value) == (sync.cadence.value, sync.policy.cadence.value)
        due = h.scheduler.next_run(SYNC)
        assert due is not None
        assert stable_offset(SYNC, 3600) == _hour_offset(due)

        h.set_cohort_type(CohortType.BEHAVIORAL)
        back = h.run_next()

        assert ("eligible_again",) == back.notes
        due = h.scheduler.next_run(SYNC)
        assert due is not None
        assert timedelta(0) < due - clock.now() <= (policy.period or timedelta(minutes=5))

    def test_a_fallback_holds_even_when_the_delivery_fails(self, clock: FakeClock) -> None:
        """The eligibility change is kept by the run that found it, whatever the delivery did."""
        dest = FaultyDestination(SMALL, script={1: Fault.permanent()})
        h = Harness(clock, keys(3), destination=dest, policy=SyncPolicy.realtime())
        h.run_now()
        h.set_cohort_type(CohortType.FUNNEL)

        failed = h.run_next(keys(4))

        assert RunStatus.FAILED == failed.status
        assert "fallback_hourly" in failed.notes
        sync = h.scheduler.get_sync(SYNC)
        assert "hourly" == sync.cadence.value

    def test_pause_policy_pauses_and_skips(self, clock: FakeClock) -> None:
        """on_ineligible=PAUSE: the run is skipped, nothing sent, the sync paused with a reason."""
        h = Harness(clock, keys(3), policy=SyncPolicy.realtime(on_ineligible=OnIneligible.PAUSE))
        h.run_now()
        h.set_cohort_type(CohortType.RETENTION)

        run = h.run_next(keys(4))

        assert (RunStatus.SKIPPED, 0, ("realtime_cohort_type",)) == (
            run.status,
            run.batches,
            run.notes,
        )
        sync = h.scheduler.get_sync(SYNC)
        assert SyncStatus.PAUSED == sync.status
        assert sync.status_reason is not None
        assert sync.status_reason.startswith("ineligible:")
        assert set(keys(3)) == h.audience()

    @pytest.mark.reliability
    def test_the_real_size_limit_of_one_million(self, clock: FakeClock) -> None:
        """1,000,001 measured members: hourly fallback; 1,000,000: real-time again."""
        # Delivering a million members to a fake takes longer than a unit test
        # should; the destination refuses those batches, which the previous
        # test shows does not change the outcome of the re-check.
        dest = FaultyDestination(SMALL, script={n: Fault.permanent() for n in range(1, 3)})
        h = Harness(clock, keys(3), destination=dest, policy=SyncPolicy.realtime())
        h.run_now()

        grown = h.run_next(_million_and_one())

        assert ("realtime_size_limit", "fallback_hourly") == grown.notes
        due = h.scheduler.next_run(SYNC)
        assert due is not None
        assert stable_offset(SYNC, 3600) == _hour_offset(due)
        shrunk = h.run_next(_million_and_one()[:-1])
        assert ("eligible_again",) == shrunk.notes
        assert None is h.scheduler.get_sync(SYNC).effective_cadence

    @pytest.mark.reliability
    def test_the_real_size_limit_with_the_pause_policy(self, clock: FakeClock) -> None:
        """1,000,001 measured members and on_ineligible=PAUSE: skipped and paused."""
        h = Harness(clock, keys(3), policy=SyncPolicy.realtime(on_ineligible=OnIneligible.PAUSE))
        h.run_now()

        skipped = h.run_next(_million_and_one())

        assert (RunStatus.SKIPPED, ("realtime_size_limit",)) == (skipped.status, skipped.notes)
        assert SyncStatus.PAUSED == h.scheduler.get_sync(SYNC).status
        assert set(keys(3)) == h.audience()


@functools.cache
def _million_and_one() -> list[str]:
    """
    One member more than real-time syncs allow, as short keys.
    """
    return [f"{i:x}" for i in range(1_000_001)]
