"""
One scheduler with one sync ("s1": cohort "c" to destination "dest"), for
tests that need nothing more; build() takes what a test varies.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import cohortsync as cs
from cohortsync.storage import MemoryStorage, Storage
from cohortsync.testing import FakeClock, RecordingDestination


class Members:
    """A membership source the test edits; holds objects so tests can plant junk."""

    def __init__(self, keys: Iterable[object] = ()) -> None:
        self.keys: object = list(keys)

    def members(self) -> Iterable[str]:
        return cast("Iterable[str]", self.keys)


def build(
    clock: FakeClock,
    source: object,
    *,
    destination: cs.Destination | None = None,
    policy: cs.SyncPolicy | None = None,
    storage: Storage | None = None,
    mapping: cs.IdentifierMapping | None = None,
    sync_id: str = "s1",
    **options: Any,
) -> cs.Scheduler:
    scheduler = cs.Scheduler(storage or MemoryStorage(), clock=clock, seed=1, **options)
    scheduler.add_destination("dest", destination or RecordingDestination())
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=source))
    if mapping is not None:
        scheduler.add_mapping("m", mapping)
    scheduler.create_sync(
        "c",
        "dest",
        policy or cs.SyncPolicy.hourly(),
        sync_id=sync_id,
        mapping_id=None if mapping is None else "m",
    )
    return scheduler


def run_next(scheduler: cs.Scheduler, clock: FakeClock, sync_id: str = "s1") -> cs.SyncRun:
    due = scheduler.next_run(sync_id)
    assert due is not None
    if due > clock.now():
        clock.set(due)
    runs = [r for r in scheduler.run_due() if r.sync_id == sync_id]
    assert 1 == len(runs), runs
    return runs[0]
