"""
The benchmark scenarios of SPEC section 9, each against a baseline measured in
the same run, interleaved (see ``measure.py``). Sizes are parameters so the
test suite can run every scenario small (correctness only) and ``run.py`` can
run them at full size.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from common import START, FakeClock, Noop, Row, as_dicts, machine
from sc_async import scenario_async
from sc_members import scenario_diff, scenario_first_sync, scenario_overhead, scenario_sorted
from sc_postgres import scenario_claims, scenario_create_one
from sc_scale import scenario_scale
from sc_schedule import (
    scenario_next_run,
    scenario_next_run_schedules,
    scenario_peer,
    scenario_spread,
)
from sc_stores import expected_runs, scenario_throughput

SCENARIOS: dict[str, Callable[[], list[Row]]] = {
    "diff": scenario_diff,
    "first_sync": scenario_first_sync,
    "sorted": scenario_sorted,
    "throughput": scenario_throughput,
    "next_run": scenario_next_run,
    "next_run_schedules": scenario_next_run_schedules,
    "spread": scenario_spread,
    "peer": scenario_peer,
    "overhead": scenario_overhead,
    "claims": scenario_claims,
    "create_one": scenario_create_one,
    "scale": scenario_scale,
    "async_delivery": scenario_async,
}

__all__ = [
    "SCENARIOS",
    "START",
    "FakeClock",
    "Noop",
    "Row",
    "as_dicts",
    "expected_runs",
    "machine",
    "scenario_async",
    "scenario_claims",
    "scenario_create_one",
    "scenario_diff",
    "scenario_first_sync",
    "scenario_next_run",
    "scenario_next_run_schedules",
    "scenario_overhead",
    "scenario_peer",
    "scenario_scale",
    "scenario_sorted",
    "scenario_spread",
    "scenario_throughput",
    "timedelta",
]
