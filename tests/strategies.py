"""
Reusable Hypothesis strategies for cohortsync's tests.

Keep strategies here rather than in test modules so that every test draws
instants, policies and offsets the same way. Group them by topic below.
"""

from __future__ import annotations

import functools
from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import attrs
from hypothesis import strategies as st

from cohortsync._cohort import Changes, Cohort, CohortType, StaticSource
from cohortsync._destination import (
    Batch,
    Capabilities,
    DeliveryResult,
    Identifier,
    IdentifierKind,
    Member,
    Operation,
    RateLimit,
    Rejection,
    RunContext,
)
from cohortsync._policy import (
    Cadence,
    FirstRun,
    MassRemovalGuard,
    OnDelete,
    OnIneligible,
    RetryPolicy,
    SyncPolicy,
    Weekday,
)
from cohortsync._schedule import fixed_offset, offset_bound
from cohortsync._sync import RunStatus, Sync, SyncRun, SyncStatus, Trigger
from cohortsync.advice import Recommendation
from cohortsync.events import (
    BatchDelivered,
    EligibilityChanged,
    Event,
    GuardTripped,
    RunFinished,
    RunPlanned,
    RunStarted,
    SyncFailed,
)
from cohortsync.storage._protocol import (
    AppliedBatch,
    Completion,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    SyncRecord,
)
from cohortsync.testing import Fault

UTC = timezone.utc

# --- Time -------------------------------------------------------------------

#: Zones with the interesting shapes: a one-hour DST shift in each hemisphere
#: of the calendar (New York, Berlin), a half-hour DST shift (Lord Howe), a
#: half-hour offset without DST (Kolkata), and no offset at all.
TIMEZONES = (
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "UTC",
)
#: The zones above that change their offset, for DST-focused tests.
DST_TIMEZONES = ("America/New_York", "Europe/Berlin", "Australia/Lord_Howe")

MIN_INSTANT = datetime(1970, 1, 1, tzinfo=UTC)
MAX_INSTANT = datetime(2200, 1, 1, tzinfo=UTC)


def aware_datetimes(
    min_value: datetime = MIN_INSTANT,
    max_value: datetime = MAX_INSTANT,
    *,
    any_zone: bool = False,
) -> st.SearchStrategy[datetime]:
    """
    Aware instants between *min_value* and *max_value* (aware, UTC), with
    microseconds.

    With *any_zone*, the same instants are expressed in one of
    :data:`TIMEZONES`, to check that code compares instants, not wall clocks.
    """
    instants = st.datetimes(
        min_value=min_value.astimezone(UTC).replace(tzinfo=None),
        max_value=max_value.astimezone(UTC).replace(tzinfo=None),
        timezones=st.just(UTC),
    )
    if not any_zone:
        return instants
    return st.builds(
        lambda instant, zone: instant.astimezone(ZoneInfo(zone)),
        instants,
        st.sampled_from(TIMEZONES),
    )


@functools.cache
def dst_transitions(
    zone: str, first_year: int = 2020, last_year: int = 2030
) -> tuple[datetime, ...]:
    """
    The instants (aware UTC, to the second) at which *zone* changes its UTC
    offset between *first_year* and *last_year* inclusive.

    Found by scanning days and bisecting, independently of the code under test
    (the zones tested change their offset at most once a day).
    """
    tz = ZoneInfo(zone)

    def offset_at(seconds: int) -> timedelta | None:
        return datetime.fromtimestamp(seconds, tz).utcoffset()

    found = []
    start = int(datetime(first_year, 1, 1, tzinfo=UTC).timestamp())
    end = int(datetime(last_year + 1, 1, 1, tzinfo=UTC).timestamp())
    for day in range(start, end, 86_400):
        low, high = day, day + 86_400
        if offset_at(low) == offset_at(high):
            continue
        while high - low > 1:
            middle = (low + high) // 2
            if offset_at(middle) == offset_at(low):
                low = middle
            else:
                high = middle
        found.append(datetime.fromtimestamp(high, UTC))
    return tuple(found)


def near_dst_transitions(zone: str, days: int = 2) -> st.SearchStrategy[datetime]:
    """
    Aware UTC instants within *days* of one of *zone*'s offset changes in the
    2020s, where schedule code in local time is most likely to be wrong.
    """
    span = days * 86_400 * 10**6
    return st.builds(
        lambda transition, micros: transition + timedelta(microseconds=micros),
        st.sampled_from(dst_transitions(zone)),
        st.integers(-span, span),
    )


# --- Policies and schedules -------------------------------------------------


#: Cron expressions with every shape the parser knows: lists, ranges, steps,
#: names, both day fields (OR), a starred day field (AND), leap days.
CRON_EXPRESSIONS = (
    "0 6 * * 1-5",
    "*/15 * * * *",
    "30 2 * * *",
    "0,30 1-3 * * *",
    "5 4 1,15 * mon",
    "0 0 29 2 *",
    "0 12 * jan-mar,oct sat,sun",
    "*/7 9-17/2 */3 * *",
    "0 0 13 * 5",
    "45 23 31 * *",
    "@hourly",
)


def plain_policy(cadence: Cadence, **options: object) -> SyncPolicy:
    """
    A policy of *cadence* with the schedule fields it needs (every 15
    minutes, weekly on Mondays, cron at 06:00), for tests about something else.
    """
    needs: dict[Cadence, dict[str, object]] = {
        Cadence.EVERY: {"interval": timedelta(minutes=15)},
        Cadence.WEEKLY: {"on": Weekday.MONDAY},
        Cadence.CRON: {"expression": "0 6 * * *"},
    }
    return SyncPolicy(cadence=cadence, **needs.get(cadence, {}), **options)  # type: ignore[arg-type]


def local_times() -> st.SearchStrategy[time]:
    """Times of day to the second, biased towards quarter hours (DST changes)."""
    quarters = st.integers(0, 95).map(lambda k: time(k // 4, k % 4 * 15))
    return quarters | st.builds(time, st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))


def intervals() -> st.SearchStrategy[timedelta]:
    """Every() intervals, whole minutes from 1 minute to 7 days."""
    common = st.sampled_from([1, 5, 15, 30, 60, 90, 360, 1440, 2880, 10080])
    return (common | st.integers(1, 7 * 1440)).map(lambda m: timedelta(minutes=m))


@st.composite
def schedule_options(
    draw: st.DrawFn, cadence: Cadence, timezones: tuple[str, ...] = TIMEZONES
) -> dict[str, object]:
    """The schedule fields a policy of *cadence* takes, drawn."""
    zone = draw(st.none() | st.sampled_from(timezones)) if timezones else None
    if cadence is Cadence.DAILY:
        return {"timezone": zone, "at": draw(st.none() | local_times())}
    if cadence is Cadence.WEEKLY:
        on = draw(st.sets(st.sampled_from(Weekday), min_size=1))
        return {"timezone": zone, "at": draw(st.none() | local_times()), "on": on}
    if cadence is Cadence.EVERY:
        return {"interval": draw(intervals())}
    if cadence is Cadence.CRON:
        return {"timezone": zone, "expression": draw(st.sampled_from(CRON_EXPRESSIONS))}
    return {}


@st.composite
def policies(
    draw: st.DrawFn,
    cadences: tuple[Cadence, ...] = tuple(Cadence),
    timezones: tuple[str, ...] = TIMEZONES,
) -> SyncPolicy:
    """
    Sync policies of the given *cadences*, with their schedule fields drawn
    (zoned ones with or without one of *timezones*).
    """
    cadence = draw(st.sampled_from(cadences))
    return SyncPolicy(cadence=cadence, **draw(schedule_options(cadence, timezones)))  # type: ignore[arg-type]


def offsets(policy: SyncPolicy) -> st.SearchStrategy[int]:
    """
    Valid slot offsets for *policy*: the chosen time's for a daily or weekly
    ``at`` (0 for cron, one-time and real-time syncs, which are not spread),
    else anywhere in the period, biased towards quarter hours (where DST
    transitions happen).
    """
    fixed = fixed_offset(policy)
    if fixed is not None:
        return st.just(fixed)
    period = offset_bound(policy)
    quarter_hours = st.integers(0, max(period // 900 - 1, 0)).map(lambda k: k * 900)
    return st.integers(0, period - 1) | quarter_hours.filter(lambda o: o < period)


@st.composite
def schedules(
    draw: st.DrawFn,
    cadences: tuple[Cadence, ...] = (Cadence.HOURLY, Cadence.DAILY, Cadence.REALTIME),
    timezones: tuple[str, ...] = TIMEZONES,
) -> tuple[SyncPolicy, int]:
    """
    A recurring policy and a valid slot offset for it.
    """
    policy = draw(policies(cadences, timezones))
    return policy, draw(offsets(policy))


# --- Domain values ----------------------------------------------------------
#
# One strategy per public value class, drawing only valid values (validators
# are tested with hand-picked bad values in test_models.py). The converter
# round-trip tests draw from these. Member keys come from member_keys() below.


def ids() -> st.SearchStrategy[str]:
    """
    Valid identifiers: 1-200 characters, not blank, no control characters.
    """
    return st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=200).filter(
        str.strip
    )


def texts() -> st.SearchStrategy[str]:
    """
    Free text (names, reasons, messages), any printable or not.
    """
    return st.text(max_size=50)


def counts(minimum: int = 0) -> st.SearchStrategy[int]:
    return st.integers(min_value=minimum, max_value=10**12)


def finite_floats(min_value: float, max_value: float) -> st.SearchStrategy[float]:
    return st.floats(min_value, max_value, allow_nan=False, allow_infinity=False)


def durations() -> st.SearchStrategy[timedelta]:
    """
    Positive durations up to ten years, to the microsecond.
    """
    return st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=3_650))


def cohorts() -> st.SearchStrategy[Cohort]:
    """
    Cohorts with a membership source, which the converter must leave out.
    """
    return st.builds(
        Cohort,
        id=ids(),
        name=texts(),
        type=st.sampled_from(CohortType),
        size=st.none() | counts(),
        source=st.none() | st.builds(StaticSource, st.frozensets(member_keys(), max_size=3)),
    )


def rate_limits() -> st.SearchStrategy[RateLimit]:
    return st.builds(
        RateLimit,
        requests=st.integers(1, 10**6),
        per_seconds=finite_floats(1e-3, 1e6),
    )


def capabilities() -> st.SearchStrategy[Capabilities]:
    return st.builds(
        Capabilities,
        name=texts(),
        supports_realtime=st.booleans(),
        supports_removals=st.booleans(),
        full_sync_only=st.booleans(),
        max_batch_size=st.integers(1, 10**6),
        max_parallel=st.integers(1, 64),
        rate_limit=st.none() | rate_limits(),
        min_audience_size=st.none() | counts(),
        accepted_identifiers=st.none() | st.frozensets(st.sampled_from(IdentifierKind)),
        membership_ttl=st.none() | durations(),
    )


def guards() -> st.SearchStrategy[MassRemovalGuard]:
    return st.builds(
        MassRemovalGuard,
        enabled=st.booleans(),
        max_share=finite_floats(0.0, 1.0),
        min_audience=counts(),
    )


def retry_policies() -> st.SearchStrategy[RetryPolicy]:
    return st.builds(
        RetryPolicy,
        max_retries=st.integers(0, 100),
        initial=finite_floats(0.0, 60.0),
        multiplier=finite_floats(1.0, 10.0),
        max_delay=finite_floats(0.0, 86_400.0),
        jitter=finite_floats(0.0, 1.0),
    )


@st.composite
def sync_policies(draw: st.DrawFn) -> SyncPolicy:
    """
    Policies of every cadence with every option drawn, unlike :func:`policies`
    which varies only what the schedule reads.
    """
    cadence = draw(st.sampled_from(Cadence))
    first_run = FirstRun.NOW if cadence is Cadence.ONE_TIME else draw(st.sampled_from(FirstRun))
    return SyncPolicy(
        cadence=cadence,
        **draw(schedule_options(cadence)),  # type: ignore[arg-type]
        first_run=first_run,
        send_removals=draw(st.booleans()),
        guard=draw(guards()),
        on_ineligible=draw(st.sampled_from(OnIneligible)),
        on_delete=draw(st.sampled_from(OnDelete)),
        retry=draw(retry_policies()),
        one_time_attempts=draw(st.integers(1, 100)),
        rejection_attempts=draw(st.integers(1, 100)),
    )


def syncs() -> st.SearchStrategy[Sync]:
    return st.builds(
        Sync,
        id=ids(),
        cohort_id=ids(),
        destination_id=ids(),
        policy=sync_policies(),
        mapping_id=st.none() | ids(),
        generation=st.integers(1, 10**6),
        status=st.sampled_from(SyncStatus),
        status_reason=st.none() | texts(),
        effective_cadence=st.none() | st.sampled_from(Cadence),
        created_at=aware_datetimes(any_zone=True),
        updated_at=aware_datetimes(any_zone=True),
        guard_released=st.booleans(),
    )


def sync_runs() -> st.SearchStrategy[SyncRun]:
    return st.builds(
        SyncRun,
        id=ids(),
        sync_id=ids(),
        generation=st.integers(1, 10**6),
        trigger=st.sampled_from(Trigger),
        slot=aware_datetimes(),
        started_at=aware_datetimes(),
        finished_at=aware_datetimes(any_zone=True),
        status=st.sampled_from(RunStatus),
        cadence=st.sampled_from(Cadence),
        added=counts(),
        removed=counts(),
        skipped=counts(),
        rejected=counts(),
        batches=counts(),
        retries=counts(),
        full_sync=st.booleans(),
        error_type=st.none() | texts(),
        error_message=st.none() | texts(),
        notes=st.lists(texts(), max_size=3).map(tuple),
        collisions=counts(),
        coalesced=counts(),
    )


def identifiers() -> st.SearchStrategy[Identifier]:
    return st.builds(Identifier, kind=st.sampled_from(IdentifierKind), value=member_keys())


def members() -> st.SearchStrategy[Member]:
    return st.builds(Member, key=member_keys(), identifier=identifiers())


def rejections() -> st.SearchStrategy[Rejection]:
    return st.builds(Rejection, identifier=member_keys(), reason=texts())


def delivery_results() -> st.SearchStrategy[DeliveryResult]:
    return st.builds(DeliveryResult, st.lists(rejections(), max_size=3).map(tuple))


def changes() -> st.SearchStrategy[Changes]:
    keys = st.lists(member_keys(), max_size=5).map(tuple)
    return st.builds(Changes, added=keys, removed=keys, cursor=texts())


def run_contexts() -> st.SearchStrategy[RunContext]:
    return st.builds(
        RunContext,
        run_id=ids(),
        sync_id=ids(),
        generation=st.integers(1, 10**6),
        cohort_id=ids(),
        cohort_name=texts(),
        computed_at=aware_datetimes(),
        full_sync=st.booleans(),
    )


def batches() -> st.SearchStrategy[Batch]:
    return st.builds(
        Batch,
        context=run_contexts(),
        operation=st.sampled_from(Operation),
        members=st.lists(members(), max_size=3).map(tuple),
        sequence=counts(),
        idempotency_key=st.text(min_size=1, max_size=64),
    )


def ledger_entries() -> st.SearchStrategy[LedgerEntry]:
    return st.builds(
        LedgerEntry,
        sync_id=ids(),
        key=member_keys(),
        reason=texts(),
        attempts=st.integers(1, 100),
        dead=st.booleans(),
        first_seen=aware_datetimes(),
        last_seen=aware_datetimes(any_zone=True),
    )


def member_issues() -> st.SearchStrategy[MemberIssue]:
    return st.builds(
        MemberIssue,
        run_id=ids(),
        key=member_keys(),
        kind=st.sampled_from((IssueKind.SKIPPED, IssueKind.REJECTED)),
        reason=texts(),
    )


def leases() -> st.SearchStrategy[Lease]:
    return st.builds(
        Lease,
        sync_id=ids(),
        generation=st.integers(1, 10**6),
        slot=aware_datetimes(),
        trigger=st.sampled_from(Trigger),
        owner=ids(),
        token=st.text(min_size=1, max_size=64),
        expires_at=aware_datetimes(any_zone=True),
    )


def sync_records() -> st.SearchStrategy[SyncRecord]:
    return st.builds(
        SyncRecord,
        sync=syncs(),
        next_due=st.none() | aware_datetimes(),
        next_trigger=st.sampled_from(Trigger),
        offset=st.integers(0, 86_399),
        slot_bucket=st.none() | st.integers(0, 1_439),
        anchor=aware_datetimes(),
        attempts=st.integers(0, 100),
        full_resync=st.booleans(),
        feed_cursor=st.none() | texts(),
        last_full_sync_at=st.none() | aware_datetimes(),
        lease=st.none() | leases(),
    )


def completions() -> st.SearchStrategy[Completion]:
    return st.builds(
        Completion,
        run=sync_runs(),
        next_due=st.none() | aware_datetimes(),
        next_trigger=st.sampled_from(Trigger),
        sync=st.none() | syncs(),
        attempts=st.integers(0, 100),
        feed_cursor=st.none() | texts(),
        full_sync_done=st.booleans(),
    )


@attrs.frozen(kw_only=True)
class CompletionScenario:
    """
    A run's life on one store, for checking ``complete_run`` against the rule.

    A sync is created from *start* (a run first recorded at its due instant
    when *ran_before*, so the next claim lands just after it), claimed, given
    *pending* in-flight batches, changed by its host while the run goes on
    (*host*: ``None``, ``"save"`` or ``"update"``, a new generation), and
    completed with the other fields.
    """

    start: SyncRecord
    ran_before: bool
    pending: int
    host: str | None
    host_next_due: timedelta | None
    host_full_resync: bool
    next_due: timedelta | None
    next_trigger: Trigger
    attempts: int
    status: SyncStatus | None
    feed_cursor: str | None
    full_sync_done: bool
    scheduled_from: timedelta | None
    resolved: frozenset[int]
    started_after: timedelta


def completion_scenarios(sync_id: str = "s") -> st.SearchStrategy[CompletionScenario]:
    """
    Runs whose completion takes every branch of the rule: advance or not,
    replacement definition or not, cursor kept or moved, full sync or not.
    """
    minutes = st.integers(-120, 120).map(lambda m: timedelta(minutes=m))
    # Cursors every store can hold (no NUL, no lone surrogates).
    cursors = st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=8
    )
    due = datetime(2030, 1, 1, tzinfo=UTC)
    start = st.builds(
        SyncRecord,
        sync=st.builds(
            Sync,
            id=st.just(sync_id),
            cohort_id=st.just("cohort"),
            destination_id=st.just("destination"),
            policy=st.sampled_from((SyncPolicy.hourly(), SyncPolicy.realtime())),
            created_at=st.just(due),
            updated_at=st.just(due),
        ),
        next_due=st.just(due),
        next_trigger=st.sampled_from(Trigger),
        anchor=st.just(due),
        attempts=st.integers(0, 5),
        full_resync=st.booleans(),
        feed_cursor=st.none() | cursors,
        last_full_sync_at=st.none() | minutes.map(lambda m: due + m),
        scheduled_from=st.none() | minutes.map(lambda m: due + m),
    )
    return st.builds(
        CompletionScenario,
        start=start,
        ran_before=st.booleans(),
        pending=st.integers(0, 3),
        host=st.sampled_from((None, "save", "update")),
        host_next_due=st.none() | minutes,
        host_full_resync=st.booleans(),
        next_due=st.none() | minutes,
        next_trigger=st.sampled_from(Trigger),
        attempts=st.integers(0, 5),
        status=st.none() | st.sampled_from(SyncStatus),
        feed_cursor=st.none() | cursors,
        full_sync_done=st.booleans(),
        scheduled_from=st.none() | minutes,
        resolved=st.frozensets(st.integers(0, 3)),
        started_after=st.integers(0, 3_600).map(lambda s: timedelta(seconds=s)),
    )


def applied_batches() -> st.SearchStrategy[AppliedBatch]:
    return st.builds(
        AppliedBatch,
        run_id=ids(),
        sequence=counts(),
        operation=st.sampled_from(Operation),
        idempotency_key=st.text(min_size=1, max_size=64),
        added=st.lists(members(), max_size=3).map(tuple),
        removed=st.lists(member_keys(), max_size=3).map(tuple),
        rejected=st.lists(st.tuples(member_keys(), texts()), max_size=3).map(tuple),
        at=aware_datetimes(),
        max_rejection_attempts=st.integers(1, 100),
    )


def recommendations() -> st.SearchStrategy[Recommendation]:
    return st.builds(
        Recommendation,
        sync_id=ids(),
        code=texts(),
        message=texts(),
        suggested_cadence=st.sampled_from(Cadence),
        runs_considered=counts(),
        zero_update_runs=counts(),
        zero_update_share=finite_floats(0.0, 1.0),
    )


def events() -> st.SearchStrategy[Event]:
    """
    Every kind of scheduler event.
    """
    at = aware_datetimes()
    return st.one_of(
        st.builds(
            RunStarted,
            sync_id=ids(),
            run_id=ids(),
            trigger=st.sampled_from(Trigger),
            slot=at,
            at=at,
            destination_id=st.none() | ids(),
            cadence=st.none() | st.sampled_from(Cadence),
        ),
        st.builds(
            RunPlanned,
            sync_id=ids(),
            run_id=ids(),
            destination_id=ids(),
            slot=at,
            adds=counts(),
            removes=counts(),
            resends=counts(),
            batches=counts(),
            batch_size=counts(),
            full_sync=st.booleans(),
            at=at,
        ),
        st.builds(
            BatchDelivered,
            sync_id=ids(),
            run_id=ids(),
            operation=st.sampled_from(Operation),
            sequence=counts(),
            size=counts(),
            rejected=counts(),
            idempotency_key=texts(),
            destination_id=st.none() | ids(),
            started_at=st.none() | at,
            at=st.none() | at,
            batches_done=counts(),
            batches_total=counts(),
            members_done=counts(),
            members_total=counts(),
        ),
        st.builds(RunFinished, run=sync_runs(), destination_id=st.none() | ids()),
        st.builds(
            SyncFailed,
            sync_id=ids(),
            status=st.sampled_from(SyncStatus),
            reason=texts(),
            at=at,
        ),
        st.builds(
            EligibilityChanged,
            sync_id=ids(),
            eligible=st.booleans(),
            codes=st.lists(texts(), max_size=3).map(tuple),
            cadence=st.sampled_from(Cadence),
            at=at,
        ),
        st.builds(
            GuardTripped,
            sync_id=ids(),
            run_id=ids(),
            delivered=counts(),
            removing=counts(),
            source_empty=st.booleans(),
            at=at,
        ),
    )


# --- Memberships and delivery -----------------------------------------------

#: A small universe of member keys, so that random histories keep revisiting
#: the same members (entering, leaving, coming back).
MEMBER_UNIVERSE = tuple(f"m{i:03d}" for i in range(40))


def member_sets(universe: tuple[str, ...] = MEMBER_UNIVERSE) -> st.SearchStrategy[frozenset[str]]:
    """
    One snapshot of a cohort: any subset of *universe*, the empty one included.
    """
    return st.frozensets(st.sampled_from(universe))


def membership_histories(max_runs: int = 6) -> st.SearchStrategy[list[frozenset[str]]]:
    """
    A cohort's membership at each of 1 to *max_runs* runs.
    """
    return st.lists(member_sets(), min_size=1, max_size=max_runs)


def member_keys(max_size: int = 6) -> st.SearchStrategy[str]:
    """
    Valid member keys: short non-empty strings of any characters, so ordering
    is tested beyond ASCII (lone surrogates and NUL excluded: no store can hold them).
    """
    return st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
        max_size=max_size,
    )


def destination_faults() -> st.SearchStrategy[dict[Fault, float]]:
    """
    A mix of misbehaviours a destination shows at random, each with a
    probability per call: timeouts, 5xx, 429 with ``Retry-After``, partial
    rejections, permanent errors. Authentication errors are left out: they
    pause the sync, which is tested on its own.
    """
    faults = (
        Fault.timeout(),
        Fault.server_error(),
        Fault.server_error(retry_after=30.0),
        Fault.rate_limited(retry_after=7.0),
        Fault.reject(0.5),
        Fault.permanent(),
    )
    return st.dictionaries(st.sampled_from(faults), st.floats(0.05, 0.4), min_size=1)
