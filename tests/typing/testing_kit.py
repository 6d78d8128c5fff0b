"""
The testing kit as a host's tests use it, checked by mypy (``nox -s typing``)
and never executed: simulate(), the destination contract with a host adapter
(of either kind) and its probes, the asynchronous test destinations, and the
storage contract.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime, timedelta, timezone

from typing_extensions import assert_type

import cohortsync
from cohortsync.exceptions import RateLimitedError, TransientError
from cohortsync.testing import (
    STORAGE_CHECKS,
    AsyncFaultyDestination,
    AsyncRecordingDestination,
    DestinationReport,
    ErrorCase,
    FakeClock,
    Fault,
    FaultKind,
    FaultyDestination,
    MemoryStorage,
    RecordedBatch,
    StorageReport,
    check_destination,
    check_storage,
    simulate,
)


class FakeClient:
    def __init__(self) -> None:
        self.requests: list[list[str]] = []
        self.members: set[str] = set()
        self.failures: list[int] = []
        self.refused: set[str] = set()


class Audience(cohortsync.Destination):
    capabilities = cohortsync.Capabilities(max_batch_size=100)

    def __init__(self, client: FakeClient) -> None:
        self.client = client

    def add(self, batch: cohortsync.Batch) -> cohortsync.DeliveryResult:
        self.client.requests.append(batch.identifiers)
        return cohortsync.DeliveryResult.ok()

    def remove(self, batch: cohortsync.Batch) -> cohortsync.DeliveryResult:
        return cohortsync.DeliveryResult.ok()


class AsyncAudience(cohortsync.AsyncDestination):
    capabilities = cohortsync.Capabilities(max_batch_size=100)

    def __init__(self, client: FakeClient) -> None:
        self.client = client

    async def add(self, batch: cohortsync.Batch) -> cohortsync.DeliveryResult:
        self.client.requests.append(batch.identifiers)
        return cohortsync.DeliveryResult.ok()

    async def remove(self, batch: cohortsync.Batch) -> cohortsync.DeliveryResult:
        return cohortsync.DeliveryResult.ok()


def make() -> Audience:
    return Audience(FakeClient())


def make_async() -> AsyncAudience:
    return AsyncAudience(FakeClient())


async def async_members(dest: AsyncAudience, context: cohortsync.RunContext) -> set[str]:
    return dest.client.members


async def async_failing(dest: AsyncAudience) -> None:
    dest.client.failures.append(503)


def refuse(dest: Audience, identifiers: Collection[str]) -> None:
    dest.client.refused.update(identifiers)


def refuse_async(dest: AsyncAudience, identifiers: Collection[str]) -> None:
    dest.client.refused.update(identifiers)


clock = FakeClock(datetime(2030, 1, 1, tzinfo=timezone.utc))
scheduler = cohortsync.Scheduler(MemoryStorage(), clock=clock, seed=0)
assert_type(simulate(scheduler, span=timedelta(days=7)), list[cohortsync.SyncRun])
assert_type(
    simulate(scheduler, until=clock.now() + timedelta(hours=1), step=timedelta(seconds=10)),
    list[cohortsync.SyncRun],
)

report = check_destination(
    make,
    observe=lambda dest: [len(r) for r in dest.client.requests],
    remote_members=lambda dest, context: dest.client.members,
    errors={
        "HTTP 503": ErrorCase(TransientError, lambda dest: dest.client.failures.append(503)),
        "HTTP 429": ErrorCase(RateLimitedError, lambda dest: dest.client.failures.append(429)),
    },
    reject=refuse,
    make_identifier=lambda i: f"user-{i}@example.com",
    identifier_kind=cohortsync.IdentifierKind.EMAIL,
)
assert_type(report, DestinationReport)
assert_type(report.passed, tuple[str, ...])

# The same suite on an asynchronous adapter; probes and setups may be async def.
async_report = check_destination(
    make_async,
    observe=lambda dest: [len(r) for r in dest.client.requests],
    remote_members=async_members,
    errors={"HTTP 503": ErrorCase(TransientError, async_failing)},
    reject=refuse_async,
)
assert_type(async_report, DestinationReport)

# The test destinations, in both kinds, with latency on a fake clock.
recording = AsyncRecordingDestination("braze", latency=0.05, clock=clock)
assert_type(recording.batches, list[RecordedBatch])
assert_type(recording.audience("s1"), set[str])
assert_type(recording.members, set[str])
assert_type(recording.resent_keys(), list[str])
faulty = AsyncFaultyDestination(
    script={0: Fault.timeout()}, random_faults={Fault.reject(0.1): 0.2}, seed=1, latency=0.1
)
faulty.script[faulty.call_count] = Fault.rate_limited(retry_after=5.0)
faulty.random_faults = {}
faulty.always = None
assert_type(faulty.call_count, int)
assert_type(faulty.faults_injected, list[tuple[int, FaultKind]])
sync_faulty = FaultyDestination(always=Fault.drop(0.5), latency=0.1, clock=clock)
assert_type(sync_faulty.script, dict[int, Fault])
async_scheduler = cohortsync.AsyncScheduler(MemoryStorage(), clock=clock, seed=0)
assert_type(async_scheduler.add_destination("rec", recording), AsyncRecordingDestination)
storage_report = check_storage(MemoryStorage)
assert_type(storage_report, StorageReport)
assert_type(storage_report.parts, Mapping[str, str])
assert_type(storage_report.derived, tuple[str, ...])
for check in STORAGE_CHECKS:
    check(MemoryStorage)
