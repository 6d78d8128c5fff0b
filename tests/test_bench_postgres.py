"""
The claim+complete benchmark, run tiny: both sides run every due sync exactly
once, and the raw psycopg baseline leaves the library's schema exactly as the
library does (otherwise the comparison would flatter one side). Correctness
only; speed is not asserted here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import sc_postgres

pytestmark = pytest.mark.reliability

DSN_VAR = "COHORTSYNC_TEST_POSTGRES_DSN"
NO_POSTGRES = (
    f"PostgreSQL parts need a server: set {DSN_VAR} (source .ci/postgres.sh start); "
    "the SQLite rows are checked by test_without_postgres_only_sqlite_runs"
)


def postgres_dsn() -> str:
    dsn = os.environ.get(DSN_VAR)
    if not dsn:
        pytest.skip(NO_POSTGRES)
    return dsn


def test_scenario_runs_every_side() -> None:
    """Every side, 1 and 2 workers: each repeat ran each due sync once (asserted inside)."""
    dsn = postgres_dsn()
    assert dsn
    rows = sc_postgres.scenario_claims(syncs=60, workers=(1, 2))
    for row in rows:
        assert row.ours > 0, row
        assert row.repeats >= 3, row
        if row.baseline is not None:
            assert row.baseline > 0, row
            assert row.ratio is not None, row
            assert row.ratio > 0, row
    names = [row.scenario for row in rows]
    assert sum("PostgreSQL" in n and "vs raw psycopg" in n for n in names) == 6  # 3 sides x 2
    assert sum(n.startswith("SQLite") for n in names) == 2
    assert sum("1 -> 2 workers" in n for n in names) == 3
    goals = {row.scenario: row.goal for row in rows}
    assert [g for n, g in goals.items() if "1 worker process:" in n and "PostgreSQL" in n] == [
        ">= 50 % of raw",
        ">= 50 % of raw",
        ">= 50 % of raw",
    ]
    assert sum("claim_runs(limit=16) + complete_runs" in n for n in names) == 3


def test_without_postgres_only_sqlite_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a DSN the PostgreSQL rows are left out and the SQLite rows say why."""
    monkeypatch.delenv(DSN_VAR, raising=False)
    rows = sc_postgres.scenario_claims(syncs=30, workers=(1,))
    assert len(rows) == 1
    (row,) = rows
    assert row.scenario.startswith("SQLite")
    assert row.ours > 0
    assert row.baseline is None
    assert "PostgreSQL skipped" in row.note
    assert DSN_VAR in row.note


@pytest.mark.parametrize("side", ["pg-1", "pg-16", "pg-runs"])
def test_raw_loop_leaves_the_library_state(side: str) -> None:
    """
    Two workers each side: the raw loop's runs rows (records included) and
    sync rows (schedule, lease, revision) equal the library's.
    """
    dsn = postgres_dsn()
    states: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
    for name in (side, "pg-raw"):

        def keep(where: str, name: str = name) -> None:
            states[name] = sc_postgres.table_state(where)

        rate = sc_postgres.one_repeat(name, dsn, 60, 2, inspect=keep)
        assert rate > 0
    library, raw = states[side], states["pg-raw"]
    assert len(library["runs"]) == 60
    assert len({row[0] for row in library["runs"]}) == 60  # one run per sync
    assert raw["runs"] == library["runs"]
    assert raw["syncs"] == library["syncs"]
    assert raw["progress"] == library["progress"] == []
    assert raw["pending"] == library["pending"] == []
    for row in library["syncs"]:
        assert row[4] == sc_postgres.NEXT_DUE  # next_due moved an hour on
        assert row[17:] == (None,) * 7  # lease released


def test_schemas_are_dropped() -> None:
    """No bench schema of this process is left behind."""
    import psycopg

    dsn = postgres_dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
            (f"bench_claims_{os.getpid()}_%",),
        ).fetchall()
    assert left == []


def test_create_one_counts_every_sync() -> None:
    """The create_sync row creates and counts every sync on both stores (asserted inside)."""
    postgres_dsn()
    (row,) = sc_postgres.scenario_create_one(n=40)

    assert "<= 1.5x SQLite" == row.goal
    assert row.ratio is not None


def test_create_one_without_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a server the row reports SQLite alone and says why."""
    monkeypatch.delenv(DSN_VAR, raising=False)
    (row,) = sc_postgres.scenario_create_one(n=40)

    assert "report" == row.goal
    assert "skipped" in row.note
