"""
The run planner: everything a run decides, as pure functions over plain values.

A run goes through these decisions in order, and the executor
(:mod:`cohortsync._run`) does the I/O between them:

1. :func:`plan_read`: full or incremental (a full-resync request, a TTL
   refresh), from the change feed or the snapshot, which idempotency keys.
2. :func:`plan_recovery`: what batches an interrupted run left in flight
   mean for this run's diff.
3. :func:`plan_recheck`: eligibility at the measured size; fall back to
   hourly, come back, or pause.
4. :func:`plan_guard`: whether the removals wait for the host (the
   mass-removal guard).
5. What to send: :func:`group_removes` and :func:`group_adds` for members
   sharing one destination identifier, :func:`reusable_keys` for requests
   re-sent unchanged.
6. From the outcome: :func:`plan_failure` (status, and whether a failure
   that keeps repeating pauses the sync) and :func:`plan_completion` (the
   run record, the next due instant and trigger, the counters and notes the
   store writes in one transaction).

Nothing here reads a clock, a store or a destination, and nothing mutates its
arguments; time math lives with the schedule math (:mod:`cohortsync._schedule`).
:meth:`cohortsync.Scheduler.preview` asks the same functions as a run, so
what it shows is what a run would do. Tested on its own with Hypothesis
(tests/test_plan.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta

import attrs

from cohortsync import _schedule
from cohortsync import _validators as v
from cohortsync._clock import add_saturating
from cohortsync._cohort import Cohort
from cohortsync._delivery import idempotency_key
from cohortsync._destination import Capabilities, Identifier, IdentifierKind, Member, Operation
from cohortsync._diff import Keys, has_key
from cohortsync._events import EligibilityChanged, Event, GuardTripped, SyncFailed
from cohortsync._policy import Cadence, OnIneligible
from cohortsync._sync import RunStatus, Sync, SyncRun, SyncStatus, Trigger
from cohortsync.eligibility import Eligibility, Ruleset, _check_measured
from cohortsync.exceptions import ConfigurationError
from cohortsync.storage._protocol import Completion, PendingBatch, Tally

__all__ = [
    "TTL_REFRESH_SHARE",
    "CompletionPlan",
    "FailurePlan",
    "GuardPlan",
    "IdentifierGroups",
    "Outcome",
    "ReadFacts",
    "ReadPlan",
    "Recheck",
    "Recovery",
    "content_key",
    "group_adds",
    "group_removes",
    "in_flight_members",
    "plan_completion",
    "plan_failure",
    "plan_guard",
    "plan_isolation",
    "plan_read",
    "plan_recheck",
    "plan_recovery",
    "repeated_failure",
    "reusable_keys",
    "run_status",
    "teardown_status",
]

TTL_REFRESH_SHARE = 0.8
"""A full resend refreshes memberships once this share of their TTL has passed."""


# -- 1. what to read -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ReadFacts:
    """
    What the executor knows before it reads the source.

    Attributes:
        sync: The definition as loaded.
        slot: The slot the run was claimed for.
        last_slot: The slot of the sync's previous recorded run.
        now: When the run started.
        full_resync: The host asked for a full resync.
        last_full_sync_at: When a run last delivered the whole audience.
        capabilities: The destination's.
        delivered: How many members the delivered state holds.
        pending: Batches an earlier run left in flight exist.
        resumed: An earlier attempt of this slot applied batches.
        has_feed: The source offers a change feed.
        feed_cursor: The stored change-feed cursor.
    """

    sync: Sync
    slot: datetime
    last_slot: datetime | None
    now: datetime
    full_resync: bool
    last_full_sync_at: datetime | None
    capabilities: Capabilities
    delivered: int
    pending: bool
    resumed: bool
    has_feed: bool
    feed_cursor: str | None


@attrs.frozen(kw_only=True)
class ReadPlan:
    """
    How a run reads its diff.

    Attributes:
        full: Send the whole audience (staying members too).
        reason: Why it is full: ``"full_resync"`` or ``"ttl_refresh"`` (a note).
        from_feed: Diff the change feed since the stored cursor instead of
            the snapshot.
        take_cursor: Take a feed cursor before reading the snapshot (a
            real-time sync with a feed), so the next run reads from there.
        keep_existing: Keep the staying members in the diff (a full send, or
            a full-sync-only destination).
        own_keys: Idempotency keys of the run's own instead of its slot's
            (it resumes a slot an earlier attempt sent requests for).
    """

    full: bool
    reason: str | None
    from_feed: bool
    take_cursor: bool
    keep_existing: bool
    own_keys: bool


def plan_read(facts: ReadFacts) -> ReadPlan:
    """
    Decide how a run reads its diff.

    A TTL refresh is due once :data:`TTL_REFRESH_SHARE` of the destination's
    membership TTL has passed since the last full send (with something
    delivered to refresh). A real-time sync with a change feed reads the feed,
    except in the first run of each hour (whatever minute it runs at: a
    coalesced minute must not postpone it by an hour), after the host released
    the guard, with batches left in flight, or on a full send: then it diffs
    the full snapshot, which reconciles anything a feed missed and retries
    members rejected earlier.
    """
    caps = facts.capabilities
    sync = facts.sync
    ttl = caps.membership_ttl
    ttl_due = ttl is not None and (
        facts.last_full_sync_at is None
        or facts.now - facts.last_full_sync_at >= ttl * TTL_REFRESH_SHARE
    )
    full = facts.full_resync or (ttl_due and facts.delivered > 0)
    reason = None
    if full:
        reason = "full_resync" if facts.full_resync else "ttl_refresh"
    last = facts.last_slot
    reconcile = (
        last is None
        or _schedule.hour_of(facts.slot) != _schedule.hour_of(last)
        or sync.guard_released
        or facts.pending
    )
    from_feed = (
        sync.cadence is Cadence.REALTIME
        and not reconcile
        and facts.has_feed
        and facts.feed_cursor is not None
        and not full
        and not caps.full_sync_only
    )
    return ReadPlan(
        full=full,
        reason=reason,
        from_feed=from_feed,
        take_cursor=(not from_feed and sync.policy.cadence is Cadence.REALTIME and facts.has_feed),
        keep_existing=not from_feed and (caps.full_sync_only or full),
        own_keys=facts.pending or facts.resumed,
    )


# -- 2. what was left in flight ------------------------------------------------------


def in_flight_members(pending: Sequence[PendingBatch]) -> dict[str, Member]:
    """
    Every member named in a pending batch record, with the identifier its
    newest record sent it with.
    """
    unknown: dict[str, Member] = {}
    for batch in pending:
        for m in batch.members:
            unknown[m.key] = m
    return unknown


@attrs.frozen
class Recovery:
    """
    What batches left in flight add to a run's diff.

    Attributes:
        adds: Delivered members who stay, added again.
        removes: Members not delivered and not being added now, removed
            with the identifier they were sent with; and members being
            added now under another identifier than the one they were sent
            with (the mapping changed in between), whose old identifier is
            removed before the new one is added.
        note: The history note, or ``None`` when there is nothing to recover.
    """

    adds: tuple[str, ...]
    removes: dict[str, Identifier]
    note: str | None


def plan_recovery(
    in_flight: Mapping[str, Member],
    held: Iterable[str],
    *,
    adds: Keys,
    removes: Keys,
    existing: Keys,
    current: Mapping[str, Identifier | None] | None = None,
) -> Recovery:
    """
    Reconcile batches an earlier run sent (or may have sent) without applying
    them: the destination may or may not hold those changes.

    Whatever the operation of the newest record naming a member, the
    destination's state of that member is unknown (an add may have arrived,
    a removal may have arrived, or neither), so each is sent again towards
    what the cohort says now: a member who is not delivered (*held* names the
    delivered ones) and not being added now is removed; a delivered member
    who stays is added again. The ordinary diff covers everyone else.

    A member the diff adds now was sent with the identifier its mapping gave
    then; if the mapping gives another now (*current*: the identifiers of
    the in-flight members being added, ``None`` for one that resolves to
    nothing), the identifier it was sent with may be at the destination and
    nothing else would ever remove it, so it is removed too, before the add.
    """
    delivered = set(held)
    extra = tuple(
        k
        for k in in_flight
        if k in delivered
        and not has_key(removes, k)
        and not has_key(existing, k)
        and not has_key(adds, k)
    )
    now = current or {}
    recovered = {
        key: member.identifier
        for key, member in in_flight.items()
        if key not in delivered
        and (not has_key(adds, key) or (key in now and now[key] != member.identifier))
    }
    note = None
    if extra or recovered:
        note = f"recovered_in_flight: +{len(extra)} -{len(recovered)}"
    return Recovery(adds=extra, removes=recovered, note=note)


def content_key(operation: Operation, identifiers: Sequence[str]) -> str:
    """What a request is, independent of which run sends it."""
    return idempotency_key("", 0, operation, identifiers)


def reusable_keys(pending: Sequence[PendingBatch]) -> dict[str, str]:
    """
    The idempotency keys a run may reuse, by request content: a batch
    identical to one still pending is the same request re-sent and keeps its
    key. Only the newest record naming its members qualifies: once a later
    request touched them (a removal after an add), re-sending the old one
    under its key would be dropped by a de-duplicating receiver as a repeat.
    """
    newest: dict[str, str] = {}
    for p in pending:
        for m in p.members:
            newest[m.key] = p.idempotency_key
    return {
        content_key(p.operation, [m.identifier.value for m in p.members]): p.idempotency_key
        for p in pending
        if all(newest[m.key] == p.idempotency_key for m in p.members)
    }


# -- 3. eligibility at the measured size ---------------------------------------------


@attrs.frozen
class Recheck:
    """
    The eligibility re-check of a run.

    Attributes:
        sync: The definition after it (fallen back, back to real-time,
            paused, or unchanged).
        proceed: Whether the run delivers.
        notes: For the run's history.
        events: For the listeners, in order.
        eligibility: The check for the policy's own cadence.
    """

    sync: Sync
    proceed: bool
    notes: tuple[str, ...]
    events: tuple[Event, ...]
    eligibility: Eligibility


def plan_recheck(
    sync: Sync,
    cohort: Cohort,
    capabilities: Capabilities,
    *,
    identifier_kinds: frozenset[IdentifierKind] | None,
    rules: Ruleset,
    at: datetime,
    size: int | None = None,
) -> Recheck:
    """
    Re-check eligibility with the measured *size* (by default, the size
    *cohort* carries); fall back or pause a real-time sync that stopped being
    eligible, and come back when it is eligible again. It never silently
    stops syncing: every change is a note and an event.
    """
    policy = sync.policy
    measured = cohort.size if size is None else size

    def check(cadence: Cadence) -> Eligibility:
        return _check_measured(
            cohort,
            measured,
            capabilities,
            policy,
            identifier_kinds=identifier_kinds,
            rules=rules,
            cadence=cadence,
        )

    result = check(policy.cadence)
    warnings = tuple(w.code for w in result.warnings) if result.warnings else ()
    if result.eligible:
        if sync.effective_cadence is None:
            return Recheck(sync, proceed=True, notes=warnings, events=(), eligibility=result)
        back = EligibilityChanged(
            sync_id=sync.id, eligible=True, codes=(), cadence=policy.cadence, at=at
        )
        return Recheck(
            attrs.evolve(sync, effective_cadence=None, updated_at=at),
            proceed=True,
            notes=(*warnings, "eligible_again"),
            events=(back,),
            eligibility=result,
        )
    codes = tuple(r.code for r in result.blocking)
    notes = (*warnings, *codes)
    if (
        (policy.cadence is Cadence.REALTIME or policy.sub_hourly)
        and policy.on_ineligible is OnIneligible.FALLBACK_HOURLY
        and check(Cadence.HOURLY).eligible
    ):
        events: tuple[Event, ...] = ()
        if sync.effective_cadence is not Cadence.HOURLY:
            events = (
                EligibilityChanged(
                    sync_id=sync.id, eligible=False, codes=codes, cadence=Cadence.HOURLY, at=at
                ),
            )
        return Recheck(
            attrs.evolve(sync, effective_cadence=Cadence.HOURLY, updated_at=at),
            proceed=True,
            notes=(*notes, "fallback_hourly"),
            events=events,
            eligibility=result,
        )
    reason = "; ".join(r.message for r in result.blocking)
    return Recheck(
        attrs.evolve(
            sync, status=SyncStatus.PAUSED, status_reason=f"ineligible: {reason}", updated_at=at
        ),
        proceed=False,
        notes=notes,
        events=(
            EligibilityChanged(
                sync_id=sync.id, eligible=False, codes=codes, cadence=policy.cadence, at=at
            ),
            SyncFailed(sync_id=sync.id, status=SyncStatus.PAUSED, reason=reason, at=at),
        ),
        eligibility=result,
    )


# -- 4. the mass-removal guard ------------------------------------------------------------


@attrs.frozen
class GuardPlan:
    """
    What a run does with its removals.

    Attributes:
        send_removals: The policy and the destination allow removals (else
            leavers are only forgotten locally, so a re-entry is sent again).
        guarded: The removals wait for the host to confirm them.
        release_used: The host's confirmation was used up by this run.
        note: For the run's history, when the guard tripped.
        event: For the listeners, when the guard tripped.
    """

    send_removals: bool
    guarded: bool
    release_used: bool
    note: str | None = None
    event: GuardTripped | None = None


_UNGUARDED = {
    (send, used): GuardPlan(send_removals=send, guarded=False, release_used=used)
    for send in (False, True)
    for used in (False, True)
}
"""The plans of a guard that did not trip (frozen: shared by every run)."""


def plan_guard(
    sync: Sync,
    capabilities: Capabilities,
    *,
    delivered: int,
    removing: int,
    source_empty: bool,
    run_id: str,
    at: datetime,
) -> GuardPlan:
    """
    The mass-removal guard, decided before anything is sent: whether this
    run's removals must wait for the host to confirm them.
    """
    send = sync.policy.send_removals and capabilities.supports_removals
    trips = (
        send
        and not sync.guard_released
        and sync.policy.guard.trips(delivered, removing, source_empty)
    )
    release_used = sync.guard_released and not trips
    if not trips:
        return _UNGUARDED[bool(send), bool(release_used)]
    note = f"mass_removal_guard: would remove {removing} of {delivered}" + (
        " (source returned no members)" if source_empty else ""
    )
    event = GuardTripped(
        sync_id=sync.id,
        run_id=run_id,
        delivered=delivered,
        removing=removing,
        source_empty=source_empty,
        at=at,
    )
    return GuardPlan(send_removals=send, guarded=True, release_used=False, note=note, event=event)


# -- 6. from the outcome ------------------------------------------------------------------


def run_status(
    *,
    guarded: bool,
    rejected: int,
    skipped: int,
    failed: bool,
    delivered_any: bool,
) -> RunStatus:
    """
    A run's status from what happened: only a run that delivered everything
    it should, and skipped and lost nobody, is ``succeeded``.
    """
    if failed:
        return RunStatus.PARTIAL if delivered_any else RunStatus.FAILED
    if guarded:
        return RunStatus.GUARDED
    if rejected or skipped:
        return RunStatus.PARTIAL
    return RunStatus.SUCCEEDED


def repeated_failure(
    error_type: str, error_message: str, earlier: Sequence[SyncRun], times: int
) -> bool:
    """
    Whether a run failing with *error_type*/*error_message* is the *times*-th
    in a row to fail the same way (*earlier* is the history before it, newest
    first).
    """
    if times <= 1:
        return True
    previous = earlier[: times - 1]
    return len(previous) == times - 1 and all(
        r.status in (RunStatus.FAILED, RunStatus.PARTIAL)
        and r.error_type == error_type
        and r.error_message == error_message
        for r in previous
    )


@attrs.frozen
class IdentifierGroups:
    """
    One chunk of members, grouped by the destination identifier they map to.

    Attributes:
        send: One member per identifier that must be sent.
        riders: For each identifier sent, the other member keys that map to it
            (applied with it when it is acknowledged, rejected with it).
        local: Members applied to the delivered state without a request: the
            destination already holds (adds) or must keep (removes) their
            identifier because another member maps to it.
    """

    send: list[Member]
    riders: dict[Identifier, list[str]]
    local: list[Member]


def group_removes(
    leaving: Iterable[Member],
    holders: dict[Identifier, list[str]],
    *,
    is_leaving: Callable[[str], bool],
    kept_by_add: Callable[[Identifier], bool],
) -> IdentifierGroups:
    """
    Decide which removals to send for members leaving the cohort.

    An identifier is removed only when no member that stays maps to it: when
    another holder stays, or a member being added maps to it, the leaving
    member is dropped from the delivered state locally. Holders that leave
    too ride along with the one removal sent for their identifier.

    Args:
        leaving: The members leaving, with the identifier they were delivered
            under.
        holders: For each identifier, the delivered keys holding it.
        is_leaving: Whether a delivered key leaves in this run.
        kept_by_add: Whether a member added in this run maps to the identifier.
    """
    send: list[Member] = []
    riders: dict[Identifier, list[str]] = {}
    local: list[Member] = []
    seen: set[str] = set()
    for member in leaving:
        if member.key in seen:
            continue
        ident = member.identifier
        others = [h for h in holders.get(ident, ()) if h != member.key]
        if any(not is_leaving(h) for h in others) or kept_by_add(ident):
            local.append(member)
            seen.add(member.key)
            continue
        send.append(member)
        riders[ident] = [h for h in others if h not in seen]
        seen.add(member.key)
        seen.update(riders[ident])
    return IdentifierGroups(send=send, riders={k: v for k, v in riders.items() if v}, local=local)


def group_adds(
    entering: Iterable[Member],
    held: Callable[[Member], bool],
) -> IdentifierGroups:
    """
    Decide which additions to send for members entering the cohort.

    A member whose identifier the destination already holds for another
    member (*held*) is recorded locally; members of one chunk sharing an
    identifier are sent once, the first one carrying the others as riders.
    """
    send: list[Member] = []
    riders: dict[Identifier, list[str]] = {}
    local: list[Member] = []
    for member in entering:
        ident = member.identifier
        if ident in riders:
            riders[ident].append(member.key)
        elif held(member):
            local.append(member)
        else:
            send.append(member)
            riders[ident] = []
    return IdentifierGroups(send=send, riders={k: v for k, v in riders.items() if v}, local=local)


@attrs.frozen
class FailurePlan:
    """
    What a failed run means for its sync.

    Attributes:
        status: ``failed``, or ``partial`` if it delivered something first.
        sync: The definition after it (paused when the failure will not heal).
        notes: For the run's history.
        events: For the listeners.
    """

    status: RunStatus
    sync: Sync
    notes: tuple[str, ...]
    events: tuple[Event, ...]


def plan_failure(
    sync: Sync,
    *,
    error_type: str,
    message: str,
    heals: bool,
    authentication: bool,
    delivered_any: bool,
    teardown: bool,
    earlier: Sequence[SyncRun],
    pause_after: int,
    at: datetime,
) -> FailurePlan:
    """
    A failed run's status, and whether the sync pauses: at once on an
    authentication error (a person must fix the credentials), or when the
    same failure repeats *pause_after* times in a row and is not the kind
    that heals by itself (*heals*: a destination or store that is down comes
    back; corrupt data and bugs do not). One-time syncs and teardowns have
    bounded retries of their own (:func:`plan_completion`).

    *earlier* is the sync's history before this run, newest first.
    """
    status = run_status(
        guarded=False, rejected=0, skipped=0, failed=True, delivered_any=delivered_any
    )
    reason: str | None = None
    if authentication:
        reason = f"authentication failed: {message}"
    elif (
        not heals
        and pause_after
        and sync.policy.cadence is not Cadence.ONE_TIME
        and not teardown
        and repeated_failure(error_type, message, earlier, pause_after)
    ):
        reason = _repeated_reason(pause_after, error_type, message)
    if reason is None:
        return FailurePlan(status, sync, notes=(), events=())
    paused = attrs.evolve(sync, status=SyncStatus.PAUSED, status_reason=reason, updated_at=at)
    return FailurePlan(
        status,
        paused,
        notes=("paused",),
        events=(SyncFailed(sync_id=sync.id, status=SyncStatus.PAUSED, reason=reason, at=at),),
    )


def _repeated_reason(times: int, error_type: str, message: str) -> str:
    """Why a sync paused after the same failure *times* runs in a row."""
    return f"failed {times} runs in a row with {error_type}: {message}"


def teardown_status(sync: Sync, *, rejected: int, at: datetime) -> tuple[RunStatus, Sync]:
    """
    The end of a teardown that sent its removals: the sync is deleted; a
    destination that refused some makes the run ``partial``.
    """
    reason = "deleted: removed what it delivered"
    status = RunStatus.SUCCEEDED
    if rejected:
        status = RunStatus.PARTIAL
        reason = f"deleted; the destination refused to remove {rejected} member(s), see the ledger"
    return status, attrs.evolve(
        sync, status=SyncStatus.DELETED, status_reason=reason, updated_at=at
    )


@attrs.frozen(kw_only=True)
class Outcome:
    """
    What happened in a run, as the executor saw it.

    Attributes:
        run_id: The run's id.
        sync: The definition the run loaded.
        new_sync: The definition after the run (eligibility, pause, deletion).
        offset: The sync's allocated slot offset.
        attempts: Consecutive failures before this run (one-time, teardown).
        slot: The slot it ran.
        generation: The generation it ran.
        trigger: Why it ran (:func:`~cohortsync._schedule.effective_trigger`).
        started: When it started.
        finished: When it finished.
        status: Its status.
        error_type: The class name of the error that ended it, if any.
        error_message: That error's message.
        tally: What it delivered (an interrupted attempt's included).
        skipped: Members it skipped.
        retries: Requests it retried.
        full: It was a full send.
        notes: Its history notes so far.
        feed_cursor: The change-feed cursor its diff brings the sync to.
        full_done: It delivered the whole audience (if it succeeded).
        guarded: The guard held its removals.
        pending: Idempotency keys of the in-flight records it reconciled.
        jitter: A uniform draw in [0, 1) for the retry backoff.
    """

    run_id: str
    sync: Sync
    new_sync: Sync
    offset: int
    attempts: int
    slot: datetime
    generation: int
    trigger: Trigger
    started: datetime
    finished: datetime
    status: RunStatus
    error_type: str | None = None
    error_message: str | None = None
    tally: Tally = attrs.Factory(Tally)
    skipped: int = 0
    retries: int = 0
    full: bool = False
    notes: tuple[str, ...] = ()
    feed_cursor: str | None = None
    full_done: bool = False
    guarded: bool = False
    pending: tuple[str, ...] = ()
    jitter: float = 0.0


@attrs.frozen
class CompletionPlan:
    """
    What completing a run writes (in one store transaction) and tells.

    Attributes:
        completion: For :meth:`~cohortsync.storage.Storage.complete_run`; its
            ``run`` is the history record.
        events: For the listeners, before the run's own ``RunFinished``.
    """

    completion: Completion
    events: tuple[Event, ...]

    @property
    def run(self) -> SyncRun:
        """The history record."""
        return self.completion.run


def _next_on_grid(sync: Sync, o: Outcome) -> tuple[datetime | None, int, str | None]:
    """The next slot of a recurring sync after a run, the slots coalesced, and a note."""
    policy, offset = _schedule.grid_policy(sync, o.offset)
    try:
        nxt = _schedule.next_after_run(policy, offset, o.slot, o.started, o.finished)
    except ConfigurationError:
        raise  # a damaged schedule row, not the end of time
    except (OverflowError, ValueError):
        # No next slot exists before year 10,000: say so, do not crash.
        return None, 0, "no_next_slot: the clock is at the end of time"
    if nxt.due is not None and nxt.due <= o.finished:
        # A slot fell due while this run ran: it runs next, at once.
        return nxt.due, nxt.coalesced, f"overran: the slot of {nxt.due.isoformat()} runs next"
    return nxt.due, nxt.coalesced, None


_new_run = v.trusted_maker(SyncRun)
_new_completion = v.trusted_maker(Completion)


def plan_completion(outcome: Outcome) -> CompletionPlan:
    """
    What comes after a run: its history record, the next due instant and
    trigger on the slot grid, the consecutive-failure count, the slots it
    coalesced, and the definition (one-time syncs complete or fail here,
    after bounded retries with backoff).
    """
    o = outcome
    failed = o.status is RunStatus.FAILED or (
        o.error_type is not None and o.status is RunStatus.PARTIAL
    )
    teardown = o.trigger is Trigger.TEARDOWN
    next_trigger = Trigger.SCHEDULED
    if teardown and o.new_sync.status is not SyncStatus.DELETED:
        # The removals failed: what comes next is the teardown again (also
        # after a resume), never a normal run that would deliver again.
        next_trigger = Trigger.TEARDOWN
    new_sync = o.new_sync
    notes = list(o.notes)
    events: list[Event] = []
    attempts = 0
    coalesced = 0
    next_due: datetime | None = None
    one_time = new_sync.policy.cadence is Cadence.ONE_TIME
    if new_sync.status is not SyncStatus.ACTIVE:
        pass
    elif failed and (one_time or next_trigger is Trigger.TEARDOWN):
        attempts = o.attempts + 1
        if attempts >= new_sync.policy.one_time_attempts:
            what = (
                "removing the delivered members"
                if next_trigger is Trigger.TEARDOWN
                else "one-time sync"
            )
            reason = f"{what} failed {attempts} times: {o.error_message}"
            new_sync = attrs.evolve(
                new_sync, status=SyncStatus.FAILED, status_reason=reason, updated_at=o.finished
            )
            events.append(
                SyncFailed(
                    sync_id=new_sync.id, status=SyncStatus.FAILED, reason=reason, at=o.finished
                )
            )
        else:
            backoff = new_sync.policy.retry.delay(attempts - 1, o.jitter) * 60
            next_due = add_saturating(o.finished, timedelta(seconds=backoff))
            if next_trigger is not Trigger.TEARDOWN:
                next_trigger = Trigger.ONE_TIME
    elif one_time:
        new_sync = attrs.evolve(new_sync, status=SyncStatus.COMPLETED, updated_at=o.finished)
    else:
        next_due, coalesced, note = _next_on_grid(new_sync, o)
        if note is not None:
            notes.append(note)
    clean = o.error_type is None
    # Built without the validating constructor: every part was validated when
    # it was made; only host text (the error, the notes) goes through its converter.
    run = _new_run(
        id=o.run_id,
        sync_id=o.sync.id,
        generation=o.generation,
        trigger=o.trigger,
        slot=o.slot,
        started_at=o.started,
        finished_at=o.finished,
        status=o.status,
        cadence=o.sync.cadence,
        added=o.tally.added,
        removed=o.tally.removed,
        skipped=o.skipped,
        rejected=o.tally.rejected,
        batches=o.tally.batches,
        retries=o.retries,
        full_sync=o.full,
        error_type=v.to_optional_storable(o.error_type),
        error_message=v.to_optional_storable(o.error_message),
        notes=v.to_storable_tuple(notes),
        collisions=o.tally.collisions,
        coalesced=coalesced,
    )
    completion = _new_completion(
        run=run,
        next_due=next_due,
        next_trigger=next_trigger,
        sync=None if new_sync is o.sync or new_sync == o.sync else new_sync,
        attempts=attempts,
        # A failed run delivered only part of the window: read it again.
        feed_cursor=o.feed_cursor if clean else None,
        full_sync_done=o.full_done and o.status is RunStatus.SUCCEEDED,
        # Pending batches are settled once a run delivered its whole diff
        # (their reconciliation included); else the next run reconciles
        # them again, which is harmless.
        resolved=o.pending if clean and not o.guarded and o.status is not RunStatus.SKIPPED else (),
        scheduled_from=o.finished,
    )
    return CompletionPlan(completion=completion, events=tuple(events))


ISOLATED_NOTE = "isolated: the run could not be completed; other syncs went on"


def plan_isolation(
    sync: Sync,
    *,
    anchor: datetime,
    offset: int,
    attempts: int,
    run_id: str,
    slot: datetime,
    generation: int,
    trigger: Trigger,
    error_type: str,
    message: str,
    earlier: Sequence[SyncRun],
    pause_after: int,
    now: datetime,
    retry_in: timedelta,
) -> Completion:
    """
    What is recorded for a run that could not be run or recorded normally (a
    damaged row, a store error on its record, a bug): a failed run with its
    error, and the sync off the schedule until its next slot (or *retry_in*
    when it has none) so the other due syncs go on. The same failure
    *pause_after* times in a row pauses the sync, whatever its cadence: an
    isolated run has no retries of its own to bound it.
    """
    new_sync: Sync | None = None
    if pause_after and repeated_failure(error_type, message, earlier, pause_after):
        new_sync = attrs.evolve(
            sync,
            status=SyncStatus.PAUSED,
            status_reason=_repeated_reason(pause_after, error_type, message),
            updated_at=now,
        )
    next_due: datetime | None = None
    if new_sync is None and sync.status is SyncStatus.ACTIVE:
        try:
            next_due = _schedule.next_slot_after(sync, anchor, offset, now)
        except (OverflowError, ValueError, ConfigurationError):
            next_due = None
        if next_due is None:
            next_due = add_saturating(now, retry_in)
    run = SyncRun(
        id=run_id,
        sync_id=sync.id,
        generation=generation,
        trigger=trigger,
        slot=slot,
        started_at=now,
        finished_at=now,
        status=RunStatus.FAILED,
        cadence=sync.cadence,
        error_type=error_type,
        error_message=message,
        notes=(ISOLATED_NOTE,),
    )
    return Completion(
        run=run,
        next_due=next_due,
        next_trigger=Trigger.SCHEDULED,
        sync=new_sync,
        attempts=attempts,
        scheduled_from=now,
    )
