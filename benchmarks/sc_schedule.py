"""
Scenarios about the schedule: next-run computation against APScheduler 3's
matching triggers, slot spread through the Scheduler on SQLite, and the peer
scheduler (APScheduler 3 with its SQLAlchemy job store) running n due jobs.

Every ratio follows SPEC section 9, "How to measure": both sides interleaved
(``measure.interleaved``), every cache of the library cleared before each
repeat of each side (:func:`clear_caches`), inputs that do not repeat.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import tempfile
import threading
import time
import zoneinfo
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from datetime import time as dt_time
from functools import partial
from typing import Any

from common import START, Noop, Row
from measure import REPEATS, Sample, interleaved

import cohortsync as cs
from cohortsync import _schedule
from cohortsync.storage import SQLiteStorage
from cohortsync.testing import FakeClock

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)


def clear_caches() -> None:
    """
    The ``prepare`` hook of every scenario here: clear every memo of the
    library, then collect garbage.

    Every functools cache of every loaded ``cohortsync`` module is cleared
    (the schedule's grid-instant memo, parsed sync definitions, SQL text), so
    a cache added later is cleared too; and the ``zoneinfo`` cache, which
    holds the zones a zoned daily sync looks up on every call.
    """
    seen: set[int] = set()
    for name, module in list(sys.modules.items()):
        if name != "cohortsync" and not name.startswith("cohortsync."):
            continue
        for obj in list(vars(module).values()):
            clear = getattr(obj, "cache_clear", None)
            if callable(clear) and id(obj) not in seen:
                seen.add(id(obj))
                clear()
    zoneinfo.ZoneInfo.clear_cache()
    gc.collect()


# -- 5: next-run computation -------------------------------------------------------

NEXT_RUN_FROM = datetime(2000, 1, 1, tzinfo=_UTC)
"""Inputs are random instants from here (a UTC midnight: the peers' anchor) ..."""
NEXT_RUN_UNTIL = datetime(2400, 1, 1, tzinfo=_UTC)
"""... to here: 400 years, so that even daily results rarely repeat (146,000 days)."""
HOURLY_OFFSET = 23 * 60 + 5
DAILY_OFFSET = 10 * 3_600 + 23 * 60 + 5
"""10:23:05, clear of the hours a daylight-saving change skips or repeats."""
CHECK_SAMPLE = 1_000
"""Inputs per round on which each pair's next times are compared before timing."""


def random_instants(n: int, seed: int) -> list[datetime]:
    """
    *n* aware UTC instants with microseconds, uniform between
    :data:`NEXT_RUN_FROM` and :data:`NEXT_RUN_UNTIL`.
    """
    rng = random.Random(seed)
    span = int((NEXT_RUN_UNTIL - NEXT_RUN_FROM).total_seconds())
    return [
        NEXT_RUN_FROM
        + timedelta(seconds=rng.randrange(span), microseconds=rng.randrange(1_000_000))
        for _ in range(n)
    ]


def check_same(
    ours: Callable[[datetime], object],
    peer: Callable[[datetime], object],
    afters: Sequence[datetime],
    limit: int = CHECK_SAMPLE,
) -> int:
    """
    Assert that *ours* and *peer* give the same next time on up to *limit*
    of *afters*; return how many were compared.

    Inputs within a millisecond of a whole second are skipped: every slot is a
    whole second, and only at a slot instant itself do "strictly after" (ours)
    and "at or after" (APScheduler) differ; far from the epoch APScheduler's
    float timestamps are also only a few microseconds exact.
    """
    checked = 0
    for after in afters:
        if not 1_000 <= after.microsecond < 999_000:
            continue
        mine, theirs = ours(after), peer(after)
        if mine != theirs:
            raise AssertionError(
                f"next time after {after.isoformat()}: ours {mine!r}, peer {theirs!r}"
            )
        checked += 1
        if checked >= limit:
            break
    return checked


@dataclass(frozen=True)
class _Pair:
    """One cadence and the APScheduler 3 trigger that matches it."""

    label: str
    policy: cs.SyncPolicy
    offset: int
    trigger: Any
    peer: str
    goal: float = 2.0
    """The ratio to APScheduler that SPEC section 9 (or issue 17) asks for."""
    croniter: tuple[str, str] | None = None
    """A cron expression and zone to time croniter on too (a reported row)."""


def _pairs() -> list[_Pair]:
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    hours, rest = divmod(DAILY_OFFSET, 3_600)
    minutes, seconds = divmod(rest, 60)
    return [
        _Pair(
            "hourly",
            cs.SyncPolicy.hourly(),
            HOURLY_OFFSET,
            IntervalTrigger(
                hours=1, start_date=NEXT_RUN_FROM + timedelta(seconds=HOURLY_OFFSET), timezone=_UTC
            ),
            "IntervalTrigger(hours=1)",
        ),
        _Pair(
            "daily UTC",
            cs.SyncPolicy.daily(),
            DAILY_OFFSET,
            IntervalTrigger(
                days=1, start_date=NEXT_RUN_FROM + timedelta(seconds=DAILY_OFFSET), timezone=_UTC
            ),
            "IntervalTrigger(days=1)",
        ),
        _Pair(
            "real-time",
            cs.SyncPolicy.realtime(),
            0,
            IntervalTrigger(minutes=1, start_date=NEXT_RUN_FROM, timezone=_UTC),
            "IntervalTrigger(minutes=1)",
        ),
        _Pair(
            "daily Europe/Berlin",
            cs.SyncPolicy.daily("Europe/Berlin"),
            DAILY_OFFSET,
            CronTrigger(hour=hours, minute=minutes, second=seconds, timezone="Europe/Berlin"),
            f"CronTrigger(hour={hours}, minute={minutes}, second={seconds}, Europe/Berlin)",
        ),
    ]


def _rate_side(
    rounds: list[list[Any]],
    loop: Callable[[list[Any]], None],
    after: Callable[[], None] | None = None,
) -> Callable[[], float]:
    """
    A side of :func:`measure.interleaved`: its k-th call times *loop* over the
    inputs of round k (so both sides of a round get the same inputs) and
    returns calls per second. *after* runs once the clock has stopped.
    """
    feed = iter(rounds)

    def side() -> float:
        inputs = next(feed)
        t = time.perf_counter()
        loop(inputs)
        elapsed = time.perf_counter() - t
        if after is not None:
            after()
        return len(inputs) / elapsed

    return side


def scenario_next_run(
    n: int = 200_000, *, repeats: int | None = None, checked: dict[str, int] | None = None
) -> list[Row]:
    """
    Next-run computations per second, ours against the matching APScheduler 3
    trigger for each cadence, on fresh random instants in every round.

    Args:
        n: Calls per repeat of each side.
        repeats: Rounds (default: ``measure.REPEATS``).
        checked: If given, receives how many inputs each pair was compared on
            (ours equal to APScheduler's) before timing.
    """
    repeats = REPEATS if repeats is None else repeats
    found: dict[str, int] = {} if checked is None else checked
    rows: list[Row] = []
    for index, pair in enumerate(_pairs()):
        seeds = [1_000 * index + round_ for round_ in range(repeats)]
        rows += _next_run_pair(pair, n, seeds, found)
    return rows


def _next_run_pair(pair: _Pair, n: int, seeds: list[int], checked: dict[str, int]) -> list[Row]:
    """
    The rows of one cadence: each round on fresh instants (one seed per
    round), compared with the peer before timing, then timed interleaved.
    """
    rounds = [random_instants(n, seed) for seed in seeds]
    policy, offset, trigger = pair.policy, pair.offset, pair.trigger
    next_due = _schedule.next_due
    peer_next = trigger.get_next_fire_time

    def ours_one(after: datetime) -> datetime | None:
        return next_due(policy, NEXT_RUN_FROM, offset, after)

    compared = sum(check_same(ours_one, lambda a: peer_next(None, a), r) for r in rounds)
    checked[pair.label] = compared

    def ours(afters: list[datetime]) -> None:
        f, anchor = next_due, NEXT_RUN_FROM
        for a in afters:
            f(policy, anchor, offset, a)

    def peer(afters: list[datetime]) -> None:
        g = peer_next
        for a in afters:
            g(None, a)

    grid_memo = _schedule._grid_instant  # noqa: SLF001 - the memo the audit found
    memo_hits: list[float] = []

    def record_memo() -> None:
        info = grid_memo.cache_info()
        if info.hits + info.misses:
            memo_hits.append(info.hits / (info.hits + info.misses))

    sides = {
        "ours": _rate_side(rounds, ours, record_memo),
        "apscheduler": _rate_side(rounds, peer),
    }
    cron_compared = 0
    if pair.croniter is not None:
        cron_one, cron_loop = _croniter_sides(*pair.croniter)
        cron_compared = sum(check_same(ours_one, cron_one, r) for r in rounds)
        checked[f"{pair.label} (croniter)"] = cron_compared
        sides["croniter"] = _rate_side(rounds, cron_loop)
    integer_grid = pair.label == "hourly"
    if integer_grid:

        def ours_seconds(after: datetime) -> int:
            due = ours_one(after)
            assert due is not None
            return int((due - _EPOCH).total_seconds())

        checked["hourly (integer grid)"] = sum(
            check_same(
                lambda a: _schedule.next_due_ts(3_600, offset, a.timestamp()), ours_seconds, r
            )
            for r in rounds
        )

        def ours_ts(stamps: list[float]) -> None:
            f = _schedule.next_due_ts
            for s in stamps:
                f(3_600, offset, s)

        stamps = [[a.timestamp() for a in afters] for afters in rounds]
        sides["ours_ts"] = _rate_side(stamps, ours_ts)
    samples = interleaved(sides, repeats=len(seeds), prepare=clear_caches)
    memo = (
        f"; grid memo hit on {max(memo_hits):.1%} of calls at most (cleared before each repeat)"
        if memo_hits
        else "; no result memo on this path"
    )
    inputs = (
        f"{n:,} fresh random instants {NEXT_RUN_FROM.year}-{NEXT_RUN_UNTIL.year} per round "
        f"(seeds {seeds[0]}..{seeds[-1]}), the same for both sides"
    )
    rows = [
        Row.measured(
            f"next run, {pair.label} (datetime API)",
            samples["ours"],
            samples["apscheduler"],
            unit="calls/s",
            goal=f">= {pair.goal:g}x APScheduler",
            met=lambda _o, _b, r: r is not None and r >= pair.goal,
            note=(
                f"baseline: APScheduler 3 {pair.peer}.get_next_fire_time; {inputs}; "
                f"equal on {compared:,} sampled inputs{memo}"
            ),
        )
    ]
    if pair.croniter is not None:
        rows.append(
            Row.measured(
                f"next run, {pair.label} vs croniter",
                samples["ours"],
                samples["croniter"],
                unit="calls/s",
                goal="report",
                met=None,
                note=(
                    f"baseline: croniter {_croniter_version()} croniter({pair.croniter[0]!r}), "
                    "set_current(after in the zone) then get_next(datetime) per input, "
                    f"timed in the same interleaved rounds; {inputs}; "
                    f"equal on {cron_compared:,} sampled inputs"
                ),
            )
        )
    if integer_grid:
        rows.append(
            Row.measured(
                "next run, hourly (integer grid, next_due_ts)",
                samples["ours_ts"],
                samples["apscheduler"],
                unit="calls/s",
                goal="report",
                met=None,
                note=(
                    "integers in and out (epoch seconds): not like-for-like with a datetime "
                    f"API; baseline: the same {pair.peer} repeats; {inputs}"
                ),
            )
        )
    return rows


# -- 5b: next-run computation of the schedules of issue 17 -------------------------

EVERY_OFFSET = 7 * 60 + 5
"""An every(15 min) slot 7 min 5 s into each quarter hour."""


def _croniter_sides(
    expression: str, zone_name: str
) -> tuple[Callable[[datetime], datetime], Callable[[list[datetime]], None]]:
    """
    croniter as a host would use it for "the next run after *after*": one
    iterator, moved to each input (in the expression's zone) and asked once.
    Returns a one-input function (for the comparison) and the timed loop.
    """
    from croniter import croniter

    zone = zoneinfo.ZoneInfo(zone_name)
    it = croniter(expression, NEXT_RUN_FROM.astimezone(zone))

    def one(after: datetime) -> datetime:
        it.set_current(after.astimezone(zone), force=True)
        return it.get_next(datetime)  # type: ignore[no-any-return]

    def loop(afters: list[datetime]) -> None:
        set_current, get_next, tz = it.set_current, it.get_next, zone
        for a in afters:
            set_current(a.astimezone(tz), force=True)
            get_next(datetime)

    return one, loop


def _croniter_version() -> str:
    from importlib.metadata import version

    return version("croniter")


def _schedule_pairs() -> list[_Pair]:
    """
    The new cadences against their APScheduler 3 triggers. The cron
    expressions spell days by name: APScheduler 3 numbers them from Monday
    (its ``from_crontab`` passes ``1-5`` through as Tuesday to Saturday), and
    ANDs the day fields, so only expressions with an unrestricted day of
    month compare like for like.
    """
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    new_york = "America/New_York"
    return [
        _Pair(
            "every 15 min",
            cs.SyncPolicy.every(timedelta(minutes=15)),
            EVERY_OFFSET,
            IntervalTrigger(
                minutes=15,
                start_date=NEXT_RUN_FROM + timedelta(seconds=EVERY_OFFSET),
                timezone=_UTC,
            ),
            "IntervalTrigger(minutes=15)",
        ),
        _Pair(
            "daily at 06:30 America/New_York",
            cs.SyncPolicy.daily(new_york, at=dt_time(6, 30)),
            6 * 3_600 + 30 * 60,
            CronTrigger(hour=6, minute=30, second=0, timezone=new_york),
            "CronTrigger(hour=6, minute=30, America/New_York)",
        ),
        _Pair(
            "cron '0 6 * * mon-fri' America/New_York",
            cs.SyncPolicy.cron("0 6 * * mon-fri", timezone=new_york),
            0,
            CronTrigger.from_crontab("0 6 * * mon-fri", timezone=new_york),
            "CronTrigger.from_crontab('0 6 * * mon-fri', America/New_York)",
            goal=5.0,
            croniter=("0 6 * * mon-fri", new_york),
        ),
        _Pair(
            "cron '*/10 9-17 * 1-6,9-12 mon-fri' UTC",
            cs.SyncPolicy.cron("*/10 9-17 * 1-6,9-12 mon-fri"),
            0,
            CronTrigger.from_crontab("*/10 9-17 * 1-6,9-12 mon-fri", timezone=_UTC),
            "CronTrigger.from_crontab('*/10 9-17 * 1-6,9-12 mon-fri', UTC)",
            goal=5.0,
            croniter=("*/10 9-17 * 1-6,9-12 mon-fri", "UTC"),
        ),
    ]


def scenario_next_run_schedules(
    n: int = 100_000, *, repeats: int | None = None, checked: dict[str, int] | None = None
) -> list[Row]:
    """
    Next-run computations per second of every(), daily(at=...) in a DST zone
    and cron, against APScheduler 3's IntervalTrigger and CronTrigger, by the
    rules of :func:`scenario_next_run` (interleaved, caches cleared, fresh
    inputs every round, compared with the peer before timing).
    """
    repeats = REPEATS if repeats is None else repeats
    found: dict[str, int] = {} if checked is None else checked
    rows: list[Row] = []
    for index, pair in enumerate(_schedule_pairs()):
        seeds = [10_000 + 1_000 * index + round_ for round_ in range(repeats)]
        rows += _next_run_pair(pair, n, seeds, found)
    return rows


# -- 6: slot spread ------------------------------------------------------------------


def _allocate(n: int, mode: str, ratios: list[float], offsets_of: dict[str, list[int]]) -> float:
    """
    Create *n* daily syncs through a Scheduler with ``slot_allocation=mode``
    on a fresh SQLite file; return the microseconds per ``create_sync``.
    The spread of the offsets the store holds goes to *ratios*.
    """
    with tempfile.TemporaryDirectory() as directory:
        storage = SQLiteStorage(os.path.join(directory, "spread.db"))
        try:
            scheduler = cs.Scheduler(
                storage,
                clock=FakeClock(START),
                seed=0,
                slot_allocation=mode,  # type: ignore[arg-type]
            )
            scheduler.add_destination("noop", Noop())
            scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ()))
            daily = cs.SyncPolicy.daily()
            create = scheduler.create_sync
            clear_caches()
            t = time.perf_counter()
            for i in range(n):
                create("c", "noop", daily, sync_id=f"sync-{i}")
            elapsed = time.perf_counter() - t
            by_id = {record.sync.id: record.offset for record in storage.list_syncs()}
        finally:
            storage.close()
    assert len(by_id) == n, (mode, len(by_id))
    offsets = [by_id[f"sync-{i}"] for i in range(n)]
    offsets_of[mode] = offsets
    ratios.append(_schedule.spread_ratio(offsets, 86_400))
    return elapsed / n * 1e6


def scenario_spread(n: int = 100_000, *, repeats: int | None = None) -> list[Row]:
    """
    Slot spread of *n* daily syncs created through the Scheduler on SQLite
    (busiest minute / mean) against the stable hash of each sync id, and what
    the load-aware allocation costs per ``create_sync`` against the same
    Scheduler with ``slot_allocation="hash"``.
    """
    repeats = REPEATS if repeats is None else repeats
    ratios: dict[str, list[float]] = {"balanced": [], "hash": []}
    offsets_of: dict[str, list[int]] = {}
    samples = interleaved(
        {mode: partial(_allocate, n, mode, ratios[mode], offsets_of) for mode in ratios},
        repeats=repeats,
        prepare=clear_caches,
    )
    # The baseline is the stable hash itself; the Scheduler's hash mode stores exactly it.
    hashed = [_schedule.stable_offset(f"sync-{i}:1", 86_400) for i in range(n)]
    assert offsets_of["hash"] == hashed, "slot_allocation='hash' is not the stable hash"
    r_hash = _schedule.spread_ratio(hashed, 86_400)
    return [
        Row.measured(
            f"slot spread, {n:,} daily syncs, Scheduler on SQLite (busiest minute / mean)",
            Sample(tuple(ratios["balanced"])),
            Sample(tuple(r_hash for _ in ratios["balanced"])),
            unit="x",
            goal="<= 1.1",
            met=lambda ours, _b, _r: ours <= 1.1,
            note=(
                "ours: slot_allocation='balanced', a fresh SQLite file per repeat; "
                "baseline: stable hash of each sync id (_schedule.stable_offset, what "
                "slot_allocation='hash' stores, checked)"
            ),
        ),
        Row.measured(
            f"slot allocation cost, {n:,} daily create_sync on SQLite",
            samples["balanced"],
            samples["hash"],
            unit="us/sync",
            goal="report",
            met=None,
            note=(
                "per create_sync, a fresh SQLite file per repeat; baseline: the same "
                "Scheduler with slot_allocation='hash' (no occupancy read)"
            ),
        ),
    ]


# -- the peer: APScheduler 3 with its SQLAlchemy job store ---------------------------

PEER_MISFIRE_GRACE = 86_400
"""Seconds: no job is skipped as missed however long the n jobs take."""
PEER_CLAIM_BATCH = 64
"""Ours: ``run_due(claim_batch=...)``, the knob for many short runs (as in throughput)."""


class _Executions:
    """The peer's job executions, counted per job, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.counts: list[int] = []
        self.left = 0

    def reset(self, n: int) -> None:
        with self.lock:
            self.counts = [0] * n
            self.left = n
            self.done.clear()

    def hit(self, index: int) -> None:
        with self.lock:
            self.counts[index] += 1
            self.left -= 1
            if self.left == 0:
                self.done.set()


EXECUTIONS = _Executions()


def peer_job(index: int) -> None:
    """
    The peer's no-op job: counts its execution. Module level, because the
    SQLAlchemy job store keeps jobs as a reference to their function.
    """
    EXECUTIONS.hit(index)


def _peer_engine(path: str, *, wal: bool) -> Any:
    from sqlalchemy import create_engine, event

    engine = create_engine(f"sqlite:///{path}")
    if wal:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

    return engine


def _peer_side(n: int, timeout: float, wal: bool, ran: list[int]) -> float:
    """
    One repeat of APScheduler: a BackgroundScheduler on a fresh SQLite file,
    started paused, *n* hourly interval jobs due now added (setup), then the
    seconds from ``resume()`` until every job has run once.
    """
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    with tempfile.TemporaryDirectory() as directory:
        engine = _peer_engine(os.path.join(directory, "jobs.db"), wal=wal)
        scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=engine)}, timezone=_UTC
        )
        EXECUTIONS.reset(n)
        scheduler.start(paused=True)
        try:
            due = datetime.now(_UTC)
            for i in range(n):
                scheduler.add_job(
                    peer_job,
                    IntervalTrigger(hours=1, start_date=due, timezone=_UTC),
                    args=(i,),
                    id=f"job-{i:06d}",
                    next_run_time=due,
                    misfire_grace_time=PEER_MISFIRE_GRACE,
                )
            clear_caches()
            t = time.perf_counter()
            scheduler.resume()
            finished = EXECUTIONS.done.wait(timeout)
            elapsed = time.perf_counter() - t
        finally:
            # All n are next due in an hour, so the pass APScheduler makes on
            # shutdown finds nothing; wait=True joins its threads.
            scheduler.shutdown(wait=True)
            engine.dispose()
    counts = list(EXECUTIONS.counts)
    if not finished:
        raise TimeoutError(f"APScheduler ran {sum(counts):,} of {n:,} jobs in {timeout:g} s")
    assert counts == [1] * n, f"APScheduler: {Counter(counts)} (executions: jobs)"
    ran.append(sum(counts))
    return elapsed


def _ours_side(n: int, timeout: float, claim_batch: int, ran: list[int]) -> float:
    """
    One repeat of cohortsync: *n* hourly syncs, first run due now, on a fresh
    SQLite file (setup), then the seconds of ``run_due()`` calls until every
    sync has run once. The fake clock stands still, so nothing else falls due.
    """
    with tempfile.TemporaryDirectory() as directory:
        storage = SQLiteStorage(os.path.join(directory, "syncs.db"))
        try:
            scheduler = cs.Scheduler(storage, clock=FakeClock(START), seed=0)
            scheduler.add_destination("noop", Noop())
            scheduler.add_cohort(cs.Cohort(id="empty", name="Empty", source=lambda: ()))
            hourly = cs.SyncPolicy.hourly()
            for i in range(n):
                scheduler.create_sync("empty", "noop", hourly, sync_id=f"sync-{i:06d}")
            runs: list[cs.SyncRun] = []
            clear_caches()
            t = time.perf_counter()
            while len(runs) < n:
                batch = scheduler.run_due(claim_batch=claim_batch)
                if not batch or time.perf_counter() - t > timeout:
                    break
                runs.extend(batch)
            elapsed = time.perf_counter() - t
            again = scheduler.run_due(claim_batch=claim_batch)
        finally:
            storage.close()
    if len(runs) < n:
        raise TimeoutError(f"cohortsync ran {len(runs):,} of {n:,} syncs ({elapsed:.1f} s)")
    per_sync = Counter(run.sync_id for run in runs)
    assert len(per_sync) == n, f"cohortsync: {len(per_sync):,} distinct syncs ran, not {n:,}"
    assert set(per_sync.values()) == {1}, "cohortsync: a sync ran twice"
    assert not again, f"cohortsync: {len(again)} runs due after all ran"
    bad = [run for run in runs if run.status is not cs.RunStatus.SUCCEEDED]
    assert not bad, bad[:3]
    ran.append(len(runs))
    return elapsed


def scenario_peer(
    n: int = 10_000,
    *,
    repeats: int | None = None,
    timeout: float = 600.0,
    wal: bool = True,
    claim_batch: int = PEER_CLAIM_BATCH,
    ran: dict[str, list[int]] | None = None,
) -> list[Row]:
    """
    The peer row: *n* jobs all due at once, run to completion, on SQLite;
    APScheduler 3.11 (BackgroundScheduler, SQLAlchemyJobStore) against
    cohortsync (Scheduler on SQLiteStorage, a no-op destination, empty cohort).

    Args:
        n: Jobs on one side, syncs on the other.
        repeats: Rounds (default: ``measure.REPEATS``).
        timeout: Seconds one repeat of one side may take.
        wal: Give APScheduler's SQLite file SQLiteStorage's settings (WAL,
            ``synchronous=NORMAL``); without it, every job's update waits for
            a rollback-journal fsync that ours does not pay.
        claim_batch: Ours: ``run_due(claim_batch=...)``.
        ran: If given, receives each side's executions per repeat.
    """
    from apscheduler.util import obj_to_ref, ref_to_obj

    if ref_to_obj(obj_to_ref(peer_job)) is not peer_job:
        raise RuntimeError(f"{obj_to_ref(peer_job)} does not import as this module's peer_job")
    repeats = REPEATS if repeats is None else repeats
    executed: dict[str, list[int]] = {"cohortsync": [], "apscheduler": []} if ran is None else ran
    executed.setdefault("cohortsync", [])
    executed.setdefault("apscheduler", [])
    samples = interleaved(
        {
            "cohortsync": lambda: _ours_side(n, timeout, claim_batch, executed["cohortsync"]),
            "apscheduler": lambda: _peer_side(n, timeout, wal, executed["apscheduler"]),
        },
        repeats=repeats,
        prepare=clear_caches,
    )
    sqlite = "WAL, synchronous=NORMAL as SQLiteStorage" if wal else "SQLAlchemy's default journal"
    return [
        Row.measured(
            f"peer: {n:,} hourly jobs due at once on SQLite, start to all run once",
            samples["cohortsync"],
            samples["apscheduler"],
            unit="s",
            goal="report (audit: 2.5x)",
            met=None,
            inverse=True,
            note=(
                "ratio = APScheduler / ours (x faster); setup excluded, fresh files each "
                "repeat, each job/sync asserted run exactly once; APScheduler 3.11 "
                "BackgroundScheduler + SQLAlchemyJobStore (sqlite file, "
                f"{sqlite}), its defaults: ThreadPoolExecutor(max_workers=10), "
                f"coalesce off, max_instances 1, but misfire_grace_time={PEER_MISFIRE_GRACE} s; "
                f"timed from resume() of a paused scheduler; ours: run_due(claim_batch="
                f"{claim_batch}) in a loop on a standing fake clock, no-op destination, "
                "empty cohort"
            ),
        )
    ]
