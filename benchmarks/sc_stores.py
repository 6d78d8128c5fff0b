"""
Scenarios about stores: scheduler throughput on memory and SQLite against the
like-for-like SQL ceiling, claim+complete on PostgreSQL and SQLite.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import tempfile
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from common import (
    START,
    Noop,
    Row,
)

import cohortsync as cs
from cohortsync import _schedule
from cohortsync.storage import Completion, MemoryStorage, SQLiteStorage, Storage, SyncRecord
from cohortsync.testing import FakeClock

# -- 4: scheduler throughput ---------------------------------------------------


def expected_runs(records: list[SyncRecord], start: datetime, end: datetime) -> int:
    """
    How many runs 6 hours must hold: each sync's immediate first run, then
    every slot strictly after it and before *end* (computed independently
    with the integer grid).
    """
    total = 0
    s0 = int((start - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds())
    e0 = int((end - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds())
    for r in records:
        period = _schedule.period_seconds(r.sync.policy.cadence)
        total += 1
        if period is None:
            continue
        t = _schedule.next_due_ts(period, r.offset, s0)
        if t < e0:
            total += (e0 - 1 - t) // period + 1
    return total


def _throughput(storage: Storage, n: int, hours: float, claim_batch: int) -> tuple[int, int, float]:
    clock = FakeClock(START)
    scheduler = cs.Scheduler(storage, clock=clock, seed=0)
    scheduler.add_destination("noop", Noop())
    scheduler.add_cohort(cs.Cohort(id="empty", name="Empty", source=lambda: ()))
    mix = [
        (0.70, cs.SyncPolicy.daily()),
        (0.25, cs.SyncPolicy.hourly()),
        (0.05, cs.SyncPolicy.realtime()),
    ]
    i = 0
    for share, policy in mix:
        for _ in range(int(n * share)):
            scheduler.create_sync("empty", "noop", policy, sync_id=f"s{i:06d}")
            i += 1
    end = START + timedelta(hours=hours)
    expected = expected_runs(storage.list_syncs(), START, end)
    done = 0
    slots: set[tuple[str, datetime]] = set()
    t = time.perf_counter()
    last = end - timedelta(microseconds=1)  # slots before `end` count, slots at it do not
    while True:
        for run in scheduler.run_due(claim_batch=claim_batch):
            slots.add((run.sync_id, run.slot))
            done += 1
        now = clock.now()
        if now >= last:
            break
        # Step to the next minute boundary: every real-time sync is due then
        # anyway, and an hourly or daily slot run up to a minute late still
        # runs exactly once (a scan of every sync for the next due time would
        # measure the driver, not the scheduler).
        clock.set(min(now.replace(second=0, microsecond=0) + timedelta(minutes=1), last))
    elapsed = time.perf_counter() - t
    assert done == len(slots), "a slot ran twice"
    return expected, done, elapsed


def commit_ceiling(directory: str, seconds: float = 2.0) -> float:
    """
    Raw SQLite write transactions per second on this file system, with the
    settings SQLiteStorage uses (WAL, synchronous=NORMAL).
    """
    con = sqlite3.connect(os.path.join(directory, "ceiling.db"), isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER)")
    con.execute("INSERT INTO t VALUES (1, 0)")
    count = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        con.execute("BEGIN IMMEDIATE")
        con.execute("UPDATE t SET n = n + 1 WHERE id = 1")
        con.execute("COMMIT")
        count += 1
    con.close()
    return count / seconds


def scenario_throughput(n: int = 10_000, hours: float = 6.0) -> list[Row]:
    exp_m, done_m, t_m = _throughput(MemoryStorage(), n, hours, claim_batch=64)
    with tempfile.TemporaryDirectory() as d:
        storage = SQLiteStorage(os.path.join(d, "throughput.db"))
        exp_s, done_s, t_s = _throughput(storage, n, hours, claim_batch=64)
        storage.close()
        ceiling = commit_ceiling(d)
    rate_m, rate_s = done_m / t_m, done_s / t_s
    return [
        Row(
            f"scheduler, {n:,} syncs x {hours:g} h, MemoryStorage",
            rate_m,
            None,
            "runs/s",
            None,
            ">= 10,000 runs/s",
            rate_m >= 10_000 and exp_m == done_m,
            f"{done_m:,} runs, {exp_m:,} expected",
        ),
        Row(
            f"scheduler, {n:,} syncs x {hours:g} h, SQLite",
            rate_s,
            ceiling,
            "runs/s",
            ceiling / rate_s,
            "within 3x of commit ceiling",
            rate_s * 3 >= ceiling and exp_s == done_s,
            f"{done_s:,} runs, {exp_s:,} expected; ratio = ceiling / ours",
        ),
    ]


# -- 8: claim throughput, PostgreSQL against SQLite -----------------------------


def _open_store(kind: str, where: str) -> Storage:
    if kind == "sqlite":
        return SQLiteStorage(where)
    from cohortsync.storage import PostgresStorage

    dsn, schema = where.split("#")
    return PostgresStorage(dsn, schema=schema)


def claim_worker(kind: str, where: str, owner: str, results: Any) -> None:
    """
    Claim and complete runs until nothing is due; report how many.
    """
    store = _open_store(kind, where)
    done = 0
    now = START + timedelta(minutes=1)
    while True:
        leases = store.claim_due(now, owner, timedelta(minutes=5), 1)
        if not leases:
            break
        (lease,) = leases
        run = cs.SyncRun(
            id=f"{owner}-{done}",
            sync_id=lease.sync_id,
            generation=lease.generation,
            trigger=lease.trigger,
            slot=lease.slot,
            started_at=now,
            finished_at=now,
            status=cs.RunStatus.SUCCEEDED,
            cadence=cs.Cadence.HOURLY,
        )
        store.complete_run(lease, Completion(run=run, next_due=now + timedelta(hours=1)))
        done += 1
    store.close()
    results.put(done)


def _claims(kind: str, where: str, syncs: int, workers: int) -> float:
    store = _open_store(kind, where)
    policy = cs.SyncPolicy.hourly()
    for i in range(syncs):
        sync = cs.Sync(
            id=f"c{i:06d}", cohort_id="c", destination_id="d", policy=policy,
            created_at=START, updated_at=START,
        )  # fmt: skip
        store.create_sync(SyncRecord(sync=sync, next_due=START, anchor=START))
    store.close()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=claim_worker, args=(kind, where, f"w{k}", results))
        for k in range(workers)
    ]
    t = time.perf_counter()
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=600) for _ in procs)
    elapsed = time.perf_counter() - t
    for proc in procs:
        proc.join()
    assert total == syncs, (total, syncs)  # every due sync ran exactly once
    return syncs / elapsed


def scenario_claims(syncs: int = 3_000, workers: tuple[int, ...] = (1, 2, 4)) -> list[Row]:
    dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
    rows = []
    for k in workers:
        with tempfile.TemporaryDirectory() as d:
            sqlite_rate = _claims("sqlite", os.path.join(d, "claims.db"), syncs, k)
        if dsn:
            schema = f"bench_{os.getpid()}_{k}"
            pg_rate = _claims("postgres", f"{dsn}#{schema}", syncs, k)
            _drop_schema(dsn, schema)
            rows.append(
                Row(
                    f"claim+complete, {k} worker process(es), PostgreSQL vs SQLite",
                    pg_rate, sqlite_rate, "runs/s", pg_rate / sqlite_rate, "report", None,
                    f"{syncs:,} due syncs, each run exactly once; baseline: SQLite",
                )
            )  # fmt: skip
        else:
            rows.append(
                Row(
                    f"claim+complete, {k} worker process(es), SQLite",
                    sqlite_rate, None, "runs/s", None, "report", None,
                    "PostgreSQL skipped: set COHORTSYNC_TEST_POSTGRES_DSN "
                    "(source .ci/postgres.sh start)",
                )
            )  # fmt: skip
    return rows


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
