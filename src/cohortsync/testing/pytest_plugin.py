"""
pytest fixtures for testing code that uses cohortsync.

Installing cohortsync registers this module as a pytest plugin (a ``pytest11``
entry point), so the fixtures are there in every test suite of a project that
has cohortsync installed. Their names all start with ``cohortsync_``, so they
never shadow a host's own ``clock``, ``storage`` or ``scheduler`` fixtures.

Fixtures (each new per test):

* ``cohortsync_clock``: a :class:`~cohortsync.testing.FakeClock` at
  2030-01-01 00:00 UTC.
* ``cohortsync_storage``: an empty :class:`~cohortsync.testing.MemoryStorage`.
* ``cohortsync_scheduler``: a :class:`~cohortsync.Scheduler` on that storage
  and clock, with ``seed=0`` so backoff jitter repeats from run to run.
* ``cohortsync_async_scheduler``: an :class:`~cohortsync.AsyncScheduler` on
  the same storage and clock, also seeded, closed after the test. It needs no
  running loop to be built: a plain test drives it with ``asyncio.run(...)``
  (as often as it likes), an ``async def`` test (pytest-asyncio, anyio)
  awaits it.
* ``cohortsync_recording_destination``: a
  :class:`~cohortsync.testing.RecordingDestination` with default capabilities.

Override any of them in your own ``conftest.py`` (a ``cohortsync_clock``
starting elsewhere, your own store as ``cohortsync_storage``); the others
build on what you define.

Where plugin autoloading is off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), enable
it with ``-p cohortsync.testing.pytest_plugin`` or in the root
``conftest.py``::

    pytest_plugins = ["cohortsync.testing.pytest_plugin"]

The entry point is named after this module, so listing it there as well
while autoloading is on loads it once, not twice. ``-p
no:cohortsync.testing.pytest_plugin`` turns it off.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from cohortsync._scheduler import Scheduler
from cohortsync.storage._memory import MemoryStorage
from cohortsync.storage._protocol import Storage
from cohortsync.testing._clock import FakeClock
from cohortsync.testing._destinations import RecordingDestination

if TYPE_CHECKING:
    from cohortsync._async_scheduler import AsyncScheduler

__all__ = [
    "cohortsync_async_scheduler",
    "cohortsync_clock",
    "cohortsync_recording_destination",
    "cohortsync_scheduler",
    "cohortsync_storage",
]


@pytest.fixture
def cohortsync_clock() -> FakeClock:
    """
    A fake clock at 2030-01-01 00:00 UTC; move it with ``advance()`` or ``set()``.
    """
    return FakeClock()


@pytest.fixture
def cohortsync_storage() -> Iterator[Storage]:
    """
    An empty in-memory store, closed after the test.
    """
    store = MemoryStorage()
    yield store
    store.close()


@pytest.fixture
def cohortsync_scheduler(cohortsync_storage: Storage, cohortsync_clock: FakeClock) -> Scheduler:
    """
    A scheduler on the ``cohortsync_storage`` and ``cohortsync_clock``
    fixtures, with seeded jitter so a failing test fails the same way again.
    """
    return Scheduler(cohortsync_storage, clock=cohortsync_clock, seed=0)


@pytest.fixture
def cohortsync_async_scheduler(
    cohortsync_storage: Storage, cohortsync_clock: FakeClock
) -> Iterator[AsyncScheduler]:
    """
    An asynchronous scheduler on the ``cohortsync_storage`` and
    ``cohortsync_clock`` fixtures, seeded like ``cohortsync_scheduler``, and
    closed after the test so that its worker threads never outlive it.
    """
    # Imported here: hosts whose tests never ask for it do not load asyncio.
    from cohortsync._async_scheduler import AsyncScheduler  # noqa: PLC0415

    scheduler = AsyncScheduler(cohortsync_storage, clock=cohortsync_clock, seed=0)
    yield scheduler
    _close(scheduler)


def _close(scheduler: AsyncScheduler) -> None:
    """
    ``await scheduler.aclose()`` from a fixture's teardown: on a loop of its
    own in a thread of its own, which works whether or not the test's thread
    runs an event loop (pytest-asyncio, anyio).
    """
    import asyncio  # noqa: PLC0415 - see cohortsync_async_scheduler

    with ThreadPoolExecutor(1, thread_name_prefix="cohortsync-teardown") as pool:
        pool.submit(asyncio.run, scheduler.aclose()).result()


@pytest.fixture
def cohortsync_recording_destination() -> RecordingDestination:
    """
    A destination that records every batch and keeps the audience per sync.
    """
    return RecordingDestination()
