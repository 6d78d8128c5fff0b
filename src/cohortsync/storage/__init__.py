"""
Everything cohortsync persists, and the stores that persist it.

For a host choosing a store:

* :class:`MemoryStorage`: the reference store, in memory, one process (tests).
* :class:`SQLiteStorage`: one file, several processes on one host (the
  embedded default).
* :class:`PostgresStorage`: many workers on many hosts (``cohortsync[postgres]``).

For a storage author: the :class:`Storage` protocol and its parts (required:
:class:`ScheduleStore`, :class:`DeliveryStore`, :class:`HistoryStore`;
optional: :class:`OptionalQueries`, and since 0.2 :class:`BatchedRuns`,
:class:`PagedReads` and :class:`BulkSyncWrites`), :class:`StorageBase`
(subclass it to write only the required parts), the records the protocol
takes and returns
(:class:`SyncRecord`, :class:`Lease`, :class:`Completion`,
:class:`AppliedBatch`, ...) and the rules every store applies the same way
(:func:`apply_claim`, :func:`apply_completion`, :func:`slot_bucket_of`). Check
a store with :func:`cohortsync.testing.check_storage`.

The SQL stores import on first use, so ``import cohortsync`` never loads
``sqlite3`` or psycopg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cohortsync.storage._base import StorageBase
from cohortsync.storage._memory import MemoryStorage
from cohortsync.storage._protocol import (
    SLOT_BUCKET_SECONDS,
    AppliedBatch,
    BatchedRuns,
    BulkSyncWrites,
    Claim,
    Completion,
    DeliveryStore,
    HistoryStore,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    OptionalQueries,
    PagedReads,
    PendingBatch,
    Placement,
    Progress,
    ScheduleStore,
    SlotCounts,
    Storage,
    SyncRecord,
    Tally,
)
from cohortsync.storage._rules import apply_claim, apply_completion, claim_slot, slot_bucket_of

if TYPE_CHECKING:
    from cohortsync.storage._postgres import PostgresStorage
    from cohortsync.storage._sqlite import SQLiteStorage

__all__ = [
    "SLOT_BUCKET_SECONDS",
    "AppliedBatch",
    "BatchedRuns",
    "BulkSyncWrites",
    "Claim",
    "Completion",
    "DeliveryStore",
    "HistoryStore",
    "IssueKind",
    "Lease",
    "LedgerEntry",
    "MemberIssue",
    "MemoryStorage",
    "OptionalQueries",
    "PagedReads",
    "PendingBatch",
    "Placement",
    "PostgresStorage",
    "Progress",
    "SQLiteStorage",
    "ScheduleStore",
    "SlotCounts",
    "Storage",
    "StorageBase",
    "SyncRecord",
    "Tally",
    "apply_claim",
    "apply_completion",
    "claim_slot",
    "slot_bucket_of",
]


def __getattr__(name: str) -> Any:
    # The SQL stores load on first use: most hosts need one of them, none needs both.
    if name == "SQLiteStorage":
        from cohortsync.storage._sqlite import SQLiteStorage  # noqa: PLC0415 - lazy on purpose

        return SQLiteStorage
    if name == "PostgresStorage":
        from cohortsync.storage._postgres import PostgresStorage  # noqa: PLC0415 - lazy on purpose

        return PostgresStorage
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
