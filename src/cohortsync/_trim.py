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

A trim walks every arena's free blocks, holding each arena's lock in turn,
so its cost grows with the process's heap: 0.3 to 2 ms at 66 MB here, 9 to
15 ms at 450 MB and 32 to 44 ms at 1.3 GB (measured by an outsider, whose
event loop stalled that long: its allocations waited for the lock). What
the run threads leave is a few MB, nothing beside such a heap, so a
process holding more than :data:`RESIDENT_LIMIT` is not trimmed. Otherwise
it is trimmed at most once a second, by the run thread that finishes a
run first after that. On a C library without ``malloc_trim`` (musl, macOS,
Windows) nothing is done.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["PROCESS_TRIM", "RESIDENT_LIMIT", "MemoryTrim", "malloc_trim", "resident_bytes"]

RESIDENT_LIMIT = 128 * 1024 * 1024
"""No trim above this resident size: it would cost more than about 4 ms."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = Path("/proc/self/statm")


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), or None where it cannot be read."""
    try:
        return int(_STATM.read_bytes().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


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
    Calls the trim *trim* finds at most once per *every* seconds (of
    *monotonic*), from whichever thread asks first (the others go on at
    once), and only while *resident* says the process holds at most *limit*
    bytes.
    """

    def __init__(
        self,
        *,
        every: float = 1.0,
        limit: int = RESIDENT_LIMIT,
        trim: Callable[[], Callable[[], object] | None] = malloc_trim,
        resident: Callable[[], int | None] = resident_bytes,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = every
        self.limit = limit
        self._resident = resident
        self._find = functools.cache(trim)  # looked up once, on the first trim
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
            trim = self._find()
            if trim is None:
                return False
            size = self._resident()
            if size is None or size > self.limit:
                return False
            trim()
            return True
        finally:
            self._lock.release()

    def _after_fork(self) -> None:
        # A fork while another thread was trimming would leave the child's
        # lock held by a thread it does not have: no trim there, ever.
        self._lock = threading.Lock()


PROCESS_TRIM = MemoryTrim()
"""One per process: every arena is the process's, whichever scheduler trims."""

if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=PROCESS_TRIM._after_fork)  # noqa: SLF001
