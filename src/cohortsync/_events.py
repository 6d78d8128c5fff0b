"""
Typed events the scheduler emits to host listeners.

A listener is any callable taking an :class:`Event`. Listeners run inline, in
the worker that emits the event; an exception in a listener is logged and
never breaks a run. Events carry ids and counts, never member keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

import attrs

from cohortsync._destination import Operation
from cohortsync._policy import Cadence
from cohortsync._sync import SyncRun, SyncStatus, Trigger

__all__ = [
    "BatchDelivered",
    "EligibilityChanged",
    "Event",
    "GuardTripped",
    "Listener",
    "RunFinished",
    "RunStarted",
    "SyncFailed",
]

log = logging.getLogger("cohortsync")


@attrs.frozen(kw_only=True)
class RunStarted:
    """
    A worker claimed a sync and is about to run one slot: with
    :class:`RunFinished`, what a host needs to show runs in progress.

    Args:
        sync_id: The sync.
        run_id: The run, as its :class:`~cohortsync.SyncRun` will carry it.
        trigger: Why it runs (scheduled, real-time, manual, catch-up, ...).
        slot: The scheduled instant it runs for.
        at: When it started, on the scheduler's clock.
    """

    sync_id: str
    run_id: str
    trigger: Trigger
    slot: datetime
    at: datetime


@attrs.frozen(kw_only=True)
class BatchDelivered:
    """
    A batch was acknowledged by the destination and recorded in the delivered
    state: progress for a long run, and the idempotency key to match against
    the destination's own logs when de-duplicating. Carries counts, never
    member keys.

    Args:
        sync_id: The sync.
        run_id: The run delivering it.
        operation: Add, remove or existing (full-sync-only destinations).
        sequence: The batch's position in the run.
        size: Members in the batch.
        rejected: How many of them the destination refused.
        idempotency_key: The key the batch was sent with; a batch re-sent
            after a crash carries the same one.
    """

    sync_id: str
    run_id: str
    operation: Operation
    sequence: int
    size: int
    rejected: int
    idempotency_key: str


@attrs.frozen(kw_only=True)
class RunFinished:
    """
    A run was recorded: emitted only once its history record is stored, so a
    listener that reads the history (metrics, alerts) finds it there.

    Args:
        run: The run as history holds it.
    """

    run: SyncRun


@attrs.frozen(kw_only=True)
class SyncFailed:
    """
    A sync left the schedule: paused (authentication, ineligible) or failed
    (one-time attempts exhausted).
    """

    sync_id: str
    status: SyncStatus
    reason: str
    at: datetime


@attrs.frozen(kw_only=True)
class EligibilityChanged:
    """
    A run found the sync's eligibility changed (e.g. a real-time cohort grew past
    the limit and the sync fell back to hourly, or came back).

    ``cadence`` is the cadence the sync runs at from now on: ``HOURLY`` after a
    fallback, the policy's own when it is eligible again or paused.
    """

    sync_id: str
    eligible: bool
    codes: tuple[str, ...]
    cadence: Cadence
    at: datetime


@attrs.frozen(kw_only=True)
class GuardTripped:
    """
    The mass-removal guard held back removals; confirm with
    :meth:`~cohortsync.Scheduler.confirm_removals`.
    """

    sync_id: str
    run_id: str
    delivered: int
    removing: int
    source_empty: bool
    at: datetime


Event = RunStarted | BatchDelivered | RunFinished | SyncFailed | EligibilityChanged | GuardTripped
Listener = Callable[[Event], None]


def emit(listeners: Sequence[Listener], event: Event) -> None:
    for listener in listeners:
        _call(listener, event)


def _call(listener: Listener, event: Event) -> None:
    # A host's listener must never break a run: log and carry on.
    try:
        listener(event)
    except Exception:
        log.exception("event listener %r failed on %s", listener, type(event).__name__)
