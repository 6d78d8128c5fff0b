"""
Typed events the scheduler emits to host listeners.

A listener is any callable taking an :class:`Event`. Listeners run inline, in
the worker that emits the event; an exception in a listener is logged and
never breaks a run. Events carry ids, counts and instants read from the
scheduler's clock, never member keys.

A run emits, in order: :class:`RunStarted`, :class:`RunPlanned` (once its
diff is known, before the first batch), one :class:`BatchDelivered` per
answered batch, then :class:`RunFinished` once its record is stored;
:class:`GuardTripped`, :class:`EligibilityChanged` and :class:`SyncFailed`
come in between when they happen. :func:`subscribe` (or
``Scheduler.add_listener(listener, events=...)``) delivers only the classes
a listener asks for.
"""

from cohortsync._events import (
    BatchDelivered,
    EligibilityChanged,
    Event,
    GuardTripped,
    Listener,
    RunFinished,
    RunPlanned,
    RunStarted,
    SyncFailed,
    subscribe,
)

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
