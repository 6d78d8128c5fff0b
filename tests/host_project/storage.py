"""
The host's stores: its own wrapper around a cohortsync store, keeping an audit
trail of every write (which the host's compliance team asked for), and a
store of its own written on :class:`~cohortsync.storage.StorageBase`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta

import attrs

import cohortsync as cs
from cohortsync.exceptions import (
    ConfigurationError,
    ConflictError,
    DuplicateRunError,
    LeaseLostError,
    StorageError,
    SyncNotFoundError,
)
from cohortsync.storage import (
    AppliedBatch,
    Completion,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    PendingBatch,
    Progress,
    Storage,
    StorageBase,
    SyncRecord,
    apply_claim,
    apply_completion,
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


class DictStorage(StorageBase):
    """
    The smallest store a host can write: the required parts only, over plain
    dicts under one lock (a stand-in for a key-value database such as Redis
    or DynamoDB), with cohortsync's own rules for the slot a claim runs and
    what a completed run writes. :class:`StorageBase` derives the rest.

    It keeps what the protocol lets a caller read back, nothing more: no
    record of applied batches, since no operation returns them.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._open = True
        self._syncs: dict[str, SyncRecord] = {}
        self._delivered: dict[str, dict[str, cs.Identifier]] = {}
        self._versions: dict[str, str] = {}
        self._pending: dict[str, dict[str, PendingBatch]] = {}
        self._progress: dict[str, Progress] = {}
        self._ledger: dict[str, dict[str, LedgerEntry]] = {}
        self._runs: dict[tuple[str, datetime], cs.SyncRun] = {}
        self._issues: dict[str, list[MemberIssue]] = {}

    def __repr__(self) -> str:
        return f"DictStorage(syncs={len(self._syncs)})"

    @contextmanager
    def _db(self) -> Iterator[None]:
        with self._lock:
            if not self._open:
                raise StorageError("the store is closed")
            yield

    def _held(self, lease: Lease) -> SyncRecord:
        record = self._syncs.get(lease.sync_id)
        if record is None or record.lease is None or record.lease.token != lease.token:
            raise LeaseLostError(lease.sync_id, lease.owner, lease.token)
        return record

    # -- ScheduleStore ---------------------------------------------------------------

    def create_sync(self, record: SyncRecord) -> None:
        with self._db():
            if record.id in self._syncs:
                raise ConfigurationError("id", record.id, "a sync with this id already exists")
            self._syncs[record.id] = attrs.evolve(record, lease=None, last_slot=None, revision=0)

    def get_sync(self, sync_id: str) -> SyncRecord:
        with self._db():
            if sync_id not in self._syncs:
                raise SyncNotFoundError(sync_id)
            return self._syncs[sync_id]

    def list_syncs(self) -> list[SyncRecord]:
        with self._db():
            return [self._syncs[k] for k in sorted(self._syncs)]

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        with self._db():
            stored = self.get_sync(record.id)
            if stored.sync.generation != expected_generation:
                raise ConflictError(record.id, expected_generation, stored.sync.generation)
            self._syncs[record.id] = attrs.evolve(
                record, lease=stored.lease, last_slot=stored.last_slot, revision=stored.revision + 1
            )

    def delete_sync(self, sync_id: str) -> None:
        with self._db():
            for table in (self._syncs, self._delivered, self._versions, self._pending):
                table.pop(sync_id, None)
            self._progress.pop(sync_id, None)
            self._ledger.pop(sync_id, None)

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        now = _aware(now)
        with self._db():
            due = sorted(
                (r for r in self._syncs.values() if _claimable(r, now)),
                key=lambda r: (r.next_due, r.id),
            )
            leases = []
            for record in due[: max(limit, 0)]:
                claimed, lease = apply_claim(
                    record, owner=owner, token=secrets.token_hex(16), expires_at=now + lease_for
                )
                self._syncs[record.id] = claimed
                leases.append(lease)
            return leases

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        now = _aware(now)
        with self._db():
            record = self._held(lease)
            extended = attrs.evolve(lease, expires_at=now + lease_for)
            self._syncs[lease.sync_id] = attrs.evolve(record, lease=extended)
            return extended

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        with self._db():
            record = self._held(lease)
            run = completion.run
            if (run.sync_id, run.slot) in self._runs:
                raise DuplicateRunError(run.sync_id, run.slot)
            self._runs[run.sync_id, run.slot] = run
            self._syncs[lease.sync_id] = apply_completion(record, lease, completion)
            for key in completion.resolved:
                self._pending.get(lease.sync_id, {}).pop(key, None)
            self._progress.pop(lease.sync_id, None)

    def release_lease(self, lease: Lease) -> None:
        with self._db():
            self._syncs[lease.sync_id] = attrs.evolve(self._held(lease), lease=None)

    # -- DeliveryStore ---------------------------------------------------------------

    def iter_delivered(self, sync_id: str) -> Iterator[str]:
        with self._db():
            return iter(sorted(self._delivered.get(sync_id, {})))

    def delivered_identifiers(self, sync_id: str, keys: Sequence[str]) -> dict[str, cs.Identifier]:
        with self._db():
            held = self._delivered.get(sync_id, {})
            return {key: held[key] for key in keys if key in held}

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        with self._db():
            self._held(lease)
            sync_id = lease.sync_id
            delivered = self._delivered.setdefault(sync_id, {})
            ledger = self._ledger.setdefault(sync_id, {})
            for member in batch.added:
                delivered[member.key] = member.identifier
                ledger.pop(member.key, None)
            for key in batch.removed:
                delivered.pop(key, None)
                ledger.pop(key, None)
            for key, reason in batch.rejected:
                old = ledger.get(key)
                attempts = 1 if old is None else old.attempts + 1
                ledger[key] = LedgerEntry(
                    sync_id=sync_id,
                    key=key,
                    reason=reason,
                    attempts=attempts,
                    dead=attempts >= batch.max_rejection_attempts,
                    first_seen=batch.at if old is None else old.first_seen,
                    last_seen=batch.at,
                )
                self._issues.setdefault(batch.run_id, []).append(
                    MemberIssue(
                        run_id=batch.run_id, key=key, kind=IssueKind.REJECTED, reason=reason
                    )
                )
            self._pending.get(sync_id, {}).pop(batch.idempotency_key, None)
            if batch.slot is not None and batch.tally:
                before = self._progress.get(sync_id)
                tally = batch.tally if before is None else before.tally + batch.tally
                self._progress[sync_id] = Progress(slot=batch.slot, tally=tally)
            self._versions[sync_id] = secrets.token_hex(8)
            return self._versions[sync_id]

    def delivered_version(self, sync_id: str) -> str:
        with self._db():
            return self._versions.get(sync_id, "")

    def begin_batch(
        self, lease: Lease, batch: PendingBatch, *, replaces: str | None = None
    ) -> None:
        with self._db():
            self._held(lease)
            pending = self._pending.setdefault(lease.sync_id, {})
            pending.pop(batch.idempotency_key, None)  # re-begun: now the newest
            if replaces is not None:
                pending.pop(replaces, None)
            pending[batch.idempotency_key] = batch

    def pending_batches(self, sync_id: str) -> list[PendingBatch]:
        with self._db():
            return list(self._pending.get(sync_id, {}).values())

    def progress(self, sync_id: str) -> Progress | None:
        with self._db():
            return self._progress.get(sync_id)

    # -- HistoryStore ----------------------------------------------------------------

    def record_issues(self, lease: Lease, issues: Sequence[MemberIssue]) -> None:
        with self._db():
            self._held(lease)
            for issue in issues:
                self._issues.setdefault(issue.run_id, []).append(issue)

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        with self._db():
            entries = self._ledger.get(sync_id, {})
            return [entries[key] for key in sorted(entries)]

    def history(self, sync_id: str, limit: int | None = None) -> list[cs.SyncRun]:
        with self._db():
            runs = sorted(
                (run for (owner, _), run in self._runs.items() if owner == sync_id),
                key=lambda run: (run.started_at, run.slot),
                reverse=True,
            )
            return runs if limit is None else runs[:limit]

    def run_issues(self, run_id: str) -> list[MemberIssue]:
        with self._db():
            return sorted(self._issues.get(run_id, []), key=lambda i: (i.kind, i.key))

    def purge_history(self, before: datetime) -> int:
        before = _aware(before)
        with self._db():
            old = [slot for slot, run in self._runs.items() if run.finished_at < before]
            for slot in old:
                self._issues.pop(self._runs.pop(slot).id, None)
            return len(old)

    def close(self) -> None:
        with self._lock:
            self._open = False


def _claimable(record: SyncRecord, now: datetime) -> bool:
    return (
        record.sync.status is cs.SyncStatus.ACTIVE
        and record.next_due is not None
        and record.next_due <= now
        and (record.lease is None or record.lease.expires_at < now)
    )


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise TypeError(f"{value!r} is naive: cohortsync passes aware UTC datetimes")
    return value
