"""
Plain storage records for the storage tests: one valid sync record to evolve,
and the names of the optional queries.
"""

from __future__ import annotations

from datetime import datetime, timezone

import attrs

from cohortsync._policy import SyncPolicy
from cohortsync._sync import Sync
from cohortsync.storage import SyncRecord

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)

OPTIONAL_QUERIES = (
    "next_due",
    "scheduled_after",
    "least_loaded_slot",
    "count_delivered",
    "filter_delivered",
    "identifier_holders",
    "dead_letters",
)
"""The methods of cohortsync.storage.OptionalQueries, in their order."""


def sync_record(sync_id: str = "s1", **changes: object) -> SyncRecord:
    """
    An active hourly sync due at :data:`T0`, with *changes* applied.
    """
    sync = Sync(
        id=sync_id,
        cohort_id="cohort",
        destination_id="destination",
        policy=SyncPolicy.hourly(),
        created_at=T0,
        updated_at=T0,
    )
    return attrs.evolve(SyncRecord(sync=sync, next_due=T0, anchor=T0), **changes)  # type: ignore[arg-type]
