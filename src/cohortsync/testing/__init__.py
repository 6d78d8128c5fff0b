"""
Helpers for testing code that uses cohortsync. Imports no pytest.

* :class:`FakeClock` / :class:`SharedFakeClock`: time that moves only when told.
* :class:`MemoryStorage`: the reference store.
* :class:`RecordingDestination`: records every batch, keeps the audience.
* :class:`FaultyDestination` with :class:`Fault`: misbehaves on cue.
* :func:`check_storage`: the storage contract suite, for any ``Storage``.

The opt-in pytest plugin is ``cohortsync.testing.pytest_plugin``.
"""

from cohortsync._memory import MemoryStorage
from cohortsync.testing._clock import FakeClock, SharedFakeClock
from cohortsync.testing._destinations import (
    Fault,
    FaultKind,
    FaultyDestination,
    RecordedBatch,
    RecordingDestination,
)

__all__ = [
    "FakeClock",
    "Fault",
    "FaultKind",
    "FaultyDestination",
    "MemoryStorage",
    "RecordedBatch",
    "RecordingDestination",
    "SharedFakeClock",
]
