"""
Where time comes from: the :class:`Clock` protocol and the system clock.

Core code never reads the wall clock itself; it asks the clock it was given,
which is what makes schedules testable with a fake clock.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Protocol, runtime_checkable

from cohortsync.exceptions import ConfigurationError

__all__ = [
    "END_OF_TIME",
    "Clock",
    "SystemClock",
    "add_saturating",
    "is_system_clock",
    "require_aware",
    "sleep_async",
]

END_OF_TIME = datetime.max.replace(tzinfo=timezone.utc)
START_OF_TIME = datetime.min.replace(tzinfo=timezone.utc)


def add_saturating(when: datetime, delta: timedelta) -> datetime:
    """
    *when* + *delta*, clamped to the range a datetime can hold: instant
    arithmetic near year 1 or 9999 (a clock gone wild) must not crash a run.
    """
    try:
        return when + delta
    except OverflowError:
        return END_OF_TIME if delta > timedelta(0) else START_OF_TIME


@runtime_checkable
class Clock(Protocol):
    """
    A source of the current time.
    """

    def now(self) -> datetime:
        """
        Return the current instant as an aware UTC datetime.
        """
        ...

    def sleep(self, seconds: float) -> None:
        """
        Block for *seconds* (a fake clock advances instead of blocking).
        """
        ...


class SystemClock:
    """
    The real clock: UTC wall time and :func:`time.sleep`.
    """

    def now(self) -> datetime:
        """
        The wall clock in UTC, aware, as every instant in cohortsync is.
        """
        return datetime.now(timezone.utc)

    def sleep(self, seconds: float) -> None:
        """
        Block the calling thread for *seconds*; zero or less returns at once,
        so a wait that is already over costs nothing.
        """
        if seconds > 0:
            time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        """
        Wait *seconds* on the running event loop (:func:`asyncio.sleep`),
        cancellable like any await.
        """
        if seconds > 0:
            import asyncio  # noqa: PLC0415 - only asynchronous hosts pay for it

            await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


class UtcClock:
    """
    A host clock as the engine reads it: every ``now()`` checked aware and
    converted to UTC, so that run records, events and batch contexts agree
    whatever zone the host's clock answers in.
    """

    __slots__ = ("_clock",)

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def now(self) -> datetime:
        return require_aware(self._clock.now(), "clock.now()")

    def sleep(self, seconds: float) -> None:
        self._clock.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        await sleep_async(self._clock, seconds)

    def __repr__(self) -> str:
        return f"UtcClock({self._clock!r})"


def is_system_clock(clock: Clock) -> bool:
    """Whether *clock* (or the clock a :class:`UtcClock` reads) is the real one."""
    inner = clock._clock if isinstance(clock, UtcClock) else clock  # noqa: SLF001
    return type(inner) is SystemClock


async def sleep_async(clock: Clock, seconds: float) -> None:
    """
    Wait *seconds* on *clock* from a coroutine: its ``asleep`` when it has
    one (:class:`SystemClock` and the fake clocks do), else its blocking
    ``sleep`` in a worker thread, so a host clock written before the
    asynchronous scheduler existed never blocks the event loop.
    """
    asleep = getattr(clock, "asleep", None)
    if asleep is not None:
        await asleep(seconds)
    elif seconds > 0:
        import asyncio  # noqa: PLC0415 - see SystemClock.asleep

        await asyncio.to_thread(clock.sleep, seconds)


def require_aware(value: datetime, name: str = "datetime") -> datetime:
    """
    Return *value* converted to UTC, or raise :class:`TypeError` if it is naive.

    Naive datetimes are rejected everywhere in the public API because a naive
    value means different instants on different hosts.
    """
    if type(value) is datetime and value.tzinfo is timezone.utc:
        return value  # already aware and in UTC: the engine's own values
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    offset = value.utcoffset()
    if offset is None:
        raise TypeError(
            f"{name} must be timezone-aware (got naive {value.isoformat()}); "
            "use datetime(..., tzinfo=timezone.utc)"
        )
    if value.tzinfo is timezone.utc:
        return value
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        # datetime.max in New York, datetime.min in Tokyo: a valid local value
        # whose UTC instant is outside what a datetime can hold.
        raise ConfigurationError(
            name, value, "is outside the range of datetime once converted to UTC"
        ) from None
