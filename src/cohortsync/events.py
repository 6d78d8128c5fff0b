"""
Typed events the scheduler emits to host listeners.

A listener is any callable taking an :class:`Event`. Listeners run inline, in
the worker that emits the event; an exception in a listener is logged and
never breaks a run. Events carry ids and counts, never member keys.
"""

from cohortsync._events import (
    BatchDelivered,
    EligibilityChanged,
    Event,
    GuardTripped,
    Listener,
    RunFinished,
    RunStarted,
    SyncFailed,
)

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
