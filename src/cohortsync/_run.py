"""
The run executor: one run of one sync, from a claimed lease to a completed
run record. It loads state, asks the planner (:mod:`cohortsync._plan`) what
to do, sends, applies and completes; the decisions themselves live there.

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

import contextlib
import logging
import random
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import attrs

from cohortsync import _schedule
from cohortsync._aio import Portal, RunCancelled
from cohortsync._cache import DeliveredCache, DeliveredState
from cohortsync._clock import Clock
from cohortsync._cohort import Cohort, has_change_feed
from cohortsync._delivery import Acked, BatchSender, RateLimiter, make_batch
from cohortsync._destination import (
    AnyDestination,
    AsyncDestination,
    Batch,
    Capabilities,
    Identifier,
    IdentifierKind,
    Member,
    Operation,
    RunContext,
    identity_identifiers,
    identity_members,
)
from cohortsync._diff import (
    Diff,
    Keys,
    chunks,
    diff_changes,
    diff_snapshot,
    diff_with_state,
    has_key,
    with_keys,
)
from cohortsync._events import (
    BatchDelivered,
    Event,
    Listener,
    RunFinished,
    RunPlanned,
    RunStarted,
    emit,
)
from cohortsync._logs import log_failure
from cohortsync._plan import (
    GuardPlan,
    Outcome,
    ReadFacts,
    ReadPlan,
    content_key,
    group_adds,
    group_removes,
    in_flight_members,
    plan_completion,
    plan_failure,
    plan_guard,
    plan_read,
    plan_recheck,
    plan_recovery,
    reusable_keys,
    run_status,
    teardown_status,
)
from cohortsync._sync import RunStatus, Sync, SyncRun, SyncStatus, Trigger
from cohortsync._tokens import token_hex
from cohortsync.eligibility import Ruleset
from cohortsync.exceptions import (
    AuthenticationError,
    CohortSyncError,
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
    Claim,
    Completion,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    PendingBatch,
    Storage,
    Tally,
)

__all__ = ["Completing", "RunEnvironment", "execute", "prepare"]

log = logging.getLogger("cohortsync.run")

ISSUE_CHUNK = 10_000

CLOSE_GRACE = 1.0
"""Seconds an asynchronous destination's ``close`` may still take once its
scheduler is cancelled (shutdown, ``asyncio.timeout``); then it is cancelled."""

_MAX_WAIT = 365 * 86_400.0
"""Longest wait a lease is extended for in one step (a timedelta must stay representable)."""

_ABOUT = "sync %s run %s slot %s: "
"""How every log line about a run starts (its fields are also on the record)."""


def _fields(
    sync_id: str, run_id: str, slot: datetime, destination_id: str, **more: object
) -> dict[str, object]:
    """The ``extra=`` fields of a log record about a run."""
    return {
        "sync_id": sync_id,
        "run_id": run_id,
        "slot": slot.isoformat(),
        "destination_id": destination_id,
        **more,
    }


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
    destination: Callable[[str], AnyDestination]
    mapping: Callable[[str | None], IdentifierMapping]
    limiter: Callable[[str, Capabilities], RateLimiter | None]
    rng: random.Random
    cache: DeliveredCache | None = None
    pause_after_failures: int = 5
    """A sync failing the same way this many runs in a row is paused."""
    on_slow: Callable[[], None] | None = None
    """Called when a run is about to extend its lease (it has taken half of
    it): the scheduler stores the records waiting behind it."""
    portal: Callable[[], Portal] | None = None
    """The event loop an :class:`~cohortsync.AsyncDestination` runs on (a
    synchronous scheduler starts its own on first use)."""
    scope: Portal | None = None
    """Under an asynchronous scheduler, the portal whose cancellation stops
    this run at its next step, whatever kind its destination is."""


_NOTHING_DELIVERED = Tally()
"""The tally of most runs (frozen: shared)."""


@attrs.define
class _Counts:
    added: int = 0
    removed: int = 0
    rejected: int = 0
    skipped: int = 0
    batches: int = 0
    collisions: int = 0
    sequence: int = 0

    def tally(self) -> Tally:
        """What the run delivered, as its record tells it."""
        if not (self.added or self.removed or self.rejected or self.batches or self.collisions):
            return _NOTHING_DELIVERED  # most runs
        return Tally(
            added=self.added,
            removed=self.removed,
            rejected=self.rejected,
            batches=self.batches,
            collisions=self.collisions,
        )

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

    def _due(self, now: datetime, needed: timedelta) -> bool:
        return self.current.expires_at - now < self.env.lease_for / 2 + needed

    def renewal_due(self, seconds: float = 0.0) -> bool:
        """
        Whether :meth:`keep_alive` would call the store now: an event loop
        asks first, and leaves the loop for a thread only when it would.
        """
        return self._due(self.env.clock.now(), timedelta(seconds=min(seconds, _MAX_WAIT)))

    def keep_alive(self, seconds: float = 0.0) -> None:
        """
        Extend the lease if it would not outlast the next *seconds* plus half
        a lease: progress (or a deliberate wait) must never look like a crash.
        """
        needed = timedelta(seconds=min(seconds, _MAX_WAIT))
        now = self.env.clock.now()
        if self._due(now, needed):
            if self.env.on_slow is not None:
                self.env.on_slow()
            self.current = self.env.storage.extend_lease(
                self.current, now, self.env.lease_for + needed
            )


@attrs.define
class _Progress:
    """
    A run's progress against its plan, for events and DEBUG lines: counted
    per batch, never per member.
    """

    listening: bool
    """Someone listens: build events (and take batch start instants)."""
    debug: bool = False
    """DEBUG lines about this run are logged (decided once per run)."""
    planned_batches: int = 0
    planned_members: int = 0
    batches_done: int = 0
    members_done: int = 0
    started: dict[str, datetime] = attrs.Factory(dict)
    """When each batch in flight was recorded, by idempotency key."""


@attrs.frozen
class Completing:
    """
    A finished run whose completion is not stored yet: the scheduler stores
    several together (:meth:`~cohortsync.storage.OptionalQueries.complete_runs`)
    and then calls :meth:`report` for each one that was written.
    """

    lease: Lease
    completion: Completion
    destination_id: str = ""

    @property
    def run(self) -> SyncRun:
        return self.completion.run

    def report(self, env: RunEnvironment) -> SyncRun:
        """
        Log the stored run (the one INFO line of its end, with its counts)
        and emit :class:`RunFinished`; return it.
        """
        run = self.completion.run
        if log.isEnabledFor(logging.INFO):
            duration = run.duration
            text = (
                _ABOUT + "%s +%d -%d skipped=%d rejected=%d batches=%d retries=%d in %.3fs "
                "(%s, %s, destination %s%s)"
            )
            # The error's class only: its message may quote what an adapter sent.
            error = "" if run.error_type is None else f", error {run.error_type}"
            log.info(
                text,
                run.sync_id,
                run.id,
                run.slot.isoformat(),
                run.status.value,
                run.added,
                run.removed,
                run.skipped,
                run.rejected,
                run.batches,
                run.retries,
                duration,
                run.trigger.value,
                run.cadence.value,
                self.destination_id,
                error,
                extra=_fields(
                    run.sync_id,
                    run.id,
                    run.slot,
                    self.destination_id,
                    trigger=run.trigger.value,
                    cadence=run.cadence.value,
                    status=run.status.value,
                    added=run.added,
                    removed=run.removed,
                    skipped=run.skipped,
                    rejected=run.rejected,
                    batches=run.batches,
                    retries=run.retries,
                    duration=duration,
                    error_type=run.error_type,
                ),
            )
        if (
            run.status in (RunStatus.PARTIAL, RunStatus.FAILED)
            and run.skipped
            and log.isEnabledFor(logging.WARNING)
        ):
            text = _ABOUT + "skipped %d member(s); see export_history for the reasons"
            log.warning(
                text,
                run.sync_id,
                run.id,
                run.slot.isoformat(),
                run.skipped,
                extra=_fields(run.sync_id, run.id, run.slot, self.destination_id),
            )
        if env.listeners:
            emit(env.listeners, RunFinished(run=run, destination_id=self.destination_id))
        return run


def execute(env: RunEnvironment, claim: Claim | Lease) -> SyncRun:
    """
    Run the claimed slot and complete it. Never raises for a failed run (the
    failure is recorded); raises :class:`LeaseLostError` if the lease was lost.
    """
    done = prepare(env, claim)
    env.storage.complete_run(done.lease, done.completion)
    return done.report(env)


def prepare(
    env: RunEnvironment, claim: Claim | Lease, *, started: datetime | None = None
) -> Completing:
    """
    Run the claimed slot up to its completion, which the caller stores (and
    then reports). Raises :class:`LeaseLostError` if the lease was lost.

    A :class:`Claim` carries the sync's record and its delivered-state facts,
    so an ordinary run reads nothing more; a bare :class:`Lease` makes the
    run read them. *started* is the caller's reading of the environment's
    clock just before (else the run reads it).
    """
    lease, told = (claim, None) if isinstance(claim, Lease) else (claim.lease, claim)
    run = _Run(env, lease, told, env.clock.now() if started is None else started)
    try:
        return run.run()
    except LeaseLostError as error:
        error.run_id = error.run_id or run.run_id  # for the caller's log line
        raise
    except RunCancelled:
        # Cancelled by an asynchronous scheduler: nothing is recorded as
        # failed, and the slot is given back at once (not when the lease
        # expires) for the next run to take over; what was in flight is
        # re-sent then under the same keys.
        with contextlib.suppress(CohortSyncError):
            env.storage.release_lease(run.lease.current)
        raise


class _Run:
    # Facts of a run that start out empty, set as the run learns them: class
    # attributes, so a run that learns none of them (most) never sets them.
    full = False
    sender: BatchSender | None = None
    # The delivered state mirrored in memory while it is known exactly,
    # and its version token: kept in the environment's cache after the run.
    state: DeliveredState | None = None
    version = ""
    reusable: dict[str, str] | None = None
    """Idempotency keys of pending requests, by content (see _plan.reusable_keys)."""
    kinds: tuple[frozenset[IdentifierKind] | None, IdentifierKind | None] | None = None
    distinct = False
    """Adds of a first sync under the identity mapping: one member per identifier."""
    unshared = False
    """Every member this run sends (adds and removes) holds an identifier no
    other member of the sync holds (see ``_unshared``): no shared-identifier
    bookkeeping at all."""
    resumed = False
    """An earlier attempt of this slot applied batches (this run takes it over)."""
    readd: dict[str, Identifier] | None = None
    """Delivered members a recovery adds again, with the identifier each holds:
    an ordinary run does not resolve a staying member again, and re-resolving
    one after a mapping change would forget the identifier the destination
    may still hold (nothing would ever remove it)."""
    uncertain: frozenset[Identifier] | None = None
    """Identifiers named in ``pending``: whether the destination holds them is unknown."""
    pending_left: dict[str, set[str]] | None = None
    """For each pending record, its members this run has not re-sent yet."""
    guarded = False
    feed_cursor: str | None = None
    full_done = False
    diff: Diff | None = None
    resolved_adds: dict[str, Identifier] | None = None
    adds_by_identifier: dict[Identifier, list[str]] | None = None
    mapping: IdentifierMapping | None = None
    delivered_at_start = 0
    teardown_error: BaseException | None = None

    def __init__(
        self, env: RunEnvironment, lease: Lease, claim: Claim | None, started: datetime
    ) -> None:
        self.env = env
        self.lease = _Lease(env, lease)
        self.run_id = token_hex(8)
        # The scheduled slot goes into every idempotency key: a run taking over
        # a crashed one runs the same slot and re-sends under the same keys,
        # while a member who leaves and comes back does so in a later slot and
        # gets a new key (a de-duplicating receiver would drop a repeated one).
        self.basis: str | None = None
        """The idempotency keys' basis when not the slot's (see _key_basis); made
        when the first batch is (most runs send none)."""
        self.started = started
        record = None if claim is None else claim.record
        self.record = env.storage.get_sync(lease.sync_id) if record is None else record
        # What the claim told about the delivered state (else it is read).
        self.told: Claim | None = None if record is None else claim
        self.sync = self.record.sync
        self.cohort_name = self.sync.cohort_id
        """The cohort's name once the run has found it (for the batches' context)."""
        self.counts = _Counts()
        self.notes: list[str] = []
        self.issues: list[MemberIssue] = []
        # The definition as the eligibility re-check left it (fallback to
        # hourly, back to real-time, paused): kept even if delivery then fails.
        self.rechecked = self.sync
        # Batches an earlier run recorded as in flight and never applied, and
        # the identifiers of members this run removes because of them.
        self.pending: list[PendingBatch] = []
        self.settled: dict[Operation, dict[IdentifierKind, dict[str, str | None]]] = {}
        """Identifiers this run's requests were answered for: None (accepted) or the
        reason, by operation, kind and value (strings, which the collector skips)."""
        self.ledger: list[LedgerEntry] = []
        self.recovered_ids: dict[str, Identifier] = {}
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
        self.unresolved_adds: list[str] = []
        self.progress = _Progress(listening=bool(env.listeners))

    # -- the run ---------------------------------------------------------------

    def run(self) -> Completing:
        env = self.env
        lease = self.lease.current
        cadence = self.sync.cadence
        next_slot = None
        if _schedule.uneven_grid(self.sync):
            # A catch-up is a run that starts once the slot after its own has come.
            next_slot = _schedule.next_slot_after(
                self.sync, self.record.anchor, self.record.offset, lease.slot
            )
        trigger = _schedule.effective_trigger(
            lease.trigger, cadence, lease.slot, self.started, next_slot=next_slot
        )
        # Whether to log per-batch lines is decided once per run.
        self.progress.debug = log.isEnabledFor(logging.DEBUG)
        if log.isEnabledFor(logging.INFO):
            self._log(
                logging.INFO,
                "started (%s, %s, destination %s)",
                trigger.value,
                cadence.value,
                self.sync.destination_id,
                trigger=trigger.value,
                cadence=cadence.value,
            )
        if self.progress.listening:
            emit(
                env.listeners,
                RunStarted(
                    sync_id=self.sync.id,
                    run_id=self.run_id,
                    trigger=trigger,
                    slot=lease.slot,
                    at=self.started,
                    destination_id=self.sync.destination_id,
                    cadence=cadence,
                ),
            )
        self._take_over()
        status = RunStatus.SUCCEEDED
        error: BaseException | None = None
        new_sync = self.sync
        try:
            cohort = env.cohort(self.sync.cohort_id)
            self.cohort_name = cohort.name
            destination = env.destination(self.sync.destination_id)
            caps = destination.capabilities
            if trigger is Trigger.TEARDOWN:
                status, new_sync = self._teardown(destination, caps)
            else:
                status, new_sync = self._deliver(cohort, destination, caps)
        except LeaseLostError:
            raise
        except CohortSyncError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - a bug in host code must not lose the run record
            self._log_failure(e, "failed unexpectedly")
            error = e
        if error is not None:
            status, new_sync = self._failed(error)
        self._keep_state()
        return self._complete(trigger, status, error, new_sync)

    def _log(
        self, level: int, message: str, *args: object, exc_info: bool = False, **more: object
    ) -> None:
        """
        Log a line about this run: its ids and slot lead the message and are
        record fields too (with *more*), built only if the level is enabled.
        """
        if not log.isEnabledFor(level):
            return
        lease = self.lease.current
        text = _ABOUT + message
        log.log(
            level,
            text,
            self.sync.id,
            self.run_id,
            lease.slot.isoformat(),
            *args,
            exc_info=exc_info,
            extra=_fields(self.sync.id, self.run_id, lease.slot, self.sync.destination_id, **more),
            stacklevel=2,
        )

    def _log_failure(self, error: BaseException, message: str, *args: object) -> None:
        """
        An exception from outside cohortsync, about this run: its class at
        ERROR, its text and traceback at DEBUG (they may quote member keys).
        """
        if not log.isEnabledFor(logging.ERROR):
            return
        lease = self.lease.current
        log_failure(
            log,
            _ABOUT + message,
            self.sync.id,
            self.run_id,
            lease.slot.isoformat(),
            *args,
            error=error,
            extra=_fields(self.sync.id, self.run_id, lease.slot, self.sync.destination_id),
        )

    def _take_over(self) -> None:
        """
        Fold what an interrupted attempt delivered into this run's record: a
        crashed worker applied batches of its slot (or of a slot whose run was
        never recorded) and the history must account for them.
        """
        if self.told is not None and not self.told.progress:
            return
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
            cache.put(self.sync.id, self.version, self.state.keys())

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
        self.state.apply(batch.removed, batch.added)

    def _failed(self, error: BaseException) -> tuple[RunStatus, Sync]:
        env = self.env
        teardown = self.lease.current.trigger is Trigger.TEARDOWN
        heals = _heals_by_itself(error)
        authentication = isinstance(error, AuthenticationError)
        # The history is read only when a repeated failure could pause the sync.
        earlier: Sequence[SyncRun] = ()
        if not heals and not authentication and env.pause_after_failures and not teardown:
            earlier = env.storage.history(self.sync.id, limit=env.pause_after_failures)
        plan = plan_failure(
            self.rechecked,
            error_type=type(error).__name__,
            message=_message(error),
            heals=heals,
            authentication=authentication,
            delivered_any=bool(self.counts.added or self.counts.removed),
            teardown=teardown,
            earlier=earlier,
            pause_after=env.pause_after_failures,
            at=env.clock.now(),
        )
        self.notes.extend(plan.notes)
        self._emit(plan.events)
        return plan.status, plan.sync

    def _emit(self, events: Iterable[Event]) -> None:
        for event in events:
            emit(self.env.listeners, event)

    def _deliver(
        self, cohort: Cohort, destination: AnyDestination, caps: Capabilities
    ) -> tuple[RunStatus, Sync]:
        env = self.env
        record = self.record
        sync = self.sync
        told = self.told
        delivered_count = env.storage.count_delivered(sync.id) if told is None else told.delivered
        self.delivered_at_start = delivered_count
        if told is None or told.pending:
            self.pending = env.storage.pending_batches(sync.id)
        source = cohort.source
        if source is None:
            raise SourceError(cohort.id, "the cohort has no membership source registered")
        plan = plan_read(
            ReadFacts(
                sync=sync,
                slot=self.lease.current.slot,
                last_slot=record.last_slot,
                now=self.started,
                full_resync=record.full_resync,
                last_full_sync_at=record.last_full_sync_at,
                capabilities=caps,
                delivered=delivered_count,
                pending=bool(self.pending),
                resumed=self.resumed,
                has_feed=has_change_feed(source),
                feed_cursor=record.feed_cursor,
            )
        )
        self.full = plan.full
        if plan.reason is not None:
            self.notes.append(plan.reason)
        self._key_basis(own=plan.own_keys)
        self.version = env.storage.delivered_version(sync.id) if told is None else told.version
        diff, feed_cursor = self._read(cohort, plan, delivered_count)
        self.diff = diff
        if self.pending:
            self._recover(diff)
        self._skip_invalid(cohort, diff, from_feed=plan.from_feed)

        # Eligibility is re-checked at every run, with the size just measured.
        size = (
            diff.size
            if diff.size is not None
            else delivered_count + len(diff.adds) - len(diff.removes)
        )
        read_at = env.clock.now()  # the re-check and the guard decide as of now
        recheck = plan_recheck(
            sync,
            cohort,
            caps,
            identifier_kinds=env.mapping(sync.mapping_id).kinds,
            rules=env.rules,
            at=read_at,
            size=size,
        )
        self.notes.extend(recheck.notes)
        self._emit(recheck.events)
        new_sync = self.rechecked = recheck.sync
        if not recheck.proceed:
            diff.close()
            return RunStatus.SKIPPED, new_sync

        guard = self._guard(diff, caps, read_at)
        if guard.release_used:
            new_sync = attrs.evolve(new_sync, guard_released=False)
        if not plan.from_feed:
            self._resolve_ledger(diff)
        removes: Keys = () if guard.guarded else diff.removes
        try:
            self._send(destination, caps, diff, removes, send_removals=guard.send_removals)
        finally:
            diff.close()
        if self.issues:
            self._flush_issues()
        # A guarded run keeps the cursor before the held removals: the feed
        # reports them again (and the guard with them) until the host confirms.
        self.feed_cursor = None if guard.guarded else feed_cursor
        if self.counts.collisions:
            self.notes.append(f"shared_identifiers: {self.counts.collisions}")
        status = run_status(
            guarded=guard.guarded,
            rejected=self.counts.rejected,
            skipped=self.counts.skipped,
            failed=False,
            delivered_any=True,
        )
        self.full_done = self.full or caps.full_sync_only or delivered_count == 0
        return status, new_sync

    def _guard(self, diff: Diff, caps: Capabilities, at: datetime) -> GuardPlan:
        guard = plan_guard(
            self.sync,
            caps,
            delivered=diff.delivered,
            removing=len(diff.removes),
            source_empty=diff.source_empty,
            run_id=self.run_id,
            at=at,
        )
        self.guarded = guard.guarded
        if guard.note is not None:
            self.notes.append(guard.note)
        if guard.event is not None:
            self._emit((guard.event,))
        return guard

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
        self._log(
            logging.WARNING,
            "the source of cohort %s yielded %d invalid member key(s), skipped (first reason: %s)",
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
        """Fold what earlier runs left in flight into the diff (see :func:`plan_recovery`)."""
        unknown = in_flight_members(self.pending)
        held = self.env.storage.filter_delivered(self.sync.id, unknown)
        # The identifiers in-flight members being added again get now: the
        # mapping may have changed since they were sent (see plan_recovery).
        again = [k for k in unknown if k not in held and has_key(diff.adds, k)]
        members, unresolved = self._mapping().resolve_many(again, self._accepted())
        current: dict[str, Identifier | None] = dict.fromkeys(unresolved)
        current.update((m.key, m.identifier) for m in members)
        recovery = plan_recovery(
            unknown,
            held,
            adds=diff.adds,
            removes=diff.removes,
            existing=diff.existing or (),
            current=current,
        )
        self.recovered_ids = recovery.removes
        if recovery.adds:
            self.readd = self.env.storage.delivered_identifiers(self.sync.id, recovery.adds)
        if recovery.note is not None:
            self.notes.append(recovery.note)
        diff.adds = with_keys(diff.adds, recovery.adds)
        diff.removes = with_keys(diff.removes, recovery.removes)

    def _key_basis(self, *, own: bool) -> None:
        """
        The basis of this run's idempotency keys: its slot, so a first
        attempt's keys are stable; but a run that resumes a slot an earlier
        attempt sent requests for gets keys of its own (*own*). Within one
        slot a member can be added, removed by a takeover and added again by
        the next one: the same slot-derived key for the second add would make
        a de-duplicating receiver drop it. A request re-sent unchanged keeps
        its key through the pending record instead (see :meth:`_batch`).
        """
        if own:
            self.basis = f"{self.lease.current.slot.isoformat()}/{self.run_id}"

    def _batch(self, context: RunContext, operation: Operation, members: list[Member]) -> Batch:
        """
        Build the next batch. A batch identical to one still pending (sent by
        an earlier run, outcome unknown) keeps that batch's idempotency key:
        it is the same request, re-sent (see :func:`_plan.reusable_keys`).
        """
        if self.basis is None:
            self.basis = self.lease.current.slot.isoformat()
        batch = make_batch(context, operation, members, self._next_sequence(), self.basis)
        if self.pending:
            if self.reusable is None:
                self.reusable = reusable_keys(self.pending)
            earlier = self.reusable.get(content_key(operation, batch.identifiers))
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
        if self.progress.listening:
            # A split batch's first half inherits its parent's start: its
            # latency includes the attempt that failed for bad data.
            started = self.progress.started
            at = None if replaces is None else started.pop(replaces, None)
            started[batch.idempotency_key] = at or self.env.clock.now()
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
        self, cohort: Cohort, plan: ReadPlan, delivered_count: int
    ) -> tuple[Diff, str | None]:
        """
        Read the source and diff it against the delivered state, the way
        *plan* says: from the change feed, or from the full snapshot (with
        the in-memory state when the environment keeps one).

        Returns:
            The diff, and the feed cursor it brings the sync to (or ``None``).
        """
        env = self.env
        sync = self.sync
        source = cohort.source
        assert source is not None  # noqa: S101 - checked by the caller
        # One read of the ledger serves both the dead letters (never re-added)
        # and the pending rejections _resolve_ledger settles.
        if self.told is None or self.told.ledger:
            self.ledger = env.storage.ledger(sync.id)
        dead = {e.key for e in self.ledger if e.dead}
        if plan.from_feed and has_change_feed(source):
            if env.cache is not None:
                # Keep an in-memory state current through feed runs too, so the
                # hourly reconciliation does not have to read the store.
                known = env.cache.take(sync.id, self.version)
                self.state = None if known is None else DeliveredState(known)
            cursor = self.record.feed_cursor
            assert cursor is not None  # noqa: S101 - the plan reads the feed only with one
            diff = diff_changes(
                source,
                cohort.id,
                cursor,
                lambda keys: env.storage.filter_delivered(sync.id, keys),
                delivered_count,
                exclude=dead,
            )
            return diff, diff.feed_cursor
        feed_cursor: str | None = None
        feed: object = source
        if plan.take_cursor and has_change_feed(feed):
            # Take the cursor before reading, so changes made during the
            # read are seen again (idempotently) by the next run.
            feed_cursor = feed.cursor()
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
                keep_existing=plan.keep_existing,
                exclude=dead,
            )
            return diff, feed_cursor
        known = cache.take(sync.id, self.version)
        if known is not None and len(known) != delivered_count:
            known = None  # cannot happen with a conforming store; never trust it then
        if known is None and delivered_count == 0:
            known = set()
        diff, state = diff_with_state(
            source,
            cohort.id,
            known,
            lambda: env.storage.iter_delivered(sync.id),
            delivered_count,
            keep_existing=plan.keep_existing,
            exclude=dead,
        )
        self.state = DeliveredState(state)
        return diff, feed_cursor

    # -- sending ---------------------------------------------------------------

    def _context(self) -> RunContext:
        return RunContext(
            run_id=self.run_id,
            sync_id=self.sync.id,
            generation=self.sync.generation,
            cohort_id=self.sync.cohort_id,
            cohort_name=self.cohort_name,
            computed_at=self.started,
            full_sync=self.full,
            slot=self.lease.current.slot,
        )

    def _portal(self, destination: AnyDestination) -> Portal | None:
        """
        The portal a run's destination calls go through: the loop of an
        asynchronous destination, else the scope of an asynchronous scheduler.
        """
        env = self.env
        if isinstance(destination, AsyncDestination) and env.portal is not None:
            return env.portal()
        return env.scope

    def _sender(self, destination: AnyDestination, caps: Capabilities) -> BatchSender:
        if self.sender is None:
            # The sender reaches the run through a weak reference: a run that
            # held its sender holding the run would be a reference cycle, and
            # everything a finished run holds (its diff: a first sync's every
            # key) would wait for the host's next full garbage collection.
            begin = weakref.WeakMethod(self._begin)
            self.sender = BatchSender(
                destination=destination,
                retry=self.sync.policy.retry,
                clock=self.env.clock,
                limiter=self.env.limiter(self.sync.destination_id, caps),
                keep_alive=self.lease.keep_alive,
                renewal_due=self.lease.renewal_due,
                before_send=lambda batch, replaces: _call(begin, batch, replaces),
                rng=self.env.rng,
                destination_id=self.sync.destination_id,
                portal=self._portal(destination),
            )
        return self.sender

    def _send(
        self,
        destination: AnyDestination,
        caps: Capabilities,
        diff: Diff,
        removes: Keys,
        *,
        send_removals: bool,
    ) -> None:
        context = self._context()
        if self.progress.listening or self.progress.debug:
            self._plan(caps, diff, removes if send_removals else ())
        succeeded = False
        if isinstance(destination, AsyncDestination):
            self._hook(destination, destination.open(context))
        else:
            destination.open(context)
        if not removes and not diff.adds and not diff.existing:
            # Nothing to send (the usual real-time minute): the destination
            # is still opened and closed, as every run does.
            self._close(destination, context, succeeded=True)
            return
        sender = self._sender(destination, caps)
        size = caps.max_batch_size
        self.mapping = self.env.mapping(self.sync.mapping_id)
        self.unshared = self._unshared(removes if send_removals else (), diff)
        try:
            if removes and not send_removals:
                # The destination cannot remove (or the policy says not to):
                # forget the members so a later re-entry is sent again.
                self._apply_local_removals(removes)
            elif removes:
                batches = self._unshared_removes if self.unshared else self._remove_batches
                sender.send_all(batches(context, removes, size), caps.max_parallel, self._on_acked)
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
            self._close(destination, context, succeeded=succeeded)

    def _plan(self, caps: Capabilities, diff: Diff, removes: Keys) -> None:
        """
        Announce what this run is about to send (:class:`RunPlanned`, a DEBUG
        line): the totals progress is measured against.
        """
        size = caps.max_batch_size
        adds = len(diff.adds)
        removing = len(removes)
        resends = len(diff.existing) if diff.existing else 0
        progress = self.progress
        # Each operation goes in batches of its own: ceilings of each.
        progress.planned_batches = -(-removing // size) - (-adds // size) - (-resends // size)
        progress.planned_members = adds + removing + resends
        if progress.debug:
            self._log(
                logging.DEBUG,
                "planned +%d -%d resend=%d in %d batch(es) of up to %d",
                adds,
                removing,
                resends,
                progress.planned_batches,
                size,
                adds=adds,
                removes=removing,
                resends=resends,
                batches=progress.planned_batches,
            )
        if progress.listening:
            emit(
                self.env.listeners,
                RunPlanned(
                    sync_id=self.sync.id,
                    run_id=self.run_id,
                    destination_id=self.sync.destination_id,
                    slot=self.lease.current.slot,
                    adds=adds,
                    removes=removing,
                    resends=resends,
                    batches=progress.planned_batches,
                    batch_size=size,
                    full_sync=self.full,
                    at=self.env.clock.now(),
                ),
            )

    def _hook(
        self, destination: AsyncDestination, call: Coroutine[Any, Any, None], *, grace: float = 0.0
    ) -> None:
        """
        Run an asynchronous destination's ``open`` or ``close`` on its loop,
        unless it is :class:`~cohortsync.AsyncDestination`'s own no-op: a
        round trip to the loop and back for nothing would cost every run two
        waits behind whatever the loop is busy with (the requests of the
        other runs).
        """
        if getattr(call, "cr_code", None) in _NO_OP_HOOKS:
            call.close()
            return
        portal = self._portal(destination)
        if portal is None:  # pragma: no cover - the scheduler always gives one
            call.close()
            raise RuntimeError("an asynchronous destination needs an event loop portal")
        portal.call(call, grace=grace)

    def _close(self, destination: AnyDestination, context: RunContext, *, succeeded: bool) -> None:
        try:
            if isinstance(destination, AsyncDestination):
                self._hook(
                    destination,
                    destination.close(context, succeeded=succeeded),
                    grace=CLOSE_GRACE,
                )
            else:
                destination.close(context, succeeded=succeeded)
        except Exception as e:
            self._log_failure(e, "close() of destination %s failed", self.sync.destination_id)
            if succeeded:
                raise

    def _next_sequence(self) -> int:
        self.counts.sequence += 1
        return self.counts.sequence

    # -- members sharing an identifier -----------------------------------------

    def _is_leaving(self, key: str) -> bool:
        diff = self.diff
        return diff is not None and (key in self.recovered_ids or has_key(diff.removes, key))

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
            return identifier.kind is kind and has_key(diff.adds, identifier.value)
        return identifier in self._added_identifiers()

    def _unshared(self, removes: Keys, diff: Diff) -> bool:
        """
        Whether every member this run would send holds an identifier that no
        other member of the sync holds: under the identity mapping, each
        leaver holds its own key (and nobody else does) and no other member
        holds a joiner's key. That is the usual steady run, and then none of
        the shared-identifier bookkeeping (riders, handovers, answers settled
        for later batches) can find anything: its batches are sent and
        settled member by member, as a first sync's are. A store with
        ``has_mapped_identifiers`` answers in one probe; otherwise its
        identifier index is asked, a chunk at a time. Anything else (another
        mapping, a full send, batches an earlier attempt left in flight) takes
        the general path.
        """
        kind = self._kinds()[1]
        if kind is None or diff.existing or self.pending or self.recovered_ids:
            return False
        if self.delivered_at_start == 0 and not removes:
            return False  # a first sync: distinct without asking (see _add_batches)
        storage = self.env.storage
        sync_id = self.sync.id
        mapped = getattr(storage, "has_mapped_identifiers", None)
        if kind is IdentifierKind.USER_ID and mapped is not None and not mapped(sync_id):
            # Every delivered member holds USER_ID(its key): a leaver holds its
            # own, nobody else does, and no joiner's is held (joiners are not
            # delivered). One indexed probe instead of a question per member.
            return True
        for chunk in chunks(removes, ISSUE_CHUNK):
            ids = identity_identifiers(kind, chunk)
            holders = storage.identifier_holders(sync_id, ids)
            if len(holders) != len(ids) or any(holders.get(i) != [i.value] for i in ids):
                return False
        for chunk in chunks(diff.adds, ISSUE_CHUNK):
            ids = identity_identifiers(kind, chunk)
            holders = storage.identifier_holders(sync_id, ids)
            if any(k != i.value for i, keys in holders.items() for k in keys):
                return False
        return True

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

    def _in_flight_identifiers(self) -> frozenset[Identifier]:
        """Identifiers named in the pending records of earlier attempts (state unknown)."""
        if self.uncertain is None:
            self.uncertain = frozenset(m.identifier for p in self.pending for m in p.members)
        return self.uncertain

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
        by_kind = self.settled.get(operation, {})
        for m in members:
            answers = by_kind.get(m.identifier.kind)
            if answers is None or m.identifier.value not in answers:
                rest.append(m)
            elif (reason := answers[m.identifier.value]) is None:
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

    def _unshared_removes(self, context: RunContext, keys: Keys, size: int) -> Iterator[Batch]:
        """
        The removal batches of an unshared run: each leaver holds its own key
        as its identifier and nobody else holds it (``_unshared`` asked the
        store), so they are sent as they are.
        """
        kind = self._kinds()[1]
        assert kind is not None  # noqa: S101 - _unshared needs the identity mapping
        for chunk in chunks(keys, size):
            yield self._batch(context, Operation.REMOVE, identity_members(kind, chunk))

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
        A delivered member added again by a recovery (see ``readd``) keeps
        the identifier the delivered state holds for it.
        """
        readd = self.readd
        if readd and any(k in readd for k in chunk):
            again = [Member(k, readd[k]) for k in chunk if k in readd]
            rest = self._resolve([k for k in chunk if k not in readd], caps, known)
            return sorted(again + rest, key=_member_key)
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
        self.distinct = identity and not existing and (not lookups or self.unshared)
        known = None if existing else self.resolved_adds
        batches = (
            chunks(keys, caps.max_batch_size)
            if existing or not self.pending
            else self._pending_first(keys, caps.max_batch_size)
        )
        for chunk in batches:
            members = self._resolve(chunk, caps, known)
            if not members:
                continue
            if self.distinct:
                yield self._batch(context, operation, members)
                continue
            if existing:
                if not identity:
                    yield from self._retire_changed(context, members, caps)
                # An identifier this run's adds were already answered for (a
                # joiner sharing it, an in-flight one re-sent) is settled like
                # it: sending it again would re-send that request.
                members = self._answered_already(operation, members)
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
                groups = group_adds(members, _held_in(holders, self._in_flight_identifiers()))
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

    def _pending_first(self, keys: Keys, size: int) -> Iterator[list[str]]:
        """
        The adds in batches, those of each add left in flight by an earlier
        attempt first and whole: the same members make the same request,
        re-sent under the same idempotency key, whatever else is owed now (a
        member rejected earlier, sorting before them, would otherwise shift
        every batch boundary, and a de-duplicating receiver would apply the
        in-flight members a second time under new keys).
        """
        taken: set[str] = set()
        for pending in self.pending:
            if pending.operation is not Operation.ADD:
                continue
            members = [m.key for m in pending.members]
            if not members or len(members) > size:
                continue
            if any(k in taken or not has_key(keys, k) for k in members):
                continue  # part of it is not owed any more: batched as usual
            taken.update(members)
            yield members
        yield from chunks((k for k in keys if k not in taken) if taken else keys, size)

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
        rejected_ids: dict[str, str] = {}
        unknown = 0
        by_identifier = (
            {m.identifier.value: m for m in batch.members} if acked.result.rejected else {}
        )
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
            self._log(
                logging.WARNING,
                "destination %s rejected %d identifier(s) it was not sent in batch %s; ignored",
                self.sync.destination_id,
                unknown,
                batch.sequence,
                batch=batch.sequence,
            )
        operation = batch.operation
        is_remove = operation is Operation.REMOVE
        accepted, rejected, accepted_ids, riders = self._answers(batch, rejected_ids)
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
        progress = self.progress
        if progress.listening or progress.debug:
            self._progressed(batch, len(rejected_ids))

    def _progressed(self, batch: Batch, rejected: int) -> None:
        """Count an answered batch against the plan; log it and emit :class:`BatchDelivered`."""
        size = len(batch.members)
        operation = batch.operation
        progress = self.progress
        progress.batches_done += 1
        progress.members_done += size
        # Halves of a batch split for bad data each count: never past 100 %.
        progress.planned_batches = max(progress.planned_batches, progress.batches_done)
        progress.planned_members = max(progress.planned_members, progress.members_done)
        if progress.debug:
            self._log(
                logging.DEBUG,
                "batch %d %s: %d sent, %d rejected; %d/%d batches, %d/%d members",
                batch.sequence,
                operation.value,
                size,
                rejected,
                progress.batches_done,
                progress.planned_batches,
                progress.members_done,
                progress.planned_members,
                batch=batch.sequence,
                operation=operation.value,
                size=size,
                rejected=rejected,
            )
        if progress.listening:
            emit(
                self.env.listeners,
                BatchDelivered(
                    sync_id=self.sync.id,
                    run_id=self.run_id,
                    operation=operation,
                    sequence=batch.sequence,
                    size=size,
                    rejected=rejected,
                    idempotency_key=batch.idempotency_key,
                    destination_id=self.sync.destination_id,
                    started_at=progress.started.pop(batch.idempotency_key, None),
                    at=self.env.clock.now(),
                    batches_done=progress.batches_done,
                    batches_total=progress.planned_batches,
                    members_done=progress.members_done,
                    members_total=progress.planned_members,
                ),
            )

    def _answers(
        self, batch: Batch, rejected_ids: dict[str, str]
    ) -> tuple[list[Member], list[tuple[str, str]], int, int]:
        """
        The members an answered *batch* settles, with the keys riding with
        each identifier: ``(accepted members, (key, reason) rejected,
        identifiers accepted, riders)``.
        """
        operation = batch.operation
        distinct = self.unshared or (self.distinct and operation is not Operation.REMOVE)
        if distinct and not rejected_ids:
            # A first sync's batch, all accepted: every member holds its own
            # identifier, nothing rides with it, nothing to settle.
            return list(batch.members), [], len(batch.members), 0
        accepted: list[Member] = []
        rejected: list[tuple[str, str]] = []
        riders = 0
        accepted_ids = 0
        settled = {} if distinct else self.settled.setdefault(operation, {})
        for m in batch.members:
            if distinct:
                keys = [m.key]
            else:
                keys = [m.key, *self.riders.pop((operation, m.identifier), ())]
                self.in_flight.discard((operation, m.identifier))
                riders += len(keys) - 1
            reason = rejected_ids.get(m.identifier.value)
            if not distinct:
                settled.setdefault(m.identifier.kind, {})[m.identifier.value] = reason
            if reason is None:
                accepted_ids += 1
                if len(keys) == 1:
                    accepted.append(m)
                else:
                    accepted.extend(Member(k, m.identifier) for k in keys)
            else:
                rejected.extend((k, reason) for k in keys)
        return accepted, rejected, accepted_ids, riders

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
        owed = (diff.adds, diff.removes, diff.existing or ())
        stale = [k for k in pending if not any(has_key(keys, k) for keys in owed)]
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

    def _teardown(self, destination: AnyDestination, caps: Capabilities) -> tuple[RunStatus, Sync]:
        """
        Remove everything this sync may have delivered
        (``OnDelete.REMOVE_DELIVERED``): its delivered state plus the members
        of every add still pending (sent by a run that crashed or was cut
        short, so the destination may hold them).
        """
        storage = self.env.storage
        self.version = storage.delivered_version(self.sync.id)
        self.pending = storage.pending_batches(self.sync.id)
        self._key_basis(own=bool(self.pending) or self.resumed)
        keys = list(storage.iter_delivered(self.sync.id))
        # A pending removal may not have arrived either: every member named
        # in a pending record is removed, delivered or not.
        unknown = in_flight_members(self.pending)
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
        self._send(destination, caps, diff, diff.removes, send_removals=True)
        return teardown_status(self.sync, rejected=self.counts.rejected, at=self.env.clock.now())

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
    ) -> Completing:
        env = self.env
        lease = self.lease.current
        if error is None and self.teardown_error is not None:
            error = self.teardown_error
        if self.issues:
            try:
                self._flush_issues()
            except CohortSyncError as e:
                self._log_failure(e, "could not record its member issues")
        counts = self.counts
        plan = plan_completion(
            Outcome(
                run_id=self.run_id,
                sync=self.sync,
                new_sync=new_sync,
                offset=self.record.offset,
                attempts=self.record.attempts,
                slot=lease.slot,
                generation=lease.generation,
                trigger=trigger,
                started=self.started,
                finished=env.clock.now(),
                status=status,
                error_type=None if error is None else type(error).__name__,
                error_message=None if error is None else _message(error),
                tally=counts.tally(),
                skipped=counts.skipped,
                retries=self.sender.retries if self.sender else 0,
                full=self.full,
                notes=tuple(self.notes),
                feed_cursor=self.feed_cursor,
                full_done=self.full_done,
                guarded=self.guarded,
                pending=tuple(p.idempotency_key for p in self.pending) if self.pending else (),
                jitter=env.rng.random(),
            )
        )
        self._emit(plan.events)
        return Completing(lease, plan.completion, self.sync.destination_id)


_NO_OP_HOOKS = frozenset((AsyncDestination.open.__code__, AsyncDestination.close.__code__))
"""The code of the base class's optional hooks, which do nothing: an
adapter that does not override them is not called on its loop for them."""


def _call(
    method: weakref.WeakMethod[Callable[..., None]],
    batch: Batch,
    replaces: str | None,
) -> None:
    """Call a run's method through a weak reference (the run is running)."""
    bound = method()
    assert bound is not None  # noqa: S101 - the run outlives its sends
    bound(batch, replaces)


def _member_key(member: Member) -> str:
    return member.key


def _already_sent(sent: set[Identifier], *, identity: bool) -> Callable[[Member], bool]:
    """
    Whether a full resend already sent a member's identifier in this run
    (distinct keys never share one under the identity mapping).
    """

    def held(member: Member) -> bool:
        return not identity and member.identifier in sent

    return held


def _held_in(
    holders: dict[Identifier, list[str]], in_flight: frozenset[Identifier]
) -> Callable[[Member], bool]:
    """
    Whether the destination holds a member's identifier for ANOTHER member
    (a member re-added after a lost acknowledgement holds it itself, as far
    as the store knows, and must be sent). A leaver whose identifier must
    stay is still delivered, or was dropped because another holder stays,
    so the store's holders say so. An identifier an earlier run left in
    flight (*in_flight*) is not known to be held: a removal of it may have
    arrived without its answer, so the add is sent (adding an identifier the
    destination holds changes nothing there).
    """

    def held(member: Member) -> bool:
        if member.identifier in in_flight:
            return False
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
