"""
Opt-in pytest fixtures for testing code that uses cohortsync.

Not loaded automatically: enable it in your project's **root** ``conftest.py``::

    pytest_plugins = ["cohortsync.testing.pytest_plugin"]

Fixtures (each new per test):

* ``clock``: a :class:`~cohortsync.testing.FakeClock` at 2030-01-01 00:00 UTC.
* ``storage``: an empty :class:`~cohortsync.testing.MemoryStorage`.
* ``scheduler``: a :class:`~cohortsync.Scheduler` on that storage and clock,
  with ``seed=0`` so backoff jitter repeats from run to run.
* ``recording_destination``: a :class:`~cohortsync.testing.RecordingDestination`
  with default capabilities.

Override any of them in your own ``conftest.py`` (a ``clock`` starting
elsewhere, your own store as ``storage``); the others build on what you define.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cohortsync._scheduler import Scheduler
from cohortsync.storage._memory import MemoryStorage
from cohortsync.storage._protocol import Storage
from cohortsync.testing._clock import FakeClock
from cohortsync.testing._destinations import RecordingDestination

__all__ = ["clock", "recording_destination", "scheduler", "storage"]


@pytest.fixture
def clock() -> FakeClock:
    """
    A fake clock at 2030-01-01 00:00 UTC; move it with ``advance()`` or ``set()``.
    """
    return FakeClock()


@pytest.fixture
def storage() -> Iterator[Storage]:
    """
    An empty in-memory store, closed after the test.
    """
    store = MemoryStorage()
    yield store
    store.close()


@pytest.fixture
def scheduler(storage: Storage, clock: FakeClock) -> Scheduler:
    """
    A scheduler on the ``storage`` and ``clock`` fixtures, with seeded jitter.
    """
    return Scheduler(storage, clock=clock, seed=0)


@pytest.fixture
def recording_destination() -> RecordingDestination:
    """
    A destination that records every batch and keeps the audience per sync.
    """
    return RecordingDestination()
