"""
Random tokens: run ids, lease tokens and delivered-state versions.

Every run asks for two (its id and its lease's token), and ``os.urandom`` is
a system call each time: reading the operating system's randomness a few
kilobytes at a time makes a token a slice of a buffer. The tokens stay as
unpredictable as :func:`secrets.token_hex`'s, and a forked child never
hands out its parent's remaining bytes (the buffer is dropped at fork).
"""

from __future__ import annotations

import os
import threading

__all__ = ["token_hex"]

_CHUNK = 4_096
"""Bytes read from the operating system at a time."""


class _Pool:
    __slots__ = ("_buffer", "_lock", "_used")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._used = 0

    def take(self, nbytes: int) -> str:
        with self._lock:
            start = self._used
            end = start + nbytes
            if end > len(self._buffer):
                self._buffer = os.urandom(max(_CHUNK, nbytes))
                start, end = 0, nbytes
            self._used = end
            return self._buffer[start:end].hex()

    def forget(self) -> None:
        """In a forked child: the parent hands out the rest of its buffer."""
        self._lock = threading.Lock()
        self._buffer = b""
        self._used = 0


_POOL = _Pool()
if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX Python has it
    os.register_at_fork(after_in_child=_POOL.forget)


def token_hex(nbytes: int) -> str:
    """*nbytes* random bytes as hex, like :func:`secrets.token_hex`."""
    return _POOL.take(nbytes)
