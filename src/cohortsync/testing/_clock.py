"""
Fake clocks: time that only moves when a test moves it.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cohortsync._clock import require_aware
from cohortsync._validators import check_bool
from cohortsync.exceptions import ConfigurationError

__all__ = ["FakeClock", "SharedFakeClock"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _as_delta(value: timedelta | float) -> timedelta:
    """
    *value* as a timedelta: seconds must be a finite number a timedelta holds.

    Raises:
        ConfigurationError: NaN, infinity, a number too large, or not a number.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError("by", value, "must be a timedelta or a number of seconds")
    if not math.isfinite(value):
        raise ConfigurationError("by", value, "must be a finite number of seconds")
    try:
        return timedelta(seconds=value)
    except OverflowError:
        raise ConfigurationError("by", value, "is more seconds than a timedelta holds") from None


def _later(now: datetime, delta: timedelta) -> datetime:
    try:
        return now + delta
    except OverflowError:
        raise ConfigurationError(
            "by", delta, f"moves the clock from {now.isoformat()} past year 9999"
        ) from None


class FakeClock:
    """
    A :class:`~cohortsync.Clock` for tests: aware UTC only, moves only when told.

    ``sleep(s)`` advances the clock by *s* instead of blocking, so code that
    waits (backoff, rate limits, ``run_forever``) runs in no real time.

    Args:
        start: The initial instant (aware). Defaults to 2030-01-01 00:00 UTC.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._lock = threading.Lock()
        self._now = (
            require_aware(start, "start") if start else datetime(2030, 1, 1, tzinfo=timezone.utc)
        )
        self.slept: list[float] = []
        """Every duration passed to :meth:`sleep`, in order."""

    def now(self) -> datetime:
        """
        The instant the clock stands at; it moves only when the test moves it.
        """
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        """
        Advance by *seconds* instead of blocking, and remember the duration in
        :attr:`slept`, so a test asserts how long the code would have waited
        (backoff, rate limits) without waiting.
        """
        self.slept.append(seconds)
        if seconds > 0:
            self.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        """
        The awaitable :meth:`sleep`: advance by *seconds* (remembered in
        :attr:`slept`), then yield to the event loop once, so other tasks
        run in between as they would during a real wait, and in the same
        order every time.
        """
        self.sleep(seconds)
        await _yield()

    def advance(self, by: timedelta | float) -> datetime:
        """
        Move forward *by* (a timedelta or seconds) and return the new instant.

        Raises:
            ConfigurationError: *by* is negative, NaN, infinite, or moves the
                clock past year 9999 (a ValueError).
        """
        delta = _as_delta(by)
        if delta < timedelta(0):
            raise ConfigurationError(
                "by", delta, "cannot advance by a negative amount; use set(..., backwards=True)"
            )
        with self._lock:
            self._now = _later(self._now, delta)
            return self._now

    def set(self, when: datetime, *, backwards: bool = False) -> datetime:
        """
        Jump to *when* (aware). Going backwards raises unless *backwards* is true,
        because real clocks rarely do and code under test should say when it
        expects them to.
        """
        when = require_aware(when, "when")
        check_bool("backwards", backwards)
        with self._lock:
            if when < self._now and not backwards:
                raise ValueError(
                    f"refusing to move the clock back from {self._now.isoformat()} to "
                    f"{when.isoformat()}; pass backwards=True to simulate a clock step back"
                )
            self._now = when
            return when

    def __repr__(self) -> str:
        return f"FakeClock({self.now().isoformat()})"


_SIZE = struct.calcsize("<q")


class SharedFakeClock:
    """
    A fake clock several processes share through a small file, for multi-process
    tests of host code: each process builds ``SharedFakeClock(path)`` on the same
    path; any of them may move time and all see it.

    Writes are atomic (write to a temporary file, then rename), so a reader
    never sees a torn value.

    Args:
        path: The shared file; made if missing.
        start: The first instant (aware), for a new file (2030-01-01 00:00
            UTC by default). A file already in use keeps its time unless
            *start* is later: a process that joins with the same *start*
            never moves the others' clock back.
    """

    def __init__(self, path: str | os.PathLike[str], start: datetime | None = None) -> None:
        self._path = Path(path)
        if start is not None:
            start = require_aware(start, "start")
        if not self._path.exists():
            self._write(start or datetime(2030, 1, 1, tzinfo=timezone.utc))
        elif start is not None and start > self.now():
            # A file already in use keeps its time: a process joining late
            # with the same start must not move every other process's clock
            # back (set(..., backwards=True) does that on purpose).
            self._write(start)

    def _write(self, when: datetime) -> None:
        micros = (when - _EPOCH) // timedelta(microseconds=1)
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(struct.pack("<q", micros))
        tmp.replace(self._path)

    def now(self) -> datetime:
        """
        The instant in the shared file: what every process on it reads now.
        """
        data = self._path.read_bytes()
        if len(data) != _SIZE:
            raise ValueError(f"{self._path} is not a SharedFakeClock file ({len(data)} bytes)")
        (micros,) = struct.unpack("<q", data)
        return _EPOCH + timedelta(microseconds=micros)

    def sleep(self, seconds: float) -> None:
        """
        Advance the shared time by *seconds* instead of blocking, so a worker
        that waits moves every process's clock, as real time would.
        """
        if seconds > 0:
            self.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        """
        The awaitable :meth:`sleep`: advance the shared time, then yield to
        the event loop once.
        """
        self.sleep(seconds)
        await _yield()

    def advance(self, by: timedelta | float) -> datetime:
        """
        Move forward *by*. Not atomic across processes: let one process drive time.
        """
        delta = _as_delta(by)
        if delta < timedelta(0):
            raise ConfigurationError("by", delta, "cannot advance by a negative amount")
        new = _later(self.now(), delta)
        self._write(new)
        return new

    def set(self, when: datetime, *, backwards: bool = False) -> datetime:
        """
        Jump every process to *when* (aware) and return it. Going backwards
        raises unless *backwards* is true, as for :meth:`FakeClock.set`.

        Raises:
            ValueError: *when* is earlier than now and *backwards* is false.
        """
        when = require_aware(when, "when")
        check_bool("backwards", backwards)
        if when < self.now() and not backwards:
            raise ValueError("refusing to move the shared clock backwards; pass backwards=True")
        self._write(when)
        return when

    def __repr__(self) -> str:
        return f"SharedFakeClock({str(self._path)!r}, now={self.now().isoformat()})"


async def _yield() -> None:
    """Let the event loop run other tasks once (what a real wait would allow)."""
    import asyncio  # noqa: PLC0415 - synchronous tests do not load it

    await asyncio.sleep(0)
