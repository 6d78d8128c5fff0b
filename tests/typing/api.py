"""
The public API as a host uses it, checked by mypy (``nox -s typing``) and never
executed: a host-written Destination, Clock and Storage, and the types every
call returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from datetime import time as wall_time
from typing import Literal

import cattrs
from typing_extensions import assert_type

import cohortsync
from cohortsync import exceptions, testing
from cohortsync.advice import Recommendation, recommend
from cohortsync.destinations import PROCESS_RATE_LIMITS, RateLimits, catalog
from cohortsync.eligibility import (
    DEFAULT_RULES,
    Eligibility,
    EligibilityInput,
    Reason,
    Ruleset,
    available_destinations,
    check_eligibility,
)
from cohortsync.events import (
    BatchDelivered,
    EligibilityChanged,
    Event,
    GuardTripped,
    Listener,
    RunFinished,
    RunPlanned,
    subscribe,
)
from cohortsync.identifiers import Bulk, BulkResolver
from cohortsync.serialization import dumps, loads, make_converter
from cohortsync.storage import (
    AppliedBatch,
    Completion,
    DeliveryStore,
    HistoryStore,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    MemoryStorage,
    OptionalQueries,
    PagedReads,
    PendingBatch,
    Progress,
    ScheduleStore,
    Storage,
    StorageBase,
    SyncRecord,
    apply_claim,
    apply_completion,
)

# -- A host's destination ---------------------------------------------------


class PushAudience(cohortsync.Destination):
    """
    A host adapter that starts from a catalog preset.
    """

    capabilities = cohortsync.destinations.catalog.BRAZE.evolve(max_batch_size=500)

    def add(self, batch: cohortsync.Batch) -> cohortsync.DeliveryResult:
        assert_type(batch.identifiers, list[str])
        assert_type(batch.idempotency_key, str)
        assert_type(batch.operation, cohortsync.Operation)
        assert_type(batch.context.sync_id, str)
        if not batch.identifiers:
            raise exceptions.RateLimitedError(retry_after=1.5)
        return cohortsync.DeliveryResult.ok()

    def remove(self, batch: cohortsync.Batch) -> cohortsync.DeliveryResult:
        rejected = [cohortsync.Rejection(value, "unknown user") for value in batch.identifiers]
        return cohortsync.DeliveryResult.partial(rejected)

    def open(self, context: cohortsync.RunContext) -> None:
        assert_type(context.computed_at, datetime)

    def close(self, context: cohortsync.RunContext, *, succeeded: bool) -> None:
        pass


assert_type(PushAudience.capabilities, cohortsync.Capabilities)
assert_type(
    catalog.FACEBOOK_ADS.evolve(
        name="Facebook Ads (EU)",
        rate_limit=None,
        accepted_identifiers=["email_sha256", cohortsync.IdentifierKind.PHONE_SHA256],
        membership_ttl=timedelta(days=30),
    ),
    cohortsync.Capabilities,
)
assert_type(PushAudience().capabilities.max_batch_size, int)
assert_type(PushAudience().capabilities.rate_limit, cohortsync.RateLimit | None)
assert_type(catalog.get("facebook_ads"), cohortsync.Capabilities)
assert_type(catalog.FACEBOOK_ADS.membership_ttl, timedelta | None)


# -- A host's clock -----------------------------------------------------------


class WallClock:
    """
    A host clock: any class with now() and sleep() is a Clock.
    """

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


clock: cohortsync.Clock = WallClock()
fake: cohortsync.Clock = testing.FakeClock(datetime(2030, 1, 1, tzinfo=timezone.utc))
system: cohortsync.Clock = cohortsync.SystemClock()
assert_type(clock.now(), datetime)


# -- A host's storage ---------------------------------------------------------


class DelegatingStorage:
    """
    A host store that forwards every protocol method to a MemoryStorage: it
    satisfies Storage structurally, without subclassing it.
    """

    def __init__(self) -> None:
        self._inner = MemoryStorage()

    def create_sync(self, record: SyncRecord) -> None:
        self._inner.create_sync(record)

    def get_sync(self, sync_id: str) -> SyncRecord:
        return self._inner.get_sync(sync_id)

    def list_syncs(self) -> list[SyncRecord]:
        return self._inner.list_syncs()

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        self._inner.save_sync(record, expected_generation=expected_generation)

    def delete_sync(self, sync_id: str) -> None:
        self._inner.delete_sync(sync_id)

    def least_loaded_slot(self, period: int, buckets: int, preferred: int) -> int:
        return self._inner.least_loaded_slot(period, buckets, preferred)

    def next_due(self) -> datetime | None:
        return self._inner.next_due()

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        return self._inner.scheduled_after(now)

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        return self._inner.claim_due(now, owner, lease_for, limit)

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        return self._inner.extend_lease(lease, now, lease_for)

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        self._inner.complete_run(lease, completion)

    def release_lease(self, lease: Lease) -> None:
        self._inner.release_lease(lease)

    def iter_delivered(self, sync_id: str) -> Iterator[str]:
        return self._inner.iter_delivered(sync_id)

    def count_delivered(self, sync_id: str) -> int:
        return self._inner.count_delivered(sync_id)

    def filter_delivered(self, sync_id: str, keys: Iterable[str]) -> set[str]:
        return self._inner.filter_delivered(sync_id, keys)

    def delivered_identifiers(
        self, sync_id: str, keys: Sequence[str]
    ) -> dict[str, cohortsync.Identifier]:
        return self._inner.delivered_identifiers(sync_id, keys)

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        return self._inner.apply_batch(lease, batch)

    def delivered_version(self, sync_id: str) -> str:
        return self._inner.delivered_version(sync_id)

    def begin_batch(
        self,
        lease: Lease,
        batch: PendingBatch,
        *,
        replaces: str | None = None,
    ) -> None:
        self._inner.begin_batch(lease, batch, replaces=replaces)

    def pending_batches(self, sync_id: str) -> list[PendingBatch]:
        return self._inner.pending_batches(sync_id)

    def progress(self, sync_id: str) -> Progress | None:
        return self._inner.progress(sync_id)

    def identifier_holders(
        self, sync_id: str, identifiers: Iterable[cohortsync.Identifier]
    ) -> dict[cohortsync.Identifier, list[str]]:
        return self._inner.identifier_holders(sync_id, identifiers)

    def record_issues(self, lease: Lease, issues: Sequence[MemberIssue]) -> None:
        self._inner.record_issues(lease, issues)

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        return self._inner.ledger(sync_id)

    def dead_letters(self, sync_id: str) -> set[str]:
        return self._inner.dead_letters(sync_id)

    def history(self, sync_id: str, limit: int | None = None) -> list[cohortsync.SyncRun]:
        return self._inner.history(sync_id, limit)

    def run_issues(self, run_id: str) -> list[MemberIssue]:
        return self._inner.run_issues(run_id)

    def purge_history(self, before: datetime) -> int:
        return self._inner.purge_history(before)

    def close(self) -> None:
        self._inner.close()


storage: Storage = DelegatingStorage()
memory: Storage = MemoryStorage()

# The parts are types of their own, and a store on the base class is a Storage.
schedule: ScheduleStore = storage
delivery: DeliveryStore = storage
history: HistoryStore = storage
queries: OptionalQueries = storage
based: StorageBase = MemoryStorage()
# Optional since 0.2, not part of Storage: a store written for 0.1 lacks them.
paged: PagedReads = MemoryStorage()
assert_type(
    paged.due_between(None, datetime(2030, 1, 1, tzinfo=timezone.utc), 10), list[SyncRecord]
)
assert_type(paged.page_syncs(None, 10), list[SyncRecord])
memory = based


def claim_and_complete(record: SyncRecord, run: cohortsync.SyncRun) -> SyncRecord:
    """
    The two rules a host store applies in claim_due and complete_run.
    """
    expires_at = datetime(2030, 1, 1, tzinfo=timezone.utc)
    claimed, lease = apply_claim(record, owner="w", token="t" * 32, expires_at=expires_at)
    assert_type(claimed, SyncRecord)
    assert_type(lease, Lease)
    return apply_completion(claimed, lease, Completion(run=run, next_due=None))


# -- Cohorts, policies and eligibility ----------------------------------------


def power_users() -> Iterable[str]:
    return ["u1", "u2"]


cohort = cohortsync.Cohort(
    id="power-users",
    name="Power users",
    type=cohortsync.CohortType.BEHAVIORAL,
    size=2,
    source=power_users,
)
assert_type(cohort.size, int | None)
assert_type(cohort.source, cohortsync.MembershipSource | None)
assert_type(cohort.with_size(3), cohortsync.Cohort)
static = cohortsync.Cohort(
    id="vip", name="VIP", type=cohortsync.CohortType.STATIC, source=cohortsync.StaticSource(["a"])
)

assert_type(cohortsync.SyncPolicy.one_time(), cohortsync.SyncPolicy)
assert_type(cohortsync.SyncPolicy.hourly(), cohortsync.SyncPolicy)
assert_type(cohortsync.SyncPolicy.daily("Europe/Berlin"), cohortsync.SyncPolicy)
assert_type(
    cohortsync.SyncPolicy.realtime(on_ineligible=cohortsync.OnIneligible.PAUSE),
    cohortsync.SyncPolicy,
)
guarded = cohortsync.SyncPolicy.hourly(guard=cohortsync.MassRemovalGuard(max_share=0.2))
# The schedules of issue 17: chosen local times, intervals, days of the week, cron.
assert_type(
    cohortsync.SyncPolicy.daily(at=wall_time(6, 0), timezone="America/New_York"),
    cohortsync.SyncPolicy,
)
assert_type(cohortsync.SyncPolicy.every(timedelta(minutes=15)), cohortsync.SyncPolicy)
assert_type(
    cohortsync.SyncPolicy.every(timedelta(hours=6), first_run="next_slot", on_ineligible="pause"),
    cohortsync.SyncPolicy,
)
assert_type(
    cohortsync.SyncPolicy.weekly(
        ["mon", cohortsync.Weekday.FRIDAY], at=wall_time(9, 30), timezone="Europe/Berlin"
    ),
    cohortsync.SyncPolicy,
)
assert_type(cohortsync.SyncPolicy.weekly("sun"), cohortsync.SyncPolicy)
assert_type(
    cohortsync.SyncPolicy.cron("0 6 * * 1-5", timezone="America/New_York"),
    cohortsync.SyncPolicy,
)
assert_type(
    cohortsync.SyncPolicy.hourly(first_run=cohortsync.FirstRun.NEXT_SLOT), cohortsync.SyncPolicy
)
scheduled = cohortsync.SyncPolicy.cron("*/5 * * * *")
assert_type(scheduled.at, wall_time | None)
assert_type(scheduled.interval, timedelta | None)
assert_type(scheduled.on, tuple[cohortsync.Weekday, ...])
assert_type(scheduled.expression, str | None)
assert_type(scheduled.first_run, cohortsync.FirstRun)
assert_type(scheduled.period, timedelta | None)
assert_type(scheduled.sub_hourly, bool)
assert_type(cohortsync.Weekday.MONDAY.number, int)
try:
    cohortsync.SyncPolicy.cron("0 25 * * *")
except cohortsync.exceptions.CronExpressionError as err:
    assert_type(err.cron_field, str | None)
    assert_type(err.expression, str)
# Each constructor takes its cadence's options by keyword; enum options take
# members or their values (tests/test_typing_errors.py checks the mistakes).
assert_type(
    cohortsync.SyncPolicy.one_time(
        one_time_attempts=3, guard=cohortsync.MassRemovalGuard.disabled()
    ),
    cohortsync.SyncPolicy,
)
assert_type(
    cohortsync.SyncPolicy.hourly(
        send_removals=False,
        on_delete="remove_delivered",
        retry=cohortsync.RetryPolicy(max_retries=3),
        rejection_attempts=5,
    ),
    cohortsync.SyncPolicy,
)
assert_type(
    cohortsync.SyncPolicy.daily(timezone=None, on_delete=cohortsync.OnDelete.LEAVE),
    cohortsync.SyncPolicy,
)
assert_type(
    cohortsync.SyncPolicy.realtime(on_ineligible="pause", send_removals=False),
    cohortsync.SyncPolicy,
)
assert_type(cohortsync.SyncPolicy(cadence="daily", timezone="UTC"), cohortsync.SyncPolicy)
assert_type(guarded.on_delete, cohortsync.OnDelete)
assert_type(guarded.on_ineligible, cohortsync.OnIneligible)
assert_type(guarded.cadence, cohortsync.Cadence)
assert_type(guarded.timezone, str | None)
assert_type(guarded.period, timedelta | None)
assert_type(guarded.guard.trips(1_000, 600, source_empty=False), bool)
assert_type(guarded.retry.delay(3, 0.5), float)

eligibility = check_eligibility(
    cohort,
    PushAudience(),
    cohortsync.SyncPolicy.realtime(),
    identifier_kinds=[cohortsync.IdentifierKind.USER_ID],
)
assert_type(eligibility, Eligibility)
assert_type(eligibility.eligible, bool)
assert_type(eligibility.reasons, tuple[Reason, ...])
assert_type(eligibility.codes, frozenset[str])
assert_type(
    check_eligibility(cohort, catalog.GOOGLE_ADS, cohortsync.SyncPolicy.daily()),
    Eligibility,
)
assert_type(available_destinations(cohort, cohortsync.SyncPolicy.realtime()), list[str])


def no_weekend_realtime(i: EligibilityInput) -> Iterable[Reason]:
    if i.cadence is cohortsync.Cadence.REALTIME:
        yield Reason("no_weekend_realtime", "not on weekends")


rules = DEFAULT_RULES.with_rule("weekend", no_weekend_realtime).without("min_audience")
assert_type(rules, Ruleset)


# -- The scheduler -------------------------------------------------------------

scheduler = cohortsync.Scheduler(storage, clock=clock, rules=rules, slot_allocation="hash")
assert_type(scheduler.slot_allocation, Literal["balanced", "hash"])
test_scheduler = cohortsync.Scheduler(MemoryStorage(), clock=testing.FakeClock(), seed=1)
isolated = cohortsync.Scheduler(MemoryStorage(), rate_limits=RateLimits())
assert_type(isolated.rate_limits, RateLimits)
assert_type(PROCESS_RATE_LIMITS, RateLimits)
assert_type(scheduler.add_cohort(cohort), cohortsync.Cohort)
# Registration gives back the adapter as its own class.
assert_type(scheduler.add_destination("push", PushAudience()), PushAudience)
assert_type(
    scheduler.add_destination("rec", testing.RecordingDestination("braze")),
    testing.RecordingDestination,
)

sync = scheduler.create_sync("power-users", "push", cohortsync.SyncPolicy.hourly())
bulk = scheduler.create_syncs(
    (cohortsync.SyncSpec("power-users", "push", cohortsync.SyncPolicy.daily()) for _ in range(3)),
    chunk=1_000,
    upsert=True,
)
assert_type(bulk, cohortsync.BulkResult)
assert_type(bulk.created, tuple[str, ...])
try:
    scheduler.create_syncs([])
except cohortsync.exceptions.BulkSyncError as refused:
    assert_type(refused.failures, tuple[cohortsync.BulkFailure, ...])
    assert_type(refused.failures[0].error, cohortsync.exceptions.CohortSyncError)
declared = [
    cohortsync.SyncSpec("power-users", "push", cohortsync.SyncPolicy.daily(), sync_id="app:daily"),
]
applied = scheduler.apply_syncs(declared, prefix="app:", prune=True, dry_run=True)
assert_type(applied, cohortsync.ApplyResult)
assert_type(applied.deleted, tuple[str, ...])
assert_type(applied.refused, tuple[cohortsync.BulkFailure, ...])
assert_type(scheduler.apply_syncs(iter(declared)).unchanged, tuple[str, ...])
assert_type(sync, cohortsync.Sync)
assert_type(sync.id, str)
assert_type(sync.generation, int)
assert_type(sync.status, cohortsync.SyncStatus)
assert_type(sync.cadence, cohortsync.Cadence)
assert_type(scheduler.next_run(sync.id), datetime | None)
assert_type(scheduler.pause_sync(sync.id), cohortsync.Sync)
assert_type(scheduler.check("power-users", "push", sync.policy), Eligibility)

runs = scheduler.run_due()
assert_type(runs, list[cohortsync.SyncRun])
for run in scheduler.history(sync.id):
    assert_type(run, cohortsync.SyncRun)
    assert_type(run.status, cohortsync.RunStatus)
    assert_type(run.trigger, cohortsync.Trigger)
    assert_type(run.added, int)
    assert_type(run.updated, int)
    assert_type(run.error_message, str | None)
assert_type(scheduler.ledger(sync.id), list[LedgerEntry])
soon = datetime(2030, 1, 2, tzinfo=timezone.utc)
assert_type(scheduler.upcoming(soon), list[cohortsync.Upcoming])
assert_type(scheduler.upcoming(soon, limit=20), list[cohortsync.Upcoming])
assert_type(scheduler.iter_upcoming(soon), Iterator[cohortsync.Upcoming])
assert_type(scheduler.syncs(), list[cohortsync.Sync])
assert_type(scheduler.syncs(after=sync.id, limit=100), list[cohortsync.Sync])
assert_type(scheduler.iter_syncs(after=sync.id), Iterator[cohortsync.Sync])
for issue in storage.run_issues(sync.id):
    assert_type(issue.kind, IssueKind)
    assert_type(issue.kind is IssueKind.SKIPPED, bool)
    assert_type(issue.kind == "skipped", bool)  # a str enum: equal to its stored text
assert_type(
    scheduler.update_sync(sync.id, cohortsync.SyncPolicy.daily(), mapping_id=None),
    cohortsync.Sync,
)


# -- Identifier mappings: per key, and a batch at a time ------------------------

USERS = {"u1": "jane@example.com"}


def emails_for(keys: Sequence[str]) -> dict[str, str]:
    """
    A host's bulk lookup: one query for the whole batch (``WHERE id IN (...)``).
    """
    return {key: USERS[key] for key in keys if key in USERS}


emails_rule: BulkResolver = emails_for
assert_type(Bulk(emails_for), Bulk)
assert_type(Bulk(emails_for).resolver, BulkResolver)
mixed = cohortsync.IdentifierMapping(
    [
        (cohortsync.IdentifierKind.EMAIL_SHA256, Bulk(emails_for)),  # primary, per batch
        ("user_id", lambda key: key),  # fallback, per key
    ]
)
assert_type(mixed, cohortsync.IdentifierMapping)
assert_type(
    cohortsync.IdentifierMapping.hashed_email(Bulk(emails_for)), cohortsync.IdentifierMapping
)
assert_type(cohortsync.IdentifierMapping.hashed_email(USERS.get), cohortsync.IdentifierMapping)
assert_type(scheduler.add_mapping("email", mixed), cohortsync.IdentifierMapping)
resolved, unresolved = mixed.resolve_many(["u1", "u2"])
assert_type(resolved, list[cohortsync.Member])
assert_type(unresolved, list[str])


def on_event(event: Event) -> None:
    """
    A host listener: an eligibility change says which cadence the sync runs at now.
    """
    if isinstance(event, EligibilityChanged):
        assert_type(event.cadence, cohortsync.Cadence)


listening = cohortsync.Scheduler(MemoryStorage(), listeners=[on_event])
listening.add_listener(on_event)


def on_finished(event: RunFinished) -> None:
    """A listener typed for the one event class it subscribes to."""
    assert_type(event.run.status, cohortsync.RunStatus)
    assert_type(event.destination_id, str | None)


def on_trouble(event: RunFinished | GuardTripped) -> None:
    """A listener for two classes."""


def on_progress(event: RunPlanned | BatchDelivered) -> None:
    """Progress: the plan's totals, then each batch against them."""
    if isinstance(event, RunPlanned):
        assert_type(event.members, int)
    else:
        assert_type(event.members_total, int)
        assert_type(event.started_at, datetime | None)


listening.add_listener(on_finished, events=(RunFinished,))
listening.add_listener(on_trouble, events=(RunFinished, GuardTripped))
listening.add_listener(on_progress, events=(RunPlanned, BatchDelivered))
listening.add_listener(on_event, events=[RunFinished, GuardTripped])
assert_type(subscribe(on_finished, (RunFinished,)), Listener)
filtered = cohortsync.Scheduler(
    MemoryStorage(), listeners=[subscribe(on_trouble, (GuardTripped, RunFinished))]
)
assert_type(recommend(sync, runs), Recommendation | None)

text = dumps(sync)
assert_type(text, str)
assert_type(loads(text, cohortsync.Sync), cohortsync.Sync)
assert_type(make_converter(), cattrs.Converter)


# -- Errors ---------------------------------------------------------------------

try:
    scheduler.create_sync("power-users", "push", cohortsync.SyncPolicy.realtime())
except exceptions.IneligibleSyncError as err:
    assert_type(err.reasons, tuple[Reason, ...])
    for reason in err.reasons:
        assert_type(reason.code, str)
        assert_type(reason.blocking, bool)
except exceptions.ConfigurationError as err:
    assert_type(err.field, str)
    assert_type(err.value, object)
except exceptions.NotFoundError as err:
    assert_type(err, exceptions.NotFoundError)

try:
    scheduler.get_sync("missing")
except exceptions.SyncNotFoundError as err:
    assert_type(err.sync_id, str)

lost = exceptions.LeaseLostError("s1", "worker-a", "token")
assert_type(lost.owner, str)
assert_type(exceptions.TransientError(retry_after=2.0).retry_after, float | None)
assert_type(exceptions.DuplicateRunError("s1", sync.created_at).slot, datetime)

try:
    scheduler.run_due()
except exceptions.StorageClosedError as err:
    assert_type(err.store, str)

with cohortsync.Scheduler(MemoryStorage()) as owned:
    assert_type(owned, cohortsync.Scheduler)

assert_type(cohortsync.__version__, str)


class AsyncPushAudience(cohortsync.AsyncDestination):
    """A host's adapter written with async def: the twin of PushAudience."""

    capabilities = cohortsync.Capabilities(supports_realtime=True, max_parallel=4)

    async def add(self, batch: cohortsync.Batch) -> cohortsync.DeliveryResult:
        return cohortsync.DeliveryResult.ok()

    async def remove(self, batch: cohortsync.Batch) -> cohortsync.DeliveryResult:
        return cohortsync.DeliveryResult.ok()

    async def open(self, context: cohortsync.RunContext) -> None:
        assert_type(context.run_id, str)


async def async_host() -> None:
    async with cohortsync.AsyncScheduler(
        MemoryStorage(), max_concurrent_runs=20, clock=testing.FakeClock()
    ) as aio:
        assert_type(aio, cohortsync.AsyncScheduler)
        assert_type(aio.scheduler, cohortsync.Scheduler)
        assert_type(aio.add_destination("apush", AsyncPushAudience()), AsyncPushAudience)
        assert_type(aio.add_destination("push", PushAudience()), PushAudience)
        assert_type(aio.add_cohort(cohort), cohortsync.Cohort)
        created = await aio.create_sync("power-users", "apush", cohortsync.SyncPolicy.hourly())
        assert_type(created, cohortsync.Sync)
        assert_type(await aio.next_run(created.id), datetime | None)
        assert_type(await aio.history(created.id, limit=5), list[cohortsync.SyncRun])
        assert_type(await aio.run_due(limit=10), list[cohortsync.SyncRun])
        await aio.run_forever(idle=5.0)
        await aio.aclose()
