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

import logging
import random
import secrets
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta

import attrs

from cohortsync import _schedule
from cohortsync._clock import Clock
from cohortsync._cohort import ChangeFeed, Cohort
from cohortsync._delivery import Acked, BatchSender, RateLimiter, make_batch
from cohortsync._destination import Capabilities, Destination, Member, Operation, RunContext
from cohortsync._diff import Diff, chunks, diff_changes, diff_snapshot
from cohortsync._eligibility import Eligibility, Ruleset, check_eligibility
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
from cohortsync._identifiers import IdentifierMapping
from cohortsync._policy import Cadence
from cohortsync._storage import AppliedBatch, Completion, IssueKind, Lease, MemberIssue, Storage, SyncRecord
from cohortsync._sync import RunStatus, Sync, SyncRun, SyncStatus, Trigger
from cohortsync.exceptions import (
    AuthenticationError,
    CohortSyncError,
    LeaseLostError,
    SourceError,
)

__all__ = ["RunEnvironment", "execute"]

log = logging.getLogger("cohortsync")

TTL_REFRESH_SHARE = 0.8
"""Memberships with a TTL are re-sent once this share of the TTL has passed."""

ISSUE_CHUNK = 10_000


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


@attrs.define
class _Counts:
    added: int = 0
    removed: int = 0
    rejected: int = 0
    skipped: int = 0
    batches: int = 0
    sequence: int = 0


class _Lease:
    """
    The lease of the run in progress, extended before it can expire.
    """

    def __init__(self, env: RunEnvironment, lease: Lease) -> None:
        self.env = env
        self.current = lease

    def keep_alive(self) -> None:
        remaining = self.current.expires_at - self.env.clock.now()
        if remaining < self.env.lease_for / 2:
            self.current = self.env.storage.extend_lease(
                self.current, self.env.clock.now(), self.env.lease_for
            )


def _period(cadence: Cadence) -> timedelta | None:
    return cadence.period


def _effective_trigger(lease: Lease, cadence: Cadence, now: datetime) -> Trigger:
    if lease.trigger is not Trigger.SCHEDULED:
        return lease.trigger
    if cadence is Cadence.REALTIME:
        return Trigger.REALTIME
    if cadence is Cadence.ONE_TIME:
        return Trigger.ONE_TIME
    period = _period(cadence)
    if period is not None and now - lease.slot >= period:
        return Trigger.CATCH_UP
    return Trigger.SCHEDULED


def _offset_for(record: SyncRecord, cadence: Cadence) -> int:
    if cadence is record.sync.policy.cadence:
        return record.offset
    # A fallback cadence (real-time -> hourly) has no allocated slot: derive a
    # stable one so the fallback runs keep one time in the hour.
    period = _schedule.period_seconds(cadence)
    return 0 if period is None else _schedule.stable_offset(record.sync.id, period)


def next_due_after(record: SyncRecord, sync: Sync, after: datetime) -> datetime | None:
    cadence = sync.cadence
    policy = sync.policy
    if cadence is not policy.cadence:
        policy = attrs.evolve(policy, cadence=cadence, timezone=None)
    return _schedule.next_due(policy, record.anchor, _offset_for(record, cadence), after)


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
        self.started = env.clock.now()
        self.record = env.storage.get_sync(lease.sync_id)
        self.sync = self.record.sync
        self.counts = _Counts()
        self.notes: list[str] = []
        self.issues: list[MemberIssue] = []
        self.full = False
        self.sender: BatchSender | None = None

    # -- the run ---------------------------------------------------------------

    def run(self) -> SyncRun:
        env = self.env
        lease = self.lease.current
        cadence = self.sync.cadence
        trigger = _effective_trigger(lease, cadence, self.started)
        emit(
            env.listeners,
            RunStarted(
                sync_id=self.sync.id, run_id=self.run_id, trigger=trigger, slot=lease.slot, at=self.started
            ),
        )
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
                status = self._teardown(destination, caps)
                new_sync = attrs.evolve(
                    self.sync, status=SyncStatus.DELETED, updated_at=env.clock.now()
                )
            else:
                status, new_sync, feed_cursor, full_done = self._deliver(
                    cohort, destination, caps, trigger
                )
        except LeaseLostError:
            raise
        except CohortSyncError as e:
            error = e
        except Exception as e:  # a bug in host code must not lose the run record
            log.exception("run %s of sync %s failed unexpectedly", self.run_id, self.sync.id)
            error = e
        if error is not None:
            status, new_sync = self._failed(error)
        return self._complete(trigger, status, error, new_sync, feed_cursor, full_done)

    def _failed(self, error: BaseException) -> tuple[RunStatus, Sync]:
        delivered_any = self.counts.added or self.counts.removed
        status = RunStatus.PARTIAL if delivered_any else RunStatus.FAILED
        new_sync = self.sync
        if isinstance(error, AuthenticationError):
            reason = f"authentication failed: {error}"
            new_sync = attrs.evolve(
                self.sync,
                status=SyncStatus.PAUSED,
                status_reason=reason,
                updated_at=self.env.clock.now(),
            )
            emit(
                self.env.listeners,
                SyncFailed(
                    sync_id=self.sync.id, status=SyncStatus.PAUSED, reason=reason, at=self.env.clock.now()
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
        self, cohort: Cohort, destination: Destination, caps: Capabilities, trigger: Trigger
    ) -> tuple[RunStatus, Sync, str | None, bool]:
        env = self.env
        record = self.record
        sync = self.sync
        policy = sync.policy
        now = env.clock.now()
        ttl = caps.membership_ttl
        ttl_due = ttl is not None and (
            record.last_full_sync_at is None
            or now - record.last_full_sync_at >= ttl * TTL_REFRESH_SHARE
        )
        delivered_count = env.storage.count_delivered(sync.id)
        self.full = record.full_resync or (ttl_due and delivered_count > 0)
        if self.full:
            self.notes.append("full_resync" if record.full_resync else "ttl_refresh")
        source = cohort.source
        if source is None:
            raise SourceError(cohort.id, "the cohort has no membership source registered")
        dead = env.storage.dead_letters(sync.id)
        feed_cursor: str | None = None
        # Once an hour a real-time sync diffs the full snapshot even when it
        # has a change feed: that reconciles anything a feed missed and
        # retries members the destination rejected earlier.
        reconcile = self.lease.current.slot.minute == 0
        use_feed = (
            sync.cadence is Cadence.REALTIME
            and not reconcile
            and isinstance(source, ChangeFeed)
            and record.feed_cursor is not None
            and not self.full
            and not caps.full_sync_only
        )
        if use_feed:
            assert record.feed_cursor is not None  # noqa: S101 - checked above
            diff = diff_changes(
                source,  # type: ignore[arg-type]
                cohort.id,
                record.feed_cursor,
                lambda keys: env.storage.filter_delivered(sync.id, keys),
                delivered_count,
                exclude=dead,
            )
            feed_cursor = diff.feed_cursor
        else:
            if isinstance(source, ChangeFeed) and policy.cadence is Cadence.REALTIME:
                # Take the cursor before reading, so changes made during the
                # read are seen again (idempotently) by the next run.
                feed_cursor = source.cursor()
            diff = diff_snapshot(
                source,
                cohort.id,
                env.storage.iter_delivered(sync.id),
                delivered_count,
                keep_existing=caps.full_sync_only or self.full,
                exclude=dead,
            )
        self.counts.skipped += len(diff.invalid)
        self.issues.extend(
            MemberIssue(run_id=self.run_id, key=k, kind=IssueKind.SKIPPED, reason=r)
            for k, r in diff.invalid
        )
        if diff.invalid:
            self.notes.append("invalid_keys")

        # Eligibility is re-checked at every run, with the size just measured.
        size = diff.size if diff.size is not None else delivered_count + len(diff.adds) - len(diff.removes)
        measured = cohort.with_size(size)
        new_sync, proceed = self._recheck(measured, caps)
        if not proceed:
            return RunStatus.SKIPPED, new_sync, None, False

        # The mass-removal guard: decided before anything is sent.
        removes = diff.removes
        send_removals = policy.send_removals and caps.supports_removals
        guarded = False
        if removes and send_removals and not sync.guard_released:
            if policy.guard.trips(diff.delivered, len(removes), diff.source_empty):
                guarded = True
                self.notes.append(
                    f"mass_removal_guard: would remove {len(removes)} of {diff.delivered}"
                    + (" (source returned no members)" if diff.source_empty else "")
                )
                emit(
                    env.listeners,
                    GuardTripped(
                        sync_id=sync.id,
                        run_id=self.run_id,
                        delivered=diff.delivered,
                        removing=len(removes),
                        source_empty=diff.source_empty,
                        at=env.clock.now(),
                    ),
                )
                removes = []
        if sync.guard_released and not guarded:
            new_sync = attrs.evolve(new_sync, guard_released=False)

        self._send(destination, caps, diff, removes, send_removals)
        if self.issues:
            self._flush_issues()
        if guarded:
            status = RunStatus.GUARDED
        elif self.counts.rejected:
            status = RunStatus.PARTIAL
        else:
            status = RunStatus.SUCCEEDED
        full_done = self.full or caps.full_sync_only or delivered_count == 0
        return status, new_sync, feed_cursor, full_done

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
        for reason in result.warnings:
            self.notes.append(reason.code)
        if result.eligible:
            if sync.effective_cadence is not None:
                emit(
                    env.listeners,
                    EligibilityChanged(
                        sync_id=sync.id, eligible=True, codes=(), cadence=policy.cadence.value, at=env.clock.now()
                    ),
                )
                self.notes.append("eligible_again")
                return attrs.evolve(sync, effective_cadence=None, updated_at=env.clock.now()), True
            return sync, True
        codes = tuple(r.code for r in result.blocking)
        self.notes.extend(codes)
        from cohortsync._policy import OnIneligible  # noqa: PLC0415 - keep the import local

        if policy.cadence is Cadence.REALTIME and policy.on_ineligible is OnIneligible.FALLBACK_HOURLY:
            fallback = self._check(cohort, caps, Cadence.HOURLY)
            if fallback.eligible:
                if sync.effective_cadence is not Cadence.HOURLY:
                    emit(
                        env.listeners,
                        EligibilityChanged(
                            sync_id=sync.id, eligible=False, codes=codes, cadence="hourly", at=env.clock.now()
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
                sync_id=sync.id, eligible=False, codes=codes, cadence=policy.cadence.value, at=env.clock.now()
            ),
        )
        emit(
            env.listeners,
            SyncFailed(sync_id=sync.id, status=SyncStatus.PAUSED, reason=reason, at=env.clock.now()),
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
        try:
            cohort_name = self.env.cohort(self.sync.cohort_id).name
        except CohortSyncError:
            pass
        return RunContext(
            run_id=self.run_id,
            sync_id=self.sync.id,
            generation=self.sync.generation,
            cohort_id=self.sync.cohort_id,
            cohort_name=cohort_name,
            computed_at=self.started,
            full_sync=self.full,
        )

    def _sender(self, destination: Destination, caps: Capabilities) -> BatchSender:
        if self.sender is None:
            self.sender = BatchSender(
                destination=destination,
                retry=self.sync.policy.retry,
                clock=self.env.clock,
                limiter=self.env.limiter(self.sync.destination_id, caps),
                keep_alive=self.lease.keep_alive,
                rng=self.env.rng,
            )
        return self.sender

    def _send(
        self,
        destination: Destination,
        caps: Capabilities,
        diff: Diff,
        removes: list[str],
        send_removals: bool,
    ) -> None:
        context = self._context()
        sender = self._sender(destination, caps)
        size = caps.max_batch_size
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
            mapping = self.env.mapping(self.sync.mapping_id)
            sender.send_all(
                self._add_batches(context, Operation.ADD, diff.adds, size, mapping, caps),
                caps.max_parallel,
                self._on_acked,
            )
            if diff.existing:
                op = Operation.EXISTING if caps.full_sync_only else Operation.ADD
                sender.send_all(
                    self._add_batches(context, op, diff.existing, size, mapping, caps),
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

    def _remove_batches(self, context: RunContext, keys: list[str], size: int) -> Iterator:  # type: ignore[type-arg]
        for chunk in chunks(keys, size):
            ids = self.env.storage.delivered_identifiers(self.sync.id, chunk)
            members = [Member(k, ids[k]) for k in chunk if k in ids]
            if members:
                yield make_batch(context, Operation.REMOVE, members, self._next_sequence())

    def _add_batches(
        self,
        context: RunContext,
        operation: Operation,
        keys: list[str],
        size: int,
        mapping: IdentifierMapping,
        caps: Capabilities,
    ) -> Iterator:  # type: ignore[type-arg]
        accepted = caps.accepted_identifiers
        for chunk in chunks(keys, size):
            members, unresolved = mapping.resolve_many(chunk, accepted)
            if unresolved:
                self.counts.skipped += len(unresolved)
                self.issues.extend(
                    MemberIssue(
                        run_id=self.run_id, key=k, kind=IssueKind.SKIPPED, reason="unresolved_mapping"
                    )
                    for k in unresolved
                )
            if members:
                yield make_batch(context, operation, members, self._next_sequence())

    def _on_acked(self, acked: Acked) -> None:
        batch = acked.batch
        by_identifier = {m.identifier.value: m for m in batch.members}
        rejected: dict[str, str] = {}
        unknown = 0
        for rejection in acked.result.rejected:
            member = by_identifier.get(rejection.identifier)
            if member is None:
                unknown += 1
                continue
            rejected[member.key] = rejection.reason
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
        accepted = [m for m in batch.members if m.key not in rejected]
        is_remove = batch.operation is Operation.REMOVE
        self.env.storage.apply_batch(
            self.lease.current,
            AppliedBatch(
                run_id=self.run_id,
                sequence=batch.sequence,
                operation=batch.operation,
                idempotency_key=batch.idempotency_key,
                added=() if is_remove else tuple(accepted),
                removed=tuple(m.key for m in accepted) if is_remove else (),
                rejected=tuple(rejected.items()),
                at=self.env.clock.now(),
                max_rejection_attempts=self.sync.policy.rejection_attempts,
            ),
        )
        self.counts.batches += 1
        self.counts.rejected += len(rejected)
        if is_remove:
            self.counts.removed += len(accepted)
        elif batch.operation is Operation.ADD:
            self.counts.added += len(accepted)
        emit(
            self.env.listeners,
            BatchDelivered(
                sync_id=self.sync.id,
                run_id=self.run_id,
                operation=batch.operation,
                sequence=batch.sequence,
                size=len(batch.members),
                rejected=len(rejected),
                idempotency_key=batch.idempotency_key,
            ),
        )

    def _apply_local_removals(self, keys: list[str]) -> None:
        for chunk in chunks(keys, ISSUE_CHUNK):
            self.env.storage.apply_batch(
                self.lease.current,
                AppliedBatch(
                    run_id=self.run_id,
                    sequence=self._next_sequence(),
                    operation=Operation.REMOVE,
                    idempotency_key="local",
                    removed=tuple(chunk),
                    at=self.env.clock.now(),
                ),
            )

    def _teardown(self, destination: Destination, caps: Capabilities) -> RunStatus:
        """
        Remove exactly what this sync delivered (``OnDelete.REMOVE_DELIVERED``).
        """
        keys = list(self.env.storage.iter_delivered(self.sync.id))
        diff = Diff(adds=[], removes=keys, existing=None, size=0, delivered=len(keys))
        if caps.supports_removals:
            self._send(destination, caps, diff, keys, True)
        return RunStatus.PARTIAL if self.counts.rejected else RunStatus.SUCCEEDED

    def _flush_issues(self) -> None:
        for i in range(0, len(self.issues), ISSUE_CHUNK):
            self.env.storage.record_issues(self.lease.current, self.issues[i : i + ISSUE_CHUNK])
        self.issues.clear()

    # -- completion --------------------------------------------------------------

    def _complete(
        self,
        trigger: Trigger,
        status: RunStatus,
        error: BaseException | None,
        new_sync: Sync,
        feed_cursor: str | None,
        full_done: bool,
    ) -> SyncRun:
        env = self.env
        lease = self.lease.current
        finished = env.clock.now()
        record = self.record
        attempts = 0
        next_trigger = Trigger.SCHEDULED
        if self.issues:
            try:
                self._flush_issues()
            except CohortSyncError:
                log.exception("could not record member issues of run %s", self.run_id)
        failed = status is RunStatus.FAILED or (error is not None and status is RunStatus.PARTIAL)
        if new_sync.status is not SyncStatus.ACTIVE:
            next_due = None
        elif new_sync.policy.cadence is Cadence.ONE_TIME:
            if failed:
                attempts = record.attempts + 1
                if attempts >= new_sync.policy.one_time_attempts:
                    reason = f"one-time sync failed {attempts} times: {error}"
                    new_sync = attrs.evolve(
                        new_sync, status=SyncStatus.FAILED, status_reason=reason, updated_at=finished
                    )
                    emit(
                        env.listeners,
                        SyncFailed(sync_id=new_sync.id, status=SyncStatus.FAILED, reason=reason, at=finished),
                    )
                    next_due = None
                else:
                    backoff = new_sync.policy.retry.delay(attempts - 1, env.rng.random()) * 60
                    next_due = finished + timedelta(seconds=backoff)
                    next_trigger = Trigger.ONE_TIME
            else:
                new_sync = attrs.evolve(new_sync, status=SyncStatus.COMPLETED, updated_at=finished)
                next_due = None
        else:
            next_due = next_due_after(record, new_sync, max(finished, lease.slot))
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
            error_message=None if error is None else str(error)[:2_000],
            notes=tuple(self.notes),
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
        emit(env.listeners, RunFinished(run=run))
        return run
