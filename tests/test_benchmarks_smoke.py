"""
The member scenarios of the benchmarks, run small: the harness must keep
working and keep measuring the right thing. Correctness only; speed is not
asserted here. The schedule, store and PostgreSQL scenarios have test files of
their own (tests/test_bench_*.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import scenarios

from cohortsync.storage import MemoryStorage

pytestmark = pytest.mark.reliability


def check_rows(rows: list[scenarios.Row]) -> None:
    assert rows
    for row in rows:
        assert row.ours > 0, row
        if row.baseline is not None:
            assert row.baseline > 0, row
            assert row.ratio is not None
            assert row.ratio > 0


class TestScenarios:
    def test_diff(self) -> None:
        """The steady-state scenario runs its sync, both baselines and the memory probe."""
        check_rows(scenarios.scenario_diff(n=20_000))

    def test_first_sync(self) -> None:
        """The first-sync scenario times ours and the insert bound, then the memory probe."""
        first, memory = scenarios.scenario_first_sync(sizes=(20_000,))
        check_rows([first])
        assert first.repeats >= 3
        # Memory at this size is near the noise of RSS pages: only its presence.
        assert memory.repeats >= 3
        assert memory.ratio is not None

    def test_sorted(self) -> None:
        """The sorted-source scenario completes its first and second runs."""
        check_rows(scenarios.scenario_sorted(n=20_000))

    def test_overhead(self) -> None:
        """The overhead scenario delivers every member."""
        check_rows(scenarios.scenario_overhead(n=5_000, batch=500))

    def test_expected_runs_counts_the_grid(self) -> None:
        """The independent run count: first run plus each slot before the end."""
        import cohortsync as cs

        storage = MemoryStorage()
        scheduler = cs.Scheduler(storage, clock=scenarios.FakeClock(scenarios.START))
        scheduler.add_destination("d", scenarios.Noop())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=list))
        scheduler.create_sync("c", "d", cs.SyncPolicy.realtime(), sync_id="rt")
        end = scenarios.START + scenarios.timedelta(hours=1)
        assert 60 == scenarios.expected_runs(storage.list_syncs(), scenarios.START, end)
