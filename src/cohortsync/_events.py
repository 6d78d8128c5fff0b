"""
Typed events the scheduler emits to host listeners.

A listener is any callable taking an :class:`Event`. Listeners run inline, in
the worker that emits the event; an exception in a listener is logged and
never breaks a run. Events carry ids, counts and instants read from the
scheduler's clock, never member keys.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar, get_args, overload

import attrs

from cohortsync._destination import Operation
from cohortsync._logs import log_failure
from cohortsync._policy import Cadence
from cohortsync._sync import SyncRun, SyncStatus, Trigger
from cohortsync.exceptions import ConfigurationError

__all__ = [
    "BatchDelivered",
    "EligibilityChanged",
    "Event",
    "GuardTripped",
    "Listener",
    "RunFinished",
    "RunPlanned",
    "RunStarted",
    "SyncFailed",
    "subscribe",
]

log = logging.getLogger("cohortsync.run")


@attrs.frozen(kw_only=True)
class RunStarted:
    """
    A worker claimed a sync and is about to run one slot: with
    :class:`RunFinished`, what a host needs to show runs in progress.
    ``at - slot`` is how late the run started.

    Args:
        sync_id: The sync.
        run_id: The run, as its :class:`~cohortsync.SyncRun` will carry it.
        trigger: Why it runs (scheduled, real-time, manual, catch-up, ...).
        slot: The scheduled instant it runs for.
        at: When it started, on the scheduler's clock.
        destination_id: The sync's destination.
        cadence: The cadence the sync runs at now.
    """

    sync_id: str
    run_id: str
    trigger: Trigger
    slot: datetime
    at: datetime
    destination_id: str | None = None
    """The sync's destination (``None`` only in events built by hand)."""
    cadence: Cadence | None = None
    """The cadence the sync runs at now (a real-time sync that fell back runs hourly)."""


@attrs.frozen(kw_only=True)
class RunPlanned:
    """
    A run read its source and diffed it against the delivered state: what it
    is about to send, emitted once before its first batch goes out, so a
    listener can draw progress against a total.

    The figures are the plan, not the outcome: members whose identifier
    cannot be resolved are skipped, members sharing an identifier go in one
    request, and a batch refused for bad data is split, so the batches and
    members delivered (see :class:`BatchDelivered`) can differ. Runs that
    stop before sending (skipped as ineligible, a failing source) emit none.
    """

    sync_id: str
    run_id: str
    destination_id: str
    slot: datetime
    adds: int
    """Members to add."""
    removes: int
    """Members to remove (0 when the guard holds removals back, or the
    destination or policy does not take removals)."""
    resends: int
    """Members the destination holds already that a full send re-sends
    (a full resync, a membership refresh, a full-sync-only destination)."""
    batches: int
    """Requests planned: each operation's members in batches of ``batch_size``."""
    batch_size: int
    full_sync: bool
    at: datetime

    @property
    def members(self) -> int:
        """Members to send in all: ``adds + removes + resends``."""
        return self.adds + self.removes + self.resends


@attrs.frozen(kw_only=True)
class BatchDelivered:
    """
    A batch was acknowledged by the destination and recorded in the delivered
    state: progress for a long run, and the idempotency key to match against
    the destination's own logs when de-duplicating. Carries counts, never
    member keys.

    ``started_at`` is when the batch was recorded as in flight, just before
    the first attempt, so ``at - started_at`` is its latency, rate-limit waits
    and retries included. The progress fields count this run's batches and
    members so far against its :class:`RunPlanned` totals; a total grows if
    delivery outruns the plan (halves of a batch split for bad data each
    count as a batch). Every field after ``idempotency_key`` is ``None`` or
    ``0`` in events built by hand.

    Args:
        sync_id: The sync.
        run_id: The run delivering it.
        operation: Add, remove or existing (full-sync-only destinations).
        sequence: The batch's position in the run.
        size: Members in the batch.
        rejected: How many of them the destination refused.
        idempotency_key: The key the batch was sent with; a batch re-sent
            after a crash carries the same one.
        destination_id: The sync's destination.
        started_at: When the batch was recorded as in flight.
        at: When its outcome was stored.
        batches_done: This run's batches so far, this one included.
        batches_total: The batches the run expects in all.
        members_done: This run's members sent so far.
        members_total: The members the run expects to send in all.
    """

    sync_id: str
    run_id: str
    operation: Operation
    sequence: int
    size: int
    rejected: int
    idempotency_key: str
    destination_id: str | None = None
    started_at: datetime | None = None
    at: datetime | None = None
    batches_done: int = 0
    batches_total: int = 0
    members_done: int = 0
    members_total: int = 0


@attrs.frozen(kw_only=True)
class RunFinished:
    """
    A run was recorded: emitted only once its history record is stored, so a
    listener that reads the history (metrics, alerts) finds it there; ``run``
    carries its status, counts, retries, start and finish instants.

    Args:
        run: The run as history holds it.
        destination_id: The sync's destination.
    """

    run: SyncRun
    destination_id: str | None = None
    """The sync's destination (``None`` only in events built by hand)."""


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


Event = (
    RunStarted
    | RunPlanned
    | BatchDelivered
    | RunFinished
    | SyncFailed
    | EligibilityChanged
    | GuardTripped
)
Listener = Callable[[Event], None]

EVENT_TYPES: tuple[type[Event], ...] = get_args(Event)
"""Every event class, in the order of :data:`Event`."""

E1 = TypeVar("E1", bound=Event)
E2 = TypeVar("E2", bound=Event)
E3 = TypeVar("E3", bound=Event)


def _event_types(value: object) -> tuple[type[Event], ...]:
    """
    The event classes *value* names: one class or an iterable of them, each
    an event class of this module. A typo must not leave a listener silently
    receiving nothing, so anything else is refused.
    """
    items = [value] if isinstance(value, type) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ConfigurationError(
            "events", value, "must be a tuple of event classes, e.g. (RunFinished, GuardTripped)"
        )
    types: list[type[Event]] = []
    for item in items:
        if not (isinstance(item, type) and issubclass(item, EVENT_TYPES)):
            raise ConfigurationError(
                "events",
                value,
                f"{item!r} is not an event class; use classes from cohortsync.events: "
                + ", ".join(t.__name__ for t in EVENT_TYPES),
            )
        if item not in types:
            types.append(item)
    if not types:
        raise ConfigurationError(
            "events", value, "names no event class: the listener would receive nothing"
        )
    return tuple(types)


@attrs.frozen
class _Subscription:
    """A listener that receives only events of the given classes."""

    listener: Callable[[Any], None]
    events: tuple[type[Event], ...]

    def __call__(self, event: Event) -> None:
        if isinstance(event, self.events):
            self.listener(event)


@overload
def subscribe(listener: Callable[[E1], None], events: tuple[type[E1]]) -> Listener: ...
@overload
def subscribe(
    listener: Callable[[E1 | E2], None], events: tuple[type[E1], type[E2]]
) -> Listener: ...
@overload
def subscribe(
    listener: Callable[[E1 | E2 | E3], None], events: tuple[type[E1], type[E2], type[E3]]
) -> Listener: ...
@overload
def subscribe(listener: Listener, events: Iterable[type[Event]]) -> Listener: ...
def subscribe(listener: Callable[[Any], None], events: Iterable[type[Any]]) -> Listener:
    """
    A listener that calls *listener* only for events of the classes in
    *events*, the way ``Scheduler.add_listener(listener, events=...)`` does;
    use it to filter in ``Scheduler(listeners=[...])``. A listener typed for
    the events it takes (``def on_done(event: RunFinished) -> None``) type-checks.

    Args:
        listener: Called with each matching event.
        events: The event classes to receive, e.g. ``(RunFinished, GuardTripped)``.

    Raises:
        ConfigurationError: *listener* is not callable, or *events* is empty
            or names something other than an event class of this module.
    """
    check_listener("listener", listener)
    return _Subscription(listener, _event_types(events))


def check_listener(field: str, listener: object) -> None:
    """
    Refuse what is not a plain callable taking an event: a listener is
    called inline, so an ``async def`` one would return a coroutine nobody
    awaits and never run.

    Raises:
        ConfigurationError: *listener* is not callable, or is a coroutine
            function (or an object whose ``__call__`` is one).
    """
    if not callable(listener):
        raise ConfigurationError(field, listener, "must be a callable taking an event")
    inner: object = listener
    while isinstance(inner, functools.partial):
        inner = inner.func
    called = getattr(inner, "__call__", None)  # noqa: B004 - an async __call__ is what is refused
    if any(
        inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (inner, called)
    ):
        raise ConfigurationError(
            field,
            listener,
            "must be a plain function: listeners are called inline, in the thread that "
            "emits the event, so an async def listener would never run; hand the event "
            "to your loop with asyncio.run_coroutine_threadsafe or loop.call_soon_threadsafe",
        )


def emit(listeners: Sequence[Listener], event: Event) -> None:
    for listener in listeners:
        _call(listener, event)


def _call(listener: Listener, event: Event) -> None:
    # A host's listener must never break a run: log and carry on.
    try:
        listener(event)
    except Exception as e:  # noqa: BLE001 - a host's listener never breaks a run
        fields = _about(event)
        log_failure(
            log,
            "sync %s run %s slot %s: event listener %r failed on %s",
            fields.get("sync_id"),
            fields.get("run_id"),
            fields.get("slot"),
            listener,
            type(event).__name__,
            error=e,
            extra=fields,
        )


def _about(event: Event) -> dict[str, str]:
    """The ids (and slot) an event names, as log record fields."""
    destination_id = getattr(event, "destination_id", None)
    fields = {} if destination_id is None else {"destination_id": destination_id}
    if isinstance(event, RunFinished):
        run = event.run
        return {"sync_id": run.sync_id, "run_id": run.id, "slot": run.slot.isoformat(), **fields}
    fields["sync_id"] = event.sync_id
    run_id = getattr(event, "run_id", None)
    if run_id is not None:
        fields["run_id"] = run_id
    slot = getattr(event, "slot", None)
    if isinstance(slot, datetime):
        fields["slot"] = slot.isoformat()
    return fields
