"""
The benchmark scenarios of SPEC section 9, each against a baseline measured in
the same run. Sizes are parameters so the test suite can run every scenario
small (correctness only) and ``run.py`` can run them at full size.

Each scenario returns a list of :class:`Row`: one line of the results table.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cohortsync as cs
from cohortsync import _schedule
from cohortsync.storage import Completion, MemoryStorage, SQLiteStorage, Storage, SyncRecord
from cohortsync.testing import FakeClock

START = datetime(2030, 1, 1, tzinfo=timezone.utc)
HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    """
    One result: what we measured, the baseline measured in the same run, and
    whether the goal is met.
    """

    scenario: str
    ours: float
    baseline: float | None
    unit: str
    ratio: float | None
    goal: str
    met: bool | None
    note: str = ""


class Noop(cs.Destination):
    """
    A destination that accepts everything and does nothing: measures the library.
    """

    capabilities = cs.Capabilities(name="no-op", max_batch_size=10_000)

    def __init__(self) -> None:
        self.calls = 0
        self.members = 0

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.calls += 1
        self.members += len(batch)
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.calls += 1
        self.members += len(batch)
        return cs.DeliveryResult.ok()


def keys(n: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}-{i:010d}" for i in range(n)]


def churned(base: list[str], share: float, generation: int) -> list[str]:
    """
    *base* with *share* of it replaced by new members (half leave, half join).
    """
    k = int(len(base) * share / 2)
    return base[k:] + [f"join{generation}-{i:010d}" for i in range(k)]


def _timed(fn: Callable[[], object], repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_mb() -> float:
    """
    This process's peak resident memory. VmHWM, not ru_maxrss: the latter
    survives fork+exec, so a child would report its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _scheduler(
    storage: Storage, members: Callable[[], Iterable[str]], sorted_keys: bool = False
) -> tuple[cs.Scheduler, FakeClock, Noop]:
    clock = FakeClock(START)
    scheduler = cs.Scheduler(storage, clock=clock, seed=0)
    destination = Noop()
    scheduler.add_destination("noop", destination)
    source = cs.CallableSource(members, sorted_keys=sorted_keys)
    scheduler.add_cohort(cs.Cohort(id="big", name="Big cohort", source=source))
    if not any(s.id == "big" for s in scheduler.syncs()):
        policy = cs.SyncPolicy.daily(guard=cs.MassRemovalGuard.disabled())
        scheduler.create_sync("big", "noop", policy, sync_id="big")
    return scheduler, clock, destination


def _run_once(scheduler: cs.Scheduler, clock: FakeClock) -> cs.SyncRun:
    clock.advance(1)
    scheduler.sync_now("big")
    runs = scheduler.run_due()
    assert len(runs) == 1, runs
    assert runs[0].status is cs.RunStatus.SUCCEEDED, runs[0]
    clock.advance(1)
    return runs[0]


# -- 1 + 2: steady state and first sync ------------------------------------


def _child(target: str, args: tuple[object, ...]) -> dict[str, float]:
    """
    Run ``target(*args)`` in a fresh interpreter and return its JSON result, so
    peak RSS belongs to that scenario alone.
    """
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import scenarios; "
        f"print(json.dumps(scenarios.{target}(*json.loads(sys.argv[2]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(HERE), json.dumps(list(args))],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_keys_only(n: int) -> dict[str, float]:
    members = keys(n)
    return {"rss": peak_rss_mb(), "n": len(members)}


def child_one_set(n: int) -> dict[str, float]:
    members = keys(n)
    s = set(members)
    return {"rss": peak_rss_mb(), "n": len(s)}


def child_first_sync(n: int, db: str | None) -> dict[str, float]:
    members = keys(n)
    storage: Storage = SQLiteStorage(db) if db else MemoryStorage()
    scheduler, clock, destination = _scheduler(storage, lambda: members)
    t = time.perf_counter()
    run = _run_once(scheduler, clock)
    elapsed = time.perf_counter() - t
    assert run.added == n
    assert destination.members == n
    storage.close()
    return {"seconds": elapsed, "rss": peak_rss_mb()}


def child_steady(n: int, db: str, share: float, runs: int) -> dict[str, float]:
    """
    Open a store that already holds the first sync and time steady-state runs.
    """
    base = keys(n)
    current = {"members": base}
    storage = SQLiteStorage(db)
    scheduler, clock, _destination = _scheduler(storage, lambda: current["members"])
    clock.set(START + timedelta(days=1))  # after the first sync, done by another process
    times = []
    for g in range(runs):
        current["members"] = churned(base, share, g)
        t = time.perf_counter()
        run = _run_once(scheduler, clock)
        times.append(time.perf_counter() - t)
        expected = int(n * share / 2)
        assert run.removed == (expected if g == 0 else 0) or run.removed > 0, run
    storage.close()
    return {
        "cold": times[0],
        "warm": min(times[1:]) if len(times) > 1 else times[0],
        "rss": peak_rss_mb(),
    }


def baseline_set_diff(n: int, share: float) -> float:
    """
    The in-process lower bound: both sides already in memory as lists; build
    the sets and take the difference both ways.
    """
    old = keys(n)
    new = churned(old, share, 0)

    def diff() -> None:
        a, b = set(old), set(new)
        _ = a - b, b - a

    return _timed(diff, repeat=3)


def baseline_rewrite(n: int, share: float, directory: str) -> float:
    """
    What a host would write by hand: load the whole stored snapshot, diff,
    rewrite the whole snapshot.
    """
    path = os.path.join(directory, "naive.db")
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("CREATE TABLE IF NOT EXISTS snapshot (key TEXT PRIMARY KEY) WITHOUT ROWID")
    con.execute("DELETE FROM snapshot")
    con.executemany("INSERT INTO snapshot VALUES (?)", ((k,) for k in keys(n)))
    con.commit()
    new = churned(keys(n), share, 0)

    def rewrite() -> None:
        stored = {k for (k,) in con.execute("SELECT key FROM snapshot")}
        current = set(new)
        _ = current - stored, stored - current
        with con:
            con.execute("DELETE FROM snapshot")
            con.executemany("INSERT INTO snapshot VALUES (?)", ((k,) for k in current))

    elapsed = _timed(rewrite)
    con.close()
    return elapsed


def scenario_diff(n: int = 1_000_000, share: float = 0.01) -> list[Row]:
    with tempfile.TemporaryDirectory() as d:
        db = os.path.join(d, "steady.db")
        first_sqlite = _child("child_first_sync", (n, db))
        steady = _child("child_steady", (n, db, share, 3))
        first_memory = _child("child_first_sync", (n, None))
        lower = baseline_set_diff(n, share)
        naive = baseline_rewrite(n, share, d)
    keys_only = _child("child_keys_only", (n,))
    one_set = _child("child_one_set", (n,))
    set_mb = one_set["rss"] - keys_only["rss"]
    run_mb = steady["rss"] - keys_only["rss"]
    warm = steady["warm"]
    return [
        Row(
            f"steady run, {n:,} members, {share:.0%} churn, SQLite (warm)",
            warm,
            lower,
            "s",
            warm / lower,
            "<= 3x set diff",
            warm <= 3 * lower,
            f"cold (new process, state read from SQLite): {steady['cold']:.2f} s",
        ),
        Row(
            "  ... against rewriting the whole snapshot",
            warm,
            naive,
            "s",
            naive / warm,
            ">= 10x faster",
            naive >= 10 * warm,
            "ratio = naive / ours",
        ),
        Row(
            "  ... peak memory of that process",
            run_mb,
            set_mb,
            "MB",
            run_mb / set_mb,
            "<= 2.5x one set",
            run_mb <= 2.5 * set_mb,
            "RSS above a process holding only the key list",
        ),
        Row(
            f"first full sync, {n:,} members, SQLite",
            first_sqlite["seconds"],
            None,
            "s",
            None,
            "report",
            None,
            f"peak RSS {first_sqlite['rss']:.0f} MB",
        ),
        Row(
            f"first full sync, {n:,} members, MemoryStorage",
            first_memory["seconds"],
            None,
            "s",
            None,
            "report",
            None,
            f"peak RSS {first_memory['rss']:.0f} MB",
        ),
    ]


# -- 3: ten million, sorted -------------------------------------------------


def _sorted_keys(n: int, prefix: str, skip_every: int = 0) -> Iterator[str]:
    for i in range(n):
        if skip_every and i % skip_every == 0:
            continue
        yield f"{prefix}-{i:010d}"


def child_sorted(n: int, db: str) -> dict[str, float]:
    state = {"skip": 0}
    storage = SQLiteStorage(db)
    scheduler, clock, _destination = _scheduler(
        storage, lambda: _sorted_keys(n, "user", state["skip"]), sorted_keys=True
    )
    t = time.perf_counter()
    first = _run_once(scheduler, clock)
    first_s = time.perf_counter() - t
    assert first.added == n
    state["skip"] = 100  # 1 % leave
    t = time.perf_counter()
    second = _run_once(scheduler, clock)
    second_s = time.perf_counter() - t
    assert second.removed == len(range(0, n, 100)), second
    storage.close()
    return {"first": first_s, "second": second_s, "rss": peak_rss_mb()}


def scenario_sorted(n: int = 10_000_000) -> list[Row]:
    with tempfile.TemporaryDirectory() as d:
        result = _child("child_sorted", (n, os.path.join(d, "sorted.db")))
    return [
        Row(
            f"daily sync, {n:,} members, sorted source: first run",
            result["first"],
            None,
            "s",
            None,
            "completes",
            met=True,
            note=f"peak RSS {result['rss']:.0f} MB for the whole process",
        ),
        Row(
            "  ... next run, 1 % left (streaming merge diff)",
            result["second"],
            None,
            "s",
            None,
            "completes, bounded memory",
            met=True,
        ),
    ]


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


# -- 5: next-run computation -------------------------------------------------------


def scenario_next_run(n: int = 200_000) -> list[Row]:
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    base = START + timedelta(minutes=7, seconds=3, microseconds=500_000)
    afters = [base + timedelta(seconds=37 * i) for i in range(n)]
    after_ts = [a.timestamp() for a in afters]
    hourly = cs.SyncPolicy.hourly()
    daily = cs.SyncPolicy.daily()
    daily_tz = cs.SyncPolicy.daily("Europe/Berlin")
    realtime = cs.SyncPolicy.realtime()
    offset = 23 * 60 + 5

    def ours_ts() -> None:
        f = _schedule.next_due_ts
        for a in after_ts:
            f(3600, offset, a)

    def ours(policy: cs.SyncPolicy, off: int) -> Callable[[], None]:
        def run() -> None:
            f = _schedule.next_due
            for a in afters:
                f(policy, START, off, a)

        return run

    interval = IntervalTrigger(
        hours=1, start_date=START + timedelta(seconds=offset), timezone=timezone.utc
    )
    cron_daily = CronTrigger(hour=0, minute=23, second=5, timezone="Europe/Berlin")

    def aps(trigger: object) -> Callable[[], None]:
        def run() -> None:
            g = trigger.get_next_fire_time  # type: ignore[attr-defined]
            for a in afters:
                g(None, a)

        return run

    # Same next times (strictly-after vs at-or-after differ only on exact slots, which
    # these instants avoid).
    for a in afters[:1000]:
        assert _schedule.next_due(hourly, START, offset, a) == interval.get_next_fire_time(None, a)
    rows = []
    t_aps = _timed(aps(interval))
    t_cron = _timed(aps(cron_daily))
    for name, fn, baseline in [
        ("next run, hourly (integer grid)", ours_ts, t_aps),
        ("next run, hourly (datetime API)", ours(hourly, offset), t_aps),
        ("next run, daily UTC (datetime API)", ours(daily, offset), t_aps),
        ("next run, real-time (datetime API)", ours(realtime, 0), t_aps),
        ("next run, daily Europe/Berlin", ours(daily_tz, offset), t_cron),
    ]:
        t = _timed(fn, repeat=3)
        rate = n / t
        base_rate = n / baseline
        peer = "CronTrigger" if baseline is t_cron else "IntervalTrigger"
        rows.append(
            Row(
                name,
                rate,
                base_rate,
                "calls/s",
                rate / base_rate,
                ">= 1,000,000/s and >= 2x APScheduler",
                rate >= 1_000_000 and rate >= 2 * base_rate,
                f"baseline: APScheduler 3 {peer}",
            )
        )
    return rows


# -- 6: slot spread ------------------------------------------------------------------


def scenario_spread(n: int = 100_000) -> list[Row]:
    hashed = [_schedule.stable_offset(f"sync-{i}:1", 86_400) for i in range(n)]
    # The real allocator: daily syncs created through the scheduler, whose
    # store counts each sync in its bucket as it writes it.
    storage = MemoryStorage()
    scheduler = cs.Scheduler(storage, clock=FakeClock(START), seed=0)
    scheduler.add_destination("noop", Noop())
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=list))
    daily = cs.SyncPolicy.daily()
    for i in range(n):
        scheduler.create_sync("c", "noop", daily, sync_id=f"sync-{i}")
    balanced = [record.offset for record in storage.list_syncs()]
    r_hash = _schedule.spread_ratio(hashed, 86_400)
    r_bal = _schedule.spread_ratio(balanced, 86_400)
    return [
        Row(
            f"slot spread, {n:,} daily syncs (busiest minute / mean)",
            r_bal,
            r_hash,
            "x",
            r_bal / r_hash,
            "<= 1.1",
            r_bal <= 1.1,
            "ours: load-aware allocator; baseline: stable hash",
        )
    ]


# -- 7: delivery overhead ------------------------------------------------------------


def scenario_overhead(n: int = 200_000, batch: int = 1_000) -> list[Row]:
    members = keys(n)
    storage = MemoryStorage()
    clock = FakeClock(START)
    scheduler = cs.Scheduler(storage, clock=clock, seed=0)
    destination = Noop()
    destination.capabilities = cs.Capabilities(name="no-op", max_batch_size=batch)  # type: ignore[misc]
    scheduler.add_destination("noop", destination)
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: members))
    scheduler.create_sync("c", "noop", cs.SyncPolicy.one_time(), sync_id="big")
    t = time.perf_counter()
    run = scheduler.run_due()[0]
    ours = time.perf_counter() - t
    assert run.added == n

    direct = Noop()
    ctx = cs.RunContext(
        run_id="r",
        sync_id="s",
        generation=1,
        cohort_id="c",
        cohort_name="C",
        computed_at=START,
        full_sync=False,
    )

    def calls() -> None:
        for i in range(0, n, batch):
            chunk = members[i : i + batch]
            b = cs.Batch(
                context=ctx,
                operation=cs.Operation.ADD,
                members=tuple(
                    cs.Member(k, cs.Identifier(cs.IdentifierKind.USER_ID, k)) for k in chunk
                ),
                sequence=i,
                idempotency_key="k",
            )
            direct.add(b)

    base = _timed(calls)
    per_ours = ours / n * 1e6
    per_base = base / n * 1e6
    return [
        Row(
            f"delivery overhead per member ({n:,} members, batches of {batch:,})",
            per_ours,
            per_base,
            "us/member",
            per_ours / per_base,
            "report",
            None,
            "baseline: building the same batches and calling the adapter directly",
        )
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


SCENARIOS: dict[str, Callable[[], list[Row]]] = {
    "diff": scenario_diff,
    "sorted": scenario_sorted,
    "throughput": scenario_throughput,
    "next_run": scenario_next_run,
    "spread": scenario_spread,
    "overhead": scenario_overhead,
    "claims": scenario_claims,
}


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import platform

    return {
        "cpu": cpu,
        "cores": multiprocessing.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
    }


def as_dicts(rows: list[Row]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]
