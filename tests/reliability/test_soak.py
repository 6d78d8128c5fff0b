"""
A soak: simulated days of a few hundred syncs on one SQLite file, with random
destination faults, random crashes mid-run, random restarts (new Scheduler
objects on the same store) and random cohort churn. Memory stays flat,
history retention holds, and once the faults stop every destination equals
its cohort.

The soak runs in a process of its own, so that its peak memory
(``ru_maxrss``) is its own and not that of whichever tests ran before.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from reliability_harness import (
    T0,
    DelegatingStorage,
    Figures,
    SimulatedCrash,
    run_worker,
)

import cohortsync as cs
from cohortsync.storage import AppliedBatch, Lease, SQLiteStorage
from cohortsync.testing import FakeClock, RecordingDestination

pytestmark = pytest.mark.reliability

RSS_GROWTH_KIB = 16 * 1024
"""Peak memory may grow this much between the checkpoint and the end."""


def soak(tmp_path: Path, figures: Figures, **config: Any) -> dict[str, Any]:
    config = {"mode": "soak", "store": str(tmp_path / "soak.db"), **config}
    done = run_worker(config, timeout=900)
    assert 0 == done.returncode, done.stderr.decode()[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.decode().splitlines()[-1])
    print(f"\nsoak {config['days']} days: {report}")
    injected = sum(report["injected"].values())
    figures.record(
        f"soak/{config['days']}-days",
        trials=report["runs"],
        faults=injected + report["crashes"] + report["restarts"],
        duplicates=report["duplicate_slots"],
        losses=report["lost"],
        syncs=config["hourly"] + config["daily"],
        crashes=report["crashes"],
        restarts=report["restarts"],
        rss_growth_kib=report["rss_kib"]["end"] - report["rss_kib"]["checkpoint"],
    )

    assert [] == report["mismatched"]
    assert 0 == report["duplicate_slots"]
    assert {"active": config["hourly"] + config["daily"]} == report["statuses"]
    assert report["rss_kib"]["end"] - report["rss_kib"]["checkpoint"] <= RSS_GROWTH_KIB
    # Purged at most hourly: nothing older than the retention plus an hour.
    assert report["oldest_age_hours"] <= config["retention_days"] * 24 + 1
    assert report["history_rows"] < report["runs"], "nothing was ever purged"
    assert injected > 0
    assert report["crashes"] > 0
    assert report["restarts"] > 0
    return report


class TestSoak:
    """
    Under faults, crashes and restarts, memory stays flat, retention holds and syncs converge.
    """

    def test_a_simulated_week(self, tmp_path: Path, figures: Figures) -> None:
        """200 syncs for 7 days (retention 2 days), memory measured from day 2."""
        soak(
            tmp_path,
            figures,
            seed=1,
            days=7,
            checkpoint_day=2,
            retention_days=2,
            hourly=10,
            daily=190,
            crash_probability=0.01,
            restart_probability=0.05,
        )

    @pytest.mark.slow
    def test_a_simulated_month(self, tmp_path: Path, figures: Figures) -> None:
        """300 syncs for 30 days (retention 14 days), memory measured from day 14."""
        soak(
            tmp_path,
            figures,
            seed=2,
            days=30,
            checkpoint_day=14,
            retention_days=14,
            hourly=50,
            daily=250,
            crash_probability=0.01,
            restart_probability=0.05,
        )


class CrashAfterFirstApply(DelegatingStorage):
    """
    The worker dies right after its first batch was applied, once.
    """

    crashed = False

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> Any:
        result = self.inner.apply_batch(lease, batch)
        if not self.crashed:
            self.crashed = True
            raise SimulatedCrash
        return result


class TestRetentionAfterCrashes:
    """
    History retention also covers what crashed runs left behind.
    """

    def test_batches_of_a_crashed_run_are_purged(self, tmp_path: Path) -> None:
        """After the retention period no batch row of a crashed run remains."""
        path = tmp_path / "cohortsync.db"
        clock = FakeClock(T0)
        crashing = CrashAfterFirstApply(SQLiteStorage(path))
        scheduler = cs.Scheduler(crashing.as_storage(), clock=clock, retention=timedelta(days=1))
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: ["a", "b"]))
        scheduler.add_destination("d1", RecordingDestination(cs.Capabilities(max_batch_size=1)))
        scheduler.create_sync("c1", "d1", cs.SyncPolicy.hourly(), sync_id="s1")
        with pytest.raises(SimulatedCrash):
            scheduler.run_due()
        for _ in range(72):
            clock.advance(timedelta(hours=1))
            scheduler.run_due()
        scheduler.close()

        with closing(sqlite3.connect(path)) as conn:
            (orphans,) = conn.execute(
                "SELECT count(*) FROM batches WHERE run_id NOT IN (SELECT id FROM runs)"
            ).fetchone()
        assert 0 == orphans
