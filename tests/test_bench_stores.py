"""
The scheduler-throughput benchmark, run small: it must keep measuring the
right thing. Every expected run happens once on every side, the run's SQL is
recorded and both replays execute it (the batched one with fewer
transactions, nothing else dropped) and end in the recorded run's state, and
the ceilings are faster than the library. Speed against the goals is not
asserted here.
"""

from __future__ import annotations

import sqlite3
import sys
from collections import deque
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import sc_stores

from cohortsync.storage import MemoryStorage

pytestmark = pytest.mark.reliability

N, HOURS = 200, 1.0


@pytest.fixture(scope="module")
def rows() -> list[sc_stores.Row]:
    return sc_stores.scenario_throughput(n=N, hours=HOURS)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[sc_stores.Recording, str, int]:
    d = str(tmp_path_factory.mktemp("recorded"))
    base, expected = sc_stores._base_db(d, 50, HOURS)
    return sc_stores.record(base, d, HOURS, expected), d, expected


class TestScenario:
    def test_rows(self, rows: list[sc_stores.Row]) -> None:
        """Memory, SQLite against ceiling A and against ceiling B, 3+ interleaved repeats."""
        memory, one, batched = rows
        assert memory.baseline is None
        assert "MemoryStorage" in memory.scenario
        assert one.goal == "report"
        assert batched.goal == ">= 50 % of batched ceiling"
        for row in rows:
            assert row.repeats >= 3
            assert row.ours > 0
        assert one.ours == batched.ours  # the same SQLite sample against both ceilings

    def test_every_expected_run_once(self, rows: list[sc_stores.Row]) -> None:
        """The notes state the run count, checked against the independent grid count."""
        expected = sc_stores._create_syncs(MemoryStorage(), N, HOURS)
        assert expected > N  # the first runs, then hourly and real-time slots
        for row in rows:
            assert f"{expected:,} runs per repeat, as expected" in row.note, row.note

    def test_ceilings_are_faster_than_ours(self, rows: list[sc_stores.Row]) -> None:
        """A replay slower than the library would be a wrong replay."""
        _, one, batched = rows
        for row in (one, batched):
            assert row.baseline is not None
            assert row.ratio is not None
            assert row.baseline > row.ours, row
            assert row.ratio < 1
            assert "CHECK" not in row.note


class TestRecordAndReplay:
    def test_recording(self, recorded: tuple[sc_stores.Recording, str, int]) -> None:
        """Every completion and statement of the run phase is recorded; none failed."""
        recording, _, expected = recorded
        assert recording.runs == expected
        # A run makes no reads (the claim hands it everything): the lease
        # check, the run insert, the sync update, the progress delete, and a
        # share of its claim and of its batch's BEGIN/COMMIT.
        assert 4 * expected < recording.statements < 10 * expected
        assert expected / sc_stores.CLAIM_BATCH < recording.transactions < 2 * expected
        assert "BEGIN IMMEDIATE" in recording.sql
        assert "COMMIT" in recording.sql
        assert not any("ROLLBACK" in s for s in recording.sql)
        assert any("randomblob" in s for s in recording.sql)

    def test_replay_as_recorded(self, recorded: tuple[sc_stores.Recording, str, int]) -> None:
        """Ceiling A runs every recorded statement and transaction, and ends the same."""
        recording, d, _ = recorded
        replay = sc_stores.replay(recording, d, 1)  # asserts the end state itself
        assert replay.statements == recording.statements
        assert replay.transactions == recording.transactions
        assert replay.runs == recording.runs
        assert replay.seconds > 0

    def test_replay_batched(self, recorded: tuple[sc_stores.Recording, str, int]) -> None:
        """Ceiling B drops only BEGIN/COMMIT pairs between grouped completions
        (few, now that the store commits a claim batch's completions together)."""
        recording, d, _ = recorded
        replay = sc_stores.replay(recording, d, sc_stores.CLAIM_BATCH)
        dropped = recording.transactions - replay.transactions
        assert dropped >= 0
        assert replay.statements == recording.statements - 2 * dropped

    def test_a_replay_that_differs_is_caught(
        self, recorded: tuple[sc_stores.Recording, str, int]
    ) -> None:
        """The end-state check is live: a recording with another end state fails."""
        recording, d, _ = recorded
        wrong = sc_stores.Recording(**{**vars(recording), "digest": "0" * 64})
        with pytest.raises(AssertionError, match="did not do what the recorded run did"):
            sc_stores.replay(wrong, d, 1)


def _regroup(records: list[tuple[Any, ...]], group: int) -> list[str]:
    """The SQL the replay would run for *records*, statements named by their text."""
    conn = sqlite3.connect(":memory:")
    try:
        sql = ["BEGIN IMMEDIATE", "COMMIT", "SELECT 1", "UPDATE x"]
        program = sc_stores._Program([conn, conn], sql, deque(), group)
        steps = program.feed(records) + program.finish()
        return [text for _, text, _ in steps]
    finally:
        conn.close()


def _ops(*names: str) -> list[tuple[Any, ...]]:
    codes = {"B": 0, "C": 1, "R": 2, "W": 3}
    out: list[tuple[Any, ...]] = []
    for name in names:
        if name == "[":
            out.append((sc_stores._COMPLETE,))
        elif name == "]":
            out.append((sc_stores._COMPLETED,))
        else:
            out.append((sc_stores._EXEC, 0, codes[name], ()))
    return out


class TestRegrouping:
    CLAIM = ("B", "W", "C")
    RUN = ("R", "R", "[", "B", "R", "W", "C", "]")

    def test_as_recorded(self) -> None:
        records = _ops(*self.CLAIM, *self.RUN, *self.RUN)
        assert _regroup(records, 1) == _texts(records)

    def test_consecutive_completions_share_a_transaction(self) -> None:
        """The COMMIT of a completion and the BEGIN of the next are dropped."""
        assert _regroup(_ops(*self.CLAIM, *self.RUN, *self.RUN, *self.RUN), 64) == [
            *("BEGIN IMMEDIATE", "UPDATE x", "COMMIT"),
            *("SELECT 1", "SELECT 1", "BEGIN IMMEDIATE", "SELECT 1", "UPDATE x"),
            *("SELECT 1", "SELECT 1", "SELECT 1", "UPDATE x"),
            *("SELECT 1", "SELECT 1", "SELECT 1", "UPDATE x", "COMMIT"),
        ]

    def test_a_claim_ends_the_group(self) -> None:
        """Another write transaction commits the held completion first: nothing merges."""
        records = _ops(*self.RUN, *self.CLAIM, *self.RUN)
        assert _regroup(records, 64) == _texts(records)

    def test_at_most_group_completions_per_transaction(self) -> None:
        texts = _regroup(_ops(*(self.RUN * 130)), 64)
        assert texts.count("BEGIN IMMEDIATE") == 3  # 64 + 64 + 2
        assert texts.count("COMMIT") == 3
        assert len(texts) == 130 * 6 - 2 * (130 - 3)


def _texts(records: list[tuple[Any, ...]]) -> list[str]:
    sql = ["BEGIN IMMEDIATE", "COMMIT", "SELECT 1", "UPDATE x"]
    return [sql[r[2]] for r in records if r[0] == sc_stores._EXEC]
