"""
The scale scenario (issue 19), run small: it builds its stores in bulk,
finds nothing due at the build instant, and reports every row. Correctness
only; speed is not asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import sc_scale

pytestmark = pytest.mark.reliability


def test_scale_runs_small() -> None:
    """Two sizes, three repeats: a row per call, the burst, RSS and each build."""
    rows = sc_scale.scenario_scale(sizes=(200, 600), repeats=3)

    sqlite = [r for r in rows if r.scenario.startswith("scale, SQLite")]
    assert len(sqlite) == len(sc_scale.FLAT) + 2 + 2
    for row in rows:
        assert row.ours > 0, row
        if row.baseline is not None:
            assert row.ratio is not None, row
            assert row.ratio > 0, row
            assert row.repeats == 3, row


def test_nothing_is_due_at_the_build_instant(tmp_path: Path) -> None:
    """The idle measurements are idle: next_slot leaves nothing due at T0."""
    where = str(tmp_path / "scale.db")
    sc_scale.build("sqlite", where, 300)
    found = sc_scale.measure_idle("sqlite", where, 300, 0)  # asserts run_due() found nothing

    assert found["upcoming_items"] > 0
    # upcoming(+1 h) is judged per sync listed: their number grows with the store.
    assert 0 < found["upcoming_syncs"] <= found["upcoming_rows"] <= 1_000
    assert found["upcoming_row"] == pytest.approx(found["upcoming"] / found["upcoming_syncs"])
    assert sc_scale.measure_burst("sqlite", where, 0)["burst_runs"] > 0
