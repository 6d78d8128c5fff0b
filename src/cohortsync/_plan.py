"""
Pure decisions of a run: which trigger it is, what its status is, when the
sync is due next and which slots the run coalesced, how members sharing one
destination identifier are delivered, and when repeated failures pause a sync.

Nothing here reads a clock, a store or a destination: the run executor
(:mod:`cohortsync._run`) loads state, asks these functions, sends, applies and
completes. They are tested on their own with Hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta

import attrs

from cohortsync import _schedule
from cohortsync._destination import Identifier, Member
from cohortsync._policy import Cadence, SyncPolicy
from cohortsync._sync import RunStatus, SyncRun, Trigger

__all__ = [
    "IdentifierGroups",
    "NextRun",
    "effective_trigger",
    "group_adds",
    "group_removes",
    "next_after_run",
    "repeated_failure",
    "run_status",
    "slots_between",
]


def effective_trigger(
    trigger: Trigger, cadence: Cadence, slot: datetime, started: datetime
) -> Trigger:
    """
    Why a claimed slot runs, as docs/concepts/history.md defines it: a
    scheduled or real-time slot that starts more than one period late is a
    ``catch_up``; host-requested runs (manual, one-time, teardown) keep their
    trigger whatever the delay.
    """
    if trigger not in (Trigger.SCHEDULED, Trigger.REALTIME):
        return trigger
    if cadence is Cadence.ONE_TIME:
        return Trigger.ONE_TIME
    period = cadence.period
    if period is not None and started - slot >= period:
        return Trigger.CATCH_UP
    return Trigger.REALTIME if cadence is Cadence.REALTIME else Trigger.SCHEDULED


@attrs.frozen
class NextRun:
    """
    When a recurring sync is due after a run, and how many grid slots the run
    coalesced (slots strictly between the run's own slot and the next one:
    missed before it started, or passed while it ran).
    """

    due: datetime | None
    coalesced: int = 0


def slots_between(policy: SyncPolicy, offset: int, low: datetime, high: datetime) -> int:
    """
    How many grid slots lie strictly between *low* and *high*, in constant time.
    """
    if high <= low or policy.cadence is Cadence.ONE_TIME:
        return 0
    first = _schedule.next_due(policy, low, offset, low)
    if first is None or first >= high:
        return 0
    last = _schedule.slot_of(policy, high - _TICK, offset=offset)
    if last < first:
        return 0
    if policy.timezone is None:
        period = _schedule.period_seconds(policy.cadence)
        assert period is not None  # noqa: S101 - recurring cadences have one
        return int((last - first).total_seconds()) // period + 1
    # One slot per local day: count local dates (a skipped local day has none,
    # a rare over-count by one that only affects the reported number).
    from zoneinfo import ZoneInfo  # noqa: PLC0415 - only zoned policies need it

    zone = ZoneInfo(policy.timezone)
    return (last.astimezone(zone).date() - first.astimezone(zone).date()).days + 1


_TICK = timedelta(microseconds=1)


def next_after_run(
    policy: SyncPolicy,
    offset: int,
    slot: datetime,
    started: datetime,
    finished: datetime,
) -> NextRun:
    """
    The next due slot of a recurring sync after a run of *slot* that ran from
    *started* to *finished*, on the slot grid of *policy* and *offset*.

    Slots that fell due before the run started are covered by it (one
    catch-up run, never a burst). A slot that fell due while the run was
    running is not dropped: it is due at once (the overrun delays it, and the
    slots before it are coalesced into it). Otherwise the next slot is the
    first one after the run finished. Either way the count of skipped slots
    is returned, so every slot is run or accounted for.
    """
    anchor = min(slot, started)
    last = _schedule.slot_of(policy, finished, offset=offset)
    if last > started and last > slot:
        due = last
    else:
        # From when it finished, not from its slot: a slot the store put ahead
        # of a clock that went back must not hold the sync until then.
        due_or_none = _schedule.next_due(policy, anchor, offset, finished)
        assert due_or_none is not None  # noqa: S101 - recurring policies always have one
        due = due_or_none
    return NextRun(due=due, coalesced=slots_between(policy, offset, slot, due))


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
