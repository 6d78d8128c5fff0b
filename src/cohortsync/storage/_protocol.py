"""
The storage protocol: everything cohortsync persists goes through :class:`Storage`,
and the records it takes and returns.

:class:`Storage` is composed of parts: three required ones
(:class:`ScheduleStore`, :class:`DeliveryStore`, :class:`HistoryStore`) and
:class:`OptionalQueries`, reads that :class:`~cohortsync.storage.StorageBase`
derives from the required parts for a store that leaves them out. A host may
implement it on its own database; ``cohortsync.testing.check_storage``
verifies an implementation and reports which parts it implements.

Every time value is passed in by the caller (from its
:class:`~cohortsync.Clock`): a store never reads its database's clock, so
fake clocks work and hosts with skewed clocks agree on one timeline.

Operations marked **atomic** must happen entirely or not at all, and must be
safe when several processes call them on the same store at once. Leases are
compare-and-set on their token: an operation that needs a lease fails with
:class:`~cohortsync.exceptions.LeaseLostError` when the stored token differs
(the lease expired and another worker claimed the sync, or it was released).
"""

from __future__ import annotations

import enum
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

import attrs

from cohortsync import _validators as v
from cohortsync._destination import Identifier, Member, Operation
from cohortsync._sync import Sync, SyncRun, Trigger

__all__ = [
    "SLOT_BUCKET_SECONDS",
    "AppliedBatch",
    "BatchedRuns",
    "BulkSyncWrites",
    "Claim",
    "Completion",
    "DeliveryStore",
    "HistoryStore",
    "IssueKind",
    "Lease",
    "LedgerEntry",
    "MemberIssue",
    "OptionalQueries",
    "PagedReads",
    "PendingBatch",
    "Progress",
    "ScheduleStore",
    "Storage",
    "SyncRecord",
    "Tally",
]

SLOT_BUCKET_SECONDS = 60
"""The load-aware allocator balances syncs per minute of the period."""


@attrs.frozen(kw_only=True)
class Lease:
    """
    Proof that a worker may run one slot of one sync until ``expires_at``.

    ``slot`` is the scheduled instant being run (the sync's ``next_due`` when it
    was claimed); the run record is unique on (sync, slot). ``revision`` is
    the sync's revision when it was claimed: host changes made during the run
    (a new revision) win over the run's own schedule and definition changes.
    """

    sync_id: str
    generation: int
    slot: datetime = attrs.field(converter=v.to_utc)
    trigger: Trigger
    owner: str
    token: str = attrs.field(repr=lambda t: repr(t[:8] + "..."))
    expires_at: datetime = attrs.field(converter=v.to_utc)
    revision: int = 0


@attrs.frozen(kw_only=True)
class SyncRecord:
    """
    A sync's definition and its schedule state, as stored.

    Args:
        sync: The definition.
        next_due: When it is next due, or ``None`` when nothing is scheduled.
        next_trigger: What the next due run is (scheduled, manual, ...).
        offset: The slot offset in seconds inside the period (stable until
            the sync is updated).
        slot_bucket: The allocator bucket the offset came from, or ``None``.
        anchor: When the sync was created or last updated.
        attempts: Consecutive failed attempts of the current slot.
        full_resync: The next run sends the whole membership.
        feed_cursor: The change-feed position delivered so far (real-time).
        last_full_sync_at: When the whole audience was last sent (TTL refresh).
        lease: The lease held on it, if any.
        last_slot: The slot of the sync's last recorded run. Claims never hand
            out a slot at or before it (see :func:`claim_slot`), so a run
            record stays unique per slot whatever the clock or the host does.
        scheduled_from: The instant ``next_due`` was computed from (when the
            last run finished). If the clock now reads earlier, the clock went
            back and the schedule is recomputed from the present.
        revision: Bumped by the store on every :meth:`Storage.save_sync`,
            :meth:`~BulkSyncWrites.save_sync_at` (a host's change) and
            :meth:`Storage.complete_run` (a run's); a run's
            completion changes the schedule, flags and definition only if it
            is still the revision the lease saw, and a host's write happens
            only if it is still the revision the host read.
    """

    sync: Sync
    next_due: datetime | None = attrs.field(converter=v.optional_to_utc)
    next_trigger: Trigger = Trigger.SCHEDULED
    offset: int = attrs.field(default=0, validator=v.count(0))
    slot_bucket: int | None = None
    anchor: datetime = attrs.field(converter=v.to_utc)
    attempts: int = attrs.field(default=0, validator=v.count(0))
    full_resync: bool = False
    feed_cursor: str | None = None
    last_full_sync_at: datetime | None = attrs.field(default=None, converter=v.optional_to_utc)
    lease: Lease | None = None
    last_slot: datetime | None = attrs.field(default=None, converter=v.optional_to_utc)
    scheduled_from: datetime | None = attrs.field(default=None, converter=v.optional_to_utc)
    revision: int = 0

    @property
    def id(self) -> str:
        """
        The sync's id, the record's key in every store.
        """
        return self.sync.id


@attrs.frozen(kw_only=True)
class Tally:
    """
    What one applied batch adds to its run's counts (all zero for local
    bookkeeping that sent nothing).
    """

    added: int = 0
    removed: int = 0
    rejected: int = 0
    batches: int = 0
    collisions: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            added=self.added + other.added,
            removed=self.removed + other.removed,
            rejected=self.rejected + other.rejected,
            batches=self.batches + other.batches,
            collisions=self.collisions + other.collisions,
        )

    def __bool__(self) -> bool:
        return any((self.added, self.removed, self.rejected, self.batches, self.collisions))


@attrs.frozen(kw_only=True)
class Progress:
    """
    What the attempts of a slot that have not completed yet delivered: kept
    by :meth:`Storage.apply_batch`, cleared by :meth:`Storage.complete_run`.

    A run that takes over a crashed attempt folds it into its own record, so
    the slot's history accounts for everything delivered in it.
    """

    slot: datetime = attrs.field(converter=v.to_utc)
    tally: Tally = Tally()


@attrs.frozen(kw_only=True)
class Completion:
    """
    What :meth:`Storage.complete_run` writes in one transaction.

    Args:
        run: The history record (unique per sync and slot).
        next_due: The next due instant. Applied only if the sync's generation,
            revision and ``next_due`` are still what the lease saw: an update,
            pause, deletion or "sync now" made during the run wins over the
            run's own advance.
        next_trigger: What that next run will be.
        sync: A replacement definition (same id and generation) carrying a
            status or effective-cadence change, or ``None``. Applied under the
            same condition as *next_due*.
        attempts: The new consecutive-failure count.
        feed_cursor: The new change-feed cursor, or ``None`` to keep the stored one.
        full_sync_done: The run delivered the whole audience: stamps
            ``last_full_sync_at`` and, under the same condition as
            *next_due*, clears the full-resync request (a request made during
            the run is kept for the next one).
    """

    run: SyncRun
    next_due: datetime | None = attrs.field(converter=v.optional_to_utc)
    next_trigger: Trigger = Trigger.SCHEDULED
    sync: Sync | None = None
    attempts: int = 0
    feed_cursor: str | None = None
    full_sync_done: bool = False
    resolved: tuple[str, ...] = ()
    """Idempotency keys of pending batches this run reconciled: their records are deleted."""
    scheduled_from: datetime | None = attrs.field(default=None, converter=v.optional_to_utc)
    """The instant ``next_due`` was computed from; stored with it (see :class:`SyncRecord`)."""


@attrs.frozen(kw_only=True)
class Claim:
    """
    A claimed slot with everything an ordinary run needs to know before it
    reads the source: :meth:`OptionalQueries.claim_runs` returns it so a run
    makes no further reads of the store unless one of the flags says so.

    Args:
        lease: The lease, as :meth:`ScheduleStore.claim_due` gives it.
        record: The sync's record as the claim left it, or ``None`` when the
            stored row cannot be decoded (the run then reads it with
            :meth:`ScheduleStore.get_sync`, which reports the damage, and
            the other claimed syncs are not held up).
        delivered: :meth:`OptionalQueries.count_delivered` of the sync.
        version: :meth:`DeliveryStore.delivered_version` of the sync.
        pending: The sync has batches recorded as in flight
            (:meth:`DeliveryStore.pending_batches` is not empty).
        ledger: The sync has rejected members (:meth:`HistoryStore.ledger`
            is not empty).
        progress: An attempt that did not complete applied batches
            (:meth:`DeliveryStore.progress` is not ``None``).

    All of it is read in the claim's own transaction; only the lease holder
    can change any of it until the run completes.
    """

    lease: Lease
    record: SyncRecord | None
    delivered: int = attrs.field(default=0, validator=v.count(0))
    version: str = ""
    pending: bool = False
    ledger: bool = False
    progress: bool = False


@attrs.frozen(kw_only=True)
class PendingBatch:
    """
    A batch about to be sent, recorded before the destination sees it.

    If the worker dies, or the destination times out, after sending but before
    the acknowledgement is applied, nobody knows whether the destination holds
    the change. The next run reads these records and reconciles: members of a
    pending add who are no longer in the cohort are removed, members of a
    pending removal who are back are added again. Without this, a member who
    left the cohort in between would stay at the destination for good.
    """

    run_id: str
    idempotency_key: str
    operation: Operation
    members: tuple[Member, ...] = attrs.field(repr=lambda m: f"<{len(m)} members>")


@attrs.frozen(kw_only=True)
class AppliedBatch:
    """
    One acknowledged batch, applied to the delivered state by
    :meth:`Storage.apply_batch` in the same transaction that records it.

    Args:
        run_id: The run the batch belongs to.
        sequence: Its position in the run.
        operation: What was sent.
        idempotency_key: The key it was sent with.
        added: Members the destination now holds (acknowledged adds and
            existing members).
        removed: Member keys the destination no longer holds.
        rejected: ``(member key, reason)`` the destination refused; they go to
            the ledger and are not applied.
        at: When it was acknowledged.
        max_rejection_attempts: A member rejected this many times becomes a
            dead letter.
        slot: The slot of the run applying it (for :class:`Progress`).
        tally: What it adds to the run's counts.
    """

    run_id: str
    sequence: int
    operation: Operation
    idempotency_key: str
    added: tuple[Member, ...] = ()
    removed: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()
    at: datetime = attrs.field(converter=v.to_utc)
    max_rejection_attempts: int = 3
    slot: datetime | None = attrs.field(default=None, converter=v.optional_to_utc)
    tally: Tally = Tally()


@attrs.frozen(kw_only=True)
class LedgerEntry:
    """
    A member a destination rejected: retried on later runs until ``attempts``
    reaches the policy's bound, then a dead letter.
    """

    sync_id: str
    key: str
    reason: str = attrs.field(converter=v.to_storable)
    attempts: int
    dead: bool
    first_seen: datetime = attrs.field(converter=v.to_utc)
    last_seen: datetime = attrs.field(converter=v.to_utc)


class IssueKind(str, enum.Enum):
    """
    Kinds of member-level issue a run records.

    A ``str`` enum: a member compares equal to its value, and the value is what
    stores write and what :meth:`~cohortsync.Scheduler.export_history` shows.
    """

    SKIPPED = "skipped"
    REJECTED = "rejected"

    def __str__(self) -> str:
        # The stored text on every Python version (3.11 changed str() of mixins).
        return self.value


def _to_issue_kind(value: IssueKind | str) -> IssueKind:
    # A store reads the kind back as plain text: accept it, refuse anything else.
    return v.to_enum(IssueKind, "kind")(value)


@attrs.frozen(kw_only=True)
class MemberIssue:
    """
    A member a run could not deliver, and why (exported with the history).

    ``kind`` takes an :class:`IssueKind` or its value, as a store reads it back.
    """

    run_id: str
    key: str
    kind: IssueKind = attrs.field(converter=_to_issue_kind)
    reason: str = attrs.field(converter=v.to_storable)


# -- the protocol, part by part -----------------------------------------------------
#
# Required methods are abstract: a class that subclasses a part (or StorageBase)
# and misses one cannot be instantiated. The empty __slots__ keep the shipped
# stores' own slots effective.


@runtime_checkable
class ScheduleStore(Protocol):
    """
    **Required part:** sync definitions, their schedule state, claims and leases.
    """

    __slots__ = ()

    @abstractmethod
    def create_sync(self, record: SyncRecord) -> None:
        """
        Store a new sync and count it in its slot bucket (see
        :func:`slot_bucket_of`), in one transaction. **Atomic.**

        Raises:
            ConfigurationError: A sync with that id exists.
        """

    @abstractmethod
    def get_sync(self, sync_id: str) -> SyncRecord:
        """
        Raises:
            SyncNotFoundError: No such sync.
        """

    @abstractmethod
    def list_syncs(self) -> list[SyncRecord]:
        """
        Every stored sync, ordered by id.
        """

    @abstractmethod
    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        """
        Replace a sync's definition and schedule fields (never its lease, nor
        ``last_slot``), bump its revision and move its count from the old slot
        bucket to the new one when they differ. **Atomic, compare-and-set** on
        the stored generation.

        Raises:
            SyncNotFoundError: No such sync.
            ConflictError: The stored generation is not *expected_generation*.
        """

    @abstractmethod
    def delete_sync(self, sync_id: str) -> None:
        """
        Remove a sync, its delivered state, pending batches, progress, ledger
        and its slot bucket count. History stays until retention purges it.
        **Atomic.** Unknown ids are ignored.
        """

    @abstractmethod
    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        """
        Lease up to *limit* active syncs whose ``next_due <= now`` and that hold
        no lease, or whose lease expired (``expires_at < now``), earliest due
        first. **Atomic:** no two callers ever receive the same sync's slot while
        its lease is valid. Each lease gets a fresh random token.

        The lease's slot is :func:`claim_slot` of the stored ``next_due`` and
        ``last_slot``, and ``next_due`` is set to it in the same statement.
        """

    @abstractmethod
    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        """
        Move the lease's expiry to ``now + lease_for``. **Atomic, compare-and-set**
        on the token.

        Raises:
            LeaseLostError: The caller no longer holds the lease.
        """

    @abstractmethod
    def complete_run(self, lease: Lease, completion: Completion) -> None:
        """
        Record the run and write the sync's record as :func:`apply_completion`
        gives it (the schedule advances only if nobody changed the sync during
        the run; the lease is released; the revision is bumped, so a host's
        write computed from an earlier read conflicts), delete the pending batches named in
        ``completion.resolved`` and the sync's :class:`Progress`, in one
        transaction. **Atomic, compare-and-set** on the token.

        Raises:
            LeaseLostError: The caller no longer holds the lease (nothing is written).
            DuplicateRunError: A run for (sync, slot) exists (nothing is written).
        """

    @abstractmethod
    def release_lease(self, lease: Lease) -> None:
        """
        Give a lease up without recording a run (the sync stays due).
        **Compare-and-set**; releasing a lease that is no longer held raises
        :class:`~cohortsync.exceptions.LeaseLostError`.
        """


@runtime_checkable
class DeliveryStore(Protocol):
    """
    **Required part:** what each destination holds (the delivered state, with
    the identifiers it was sent with) and the batches in flight.
    """

    __slots__ = ()

    @abstractmethod
    def iter_delivered(self, sync_id: str) -> Iterator[str]:
        """
        Member keys the destination holds as far as cohortsync knows, in
        ascending order (so a sorted source can be merge-diffed in bounded memory).
        """

    @abstractmethod
    def delivered_identifiers(self, sync_id: str, keys: Sequence[str]) -> dict[str, Identifier]:
        """
        The identifiers the given delivered members were sent with (removals are
        sent with the identifier that was added, even if the mapping changed),
        in the order asked; keys not delivered are left out.
        """

    @abstractmethod
    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        """
        Apply one acknowledged batch to the delivered state, update the ledger,
        record the batch and its rejected members, delete its pending record
        (same idempotency key), add ``batch.tally`` to the sync's
        :class:`Progress` (carried over to ``batch.slot`` when it differs from
        the stored one: the run of the new slot has folded the old progress
        into its record, and must not lose it if it is interrupted too) and
        give the delivered state a new version token.
        **Atomic, compare-and-set** on the token: a stale worker can never
        move the state.

        Returns:
            The new :meth:`delivered_version` of the sync.

        Raises:
            LeaseLostError: The caller no longer holds the lease (nothing is written).
        """

    @abstractmethod
    def delivered_version(self, sync_id: str) -> str:
        """
        An opaque token that changes whenever the sync's delivered state does
        (every :meth:`apply_batch`); ``""`` for a sync with none yet.

        A worker keeps a copy of a large delivered state in memory between runs
        and uses it only while this token is unchanged, so it never diffs
        against a state another worker has moved since.
        """

    @abstractmethod
    def begin_batch(
        self, lease: Lease, batch: PendingBatch, *, replaces: str | None = None
    ) -> None:
        """
        Record *batch* as in flight before it is sent (replacing a record with
        the same idempotency key), and delete the record whose key is
        *replaces* (a batch split in halves: the halves replace it).
        :meth:`apply_batch` of the same key deletes it in its own transaction.
        **Atomic, compare-and-set** on the token.

        Raises:
            LeaseLostError: The caller no longer holds the lease (nothing is written).
        """

    @abstractmethod
    def pending_batches(self, sync_id: str) -> list[PendingBatch]:
        """
        The sync's batches recorded as in flight and never applied, in the
        order they were begun.
        """

    @abstractmethod
    def progress(self, sync_id: str) -> Progress | None:
        """
        What attempts that have not completed delivered (see :class:`Progress`).
        """


@runtime_checkable
class HistoryStore(Protocol):
    """
    **Required part:** run history, member issues and the rejected-member ledger.
    """

    __slots__ = ()

    @abstractmethod
    def record_issues(self, lease: Lease, issues: Sequence[MemberIssue]) -> None:
        """
        Record member-level issues (e.g. skipped, unresolved mapping) of a run.
        **Compare-and-set** on the token.
        """

    @abstractmethod
    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        """
        Rejected members of a sync, dead letters included, ordered by key.
        """

    @abstractmethod
    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        """
        Runs of a sync, newest first (by start time).
        """

    @abstractmethod
    def run_issues(self, run_id: str) -> list[MemberIssue]:
        """
        The member-level issues recorded for a run, ordered by kind then key.
        """

    @abstractmethod
    def purge_history(self, before: datetime) -> int:
        """
        Delete runs that finished before *before*, with their batches and
        issues; return how many runs were deleted.
        """


@runtime_checkable
class OptionalQueries(Protocol):
    """
    **Optional part:** reads a store may leave out by subclassing
    :class:`StorageBase`, which derives each one from the required parts.

    The derived answers are exact but scan: a store that can answer from an
    index (every shipped one) implements them. Each one says what its
    derivation reads.
    """

    __slots__ = ()

    def next_due(self) -> datetime | None:
        """
        The earliest instant at which some active sync becomes claimable: its
        ``next_due``, or for a leased one the later of that and just after
        its lease expires. ``None`` when nothing is scheduled. An idle worker
        sleeps until then.

        Derived from :meth:`~ScheduleStore.list_syncs` (every sync, each time
        an idle worker goes to sleep).
        """

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        """
        Active syncs without a lease whose ``scheduled_from`` is later than
        *now*: their schedule was computed on a clock that read later than
        this one (the clock went back), so it is recomputed from *now*.

        Derived from :meth:`~ScheduleStore.list_syncs` (every sync, at each
        scheduler round).
        """

    def least_loaded_slot(self, period: int, buckets: int, preferred: int) -> int:
        """
        The least occupied of *buckets* slot buckets of the *period* (seconds),
        ties broken by the first bucket at or after *preferred* (cyclically).
        A read: the count changes with the sync write that takes the bucket.

        Derived from :meth:`~ScheduleStore.list_syncs` (every sync, at each
        create or update of an hourly or daily sync).
        """

    def count_delivered(self, sync_id: str) -> int:
        """
        How many members the destination holds.

        Derived from :meth:`~DeliveryStore.iter_delivered` (every delivered
        key, once per run).
        """

    def filter_delivered(self, sync_id: str, keys: Iterable[str]) -> set[str]:
        """
        Which of *keys* are in the delivered state.

        Derived from :meth:`~DeliveryStore.delivered_identifiers` of the same
        keys (no scan).
        """

    def identifier_holders(
        self, sync_id: str, identifiers: Iterable[Identifier]
    ) -> dict[Identifier, list[str]]:
        """
        For each of *identifiers* that the destination holds, the delivered
        member keys behind it, ascending. A member delivered under the identity
        mapping holds ``Identifier(USER_ID, key)``.

        Two members can share one identifier (a shared email, a re-created
        account): the identifier stays at the destination until no member
        maps to it any more.

        Derived from :meth:`~DeliveryStore.iter_delivered` and
        :meth:`~DeliveryStore.delivered_identifiers` (the whole delivered
        state, at each batch of a run that adds or removes members under
        mapped identifiers): implement it from an index on identifiers.
        """

    def dead_letters(self, sync_id: str) -> set[str]:
        """
        Keys of the sync's dead letters.

        Derived from :meth:`~HistoryStore.ledger`.
        """


@runtime_checkable
class BatchedRuns(Protocol):
    """
    **Optional part, added in 0.2:** a claim that hands each run everything
    it needs, and run records stored together, so an ordinary run costs the
    store no more than a share of two round trips.

    Not part of :class:`Storage`, so a store written for 0.1 still is one:
    the scheduler derives both from :class:`Storage` when a store lacks them
    (:class:`StorageBase` derives them the same way), and a store that can
    answer in one statement implements them (every shipped one does).
    """

    __slots__ = ()

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        """
        :meth:`~ScheduleStore.claim_due`, each lease with its :class:`Claim`:
        the sync's record and its delivered-state facts, so an ordinary run
        reads nothing else. **Atomic** like :meth:`~ScheduleStore.claim_due`
        (the facts belong to the claim's transaction).

        A row that cannot be decoded is still claimed, with ``record=None``;
        it must never make the whole claim fail.

        Derived from :meth:`~ScheduleStore.claim_due`,
        :meth:`~ScheduleStore.get_sync`, :meth:`~OptionalQueries.count_delivered`,
        :meth:`~DeliveryStore.delivered_version`,
        :meth:`~DeliveryStore.pending_batches`, :meth:`~HistoryStore.ledger`
        and :meth:`~DeliveryStore.progress` (six reads per claimed sync).
        """

    def complete_runs(
        self, completions: Sequence[tuple[Lease, Completion]]
    ) -> list[Exception | None]:
        """
        :meth:`~ScheduleStore.complete_run` of several runs, committed
        together where the store can (one transaction, one round trip).
        Each completion succeeds or fails on its own: the answer holds, in
        order, ``None`` for a completion written, or the exception that
        :meth:`~ScheduleStore.complete_run` would have raised for it
        (:class:`~cohortsync.exceptions.LeaseLostError`,
        :class:`~cohortsync.exceptions.DuplicateRunError`, ...), nothing
        of it written.

        Raises:
            StorageError: A store that commits them together failed as a
                whole: none of them was written (the scheduler then stores
                them one by one).

        Derived from :meth:`~ScheduleStore.complete_run`, one call each.
        """


@runtime_checkable
class PagedReads(Protocol):
    """
    **Optional part, added in 0.2:** the syncs a caller asks about, a page at
    a time from an index, so no public call reads every sync.

    :meth:`Scheduler.upcoming <cohortsync.Scheduler.upcoming>` reads only the
    syncs due before its horizon, :meth:`Scheduler.syncs
    <cohortsync.Scheduler.syncs>` only the page it is asked for, and
    :func:`cohortsync.testing.simulate` only the next sync due.

    Not part of :class:`Storage`, so a store written for 0.1 still is one:
    the scheduler then reads :meth:`~ScheduleStore.list_syncs` once per call
    instead (every sync, as 0.1 did). :class:`StorageBase` derives both from
    :meth:`~ScheduleStore.list_syncs`; every shipped store answers them from
    an index (the claim's index on due time, and the primary key).

    Both are keyset-paginated: pass the key of the last record of a page as
    *after* to get the next one. A page shorter than *limit* is the last.
    """

    __slots__ = ()

    def due_between(
        self, after: tuple[datetime, str] | None, until: datetime, limit: int
    ) -> list[SyncRecord]:
        """
        Up to *limit* active syncs with a ``next_due`` at or before *until*,
        leased ones included, in ``(next_due, id)`` order, starting after the
        key *after* (``(next_due, id)`` of the last record of the previous
        page; ``None`` for the first page). Ids compare as Python compares
        strings (code point order).

        Derived from :meth:`~ScheduleStore.list_syncs` (every sync, each page).
        """

    def page_syncs(self, after: str | None, limit: int) -> list[SyncRecord]:
        """
        Up to *limit* syncs, leased ones included, ordered by id (as
        :meth:`~ScheduleStore.list_syncs`), starting after the id *after*
        (the last of the previous page; ``None`` for the first page).

        Derived from :meth:`~ScheduleStore.list_syncs` (every sync, each page).
        """


SlotCounts = Callable[[int, int], list[int]]
"""``slot_counts(period, buckets)``: how many syncs each slot bucket of a period holds."""
Placement = Callable[[SlotCounts, "set[str]"], Sequence["SyncRecord"]]
"""What :meth:`BulkSyncWrites.create_syncs_placed` calls: ``place(slot_counts,
taken_ids)``, answering the records to create."""


@runtime_checkable
class BulkSyncWrites(Protocol):
    """
    **Optional part, added in 0.2:** sync writes a store does in one
    transaction: many syncs created at once, their slot buckets allocated in
    memory from one read of the counts, for
    :meth:`cohortsync.Scheduler.create_syncs`; one sync created in the least
    loaded bucket; and one sync saved compare-and-set on its revision, for
    every host call that changes a sync.

    Not part of :class:`Storage`, so a store written against the plain
    protocol still is one: the scheduler then creates the syncs one by one
    (:meth:`~OptionalQueries.least_loaded_slot` and
    :meth:`~ScheduleStore.create_sync` each), and saves a sync with a read
    and :meth:`~ScheduleStore.save_sync` (not atomic: see
    :meth:`save_sync_at`). :class:`StorageBase` derives every method from
    the required parts; every shipped store implements them natively.
    """

    __slots__ = ()

    def slot_counts(self, period: int, buckets: int) -> list[int]:
        """
        How many stored syncs each of the *buckets* slot buckets of the
        *period* (seconds) holds: the counts
        :meth:`~OptionalQueries.least_loaded_slot` picks from, bucket by bucket.
        A read.

        Derived from :meth:`~ScheduleStore.list_syncs` (every sync, once per
        chunk of a bulk creation).
        """

    def create_syncs(self, records: Sequence[SyncRecord]) -> list[str]:
        """
        :meth:`~ScheduleStore.create_sync` of each record whose id is not
        taken, each counted in its slot bucket: **atomic**, one transaction
        where the store can. Answers the ids that were taken (nothing of
        those records written), in the order given; the others are stored.

        Concurrent callers may have picked the same buckets from the same
        counts: the counts stay exact (each write adds what it stores), only
        the spread is as good as the picks.

        Raises:
            ConfigurationError: Two records share an id (nothing written).

        Derived from :meth:`~ScheduleStore.create_sync`, one call each (one
        transaction each).
        """

    def create_syncs_placed(
        self, ids: Sequence[str], place: Placement
    ) -> tuple[list[SyncRecord], list[str]]:
        """
        :meth:`create_syncs` of the records *place* returns, where *place*
        is called inside the write with a :meth:`slot_counts` that reads in
        the same transaction and the set of *ids* the store holds already,
        while the store holds its slot lock (SQLite's write lock; a
        transaction-scoped advisory lock on PostgreSQL): concurrent bulk
        creators pick their slots in turn, each from counts that include
        the syncs the others created, and none picks a slot for a sync that
        exists (declarations repeated by every replica). Answers the records
        written (those *place* returned whose id was not taken) and the
        taken ids, in the order *place* returned them. **Atomic**; what
        *place* raises rolls the write back and is raised.

        Derived from :meth:`slot_counts`, :meth:`~ScheduleStore.get_sync`
        and :meth:`create_syncs`: *place* reads before the write, so
        concurrent creators may pick from the same counts, as with
        :meth:`create_syncs`.
        """

    def create_sync_least_loaded(self, record: SyncRecord, buckets: int) -> SyncRecord:
        """
        :meth:`~ScheduleStore.create_sync` of *record* in the least loaded of
        the *buckets* slot buckets of its period, picked as
        :meth:`~OptionalQueries.least_loaded_slot` picks with
        ``record.slot_bucket`` as the preferred bucket: the stored record has
        that bucket and the offset ``bucket * SLOT_BUCKET_SECONDS +
        record.offset % SLOT_BUCKET_SECONDS``. **Atomic**, and one round trip
        where the store can: :meth:`cohortsync.Scheduler.create_sync` uses
        it for a sync whose first run is due now, whatever its offset.

        Concurrent creators may pick the same bucket; the counts stay exact.

        Returns:
            The record as stored.

        Raises:
            ConfigurationError: The id is taken (nothing written or
                counted), *buckets* is below 1, or the record has no slot
                bucket (its policy is not spread).

        Derived from :meth:`~OptionalQueries.least_loaded_slot` and
        :meth:`~ScheduleStore.create_sync` (two steps).
        """

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        """
        :meth:`~ScheduleStore.save_sync`, compare-and-set on the stored
        **revision** instead of the generation: replace the sync's definition
        and schedule fields (never its lease, nor ``last_slot``), bump its
        revision and move its count from the old slot bucket to the new one,
        only if the stored revision is still *expected_revision*, the one
        the caller read. **Atomic, compare-and-set:** the check and the write
        are one transaction (for SQL, an ``UPDATE ... WHERE id = ? AND
        revision = ?``), so of two writers that read the same revision
        exactly one succeeds.

        Every host call of :class:`cohortsync.Scheduler` that changes a sync
        (pause, resume, sync now, a full resync, confirming removals, update,
        delete) reads it, changes what it read and writes it with this; a
        writer refused reads the sync again and re-applies its change. The
        generation alone cannot protect those writes: most of them keep it,
        so with :meth:`~ScheduleStore.save_sync` two calls at once would both
        succeed and the second would silently undo the first (a pause lost,
        a deletion undone).

        Raises:
            SyncNotFoundError: No such sync.
            ConflictError: The stored revision is not *expected_revision*
                (``counter="revision"``; nothing written or counted).

        Derived from :meth:`~ScheduleStore.get_sync` and
        :meth:`~ScheduleStore.save_sync` (a read, then a write compared on
        the generation read): **not atomic**. A writer that comes in
        between is overwritten, so a store without it keeps the race of
        0.1; implement it natively on a store that several processes (or
        threads) share.
        """


@runtime_checkable
class Storage(ScheduleStore, DeliveryStore, HistoryStore, OptionalQueries, Protocol):
    """
    Everything cohortsync persists: the three required parts, the optional
    queries, and :meth:`close`. The engine calls every method; a store that
    subclasses :class:`StorageBase` gets the optional queries it leaves out.

    Implementations shipped: ``MemoryStorage`` (reference, tests),
    ``cohortsync.storage.SQLiteStorage`` (embedded default) and
    ``cohortsync.storage.PostgresStorage`` (many hosts).
    """

    __slots__ = ()

    @abstractmethod
    def close(self) -> None:
        """
        Release connections. The store is unusable afterwards.
        """
