"""
Kill -9 a worker process at every step of a run, then let a fresh worker
recover: nothing is lost, at most the one in-flight batch is re-sent (with
its idempotency key), and every slot has exactly one run record.

Each trial is two real processes on a real store (an SQLite file, or a
PostgreSQL schema): the first builds a Scheduler whose store kills the process
with SIGKILL at the chosen step; the second, built from scratch without
faults, waits in simulated time for the dead worker's lease to expire and
runs what is due. The destination is a remote system that outlives both: a
file every received batch is appended and fsynced to.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from reliability_harness import (
    BATCHES,
    CRASH_BATCH,
    CRASH_COHORT,
    CRASH_SYNC,
    RESENDS,
    STEPS,
    T0,
    Figures,
    RemoteAudience,
    open_store,
    read_lines,
    replay,
    resent,
    run_worker,
)

import cohortsync as cs
from cohortsync.testing import SharedFakeClock

pytestmark = pytest.mark.reliability

BATCH = RemoteAudience.capabilities.max_batch_size
MEMBERS = [f"m{i:05d}" for i in range(BATCHES * BATCH)]
JOINERS = [f"z-joined-{i:03d}" for i in range(60)]
LEAVERS = 40


def setup_trial(tmp_path: Path, store_spec: str) -> dict[str, Any]:
    """
    The files both processes share, and a sync created on the store.
    """
    config = {
        "store": store_spec,
        "clock": str(tmp_path / "clock"),
        "cohort": str(tmp_path / "cohort.json"),
        "remote": str(tmp_path / "remote.jsonl"),
    }
    Path(config["cohort"]).write_text(json.dumps(MEMBERS))
    clock = SharedFakeClock(config["clock"], start=T0)
    store = open_store(store_spec)
    scheduler = cs.Scheduler(store, clock=clock)
    scheduler.add_cohort(cs.Cohort(id=CRASH_COHORT, name="Crash", source=lambda: MEMBERS))
    scheduler.add_destination("remote", RemoteAudience(config["remote"]))
    scheduler.create_sync(CRASH_COHORT, "remote", cs.SyncPolicy.hourly(), sync_id=CRASH_SYNC)
    scheduler.close()
    return config


IN_FLIGHT = MEMBERS[(CRASH_BATCH - 1) * BATCH : CRASH_BATCH * BATCH]
"""The members of the batch in flight when a worker dies mid-send."""


def change_cohort(config: dict[str, Any], churn: str) -> list[str]:
    """
    Some members join (sorting after everyone) and some leave.

    With ``delivered``, leavers come from what was already delivered, so the
    batch that was in flight keeps its content and must be re-sent under its
    key. With ``in_flight``, some leavers were in that batch: the destination
    may hold them although the store never recorded it, and they must end up
    removed (the re-sent batch then has other content, so another key).
    """
    if churn == "none":
        return MEMBERS
    store = open_store(config["store"])
    try:
        delivered = list(store.iter_delivered(CRASH_SYNC))
    finally:
        store.close()
    leaving = set(delivered[:: max(1, len(delivered) // LEAVERS)][:LEAVERS])
    if churn == "in_flight":
        leaving.update(IN_FLIGHT[::50])
    cohort = sorted({*MEMBERS, *JOINERS} - leaving)
    Path(config["cohort"]).write_text(json.dumps(cohort))
    return cohort


def crash_and_recover(
    tmp_path: Path,
    store_spec: str,
    step: str,
    *,
    churn: str,
    figures: Figures,
    kind: str = "sync",
) -> None:
    config = setup_trial(tmp_path, store_spec)

    crashed = run_worker({**config, "mode": "crash", "step": step, "kind": kind})

    assert -signal.SIGKILL == crashed.returncode, crashed.stdout + crashed.stderr
    before = read_lines(config["remote"])
    cohort = change_cohort(config, churn)
    recovered = run_worker({**config, "mode": "recover"})
    assert 0 == recovered.returncode, recovered.stderr.decode()

    sends = read_lines(config["remote"])
    after = sends[len(before) :]
    store = open_store(store_spec)
    try:
        delivered = set(store.iter_delivered(CRASH_SYNC))
        history = store.history(CRASH_SYNC)
        record = store.get_sync(CRASH_SYNC)
    finally:
        store.close()
    audience = replay(sends).get(CRASH_SYNC, set())
    again = resent(sends)
    sent_before = {i for send in before if send["op"] == "add" for i in send["ids"]}
    resending = [s for s in after if s["op"] == "add" and sent_before.intersection(s["ids"])]
    slots = Counter(run.slot for run in history)
    figures.record(
        f"crash/{store_spec.partition(':')[0]}" + ("/async" if kind == "async" else ""),
        trials=1,
        faults=1,
        duplicates=sum(n - 1 for n in slots.values()),
        losses=len(set(cohort) ^ audience),
        resent_batches=len(resending),
    )

    assert set(cohort) == audience, "the remote audience is not the cohort"
    assert set(cohort) == delivered, "the delivered state is not what the remote holds"
    # At most the one in-flight batch is re-sent ...
    assert RESENDS.get(step, 0) >= len(resending)
    assert all(sent_before.intersection(s["ids"]) <= set(IN_FLIGHT) for s in resending)
    if churn != "in_flight":
        # ... whole, under the key of its first send.
        assert RESENDS.get(step, 0) == sum(n - 1 for n in again.values()) == len(resending)
        assert all(2 == n for n in again.values())
    # Each slot has exactly one run record, the crashed slot included.
    assert 1 == slots[T0]
    assert all(1 == n for n in slots.values())
    assert {cs.RunStatus.SUCCEEDED} == {run.status for run in history}
    assert record.lease is None


class TestCrashAtEveryStep:
    """
    A worker killed at any step of a run loses nothing and re-sends at most the in-flight batch.
    """

    @pytest.mark.parametrize("step", STEPS)
    def test_crash_then_the_cohort_changes(
        self, tmp_path: Path, store_spec: str, step: str, figures: Figures
    ) -> None:
        """Killed at the step; delivered members leave, others join; a fresh worker converges."""
        crash_and_recover(tmp_path, store_spec, step, churn="delivered", figures=figures)

    @pytest.mark.parametrize("step", STEPS)
    def test_crash_then_members_of_the_lost_batch_leave(
        self, tmp_path: Path, store_spec: str, step: str, figures: Figures
    ) -> None:
        """Killed at the step; members of the in-flight batch leave; they end up removed."""
        crash_and_recover(tmp_path, store_spec, step, churn="in_flight", figures=figures)

    @pytest.mark.slow
    @pytest.mark.parametrize("step", STEPS)
    def test_crash_then_nothing_changes(
        self, tmp_path: Path, store_spec: str, step: str, figures: Figures
    ) -> None:
        """Killed at the step; the cohort stays; a fresh worker finishes the job."""
        crash_and_recover(tmp_path, store_spec, step, churn="none", figures=figures)


class TestAsyncWorkerCrash:
    """
    An AsyncScheduler worker killed at any step of a run, with an async
    adapter, is taken over by a synchronous worker on the same store: the
    same guarantees as a synchronous worker's crash.
    """

    @pytest.mark.parametrize("step", STEPS)
    def test_crash_then_a_sync_worker_takes_over(
        self, tmp_path: Path, store_spec: str, step: str, figures: Figures
    ) -> None:
        """Killed at the step; delivered members leave, others join; a sync worker converges."""
        crash_and_recover(
            tmp_path, store_spec, step, churn="delivered", figures=figures, kind="async"
        )
