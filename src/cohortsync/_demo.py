"""
The demo behind ``cohortsync demo``: a simulated day of syncs on the embedded
SQLite store, against the real reference destinations.

Everything is real except time: a local HTTP server receives the webhooks,
CSV files land in a directory, the store is an SQLite file; a fake clock lets
a day pass in seconds. One destination has an outage in the morning and
recovers, so the history shows failures, retries and the catch-up.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TextIO

import attrs

from cohortsync._cohort import Cohort, CohortType
from cohortsync._policy import RetryPolicy, SyncPolicy
from cohortsync._progress import bar, wanted
from cohortsync._scheduler import Scheduler
from cohortsync._sync import SyncRun
from cohortsync._table import table
from cohortsync.destinations._csvdir import CsvDirectoryDestination
from cohortsync.destinations._webhook import WebhookDestination
from cohortsync.storage._sqlite import SQLiteStorage
from cohortsync.testing import FakeClock

__all__ = ["run_demo"]

START = datetime(2030, 3, 4, 0, 0, tzinfo=timezone.utc)
OUTAGE = (timedelta(hours=6), timedelta(hours=8, minutes=30))
"""The CRM endpoint answers 503 between these simulated times."""


@attrs.define
class _Receiver:
    """
    What the local webhook server received, per path.
    """

    messages: dict[str, list[dict[str, object]]] = attrs.Factory(dict)
    failing: set[str] = attrs.Factory(set)
    refused: int = 0
    lock: threading.Lock = attrs.Factory(threading.Lock)


def _serve(receiver: _Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with receiver.lock:
                if self.path in receiver.failing:
                    receiver.refused += 1
                    status = 503
                else:
                    receiver.messages.setdefault(self.path, []).append(json.loads(body))
                    status = 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@attrs.define
class _World:
    """
    A population whose cohorts drift as simulated time passes.
    """

    rng: random.Random
    power: set[str]
    churn_risk: set[str]
    newsletter: set[str]
    vip: frozenset[str]
    clock: FakeClock
    last: datetime

    @classmethod
    def create(cls, clock: FakeClock, seed: int) -> _World:
        rng = random.Random(seed)  # noqa: S311 - demo data
        users = [f"user-{i:05d}" for i in range(20_000)]
        return cls(
            rng=rng,
            power=set(rng.sample(users, 5_000)),
            churn_risk=set(rng.sample(users, 2_000)),
            newsletter=set(rng.sample(users, 800)),
            vip=frozenset(rng.sample(users, 300)),
            clock=clock,
            last=clock.now(),
        )

    def advance(self) -> None:
        """
        Apply the churn of the minutes elapsed since the last call.
        """
        now = self.clock.now()
        minutes = int((now - self.last).total_seconds() // 60)
        self.last += timedelta(minutes=minutes)
        for _ in range(min(minutes, 24 * 60)):
            self._drift(self.power, 2, 2)
            self._drift(self.churn_risk, 1, 1)
            if self.rng.random() < 0.15:
                self._drift(self.newsletter, 1, 0)

    def _drift(self, cohort: set[str], joins: int, leaves: int) -> None:
        for _ in range(leaves):
            for _ in range(20):  # a random user of the population, until one is a member
                user = f"user-{self.rng.randrange(20_000):05d}"
                if user in cohort:
                    cohort.discard(user)
                    break
        for _ in range(joins):
            cohort.add(f"user-{self.rng.randrange(20_000):05d}")

    def source(self, name: str) -> Callable[[], list[str]]:
        def members() -> list[str]:
            self.advance()
            return list(getattr(self, name))

        return members


def _progress(out: TextIO, done: float, now: datetime, runs: int) -> None:
    out.write(f"\r  [{bar(done)}] {done:5.0%}  simulated {now:%H:%M} UTC  runs: {runs:5d}")
    out.flush()


def _interesting(runs: list[SyncRun], limit: int = 12) -> list[SyncRun]:
    """
    The first runs, every run that did not simply succeed and the one after it
    (the recovery), and the last run: what a person reading history looks for.
    """
    if len(runs) <= limit:
        return runs
    keep = {0, 1, len(runs) - 1}
    for i, run in enumerate(runs):
        if run.status.value != "succeeded" or run.retries:
            keep.update({i, i + 1})
    return [runs[i] for i in sorted(keep) if i < len(runs)][: limit + 4]


_RUN_COLUMNS = (
    "slot (UTC)", "trigger", "status", "added", "removed", "skip", "rej", "batch", "retry", "note"
)  # fmt: skip


def _table(runs: list[SyncRun], slot_format: str = "%m-%d %H:%M:%S") -> list[str]:
    """A history table, indented, its columns as wide as what they hold."""
    rows = []
    for r in runs:
        note = f"{r.error_type}: {r.error_message}" if r.error_type else ", ".join(r.notes)
        if len(note) > 72:
            note = note[:69] + "..."
        counts = (r.added, r.removed, r.skipped, r.rejected, r.batches, r.retries)
        rows.append(
            (f"{r.slot:{slot_format}}", r.trigger.value, r.status.value, *map(str, counts), note)
        )
    header, *lines = table(_RUN_COLUMNS, rows, right=range(3, 9))
    return [f"  {header}", "  " + "-" * len(header), *(f"  {line}" for line in lines)]


_PLANS = [
    ("power-users-hourly", "power-users", "webhook", SyncPolicy.hourly()),
    ("churn-risk-daily-s3", "churn-risk", "s3-export", SyncPolicy.daily()),
    (
        "churn-risk-crm",
        "churn-risk",
        "crm",
        SyncPolicy.hourly(retry=RetryPolicy(max_retries=3, initial=5.0)),
    ),
    ("newsletter-realtime", "newsletter", "webhook", SyncPolicy.realtime()),
    ("vip-once", "vip", "crm", SyncPolicy.one_time()),
]
"""The demo's syncs: (sync id, cohort, destination, policy)."""

_COHORTS = [
    (Cohort(id="power-users", name="Power users", type=CohortType.BEHAVIORAL), "power"),
    (Cohort(id="churn-risk", name="Churn risk", type=CohortType.PREDICTIVE), "churn_risk"),
    (Cohort(id="newsletter", name="Newsletter readers", type=CohortType.BEHAVIORAL), "newsletter"),
    (Cohort(id="vip", name="VIP upload", type=CohortType.STATIC), "vip"),
]


def _setup(scheduler: Scheduler, world: _World, base: str, workdir: Path) -> None:
    clock = world.clock
    scheduler.add_destination("webhook", WebhookDestination(f"{base}/audiences", clock=clock))
    scheduler.add_destination(
        "crm",
        WebhookDestination(
            f"{base}/crm", headers={"Authorization": "Bearer demo-secret"}, clock=clock
        ),
    )
    scheduler.add_destination("s3-export", CsvDirectoryDestination(workdir / "s3"))
    for cohort, attribute in _COHORTS:
        scheduler.add_cohort(attrs.evolve(cohort, source=world.source(attribute)))
    for sync_id, cohort_id, destination_id, policy in _PLANS:
        scheduler.create_sync(cohort_id, destination_id, policy, sync_id=sync_id)


def _simulate(
    scheduler: Scheduler, clock: FakeClock, receiver: _Receiver, hours: int, out: TextIO | None
) -> int:
    """
    Run due syncs, jumping the fake clock from one due instant to the next;
    the CRM endpoint fails during the outage window. Returns the run count.
    """
    end = START + timedelta(hours=hours)
    total = 0
    while clock.now() < end:
        offset = clock.now() - START
        with receiver.lock:
            if OUTAGE[0] <= offset < OUTAGE[1]:
                receiver.failing.add("/crm")
            else:
                receiver.failing.discard("/crm")
        total += len(scheduler.run_due())
        due = [d for s in scheduler.syncs() if (d := scheduler.next_run(s.id)) is not None]
        clock.set(max(clock.now(), min([*due, end])))
        if out is not None:
            _progress(out, min(1.0, (clock.now() - START) / (end - START)), clock.now(), total)
    if out is not None:
        out.write("\n")
    return total


def _report(scheduler: Scheduler, out: TextIO) -> None:
    for sync_id, cohort_id, destination_id, policy in _PLANS:
        runs = list(reversed(scheduler.history(sync_id)))
        sync = scheduler.get_sync(sync_id)
        statuses: dict[str, int] = {}
        for r in runs:
            statuses[r.status.value] = statuses.get(r.status.value, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        print(
            f"{sync_id}: {cohort_id} -> {destination_id}, {policy.cadence.value}, "
            f"now {sync.status.value}; {len(runs)} runs ({summary}); "
            f"destination holds {scheduler.storage.count_delivered(sync_id)} members",
            file=out,
        )
        shown = _interesting(runs)
        for line in _table(shown):
            print(line, file=out)
        if len(shown) < len(runs):
            print(f"  ({len(runs) - len(shown)} more ordinary runs not shown)", file=out)
        advice = scheduler.recommend(sync_id)
        if advice is not None:
            print(f"  advice: {advice.message}", file=out)
        print(file=out)


def run_demo(
    *,
    directory: Path | None = None,
    hours: int = 24,
    seed: int = 7,
    progress: bool | None = None,
    out: TextIO | None = None,
) -> int:
    """
    Run the demo and print what happened. Returns an exit code.
    """
    out = out or sys.stdout
    show_progress = wanted(progress, out)
    workdir = directory or Path(tempfile.mkdtemp(prefix="cohortsync-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "cohortsync.db"
    for stale in workdir.glob("cohortsync.db*"):
        stale.unlink()
    clock = FakeClock(START)
    world = _World.create(clock, seed)
    receiver = _Receiver()
    server = _serve(receiver)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    storage = SQLiteStorage(db)
    try:
        scheduler = Scheduler(storage, clock=clock, seed=seed)
        _setup(scheduler, world, base, workdir)
        print(f"cohortsync demo: a simulated day of {len(_PLANS)} syncs", file=out)
        print(f"  store:        {db}", file=out)
        print(f"  webhooks:     {base} (local HTTP server)", file=out)
        print(f"  S3-style CSV: {workdir / 's3'}", file=out)
        print("  outage:       the CRM endpoint answers 503 from 06:00 to 08:30", file=out)
        total = _simulate(scheduler, clock, receiver, hours, out if show_progress else None)
        print(f"\n{total} runs in {hours} simulated hours.\n", file=out)
        _report(scheduler, out)
        with receiver.lock:
            received = {path: len(msgs) for path, msgs in receiver.messages.items()}
        print(
            f"webhook server received {sum(received.values())} messages "
            f"({', '.join(f'{p}: {n}' for p, n in sorted(received.items()))}); "
            f"refused {receiver.refused} during the outage.",
            file=out,
        )
        latest = CsvDirectoryDestination(workdir / "s3").read_latest("churn-risk-daily-s3")
        print(
            "latest S3-style export: "
            + ", ".join(f"{name}: {len(rows)} rows" for name, rows in sorted(latest.items())),
            file=out,
        )
    finally:
        server.shutdown()
        server.server_close()
        storage.close()
    return 0
