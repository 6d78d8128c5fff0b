"""
Kill -9 a worker that exports a changing cohort to a CSV directory, at random
points of its runs, restart it, and check what the exports tell a reader.

Each trial is a sequence of hourly slots on a real store (an SQLite file, or a
PostgreSQL schema). Before each slot the test changes the cohort; then it
starts a worker process (this file, run as a script) whose destination is a
:class:`CsvDirectoryDestination` that reports every call it gets
on its stdout. The test kills the worker with SIGKILL after a random one of
those reports (plus a random few milliseconds, to land inside the adapter's
own writes as well as between them), sometimes changes the cohort again, and
restarts it until the slot is recorded. At the end it replays the published
exports in slot order, as a downstream reader of the bucket would.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from reliability_harness import T0, Figures, FileCohort, open_store, worker_env

import cohortsync as cs
from cohortsync.destinations import CsvDirectoryDestination
from cohortsync.testing import SharedFakeClock

pytestmark = pytest.mark.reliability

SYNC = "csv-sync"
COHORT = "csv-cohort"
POPULATION = [f"m{i:04d}" for i in range(400)]
BATCH = 40
"""Members per batch: a run of ~200 members sends about eight batches."""
ONE_US = timedelta(microseconds=1)
MAX_KILLS_PER_SLOT = 3
PUBLISHING = 0.01
"""Seconds publishing an export takes here, about: kills in that window land inside it."""


class SignallingCsv(CsvDirectoryDestination):
    """
    The real CSV adapter, with small batches, telling the test what it is
    doing: a line on stdout before and after every call.
    """

    capabilities = CsvDirectoryDestination.capabilities.evolve(max_batch_size=BATCH)

    def open(self, context: cs.RunContext) -> None:
        signal_progress("open")
        super().open(context)

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        signal_progress(f"{batch.operation.value}:{batch.sequence}")
        result = super().add(batch)
        signal_progress(f"acked:{batch.sequence}")
        return result

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        signal_progress(f"remove:{batch.sequence}")
        result = super().remove(batch)
        signal_progress(f"acked:{batch.sequence}")
        return result

    def close(self, context: cs.RunContext, *, succeeded: bool) -> None:
        signal_progress("close")
        super().close(context, succeeded=succeeded)
        signal_progress("closed")


def signal_progress(event: str) -> None:
    print(f"event {event}", flush=True)


# -- the worker process ------------------------------------------------------------------


def make_scheduler(config: dict[str, Any]) -> cs.Scheduler:
    clock = SharedFakeClock(config["clock"])
    scheduler = cs.Scheduler(open_store(config["store"]), clock=clock, seed=0)
    scheduler.add_cohort(
        cs.Cohort(id=COHORT, name="CSV crash", source=FileCohort(config["cohort"]).members)
    )
    scheduler.add_destination("csv", SignallingCsv(config["directory"]))
    return scheduler


def worker(config: dict[str, Any]) -> None:
    """
    One worker start: wait (in simulated time) for a dead worker's lease to
    expire, then run what is due.
    """
    scheduler = make_scheduler(config)
    clock = scheduler.clock
    assert isinstance(clock, SharedFakeClock)
    lease = scheduler.storage.get_sync(SYNC).lease
    if lease is not None:
        clock.set(max(clock.now(), lease.expires_at + ONE_US))
    runs = scheduler.run_due()
    print(json.dumps({"runs": [run.status.value for run in runs]}), flush=True)
    scheduler.close()


# -- the test side -----------------------------------------------------------------------


def start_worker(config: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own interpreter and file
        [sys.executable, __file__, json.dumps(config)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def attempt(config: dict[str, Any], kill_after: int | str | None, delay: float) -> tuple[bool, str]:
    """
    Start a worker; SIGKILL it *delay* seconds after its *kill_after*-th
    report, or its first report of that event (never, if None or if it
    finishes first). Returns whether it was killed and its last report.
    """
    proc = start_worker(config)
    assert proc.stdout is not None
    seen = 0
    last = ""
    killed = False
    for raw in proc.stdout:
        line = raw.decode().strip()
        if not line.startswith("event "):
            continue
        seen += 1
        last = line.removeprefix("event ")
        if kill_after in (seen, last):
            if delay:
                time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
    _, stderr = proc.communicate(timeout=120)
    if killed:
        assert -signal.SIGKILL == proc.returncode, stderr.decode()
    else:
        assert 0 == proc.returncode, stderr.decode()
    return killed, last


def setup(tmp_path: Path, store_spec: str) -> tuple[dict[str, Any], cs.Scheduler]:
    config = {
        "store": store_spec,
        "clock": str(tmp_path / "clock"),
        "cohort": str(tmp_path / "cohort.json"),
        "directory": str(tmp_path / "exports"),
    }
    SharedFakeClock(config["clock"], start=T0)
    Path(config["cohort"]).write_text("[]")
    scheduler = make_scheduler(config)
    scheduler.create_sync(COHORT, "csv", cs.SyncPolicy.hourly(), sync_id=SYNC)
    return config, scheduler


def churn(rng: random.Random, members: set[str], most: int) -> set[str]:
    leaving = rng.sample(sorted(members), rng.randint(0, min(most, len(members) - 1)))
    joining = rng.sample(sorted(set(POPULATION) - members), rng.randint(0, most))
    return (members - set(leaving)) | set(joining)


def read_export(folder: Path) -> dict[str, list[str]]:
    """
    One export's files, as a reader of the bucket sees them.
    """
    export = {}
    for stem in ("entering", "exiting", "existing"):
        with (folder / f"{stem}.csv").open(newline="", encoding="utf-8") as f:
            header, *rows = csv.reader(f)
        assert ["user"] == header
        export[stem] = [row[0] for row in rows]
    return export


class Trial:
    """
    Slots of a changing cohort, each run by workers that are killed at random
    until one completes it; what the cohort was when each slot completed.
    """

    def __init__(self, tmp_path: Path, store_spec: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.config, self.scheduler = setup(tmp_path, store_spec)
        self.cohort = set(self.rng.sample(POPULATION, 200))
        self.truth: list[tuple[datetime, set[str]]] = []
        self.kills: Counter[str] = Counter()
        self.attempts = 0

    def write_cohort(self, most: int) -> None:
        self.cohort = churn(self.rng, self.cohort, most)
        Path(self.config["cohort"]).write_text(json.dumps(sorted(self.cohort)))

    def plan_kill(self, killed: int) -> tuple[int | str | None, float]:
        """
        When to kill the next worker: after a random report (about as many as a
        run makes, and a few more, so some workers finish), a moment into
        publishing, or right after publishing (before the run is recorded).
        """
        rng = self.rng
        if killed >= MAX_KILLS_PER_SLOT or rng.random() < 0.25:
            return None, 0.0
        where = rng.random()
        if where < 0.6:
            reports = 2 * (len(self.cohort) // BATCH + 4) + 4
            return rng.randint(1, reports), rng.choice([0.0, rng.uniform(0, 0.003)])
        if where < 0.85:
            return "close", rng.uniform(0, PUBLISHING)
        return "closed", rng.choice([0.0, rng.uniform(0, 0.003)])

    def run_slot(self) -> None:
        clock = self.scheduler.clock
        assert isinstance(clock, SharedFakeClock)
        due = self.scheduler.next_run(SYNC)
        assert due is not None
        clock.set(max(clock.now(), due))
        self.write_cohort(30)
        recorded = len(self.scheduler.history(SYNC))
        killed_here = 0
        while True:
            self.attempts += 1
            killed, last = attempt(self.config, *self.plan_kill(killed_here))
            if killed:
                killed_here += 1
                self.kills[last.split(":")[0]] += 1
            history = self.scheduler.history(SYNC)
            if len(history) > recorded:
                self.truth.append((history[0].slot, set(self.cohort)))
                return
            if killed and self.rng.random() < 0.3:
                self.write_cohort(5)  # the cohort changes while the slot waits for a takeover


def kill_and_replay(
    tmp_path: Path, store_spec: str, figures: Figures, *, seed: int, slots: int
) -> None:
    trial = Trial(tmp_path, store_spec, seed)
    try:
        for _ in range(slots):
            trial.run_slot()
        history = trial.scheduler.history(SYNC)
    finally:
        trial.scheduler.close()

    folders = CsvDirectoryDestination(trial.config["directory"]).run_directories(SYNC)
    stamps = [slot.strftime("%Y%m%dT%H%M%S.%fZ") for slot, _ in trial.truth]
    audience: set[str] = set()
    previous: set[str] = set()
    missed_entering = missed_exiting = wrong = twice = 0
    for folder, (_, members) in zip(folders, trial.truth, strict=False):
        export = read_export(folder)
        entering, exiting, existing = (set(export[k]) for k in ("entering", "exiting", "existing"))
        twice += sum(len(v) for v in export.values()) - len(entering | exiting | existing)
        audience = (audience - exiting) | entering
        missed_entering += len((members - previous) - entering)
        missed_exiting += len((previous - members) - exiting)
        wrong += len(audience ^ members) + len((entering | existing) ^ members)
        previous = members
    figures.record(
        f"csv_crash/{store_spec.partition(':')[0]}",
        trials=len(trial.truth),
        faults=sum(trial.kills.values()),
        duplicates=len(folders) - len(set(stamps)),
        losses=missed_entering + missed_exiting + wrong,
        attempts=trial.attempts,
        **{f"killed_after_{event}": n for event, n in trial.kills.items()},
    )

    assert slots == len(trial.truth) == len({run.slot for run in history}) == len(history)
    assert {cs.RunStatus.SUCCEEDED} == {run.status for run in history}
    assert trial.kills, "no worker was killed: the test tested nothing"
    # One export per slot, named by the slot; nothing left staged.
    assert stamps == [folder.name for folder in folders]
    assert [] == [p.name for p in folders[0].parent.iterdir() if p.name.startswith(".")]
    assert 0 == twice, "an identifier is listed twice in one export"
    assert 0 == missed_entering, "a member who entered is in no entering.csv"
    assert 0 == missed_exiting, "a member who left is in no exiting.csv"
    assert 0 == wrong, "replaying the exports does not give the cohort"


class TestKilledWhileExporting:
    """
    Workers killed at random while exporting lose no change and publish one export per slot.
    """

    def test_a_day_of_kills(self, tmp_path: Path, store_spec: str, figures: Figures) -> None:
        """Eight slots, killed at random, replay to the cohort with one export per slot."""
        kill_and_replay(tmp_path, store_spec, figures, seed=1, slots=8)

    @pytest.mark.slow
    @pytest.mark.parametrize("seed", range(2, 7))
    def test_many_kills(self, tmp_path: Path, store_spec: str, figures: Figures, seed: int) -> None:
        """Thirty slots per seed, killed at random, replay to the cohort."""
        kill_and_replay(tmp_path, store_spec, figures, seed=seed, slots=30)


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
