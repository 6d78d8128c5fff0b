"""
Helpers for testing code that uses cohortsync. Imports no pytest.

* :class:`FakeClock` / :class:`SharedFakeClock`: time that moves only when told.
* :class:`MemoryStorage`: the reference store.
* :class:`RecordingDestination`: records every batch, keeps the audience.
* :class:`FaultyDestination` with :class:`Fault`: misbehaves on cue.
* :class:`AsyncRecordingDestination`, :class:`AsyncFaultyDestination`: the
  same two as :class:`~cohortsync.AsyncDestination` adapters.
* :func:`simulate`: run a scheduler over days of fake time in milliseconds.
* :func:`check_storage`: the storage contract suite, for any ``Storage``,
  with a :class:`StorageReport` of the parts the store implements.
* :func:`check_destination` with :class:`ErrorCase`: the destination
  contract suite, for any adapter of either kind.

The pytest fixtures live in ``cohortsync.testing.pytest_plugin``, which
installing cohortsync registers with pytest (a ``pytest11`` entry point);
nothing here imports it.
"""

from cohortsync.storage._memory import MemoryStorage
from cohortsync.testing._clock import FakeClock, SharedFakeClock
from cohortsync.testing._destination_contract import (
    DestinationReport,
    ErrorCase,
    check_destination,
)
from cohortsync.testing._destinations import (
    AsyncFaultyDestination,
    AsyncRecordingDestination,
    Fault,
    FaultKind,
    FaultyDestination,
    RecordedBatch,
    RecordingDestination,
)
from cohortsync.testing._simulate import simulate
from cohortsync.testing._storage_contract import STORAGE_CHECKS, StorageReport, check_storage

__all__ = [
    "STORAGE_CHECKS",
    "AsyncFaultyDestination",
    "AsyncRecordingDestination",
    "DestinationReport",
    "ErrorCase",
    "FakeClock",
    "Fault",
    "FaultKind",
    "FaultyDestination",
    "MemoryStorage",
    "RecordedBatch",
    "RecordingDestination",
    "SharedFakeClock",
    "StorageReport",
    "check_destination",
    "check_storage",
    "simulate",
]
