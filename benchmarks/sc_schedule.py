"""
Scenarios about the schedule: next-run computation against APScheduler,
slot spread, the peer scheduler with its job store.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta, timezone

from common import (
    START,
    Noop,
    Row,
    _timed,
)

import cohortsync as cs
from cohortsync import _schedule
from cohortsync.storage import MemoryStorage
from cohortsync.testing import FakeClock

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
