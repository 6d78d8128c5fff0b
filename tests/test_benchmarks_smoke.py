"""
Every benchmark scenario, run small: the harness must keep working and keep
measuring the right thing. Correctness only; speed is not asserted here.
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

    def test_sorted(self) -> None:
        """The sorted-source scenario completes its first and second runs."""
        check_rows(scenarios.scenario_sorted(n=20_000))

    def test_throughput(self) -> None:
        """The throughput scenario runs every expected slot exactly once."""
        check_rows(scenarios.scenario_throughput(n=200, hours=1.0))

    def test_next_run_agrees_with_apscheduler(self) -> None:
        """Our next-run times equal APScheduler's on the same inputs."""
        pytest.importorskip("apscheduler")
        check_rows(scenarios.scenario_next_run(n=2_000))

    def test_spread(self) -> None:
        """The allocator beats the hash on spread even for a few syncs."""
        (row,) = scenarios.scenario_spread(n=5_000)
        assert row.ours < row.baseline  # type: ignore[operator]

    def test_overhead(self) -> None:
        """The overhead scenario delivers every member."""
        check_rows(scenarios.scenario_overhead(n=5_000, batch=500))

    def test_claims(self) -> None:
        """Several claim workers run every due sync exactly once."""
        check_rows(scenarios.scenario_claims(syncs=60, workers=(1, 2)))

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
