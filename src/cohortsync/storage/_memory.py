"""
The reference :class:`~cohortsync.storage.Storage`: in memory, one process, thread-safe.

It is the executable definition of the protocol's semantics: the SQL stores
must behave exactly like it, which the contract suite checks.
"""

from __future__ import annotations

import bisect
import heapq
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Generic, TypeVar

import attrs

from cohortsync._clock import add_saturating, require_aware
from cohortsync._destination import Identifier, IdentifierKind, Operation
from cohortsync._sync import SyncRun, SyncStatus
from cohortsync._tokens import token_hex
from cohortsync.exceptions import (
    ConfigurationError,
    ConflictError,
    DuplicateRunError,
    LeaseLostError,
    StorageClosedError,
    SyncNotFoundError,
)
from cohortsync.storage._base import (
    StorageBase,
    due_key,
    placed,
    placement_of,
    require_distinct_ids,
    written,
)
from cohortsync.storage._protocol import (
    SLOT_BUCKET_SECONDS,
    AppliedBatch,
    Claim,
    Completion,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    PendingBatch,
    Placement,
    Progress,
    SyncRecord,
)
from cohortsync.storage._rules import (
    SlotLoad,
    apply_claim,
    apply_completion,
    is_identity,
    record_claimable_at,
    require_buckets,
    scheduled_later,
    slot_bucket_of,
)

__all__ = ["MemoryStorage"]

_K = TypeVar("_K", str, tuple[datetime, str])


class _Sorted(Generic[_K]):
    """
    A sorted set of keys in short sorted runs (the layout of
    ``sortedcontainers.SortedList``): adding or removing a key moves at most
    one run's worth of pointers, where one flat sorted list would move half
    of a million-entry list on every write.
    """

    __slots__ = ("_maxes", "_runs")
    _LOAD = 512

    def __init__(self) -> None:
        self._runs: list[list[_K]] = []
        self._maxes: list[_K] = []

    def add(self, key: _K) -> None:
        runs, maxes = self._runs, self._maxes
        if not runs:
            runs.append([key])
            maxes.append(key)
            return
        i = bisect.bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
            runs[i].append(key)
            maxes[i] = key
        else:
            run = runs[i]
            j = bisect.bisect_left(run, key)
            if j < len(run) and run[j] == key:
                return
            run.insert(j, key)
        run = runs[i]
        if len(run) > 2 * self._LOAD:
            half = run[self._LOAD :]
            del run[self._LOAD :]
            maxes[i] = run[-1]
            runs.insert(i + 1, half)
            maxes.insert(i + 1, half[-1])

    def discard(self, key: _K) -> None:
        runs, maxes = self._runs, self._maxes
        i = bisect.bisect_left(maxes, key)
        if i == len(maxes):
            return
        run = runs[i]
        j = bisect.bisect_left(run, key)
        if j == len(run) or run[j] != key:
            return
        del run[j]
        if not run:
            del runs[i]
            del maxes[i]
        elif j == len(run):
            maxes[i] = run[-1]

    def after(self, key: _K | None) -> Iterator[_K]:
        """The keys greater than *key* (all of them for ``None``), in order."""
        runs = self._runs
        if key is None:
            i, j = 0, 0
        else:
            i = bisect.bisect_right(self._maxes, key)
            j = bisect.bisect_right(runs[i], key) if i < len(runs) else 0
        for n in range(i, len(runs)):
            yield from runs[n][j:] if n == i else runs[n]

    def __iter__(self) -> Iterator[_K]:
        return self.after(None)

    def last(self) -> _K | None:
        return self._maxes[-1] if self._maxes else None


def _due_index_key(record: SyncRecord) -> tuple[datetime, str] | None:
    if record.sync.status is not SyncStatus.ACTIVE or record.next_due is None:
        return None
    return due_key(record)


def _rebase_index_key(record: SyncRecord) -> tuple[datetime, str] | None:
    if record.sync.status is not SyncStatus.ACTIVE or record.scheduled_from is None:
        return None
    return record.scheduled_from, record.id


class _Lazy:
    """
    A sorted index of records' keys, patched when it is read: a write only
    notes the sync's new key, so a sync run many times between two reads
    moves its key once (the run loop reads neither index; listings do).
    """

    __slots__ = ("_key_of", "_keys", "_moved", "_sorted")

    def __init__(self, key_of: Callable[[SyncRecord], tuple[datetime, str] | None]) -> None:
        self._key_of = key_of
        self._sorted: _Sorted[tuple[datetime, str]] = _Sorted()
        self._keys: dict[str, tuple[datetime, str]] = {}
        """Each indexed sync's key as it is in ``_sorted``."""
        self._moved: dict[str, tuple[datetime, str] | None] = {}
        """The newest key of each sync written since the last read (``None``: out)."""

    def move(self, sync_id: str, record: SyncRecord | None) -> tuple[datetime, str] | None:
        """Note *record* as the sync's newest (``None``: deleted); return its key."""
        key = None if record is None else self._key_of(record)
        self._moved[sync_id] = key
        return key

    def current(self) -> _Sorted[tuple[datetime, str]]:
        """The index with every move made."""
        keys, index = self._keys, self._sorted
        for sync_id, after in self._moved.items():
            before = keys.get(sync_id)
            if before == after:
                continue
            if before is not None:
                index.discard(before)
            if after is None:
                del keys[sync_id]
            else:
                index.add(after)
                keys[sync_id] = after
        self._moved.clear()
        return index


@attrs.define
class _Delivered:
    """
    One sync's delivered state: identifiers by key, plus a lazily sorted key list
    for ascending iteration.

    A change drops the sorted list instead of patching it: inserting into or
    deleting from a list of n keys moves O(n) pointers, so patching k changes
    costs O(k * n) (a 1,000,000-member audience losing most of its members
    would take minutes), while re-sorting once per run is O(n log n) and
    nearly linear here, because dict order is mostly sorted already.
    """

    ids: dict[str, Identifier | None] = attrs.Factory(dict)
    # Members delivered under an identifier other than their own key (the
    # identity mapping is stored as None and needs no index).
    holders: dict[Identifier, set[str]] = attrs.Factory(dict)
    _sorted: list[str] | None = None

    def sorted_keys(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.ids)
        return self._sorted

    def add(self, key: str, identifier: Identifier | None) -> None:
        old = self.ids.get(key, _MISSING)
        if old is _MISSING:
            self._sorted = None
        elif old is not None:
            self._unindex(key, old)  # type: ignore[arg-type]
        self.ids[key] = identifier
        if identifier is not None:
            self.holders.setdefault(identifier, set()).add(key)

    def discard(self, key: str) -> None:
        old = self.ids.pop(key, _MISSING)
        if old is not _MISSING:
            self._sorted = None
            if old is not None:
                self._unindex(key, old)  # type: ignore[arg-type]

    def _unindex(self, key: str, identifier: Identifier) -> None:
        keys = self.holders.get(identifier)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.holders[identifier]


_MISSING = object()


@attrs.define
class _Batch:
    run_id: str
    sequence: int
    operation: Operation
    idempotency_key: str
    at: datetime


@attrs.define
class MemoryStorage(StorageBase):
    """
    Keeps everything in process memory. For tests, examples and single-process
    hosts that can afford to lose state on restart.
    """

    _lock: threading.RLock = attrs.field(factory=threading.RLock, repr=False)
    _syncs: dict[str, SyncRecord] = attrs.field(factory=dict, repr=False)
    _slots: dict[int, SlotLoad] = attrs.field(factory=dict, repr=False)
    _due: list[tuple[datetime, str]] = attrs.field(factory=list, repr=False)
    _ids: _Sorted[str] = attrs.field(factory=_Sorted, repr=False)
    _by_due: _Lazy = attrs.field(factory=lambda: _Lazy(_due_index_key), repr=False)
    """``(next_due, id)`` of the active scheduled syncs (due_between)."""
    _by_from: _Lazy = attrs.field(factory=lambda: _Lazy(_rebase_index_key), repr=False)
    """``(scheduled_from, id)`` of the active syncs (scheduled_after)."""
    _latest_from: datetime | None = attrs.field(default=None, repr=False)
    """At least the latest ``scheduled_from`` stored: scheduled_after's usual
    answer (none) without patching its index."""
    _leased: set[str] = attrs.field(factory=set, repr=False)
    _delivered: dict[str, _Delivered] = attrs.field(factory=dict, repr=False)
    _ledger: dict[str, dict[str, LedgerEntry]] = attrs.field(factory=dict, repr=False)
    """Rejected members by sync, then by key (a sync without any has no entry)."""
    _runs: dict[tuple[str, datetime], SyncRun] = attrs.field(factory=dict, repr=False)
    _batches: list[_Batch] = attrs.field(factory=list, repr=False)
    _issues: dict[str, list[MemberIssue]] = attrs.field(factory=dict, repr=False)
    _versions: dict[str, str] = attrs.field(factory=dict, repr=False)
    _pending: dict[str, dict[str, PendingBatch]] = attrs.field(factory=dict, repr=False)
    _progress: dict[str, Progress] = attrs.field(factory=dict, repr=False)
    _closed: bool = attrs.field(default=False, repr=False)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosedError(repr(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(syncs={len(self._syncs)}, runs={len(self._runs)})"

    # -- syncs ---------------------------------------------------------------

    def create_sync(self, record: SyncRecord) -> None:
        with self._lock:
            self._check_open()
            if record.id in self._syncs:
                raise ConfigurationError("id", record.id, "a sync with this id already exists")
            self._count_slot(None, record)
            self._store(attrs.evolve(record, lease=None, last_slot=None, revision=0))

    def get_sync(self, sync_id: str) -> SyncRecord:
        with self._lock:
            self._check_open()
            try:
                return self._syncs[sync_id]
            except KeyError:
                raise SyncNotFoundError(sync_id) from None

    def list_syncs(self) -> list[SyncRecord]:
        with self._lock:
            self._check_open()
            return [self._syncs[k] for k in self._ids]

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        with self._lock:
            current = self.get_sync(record.id)
            if current.sync.generation != expected_generation:
                raise ConflictError(record.id, expected_generation, current.sync.generation)
            self._save(current, record)

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        with self._lock:
            current = self.get_sync(record.id)
            if current.revision != expected_revision:
                raise ConflictError(
                    record.id, expected_revision, current.revision, counter="revision"
                )
            self._save(current, record)

    def _save(self, current: SyncRecord, record: SyncRecord) -> None:
        """
        Replace *current* by *record* under the lock (a save's field rules:
        the stored lease and ``last_slot`` kept, a new revision, the count moved).
        """
        self._count_slot(current, record)
        self._store(
            attrs.evolve(
                record,
                lease=current.lease,
                last_slot=current.last_slot,
                revision=current.revision + 1,
            )
        )

    def delete_sync(self, sync_id: str) -> None:
        with self._lock:
            self._check_open()
            record = self._syncs.pop(sync_id, None)
            if record is not None:
                self._count_slot(record, None)
                self._index(record, None)
            self._leased.discard(sync_id)
            self._delivered.pop(sync_id, None)
            self._versions.pop(sync_id, None)
            self._pending.pop(sync_id, None)
            self._progress.pop(sync_id, None)
            self._ledger.pop(sync_id, None)

    def next_due(self) -> datetime | None:
        with self._lock:
            self._check_open()
            # The heap holds hints for syncs without a lease; drop stale ones
            # from the top until it is true.
            earliest: datetime | None = None
            while self._due:
                at, sync_id = self._due[0]
                r = self._syncs.get(sync_id)
                if r is not None and r.lease is None and record_claimable_at(r) == at:
                    earliest = at
                    break
                heapq.heappop(self._due)
            for sync_id in self._leased:
                expiry = record_claimable_at(self._syncs[sync_id])
                if expiry is not None and (earliest is None or expiry < earliest):
                    earliest = expiry
            return earliest

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        now = require_aware(now, "now")
        with self._lock:
            self._check_open()
            if self._latest_from is None or self._latest_from <= now:
                return []  # the usual answer, without patching the index
            index = self._by_from.current()
            last = index.last()
            self._latest_from = None if last is None else last[0]
            if last is None or last[0] <= now:
                return []
            later = (self._syncs[sync_id] for _, sync_id in index.after((now, "\U0010ffff")))
            return sorted(scheduled_later(later, now), key=lambda r: r.id)

    def due_between(
        self, after: tuple[datetime, str] | None, until: datetime, limit: int
    ) -> list[SyncRecord]:
        until = require_aware(until, "until")
        with self._lock:
            self._check_open()
            out: list[SyncRecord] = []
            for key in self._by_due.current().after(after):
                if len(out) >= limit or key[0] > until:
                    break
                out.append(self._syncs[key[1]])
            return out

    def page_syncs(self, after: str | None, limit: int) -> list[SyncRecord]:
        with self._lock:
            self._check_open()
            out: list[SyncRecord] = []
            for sync_id in self._ids.after(after):
                if len(out) >= limit:
                    break
                out.append(self._syncs[sync_id])
            return out

    # -- slots ---------------------------------------------------------------

    def _slots_of(self, period: int) -> SlotLoad:
        buckets = period // SLOT_BUCKET_SECONDS
        slots = self._slots.get(period)
        if slots is None or slots.buckets != buckets:
            slots = self._slots[period] = SlotLoad.empty(buckets)
        return slots

    def _count_slot(self, old: SyncRecord | None, new: SyncRecord | None) -> None:
        before = None if old is None else slot_bucket_of(old)
        after = None if new is None else slot_bucket_of(new)
        if before == after:
            return
        if before is not None:
            slots = self._slots_of(before[0])
            if 0 <= before[1] < slots.buckets:
                slots.release(before[1])
        if after is not None:
            slots = self._slots_of(after[0])
            if 0 <= after[1] < slots.buckets:
                slots.take(after[1])

    def least_loaded_slot(self, period: int, buckets: int, preferred: int) -> int:
        with self._lock:
            return self._load_of(period, buckets).least(preferred)

    def create_sync_least_loaded(self, record: SyncRecord, buckets: int) -> SyncRecord:
        period, preferred = placement_of(record, buckets)
        with self._lock:
            self._check_open()
            if record.id in self._syncs:
                raise ConfigurationError("id", record.id, "a sync with this id already exists")
            stored = placed(record, self._load_of(period, buckets).least(preferred))
            stored = attrs.evolve(stored, lease=None, last_slot=None, revision=0)
            self._count_slot(None, stored)
            self._store(stored)
        return stored

    def _load_of(self, period: int, buckets: int) -> SlotLoad:
        require_buckets(buckets)
        self._check_open()
        slots = self._slots.get(period)
        if slots is None or slots.buckets != buckets:
            slots = self._slots[period] = SlotLoad.empty(buckets)
        return slots

    def slot_counts(self, period: int, buckets: int) -> list[int]:
        with self._lock:
            return list(self._load_of(period, buckets).counts)

    def create_syncs_placed(
        self, ids: Sequence[str], place: Placement
    ) -> tuple[list[SyncRecord], list[str]]:
        """*place* and the write under the store's lock: no creator picks in between."""
        with self._lock:
            self._check_open()
            taken = {sync_id for sync_id in ids if sync_id in self._syncs}
            records = list(place(self.slot_counts, taken))
            return written(records, self.create_syncs(records))

    def create_syncs(self, records: Sequence[SyncRecord]) -> list[str]:
        require_distinct_ids(records)
        with self._lock:
            self._check_open()
            taken = [r.id for r in records if r.id in self._syncs]
            skip = set(taken)
            for record in records:
                if record.id not in skip:
                    self._count_slot(None, record)
                    self._store(attrs.evolve(record, lease=None, last_slot=None, revision=0))
            return taken

    # -- claims --------------------------------------------------------------

    def _store(self, record: SyncRecord) -> None:
        """
        Save *record* and index when it can next be claimed. The heap holds
        hints (possibly stale or duplicated); claims re-check the record. A
        leased record gets no hint: claims and :meth:`next_due` look at every
        leased sync anyway (they are the few runs in flight), and a hint per
        claim would double the heap's pushes and pops.
        """
        sync_id = record.id
        self._index(self._syncs.get(sync_id), record)
        self._syncs[sync_id] = record
        if record.lease is not None:
            self._leased.add(sync_id)
            return
        self._leased.discard(sync_id)
        at = record_claimable_at(record)
        if at is not None:
            heapq.heappush(self._due, (at, sync_id))

    def _index(self, old: SyncRecord | None, new: SyncRecord | None) -> None:
        """Move a sync's keys in the sorted indexes from *old* to *new*."""
        if old is None and new is not None:
            self._ids.add(new.id)
        elif new is None and old is not None:
            self._ids.discard(old.id)
        either = new or old
        assert either is not None  # noqa: S101 - a write has a before or an after
        sync_id = either.id
        self._by_due.move(sync_id, new)
        key = self._by_from.move(sync_id, new)
        if key is not None and (self._latest_from is None or key[0] > self._latest_from):
            self._latest_from = key[0]

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        with self._lock:
            return [lease for _, lease in self._claim(now, owner, lease_for, limit)]

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        with self._lock:
            delivered, versions, pending = self._delivered, self._versions, self._pending
            claims = []
            for record, lease in self._claim(now, owner, lease_for, limit):
                sync_id = lease.sync_id
                state = delivered.get(sync_id)  # not _state(): no empty state per claim
                claims.append(
                    Claim(
                        lease=lease,
                        record=record,
                        delivered=0 if state is None else len(state.ids),
                        version=versions.get(sync_id, ""),
                        pending=bool(pending.get(sync_id)),
                        ledger=sync_id in self._ledger,
                        progress=sync_id in self._progress,
                    )
                )
            return claims

    def _claim(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[tuple[SyncRecord, Lease]]:
        now = require_aware(now, "now")
        with self._lock:
            self._check_open()
            claims = []
            expires_at = add_saturating(now, lease_for)
            for r in self._due_now(now, limit):
                claimed, lease = apply_claim(
                    r, owner=owner, token=token_hex(16), expires_at=expires_at
                )
                self._store(claimed)
                claims.append((claimed, lease))
            return claims

    def _due_now(self, now: datetime, limit: int) -> list[SyncRecord]:
        """The first *limit* syncs claimable at *now*, earliest due first."""
        due: list[SyncRecord] = []
        seen: set[str] = set()
        while self._due and self._due[0][0] <= now and len(due) < limit:
            hint, sync_id = heapq.heappop(self._due)
            r = self._syncs.get(sync_id)
            if r is None or sync_id in seen or r.lease is not None:
                continue  # gone, taken, or leased (found below)
            if record_claimable_at(r) != hint:
                # A stale hint (the sync was rescheduled, paused, ...): every
                # unleased sync has a hint for its current time, which comes
                # in its own turn. Taking the sync at a stale hint's turn
                # would hand it out ahead of syncs due before it.
                continue
            # Unleased and current: popped in (next_due, id) order, as promised.
            seen.add(sync_id)
            due.append(r)
        # Leased syncs have no hints: one whose lease expired is claimable
        # too, and may be due before all of those. Leases are few (runs in
        # flight), so looking at every one stays cheap.
        expired = [
            r
            for r in (self._syncs[sync_id] for sync_id in self._leased)
            if (at := record_claimable_at(r)) is not None and at <= now
        ]
        if expired:
            due += expired
            due.sort(key=lambda r: (r.next_due, r.id))
        for r in due[limit:]:
            at = record_claimable_at(r)
            if r.id in seen and at is not None:  # put back the hints popped, not taken
                heapq.heappush(self._due, (at, r.id))
        return due[: max(limit, 0)]

    def _held(self, lease: Lease) -> SyncRecord:
        self._check_open()
        r = self._syncs.get(lease.sync_id)
        if r is None or r.lease is None or r.lease.token != lease.token:
            raise LeaseLostError(lease.sync_id, lease.owner, lease.token)
        return r

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        now = require_aware(now, "now")
        with self._lock:
            r = self._held(lease)
            new = attrs.evolve(lease, expires_at=add_saturating(now, lease_for))
            self._store(attrs.evolve(r, lease=new))
            return new

    def release_lease(self, lease: Lease) -> None:
        with self._lock:
            r = self._held(lease)
            self._store(attrs.evolve(r, lease=None))

    def complete_runs(
        self, completions: Sequence[tuple[Lease, Completion]]
    ) -> list[Exception | None]:
        with self._lock:
            return super().complete_runs(completions)

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        with self._lock:
            r = self._held(lease)
            run = completion.run
            if (run.sync_id, run.slot) in self._runs:
                raise DuplicateRunError(run.sync_id, run.slot)
            self._runs[run.sync_id, run.slot] = run
            if completion.resolved:
                pending = self._pending.get(lease.sync_id, {})
                for key in completion.resolved:
                    pending.pop(key, None)
            self._progress.pop(lease.sync_id, None)
            self._store(apply_completion(r, lease, completion))

    def begin_batch(
        self, lease: Lease, batch: PendingBatch, *, replaces: str | None = None
    ) -> None:
        with self._lock:
            self._held(lease)
            pending = self._pending.setdefault(lease.sync_id, {})
            if replaces is not None:
                pending.pop(replaces, None)
            pending.pop(batch.idempotency_key, None)  # re-begun: now the newest
            pending[batch.idempotency_key] = batch

    def pending_batches(self, sync_id: str) -> list[PendingBatch]:
        with self._lock:
            self._check_open()
            return list(self._pending.get(sync_id, {}).values())

    def progress(self, sync_id: str) -> Progress | None:
        with self._lock:
            self._check_open()
            return self._progress.get(sync_id)

    # -- delivered state -----------------------------------------------------

    def _state(self, sync_id: str) -> _Delivered:
        self._check_open()
        return self._delivered.setdefault(sync_id, _Delivered())

    def iter_delivered(self, sync_id: str) -> Iterator[str]:
        with self._lock:
            keys = list(self._state(sync_id).sorted_keys())
        return iter(keys)

    def count_delivered(self, sync_id: str) -> int:
        with self._lock:
            return len(self._state(sync_id).ids)

    def filter_delivered(self, sync_id: str, keys: Iterable[str]) -> set[str]:
        with self._lock:
            ids = self._state(sync_id).ids
            return {k for k in keys if k in ids}

    def delivered_identifiers(self, sync_id: str, keys: Sequence[str]) -> dict[str, Identifier]:
        with self._lock:
            ids = self._state(sync_id).ids
            out: dict[str, Identifier] = {}
            for k in keys:
                if k in ids:
                    ident = ids[k]
                    out[k] = ident if ident is not None else Identifier(IdentifierKind.USER_ID, k)
            return out

    def has_mapped_identifiers(self, sync_id: str) -> bool:
        """
        Whether any member delivered to the sync holds an identifier other
        than ``Identifier(USER_ID, key)`` (it was delivered under a mapping
        other than the identity one). An optional fast path, not part of
        :class:`~cohortsync.storage.Storage`: when it answers ``False``, a
        run under the identity mapping knows without asking about each
        member that no two members share an identifier.
        """
        with self._lock:
            return bool(self._state(sync_id).holders)

    def identifier_holders(
        self, sync_id: str, identifiers: Iterable[Identifier]
    ) -> dict[Identifier, list[str]]:
        with self._lock:
            state = self._state(sync_id)
            out: dict[Identifier, list[str]] = {}
            for ident in identifiers:
                keys = set(state.holders.get(ident, ()))
                if (
                    ident.kind is IdentifierKind.USER_ID
                    and ident.value in state.ids
                    and state.ids[ident.value] is None
                ):
                    keys.add(ident.value)
                if keys:
                    out[ident] = sorted(keys)
            return out

    def delivered_version(self, sync_id: str) -> str:
        with self._lock:
            self._check_open()
            return self._versions.get(sync_id, "")

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        with self._lock:
            self._held(lease)
            state = self._state(lease.sync_id)
            ledger = self._ledger.get(lease.sync_id, {})
            for m in batch.added:
                state.add(m.key, None if is_identity(m) else m.identifier)
                ledger.pop(m.key, None)
            for key in batch.removed:
                state.discard(key)
                ledger.pop(key, None)
            for key, reason in batch.rejected:
                old = ledger.get(key)
                attempts = (old.attempts if old else 0) + 1
                ledger[key] = LedgerEntry(
                    sync_id=lease.sync_id,
                    key=key,
                    reason=reason,
                    attempts=attempts,
                    dead=attempts >= batch.max_rejection_attempts,
                    first_seen=old.first_seen if old else batch.at,
                    last_seen=batch.at,
                )
            if ledger:
                self._ledger[lease.sync_id] = ledger
            else:
                self._ledger.pop(lease.sync_id, None)
            self._batches.append(
                _Batch(
                    batch.run_id, batch.sequence, batch.operation, batch.idempotency_key, batch.at
                )
            )
            if batch.rejected:
                self._issues.setdefault(batch.run_id, []).extend(
                    MemberIssue(run_id=batch.run_id, key=k, kind=IssueKind.REJECTED, reason=r)
                    for k, r in batch.rejected
                )
            self._pending.get(lease.sync_id, {}).pop(batch.idempotency_key, None)
            if batch.slot is not None and batch.tally:
                old_progress = self._progress.get(lease.sync_id)
                tally = batch.tally
                if old_progress is not None:
                    tally = old_progress.tally + tally
                self._progress[lease.sync_id] = Progress(slot=batch.slot, tally=tally)
            version = token_hex(8)
            self._versions[lease.sync_id] = version
            return version

    def record_issues(self, lease: Lease, issues: Sequence[MemberIssue]) -> None:
        with self._lock:
            self._held(lease)
            for issue in issues:
                self._issues.setdefault(issue.run_id, []).append(issue)

    # -- ledger and history --------------------------------------------------

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        with self._lock:
            self._check_open()
            return sorted(self._ledger.get(sync_id, {}).values(), key=lambda e: e.key)

    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        with self._lock:
            self._check_open()
            runs = sorted(
                (r for (s, _), r in self._runs.items() if s == sync_id),
                key=lambda r: (r.started_at, r.slot),
                reverse=True,
            )
        return runs if limit is None else runs[:limit]

    def run_issues(self, run_id: str) -> list[MemberIssue]:
        with self._lock:
            self._check_open()
            return sorted(self._issues.get(run_id, []), key=lambda i: (i.kind, i.key))

    def purge_history(self, before: datetime) -> int:
        before = require_aware(before, "before")
        with self._lock:
            self._check_open()
            old = [k for k, r in self._runs.items() if r.finished_at < before]
            run_ids = {self._runs[k].id for k in old}
            for k in old:
                del self._runs[k]
            for run_id in run_ids:
                self._issues.pop(run_id, None)
            # Batches of runs that never completed age out on their own time.
            self._batches = [b for b in self._batches if b.run_id not in run_ids and b.at >= before]
            return len(old)

    def close(self) -> None:
        self._closed = True
