"""
The schedule benchmarks, run small: they must keep measuring the right thing.
Next-run times equal APScheduler's on every pair before anything is timed,
caches are cleared before each repeat, the spread goes through the
Scheduler on SQLite, and in the peer row every job and every sync runs
exactly once. Speed against the goals is not asserted here.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import sc_schedule
from common import Row

import cohortsync as cs
from cohortsync import _schedule

pytestmark = pytest.mark.reliability

pytest.importorskip("apscheduler")


def check_rows(rows: list[Row]) -> None:
    assert rows
    for row in rows:
        assert row.ours > 0, row
        assert row.repeats >= 3, row
        assert row.ours_range is not None
        if row.baseline is not None:
            assert row.baseline > 0, row
            assert row.ratio is not None
            assert row.ratio > 0


class TestNextRun:
    def test_every_pair_is_compared_and_timed(self) -> None:
        """Each cadence against its trigger, equal on sampled inputs of every round."""
        checked: dict[str, int] = {}
        rows = sc_schedule.scenario_next_run(n=2_000, checked=checked)
        check_rows(rows)
        assert {
            "hourly",
            "hourly (integer grid)",
            "daily UTC",
            "real-time",
            "daily Europe/Berlin",
        } == set(checked)
        # Every round: the first CHECK_SAMPLE of its 2,000 inputs clear of a whole second.
        per_pair = sc_schedule.CHECK_SAMPLE * rows[0].repeats
        assert all(count == per_pair for count in checked.values()), checked
        by_name = {row.scenario: row for row in rows}
        assert len(by_name) == 5
        assert "CronTrigger" in by_name["next run, daily Europe/Berlin (datetime API)"].note
        assert "IntervalTrigger(minutes=1)" in by_name["next run, real-time (datetime API)"].note
        assert "IntervalTrigger(days=1)" in by_name["next run, daily UTC (datetime API)"].note
        grid = by_name["next run, hourly (integer grid, next_due_ts)"]
        assert grid.goal == "report"
        assert grid.met is None

    def test_the_new_schedules_are_compared_and_timed(self) -> None:
        """every, daily(at) in New York and cron against their triggers, equal on sampled inputs."""
        checked: dict[str, int] = {}
        rows = sc_schedule.scenario_next_run_schedules(n=2_000, checked=checked)
        check_rows(rows)
        per_pair = sc_schedule.CHECK_SAMPLE * rows[0].repeats
        assert 6 == len(checked)
        assert all(count == per_pair for count in checked.values()), checked
        by_name = {row.scenario: row for row in rows}
        assert (
            "IntervalTrigger(minutes=15)" in by_name["next run, every 15 min (datetime API)"].note
        )
        cron = [row for row in rows if row.scenario.startswith("next run, cron")]
        assert 4 == len(cron)
        against_apscheduler = [row for row in cron if "CronTrigger" in row.note]
        against_croniter = [row for row in cron if row.scenario.endswith("vs croniter")]
        assert 2 == len(against_apscheduler)
        assert all(row.goal == ">= 5x APScheduler" for row in against_apscheduler)
        assert 2 == len(against_croniter)
        assert all(row.goal == "report" and row.met is None for row in against_croniter)
        assert all("croniter" in row.note for row in against_croniter)

    def test_inputs_differ_between_rounds_and_do_not_repeat(self) -> None:
        a = sc_schedule.random_instants(5_000, seed=0)
        b = sc_schedule.random_instants(5_000, seed=1)
        assert a == sc_schedule.random_instants(5_000, seed=0)
        assert not set(a) & set(b)
        assert len(set(a)) == len(a)
        assert all(x.tzinfo is not None and x.utcoffset() == timedelta(0) for x in a)
        assert len({x.microsecond for x in a}) > 1_000
        hourly = cs.SyncPolicy.hourly()
        results = {_schedule.next_due(hourly, a[0], 0, x) for x in a}
        assert len(results) > 0.99 * len(a)

    def test_a_difference_from_the_peer_fails(self) -> None:
        afters = sc_schedule.random_instants(100, seed=7)
        one = timedelta(seconds=1)
        with pytest.raises(AssertionError, match="next time after"):
            sc_schedule.check_same(lambda a: a, lambda a: a + one, afters)
        assert sc_schedule.check_same(lambda a: a, lambda a: a, afters, limit=10) == 10

    def test_prepare_clears_the_schedule_memo(self) -> None:
        for after in sc_schedule.random_instants(50, seed=3):
            _schedule._grid_instant(int(after.timestamp()))
        assert _schedule._grid_instant.cache_info().currsize > 0
        sc_schedule.clear_caches()
        assert 0 == _schedule._grid_instant.cache_info().currsize


class TestSpread:
    def test_spread_through_the_scheduler_with_its_cost(self) -> None:
        """The allocator beats the hash, and the cost of allocating is reported."""
        spread, cost = sc_schedule.scenario_spread(n=2_000)
        check_rows([spread, cost])
        assert spread.ours < spread.baseline  # type: ignore[operator]
        assert "SQLite" in spread.scenario
        assert cost.unit == "us/sync"
        assert cost.met is None


class TestPeer:
    def test_every_job_and_sync_runs_exactly_once(self) -> None:
        n = 150
        ran: dict[str, list[int]] = {}
        (row,) = sc_schedule.scenario_peer(n=n, timeout=60.0, ran=ran)
        check_rows([row])
        assert row.unit == "s"
        assert row.met is None
        assert {"cohortsync": [n] * row.repeats, "apscheduler": [n] * row.repeats} == ran
        assert [1] * n == sc_schedule.EXECUTIONS.counts
        # The ratio is "x faster": APScheduler's seconds over ours.
        assert row.baseline is not None
        assert row.ratio == pytest.approx(row.baseline / row.ours)
