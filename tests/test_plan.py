"""
Property tests of the run planner, ``cohortsync._plan``: how a run reads,
what batches left in flight add, the eligibility re-check, the mass-removal
guard, what a failure means, what completion writes, the run's status, and
how members sharing a destination identifier are sent. (The time math a run
uses is tested with the rest of the schedule math in test_schedule.py.)
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import attrs
from hypothesis import given
from hypothesis import strategies as st

from cohortsync import _schedule
from cohortsync._cohort import Cohort, CohortType
from cohortsync._destination import Capabilities, Identifier, IdentifierKind, Member, Operation
from cohortsync._events import SyncFailed
from cohortsync._plan import (
    TTL_REFRESH_SHARE,
    Outcome,
    ReadFacts,
    group_adds,
    group_removes,
    plan_completion,
    plan_failure,
    plan_guard,
    plan_isolation,
    plan_read,
    plan_recheck,
    plan_recovery,
    reusable_keys,
    run_status,
)
from cohortsync._policy import Cadence, MassRemovalGuard, OnIneligible, SyncPolicy
from cohortsync._sync import RunStatus, Sync, SyncRun, SyncStatus, Trigger
from cohortsync.eligibility import DEFAULT_RULES, check_eligibility
from cohortsync.storage import PendingBatch, Tally
from strategies import capabilities, guards, offsets, plain_policy, sync_policies


class TestRunStatus:
    @given(
        guarded=st.booleans(),
        rejected=st.integers(0, 3),
        skipped=st.integers(0, 3),
        failed=st.booleans(),
        delivered_any=st.booleans(),
    )
    def test_succeeded_only_when_nobody_was_left_out(
        self, guarded: bool, rejected: int, skipped: int, failed: bool, delivered_any: bool
    ) -> None:
        status = run_status(
            guarded=guarded,
            rejected=rejected,
            skipped=skipped,
            failed=failed,
            delivered_any=delivered_any,
        )

        assert (status is RunStatus.SUCCEEDED) == (
            not failed and not guarded and not rejected and not skipped
        )
        if failed:
            assert status is (RunStatus.PARTIAL if delivered_any else RunStatus.FAILED)


KEYS = [f"k{i}" for i in range(8)]
EMAILS = ["a", "b", "c"]


def member(key: str, email: str) -> Member:
    return Member(key=key, identifier=Identifier(IdentifierKind.EMAIL, f"{email}@x.io"))


@st.composite
def audiences(draw: st.DrawFn) -> tuple[dict[str, str], set[str], set[str]]:
    """Delivered keys with their email, the keys leaving, and emails of members joining."""
    delivered = draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(EMAILS)))
    leaving = draw(st.sets(st.sampled_from(sorted(delivered)))) if delivered else set()
    joining = draw(st.sets(st.sampled_from(EMAILS)))
    return delivered, leaving, joining


class TestGroupRemoves:
    @given(audiences())
    def test_an_identifier_goes_only_when_nobody_keeps_it(
        self, audience: tuple[dict[str, str], set[str], set[str]]
    ) -> None:
        delivered, leaving, joining = audience
        holders: dict[Identifier, list[str]] = {}
        for key, email in sorted(delivered.items()):
            holders.setdefault(member(key, email).identifier, []).append(key)
        leavers = [member(k, delivered[k]) for k in sorted(leaving)]

        groups = group_removes(
            leavers,
            holders,
            is_leaving=leaving.__contains__,
            kept_by_add=lambda ident: ident.value.split("@")[0] in joining,
        )

        sent = [m.identifier for m in groups.send]
        staying = {delivered[k] for k in delivered if k not in leaving} | joining
        expected = {member("", e).identifier for e in {delivered[k] for k in leaving} - staying}
        assert len(sent) == len(set(sent))  # never twice
        assert expected == set(sent)
        riders = [k for keys in groups.riders.values() for k in keys]
        accounted = [m.key for m in groups.send] + riders + [m.key for m in groups.local]
        assert sorted(leaving) == sorted(accounted)  # each leaver exactly once


class TestGroupAdds:
    @given(
        entering=st.dictionaries(st.sampled_from(KEYS), st.sampled_from(EMAILS)),
        held=st.sets(st.sampled_from(EMAILS)),
    )
    def test_an_identifier_is_sent_once_and_never_when_held(
        self, entering: dict[str, str], held: set[str]
    ) -> None:
        joiners = [member(k, e) for k, e in sorted(entering.items())]

        groups = group_adds(joiners, lambda m: m.identifier.value.split("@")[0] in held)

        sent = [m.identifier for m in groups.send]
        assert len(sent) == len(set(sent))
        assert {member("", e).identifier for e in set(entering.values()) - held} == set(sent)
        riders = [k for keys in groups.riders.values() for k in keys]
        accounted = [m.key for m in groups.send] + riders + [m.key for m in groups.local]
        assert sorted(entering) == sorted(accounted)


# -- the planner's steps, in a run's order ---------------------------------------------

T0 = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)
instants = st.builds(lambda s: T0 + timedelta(seconds=s), st.integers(0, 10 * 86_400))


def make_sync(
    policy: SyncPolicy, *, effective: Cadence | None = None, released: bool = False
) -> Sync:
    return Sync(
        id="s1",
        cohort_id="c1",
        destination_id="d1",
        policy=policy,
        effective_cadence=effective,
        guard_released=released,
        created_at=T0,
        updated_at=T0,
    )


def failed_runs(count: int, cadence: Cadence, error_type: str, message: str) -> list[SyncRun]:
    """*count* failed runs of s1, newest first, all with the same error."""
    return [
        SyncRun(
            id=f"r{i}",
            sync_id="s1",
            generation=1,
            trigger=Trigger.SCHEDULED,
            slot=T0,
            started_at=T0,
            finished_at=T0,
            status=RunStatus.FAILED,
            cadence=cadence,
            error_type=error_type,
            error_message=message,
        )
        for i in range(count)
    ]


class TestPlanRead:
    @given(
        policy=sync_policies(),
        slot=instants,
        last=st.none() | instants,
        full_resync=st.booleans(),
        last_full=st.none() | instants,
        caps=capabilities(),
        delivered=st.integers(0, 5),
        pending=st.booleans(),
        resumed=st.booleans(),
        has_feed=st.booleans(),
        cursor=st.none() | st.just("c"),
        released=st.booleans(),
    )
    def test_reads_as_the_docs_say(  # noqa: PLR0917 - one argument per drawn fact
        self,
        policy: SyncPolicy,
        slot: datetime,
        last: datetime | None,
        full_resync: bool,
        last_full: datetime | None,
        caps: Capabilities,
        delivered: int,
        pending: bool,
        resumed: bool,
        has_feed: bool,
        cursor: str | None,
        released: bool,
    ) -> None:
        """
        Full on a resync request or a due TTL refresh; the feed only for a
        real-time sync in the same hour as its last slot with nothing to
        reconcile; staying members kept exactly for full or full-sync-only
        reads; keys of its own exactly when resuming.
        """
        sync = make_sync(policy, released=released)
        facts = ReadFacts(
            sync=sync,
            slot=slot,
            last_slot=last,
            now=slot,
            full_resync=full_resync,
            last_full_sync_at=last_full,
            capabilities=caps,
            delivered=delivered,
            pending=pending,
            resumed=resumed,
            has_feed=has_feed,
            feed_cursor=cursor,
        )

        plan = plan_read(facts)

        ttl = caps.membership_ttl
        ttl_due = ttl is not None and (
            last_full is None or slot - last_full >= ttl * TTL_REFRESH_SHARE
        )
        assert (full_resync or (ttl_due and delivered > 0)) == plan.full
        assert (None if not plan.full else "full_resync" if full_resync else "ttl_refresh") == (
            plan.reason
        )
        same_hour = last is not None and _schedule.hour_of(last) == _schedule.hour_of(slot)
        assert (
            policy.cadence is Cadence.REALTIME
            and same_hour
            and not released
            and not pending
            and has_feed
            and cursor is not None
            and not plan.full
            and not caps.full_sync_only
        ) == plan.from_feed
        assert (not plan.from_feed and (plan.full or caps.full_sync_only)) == plan.keep_existing
        assert (pending or resumed) == plan.own_keys
        assert (
            not plan.from_feed and policy.cadence is Cadence.REALTIME and has_feed
        ) == plan.take_cursor


KEY_SETS = st.sets(st.sampled_from([f"u{i}" for i in range(8)]))


class TestPlanRecovery:
    @given(in_flight=KEY_SETS, held=KEY_SETS, adds=KEY_SETS, removes=KEY_SETS, existing=KEY_SETS)
    def test_every_member_left_in_flight_is_sent_again(
        self,
        in_flight: set[str],
        held: set[str],
        adds: set[str],
        removes: set[str],
        existing: set[str],
    ) -> None:
        """
        Every member named by a batch left in flight is sent again towards
        what the cohort says now: delivered members who stay are added, the
        rest not being added are removed, and nothing is sent twice.
        """
        # A diff never adds a delivered member nor removes an undelivered one.
        adds -= held
        removes = (removes & held) - adds
        existing = (existing & held) - removes
        members = {k: Member(k, Identifier(IdentifierKind.USER_ID, k)) for k in sorted(in_flight)}
        # The mapping changed for some of the in-flight members added now.
        again = sorted(in_flight & adds)
        remapped = set(again[::2])
        current: dict[str, Identifier | None] = {
            k: Identifier(IdentifierKind.USER_ID, f"new-{k}")
            if k in remapped
            else Identifier(IdentifierKind.USER_ID, k)
            for k in again
        }

        recovery = plan_recovery(
            members,
            held,
            adds=sorted(adds),
            removes=sorted(removes),
            existing=sorted(existing),
            current=current,
        )

        final_adds = adds | set(recovery.adds)
        final_removes = removes | set(recovery.removes)
        assert in_flight <= final_adds | final_removes | existing
        assert set() == set(recovery.adds) & (adds | removes | existing)
        assert set(recovery.adds) <= held
        assert set() == set(recovery.removes) & held
        # Added now under another identifier: the one sent earlier is removed.
        assert remapped == set(recovery.removes) & adds
        assert {k: members[k].identifier for k in recovery.removes} == recovery.removes
        assert (recovery.note is None) == (not recovery.adds and not recovery.removes)


class TestReusableKeys:
    @given(
        st.lists(st.lists(st.sampled_from(["u1", "u2", "u3"]), min_size=1, unique=True), max_size=4)
    )
    def test_only_the_newest_record_of_each_member_is_reused(
        self, batches: list[list[str]]
    ) -> None:
        """A pending request is reusable only if no later record names one of its members."""
        pending = [
            PendingBatch(
                run_id="r",
                idempotency_key=f"k{i}",
                operation=Operation.ADD,
                members=tuple(Member(k, Identifier(IdentifierKind.USER_ID, k)) for k in keys),
            )
            for i, keys in enumerate(batches)
        ]

        reusable = set(reusable_keys(pending).values())

        for i, keys in enumerate(batches):
            later = {k for b in batches[i + 1 :] for k in b}
            assert (not (set(keys) & later)) == (f"k{i}" in reusable)


class TestPlanRecheck:
    @given(
        size=st.integers(0, 2_000_000),
        kind=st.sampled_from(CohortType),
        realtime_ok=st.booleans(),
        on_ineligible=st.sampled_from(OnIneligible),
        effective=st.sampled_from([None, Cadence.HOURLY]),
    )
    def test_falls_back_comes_back_or_pauses(
        self,
        size: int,
        kind: CohortType,
        realtime_ok: bool,
        on_ineligible: OnIneligible,
        effective: Cadence | None,
    ) -> None:
        """
        An eligible sync runs on its own cadence; an ineligible real-time sync
        falls back to hourly when allowed, else pauses and is not delivered;
        an event is told only when the state changes.
        """
        sync = make_sync(
            SyncPolicy(cadence=Cadence.REALTIME, on_ineligible=on_ineligible),
            effective=effective,
        )
        cohort = Cohort(id="c1", name="C", type=kind, size=size)
        caps = Capabilities(supports_realtime=realtime_ok)
        result = check_eligibility(cohort, caps, sync.policy)

        recheck = plan_recheck(
            sync, cohort, caps, identifier_kinds=None, rules=DEFAULT_RULES, at=T0
        )

        assert result == recheck.eligibility
        if result.eligible:
            assert (True, None) == (recheck.proceed, recheck.sync.effective_cadence)
            assert (effective is not None) == ("eligible_again" in recheck.notes)
        elif on_ineligible is OnIneligible.FALLBACK_HOURLY:
            assert (True, Cadence.HOURLY) == (recheck.proceed, recheck.sync.effective_cadence)
            assert "fallback_hourly" in recheck.notes
        else:
            assert (False, SyncStatus.PAUSED) == (recheck.proceed, recheck.sync.status)
            assert any(isinstance(e, SyncFailed) for e in recheck.events)
        assert (recheck.sync.effective_cadence != effective or not recheck.proceed) == bool(
            recheck.events
        )
        again = plan_recheck(
            recheck.sync, cohort, caps, identifier_kinds=None, rules=DEFAULT_RULES, at=T0
        )
        if recheck.proceed:
            assert () == again.events  # nothing changed the second time


class TestPlanGuard:
    @given(
        guard=guards(),
        send=st.booleans(),
        removals=st.booleans(),
        released=st.booleans(),
        delivered=st.integers(0, 5_000),
        removing=st.integers(0, 5_000),
        empty=st.booleans(),
    )
    def test_holds_removals_only_when_they_would_be_sent(  # noqa: PLR0917 - drawn facts
        self,
        guard: MassRemovalGuard,
        send: bool,
        removals: bool,
        released: bool,
        delivered: int,
        removing: int,
        empty: bool,
    ) -> None:
        """
        The guard trips only for removals that would be sent and that the host
        has not confirmed; a confirmation is used up by the run it lets through.
        """
        sync = make_sync(
            SyncPolicy(cadence=Cadence.HOURLY, send_removals=send, guard=guard), released=released
        )
        caps = Capabilities(supports_removals=removals)

        plan = plan_guard(
            sync,
            caps,
            delivered=delivered,
            removing=removing,
            source_empty=empty,
            run_id="r",
            at=T0,
        )

        assert (send and removals) == plan.send_removals
        trips = guard.trips(delivered, removing, empty)
        assert (send and removals and not released and trips) == plan.guarded
        assert (released and not plan.guarded) == plan.release_used
        assert plan.guarded == (plan.event is not None) == (plan.note is not None)


class TestPlanFailure:
    @given(
        heals=st.booleans(),
        authentication=st.booleans(),
        teardown=st.booleans(),
        cadence=st.sampled_from(Cadence),
        repeats=st.integers(0, 6),
        delivered_any=st.booleans(),
    )
    def test_pauses_only_what_will_not_heal(  # noqa: PLR0917 - drawn facts
        self,
        heals: bool,
        authentication: bool,
        teardown: bool,
        cadence: Cadence,
        repeats: int,
        delivered_any: bool,
    ) -> None:
        """
        An authentication failure pauses at once; any other failure pauses
        after 5 identical ones in a row unless it heals by itself or has
        bounded retries of its own (one-time, teardown).
        """
        sync = make_sync(plain_policy(cadence))
        earlier = failed_runs(repeats, cadence, "BadDataError", "boom")

        plan = plan_failure(
            sync,
            error_type="BadDataError",
            message="boom",
            heals=heals,
            authentication=authentication,
            delivered_any=delivered_any,
            teardown=teardown,
            earlier=earlier,
            pause_after=5,
            at=T0,
        )

        pauses = authentication or (
            not heals and not teardown and cadence is not Cadence.ONE_TIME and repeats >= 4
        )
        assert pauses == (SyncStatus.PAUSED is plan.sync.status)
        assert (RunStatus.PARTIAL if delivered_any else RunStatus.FAILED) == plan.status
        assert pauses == bool(plan.events)


def outcomes() -> st.SearchStrategy[Outcome]:
    @st.composite
    def build(draw: st.DrawFn) -> Outcome:
        policy = plain_policy(
            draw(st.sampled_from(Cadence)), one_time_attempts=draw(st.integers(1, 4))
        )
        sync = make_sync(policy)
        status = draw(st.sampled_from(RunStatus))
        new_sync = sync
        if draw(st.booleans()):
            new_sync = attrs.evolve(sync, status=draw(st.sampled_from(SyncStatus)))
        slot = draw(instants)
        started = slot + draw(st.timedeltas(timedelta(0), timedelta(days=2)))
        error = draw(st.none() | st.just("TransientError"))
        return Outcome(
            run_id="r1",
            sync=sync,
            new_sync=new_sync,
            offset=draw(offsets(policy)),
            attempts=draw(st.integers(0, 4)),
            slot=slot,
            generation=1,
            trigger=draw(st.sampled_from(Trigger)),
            started=started,
            finished=started + draw(st.timedeltas(timedelta(0), timedelta(hours=3))),
            status=status,
            error_type=error,
            error_message=None if error is None else "down",
            tally=Tally(added=draw(st.integers(0, 9)), removed=draw(st.integers(0, 9))),
            skipped=draw(st.integers(0, 3)),
            feed_cursor=draw(st.none() | st.just("c2")),
            full_done=draw(st.booleans()),
            guarded=draw(st.booleans()),
            pending=draw(st.sampled_from([(), ("k1",)])),
            jitter=draw(st.floats(0, 0.999)),
        )

    return build()


class TestPlanCompletion:
    @given(outcomes())
    def test_completion_tells_the_truth_and_keeps_the_grid(self, o: Outcome) -> None:
        """
        The record carries the run's counts; only an active sync is due
        again; a recurring sync's next slot is after its own; a one-time sync
        completes, or retries a bounded number of times and fails; a failed
        run keeps the feed cursor and the in-flight records for the next run.
        """
        plan = plan_completion(o)
        completion = plan.completion
        run = plan.run
        after = completion.sync or o.sync

        assert (o.tally.added, o.tally.removed, o.skipped, o.status) == (
            run.added,
            run.removed,
            run.skipped,
            run.status,
        )
        if o.new_sync.status is not SyncStatus.ACTIVE:
            assert completion.next_due is None
            assert o.new_sync == after
        if completion.next_due is not None:
            assert SyncStatus.ACTIVE is after.status
            assert completion.next_due > o.slot or completion.next_due >= o.finished
        if o.error_type is not None:
            assert (None, ()) == (completion.feed_cursor, completion.resolved)
        if completion.full_sync_done:
            assert RunStatus.SUCCEEDED is o.status
        if o.guarded or o.status is RunStatus.SKIPPED:
            assert () == completion.resolved
        one_time = o.sync.policy.cadence is Cadence.ONE_TIME
        failed = o.status is RunStatus.FAILED or (
            o.error_type is not None and o.status is RunStatus.PARTIAL
        )
        teardown_again = (
            o.trigger is Trigger.TEARDOWN and o.new_sync.status is not SyncStatus.DELETED
        )
        if o.new_sync.status is SyncStatus.ACTIVE and failed and (one_time or teardown_again):
            assert o.attempts + 1 == completion.attempts
            out_of_attempts = completion.attempts >= o.sync.policy.one_time_attempts
            assert out_of_attempts == (SyncStatus.FAILED is after.status)
            assert out_of_attempts == (completion.next_due is None)
        elif o.new_sync.status is SyncStatus.ACTIVE and one_time:
            assert (SyncStatus.COMPLETED, None) == (after.status, completion.next_due)
        elif o.new_sync.status is SyncStatus.ACTIVE:
            assert 0 == completion.attempts
            assert completion.next_due is not None
        if teardown_again:
            assert Trigger.TEARDOWN is completion.next_trigger


class TestPlanIsolation:
    @given(
        policy=sync_policies(),
        repeats=st.integers(0, 6),
        now=instants,
    )
    def test_off_the_schedule_until_its_next_slot_or_paused(
        self, policy: SyncPolicy, repeats: int, now: datetime
    ) -> None:
        """
        An isolated run is recorded as failed; the sync is due again at its
        next slot (never now), or paused once the same failure repeated.
        """
        sync = make_sync(policy)
        earlier = failed_runs(repeats, policy.cadence, "CorruptStoreError", "bad row")

        completion = plan_isolation(
            sync,
            anchor=T0,
            offset=0,
            attempts=0,
            run_id="r9",
            slot=now,
            generation=1,
            trigger=Trigger.SCHEDULED,
            error_type="CorruptStoreError",
            message="bad row",
            earlier=earlier,
            pause_after=5,
            now=now,
            retry_in=timedelta(minutes=5),
        )

        assert RunStatus.FAILED is completion.run.status
        paused = repeats >= 4
        assert paused == (completion.sync is not None)
        if paused:
            assert completion.sync is not None
            assert SyncStatus.PAUSED is completion.sync.status
            assert completion.next_due is None
        else:
            assert completion.next_due is not None
            assert completion.next_due > now
