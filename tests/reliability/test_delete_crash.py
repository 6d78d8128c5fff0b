"""
Delete a sync (``OnDelete.REMOVE_DELIVERED``) while a worker process is
delivering it, or after a worker was killed with SIGKILL mid-run, and check
that the remote system ends up holding nothing of that sync.

Each trial is real processes on a real store (an SQLite file, or a PostgreSQL
schema). A worker (this file, run as a script) runs the sync's first run,
250 members in five batches, against the harness's remote system, a file
every received batch is appended and fsynced to, which outlives every
process. The test process is the second process: a Scheduler of its own on
the same store calls ``delete_sync`` while the worker is inside a batch's
``add`` (before or after the remote recorded it), or after the worker was
killed at one step of its run (the steps of ``test_crash.py``). Then the
worker finishes, or is killed and a fresh worker takes over once its lease
expired; in a third scenario the worker running the teardown itself is
killed inside one of its removals. At the end the remote audience of the
sync must be empty (what the killed attempts sent included), the sync
``deleted``, its history must hold one teardown run that removed what was
there, and no slot two run records.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from reliability_harness import (
    BATCHES,
    CRASH_BATCH,
    CRASH_LEASE,
    CRASH_REMOTE_STEP,
    ONE_US,
    STEPS,
    T0,
    CrashingStorage,
    Figures,
    FileCohort,
    RemoteAudience,
    open_store,
    read_lines,
    replay,
    resent,
    worker_env,
)

import cohortsync as cs
from cohortsync.testing import SharedFakeClock

pytestmark = pytest.mark.reliability

SYNC = "delete-sync"
COHORT = "delete-cohort"
BATCH = 50
"""Members per batch: the first run sends five batches (the steps of test_crash.py)."""
MEMBERS = [f"m{i:04d}" for i in range(BATCHES * BATCH)]
IN_FLIGHT = MEMBERS[(CRASH_BATCH - 1) * BATCH : CRASH_BATCH * BATCH]
"""The members of the batch in flight when a worker dies mid-send at ``acked``/``before_apply``."""
PAUSE_TIMEOUT = 60.0
FOLDED = re.compile(r"includes \+(?P<added>\d+) -(?P<removed>\d+) delivered by an interrupted")


# -- the worker process ------------------------------------------------------------------


class PausingRemote(RemoteAudience):
    """
    The harness's remote system with small batches, which can stop inside
    one ``add``: before recording it (``sent``: the request is on its way) or
    after (``received``: the remote holds the batch, the worker has no
    answer yet). It then tells the test and waits for the go file.
    """

    capabilities = RemoteAudience.capabilities.evolve(max_batch_size=BATCH)

    def __init__(
        self,
        path: str,
        *,
        pause_at: int | None,
        pause_op: str,
        where: str,
        go: str,
        **options: Any,
    ) -> None:
        super().__init__(path, **options)
        self.pause_at = pause_at
        self.pause_op = pause_op
        self.where = where
        self.go = Path(go)
        self.seen: Counter[str] = Counter()

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self._call(batch, super().add)

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self._call(batch, super().remove)

    def _call(
        self, batch: cs.Batch, send: Callable[[cs.Batch], cs.DeliveryResult]
    ) -> cs.DeliveryResult:
        # Full-membership adds (EXISTING) never happen here: count by the call.
        op = "remove" if batch.operation is cs.Operation.REMOVE else "add"
        self.seen[op] += 1
        pausing = op == self.pause_op and self.seen[op] == self.pause_at
        if pausing and self.where == "sent":
            self._pause(op)
        result = send(batch)
        if pausing and self.where == "received":
            self._pause(op)
        return result

    def _pause(self, op: str) -> None:
        print(f"event paused:{op}:{self.seen[op]}:{self.where}", flush=True)
        deadline = time.monotonic() + PAUSE_TIMEOUT
        while not self.go.exists():
            if time.monotonic() > deadline:
                raise SystemExit("the test never said go")
            time.sleep(0.002)


def make_scheduler(config: dict[str, Any], *, step: str | None = None) -> cs.Scheduler:
    """
    A scheduler on the trial's store, shared clock and remote system; with
    *step*, its store kills the process there (see ``CrashingStorage``).
    """
    clock = SharedFakeClock(config["clock"])
    store = open_store(config["store"])
    storage = store if step is None else CrashingStorage(store, step).as_storage()
    scheduler = cs.Scheduler(storage, clock=clock, lease_for=CRASH_LEASE, seed=0)
    scheduler.add_cohort(cs.Cohort(id=COHORT, name="Delete", source=FileCohort(config["cohort"])))
    scheduler.add_destination(
        "remote",
        PausingRemote(
            config["remote"],
            pause_at=config.get("pause_at"),
            pause_op=config.get("pause_op", "add"),
            where=config.get("where", "received"),
            go=config["go"],
            clock=clock,
            clock_step=CRASH_REMOTE_STEP,
            crash_at=CRASH_BATCH if step == "acked" else None,
            latency=tuple(config.get("latency", (0.0, 0.0))),
            seed=os.getpid(),
        ),
    )
    return scheduler


def run_what_is_due(scheduler: cs.Scheduler, *, rounds: int = 4) -> list[str]:
    """
    Wait (in simulated time) for a dead worker's lease to expire, then run
    what is due, the teardown included, until nothing is.
    """
    clock = scheduler.clock
    assert isinstance(clock, SharedFakeClock)
    statuses: list[str] = []
    for _ in range(rounds):
        record = scheduler.storage.get_sync(SYNC)
        if record.sync.status is not cs.SyncStatus.ACTIVE or record.next_due is None:
            break
        if record.lease is not None:
            clock.set(max(clock.now(), record.lease.expires_at + ONE_US))
        if record.next_due > clock.now():
            break
        runs = scheduler.run_due()
        if not runs:
            break
        statuses += [f"{run.trigger.value}:{run.status.value}" for run in runs]
    return statuses


def worker(config: dict[str, Any]) -> None:
    """
    ``crash``: run what is due with a store that kills the process at a step.
    ``once``: run what is due once (the first run), pausing where told.
    ``recover``: run everything that is due, after any dead worker's lease.
    """
    mode = config["mode"]
    scheduler = make_scheduler(config, step=config.get("step") if mode == "crash" else None)
    if mode == "recover":
        statuses = run_what_is_due(scheduler)
    else:
        statuses = [f"{r.trigger.value}:{r.status.value}" for r in scheduler.run_due()]
    print(json.dumps({"runs": statuses}), flush=True)
    scheduler.close()


# -- the test side -----------------------------------------------------------------------


def start_worker(config: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own interpreter and file
        [sys.executable, __file__, json.dumps(config)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes], *, killed: bool) -> str:
    stdout, stderr = proc.communicate(timeout=120)
    expected = -signal.SIGKILL if killed else 0
    assert expected == proc.returncode, (stdout + stderr).decode()
    return stdout.decode()


def run_worker(config: dict[str, Any], *, killed: bool = False) -> str:
    return finish(start_worker(config), killed=killed)


def wait_for_pause(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode().strip()
        if line.startswith("event paused:"):
            return line.removeprefix("event ")
    _, stderr = proc.communicate(timeout=120)
    pytest.fail(f"the worker never paused: {stderr.decode()}")


def setup(tmp_path: Path, store_spec: str) -> dict[str, Any]:
    """
    The files the processes share, and the sync (removing what it delivered
    when deleted) created on the store, due at T0.
    """
    config = {
        "store": store_spec,
        "clock": str(tmp_path / "clock"),
        "cohort": str(tmp_path / "cohort.json"),
        "remote": str(tmp_path / "remote.jsonl"),
        "go": str(tmp_path / "go"),
    }
    Path(config["cohort"]).write_text(json.dumps(MEMBERS))
    SharedFakeClock(config["clock"], start=T0)
    scheduler = make_scheduler(config)
    try:
        policy = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)
        scheduler.create_sync(COHORT, "remote", policy, sync_id=SYNC)
    finally:
        scheduler.close()
    return config


def delete(config: dict[str, Any], *, rival: bool = True) -> None:
    """
    The second process deletes the sync. With *rival*, while a (live or
    dead) worker's unexpired lease holds the sync, its own scheduler must
    not start the teardown.
    """
    scheduler = make_scheduler(config)
    try:
        sync = scheduler.delete_sync(SYNC)
        assert cs.SyncStatus.ACTIVE is sync.status  # deleting: the teardown is still to run
        record = scheduler.storage.get_sync(SYNC)
        lease = record.lease
        if rival and lease is not None and lease.expires_at >= scheduler.clock.now():
            assert [] == scheduler.run_due(), "a teardown started while a run held the lease"
    finally:
        scheduler.close()


def recover(config: dict[str, Any]) -> None:
    """
    A fresh worker (a new Scheduler and store in the test process; the dead
    one is gone) runs what is due after any dead worker's lease expired: the
    rest of the first run if it is still owed, and the teardown.
    """
    scheduler = make_scheduler(config)
    try:
        run_what_is_due(scheduler)
    finally:
        scheduler.close()


def check_teardown(
    config: dict[str, Any],
    figures: Figures,
    scenario: str,
    *,
    faults: int,
    in_flight: list[str] | None = None,
    first_run_recorded: bool | None = None,
    **extra: int,
) -> None:
    """
    The remote holds nothing of the sync, the sync is deleted, one teardown
    run removed what was there, and each slot has one run record.
    """
    sends = read_lines(config["remote"])
    store = open_store(config["store"])
    try:
        record = store.get_sync(SYNC)
        history = store.history(SYNC)
        delivered = set(store.iter_delivered(SYNC))
        pending = store.pending_batches(SYNC)
    finally:
        store.close()
    audience = replay(sends).get(SYNC, set())
    slots = Counter(run.slot for run in history)
    teardowns = [run for run in history if run.trigger is cs.Trigger.TEARDOWN]
    figures.record(
        f"{scenario}/{config['store'].partition(':')[0]}",
        trials=1,
        faults=faults,
        duplicates=sum(n - 1 for n in slots.values()),
        losses=len(audience),
        resent_batches=sum(n - 1 for n in resent(sends).values()),
        **extra,
    )

    assert set() == audience, f"{len(audience)} member(s) left at the remote after the teardown"
    assert cs.SyncStatus.DELETED is record.sync.status, record.sync.status_reason
    assert record.lease is None
    assert set() == delivered
    assert [] == pending
    assert all(1 == n for n in slots.values()), "a slot has two run records"
    assert 1 == len(teardowns), [(r.trigger, r.status) for r in history]
    (teardown,) = teardowns
    assert cs.RunStatus.SUCCEEDED is teardown.status, teardown.error_message
    assert history[0] == teardown, "the teardown is not the last run"
    # What the teardown removed (with any killed attempt of it): what the
    # remote held when the first removal went out, at least (an in-flight add
    # the remote never got is removed too: the store cannot know); only
    # members of this sync; and nothing was added after that.
    first = next((i for i, s in enumerate(sends) if s["op"] == "remove"), len(sends))
    held = replay(sends[:first]).get(SYNC, set())
    removals = [s for s in sends[first:] if s["sync"] == SYNC]
    removed = {i for s in removals for i in s["ids"]}
    assert {"remove"} >= {s["op"] for s in removals}, "members were added after the teardown began"
    assert held <= removed <= set(MEMBERS)
    # The record counts what this run removed plus, as any takeover does,
    # what an interrupted attempt applied (said in a note); it adds nothing.
    folded = [m for note in teardown.notes if (m := FOLDED.search(note))]
    own = {i for s in removals if s["run"] == teardown.id for i in s["ids"]}
    assert teardown.removed == len(own) + sum(int(m["removed"]) for m in folded), teardown.notes
    assert teardown.added == sum(int(m["added"]) for m in folded), teardown.notes
    if in_flight is not None:
        assert set(in_flight) <= removed, "the in-flight batch was not removed"
    if first_run_recorded is not None:
        # The first run is recorded if it completed (before or after the
        # delete); a killed one leaves no record, and the teardown may then
        # take its slot (when the delete came at that very instant).
        first_runs = [run for run in history if run is not teardown]
        assert first_run_recorded == bool(first_runs), first_runs
        if first_runs:
            (run,) = first_runs
            assert (T0, cs.RunStatus.SUCCEEDED, len(MEMBERS)) == (run.slot, run.status, run.added)
            assert 0 == teardown.added


# -- scenario 1: delete during the first run ------------------------------------------------


def delete_during_run(
    tmp_path: Path,
    store_spec: str,
    figures: Figures,
    *,
    pause_at: int,
    where: str,
    then: str,
) -> None:
    """
    The worker pauses inside batch *pause_at*'s add; the second process
    deletes the sync; then the worker goes on (``finish``: it completes its
    run and the second process runs the teardown) or is killed (``kill``: a
    fresh worker takes over after the lease expired).
    """
    config = setup(tmp_path, store_spec)
    proc = start_worker({**config, "mode": "once", "pause_at": pause_at, "where": where})
    try:
        paused = wait_for_pause(proc)
        assert f"paused:add:{pause_at}:{where}" == paused
        delete(config)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    if then == "kill":
        os.kill(proc.pid, signal.SIGKILL)
        finish(proc, killed=True)
        recover(config)
    else:
        Path(config["go"]).touch()
        out = finish(proc, killed=False)
        assert '"runs": ["scheduled:succeeded"]' in out, out
        recover(config)
    check_teardown(
        config,
        figures,
        "delete-during-run",
        faults=1 + (then == "kill"),
        first_run_recorded=then == "finish",
        kills=int(then == "kill"),
    )


PAUSES = [
    (1, "sent", "finish"),
    (1, "received", "finish"),
    (1, "sent", "kill"),
    (1, "received", "kill"),
    (3, "received", "finish"),
    (3, "received", "kill"),
    (5, "sent", "kill"),
    (5, "received", "finish"),
]
ALL_PAUSES = [
    (n, where, then)
    for n in range(1, BATCHES + 1)
    for where in ("sent", "received")
    for then in ("finish", "kill")
]


# -- scenario 2: crash, then delete --------------------------------------------------------


def crash_then_delete(tmp_path: Path, store_spec: str, figures: Figures, *, step: str) -> None:
    """
    The worker is killed at *step* of its first run; the second process
    deletes the sync; a fresh worker runs what is due after the lease expired.
    """
    config = setup(tmp_path, store_spec)
    run_worker({**config, "mode": "crash", "step": step}, killed=True)
    delete(config)
    recover(config)
    check_teardown(
        config,
        figures,
        "crash-then-delete",
        faults=1,
        in_flight=IN_FLIGHT if step in ("acked", "before_apply") else None,
        first_run_recorded=step == "completed",
        kills=1,
    )


# -- scenario 3: crash during the teardown ---------------------------------------------------


def crash_during_teardown(
    tmp_path: Path,
    store_spec: str,
    figures: Figures,
    *,
    first: str,
    pause_at: int,
    where: str,
) -> None:
    """
    The first run completes (``completed``) or is killed at ``acked`` (the
    remote holds batch 3, the store has it as a pending add); the sync is
    deleted; the worker running the teardown is killed inside removal
    *pause_at* (before or after the remote recorded it); a fresh worker
    takes the teardown over after the lease expired.
    """
    config = setup(tmp_path, store_spec)
    if first == "completed":
        assert '"runs": ["scheduled:succeeded"]' in run_worker({**config, "mode": "once"})
    else:
        run_worker({**config, "mode": "crash", "step": first}, killed=True)
    delete(config)
    proc = start_worker(
        {**config, "mode": "recover", "pause_op": "remove", "pause_at": pause_at, "where": where}
    )
    try:
        paused = wait_for_pause(proc)
        assert f"paused:remove:{pause_at}:{where}" == paused
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        finish(proc, killed=True)
    recover(config)
    check_teardown(
        config,
        figures,
        "crash-during-teardown",
        faults=1 + (first != "completed"),
        in_flight=IN_FLIGHT if first in ("acked", "before_apply") else None,
        first_run_recorded=first == "completed",
        kills=1 + (first != "completed"),
    )


def case(*values: object, marks: Any = ()) -> Any:
    """
    One parameter holding a trial's settings, named after them.
    """
    return pytest.param(values, id="-".join(map(str, values)), marks=marks)


def teardown_kill(first: str, pause_at: int, where: str) -> Any:
    """
    One kill inside the teardown. With the first run killed at ``acked`` or
    ``before_apply``, the teardown removes batches 1 and 2 (delivered), then,
    in its third removal, the members of the pending add. Killed as that one
    is sent, they used to be forgotten (a pending removal newer than the
    pending add won, and the members were not delivered): the takeover now
    removes every member named in any pending record.
    """
    return case(first, pause_at, where)


TEARDOWN_KILLS = [
    ("completed", 1, "sent"),
    ("completed", 3, "received"),
    ("acked", 3, "received"),
    ("acked", 3, "sent"),
]
ALL_TEARDOWN_KILLS = [
    (first, n, where)
    for first in ("completed", "before_apply", "acked")
    for n in range(1, 4)
    for where in ("sent", "received")
]


# -- slow: the delete (and a kill) at a random moment ---------------------------------------


def race(tmp_path: Path, store_spec: str, figures: Figures, *, seed: int) -> None:
    """
    No pause: the worker's remote takes real time per call (so that a run
    takes a quarter of a second or so); the delete lands at a random moment
    of the worker's life, and half the time the worker is killed a random
    moment later. Then a fresh worker runs what is due.
    """
    rng = random.Random(seed)
    config = setup(tmp_path, store_spec)
    proc = start_worker({**config, "mode": "recover", "latency": (0.02, 0.08)})
    killed = False
    try:
        time.sleep(rng.uniform(0.3, 1.0))
        sent_before = len(read_lines(config["remote"]))
        delete(config, rival=False)
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.0, 0.2))
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    _, stderr = proc.communicate(timeout=120)
    killed = killed and proc.returncode == -signal.SIGKILL
    assert killed or 0 == proc.returncode, stderr.decode()
    recover(config)
    check_teardown(
        config,
        figures,
        "delete-race",
        faults=1 + killed,
        kills=int(killed),
        deleted_mid_run=int(0 < sent_before < BATCHES),
    )


class TestDeleteDuringTheFirstRun:
    """
    A sync deleted while its first run is sending ends empty at the remote and ``deleted``.
    """

    @pytest.mark.parametrize("pause", [case(*p) for p in PAUSES])
    def test_delete_while_sending(
        self, tmp_path: Path, store_spec: str, figures: Figures, pause: tuple[int, str, str]
    ) -> None:
        """Deleted inside an add; the run finishes or its worker is killed; nothing is left."""
        pause_at, where, then = pause
        delete_during_run(tmp_path, store_spec, figures, pause_at=pause_at, where=where, then=then)

    @pytest.mark.slow
    @pytest.mark.parametrize("pause", [case(*p) for p in ALL_PAUSES if p not in PAUSES])
    def test_delete_while_sending_every_batch(
        self, tmp_path: Path, store_spec: str, figures: Figures, pause: tuple[int, str, str]
    ) -> None:
        """The other pauses: inside every batch's add, before and after the remote recorded it."""
        pause_at, where, then = pause
        delete_during_run(tmp_path, store_spec, figures, pause_at=pause_at, where=where, then=then)

    @pytest.mark.slow
    @pytest.mark.parametrize("seed", range(8))
    def test_delete_at_a_random_moment(
        self, tmp_path: Path, store_spec: str, figures: Figures, seed: int
    ) -> None:
        """The delete, and sometimes a kill, at random moments of a running worker."""
        race(tmp_path, store_spec, figures, seed=seed)


class TestCrashDuringTeardown:
    """
    A teardown whose worker is killed mid-removal is taken over and still empties the remote.
    """

    @pytest.mark.parametrize("kill", [teardown_kill(*k) for k in TEARDOWN_KILLS])
    def test_teardown_killed_mid_removal(
        self, tmp_path: Path, store_spec: str, figures: Figures, kill: tuple[str, int, str]
    ) -> None:
        """Killed inside a removal of the teardown; a fresh worker finishes; nothing is left."""
        first, pause_at, where = kill
        crash_during_teardown(
            tmp_path, store_spec, figures, first=first, pause_at=pause_at, where=where
        )

    @pytest.mark.slow
    @pytest.mark.parametrize(
        "kill", [teardown_kill(*k) for k in ALL_TEARDOWN_KILLS if k not in TEARDOWN_KILLS]
    )
    def test_teardown_killed_at_every_removal(
        self, tmp_path: Path, store_spec: str, figures: Figures, kill: tuple[str, int, str]
    ) -> None:
        """The other kills: inside each of the first three removals, after each first run."""
        first, pause_at, where = kill
        crash_during_teardown(
            tmp_path, store_spec, figures, first=first, pause_at=pause_at, where=where
        )


class TestCrashThenDelete:
    """
    A sync deleted after its worker was killed mid-run removes what the dead attempt sent.
    """

    @pytest.mark.parametrize("step", STEPS)
    def test_crash_then_delete(
        self, tmp_path: Path, store_spec: str, figures: Figures, step: str
    ) -> None:
        """Killed at the step; deleted; a fresh worker's teardown empties the remote."""
        crash_then_delete(tmp_path, store_spec, figures, step=step)


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
