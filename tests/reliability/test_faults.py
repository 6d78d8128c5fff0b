"""
Destination faults over a real loopback HTTP connection: a WebhookDestination
posting to a receiver (``http.server`` in a thread) that answers slowly past
the client's timeout, hangs, answers 503, 429 with ``Retry-After``, 401, or
200 with per-member rejections, or silently drops what it was sent.

The receiver counts every fault it injects; the tests compare those counts
with what the run history says, and the audience the receiver holds with the
cohort.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import pytest
from reliability_harness import RETRY_AFTER, T0, AudienceServer, Figures, Plan, serving

import cohortsync as cs
from cohortsync.destinations import WebhookDestination
from cohortsync.testing import FakeClock, MemoryStorage

pytestmark = pytest.mark.reliability

TIMEOUT = 0.75
"""The client's timeout (real seconds): slow and hanging answers cost this much each."""
POPULATION = [f"user-{i:04d}" for i in range(400)]
COHORT = "faulty"
SYNC = "faulty-sync"


class World:
    """
    One hourly sync to a webhook, a cohort that changes every hour, a fake clock.
    """

    def __init__(self, server: AudienceServer, *, retry: cs.RetryPolicy | None = None) -> None:
        self.server = server
        self.clock = FakeClock(T0)
        self.rng = random.Random(7)
        self.members = set(self.rng.sample(POPULATION, 300))
        self.scheduler = cs.Scheduler(MemoryStorage(), clock=self.clock, seed=3)
        self.scheduler.add_cohort(cs.Cohort(id=COHORT, name="Faulty", source=self.source))
        self.scheduler.add_destination(
            "hook",
            WebhookDestination(
                server.url,
                headers={"Authorization": "Bearer t0ken"},
                timeout=TIMEOUT,
                batch_size=50,
            ),
        )
        policy = cs.SyncPolicy.hourly(retry=retry or cs.RetryPolicy())
        self.scheduler.create_sync(COHORT, "hook", policy, sync_id=SYNC)

    def source(self) -> list[str]:
        return sorted(self.members)

    def churn(self, share: float = 0.05) -> None:
        leaving = self.rng.sample(sorted(self.members), int(len(self.members) * share))
        joining = self.rng.sample(sorted(set(POPULATION) - self.members), len(leaving))
        self.members = (self.members - set(leaving)) | set(joining)

    def next_hour(self) -> list[cs.SyncRun]:
        self.clock.advance(timedelta(hours=1))
        return self.scheduler.run_due()

    @property
    def audience(self) -> set[str]:
        return self.server.audience(COHORT)

    @property
    def delivered(self) -> set[str]:
        return set(self.scheduler.storage.iter_delivered(SYNC))

    @property
    def status(self) -> cs.SyncStatus:
        return self.scheduler.get_sync(SYNC).status


@pytest.fixture
def plan() -> Plan:
    return Plan()


@pytest.fixture
def server(plan: Plan) -> Iterator[AudienceServer]:
    with serving(plan, slow_for=TIMEOUT * 3) as srv:
        yield srv


class TestFaultsOverManyRuns:
    """
    Under random faults the history accounts for every one, and the audience converges.
    """

    @pytest.mark.parametrize("seed", [1, 2])
    def test_history_tells_the_truth_and_the_audience_converges(
        self, plan: Plan, server: AudienceServer, seed: int, figures: Figures
    ) -> None:
        """Forty hourly runs under faults; then one clean run and a full resync converge."""
        plan.weights = {
            "slow": 0.02,
            "hang": 0.01,
            "503": 0.1,
            "429": 0.1,
            "reject": 0.1,
            "drop": 0.03,
        }
        plan.rng = random.Random(seed)
        plan.script = {25: "401", 70: "401"}
        world = World(server)
        runs: list[cs.SyncRun] = world.scheduler.run_due()
        paused_seen = 0
        for _ in range(40):
            if world.status is cs.SyncStatus.PAUSED:
                paused_seen += 1
                # Paused visibly: nothing runs until the host resumes it.
                assert [] == world.next_hour()
                assert "authentication failed" in (
                    world.scheduler.get_sync(SYNC).status_reason or ""
                )
                world.scheduler.resume_sync(SYNC)
            world.churn()
            runs += world.next_hour()
        injected = dict(server.injected)
        plan.stopped = True
        if world.status is cs.SyncStatus.PAUSED:
            world.scheduler.resume_sync(SYNC)
        runs += world.next_hour()
        cohort = set(world.members)

        # The history accounts for every injected fault.
        transient = injected.get("slow", 0) + injected.get("hang", 0) + injected.get("503", 0)
        assert transient == sum(r.retries for r in runs)
        assert injected.get("429", 0) == world.clock.slept.count(float(RETRY_AFTER))
        assert sum(server.rejected.values()) == sum(r.rejected for r in runs)
        auth_runs = [r for r in runs if r.error_type == "AuthenticationError"]
        assert injected.get("401", 0) == len(auth_runs) == paused_seen
        assert all(r.status in (cs.RunStatus.PARTIAL, cs.RunStatus.FAILED) for r in auth_runs)
        for run in runs:
            if run.error_type is None:
                expected = cs.RunStatus.PARTIAL if run.rejected else cs.RunStatus.SUCCEEDED
                assert expected == run.status
        assert {None, "AuthenticationError"} >= {r.error_type for r in runs}
        # Nothing the history can see is lost; what differs was silently dropped.
        assert cohort == world.delivered
        assert cohort ^ world.audience <= server.dropped
        assert [] == world.scheduler.ledger(SYNC)
        lost_before_resync = len(cohort ^ world.audience)

        world.scheduler.request_full_resync(SYNC)
        world.clock.advance(timedelta(minutes=1))
        resync = world.scheduler.run_due()

        assert [cs.RunStatus.SUCCEEDED] == [r.status for r in resync]
        assert cohort == world.audience
        slots = Counter(r.slot for r in world.scheduler.history(SYNC))
        assert {1} == set(slots.values())
        figures.record(
            "faults/webhook",
            trials=len(runs),
            faults=sum(injected.values()),
            duplicates=sum(n - 1 for n in slots.values()),
            losses=len(cohort ^ world.audience),
            silently_dropped_until_resync=lost_before_resync,
            **{f"injected_{k}": v for k, v in sorted(injected.items())},
        )


class TestAuthenticationFailure:
    """
    A 401 mid-run pauses the sync visibly, keeps what was acknowledged, and resumes cleanly.
    """

    def test_401_on_the_third_batch(self, plan: Plan, server: AudienceServer) -> None:
        """The run is partial, the sync paused with a reason, nothing runs until resumed."""
        plan.script = {2: "401"}
        world = World(server)

        (run,) = world.scheduler.run_due()

        assert cs.RunStatus.PARTIAL == run.status
        assert "AuthenticationError" == run.error_type
        assert 100 == run.added
        assert cs.SyncStatus.PAUSED == world.status
        assert None is world.scheduler.next_run(SYNC)
        assert world.audience == world.delivered
        assert 100 == len(world.delivered)
        assert "t0ken" not in (run.error_message or "")
        world.clock.advance(timedelta(hours=3))
        assert [] == world.scheduler.run_due()

        world.scheduler.resume_sync(SYNC)
        (resumed,) = world.scheduler.run_due()

        assert cs.RunStatus.SUCCEEDED == resumed.status
        assert set(world.members) == world.audience == world.delivered


class TestHangingDestination:
    """
    A receiver that never answers fails the run after its retries, with nothing applied.
    """

    def test_hang_exhausts_the_retries(self, plan: Plan, server: AudienceServer) -> None:
        """Every attempt times out: the run fails with TransientError and the sync stays active."""
        plan.always = "hang"
        world = World(server, retry=cs.RetryPolicy(max_retries=3))

        (run,) = world.scheduler.run_due()

        assert cs.RunStatus.FAILED == run.status
        assert "TransientError" == run.error_type
        assert 3 == run.retries
        assert 4 == server.injected["hang"]
        assert set() == world.delivered == world.audience
        assert cs.SyncStatus.ACTIVE == world.status

        plan.stopped = True
        (recovered,) = world.next_hour()

        assert cs.RunStatus.SUCCEEDED == recovered.status
        assert set(world.members) == world.audience == world.delivered


class TestSilentDrops:
    """
    A receiver that says 200 and keeps nothing fools the history; a full resync repairs adds.
    """

    def test_dropped_adds_are_invisible_until_a_full_resync(
        self, plan: Plan, server: AudienceServer
    ) -> None:
        """The run says succeeded; preview sees nothing to do; request_full_resync repairs it."""
        plan.script = {1: "drop"}
        world = World(server)

        (run,) = world.scheduler.run_due()

        assert cs.RunStatus.SUCCEEDED == run.status
        assert 300 == run.added
        assert 50 == len(set(world.members) - world.audience)
        assert 0 == world.scheduler.preview(SYNC).adds

        world.scheduler.request_full_resync(SYNC)
        world.clock.advance(timedelta(minutes=1))
        (resync,) = world.scheduler.run_due()

        assert resync.full_sync
        assert set(world.members) == world.audience

    def test_a_dropped_removal_is_not_repaired_by_a_full_resync(
        self, plan: Plan, server: AudienceServer
    ) -> None:
        """cohortsync cannot see what a receiver kept beyond what it sent: the member stays."""
        world = World(server)
        world.scheduler.run_due()
        gone = min(world.members)
        world.members.discard(gone)
        plan.script = {server.requests: "drop"}

        (run,) = world.next_hour()
        world.scheduler.request_full_resync(SYNC)
        world.clock.advance(timedelta(minutes=1))
        (resync,) = world.scheduler.run_due()

        assert (cs.RunStatus.SUCCEEDED, 1) == (run.status, run.removed)
        assert resync.full_sync
        assert {gone} == world.audience - world.members


class DeduplicatingReceiver(cs.Destination):
    """
    A receiver that does what the webhook docs invite: it applies each
    ``message_id`` (idempotency key) once, so re-sent batches are harmless.
    """

    capabilities = cs.Capabilities(name="deduplicating", max_batch_size=50)

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.audience: set[str] = set()

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        if batch.idempotency_key not in self.seen:
            self.seen.add(batch.idempotency_key)
            self.audience.update(batch.identifiers)
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        if batch.idempotency_key not in self.seen:
            self.seen.add(batch.idempotency_key)
            self.audience.difference_update(batch.identifiers)
        return cs.DeliveryResult.ok()


class TestDeduplicatingReceivers:
    """
    A receiver that de-duplicates on the idempotency key still gets every change.
    """

    def test_a_member_who_comes_back_is_added_again(self) -> None:
        """Join, leave, rejoin: the receiver holds the member at the end."""
        clock = FakeClock(T0)
        members = {"u1", "u2"}
        receiver = DeduplicatingReceiver()
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: sorted(members)))
        scheduler.add_destination("dedup", receiver)
        scheduler.create_sync("c1", "dedup", cs.SyncPolicy.hourly(), sync_id="s1")
        scheduler.run_due()
        members.add("u3")  # joins: one batch [u3]
        clock.advance(timedelta(hours=1))
        scheduler.run_due()
        members.discard("u3")  # leaves
        clock.advance(timedelta(hours=1))
        scheduler.run_due()
        members.add("u3")  # comes back: the same batch [u3] as its first add
        clock.advance(timedelta(hours=1))
        runs = scheduler.run_due()

        assert [cs.RunStatus.SUCCEEDED] == [r.status for r in runs]
        assert members == receiver.audience
