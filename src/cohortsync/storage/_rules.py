"""
The rules every store applies the same way, as pure functions over the records.

A store decides nothing of its own: which slot a claim runs, when a sync is
next claimable, which bucket is least loaded and what a completed run writes
are defined here once. ``MemoryStorage`` calls these functions on its
records; the SQL stores read the few columns a rule needs (inside the
transaction that writes the result) and call the same functions; a host's
store does either. The contract suite checks that the results agree.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import repeat
from operator import attrgetter, is_
from typing import Any

import attrs

from cohortsync._clock import add_saturating
from cohortsync._destination import Identifier, IdentifierKind, Member, identity_identifiers
from cohortsync._schedule import spread_period
from cohortsync._sync import SyncStatus
from cohortsync._validators import evolve_trusted
from cohortsync.exceptions import ConfigurationError
from cohortsync.storage._protocol import Completion, Lease, SyncRecord

__all__ = [
    "SlotLoad",
    "apply_claim",
    "apply_completion",
    "claim_slot",
    "claimable_at",
    "collect_holders",
    "completion_changes",
    "earliest_claimable",
    "identity_keys",
    "is_identity",
    "least_loaded",
    "record_claimable_at",
    "require_buckets",
    "scheduled_later",
    "slot_bucket_of",
]

_TICK = timedelta(microseconds=1)


def claim_slot(next_due: datetime, last_slot: datetime | None) -> datetime:
    """
    The slot a claim of a sync due at *next_due* runs: *next_due* itself,
    unless a run is already recorded at or after it (the host asked for a run
    at the very instant of the last one, or the clock went back), then one
    microsecond after the last recorded slot.

    Every store applies this rule in its claim (and sets ``next_due`` to the
    result), so run records are unique per slot by construction and no host
    call needs special cases for "now".
    """
    if last_slot is None or next_due > last_slot:
        return next_due
    return last_slot + _TICK


def apply_claim(
    record: SyncRecord, *, owner: str, token: str, expires_at: datetime
) -> tuple[SyncRecord, Lease]:
    """
    The sync's record as :meth:`~cohortsync.storage.Storage.claim_due` leaves it
    when it leases *record* (active, due, and free or with an expired lease),
    and the lease it hands out.

    The lease runs the slot :func:`claim_slot` gives, and ``next_due`` moves
    to that slot; it carries the record's generation, revision and next
    trigger, which the run and its completion compare against later.

    Raises:
        ValueError: *record* is not scheduled.
    """
    if record.next_due is None:
        raise ValueError(f"sync {record.id!r} is not scheduled: nothing to claim")
    slot = claim_slot(record.next_due, record.last_slot)
    lease = Lease(
        sync_id=record.id,
        generation=record.sync.generation,
        slot=slot,
        trigger=record.next_trigger,
        owner=owner,
        token=token,
        expires_at=expires_at,
        revision=record.revision,
    )
    # Trusted: every value comes from the stored record or the validated lease.
    return evolve_trusted(record, lease=lease, next_due=slot), lease


def claimable_at(next_due: datetime, lease_expires: datetime | None) -> datetime:
    """
    When an active sync due at *next_due* can be claimed: then, or for a
    leased one just after its lease expires, whichever is later.
    """
    if lease_expires is None:
        return next_due
    return max(next_due, add_saturating(lease_expires, _TICK))


def earliest_claimable(due_order: Iterable[tuple[datetime, datetime | None]]) -> datetime | None:
    """
    The answer of :meth:`~cohortsync.storage.Storage.next_due` from ``(next_due,
    lease expiry)`` of the active scheduled syncs, **in ascending next_due
    order**. It stops at the first sync due no earlier than the best instant
    found, so a store walking its due index reads a handful of rows: only the
    few syncs with a lease (runs in flight) can be claimable later than due.
    """
    best: datetime | None = None
    for due, expires in due_order:
        if best is not None and due >= best:
            break
        at = claimable_at(due, expires)
        if best is None or at < best:
            best = at
    return best


def slot_bucket_of(record: SyncRecord) -> tuple[int, int] | None:
    """
    ``(period seconds, bucket)`` a stored sync occupies in the slot
    allocator's counts, or ``None``. Stores keep the counts in the same
    transaction as the sync write (create, save, delete), so they never drift.
    """
    if record.slot_bucket is None:
        return None
    period = spread_period(record.sync.policy)
    if period is None:
        return None
    return period, record.slot_bucket


def require_buckets(buckets: int) -> None:
    """
    Refuse a slot allocation over no buckets.

    Raises:
        ConfigurationError: *buckets* is below 1.
    """
    if buckets < 1:
        raise ConfigurationError("buckets", buckets, "must be >= 1")


def least_loaded(counts: Mapping[int, int], buckets: int, preferred: int) -> int:
    """
    The answer of :meth:`~cohortsync.storage.Storage.least_loaded_slot` from the
    syncs counted per bucket (missing buckets hold none): the least occupied
    of *buckets*, ties going to the first at or after *preferred*, cyclically.
    """
    return min(range(buckets), key=lambda b: (counts.get(b, 0), (b - preferred) % buckets))


@attrs.define
class SlotLoad:
    """
    The occupancy of one period's slot buckets, indexed by level so the least
    loaded bucket (the rule of :func:`least_loaded`) is found in O(log n)
    whatever the number of syncs, and taking a bucket costs no more.

    ``MemoryStorage`` keeps one per period; the scheduler builds one from a
    store's counts to allocate a whole chunk of a bulk creation in memory
    (each pick counted before the next, exactly as one-by-one creates would
    count them), then writes the counts once.
    """

    buckets: int
    counts: list[int]
    levels: dict[int, list[int]]
    low: int = 0

    @classmethod
    def empty(cls, buckets: int) -> SlotLoad:
        require_buckets(buckets)
        return cls(buckets, [0] * buckets, {0: list(range(buckets))})

    @classmethod
    def of(cls, counts: Sequence[int]) -> SlotLoad:
        """
        The load of ``len(counts)`` buckets holding *counts* syncs each.
        """
        require_buckets(len(counts))
        levels: dict[int, list[int]] = {}
        for bucket, n in enumerate(counts):
            levels.setdefault(n, []).append(bucket)  # ascending: buckets come in order
        return cls(len(counts), list(counts), levels, min(levels))

    def _move(self, bucket: int, old: int, new: int) -> None:
        level = self.levels[old]
        del level[bisect.bisect_left(level, bucket)]
        if not level:
            del self.levels[old]
        bisect.insort(self.levels.setdefault(new, []), bucket)
        self.counts[bucket] = new

    def least(self, preferred: int) -> int:
        """
        The least loaded bucket, ties going to the first at or after
        *preferred* (cyclically): :func:`least_loaded` of these counts.
        """
        while self.low not in self.levels:
            self.low += 1
        level = self.levels[self.low]
        i = bisect.bisect_left(level, preferred % self.buckets)
        return level[i] if i < len(level) else level[0]

    def take(self, bucket: int) -> None:
        n = self.counts[bucket]
        self._move(bucket, n, n + 1)

    def release(self, bucket: int) -> None:
        n = self.counts[bucket]
        if n > 0:
            self._move(bucket, n, n - 1)
            self.low = min(self.low, n - 1)


def is_identity(member: Member) -> bool:
    """
    Whether *member* is delivered under the identity mapping (its own key as
    ``USER_ID``): the common case, which stores keep without an identifier.
    """
    ident = member.identifier
    return ident.kind is IdentifierKind.USER_ID and ident.value == member.key


_KEY = attrgetter("key")
_KIND = attrgetter("identifier.kind")
_VALUE = attrgetter("identifier.value")


def identity_keys(members: Iterable[Member]) -> list[str] | None:
    """
    The keys of *members* if every one is delivered under the identity mapping
    (see :func:`is_identity`), else ``None``: one check of a whole batch at C
    speed, so a store can write its rows without a Python call per member.
    """
    members = members if isinstance(members, (list, tuple)) else list(members)
    keys = list(map(_KEY, members))
    if keys != list(map(_VALUE, members)):
        return None
    if not all(map(is_, map(_KIND, members), repeat(IdentifierKind.USER_ID))):
        return None
    return keys


def collect_holders(
    wanted: set[Identifier],
    by_value: Iterable[tuple[str, Identifier]],
    own: Iterable[str],
) -> dict[Identifier, list[str]]:
    """
    The answer of :meth:`~cohortsync.storage.Storage.identifier_holders` from a
    store's rows: *by_value* are (key, identifier) rows whose stored identifier
    value was asked for (kept when the whole identifier was), *own* the keys
    found among the asked ``USER_ID`` values that were delivered under the
    identity mapping (they hold ``Identifier(USER_ID, key)``).
    """
    found: dict[Identifier, set[str]] = {}
    for key, ident in by_value:
        if ident in wanted:
            found.setdefault(ident, set()).add(key)
    keys = list(own)
    if not found:
        # The usual answer under the identity mapping: each key found holds
        # its own identifier, and nobody else holds any of them (a store's
        # key is unique, so each of these identifiers has one holder).
        ids = identity_identifiers(IdentifierKind.USER_ID, keys)
        return dict(zip(ids, ([k] for k in keys), strict=True))
    for key in keys:
        found.setdefault(Identifier(IdentifierKind.USER_ID, key), set()).add(key)
    return {ident: sorted(keys) for ident, keys in found.items()}


def completion_changes(
    lease: Lease,
    completion: Completion,
    *,
    generation: int,
    revision: int,
    next_due: datetime | None,
    last_slot: datetime | None,
) -> dict[str, Any]:
    """
    The :class:`~cohortsync.storage.SyncRecord` fields, by name, that
    :func:`apply_completion` sets, decided from what is stored now: the
    sync's *generation*, *revision*, *next_due* and *last_slot*. A SQL store
    reads just these columns in the completing transaction and writes the
    result as an ``UPDATE``.
    """
    slot = completion.run.slot
    changes: dict[str, Any] = {
        "lease": None,
        "last_slot": slot if last_slot is None else max(last_slot, slot),
        # A completion changes the record like a save does: a host call that
        # read it before must not write over what the run wrote.
        "revision": revision + 1,
    }
    unchanged = generation == lease.generation and revision == lease.revision
    advance = unchanged and next_due == lease.slot
    if advance:
        changes["next_due"] = completion.next_due
        changes["next_trigger"] = completion.next_trigger
        changes["attempts"] = completion.attempts
        changes["scheduled_from"] = completion.scheduled_from
    if unchanged and completion.sync is not None:
        changes["sync"] = completion.sync
    if completion.feed_cursor is not None:
        changes["feed_cursor"] = completion.feed_cursor
    if completion.full_sync_done:
        if advance:
            changes["full_resync"] = False
        changes["last_full_sync_at"] = completion.run.started_at
    return changes


def apply_completion(record: SyncRecord, lease: Lease, completion: Completion) -> SyncRecord:
    """
    The sync's record as :meth:`~cohortsync.storage.Storage.complete_run`
    leaves it: the completion rule, which every store applies.

    The run's own facts always stand: the lease is released, ``last_slot``
    becomes the run's slot (never moving back), the revision is bumped (a
    host call that read the record before the run completed then conflicts
    and re-reads, instead of writing back what it read), a new feed cursor
    is kept and a full sync stamps ``last_full_sync_at``. What the run decided about
    the future (the next due instant and trigger, the attempt count, a
    replacement definition, clearing the full-resync request) applies only
    if nobody changed the sync meanwhile: the same generation and revision
    as *lease* saw, and for the schedule also the same ``next_due`` (a
    "sync now", update, pause or deletion made during the run wins). Slot
    counts never move: a completion replaces a definition's status or
    effective cadence, never its policy.

    The rest of ``complete_run`` is bookkeeping in the same transaction:
    check the caller still holds *lease* (compare-and-set on its token),
    insert ``completion.run`` (unique per sync and slot), delete the pending
    batches named in ``completion.resolved`` and the sync's progress.

    Args:
        record: The sync's record as stored when the run completes.
        lease: The lease the run holds.
        completion: What the run reports.
    """
    # Trusted: every change comes from the validated lease and completion.
    return evolve_trusted(
        record,
        **completion_changes(
            lease,
            completion,
            generation=record.sync.generation,
            revision=record.revision,
            next_due=record.next_due,
            last_slot=record.last_slot,
        ),
    )


def record_claimable_at(record: SyncRecord) -> datetime | None:
    """
    When *record* can next be claimed, or ``None`` if it is not active and scheduled.
    """
    if record.sync.status is not SyncStatus.ACTIVE or record.next_due is None:
        return None
    return claimable_at(record.next_due, None if record.lease is None else record.lease.expires_at)


def scheduled_later(records: Iterable[SyncRecord], now: datetime) -> list[SyncRecord]:
    """
    The answer of :meth:`~cohortsync.storage.Storage.scheduled_after` from the
    stored records: the active ones without a lease whose schedule was
    computed from an instant later than *now*.
    """
    # One pass without a call per record: the scheduler asks every round.
    active = SyncStatus.ACTIVE
    return [
        r
        for r in records
        if r.scheduled_from is not None
        and r.scheduled_from > now
        and r.lease is None
        and r.sync.status is active
    ]
