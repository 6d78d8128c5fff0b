"""
One run of one sync, from a claimed lease to a completed run record.

The order of steps is what makes crashes harmless:

1. read the source and diff it against the delivered state (nothing sent yet:
   a failing source can never empty a destination);
2. send removals, then adds, batch by batch; after each acknowledged batch,
   apply exactly the acknowledged members to the delivered state in the same
   transaction that records the batch;
3. complete the run: record it, advance the schedule and release the lease in
   one transaction.

A crash between any two steps leaves the delivered state equal to what the
destination acknowledged, so the next run re-diffs and re-sends at most the
one batch that was in flight (with the same idempotency key).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import random
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone

import attrs

from cohortsync import _schedule
from cohortsync._cache import DeliveredCache
from cohortsync._clock import Clock, add_saturating
from cohortsync._cohort import Cohort, has_change_feed
from cohortsync._delivery import Acked, BatchSender, RateLimiter, idempotency_key, make_batch
from cohortsync._destination import (
    Batch,
    Capabilities,
    Destination,
    Identifier,
    IdentifierKind,
    Member,
    Operation,
    RunContext,
)
from cohortsync._diff import Diff, Keys, chunks, diff_changes, diff_snapshot, diff_with_state
from cohortsync._events import (
    BatchDelivered,
    EligibilityChanged,
    GuardTripped,
    Listener,
    RunFinished,
    RunStarted,
    SyncFailed,
    emit,
)
from cohortsync._plan import (
    effective_trigger,
    group_adds,
    group_removes,
    next_after_run,
    repeated_failure,
    run_status,
)
from cohortsync._policy import Cadence, OnIneligible, SyncPolicy
from cohortsync._sync import RunStatus, Sync, SyncRun, SyncStatus, Trigger
from cohortsync.eligibility import Eligibility, Ruleset, check_eligibility
from cohortsync.exceptions import (
    AuthenticationError,
    CohortSyncError,
    ConfigurationError,
    CorruptStoreError,
    LeaseLostError,
    PermanentError,
    SourceError,
    StorageError,
    TransientError,
)
from cohortsync.identifiers import IdentifierMapping
from cohortsync.storage._protocol import (
    AppliedBatch,
    Completion,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    PendingBatch,
    Storage,
    SyncRecord,
    Tally,
)

__all__ = ["RunEnvironment", "execute", "grid_policy", "next_due_after"]

log = logging.getLogger("cohortsync")

TTL_REFRESH_SHARE = 0.8
"""Memberships with a TTL are re-sent once this share of the TTL has passed."""

ISSUE_CHUNK = 10_000

_MAX_WAIT = 365 * 86_400.0
"""Longest wait a lease is extended for in one step (a timedelta must stay representable)."""


@attrs.frozen(kw_only=True)
class RunEnvironment:
    """
    Everything a run needs from the scheduler that owns it.
    """

    storage: Storage
    clock: Clock
    owner: str
    lease_for: timedelta
    rules: Ruleset
    listeners: Sequence[Listener]
    cohort: Callable[[str], Cohort]
    destination: Callable[[str], Destination]
    mapping: Callable[[str | None], IdentifierMapping]
    limiter: Callable[[str, Capabilities], RateLimiter | None]
    rng: random.Random
    cache: DeliveredCache | None = None
    pause_after_failures: int = 5
    """A sync failing the same way this many runs in a row is paused."""


@attrs.define
class _Counts:
    added: int = 0
    removed: int = 0
    rejected: int = 0
    skipped: int = 0
    batches: int = 0
    collisions: int = 0
    sequence: int = 0

    def include(self, tally: Tally) -> None:
        self.added += tally.added
        self.removed += tally.removed
        self.rejected += tally.rejected
        self.batches += tally.batches
        self.collisions += tally.collisions


class _Lease:
    """
    The lease of the run in progress, extended before it can expire.
    """

    def __init__(self, env: RunEnvironment, lease: Lease) -> None:
        self.env = env
        self.current = lease

    def keep_alive(self, seconds: float = 0.0) -> None:
        """
        Extend the lease if it would not outlast the next *seconds* plus half
        a lease: progress (or a deliberate wait) must never look like a crash.
        """
        needed = timedelta(seconds=min(seconds, _MAX_WAIT))
        now = self.env.clock.now()
        if self.current.expires_at - now < self.env.lease_for / 2 + needed:
            self.current = self.env.storage.extend_lease(
                self.current, now, self.env.lease_for + needed
            )


def _offset_for(record: SyncRecord, cadence: Cadence) -> int:
    if cadence is record.sync.policy.cadence:
        return record.offset
    # A fallback cadence (real-time -> hourly) has no allocated slot: derive a
    # stable one so the fallback runs keep one time in the hour.
    period = _schedule.period_seconds(cadence)
    return 0 if period is None else _schedule.stable_offset(record.sync.id, period)


def grid_policy(record: SyncRecord, sync: Sync) -> tuple[SyncPolicy, int]:
    """
    The policy whose slot grid *sync* runs on now (its effective cadence,
    which differs from the policy's while a real-time sync falls back), and
    the offset on that grid.
    """
    cadence = sync.cadence
    policy = sync.policy
    if cadence is not policy.cadence:
        policy = attrs.evolve(policy, cadence=cadence, timezone=None)
    return policy, _offset_for(record, cadence)


def _has(keys: Keys, key: str) -> bool:
    if not isinstance(keys, list):
        return key in keys
    i = bisect.bisect_left(keys, key)
    return i < len(keys) and keys[i] == key


def _content_key(operation: Operation, identifiers: Sequence[str]) -> str:
    return idempotency_key("", 0, operation, identifiers)


def _with(keys: Keys, extra: Iterable[str]) -> Keys:
    """
    *keys* plus the *extra* keys it lacks (ascending when *keys* is a list; a
    spilled KeyList is appended to rather than read into memory).
    """
    if isinstance(keys, list):
        return sorted({*keys, *extra})
    for key in extra:
        if key not in keys:
            keys.append(key)
    return keys


def next_due_after(record: SyncRecord, sync: Sync, after: datetime) -> datetime | None:
    """
    The sync's first slot after *after*, or ``None`` when none exists before
    the end of time (year 9999).
    """
    policy, offset = grid_policy(record, sync)
    try:
        return _schedule.next_due(policy, record.anchor, offset, after)
    except ConfigurationError:
        raise  # a damaged schedule row, not the end of time
    except (OverflowError, ValueError):
        return None


def execute(env: RunEnvironment, lease: Lease) -> SyncRun:
    """
    Run the claimed slot and complete it. Never raises for a failed run (the
    failure is recorded); raises :class:`LeaseLostError` if the lease was lost.
    """
    return _Run(env, lease).run()


class _Run:
    def __init__(self, env: RunEnvironment, lease: Lease) -> None:
        self.env = env
        self.lease = _Lease(env, lease)
        self.run_id = secrets.token_hex(8)
        # The scheduled slot goes into every idempotency key: a run taking over
        # a crashed one runs the same slot and re-sends under the same keys,
        # while a member who leaves and comes back does so in a later slot and
        # gets a new key (a de-duplicating receiver would drop a repeated one).
        self.basis = lease.slot.isoformat()
        self.started = env.clock.now()
        self.record = env.storage.get_sync(lease.sync_id)
        self.sync = self.record.sync
        self.counts = _Counts()
        self.notes: list[str] = []
        self.issues: list[MemberIssue] = []
        self.full = False
        self.sender: BatchSender | None = None
        # The definition as the eligibility re-check left it (fallback to
        # hourly, back to real-time, paused): kept even if delivery then fails.
        self.rechecked = self.sync
        # The delivered state mirrored in memory while it is known exactly,
        # and its version token: kept in the environment's cache after the run.
        self.state: set[str] | None = None
        self.version = ""
        # Batches an earlier run recorded as in flight and never applied, and
        # the identifiers of members this run removes because of them.
        self.pending: list[PendingBatch] = []
        self.reusable: dict[str, str] | None = None
        self.kinds: tuple[frozenset[IdentifierKind] | None, IdentifierKind | None] | None = None
        self.distinct = False
        """Adds of a first sync under the identity mapping: one member per identifier."""
        self.settled: dict[tuple[Operation, Identifier], str | None] = {}
        """Identifiers this run's requests were answered for: None (accepted) or the reason."""
        self.resumed = False
        """An earlier attempt of this slot applied batches (this run takes it over)."""
        self.pending_left: dict[str, set[str]] | None = None
        """For each pending record, its members this run has not re-sent yet."""
        self.ledger: list[LedgerEntry] = []
        self.recovered_ids: dict[str, Identifier] = {}
        self.guarded = False
        # Members sharing one destination identifier (see _plan.group_*):
        # the keys riding with an identifier sent in a batch, identifiers
        # currently in flight, and identifiers kept because a member stays.
        self.riders: dict[tuple[Operation, Identifier], list[str]] = {}
        self.riding: set[str] = set()
        self.in_flight: set[tuple[Operation, Identifier]] = set()
        self.handover: dict[Identifier, list[str]] = {}
        """Delivered leavers whose identifier a member added in this run takes
        over: removed from the delivered state in the same write that records
        the new holder, so a run cut short in between never forgets who holds it."""
        self.sent_existing: set[Identifier] = set()
        self.diff: Diff | None = None
        self.resolved_adds: dict[str, Identifier] | None = None
        self.adds_by_identifier: dict[Identifier, list[str]] | None = None
        self.unresolved_adds: list[str] = []
        self.mapping: IdentifierMapping | None = None
        self.delivered_at_start = 0
        self.teardown_error: BaseException | None = None

    # -- the run ---------------------------------------------------------------

    def run(self) -> SyncRun:
        env = self.env
        lease = self.lease.current
        cadence = self.sync.cadence
        trigger = effective_trigger(lease.trigger, cadence, lease.slot, self.started)
        emit(
            env.listeners,
            RunStarted(
                sync_id=self.sync.id,
                run_id=self.run_id,
                trigger=trigger,
                slot=lease.slot,
                at=self.started,
            ),
        )
        self._take_over()
        status = RunStatus.SUCCEEDED
        error: BaseException | None = None
        new_sync = self.sync
        feed_cursor: str | None = None
        full_done = False
        try:
            cohort = env.cohort(self.sync.cohort_id)
            destination = env.destination(self.sync.destination_id)
            caps = destination.capabilities
            if trigger is Trigger.TEARDOWN:
                status, new_sync = self._teardown(destination, caps)
            else:
                status, new_sync, feed_cursor, full_done = self._deliver(cohort, destination, caps)
        except LeaseLostError:
            raise
        except CohortSyncError as e:
            error = e
        except Exception as e:  # a bug in host code must not lose the run record
            log.exception("run %s of sync %s failed unexpectedly", self.run_id, self.sync.id)
            error = e
        if error is not None:
            status, new_sync = self._failed(error)
        self._keep_state()
        return self._complete(
            trigger, status, error, new_sync, feed_cursor=feed_cursor, full_done=full_done
        )

    def _take_over(self) -> None:
        """
        Fold what an interrupted attempt delivered into this run's record: a
        crashed worker applied batches of its slot (or of a slot whose run was
        never recorded) and the history must account for them.
        """
        progress = self.env.storage.progress(self.sync.id)
        if progress is None or not progress.tally:
            return
        self.counts.include(progress.tally)
        if progress.slot == self.lease.current.slot:
            self.resumed = True
        tally = progress.tally
        what = f"+{tally.added} -{tally.removed}"
        if progress.slot == self.lease.current.slot:
            self.notes.append(f"takeover: includes {what} delivered by an interrupted attempt")
        else:
            self.notes.append(
                f"includes {what} delivered by an interrupted run of slot "
                f"{progress.slot.isoformat()}"
            )

    def _keep_state(self) -> None:
        cache = self.env.cache
        if cache is None:
            return
        if self.state is None:
            cache.drop(self.sync.id)
        else:
            cache.put(self.sync.id, self.version, self.state)

    def _apply(self, batch: AppliedBatch) -> None:
        """
        Apply one batch to the store and mirror it into the in-memory state.
        If the store call fails, the outcome is unknown: forget the mirror.
        """
        try:
            # A host store written before apply_batch returned a version may
            # return None: then the mirror cannot be trusted.
            version: object = self.env.storage.apply_batch(self.lease.current, batch)
        except BaseException:
            self.state = None
            raise
        self.counts.include(batch.tally)
        if not isinstance(version, str):
            self.state = None
            return
        self.version = version
        if self.state is None:
            return
        self.state.difference_update(batch.removed)
        self.state.update(m.key for m in batch.added)

    def _failed(self, error: BaseException) -> tuple[RunStatus, Sync]:
        delivered_any = bool(self.counts.added or self.counts.removed)
        status = run_status(
            guarded=False, rejected=0, skipped=0, failed=True, delivered_any=delivered_any
        )
        new_sync = self.rechecked
        reason: str | None = None
        if isinstance(error, AuthenticationError):
            reason = f"authentication failed: {error}"
        elif (
            not _heals_by_itself(error)
            and self.env.pause_after_failures
            # One-time syncs and teardowns have their own bounded retries.
            and self.sync.policy.cadence is not Cadence.ONE_TIME
            and self.lease.current.trigger is not Trigger.TEARDOWN
        ):
            # A failure that repeats identically is not going to heal by
            # itself (bad data, a bug, junk from the destination): stop
            # retrying it every period and say so, instead of failing forever.
            earlier = self.env.storage.history(self.sync.id, limit=self.env.pause_after_failures)
            message = _message(error)
            if repeated_failure(
                type(error).__name__, message, earlier, self.env.pause_after_failures
            ):
                reason = (
                    f"failed {self.env.pause_after_failures} runs in a row with "
                    f"{type(error).__name__}: {message}"
                )
        if reason is not None:
            new_sync = attrs.evolve(
                new_sync,
                status=SyncStatus.PAUSED,
                status_reason=reason,
                updated_at=self.env.clock.now(),
            )
            self.notes.append("paused")
            emit(
                self.env.listeners,
                SyncFailed(
                    sync_id=self.sync.id,
                    status=SyncStatus.PAUSED,
                    reason=reason,
                    at=self.env.clock.now(),
                ),
            )
        return status, new_sync

    def _check(self, cohort: Cohort, caps: Capabilities, cadence: Cadence) -> Eligibility:
        mapping = self.env.mapping(self.sync.mapping_id)
        return check_eligibility(
            cohort,
            caps,
            self.sync.policy,
            identifier_kinds=mapping.kinds,
            rules=self.env.rules,
            cadence=cadence,
        )

    def _deliver(
        self, cohort: Cohort, destination: Destination, caps: Capabilities
    ) -> tuple[RunStatus, Sync, str | None, bool]:
        record = self.record
        sync = self.sync
        policy = sync.policy
        now = self.env.clock.now()
        ttl = caps.membership_ttl
        ttl_due = ttl is not None and (
            record.last_full_sync_at is None
            or now - record.last_full_sync_at >= ttl * TTL_REFRESH_SHARE
        )
        delivered_count = self.env.storage.count_delivered(sync.id)
        self.delivered_at_start = delivered_count
        self.full = record.full_resync or (ttl_due and delivered_count > 0)
        if self.full:
            self.notes.append("full_resync" if record.full_resync else "ttl_refresh")
        self.pending = self.env.storage.pending_batches(sync.id)
        self._key_basis()
        self.version = self.env.storage.delivered_version(sync.id)
        diff, feed_cursor, from_feed = self._read(cohort, caps, delivered_count)
        self.diff = diff
        if self.pending:
            self._recover(diff)
        self._skip_invalid(cohort, diff, from_feed=from_feed)

        # Eligibility is re-checked at every run, with the size just measured.
        size = (
            diff.size
            if diff.size is not None
            else delivered_count + len(diff.adds) - len(diff.removes)
        )
        new_sync, proceed = self._recheck(cohort.with_size(size), caps)
        self.rechecked = new_sync
        if not proceed:
            diff.close()
            return RunStatus.SKIPPED, new_sync, None, False

        send_removals = policy.send_removals and caps.supports_removals
        guarded = send_removals and not sync.guard_released and self._guard(diff)
        self.guarded = guarded
        if sync.guard_released and not guarded:
            new_sync = attrs.evolve(new_sync, guard_released=False)
        if not from_feed:
            self._resolve_ledger(diff)
        removes: Keys = [] if guarded else diff.removes
        try:
            self._send(destination, caps, diff, removes, send_removals=send_removals)
        finally:
            diff.close()
        if self.issues:
            self._flush_issues()
        if guarded:
            # Keep the cursor before the held removals: the feed reports them
            # again (and the guard with them) until the host confirms.
            feed_cursor = None
        if self.counts.collisions:
            self.notes.append(f"shared_identifiers: {self.counts.collisions}")
        status = run_status(
            guarded=guarded,
            rejected=self.counts.rejected,
            skipped=self.counts.skipped,
            failed=False,
            delivered_any=True,
        )
        full_done = self.full or caps.full_sync_only or delivered_count == 0
        return status, new_sync, feed_cursor, full_done

    def _skip_invalid(self, cohort: Cohort, diff: Diff, *, from_feed: bool) -> None:
        """
        Record keys the source yielded that cannot be delivered; a run with
        nothing valid in a non-empty snapshot fails instead of "succeeding"
        with nothing sent.
        """
        if not diff.invalid:
            return
        self.counts.skipped += len(diff.invalid)
        self.issues.extend(
            MemberIssue(run_id=self.run_id, key=k, kind=IssueKind.SKIPPED, reason=r)
            for k, r in diff.invalid
        )
        self.notes.append("invalid_keys")
        first = diff.invalid[0][1]
        log.warning(
            "sync %s: the source of cohort %s yielded %d invalid member key(s), skipped "
            "(first reason: %s)",
            self.sync.id,
            cohort.id,
            len(diff.invalid),
            first,
        )
        if not from_feed and diff.size == 0:
            self._flush_issues()
            raise SourceError(
                cohort.id,
                f"every one of the {len(diff.invalid)} member key(s) the source yielded is "
                f"invalid ({first}); nothing was delivered or removed",
            )

    def _recover(self, diff: Diff) -> None:
        """
        Reconcile batches an earlier run sent (or may have sent) without
        applying them: the destination may or may not hold those changes.

        Whatever the operation of the newest record naming a member, the
        destination's state of that member is unknown (an add may have
        arrived, a removal may have arrived, or neither), so each is sent
        again towards what the cohort says now: a member who is not
        delivered and not being added now is removed (with the identifier it
        was sent with); a delivered member who stays is added again. The
        ordinary diff covers everyone else.
        """
        unknown = self._in_flight()
        held = self.env.storage.filter_delivered(self.sync.id, unknown)
        existing = diff.existing or []
        extra_adds = [
            k
            for k in unknown
            if k in held
            and not _has(diff.removes, k)
            and not _has(existing, k)
            and not _has(diff.adds, k)
        ]
        for key, member in unknown.items():
            if key not in held and not _has(diff.adds, key):
                self.recovered_ids[key] = member.identifier
        if extra_adds or self.recovered_ids:
            self.notes.append(f"recovered_in_flight: +{len(extra_adds)} -{len(self.recovered_ids)}")
        diff.adds = _with(diff.adds, extra_adds)
        diff.removes = _with(diff.removes, self.recovered_ids)

    def _in_flight(self) -> dict[str, Member]:
        """
        Every member named in a pending batch record (its newest record wins
        for the identifier it was sent with).
        """
        unknown: dict[str, Member] = {}
        for pending in self.pending:
            for m in pending.members:
                unknown[m.key] = m
        return unknown

    def _key_basis(self) -> None:
        """
        The basis of this run's idempotency keys: its slot, so a first
        attempt's keys are stable; but a run that resumes a slot an earlier
        attempt sent requests for gets keys of its own. Within one slot a
        member can be added, removed by a takeover and added again by the
        next one: the same slot-derived key for the second add would make a
        de-duplicating receiver drop it. A request re-sent unchanged keeps
        its key through the pending record instead (see :meth:`_batch`).
        """
        if self.pending or self.resumed:
            self.basis = f"{self.lease.current.slot.isoformat()}/{self.run_id}"

    def _batch(self, context: RunContext, operation: Operation, members: list[Member]) -> Batch:
        """
        Build the next batch. A batch identical to one still pending (sent by
        an earlier run, outcome unknown) keeps that batch's idempotency key:
        it is the same request, re-sent. Only the newest record naming its
        members qualifies: once a later request touched them (a removal
        after an add), re-sending the old one under its key would be dropped
        by a de-duplicating receiver as a repeat.
        """
        batch = make_batch(context, operation, members, self._next_sequence(), self.basis)
        if self.pending:
            if self.reusable is None:
                newest: dict[str, str] = {}
                for p in self.pending:
                    for m in p.members:
                        newest[m.key] = p.idempotency_key
                self.reusable = {
                    _content_key(p.operation, [m.identifier.value for m in p.members]): (
                        p.idempotency_key
                    )
                    for p in self.pending
                    if all(newest[m.key] == p.idempotency_key for m in p.members)
                }
            earlier = self.reusable.get(_content_key(operation, batch.identifiers))
            if earlier is not None:
                batch = attrs.evolve(batch, idempotency_key=earlier)
        return batch

    def _begin(self, batch: Batch, replaces: str | None = None) -> None:
        """
        Record the batch as in flight before the destination sees it (a
        half of a split batch replaces its parent's record).
        """
        pending = PendingBatch(
            run_id=self.run_id,
            idempotency_key=batch.idempotency_key,
            operation=batch.operation,
            members=batch.members,
        )
        if replaces is None:
            self.env.storage.begin_batch(self.lease.current, pending)
            self._supersede(batch, pending)
        else:
            self.env.storage.begin_batch(self.lease.current, pending, replaces=replaces)

    def _supersede(self, batch: Batch, pending: PendingBatch) -> None:
        """
        Drop the pending records of earlier attempts whose members have all
        been sent again by this run (this batch is the last of them): the
        newer records tell the truth about those members now, and an old one
        left behind would be reconciled, or re-sent under its old key, as if
        nothing had happened since.
        """
        if not self.pending:
            return
        if self.pending_left is None:
            self.pending_left = {
                p.idempotency_key: {m.key for m in p.members} for p in self.pending
            }
        covered = {m.key for m in batch.members}
        for m in batch.members:
            covered.update(self.riders.get((batch.operation, m.identifier), ()))
        done = []
        for key, left in self.pending_left.items():
            if key == batch.idempotency_key:
                continue
            left.difference_update(covered)
            if not left:
                done.append(key)
        for key in done:
            del self.pending_left[key]
            self.env.storage.begin_batch(self.lease.current, pending, replaces=key)
            if self.reusable is not None:
                self.reusable = {c: k for c, k in self.reusable.items() if k != key}

    def _read(
        self, cohort: Cohort, caps: Capabilities, delivered_count: int
    ) -> tuple[Diff, str | None, bool]:
        """
        Read the source and diff it against the delivered state: from the
        change feed when one can be used, else from the full snapshot.

        Returns:
            The diff, the feed cursor it brings the sync to (or ``None``), and
            whether it came from the feed.
        """
        env = self.env
        record = self.record
        sync = self.sync
        source = cohort.source
        if source is None:
            raise SourceError(cohort.id, "the cohort has no membership source registered")
        # One read of the ledger serves both the dead letters (never re-added)
        # and the pending rejections _resolve_ledger settles.
        self.ledger = env.storage.ledger(sync.id)
        dead = {e.key for e in self.ledger if e.dead}
        # Once an hour a real-time sync diffs the full snapshot even when it
        # has a change feed: that reconciles anything a feed missed and
        # retries members the destination rejected earlier. It is the first
        # run of each hour (whatever minute it runs at: a coalesced minute
        # must not postpone it by an hour). Removals the host confirmed are
        # found again the same way, whatever feed window they were first seen in.
        slot = self.lease.current.slot
        last = record.last_slot
        reconcile = (
            last is None or _hour(slot) != _hour(last) or sync.guard_released or bool(self.pending)
        )
        if (
            sync.cadence is Cadence.REALTIME
            and not reconcile
            and has_change_feed(source)
            and record.feed_cursor is not None
            and not self.full
            and not caps.full_sync_only
        ):
            if env.cache is not None:
                # Keep an in-memory state current through feed runs too, so the
                # hourly reconciliation does not have to read the store.
                self.state = env.cache.take(sync.id, self.version)
            diff = diff_changes(
                source,
                cohort.id,
                record.feed_cursor,
                lambda keys: env.storage.filter_delivered(sync.id, keys),
                delivered_count,
                exclude=dead,
            )
            return diff, diff.feed_cursor, True
        feed_cursor: str | None = None
        feed: object = source
        if sync.policy.cadence is Cadence.REALTIME and has_change_feed(feed):
            # Take the cursor before reading, so changes made during the
            # read are seen again (idempotently) by the next run.
            feed_cursor = feed.cursor()
        keep_existing = caps.full_sync_only or self.full
        cache = env.cache
        if (
            cache is None
            or getattr(source, "sorted_keys", False)  # streamed: memory stays bounded
            or delivered_count > cache.max_keys
        ):
            diff = diff_snapshot(
                source,
                cohort.id,
                env.storage.iter_delivered(sync.id),
                delivered_count,
                keep_existing=keep_existing,
                exclude=dead,
            )
            return diff, feed_cursor, False
        known = cache.take(sync.id, self.version)
        if known is not None and len(known) != delivered_count:
            known = None  # cannot happen with a conforming store; never trust it then
        if known is None and delivered_count == 0:
            known = set()
        diff, self.state = diff_with_state(
            source,
            cohort.id,
            known,
            lambda: env.storage.iter_delivered(sync.id),
            delivered_count,
            keep_existing=keep_existing,
            exclude=dead,
        )
        return diff, feed_cursor, False

    def _guard(self, diff: Diff) -> bool:
        """
        The mass-removal guard, decided before anything is sent: whether this
        run's removals must wait for the host to confirm them.
        """
        removing = len(diff.removes)
        if not self.sync.policy.guard.trips(diff.delivered, removing, diff.source_empty):
            return False
        self.notes.append(
            f"mass_removal_guard: would remove {removing} of {diff.delivered}"
            + (" (source returned no members)" if diff.source_empty else "")
        )
        emit(
            self.env.listeners,
            GuardTripped(
                sync_id=self.sync.id,
                run_id=self.run_id,
                delivered=diff.delivered,
                removing=removing,
                source_empty=diff.source_empty,
                at=self.env.clock.now(),
            ),
        )
        return True

    def _recheck(self, cohort: Cohort, caps: Capabilities) -> tuple[Sync, bool]:
        """
        Re-check eligibility with the measured size; fall back or pause a
        real-time sync that stopped being eligible, and come back when it is
        eligible again. Returns the (possibly changed) sync and whether to deliver.
        """
        env = self.env
        sync = self.sync
        policy = sync.policy
        result = self._check(cohort, caps, policy.cadence)
        self.notes.extend(warning.code for warning in result.warnings)
        if result.eligible:
            if sync.effective_cadence is not None:
                emit(
                    env.listeners,
                    EligibilityChanged(
                        sync_id=sync.id,
                        eligible=True,
                        codes=(),
                        cadence=policy.cadence,
                        at=env.clock.now(),
                    ),
                )
                self.notes.append("eligible_again")
                return attrs.evolve(sync, effective_cadence=None, updated_at=env.clock.now()), True
            return sync, True
        codes = tuple(r.code for r in result.blocking)
        self.notes.extend(codes)
        if (
            policy.cadence is Cadence.REALTIME
            and policy.on_ineligible is OnIneligible.FALLBACK_HOURLY
        ):
            fallback = self._check(cohort, caps, Cadence.HOURLY)
            if fallback.eligible:
                if sync.effective_cadence is not Cadence.HOURLY:
                    emit(
                        env.listeners,
                        EligibilityChanged(
                            sync_id=sync.id,
                            eligible=False,
                            codes=codes,
                            cadence=Cadence.HOURLY,
                            at=env.clock.now(),
                        ),
                    )
                self.notes.append("fallback_hourly")
                return attrs.evolve(
                    sync, effective_cadence=Cadence.HOURLY, updated_at=env.clock.now()
                ), True
        reason = "; ".join(r.message for r in result.blocking)
        emit(
            env.listeners,
            EligibilityChanged(
                sync_id=sync.id,
                eligible=False,
                codes=codes,
                cadence=policy.cadence,
                at=env.clock.now(),
            ),
        )
        emit(
            env.listeners,
            SyncFailed(
                sync_id=sync.id, status=SyncStatus.PAUSED, reason=reason, at=env.clock.now()
            ),
        )
        return attrs.evolve(
            sync,
            status=SyncStatus.PAUSED,
            status_reason=f"ineligible: {reason}",
            updated_at=env.clock.now(),
        ), False

    # -- sending ---------------------------------------------------------------

    def _context(self) -> RunContext:
        cohort_name = self.sync.cohort_id
        with contextlib.suppress(CohortSyncError):
            cohort_name = self.env.cohort(self.sync.cohort_id).name
        return RunContext(
            run_id=self.run_id,
            sync_id=self.sync.id,
            generation=self.sync.generation,
            cohort_id=self.sync.cohort_id,
            cohort_name=cohort_name,
            computed_at=self.started,
            full_sync=self.full,
            slot=self.lease.current.slot,
        )

    def _sender(self, destination: Destination, caps: Capabilities) -> BatchSender:
        if self.sender is None:
            self.sender = BatchSender(
                destination=destination,
                retry=self.sync.policy.retry,
                clock=self.env.clock,
                limiter=self.env.limiter(self.sync.destination_id, caps),
                keep_alive=self.lease.keep_alive,
                before_send=self._begin,
                rng=self.env.rng,
            )
        return self.sender

    def _send(
        self,
        destination: Destination,
        caps: Capabilities,
        diff: Diff,
        removes: Keys,
        *,
        send_removals: bool,
    ) -> None:
        context = self._context()
        sender = self._sender(destination, caps)
        size = caps.max_batch_size
        self.mapping = self.env.mapping(self.sync.mapping_id)
        succeeded = False
        destination.open(context)
        try:
            if removes and not send_removals:
                # The destination cannot remove (or the policy says not to):
                # forget the members so a later re-entry is sent again.
                self._apply_local_removals(removes)
            elif removes:
                sender.send_all(
                    self._remove_batches(context, removes, size), caps.max_parallel, self._on_acked
                )
            sender.send_all(
                self._add_batches(context, Operation.ADD, diff.adds, caps),
                caps.max_parallel,
                self._on_acked,
            )
            if diff.existing:
                op = Operation.EXISTING if caps.full_sync_only else Operation.ADD
                sender.send_all(
                    self._add_batches(context, op, diff.existing, caps, existing=True),
                    caps.max_parallel,
                    self._on_acked,
                )
            succeeded = True
        finally:
            try:
                destination.close(context, succeeded=succeeded)
            except Exception:
                log.exception("close() of destination %s failed", self.sync.destination_id)
                if succeeded:
                    raise

    def _next_sequence(self) -> int:
        self.counts.sequence += 1
        return self.counts.sequence

    # -- members sharing an identifier -----------------------------------------

    def _is_leaving(self, key: str) -> bool:
        diff = self.diff
        return diff is not None and (key in self.recovered_ids or _has(diff.removes, key))

    def _added_identifiers(self) -> dict[Identifier, list[str]]:
        """
        The identifiers members added in this run map to (resolved once; the
        add batches reuse the resolution). Only needed when a removal might
        collide with an add under a non-identity mapping.
        """
        if self.adds_by_identifier is None:
            assert self.diff is not None  # noqa: S101 - set before sending
            mapping = self._mapping()
            accepted = self._accepted()
            resolved: dict[str, Identifier] = {}
            by_identifier: dict[Identifier, list[str]] = {}
            unresolved: list[str] = []
            for chunk in chunks(self.diff.adds, ISSUE_CHUNK):
                members, missing = mapping.resolve_many(chunk, accepted)
                unresolved.extend(missing)
                for m in members:
                    resolved[m.key] = m.identifier
                    by_identifier.setdefault(m.identifier, []).append(m.key)
            self.resolved_adds = resolved
            self.unresolved_adds = unresolved
            self.adds_by_identifier = by_identifier
        return self.adds_by_identifier

    def _kept_by_add(self, identifier: Identifier) -> bool:
        diff = self.diff
        if diff is None or not diff.adds:
            return False
        kind = self._kinds()[1]
        if kind is not None and self.resolved_adds is None:
            return identifier.kind is kind and _has(diff.adds, identifier.value)
        return identifier in self._added_identifiers()

    def _mapping(self) -> IdentifierMapping:
        if self.mapping is None:
            self.mapping = self.env.mapping(self.sync.mapping_id)
        return self.mapping

    def _accepted(self) -> frozenset[IdentifierKind] | None:
        return self._kinds()[0]

    def _kinds(self) -> tuple[frozenset[IdentifierKind] | None, IdentifierKind | None]:
        """
        The identifier kinds the destination accepts, and the kind the
        identity mapping sends (``None`` for another mapping): looked up once
        per run, not once per member.
        """
        if self.kinds is None:
            destination = self.env.destination(self.sync.destination_id)
            accepted = destination.capabilities.accepted_identifiers
            self.kinds = (accepted, self._mapping().identity_kind(accepted))
        return self.kinds

    def _ride(self, operation: Operation, identifier: Identifier, keys: Iterable[str]) -> None:
        riders = self.riders.setdefault((operation, identifier), [])
        for key in keys:
            riders.append(key)
            self.riding.add(key)

    def _handed_over(self, operation: Operation, added: Sequence[Member]) -> tuple[str, ...]:
        """Leavers whose identifier one of *added* now holds (see ``handover``)."""
        if operation is not Operation.ADD or not self.handover:
            return ()
        out: list[str] = []
        for m in added:
            out.extend(self.handover.pop(m.identifier, ()))
        return tuple(out)

    def _answered_already(self, operation: Operation, members: list[Member]) -> list[Member]:
        """
        Members whose identifier an earlier request of this run already got
        an answer for (another member sharing it was in an earlier batch)
        are settled like it, without a second request: applied if it was
        accepted, rejected with the same reason if not. The rest is returned.
        """
        if not self.settled:
            return members
        rest: list[Member] = []
        accepted: list[Member] = []
        refused: list[tuple[str, str]] = []
        for m in members:
            if (operation, m.identifier) not in self.settled:
                rest.append(m)
            elif (reason := self.settled[operation, m.identifier]) is None:
                accepted.append(m)
            else:
                refused.append((m.key, reason))
        self._apply_local(operation, accepted)
        if refused:
            self._apply(
                AppliedBatch(
                    run_id=self.run_id,
                    sequence=self._next_sequence(),
                    operation=operation,
                    idempotency_key="local",
                    rejected=tuple(refused),
                    at=self.env.clock.now(),
                    max_rejection_attempts=self.sync.policy.rejection_attempts,
                    slot=self.lease.current.slot,
                    tally=Tally(collisions=len(refused)),
                ),
            )
        return rest

    def _apply_local(
        self, operation: Operation, members: Sequence[Member], *, collisions: bool = True
    ) -> None:
        """
        Apply members to the delivered state without sending anything (the
        destination holds, or must keep, their identifier for another member).
        """
        if not members:
            return
        removing = operation is Operation.REMOVE
        self._apply(
            AppliedBatch(
                run_id=self.run_id,
                sequence=self._next_sequence(),
                operation=operation,
                idempotency_key="local",
                added=() if removing else tuple(members),
                removed=tuple(m.key for m in members)
                if removing
                else self._handed_over(operation, members),
                at=self.env.clock.now(),
                slot=self.lease.current.slot,
                tally=Tally(collisions=len(members) if collisions else 0),
            ),
        )

    def _settle_locally(
        self,
        local: list[Member],
        delivered: dict[str, Identifier],
        holders: dict[Identifier, list[str]],
    ) -> None:
        """
        Leavers whose identifier must stay at the destination: dropped from
        the delivered state now when another delivered member that stays
        holds it, or handed over to the member added in this run that maps
        to it (see ``handover``). Recovered members are not in the delivered
        state: nothing to apply, and their identifier is not known to be
        held (the add that maps to it is sent as usual).
        """
        now: list[Member] = []
        for m in local:
            if m.key not in delivered:
                continue
            stays = any(
                h != m.key and not self._is_leaving(h) for h in holders.get(m.identifier, ())
            )
            if stays:
                now.append(m)
            else:
                self.handover.setdefault(m.identifier, []).append(m.key)
        self._apply_local(Operation.REMOVE, now)

    def _remove_batches(self, context: RunContext, keys: Keys, size: int) -> Iterator[Batch]:
        storage = self.env.storage
        for chunk in chunks(keys, size):
            ids = storage.delivered_identifiers(self.sync.id, chunk)
            leaving: list[Member] = []
            for k in chunk:
                if k in self.riding:
                    continue  # removed with another member's identifier
                ident = ids.get(k) or self.recovered_ids.get(k)
                if ident is not None:
                    leaving.append(Member(k, ident))
            leaving = self._answered_already(Operation.REMOVE, leaving)
            if not leaving:
                continue
            holders = storage.identifier_holders(self.sync.id, {m.identifier for m in leaving})
            groups = group_removes(
                leaving, holders, is_leaving=self._is_leaving, kept_by_add=self._kept_by_add
            )
            self._settle_locally(groups.local, ids, holders)
            send: list[Member] = []
            for m in groups.send:
                slot = (Operation.REMOVE, m.identifier)
                if slot in self.in_flight:
                    self._ride(Operation.REMOVE, m.identifier, [m.key])
                    continue
                send.append(m)
                self.in_flight.add(slot)
                self.riding.add(m.key)
                self._ride(
                    Operation.REMOVE,
                    m.identifier,
                    [r for r in groups.riders.get(m.identifier, ()) if r not in self.riding],
                )
            if send:
                yield self._batch(context, Operation.REMOVE, send)

    def _resolve(
        self, chunk: list[str], caps: Capabilities, known: dict[str, Identifier] | None
    ) -> list[Member]:
        """
        Resolve member keys to identifiers (from *known* when the run resolved
        them already), recording those that resolve to nothing as skipped.
        """
        if known is not None:
            members = [Member(k, known[k]) for k in chunk if k in known]
            unresolved = [k for k in chunk if k not in known]
        else:
            members, unresolved = self._mapping().resolve_many(chunk, caps.accepted_identifiers)
        if unresolved:
            self.counts.skipped += len(unresolved)
            self.issues.extend(
                MemberIssue(
                    run_id=self.run_id,
                    key=k,
                    kind=IssueKind.SKIPPED,
                    reason="unresolved_mapping",
                )
                for k in unresolved
            )
        return members

    def _add_batches(
        self,
        context: RunContext,
        operation: Operation,
        keys: Keys,
        caps: Capabilities,
        *,
        existing: bool = False,
    ) -> Iterator[Batch]:
        storage = self.env.storage
        identity = self._mapping().identity_kind(caps.accepted_identifiers) is not None
        # With the identity mapping distinct keys never share an identifier, so
        # a first sync needs no lookups; otherwise the store's identifier index
        # tells which identifiers another member already holds.
        lookups = not identity or self.delivered_at_start > 0 or bool(self.pending)
        # A first sync under the identity mapping: every identifier is sent
        # once, by its own member; no per-identifier bookkeeping is needed.
        self.distinct = identity and not lookups and not existing
        known = None if existing else self.resolved_adds
        for chunk in chunks(keys, caps.max_batch_size):
            members = self._resolve(chunk, caps, known)
            if not members:
                continue
            if self.distinct:
                yield self._batch(context, operation, members)
                continue
            if existing:
                if not identity:
                    yield from self._retire_changed(context, members, caps)
                # A full resend sends every identifier once, even if held.
                groups = group_adds(members, _already_sent(self.sent_existing, identity=identity))
                if not identity:
                    self.sent_existing.update(m.identifier for m in groups.send)
            else:
                members = self._answered_already(operation, members)
                holders = (
                    storage.identifier_holders(self.sync.id, {m.identifier for m in members})
                    if lookups and members
                    else {}
                )
                groups = group_adds(members, _held_in(holders))
                self._apply_local(Operation.ADD, groups.local)
            send: list[Member] = []
            for m in groups.send:
                slot = (operation, m.identifier)
                if slot in self.in_flight:
                    self._ride(operation, m.identifier, [m.key])
                    continue
                send.append(m)
                self.in_flight.add(slot)
                self._ride(operation, m.identifier, groups.riders.get(m.identifier, ()))
            if send:
                yield self._batch(context, operation, send)

    def _retire_changed(
        self, context: RunContext, members: list[Member], caps: Capabilities
    ) -> Iterator[Batch]:
        """
        On a full send, members who stay but now map to another identifier
        (an email changed): the identifier they were added with is removed
        first, unless another delivered member still holds it, so the
        delivered state never forgets an identifier the destination holds.
        (Ordinary runs do not resolve staying members again; a full resync
        or TTL refresh is what sends identifier changes.)
        """
        if not caps.supports_removals or not self.sync.policy.send_removals:
            return
        storage = self.env.storage
        stored = storage.delivered_identifiers(self.sync.id, [m.key for m in members])
        changed = [
            Member(m.key, stored[m.key])
            for m in members
            if m.key in stored and stored[m.key] != m.identifier
        ]
        if not changed:
            return
        holders = storage.identifier_holders(self.sync.id, {m.identifier for m in changed})
        send: list[Member] = []
        for m in changed:
            others = [h for h in holders.get(m.identifier, ()) if h != m.key]
            slot = (Operation.REMOVE, m.identifier)
            if others or slot in self.in_flight:
                continue  # another member still holds it, or it is being removed
            self.in_flight.add(slot)
            send.append(m)
        if send:
            if "identifier_changed" not in self.notes:
                self.notes.append("identifier_changed")
            yield self._batch(context, Operation.REMOVE, send)

    def _on_acked(self, acked: Acked) -> None:
        batch = acked.batch
        by_identifier = {m.identifier.value: m for m in batch.members}
        rejected_ids: dict[str, str] = {}
        unknown = 0
        for rejection in acked.result.rejected:
            member = by_identifier.get(rejection.identifier)
            if member is None:
                unknown += 1
                continue
            rejected_ids[member.identifier.value] = rejection.reason
        if unknown:
            note = "rejections_for_unsent_members"
            if note not in self.notes:
                self.notes.append(note)
            log.warning(
                "destination %s rejected %d identifier(s) it was not sent in batch %s; ignored",
                self.sync.destination_id,
                unknown,
                batch.sequence,
            )
        operation = batch.operation
        is_remove = operation is Operation.REMOVE
        accepted: list[Member] = []
        rejected: list[tuple[str, str]] = []
        riders = 0
        accepted_ids = 0
        distinct = self.distinct and operation is not Operation.REMOVE
        for m in batch.members:
            if distinct:
                keys = [m.key]
            else:
                keys = [m.key, *self.riders.pop((operation, m.identifier), ())]
                self.in_flight.discard((operation, m.identifier))
                riders += len(keys) - 1
            reason = rejected_ids.get(m.identifier.value)
            if not distinct:
                self.settled[operation, m.identifier] = reason
            if reason is None:
                accepted_ids += 1
                if len(keys) == 1:
                    accepted.append(m)
                else:
                    accepted.extend(Member(k, m.identifier) for k in keys)
            else:
                rejected.extend((k, reason) for k in keys)
        self._apply(
            AppliedBatch(
                run_id=self.run_id,
                sequence=batch.sequence,
                operation=operation,
                idempotency_key=batch.idempotency_key,
                added=() if is_remove else tuple(accepted),
                removed=tuple(m.key for m in accepted)
                if is_remove
                else self._handed_over(operation, accepted),
                rejected=tuple(rejected),
                at=self.env.clock.now(),
                max_rejection_attempts=self.sync.policy.rejection_attempts,
                slot=self.lease.current.slot,
                tally=Tally(
                    added=accepted_ids if operation is Operation.ADD else 0,
                    removed=accepted_ids if is_remove else 0,
                    rejected=len(rejected_ids),
                    batches=1,
                    collisions=riders,
                ),
            ),
        )
        emit(
            self.env.listeners,
            BatchDelivered(
                sync_id=self.sync.id,
                run_id=self.run_id,
                operation=operation,
                sequence=batch.sequence,
                size=len(batch.members),
                rejected=len(rejected_ids),
                idempotency_key=batch.idempotency_key,
            ),
        )

    def _apply_local_removals(self, keys: Keys) -> None:
        for chunk in chunks(keys, ISSUE_CHUNK):
            self._apply(
                AppliedBatch(
                    run_id=self.run_id,
                    sequence=self._next_sequence(),
                    operation=Operation.REMOVE,
                    idempotency_key="local",
                    removed=tuple(chunk),
                    at=self.env.clock.now(),
                ),
            )

    def _resolve_ledger(self, diff: Diff) -> None:
        """
        Forget pending rejections the cohort no longer needs: the member left
        before its add went through, or came back before its removal did. The
        ledger then lists only what is still owed (dead letters stay).
        """
        storage = self.env.storage
        pending = [e.key for e in self.ledger if not e.dead]
        if not pending:
            return
        owed = (diff.adds, diff.removes, diff.existing or [])
        stale = [k for k in pending if not any(_has(keys, k) for keys in owed)]
        if not stale:
            return
        # Applying a member as it already is clears its ledger entry and
        # changes nothing else: still delivered under the same identifier,
        # or still not delivered.
        held = storage.delivered_identifiers(self.sync.id, stale)
        self._apply(
            AppliedBatch(
                run_id=self.run_id,
                sequence=self._next_sequence(),
                operation=Operation.ADD,
                idempotency_key="local",
                added=tuple(Member(k, held[k]) for k in stale if k in held),
                removed=tuple(k for k in stale if k not in held),
                at=self.env.clock.now(),
            ),
        )

    def _teardown(self, destination: Destination, caps: Capabilities) -> tuple[RunStatus, Sync]:
        """
        Remove everything this sync may have delivered
        (``OnDelete.REMOVE_DELIVERED``): its delivered state plus the members
        of every add still pending (sent by a run that crashed or was cut
        short, so the destination may hold them).
        """
        storage = self.env.storage
        self.version = storage.delivered_version(self.sync.id)
        self.pending = storage.pending_batches(self.sync.id)
        self._key_basis()
        keys = list(storage.iter_delivered(self.sync.id))
        # A pending removal may not have arrived either: every member named
        # in a pending record is removed, delivered or not.
        unknown = self._in_flight()
        if unknown:
            held = storage.filter_delivered(self.sync.id, unknown)
            for key, member in unknown.items():
                if key not in held:
                    self.recovered_ids[key] = member.identifier
            keys = sorted({*keys, *self.recovered_ids})
        now = self.env.clock.now()
        if not caps.supports_removals:
            remaining = len(keys)
            reason = (
                "deleted (removals_unsupported): the destination cannot remove members, "
                f"so the {remaining} member(s) this sync delivered remain there"
            )
            self.notes.append(f"removals_unsupported: {remaining} member(s) remain")
            new_sync = attrs.evolve(
                self.sync, status=SyncStatus.DELETED, status_reason=reason, updated_at=now
            )
            if not remaining:
                return RunStatus.SUCCEEDED, attrs.evolve(new_sync, status_reason="deleted")
            self.teardown_error = PermanentError(reason)
            return RunStatus.FAILED, new_sync
        diff = Diff(adds=[], removes=keys, existing=None, size=0, delivered=len(keys))
        self.diff = diff
        self._send(destination, caps, diff, keys, send_removals=True)
        status = RunStatus.PARTIAL if self.counts.rejected else RunStatus.SUCCEEDED
        reason = "deleted: removed what it delivered"
        if self.counts.rejected:
            reason = (
                f"deleted; the destination refused to remove {self.counts.rejected} "
                "member(s), see the ledger"
            )
        return status, attrs.evolve(
            self.sync, status=SyncStatus.DELETED, status_reason=reason, updated_at=now
        )

    def _flush_issues(self) -> None:
        for i in range(0, len(self.issues), ISSUE_CHUNK):
            self.env.storage.record_issues(self.lease.current, self.issues[i : i + ISSUE_CHUNK])
        self.issues.clear()

    # -- completion --------------------------------------------------------------

    def _next_slot(self, sync: Sync, finished: datetime) -> tuple[datetime | None, int]:
        policy, offset = grid_policy(self.record, sync)
        lease = self.lease.current
        try:
            nxt = next_after_run(policy, offset, lease.slot, self.started, finished)
        except ConfigurationError:
            raise  # a damaged schedule row, not the end of time
        except (OverflowError, ValueError):
            # No next slot exists before year 10,000: say so, do not crash.
            self.notes.append("no_next_slot: the clock is at the end of time")
            return None, 0
        return nxt.due, nxt.coalesced

    def _schedule_next(
        self,
        new_sync: Sync,
        next_trigger: Trigger,
        error: BaseException | None,
        finished: datetime,
        *,
        failed: bool,
    ) -> tuple[datetime | None, Trigger, int, int, Sync]:
        """
        What comes after this run: the next due instant and trigger, the
        consecutive-failure count, the slots coalesced, and the definition
        (one-time syncs complete or fail here).
        """
        env = self.env
        attempts = 0
        coalesced = 0
        one_time = new_sync.policy.cadence is Cadence.ONE_TIME
        if new_sync.status is not SyncStatus.ACTIVE:
            return None, next_trigger, attempts, coalesced, new_sync
        if failed and (one_time or next_trigger is Trigger.TEARDOWN):
            # Retried with backoff a bounded number of times, then `failed`.
            attempts = self.record.attempts + 1
            if attempts >= new_sync.policy.one_time_attempts:
                what = (
                    "removing the delivered members"
                    if next_trigger is Trigger.TEARDOWN
                    else "one-time sync"
                )
                reason = f"{what} failed {attempts} times: {error}"
                new_sync = attrs.evolve(
                    new_sync,
                    status=SyncStatus.FAILED,
                    status_reason=reason,
                    updated_at=finished,
                )
                emit(
                    env.listeners,
                    SyncFailed(
                        sync_id=new_sync.id,
                        status=SyncStatus.FAILED,
                        reason=reason,
                        at=finished,
                    ),
                )
                return None, next_trigger, attempts, coalesced, new_sync
            backoff = new_sync.policy.retry.delay(attempts - 1, env.rng.random()) * 60
            retry_at = add_saturating(finished, timedelta(seconds=backoff))
            if next_trigger is not Trigger.TEARDOWN:
                next_trigger = Trigger.ONE_TIME
            return retry_at, next_trigger, attempts, coalesced, new_sync
        if one_time:
            new_sync = attrs.evolve(new_sync, status=SyncStatus.COMPLETED, updated_at=finished)
            return None, next_trigger, attempts, coalesced, new_sync
        next_due, coalesced = self._next_slot(new_sync, finished)
        if next_due is not None and next_due <= finished:
            # A slot fell due while this run ran: it runs next, at once.
            self.notes.append(f"overran: the slot of {next_due.isoformat()} runs next")
        return next_due, next_trigger, attempts, coalesced, new_sync

    def _complete(
        self,
        trigger: Trigger,
        status: RunStatus,
        error: BaseException | None,
        new_sync: Sync,
        *,
        feed_cursor: str | None,
        full_done: bool,
    ) -> SyncRun:
        env = self.env
        lease = self.lease.current
        finished = env.clock.now()
        next_trigger = Trigger.SCHEDULED
        if error is None and self.teardown_error is not None:
            error = self.teardown_error
        if self.issues:
            try:
                self._flush_issues()
            except CohortSyncError:
                log.exception("could not record member issues of run %s", self.run_id)
        failed = status is RunStatus.FAILED or (error is not None and status is RunStatus.PARTIAL)
        if trigger is Trigger.TEARDOWN and new_sync.status is not SyncStatus.DELETED:
            # The removals failed: what comes next is the teardown again (also
            # after a resume), never a normal run that would deliver again.
            next_trigger = Trigger.TEARDOWN
        next_due, next_trigger, attempts, coalesced, new_sync = self._schedule_next(
            new_sync, next_trigger, error, finished, failed=failed
        )
        run = SyncRun(
            id=self.run_id,
            sync_id=self.sync.id,
            generation=lease.generation,
            trigger=trigger,
            slot=lease.slot,
            started_at=self.started,
            finished_at=finished,
            status=status,
            cadence=self.sync.cadence,
            added=self.counts.added,
            removed=self.counts.removed,
            skipped=self.counts.skipped,
            rejected=self.counts.rejected,
            batches=self.counts.batches,
            retries=self.sender.retries if self.sender else 0,
            full_sync=self.full,
            error_type=None if error is None else type(error).__name__,
            error_message=None if error is None else _message(error),
            notes=tuple(self.notes),
            collisions=self.counts.collisions,
            coalesced=coalesced,
        )
        env.storage.complete_run(
            lease,
            Completion(
                run=run,
                next_due=next_due,
                next_trigger=next_trigger,
                sync=new_sync if new_sync != self.sync else None,
                attempts=attempts,
                # A failed run delivered only part of the window: read it again.
                feed_cursor=feed_cursor if error is None else None,
                full_sync_done=full_done and status is RunStatus.SUCCEEDED,
                # Pending batches are settled once a run delivered its whole
                # diff (their reconciliation included); else the next run
                # reconciles them again, which is harmless.
                resolved=(
                    tuple(p.idempotency_key for p in self.pending)
                    if error is None and not self.guarded and status is not RunStatus.SKIPPED
                    else ()
                ),
                scheduled_from=finished,
            ),
        )
        log.info(
            "sync %s run %s %s: +%d -%d skipped=%d rejected=%d batches=%d",
            run.sync_id,
            run.id,
            run.status.value,
            run.added,
            run.removed,
            run.skipped,
            run.rejected,
            run.batches,
        )
        if status in (RunStatus.PARTIAL, RunStatus.FAILED) and run.skipped:
            log.warning(
                "sync %s run %s skipped %d member(s); see export_history for the reasons",
                run.sync_id,
                run.id,
                run.skipped,
            )
        emit(env.listeners, RunFinished(run=run))
        return run


def _already_sent(sent: set[Identifier], *, identity: bool) -> Callable[[Member], bool]:
    """
    Whether a full resend already sent a member's identifier in this run
    (distinct keys never share one under the identity mapping).
    """

    def held(member: Member) -> bool:
        return not identity and member.identifier in sent

    return held


def _held_in(holders: dict[Identifier, list[str]]) -> Callable[[Member], bool]:
    """
    Whether the destination holds a member's identifier for ANOTHER member
    (a member re-added after a lost acknowledgement holds it itself, as far
    as the store knows, and must be sent). A leaver whose identifier must
    stay is still delivered, or was dropped because another holder stays,
    so the store's holders say so.
    """

    def held(member: Member) -> bool:
        return any(k != member.key for k in holders.get(member.identifier, ()))

    return held


def _heals_by_itself(error: BaseException) -> bool:
    """
    Whether a failure is worth retrying indefinitely: a destination or a
    store that is down comes back; corrupt data and bugs do not.
    """
    if isinstance(error, TransientError):
        return True
    return isinstance(error, StorageError) and not isinstance(error, CorruptStoreError)


def _message(error: BaseException) -> str:
    return str(error)[:2_000]


def _hour(when: datetime) -> int:
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) // 3_600


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
