"""
Bulk creation: the spec of one sync to create, the answer of a bulk call, and
the pure parts of :meth:`cohortsync.Scheduler.create_syncs` (chunking the
input, allocating a chunk's slot buckets in memory) and of
:meth:`cohortsync.Scheduler.apply_syncs` (what a declaration owns and prunes).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator
from itertools import islice

import attrs

from cohortsync._policy import SyncPolicy
from cohortsync._sync import SyncStatus, Trigger
from cohortsync.exceptions import CohortSyncError
from cohortsync.storage._protocol import SLOT_BUCKET_SECONDS, SyncRecord
from cohortsync.storage._rules import SlotLoad

__all__ = [
    "ApplyResult",
    "BulkFailure",
    "BulkResult",
    "SlotAllocator",
    "SyncSpec",
    "chunks",
    "is_gone",
    "prunable",
]


@attrs.frozen
class SyncSpec:
    """
    One sync for :meth:`cohortsync.Scheduler.create_syncs`: the arguments of
    :meth:`~cohortsync.Scheduler.create_sync`, as a value.

    Nothing is checked here: the bulk call checks every spec and reports
    every refused one, with the same errors ``create_sync`` raises.

    Args:
        cohort_id: The registered cohort.
        destination_id: The registered destination.
        policy: The sync's policy.
        sync_id: The id; ``None`` makes one up. With ``upsert=True``, an id
            that exists updates that sync instead.
        mapping_id: A registered identifier mapping, or ``None`` for the
            identity mapping.
    """

    cohort_id: str
    destination_id: str
    policy: SyncPolicy
    sync_id: str | None = attrs.field(default=None, kw_only=True)
    mapping_id: str | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class BulkResult:
    """
    What a :meth:`cohortsync.Scheduler.create_syncs` call wrote.

    Attributes:
        created: Ids of the syncs created, in input order.
        updated: Ids of the existing syncs updated (``upsert=True``), in input order.
        unchanged: Ids of the existing syncs the spec already described
            (``upsert=True``: same policy and mapping), left as they were:
            their slot, generation and next run are kept.
    """

    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


@attrs.frozen
class BulkFailure:
    """
    One spec :meth:`cohortsync.Scheduler.create_syncs` refused, listed on
    :class:`~cohortsync.exceptions.BulkSyncError`.

    Attributes:
        position: Its index in the specs given (from 0).
        sync_id: The id it asked for, or ``None`` (one would have been made up).
        error: The error :meth:`~cohortsync.Scheduler.create_sync` raises for
            it (or, for an upsert of an existing sync,
            :meth:`~cohortsync.Scheduler.update_sync`).
    """

    position: int
    sync_id: str | None
    error: CohortSyncError


@attrs.frozen(kw_only=True)
class ApplyResult:
    """
    What a :meth:`cohortsync.Scheduler.apply_syncs` call did, or with
    ``dry_run=True`` would do (then nothing is written).

    Attributes:
        created: Ids of the declared syncs that did not exist, in input order.
        updated: Ids of the existing syncs whose policy or mapping the
            declaration changed (a new generation, a new slot), in input order.
        unchanged: Ids of the existing syncs the declaration already
            described, left exactly as they were (slot, generation, next
            run, and a paused sync's pause), in input order.
        deleted: Ids of the syncs pruned (``prune=True``): under the
            declaration's prefix, not declared, not deleted already; deleted
            as their policy's ``on_delete`` says. By id.
        refused: With ``dry_run=True``, every spec a real call would refuse
            (a real call raises :class:`~cohortsync.exceptions.BulkSyncError`
            instead, and prunes nothing).
        dry_run: Whether this is only the plan.
    """

    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    refused: tuple[BulkFailure, ...] = ()
    dry_run: bool = False


def is_gone(record: SyncRecord) -> bool:
    """
    A sync deleted, or being deleted (its removal run pending): nothing to
    prune, and its id cannot be declared again.
    """
    return record.sync.status is SyncStatus.DELETED or record.next_trigger is Trigger.TEARDOWN


def prunable(records: Iterable[SyncRecord], prefix: str, declared: Container[str]) -> Iterator[str]:
    """
    The ids a declaration under *prefix* prunes, from *records* in id order
    (as stores list them): those starting with *prefix*, not *declared*,
    not gone. In id order, no id after one that is greater than *prefix*
    without starting with it starts with it, so the walk stops there; a
    store ordering otherwise can only make it prune fewer, never a sync
    outside the prefix.
    """
    for record in records:
        if not record.id.startswith(prefix):
            if record.id > prefix:
                return
            continue
        if record.id not in declared and not is_gone(record):
            yield record.id


def chunks(items: Iterable[SyncSpec], size: int) -> Iterator[list[tuple[int, SyncSpec]]]:
    """
    *items* numbered from 0, *size* at a time: the input is read lazily, so a
    generator of a million specs never sits in memory whole.
    """
    numbered = enumerate(items)
    while part := list(islice(numbered, size)):
        yield part


@attrs.define
class SlotAllocator:
    """
    The slot buckets of one chunk of a bulk creation, picked in memory: one
    read of each period's counts (*read*), then each pick is the rule of
    :meth:`~cohortsync.storage.OptionalQueries.least_loaded_slot` over those
    counts with every earlier pick of the chunk counted, exactly what
    creating the syncs one by one would pick on a store nobody else writes.
    """

    read: Callable[[int, int], list[int]]
    """``slot_counts(period, buckets)`` of the store."""
    _loads: dict[int, SlotLoad] = attrs.field(factory=dict)

    def _load(self, period: int) -> SlotLoad:
        load = self._loads.get(period)
        if load is None:
            load = self._loads[period] = SlotLoad.of(
                self.read(period, period // SLOT_BUCKET_SECONDS)
            )
        return load

    def count(self, period: int, bucket: int) -> None:
        """Count a sync placed in *bucket* of the *period* at a chosen time (never moved)."""
        self._load(period).take(bucket)

    def pick(self, period: int, preferred_offset: int) -> tuple[int, int]:
        """
        ``(offset, bucket)`` for a sync whose stable offset in the *period*
        (seconds) is *preferred_offset*: the least loaded bucket, the same
        second inside it. The pick is counted.
        """
        load = self._load(period)
        bucket = load.least(preferred_offset // SLOT_BUCKET_SECONDS)
        load.take(bucket)
        return bucket * SLOT_BUCKET_SECONDS + preferred_offset % SLOT_BUCKET_SECONDS, bucket
