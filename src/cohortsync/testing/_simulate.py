"""
Run a scheduler over days of fake time in milliseconds.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cohortsync._clock import require_aware
from cohortsync._scheduler import Scheduler
from cohortsync._sync import SyncRun
from cohortsync.storage._base import iter_due
from cohortsync.testing._clock import FakeClock, SharedFakeClock

__all__ = ["simulate"]

_MAX_CALLS_WITHOUT_PROGRESS = 1_000
"""``run_due()`` calls at one instant before we call it a scheduler bug, not a busy minute."""


def simulate(
    scheduler: Scheduler,
    *,
    until: datetime | None = None,
    span: timedelta | None = None,
    step: timedelta = timedelta(minutes=1),
) -> list[SyncRun]:
    """
    Run *scheduler* from its clock's current time to *until* (or for *span*),
    moving its fake clock from one due instant to the next, and return every
    run in the order it happened.

    At each stop the simulation calls :meth:`~cohortsync.Scheduler.run_due`,
    then sets the clock to the earliest of: the next instant any active sync
    is due, ``now + step``, and the end. So runs start exactly when they are
    due, and nothing is simulated in between. *step* bounds each jump so that
    whatever changes the store without the scheduler knowing (a sync created
    by another process sharing the store, a lease that expires) is noticed
    within *step*. Time a run spends sleeping (retry backoff, rate limits)
    passes on the same fake clock.

    The end is inclusive: a run due exactly at *until* happens.

    Args:
        scheduler: A scheduler built with ``clock=FakeClock(...)`` (or a
            :class:`SharedFakeClock`, driven by this process only).
        until: Where to stop (aware). Give *until* or *span*, not both.
        span: How long to run, from the clock's current time.
        step: The longest jump between two ``run_due()`` calls.

    Returns:
        Every run, in the order ``run_due()`` returned them.

    Raises:
        TypeError: The scheduler's clock is not a fake clock (a real clock
            cannot be moved), or *until* is naive.
        ValueError: Both or neither of *until* and *span*; *until* before the
            clock's current time; *step* not positive.
        RuntimeError: The scheduler kept runs due without time moving (a
            next-run computation that does not move forward).
    """
    clock = scheduler.clock
    if not isinstance(clock, (FakeClock, SharedFakeClock)):
        raise TypeError(
            f"simulate() moves the scheduler's clock, so it needs a FakeClock or "
            f"SharedFakeClock; this scheduler's clock is {clock!r}. Build it with "
            "Scheduler(storage, clock=FakeClock())."
        )
    if not isinstance(step, timedelta) or step <= timedelta(0):
        raise ValueError(f"step must be a positive timedelta, not {step!r}")
    start = clock.now()
    end = _end(start, until, span)
    runs: list[SyncRun] = []
    calls_here = 0
    while True:
        ran = scheduler.run_due()
        runs.extend(ran)
        now = clock.now()
        due = _next_due(scheduler, now, end, ran_any=bool(ran))
        if due is not None and due <= now:
            # Something is due again at this very instant: run it before moving on.
            calls_here += 1
            if calls_here > _MAX_CALLS_WITHOUT_PROGRESS:
                raise RuntimeError(
                    f"the scheduler kept syncs due at {now.isoformat()} through "
                    f"{_MAX_CALLS_WITHOUT_PROGRESS} run_due() calls without time moving; "
                    "a next run is not being scheduled after the current time"
                )
            continue
        calls_here = 0
        target = min(now + step, end) if due is None else min(due, now + step, end)
        if target <= now:
            return runs
        clock.set(target)


def _end(start: datetime, until: datetime | None, span: timedelta | None) -> datetime:
    both_or_neither = "give exactly one of until= (an aware datetime) or span= (a timedelta)"
    if until is not None:
        if span is not None:
            raise ValueError(both_or_neither)
        end = require_aware(until, "until")
        if end < start:
            raise ValueError(
                f"until={end.isoformat()} is before the clock's current time {start.isoformat()}"
            )
        return end
    if span is None:
        raise ValueError(both_or_neither)
    if not isinstance(span, timedelta) or span < timedelta(0):
        raise ValueError(f"span must be a non-negative timedelta, not {span!r}")
    return start + span


def _next_due(
    scheduler: Scheduler, now: datetime, end: datetime, *, ran_any: bool
) -> datetime | None:
    """
    The earliest instant an active sync is due, if it is at or before *end*
    or now (a later one changes nothing: the simulation stops at *end*). A sync that is
    due but was not run (another worker holds its lease) is left out: only
    time can free it, and *step* bounds how long that takes to notice.

    Read from the store's due index in due order, stopping at the first
    answer: the syncs passed over are the few whose leases others hold.
    """
    for record in iter_due(scheduler.storage, max(now, end)):
        due = record.next_due
        if due is not None and (ran_any or due > now):
            return due
    return None
