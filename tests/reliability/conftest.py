"""
Fixtures of the reliability tests, and the figures they publish.

Every reliability test records what it did (trials, faults injected,
duplicates, losses) through the ``figures`` fixture. At the end of the session
the totals are printed as the table that ``docs/reliability.md`` copies, and
written as JSON to ``$COHORTSYNC_RELIABILITY_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_harness import COUNTS, DSN_VARIABLE, Figures

HOW_TO_RUN = (
    "start a throwaway server with `source .ci/postgres.sh start` (stop it with "
    f"`.ci/postgres.sh stop`) or point {DSN_VARIABLE} at a database you may create schemas in"
)
REPORT_VARIABLE = "COHORTSYNC_RELIABILITY_REPORT"


_FIGURES = Figures()


@pytest.fixture(scope="session")
def figures() -> Figures:
    return _FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES.rows:
        return
    terminalreporter.section("reliability figures")
    for scenario, row in sorted(_FIGURES.rows.items()):
        extra = {k: v for k, v in row.items() if k not in COUNTS}
        terminalreporter.write_line(
            f"{scenario}: trials={row['trials']} faults={row['faults']} "
            f"duplicates={row['duplicates']} losses={row['losses']}"
            + (f" {json.dumps(extra, sort_keys=True)}" if extra else "")
        )
    target = os.environ.get(REPORT_VARIABLE)
    if target:
        Path(target).write_text(json.dumps(_FIGURES.rows, indent=2, sort_keys=True) + "\n")


# -- PostgreSQL ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """
    The DSN of a server to test against; skips without one, except in CI.
    """
    value = os.environ.get(DSN_VARIABLE)
    if not value:
        if os.environ.get("CI"):
            pytest.fail(
                f"{DSN_VARIABLE} is not set, and CI must run the PostgreSQL tests: {HOW_TO_RUN}"
            )
        pytest.skip(f"no PostgreSQL server to test against: {HOW_TO_RUN}")
    try:
        import psycopg  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        if os.environ.get("CI"):
            raise
        pytest.skip('psycopg is not installed: pip install "cohortsync[postgres]"')
    return value


@pytest.fixture
def new_schema(postgres_dsn: str) -> Iterator[Callable[[], str]]:
    """
    Hands out fresh schema names and drops those schemas afterwards.
    """
    import psycopg
    from psycopg import sql

    created: list[str] = []

    def make() -> str:
        name = f"cs_rel_{secrets.token_hex(6)}"
        created.append(name)
        return name

    yield make
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for name in created:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """
    Where a test's store lives, as ``sqlite:PATH`` or ``postgres:SCHEMA``: a
    string, so worker processes can open the same store.
    """
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'cohortsync.db'}"
    make: Callable[[], str] = request.getfixturevalue("new_schema")
    return f"postgres:{make()}"
