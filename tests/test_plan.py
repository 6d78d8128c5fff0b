"""
Property tests of the pure run decisions in ``cohortsync._plan``: which
trigger a run is, its status, when the sync is due next and how many slots a
run coalesced, and how members sharing a destination identifier are sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from cohortsync import _schedule
from cohortsync._destination import Identifier, IdentifierKind, Member
from cohortsync._plan import group_adds, group_removes, run_status
from cohortsync._policy import Cadence, SyncPolicy
from cohortsync._schedule import effective_trigger, next_after_run, slots_between
from cohortsync._sync import RunStatus, Trigger
from strategies import aware_datetimes, schedules

RECURRING = (Cadence.HOURLY, Cadence.DAILY, Cadence.REALTIME)
LOW = datetime.fromisoformat("2000-01-01T00:00:00+00:00")
HIGH = datetime.fromisoformat("2090-01-01T00:00:00+00:00")
ANCHOR = datetime.fromisoformat("1999-01-01T00:00:00+00:00")


def grid(policy: SyncPolicy, offset: int, low: datetime, high: datetime) -> Iterator[datetime]:
    """Every grid slot strictly between *low* and *high*, by walking next_due."""
    at = _schedule.next_due(policy, ANCHOR, offset, low)
    while at is not None and at < high:
        yield at
        at = _schedule.next_due(policy, ANCHOR, offset, at)


durations = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3))


class TestEffectiveTrigger:
    @given(
        trigger=st.sampled_from(Trigger),
        cadence=st.sampled_from(Cadence),
        slot=aware_datetimes(LOW, HIGH),
        late=durations,
    )
    def test_follows_the_history_definitions(
        self, trigger: Trigger, cadence: Cadence, slot: datetime, late: timedelta
    ) -> None:
        """Late by a period or more is a catch-up; host-requested triggers never change."""
        got = effective_trigger(trigger, cadence, slot, slot + late)

        if trigger not in (Trigger.SCHEDULED, Trigger.REALTIME):
            assert trigger == got
        elif cadence is Cadence.ONE_TIME:
            assert Trigger.ONE_TIME == got
        elif cadence.period is not None and late >= cadence.period:
            assert Trigger.CATCH_UP == got
        else:
            expected = Trigger.REALTIME if cadence is Cadence.REALTIME else Trigger.SCHEDULED
            assert expected == got


class TestSlotsBetween:
    @given(
        schedule=schedules(cadences=RECURRING),
        low=aware_datetimes(LOW, HIGH),
        span=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=4)),
    )
    def test_counts_the_grid_strictly_between(
        self, schedule: tuple[SyncPolicy, int], low: datetime, span: timedelta
    ) -> None:
        policy, offset = schedule
        high = low + span
        if policy.cadence is Cadence.REALTIME and span > timedelta(hours=6):
            high = low + timedelta(hours=6)  # keep the brute force small

        assert len(list(grid(policy, offset, low, high))) == slots_between(
            policy, offset, low, high
        )


class TestNextAfterRun:
    @given(
        schedule=schedules(cadences=RECURRING),
        slot=aware_datetimes(LOW, HIGH),
        on_grid=st.booleans(),
        late=durations,
        took=st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=30)),
    )
    def test_every_slot_is_run_or_counted(
        self,
        schedule: tuple[SyncPolicy, int],
        slot: datetime,
        on_grid: bool,
        late: timedelta,
        took: timedelta,
    ) -> None:
        """
        The next due slot is on the grid and after the run's own slot; it is
        the first slot after the run finished, unless a slot fell due while
        the run ran (then that one, at once); and every grid slot skipped in
        between is counted as coalesced.
        """
        policy, offset = schedule
        if on_grid:  # a scheduled slot; otherwise a host's "now"
            slot = _schedule.slot_of(policy, slot, offset=offset)
        started = slot + late
        finished = started + took

        nxt = next_after_run(policy, offset, slot, started, finished)

        assert nxt.due is not None
        assert nxt.due > slot
        assert nxt.due == _schedule.slot_of(policy, nxt.due, offset=offset)
        passed = list(grid(policy, offset, max(slot, started), finished))
        # Slots due at or before the start are covered by this run (a catch-up).
        if finished > max(slot, started) and finished == _schedule.slot_of(
            policy, finished, offset=offset
        ):
            passed.append(finished)
        if passed:
            assert passed[-1] == nxt.due  # it fell due while the run ran: next, at once
        else:
            assert nxt.due > finished
            assert nxt.due == _schedule.next_due(policy, ANCHOR, offset, finished)
        assert slots_between(policy, offset, slot, nxt.due) == nxt.coalesced


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
