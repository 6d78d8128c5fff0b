"""
The testing kit as a host's tests use it, checked by mypy (``nox -s typing``)
and never executed: simulate(), the destination contract with a host adapter
and its probes, and the storage contract.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime, timedelta, timezone

from typing_extensions import assert_type

import cohortsync
from cohortsync.exceptions import RateLimitedError, TransientError
from cohortsync.testing import (
    STORAGE_CHECKS,
    DestinationReport,
    ErrorCase,
    FakeClock,
    MemoryStorage,
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


def make() -> Audience:
    return Audience(FakeClient())


def refuse(dest: Audience, identifiers: Collection[str]) -> None:
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
storage_report = check_storage(MemoryStorage)
assert_type(storage_report, StorageReport)
assert_type(storage_report.parts, Mapping[str, str])
assert_type(storage_report.derived, tuple[str, ...])
for check in STORAGE_CHECKS:
    check(MemoryStorage)
