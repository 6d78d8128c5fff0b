"""
Handing memory the process has freed back to the system.

The asynchronous scheduler runs each sync in a worker thread of its own.
glibc's allocator gives each thread that allocates an arena of its own (up
to eight per core), and an arena keeps what a run freed between the blocks
still in use: resident, and reusable only by the same thread. Ten run
threads left about 6 MB resident that way in the async benchmark, where the
synchronous scheduler, running in the host's thread, leaves its freed
memory in one arena. ``malloc_trim(0)`` hands the free pages of every
arena back (distributed's workers do the same, for the same reason).

It costs about 0.3 to 2 ms, whatever the run did, so it is done at most
once a second per process, by the run thread that finishes a run first
after that; on a C library without ``malloc_trim`` (musl, macOS, Windows)
nothing is done.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

__all__ = ["PROCESS_TRIM", "MemoryTrim", "malloc_trim"]


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # noqa: PLC0415 - only the processes that trim load ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl: no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryTrim:
    """
    Calls *trim* at most once per *every* seconds (of *monotonic*), from
    whichever thread asks first; the others go on at once.
    """

    def __init__(
        self,
        *,
        every: float = 1.0,
        trim: Callable[[], Callable[[], object] | None] = malloc_trim,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = every
        self._find = trim
        self._trim: Callable[[], object] | None = None
        self._found = False
        self._monotonic = monotonic
        self._next = float("-inf")
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        """Trim if the last trim was *every* seconds ago or more; whether it did."""
        if not self._lock.acquire(blocking=False):
            return False  # another thread is trimming now
        try:
            now = self._monotonic()
            if now < self._next:
                return False
            self._next = now + self.every
            if not self._found:
                self._trim, self._found = self._find(), True
            if self._trim is None:
                return False
            self._trim()
            return True
        finally:
            self._lock.release()


PROCESS_TRIM = MemoryTrim()
"""One per process: every arena is the process's, whichever scheduler trims."""
