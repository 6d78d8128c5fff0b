"""
Scale (issue 19): the per-call cost of what a worker and an admin page do, on
stores of 1,000 to 1,000,000 syncs, against the same call on the 1,000-sync
store, on SQLite and (with ``COHORTSYNC_TEST_POSTGRES_DSN``) PostgreSQL.

Each store is built once with :meth:`~cohortsync.Scheduler.create_syncs`
(70 % daily, 25 % hourly, 5 % real-time, as the throughput scenario) with
``first_run="next_slot"`` at ``T0``, half a second past a minute boundary:
nothing is due then (the idle phase asserts it), so a worker's round at
``T0`` is an idle one. The build time is reported.

Then every repeat measures each size in a fresh process (so its peak RSS is
the worker's own), the sizes in alternating order (A, B, C, D, D, C, B, A,
...), in two phases:

- at ``T0`` (nothing due): an idle ``run_due()``, ``next_run()`` of random
  syncs, one idle ``run_forever()`` round (``run_due()`` and the store's
  earliest-due query; its sleep ends the loop), ``upcoming(+1 h, limit=1000)``
  per sync listed (what the CLI shows: 1,000 runs at every size, but of
  more syncs as N grows, up to the limit, each read and decoded; the cost
  per sync listed is what must stay flat), the full
  ``iter_upcoming(+1 min)`` per run listed (its output grows with N too),
  the same listing again with no sync definition cached (as in a fresh
  ``cohortsync upcoming`` process: at 1,000 syncs the first listing's
  definitions were all parsed by the ``upcoming`` call before it, at a
  million most are not, so the first listing compares cache hits with
  parses), and ``create_sync()``;
- then at ``T0 + r h + 1 min`` of repeat *r*: the runs/s of the first
  :data:`BURST` runs of the hourly burst (real-time, hourly and the daily
  syncs whose slot passed). Each repeat runs later slots, so it does not
  depend on the repeat before: every burst starts with more than
  :data:`BURST` syncs due.

The idle phase of every repeat comes before any burst: a completion records
the clock it ran on, and a worker whose clock reads earlier (the next
repeat's ``T0``) would take that for a clock that went back.

The ratio of each row is the value at the largest size over the value at
1,000 syncs (for runs/s, 1,000's over the largest): the goal is <= 1.15.

Where the OS reports it (``/proc/self/io``), the notes give the pages each
call read from the disk rather than the OS's page cache: a store file the
OS has evicted (this machine pages out file pages idle for about a minute)
makes a random read a disk read, which no change to the library removes.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

from common import START, Noop, Row, child, peak_rss_mb
from measure import REPEATS, Sample

import cohortsync as cs
from cohortsync import _converter
from cohortsync.storage import SQLiteStorage, Storage

T0 = START + timedelta(milliseconds=500)
"""The build instant and the idle phase's clock: half a second past a minute
boundary, so no slot (whole seconds) is *at* it. At ``START`` itself every
real-time sync's first slot (``first_run="next_slot"``: now, if now is one)
was due, and the idle phase's warm-up call ran them: 50,000 runs at a million
syncs against 50 at a thousand, whose dead index entries then slowed every
idle claim of the bigger store (the previous edition's 1.51 for PostgreSQL)."""
SIZES = (1_000, 10_000, 100_000, 1_000_000)
BURST = 2_000
"""Runs timed per burst."""
_MIX: tuple[tuple[float, Callable[[], cs.SyncPolicy]], ...] = (
    (0.70, lambda: cs.SyncPolicy.daily(first_run="next_slot")),
    (0.25, lambda: cs.SyncPolicy.hourly(first_run="next_slot")),
    (0.05, lambda: cs.SyncPolicy.realtime(first_run="next_slot")),
)

FLAT = (
    ("idle", "idle run_due()", "us/call"),
    ("next_run", "next_run() of a random sync", "us/call"),
    ("forever", "one idle run_forever() round", "us/call"),
    ("upcoming_row", "upcoming(+1 h, limit=1000), per sync listed", "us/item"),
    ("upcoming_item", "iter_upcoming(+1 min), per run listed", "us/item"),
    (
        "upcoming_item_cold",
        "iter_upcoming(+1 min), per run listed, no definition cached (a fresh CLI)",
        "us/item",
    ),
    ("create", "create_sync()", "us/call"),
)


def _sizes() -> tuple[int, ...]:
    raw = os.environ.get("COHORTSYNC_BENCH_SCALE_SIZES")
    return tuple(int(s) for s in raw.split(",")) if raw else SIZES


# -- the stores ------------------------------------------------------------------


def _open(kind: str, where: str) -> Storage:
    if kind == "sqlite":
        return SQLiteStorage(where)
    from cohortsync.storage import PostgresStorage

    dsn, schema = where.split("#", 1)
    return PostgresStorage(dsn, schema=schema)


def _scheduler(store: Storage, clock: cs.Clock) -> cs.Scheduler:
    scheduler = cs.Scheduler(store, clock=clock, seed=0)
    scheduler.add_destination("noop", Noop())
    scheduler.add_cohort(cs.Cohort(id="empty", name="Empty", source=lambda: ()))
    return scheduler


def _specs(n: int) -> Iterator[cs.SyncSpec]:
    i = 0
    for share, policy in _MIX:
        made = policy()
        for _ in range(round(n * share)):
            yield cs.SyncSpec("empty", "noop", made, sync_id=f"s{i:07d}")
            i += 1


def build(kind: str, where: str, n: int) -> dict[str, float]:
    """In a child: create the *n* syncs in bulk; the seconds it took."""
    from cohortsync.testing import FakeClock

    store = _open(kind, where)
    try:
        scheduler = _scheduler(store, FakeClock(T0))
        t = time.perf_counter()
        result = scheduler.create_syncs(_specs(n))
        seconds = time.perf_counter() - t
        assert len(result.created) == n, (len(result.created), n)
        if kind == "postgres":
            _analyze(where)
    finally:
        store.close()
    return {"build": seconds}


def _analyze(where: str) -> None:
    import psycopg
    from psycopg import sql

    dsn, schema = where.split("#", 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ANALYZE {}.syncs").format(sql.Identifier(schema)))


# -- the measurements (in a child process) ------------------------------------------


class _OneRound:
    """A clock whose first sleep stops run_forever: exactly one round, no time passes."""

    def __init__(self, at: datetime, stop: threading.Event) -> None:
        self._at = at
        self._stop = stop

    def now(self) -> datetime:
        return self._at

    def sleep(self, seconds: float) -> None:  # noqa: ARG002 - the loop's delay is not waited
        self._stop.set()


def _disk_pages() -> float:
    """
    4 KiB pages this process has read from storage (not the OS's page
    cache) so far, or NaN where the OS does not say.
    """
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1]) / 4096
    except OSError:
        pass
    return math.nan


def _per_call(calls: int, body: Callable[[int], object], out: dict[str, float], key: str) -> None:
    """out[key]: microseconds per call; out[key_disk]: pages read from the disk per call."""
    disk = _disk_pages()
    t = time.perf_counter()
    for i in range(calls):
        body(i)
    out[key] = (time.perf_counter() - t) / calls * 1e6
    if not math.isnan(disk):
        out[f"{key}_disk"] = (_disk_pages() - disk) / calls


def measure_idle(kind: str, where: str, n: int, repeat: int) -> dict[str, float]:
    """In a child, at T0 (nothing due): the per-call costs of FLAT, and peak RSS."""
    from cohortsync.testing import FakeClock

    store = _open(kind, where)
    try:
        scheduler = _scheduler(store, FakeClock(T0))
        # Distinct syncs, none read before by this process: every size pays
        # for one store read and one decoded definition per call.
        rng = random.Random(repeat)
        ids = [f"s{i:07d}" for i in rng.sample(range(n), min(n, 1_000))]
        out: dict[str, float] = {}
        warm = scheduler.run_due()  # warm: connections, statement caches
        assert not warm, f"{len(warm)} runs were due at T0: the idle phase would not be idle"
        _per_call(300, lambda _: scheduler.run_due(), out, "idle")
        assert not scheduler.run_due(), "something was due at T0"
        _per_call(len(ids), lambda i: scheduler.next_run(ids[i]), out, "next_run")

        def one_round(_: int) -> None:
            stop = threading.Event()
            worker = cs.Scheduler(store, clock=_OneRound(T0, stop), seed=0)
            worker.run_forever(stop, idle=30.0)

        _per_call(100, one_round, out, "forever")
        horizon = T0 + timedelta(hours=1)
        _per_call(20, lambda _: scheduler.upcoming(horizon, limit=1_000), out, "upcoming")
        # 1,000 runs at every size, but not of as many syncs: at 1,000 syncs
        # the 50 real-time ones fill most of the hour (20 runs each from one
        # read), at a million each run is another sync's, read and decoded.
        # The syncs listed grow with N up to the limit; the cost per sync
        # listed is what must stay flat, the cost per call is reported beside it.
        shown = scheduler.upcoming(horizon, limit=1_000)
        syncs = len({u.sync_id for u in shown})
        out["upcoming_rows"] = len(shown)
        out["upcoming_syncs"] = syncs
        out["upcoming_row"] = out["upcoming"] / max(syncs, 1)
        if "upcoming_disk" in out:
            out["upcoming_row_disk"] = out["upcoming_disk"] / max(syncs, 1)
        daily = cs.SyncPolicy.daily(first_run="next_slot")
        _per_call(
            200,
            lambda i: scheduler.create_sync("empty", "noop", daily, sync_id=f"new-{repeat}-{i}"),
            out,
            "create",
        )
        # The worker's peak so far; the full listing below holds its output
        # (a run per item, 55,000 at a million syncs), so it comes last.
        out["rss"] = peak_rss_mb()
        until = T0 + timedelta(minutes=1)
        listed = [0]

        def listing(_: int) -> None:
            listed[0] = sum(1 for _ in scheduler.iter_upcoming(until))

        for key in ("upcoming_item", "upcoming_item_cold"):
            if key == "upcoming_item_cold":
                _converter.load_sync.cache_clear()
                _converter._load_policy.cache_clear()  # noqa: SLF001 - as a fresh process has it
            _per_call(1, listing, out, key)
            out[key] /= max(listed[0], 1)
            if f"{key}_disk" in out:
                out[f"{key}_disk"] /= max(listed[0], 1)
        out["upcoming_items"] = listed[0]
    finally:
        store.close()
    return out


def measure_burst(kind: str, where: str, repeat: int) -> dict[str, float]:
    """In a child, an hour and a minute after repeat's hour: runs/s of BURST runs."""
    from cohortsync.testing import FakeClock

    store = _open(kind, where)
    try:
        clock = FakeClock(T0 + timedelta(hours=repeat + 1, minutes=1))
        scheduler = _scheduler(store, clock)
        disk = _disk_pages()
        t = time.perf_counter()
        runs = scheduler.run_due(limit=BURST)
        seconds = time.perf_counter() - t
        # A small store has fewer due than BURST (1,000 syncs: about 330).
        found = {"burst": len(runs) / seconds, "burst_runs": len(runs), "rss_burst": peak_rss_mb()}
        if not math.isnan(disk):
            found["burst_disk"] = (_disk_pages() - disk) / max(len(runs), 1)
        return found
    finally:
        store.close()


# -- the scenario --------------------------------------------------------------------


@contextlib.contextmanager
def _stores(kind: str, sizes: tuple[int, ...]) -> Iterator[dict[int, str]]:
    """A store per size (a file, or a schema), removed afterwards."""
    if kind == "sqlite":
        directory = tempfile.mkdtemp(prefix="cohortsync-scale-")
        try:
            yield {n: os.path.join(directory, f"scale-{n}.db") for n in sizes}
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    import psycopg
    from psycopg import sql

    dsn = os.environ["COHORTSYNC_TEST_POSTGRES_DSN"]
    tag = f"{os.getpid()}_{int(time.time())}"
    where = {n: f"{dsn}#cs_scale_{tag}_{n}" for n in sizes}
    try:
        yield where
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for w in where.values():
                schema = w.split("#", 1)[1]
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )


def _rounds(sizes: tuple[int, ...], repeats: int) -> Iterator[tuple[int, int]]:
    for r in range(repeats):
        for n in sizes if r % 2 == 0 else sizes[::-1]:
            yield r, n


def _measure(kind: str, sizes: tuple[int, ...], repeats: int) -> dict[int, dict[str, list[float]]]:
    found: dict[int, dict[str, list[float]]] = {n: {} for n in sizes}

    def keep(n: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            found[n].setdefault(key, []).append(value)

    with _stores(kind, sizes) as where:
        for n in sizes:
            keep(n, child("sc_scale.build", (kind, where[n], n)))
        for r, n in _rounds(sizes, repeats):
            keep(n, child("sc_scale.measure_idle", (kind, where[n], n, r)))
        for r, n in _rounds(sizes, repeats):
            keep(n, child("sc_scale.measure_burst", (kind, where[n], r)))
    return found


def _rows(kind: str, found: dict[int, dict[str, list[float]]], sizes: tuple[int, ...]) -> list[Row]:
    store = {"sqlite": "SQLite", "postgres": "PostgreSQL"}[kind]
    small, large = sizes[0], sizes[-1]

    def sample(n: int, key: str) -> Sample:
        return Sample(tuple(found[n][key]))

    def medians(key: str, fmt: str) -> str:
        return ", ".join(f"{n:,}: {format(sample(n, key).median, fmt)}" for n in sizes)

    def disk(key: str, per: str = "call") -> str:
        """The pages read from the disk per call (run, item), where the OS says."""
        if not all(f"{key}_disk" in found[n] for n in sizes):
            return ""
        return f"; disk pages read per {per}: {medians(f'{key}_disk', '.2f')}"

    def flat(_ours: float, _base: float | None, ratio: float | None) -> bool:
        return ratio is not None and ratio <= 1.15

    limit = 120 if kind == "sqlite" else 300

    def in_time(ours: float, _base: float | None, _ratio: float | None) -> bool:
        return ours < limit

    def against_small(key: str, what: str, unit: str, note: str, *, inverse: bool = False) -> Row:
        """The value at the largest store against the smallest; goal: flat."""
        return Row.measured(
            f"scale, {store}: {what}, {large:,} vs {small:,} syncs",
            sample(large, key),
            sample(small, key),
            unit=unit,
            goal="<= 1.15x",
            met=flat,
            inverse=inverse,
            note=note,
        )

    rows = [
        against_small(
            key,
            what,
            unit,
            f"medians by syncs: {medians(key, '.1f')}"
            + (
                f"; items listed: {medians('upcoming_items', ',.0f')}"
                if key.startswith("upcoming_item")
                else ""
            )
            + (
                f"; syncs listed: {medians('upcoming_syncs', ',.0f')}; runs listed: "
                f"{medians('upcoming_rows', ',.0f')}; us per call: {medians('upcoming', ',.0f')}"
                if key == "upcoming_row"
                else ""
            )
            + disk(key, unit.split("/")[1]),
        )
        for key, what, unit in FLAT
    ]
    rows.append(
        against_small(
            "burst",
            f"hourly burst, first {BURST:,} runs",
            "runs/s",
            f"ratio = runs/s at {small:,} / at {large:,}; medians: {medians('burst', ',.0f')}"
            + disk("burst", "run"),
            inverse=True,
        )
    )
    rows.append(
        against_small(
            "rss", "worker peak RSS (the flat calls)", "MB", f"medians: {medians('rss', '.0f')}"
        )
    )
    rows.extend(
        Row.measured(
            f"scale, {store}: create_syncs() of {n:,} syncs (bulk, once)",
            sample(n, "build"),
            None,
            unit="s",
            goal=f"1M: < {limit} s",
            met=in_time if n == 1_000_000 else None,
            note=f"{n / sample(n, 'build').median:,.0f} syncs/s",
        )
        for n in sizes
    )
    return rows


def scenario_scale(sizes: tuple[int, ...] | None = None, repeats: int = REPEATS) -> list[Row]:
    """The scale rows, SQLite then (with a server) PostgreSQL."""
    sizes = sizes or _sizes()
    kinds = ["sqlite"]
    if os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN"):
        kinds.append("postgres")
    rows: list[Row] = []
    for kind in kinds:
        rows.extend(_rows(kind, _measure(kind, sizes, repeats), sizes))
    return rows


__all__ = ["scenario_scale"]
