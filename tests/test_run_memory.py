"""
What a run leaves to the host's memory and to its garbage collector.

A full collection visits every entry of every list, set and dict it tracks,
and a first sync runs one every few batches (each batch's Members live long
enough to be promoted). Whatever the run holds that grows with the cohort
and is walked by the collector makes the first sync superlinear (SPEC
section 9: flat per member from 100,000 to 5,000,000). These tests hold the
engine to: nothing cohort-sized for the collector to walk while delivering,
no reference cycle keeping a finished run (and its diff) alive, and no
second set of the cohort beside the kept state in a steady run.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import cohortsync as cs
from cohortsync.storage import MemoryStorage, SQLiteStorage
from cohortsync.testing import FakeClock

_CONTAINERS = (list, tuple, set, frozenset, dict)


class _Noop(cs.Destination):
    capabilities = cs.Capabilities(name="no-op", max_batch_size=1_000)

    def __init__(self, on_add: object = None) -> None:
        self.on_add = on_add
        self.added = 0

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.added += len(batch)
        if callable(self.on_add):
            self.on_add()
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()


def _scheduler(
    storage: cs.storage.Storage,
    clock: FakeClock,
    destination: _Noop,
    source: cs.CallableSource,
    mapping: cs.IdentifierMapping | None = None,
) -> cs.Scheduler:
    scheduler = cs.Scheduler(storage, clock=clock, seed=0)
    scheduler.add_destination("noop", destination)
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=source))
    if mapping is not None:
        scheduler.add_mapping("m", mapping)
    policy = cs.SyncPolicy.hourly(guard=cs.MassRemovalGuard.disabled())
    scheduler.create_sync(
        "c", "noop", policy, sync_id="s", mapping_id=None if mapping is None else "m"
    )
    return scheduler


def _run(scheduler: cs.Scheduler, clock: FakeClock) -> cs.SyncRun:
    clock.advance(timedelta(seconds=5))
    scheduler.sync_now("s")
    (run,) = scheduler.run_due()
    assert run.status is cs.RunStatus.SUCCEEDED, run
    return run


_EMAIL = cs.IdentifierMapping([(cs.IdentifierKind.EMAIL, lambda key: f"{key}@example.com")])


@pytest.mark.parametrize("mapping", [None, _EMAIL], ids=["identity", "email"])
def test_a_first_sync_holds_nothing_cohort_sized_the_collector_walks(
    tmp_path: Path, clock: FakeClock, mapping: cs.IdentifierMapping | None
) -> None:
    """While a first sync delivers, after a full collection no tracked
    container holds more than a few batches' worth of entries (under a
    mapping that is not the identity, the identifiers answered so far are
    kept as strings)."""
    n = 30_000

    def keys() -> Iterator[str]:  # no list of the host's either
        return (f"user-{i:08d}" for i in range(n))

    before = {id(o) for o in gc.get_objects() if isinstance(o, _CONTAINERS)}
    before.add(id(before))
    largest: list[int] = []

    def census() -> None:
        gc.collect()
        sizes = [
            len(o) for o in gc.get_objects() if isinstance(o, _CONTAINERS) and id(o) not in before
        ]
        largest.append(max(sizes))

    destination = _Noop(census)
    scheduler = _scheduler(
        SQLiteStorage(tmp_path / "state.db"),
        clock,
        destination,
        cs.CallableSource(keys),
        mapping,
    )

    run = _run(scheduler, clock)

    assert (n, n) == (run.added, destination.added)
    assert 30 == len(largest)
    # The batch in flight and its record: a few thousand entries, never the cohort.
    assert max(largest) <= 5 * destination.capabilities.max_batch_size, largest


def test_a_finished_run_is_freed_at_once(clock: FakeClock) -> None:
    """A run leaves no reference cycle behind: what it held (its diff, its
    batches) goes when it returns, not at the host's next full collection."""
    members = {"now": [f"u{i}" for i in range(200)]}
    scheduler = _scheduler(
        MemoryStorage(), clock, _Noop(), cs.CallableSource(lambda: members["now"])
    )
    enabled = gc.isenabled()
    try:
        for g in range(3):
            gc.collect()
            gc.disable()
            _run(scheduler, clock)
            members["now"] = members["now"][10:] + [f"n{g}-{i}" for i in range(10)]

            assert 0 == gc.collect(), f"run {g} left cyclic garbage"
    finally:
        if enabled:
            gc.enable()


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's set sizes")
def test_a_steady_run_never_holds_two_sets_of_the_cohort(tmp_path: Path, clock: FakeClock) -> None:
    """A steady run diffs the source against the worker's copy of the
    delivered state, then builds the new state: the kept set is reduced to
    the removes (its table freed) before the new one is built. A set of the
    source built beside the kept one (growing by doubling: one and a quarter
    to one and a half sets), or a copy of the kept one to strike the source
    off, would put a whole set or more on top of the state held at the start;
    what it holds above that at its peak is the new set's growth only."""
    n = 50_000  # its set grows by four at the last resize: a quarter more at the peak
    base = [f"user-{i:08d}" for i in range(n)]
    members = {"now": base}
    scheduler = _scheduler(
        SQLiteStorage(tmp_path / "state.db"),
        clock,
        _Noop(),
        cs.CallableSource(lambda: members["now"]),
    )
    one_set = sys.getsizeof(set(base))
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()  # before the kept state is made, so freeing it counts
    try:
        _run(scheduler, clock)  # the first sync: the worker keeps its state
        for g in range(2):
            members["now"] = base[(g + 1) * 250 :] + [f"join{g}-{i}" for i in range((g + 1) * 250)]
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]

            run = _run(scheduler, clock)

            above = tracemalloc.get_traced_memory()[1] - start
            assert (g + 1) * 250 == run.added
            assert above <= 0.6 * one_set, f"run {g}: {above / one_set:.2f} sets above the start"
    finally:
        if not tracing:
            tracemalloc.stop()
