"""
:class:`StorageBase`: the class a store subclasses to write only the required parts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from itertools import islice
from types import TracebackType

import attrs
from typing_extensions import Self

from cohortsync._clock import require_aware
from cohortsync._destination import Identifier
from cohortsync._sync import SyncStatus
from cohortsync.exceptions import (
    ConfigurationError,
    ConflictError,
    CorruptStoreError,
    SyncNotFoundError,
)
from cohortsync.storage._protocol import (
    SLOT_BUCKET_SECONDS,
    BatchedRuns,
    BulkSyncWrites,
    Claim,
    Completion,
    Lease,
    PagedReads,
    Placement,
    Storage,
    SyncRecord,
)
from cohortsync.storage._rules import (
    least_loaded,
    record_claimable_at,
    require_buckets,
    scheduled_later,
    slot_bucket_of,
)

__all__ = [
    "StorageBase",
    "derive_claim_runs",
    "derive_complete_runs",
    "derive_create_sync_least_loaded",
    "derive_create_syncs",
    "derive_due_between",
    "derive_page_syncs",
    "derive_save_sync_at",
    "derive_slot_counts",
    "due_key",
    "iter_due",
    "iter_sync_records",
    "placed",
    "placement_of",
    "require_distinct_ids",
]

_CHUNK = 10_000
"""Delivered keys per :meth:`~cohortsync.storage.DeliveryStore.delivered_identifiers` call."""


class StorageBase(Storage, BatchedRuns, PagedReads, BulkSyncWrites):
    """
    The base of a store that implements the required parts and lets cohortsync
    derive the rest.

    Subclass it and implement every method of
    :class:`~cohortsync.storage.ScheduleStore`,
    :class:`~cohortsync.storage.DeliveryStore` and
    :class:`~cohortsync.storage.HistoryStore`, plus ``close()`` (they are
    abstract: a subclass that misses one cannot be instantiated). Each
    :class:`~cohortsync.storage.OptionalQueries` method it leaves out is
    answered here from the required ones, exactly but by a scan; override
    the ones your database can answer from an index.
    :func:`cohortsync.testing.check_storage` reports which ones a store
    implements and checks both its own answers and the derived ones.

    A store is also a context manager that closes it.
    """

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- derived from the schedule part ---------------------------------------------

    def next_due(self) -> datetime | None:
        due = (record_claimable_at(record) for record in self.list_syncs())
        return min((at for at in due if at is not None), default=None)

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        now = require_aware(now, "now")
        return scheduled_later(self.list_syncs(), now)

    def least_loaded_slot(self, period: int, buckets: int, preferred: int) -> int:
        require_buckets(buckets)
        taken = (slot_bucket_of(record) for record in self.list_syncs())
        counts = Counter(slot[1] for slot in taken if slot is not None and slot[0] == period)
        return least_loaded(counts, buckets, preferred)

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        return derive_claim_runs(self, now, owner, lease_for, limit)

    def slot_counts(self, period: int, buckets: int) -> list[int]:
        return derive_slot_counts(self, period, buckets)

    def create_syncs(self, records: Sequence[SyncRecord]) -> list[str]:
        return derive_create_syncs(self, records)

    def create_syncs_placed(
        self, ids: Sequence[str], place: Placement
    ) -> tuple[list[SyncRecord], list[str]]:
        return derive_create_syncs_placed(self, ids, place)

    def create_sync_least_loaded(self, record: SyncRecord, buckets: int) -> SyncRecord:
        return derive_create_sync_least_loaded(self, record, buckets)

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        derive_save_sync_at(self, record, expected_revision=expected_revision)

    def complete_runs(
        self, completions: Sequence[tuple[Lease, Completion]]
    ) -> list[Exception | None]:
        return derive_complete_runs(self, completions)

    def due_between(
        self, after: tuple[datetime, str] | None, until: datetime, limit: int
    ) -> list[SyncRecord]:
        return derive_due_between(self.list_syncs(), after, until, limit)

    def page_syncs(self, after: str | None, limit: int) -> list[SyncRecord]:
        return derive_page_syncs(self.list_syncs(), after, limit)

    # -- derived from the delivery part ---------------------------------------------

    def count_delivered(self, sync_id: str) -> int:
        return sum(1 for _ in self.iter_delivered(sync_id))

    def filter_delivered(self, sync_id: str, keys: Iterable[str]) -> set[str]:
        return set(self.delivered_identifiers(sync_id, list(keys)))

    def identifier_holders(
        self, sync_id: str, identifiers: Iterable[Identifier]
    ) -> dict[Identifier, list[str]]:
        wanted = set(identifiers)
        found: dict[Identifier, list[str]] = {}
        if not wanted:
            return found
        keys = self.iter_delivered(sync_id)
        while chunk := list(islice(keys, _CHUNK)):
            for key, ident in self.delivered_identifiers(sync_id, chunk).items():
                if ident in wanted:
                    found.setdefault(ident, []).append(key)
        return {ident: sorted(holders) for ident, holders in found.items()}

    # -- derived from the history part ----------------------------------------------

    def dead_letters(self, sync_id: str) -> set[str]:
        return {entry.key for entry in self.ledger(sync_id) if entry.dead}


# -- the derivations of the queries added in 0.2 -------------------------------------
#
# A store written for 0.1 that implements the whole protocol itself (without
# StorageBase) lacks these two; the scheduler derives them for it, so it keeps
# working (without their speed).


def derive_claim_runs(
    store: Storage, now: datetime, owner: str, lease_for: timedelta, limit: int
) -> list[Claim]:
    """:meth:`~cohortsync.storage.OptionalQueries.claim_runs` from the required parts."""
    claims = []
    for lease in store.claim_due(now, owner, lease_for, limit):
        sync_id = lease.sync_id
        record: SyncRecord | None
        try:
            record = store.get_sync(sync_id)
        except CorruptStoreError:
            record = None  # the run reads it again and reports the damage
        claims.append(
            Claim(
                lease=lease,
                record=record,
                delivered=store.count_delivered(sync_id),
                version=store.delivered_version(sync_id),
                pending=bool(store.pending_batches(sync_id)),
                ledger=bool(store.ledger(sync_id)),
                progress=store.progress(sync_id) is not None,
            )
        )
    return claims


def derive_complete_runs(
    store: Storage, completions: Sequence[tuple[Lease, Completion]]
) -> list[Exception | None]:
    """
    :meth:`~cohortsync.storage.BatchedRuns.complete_runs`: one
    :meth:`~cohortsync.storage.ScheduleStore.complete_run` each, so each
    answer is that call's own: whatever it raised (nothing of it written),
    or ``None``. It never raises: some completions may be written already.
    """
    out: list[Exception | None] = []
    for lease, completion in completions:
        try:
            store.complete_run(lease, completion)
        except Exception as exc:  # noqa: BLE001, PERF203 - answered per completion
            out.append(exc)
        else:
            out.append(None)
    return out


# -- the paged reads added in 0.2 ----------------------------------------------------
#
# A store written for 0.1 lacks them, and a store on StorageBase may leave them
# to the derivations above, which read every sync for each page. The scheduler
# streams through iter_due and iter_sync_records: a page at a time from a store
# that answers natively, else one list_syncs() for the whole stream.

_PAGE = 1_024
"""Most records per page of a paged read."""
_FIRST_PAGE = 16
"""Records in a stream's first page: most callers want only the first few."""


def due_key(record: SyncRecord) -> tuple[datetime, str]:
    """The ``(next_due, id)`` key of a scheduled record (:meth:`PagedReads.due_between`)."""
    assert record.next_due is not None  # noqa: S101 - only scheduled records have a key
    return record.next_due, record.id


def _due(record: SyncRecord, until: datetime) -> bool:
    due = record.next_due
    return record.sync.status is SyncStatus.ACTIVE and due is not None and due <= until


def derive_due_between(
    records: Iterable[SyncRecord],
    after: tuple[datetime, str] | None,
    until: datetime,
    limit: int,
) -> list[SyncRecord]:
    """:meth:`~cohortsync.storage.PagedReads.due_between` from every stored record."""
    until = require_aware(until, "until")
    due = sorted((r for r in records if _due(r, until)), key=due_key)
    if after is not None:
        due = [r for r in due if due_key(r) > after]
    return due[: max(limit, 0)]


def derive_page_syncs(
    records: Iterable[SyncRecord], after: str | None, limit: int
) -> list[SyncRecord]:
    """:meth:`~cohortsync.storage.PagedReads.page_syncs` from every stored record (by id)."""
    ordered = sorted(records, key=lambda r: r.id)
    if after is not None:
        ordered = [r for r in ordered if r.id > after]
    return ordered[: max(limit, 0)]


_ALL = 1 << 62
"""A limit no store reaches."""


def _native(store: Storage, name: str) -> Callable[..., list[SyncRecord]] | None:
    """
    The store's own *name* method, or ``None`` when it lacks one (a store
    written for 0.1) or leaves it to :class:`StorageBase`, whose derivation
    reads every sync for each page: a stream then reads them once.
    """
    method: Callable[..., list[SyncRecord]] | None = getattr(store, name, None)
    if method is None or getattr(type(store), name, None) is getattr(StorageBase, name):
        return None
    return method


def _pages(first: int) -> Iterator[int]:
    """Page sizes of a stream: small first (most callers want the first few), then larger."""
    size = min(max(first, 1), _PAGE)
    while True:
        yield size
        size = min(size * 4, _PAGE)


def iter_due(store: Storage, until: datetime, *, first: int = _FIRST_PAGE) -> Iterator[SyncRecord]:
    """
    Active syncs due at or before *until*, in ``(next_due, id)`` order, read a
    page at a time when the store answers
    :meth:`~cohortsync.storage.PagedReads.due_between` natively (else from one
    :meth:`~cohortsync.storage.ScheduleStore.list_syncs`). Lazy: nothing is
    read before the first record is asked for, and the first page holds
    *first* records (a caller that wants so many reads no more).
    """
    until = require_aware(until, "until")
    due_between = _native(store, "due_between")
    if due_between is None:
        yield from derive_due_between(store.list_syncs(), None, until, _ALL)
        return
    after: tuple[datetime, str] | None = None
    for size in _pages(first):
        page = due_between(after, until, size)
        yield from page
        if len(page) < size:
            return
        after = due_key(page[-1])


def iter_sync_records(
    store: Storage, after: str | None = None, *, first: int = _FIRST_PAGE
) -> Iterator[SyncRecord]:
    """
    Every sync after the id *after*, by id, read a page at a time when the
    store answers :meth:`~cohortsync.storage.PagedReads.page_syncs` natively
    (else from one :meth:`~cohortsync.storage.ScheduleStore.list_syncs`). Lazy.
    """
    page_syncs = _native(store, "page_syncs")
    if page_syncs is None:
        yield from derive_page_syncs(store.list_syncs(), after, _ALL)
        return
    for size in _pages(first):
        page = page_syncs(after, size)
        yield from page
        if len(page) < size:
            return
        after = page[-1].id


# -- the derivations of the bulk writes added in 0.2 ---------------------------------


def derive_slot_counts(store: Storage, period: int, buckets: int) -> list[int]:
    """:meth:`~cohortsync.storage.BulkSyncWrites.slot_counts` from :meth:`list_syncs`."""
    require_buckets(buckets)
    counts = [0] * buckets
    for record in store.list_syncs():
        slot = slot_bucket_of(record)
        if slot is not None and slot[0] == period and 0 <= slot[1] < buckets:
            counts[slot[1]] += 1
    return counts


def require_distinct_ids(records: Sequence[SyncRecord]) -> None:
    """
    Refuse a bulk write naming one id twice (a store could not say which
    record the id holds).

    Raises:
        ConfigurationError: Some id is repeated; the value lists each once.
    """
    counts = Counter(r.id for r in records)
    if len(counts) != len(records):
        repeated = sorted(sync_id for sync_id, n in counts.items() if n > 1)
        raise ConfigurationError("records", repeated, "each id may appear once in a bulk write")


def derive_create_syncs(store: Storage, records: Sequence[SyncRecord]) -> list[str]:
    """
    :meth:`~cohortsync.storage.BulkSyncWrites.create_syncs`: one
    :meth:`~cohortsync.storage.ScheduleStore.create_sync` each (each its own
    transaction); a taken id is answered, not raised.
    """
    require_distinct_ids(records)
    taken = []
    for record in records:
        try:
            store.create_sync(record)
        except ConfigurationError:  # noqa: PERF203 - answered per record
            if not _exists(store, record.id):
                raise  # refused for another reason than a taken id
            taken.append(record.id)
    return taken


def derive_create_syncs_placed(
    store: Storage, ids: Sequence[str], place: Placement
) -> tuple[list[SyncRecord], list[str]]:
    """
    :meth:`~cohortsync.storage.BulkSyncWrites.create_syncs_placed` in steps:
    the taken ids and the counts are read, then :meth:`create_syncs` writes
    (not under one lock: concurrent creators may pick from the same counts).
    """
    native = getattr(store, "slot_counts", None)

    def counts(period: int, buckets: int) -> list[int]:
        return native(period, buckets) if native else derive_slot_counts(store, period, buckets)

    records = list(place(counts, {sync_id for sync_id in ids if _exists(store, sync_id)}))
    create = getattr(store, "create_syncs", None)
    return written(records, create(records) if create else derive_create_syncs(store, records))


def written(
    records: Sequence[SyncRecord], taken: Sequence[str]
) -> tuple[list[SyncRecord], list[str]]:
    """``(records whose id was not taken, taken ids)``, as ``create_syncs_placed`` answers."""
    skip = set(taken)
    return [r for r in records if r.id not in skip], list(taken)


def placement_of(record: SyncRecord, buckets: int) -> tuple[int, int]:
    """
    ``(period, preferred bucket)`` of a record for
    :meth:`~cohortsync.storage.BulkSyncWrites.create_sync_least_loaded`.

    Raises:
        ConfigurationError: *buckets* is below 1, or the record has no slot
            bucket.
    """
    require_buckets(buckets)
    slot = slot_bucket_of(record)
    if slot is None:
        raise ConfigurationError(
            "slot_bucket", record.slot_bucket, "the record's policy is not spread over slots"
        )
    return slot[0], slot[1] % buckets


def placed(record: SyncRecord, bucket: int) -> SyncRecord:
    """*record* moved to *bucket*, keeping its second within the bucket."""
    offset = bucket * SLOT_BUCKET_SECONDS + record.offset % SLOT_BUCKET_SECONDS
    return attrs.evolve(record, offset=offset, slot_bucket=bucket)


def derive_create_sync_least_loaded(store: Storage, record: SyncRecord, buckets: int) -> SyncRecord:
    """
    :meth:`~cohortsync.storage.BulkSyncWrites.create_sync_least_loaded` in two
    steps: :meth:`~cohortsync.storage.OptionalQueries.least_loaded_slot`, then
    :meth:`~cohortsync.storage.ScheduleStore.create_sync`.
    """
    period, preferred = placement_of(record, buckets)
    stored = placed(record, store.least_loaded_slot(period, buckets, preferred))
    store.create_sync(stored)
    return stored


def derive_save_sync_at(store: Storage, record: SyncRecord, *, expected_revision: int) -> None:
    """
    :meth:`~cohortsync.storage.BulkSyncWrites.save_sync_at` in two steps:
    :meth:`~cohortsync.storage.ScheduleStore.get_sync`, then
    :meth:`~cohortsync.storage.ScheduleStore.save_sync` compared on the
    generation read. **Not atomic**: a write between the two is overwritten
    (only a change of generation in between is refused).

    Raises:
        SyncNotFoundError: No such sync.
        ConflictError: The stored revision is not *expected_revision*.
    """
    current = store.get_sync(record.id)
    if current.revision != expected_revision:
        raise ConflictError(record.id, expected_revision, current.revision, counter="revision")
    store.save_sync(record, expected_generation=current.sync.generation)


def _exists(store: Storage, sync_id: str) -> bool:
    try:
        store.get_sync(sync_id)
    except SyncNotFoundError:
        return False
    except CorruptStoreError:
        return True
    return True
