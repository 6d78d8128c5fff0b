"""
The host's store: its own wrapper around a cohortsync store, keeping an audit
trail of every write (which the host's compliance team asked for).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta

import cohortsync as cs
from cohortsync.storage import (
    AppliedBatch,
    Completion,
    Lease,
    LedgerEntry,
    MemberIssue,
    PendingBatch,
    Progress,
    Storage,
    SyncRecord,
)


class AuditedStorage:
    """
    Delegates every :class:`Storage` operation to *inner* and
    records each write as ``(operation, sync id)`` in ``audit``.
    """

    def __init__(self, inner: Storage, tenant: str) -> None:
        self.inner = inner
        self.tenant = tenant
        self.audit: list[tuple[str, str]] = []

    def _log(self, operation: str, sync_id: str) -> None:
        self.audit.append((operation, f"{self.tenant}/{sync_id}"))

    # -- syncs -------------------------------------------------------------------

    def create_sync(self, record: SyncRecord) -> None:
        self.inner.create_sync(record)
        self._log("create_sync", record.id)

    def get_sync(self, sync_id: str) -> SyncRecord:
        return self.inner.get_sync(sync_id)

    def list_syncs(self) -> list[SyncRecord]:
        return self.inner.list_syncs()

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        self.inner.save_sync(record, expected_generation=expected_generation)
        self._log("save_sync", record.id)

    def delete_sync(self, sync_id: str) -> None:
        self.inner.delete_sync(sync_id)
        self._log("delete_sync", sync_id)

    def least_loaded_slot(self, period: int, buckets: int, preferred: int) -> int:
        return self.inner.least_loaded_slot(period, buckets, preferred)

    def next_due(self) -> datetime | None:
        return self.inner.next_due()

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        return self.inner.scheduled_after(now)

    # -- leases and runs -------------------------------------------------------------

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        leases = self.inner.claim_due(now, owner, lease_for, limit)
        for lease in leases:
            self._log("claim", lease.sync_id)
        return leases

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        return self.inner.extend_lease(lease, now, lease_for)

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        self.inner.complete_run(lease, completion)
        self._log("complete_run", lease.sync_id)

    def release_lease(self, lease: Lease) -> None:
        self.inner.release_lease(lease)

    # -- delivered state -----------------------------------------------------------

    def iter_delivered(self, sync_id: str) -> Iterator[str]:
        return self.inner.iter_delivered(sync_id)

    def count_delivered(self, sync_id: str) -> int:
        return self.inner.count_delivered(sync_id)

    def filter_delivered(self, sync_id: str, keys: Iterable[str]) -> set[str]:
        return self.inner.filter_delivered(sync_id, keys)

    def delivered_identifiers(self, sync_id: str, keys: Sequence[str]) -> dict[str, cs.Identifier]:
        return self.inner.delivered_identifiers(sync_id, keys)

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        version = self.inner.apply_batch(lease, batch)
        self._log("apply_batch", lease.sync_id)
        return version

    def delivered_version(self, sync_id: str) -> str:
        return self.inner.delivered_version(sync_id)

    def begin_batch(
        self, lease: Lease, batch: PendingBatch, *, replaces: str | None = None
    ) -> None:
        self.inner.begin_batch(lease, batch, replaces=replaces)
        self._log("begin_batch", lease.sync_id)

    def pending_batches(self, sync_id: str) -> list[PendingBatch]:
        return self.inner.pending_batches(sync_id)

    def progress(self, sync_id: str) -> Progress | None:
        return self.inner.progress(sync_id)

    def identifier_holders(
        self, sync_id: str, identifiers: Iterable[cs.Identifier]
    ) -> dict[cs.Identifier, list[str]]:
        return self.inner.identifier_holders(sync_id, identifiers)

    def record_issues(self, lease: Lease, issues: Sequence[MemberIssue]) -> None:
        self.inner.record_issues(lease, issues)
        self._log("record_issues", lease.sync_id)

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        return self.inner.ledger(sync_id)

    def dead_letters(self, sync_id: str) -> set[str]:
        return self.inner.dead_letters(sync_id)

    # -- history -------------------------------------------------------------------

    def history(self, sync_id: str, limit: int | None = None) -> list[cs.SyncRun]:
        return self.inner.history(sync_id, limit)

    def run_issues(self, run_id: str) -> list[MemberIssue]:
        return self.inner.run_issues(run_id)

    def purge_history(self, before: datetime) -> int:
        return self.inner.purge_history(before)

    def close(self) -> None:
        self.inner.close()
