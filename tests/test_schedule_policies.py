"""
The schedules of issue 17: every(), daily(at=...), weekly() and cron(), as
pure schedule math (Hypothesis: monotonic, one run per period, DST across
every transition zoneinfo knows for a sample of zones, to year 2100), and
through the Scheduler on every store (round trips, first run, spreading).
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cohortsync as cs
from cohortsync._cron import parse_cron
from cohortsync._schedule import (
    fixed_offset,
    next_due,
    offset_bound,
    slot_of,
    slots_between,
    spread_period,
    spread_ratio,
)
from cohortsync.advice import recommend
from cohortsync.eligibility import ReasonCode, available_destinations, check_eligibility
from cohortsync.serialization import dumps, loads
from cohortsync.storage import MemoryStorage, SQLiteStorage, Storage
from cohortsync.testing import FakeClock, RecordingDestination
from strategies import (
    aware_datetimes,
    dst_transitions,
    intervals,
    local_times,
    offsets,
    policies,
)

UTC = timezone.utc
NEW_CADENCES = (cs.Cadence.EVERY, cs.Cadence.WEEKLY, cs.Cadence.CRON, cs.Cadence.DAILY)
HORIZON = datetime(2100, 12, 31, tzinfo=UTC)
#: Zones with different DST shapes: both hemispheres, a half-hour shift
#: (Lord Howe), negative DST (Dublin), a midnight fall-back (Sao Paulo), a
#: half-hour offset (St Johns), and a skipped date (Apia, 2011-12-30).
SAMPLE_ZONES = (
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Europe/Dublin",
    "America/Sao_Paulo",
    "America/St_Johns",
    "Pacific/Apia",
)


def walk(policy: cs.SyncPolicy, offset: int, start: datetime, until: datetime) -> list[datetime]:
    """Every run from *start* to *until*, by asking for the next one each time."""
    runs = []
    at = start
    while True:
        nxt = next_due(policy, start, offset, at)
        assert nxt is not None
        if nxt > until:
            return runs
        runs.append(nxt)
        at = nxt


class TestMonotonic:
    """Every new policy's next run is strictly later, on its grid, in constant time."""

    @settings(max_examples=300)
    @given(
        data=st.data(),
        policy=policies(NEW_CADENCES),
        after=aware_datetimes(datetime(1971, 1, 1, tzinfo=UTC), HORIZON, any_zone=True),
    )
    def test_next_is_after_and_is_its_own_slot(
        self, data: st.DataObject, policy: cs.SyncPolicy, after: datetime
    ) -> None:
        """next_due > after, is its own slot, and no slot lies between them."""
        offset = data.draw(offsets(policy))

        nxt = next_due(policy, after, offset, after)

        assert nxt is not None
        assert nxt > after
        assert nxt == slot_of(policy, nxt, offset=offset)
        assert slot_of(policy, nxt - timedelta(microseconds=1), offset=offset) <= after
        assert 0 == slots_between(policy, offset, after, nxt)
        assert nxt < next_due(policy, after, offset, nxt)  # type: ignore[operator]

    @pytest.mark.parametrize(
        "policy",
        [
            cs.SyncPolicy.every(timedelta(minutes=15)),
            cs.SyncPolicy.daily("America/New_York", at=time(2, 30)),
            cs.SyncPolicy.weekly("sun", at=time(2, 30), timezone="Europe/Berlin"),
            cs.SyncPolicy.cron("0 0 29 2 *", timezone="America/New_York"),
            cs.SyncPolicy.cron("*/5 * * * *"),
        ],
        ids=["every", "daily-at", "weekly", "cron-leap", "cron-5"],
    )
    def test_a_clock_200_years_ahead_does_not_loop(self, policy: cs.SyncPolicy) -> None:
        """A far jump costs a handful of steps: the answer comes at once."""
        offset = fixed_offset(policy) or 0
        anchor = datetime(2024, 1, 1, tzinfo=UTC)
        far = datetime(2224, 6, 1, 12, tzinfo=UTC)

        nxt = next_due(policy, anchor, offset, far)

        assert nxt is not None
        assert far < nxt < far + timedelta(days=9 * 366)


class TestEvery:
    """every(n) runs exactly every n, at its offset on an epoch-aligned grid."""

    @given(
        interval=intervals(),
        data=st.data(),
        start=aware_datetimes(datetime(1971, 1, 1, tzinfo=UTC), HORIZON),
    )
    def test_one_run_per_interval_no_drift(
        self, interval: timedelta, data: st.DataObject, start: datetime
    ) -> None:
        """Consecutive runs are one interval apart, and every run is on the grid."""
        policy = cs.SyncPolicy.every(interval)
        period = offset_bound(policy)
        offset = data.draw(st.integers(0, period - 1))
        runs = walk(policy, offset, start, start + interval * 5)

        assert 5 <= len(runs) <= 6
        assert all(b - a == interval for a, b in itertools.pairwise(runs))
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        assert all((r - epoch).total_seconds() % period == offset for r in runs)
        assert len(runs) - 2 == slots_between(policy, offset, runs[0], runs[-1])

    @settings(max_examples=500)
    @given(
        policy=st.sampled_from(
            [cs.SyncPolicy.hourly(), cs.SyncPolicy.daily(), cs.SyncPolicy.daily(at=time(23, 59))]
            + [cs.SyncPolicy.every(timedelta(minutes=m)) for m in (1, 7, 15, 40, 60, 90, 1440)]
            + [cs.SyncPolicy.every(timedelta(hours=h)) for h in (2, 5, 8, 12, 48)]
        ),
        data=st.data(),
        day=st.dates(date(1971, 1, 1), date(2100, 12, 31)),
        second=st.integers(0, 86_399) | st.integers(23 * 3_600, 86_399),
        micro=st.sampled_from([0, 1, 999_999]) | st.integers(0, 999_999),
    )
    def test_calendar_fields_agree_with_epoch_arithmetic(
        self,
        policy: cs.SyncPolicy,
        data: st.DataObject,
        day: date,
        second: int,
        micro: int,
    ) -> None:
        """The fast paths built from calendar fields give the epoch grid's next slot."""
        period = offset_bound(policy)
        offset = fixed_offset(policy)
        if offset is None:
            offset = data.draw(st.integers(0, period - 1) | st.sampled_from([0, period - 1]))
        after = datetime.combine(day, time(), UTC) + timedelta(seconds=second, microseconds=micro)
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        whole = (after - epoch) // timedelta(seconds=1)
        expected = epoch + timedelta(seconds=whole - (whole - offset) % period + period)

        assert expected == next_due(policy, after, offset, after)

    @pytest.mark.parametrize(
        ("bad", "message"),
        [
            (timedelta(seconds=30), "from 1 minute to 7 days"),
            (timedelta(days=7, minutes=1), "from 1 minute to 7 days"),
            (timedelta(minutes=1, seconds=30), "whole number of minutes"),
            (900, "datetime.timedelta"),
        ],
    )
    def test_bad_intervals(self, bad: object, message: str) -> None:
        """Intervals outside 1 minute to 7 days, or not whole minutes, are refused."""
        with pytest.raises(cs.exceptions.ConfigurationError, match=message) as info:
            cs.SyncPolicy.every(bad)  # type: ignore[arg-type]

        assert "interval" == info.value.field


def reference_local_runs(
    zone: ZoneInfo, matches: Callable[[datetime], bool], start: datetime, until: datetime
) -> list[datetime]:
    """
    The runs of a wall-clock schedule by the documented DST rules, found by
    walking UTC minute by minute (independently of the code under test): a
    matching wall time runs when the clock shows it, in the later pass if it
    shows it twice; matching wall times the clock skips run at the end of the
    gap, unless the whole date was skipped.
    """
    runs = []
    at = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    previous = (at - timedelta(minutes=1)).astimezone(zone)
    while at <= until:
        local = at.astimezone(zone)
        wall = local.replace(tzinfo=None)
        before = previous.replace(tzinfo=None)
        run = False
        if wall - before > timedelta(minutes=1):
            skipped = before + timedelta(minutes=1)
            while skipped < wall:
                whole_day_gone = before.date() < skipped.date() < wall.date()
                if matches(skipped) and not whole_day_gone:
                    run = True
                skipped += timedelta(minutes=1)
        first_pass = local.fold == 0 and local.replace(fold=1).utcoffset() != local.utcoffset()
        if matches(wall) and not first_pass:
            run = True
        if run and at > start:
            runs.append(at)
        previous = local
        at += timedelta(minutes=1)
    return runs


def sample_transitions() -> list[tuple[str, datetime]]:
    """Every transition of the sample zones from 1970 to 2100, thinned to every third."""
    out = []
    for zone in SAMPLE_ZONES:
        out.extend((zone, t) for t in dst_transitions(zone, 1970, 2100)[::3])
    return out


TRANSITIONS = sample_transitions()


class TestAcrossEveryTransition:
    """
    Around transitions of a sample of zones, 1970 to 2100, the runs of
    daily(at), weekly and cron follow the documented DST rules exactly.
    """

    @pytest.mark.parametrize("zone_name", SAMPLE_ZONES)
    def test_daily_at_and_weekly(self, zone_name: str) -> None:
        """One run per local date; weekly is daily kept to its days of the week."""
        zone = ZoneInfo(zone_name)
        for at_time in (time(0, 0), time(1, 30), time(2, 30), time(23, 30)):
            daily = cs.SyncPolicy.daily(zone_name, at=at_time)
            weekly = cs.SyncPolicy.weekly(["mon", "thu", "sun"], at=at_time, timezone=zone_name)
            offset = fixed_offset(daily)
            assert offset is not None
            assert offset == fixed_offset(weekly)
            for transition in dst_transitions(zone_name, 1970, 2100):
                start, until = transition - timedelta(days=2), transition + timedelta(days=2)
                day_runs = walk(daily, offset, start, until)
                week_runs = walk(weekly, offset, start, until)
                dates = [r.astimezone(zone).date() for r in day_runs]
                # Exactly one run per local date (a skipped date has none).
                assert len(set(dates)) == len(dates), (zone_name, transition, at_time)
                # Weekly is daily kept to its days: the date its slot belongs
                # to is the day before the wall date only for a gap at midnight.
                kept = [
                    r
                    for r, d in zip(day_runs, dates, strict=True)
                    if slot_date(zone, r, at_time).weekday() in (0, 3, 6)
                ]
                assert kept == week_runs, (zone_name, transition, at_time)

    @pytest.mark.parametrize(
        "expression", ["30 2 * * *", "*/20 * * * *", "0 0,1 * * *", "15 1 * * 0,6"]
    )
    @pytest.mark.parametrize("zone_name", SAMPLE_ZONES[:4])
    def test_cron(self, zone_name: str, expression: str) -> None:
        """A cron schedule's runs equal the minute-by-minute reference around every transition."""
        zone = ZoneInfo(zone_name)
        spec = parse_cron(expression)
        policy = cs.SyncPolicy.cron(expression, timezone=zone_name)

        def matches(wall: datetime) -> bool:
            return (
                wall.minute in spec.minutes
                and wall.hour in spec.hours
                and spec.day_matches(wall.year, wall.month, wall.day)
            )

        for name, transition in TRANSITIONS:
            if name != zone_name:
                continue
            start, until = transition - timedelta(hours=5), transition + timedelta(hours=5)
            expected = reference_local_runs(zone, matches, start, until)

            assert expected == walk(policy, 0, start, until), (zone_name, transition)

    def test_cron_skipped_date(self) -> None:
        """Apia skipped 30 Dec 2011: a cron time that day has no run, the next day has its own."""
        zone = ZoneInfo("Pacific/Apia")
        policy = cs.SyncPolicy.cron("0 6 * * *", timezone="Pacific/Apia")
        start = datetime(2011, 12, 28, 12, tzinfo=zone).astimezone(UTC)

        runs = walk(policy, 0, start, start + timedelta(days=4))

        assert [date(2011, 12, 29), date(2011, 12, 31), date(2012, 1, 1)] == [
            r.astimezone(zone).date() for r in runs[:3]
        ]


def quick_reverts(zone_name: str, first_year: int, last_year: int) -> list[tuple[int, int]]:
    """
    Pairs of offset changes of a zone less than two days apart (epoch
    seconds), found by sampling every three hours.
    """
    zone = ZoneInfo(zone_name)
    step = 3 * 3_600
    start = int(datetime(first_year, 1, 1, tzinfo=UTC).timestamp())
    end = int(datetime(last_year + 1, 1, 1, tzinfo=UTC).timestamp())
    found, last_change = [], None
    previous = datetime.fromtimestamp(start, zone).utcoffset()
    for at in range(start + step, end, step):
        offset = datetime.fromtimestamp(at, zone).utcoffset()
        if offset != previous:
            if last_change is not None and at - last_change <= 2 * 86_400 + step:
                found.append((last_change, at))
            last_change, previous = at, offset
    return found


class TestCronFastPathAssumption:
    """
    The cron fast path assumes no zone changes its offset twice within two
    days (docs: _next_cron). Checked for the sample zones here, for every
    zone from 1900 to 2100 in the slow session.
    """

    @pytest.mark.parametrize("zone_name", SAMPLE_ZONES)
    def test_sample_zones(self, zone_name: str) -> None:
        """No two offset changes within two days, 1970 to 2100."""
        assert [] == quick_reverts(zone_name, 1970, 2100)

    @pytest.mark.slow
    def test_every_zone(self) -> None:
        """No zone zoneinfo knows has two offset changes within two days, 1900 to 2100."""
        import zoneinfo

        bad = {
            name: quick_reverts(name, 1900, 2100) for name in sorted(zoneinfo.available_timezones())
        }
        assert {} == {name: pairs for name, pairs in bad.items() if pairs}


def slot_date(zone: ZoneInfo, run: datetime, at_time: time) -> date:
    """The local date a daily slot belongs to (the day before, for a gap ending at midnight)."""
    local = run.astimezone(zone)
    if local.time() < at_time and local.time() == time(0, 0):
        return local.date() - timedelta(days=1)
    return local.date()


class TestWeekly:
    """weekly() runs on its days only, once each."""

    @given(
        days=st.sets(st.sampled_from(list(cs.Weekday)), min_size=1),
        at_time=local_times(),
        zone=st.sampled_from(SAMPLE_ZONES),
        start=aware_datetimes(datetime(1971, 1, 1, tzinfo=UTC), HORIZON),
    )
    def test_days_of_the_week(
        self, days: set[cs.Weekday], at_time: time, zone: str, start: datetime
    ) -> None:
        """Over four weeks, one run per chosen day (four weeks of them, give or take DST)."""
        policy = cs.SyncPolicy.weekly(days, at=at_time, timezone=zone)
        offset = fixed_offset(policy)
        assert offset is not None
        runs = walk(policy, offset, start, start + timedelta(weeks=4))
        local = [slot_date(ZoneInfo(zone), r, at_time) for r in runs]

        assert {d.weekday() for d in local} <= {day.number for day in days}
        assert len(set(local)) == len(local)
        assert abs(4 * len(days) - len(runs)) <= 1

    def test_names_and_members(self) -> None:
        """Days are given as names or members, one or several; stored sorted, Monday first."""
        policy = cs.SyncPolicy.weekly(["sun", cs.Weekday.MONDAY, "fri", "sun"])

        assert (cs.Weekday.MONDAY, cs.Weekday.FRIDAY, cs.Weekday.SUNDAY) == policy.on
        assert (cs.Weekday.TUESDAY,) == cs.SyncPolicy.weekly("tue").on

    @pytest.mark.parametrize("bad", [[], "monday", ["mon", 3]])
    def test_bad_days(self, bad: object) -> None:
        """No day, or an unknown one, is refused."""
        with pytest.raises(cs.exceptions.ConfigurationError) as info:
            cs.SyncPolicy.weekly(bad)  # type: ignore[arg-type]

        assert "on" == info.value.field


class TestValidation:
    """Each schedule option belongs to its cadences, and is checked."""

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"cadence": "hourly", "at": time(6)}, "at"),
            ({"cadence": "daily", "at": time(6, tzinfo=UTC)}, "at"),
            ({"cadence": "daily", "at": time(6, 0, 0, 5)}, "at"),
            ({"cadence": "daily", "at": "06:00"}, "at"),
            ({"cadence": "daily", "interval": timedelta(hours=1)}, "interval"),
            ({"cadence": "hourly", "on": "mon"}, "on"),
            ({"cadence": "every", "interval": timedelta(hours=1), "timezone": "UTC"}, "timezone"),
            ({"cadence": "daily", "expression": "* * * * *"}, "expression"),
            ({"cadence": "cron"}, "expression"),
            ({"cadence": "one_time", "first_run": "next_slot"}, "first_run"),
            ({"cadence": "hourly", "first_run": "later"}, "first_run"),
            ({"cadence": "cron", "expression": "0 6 * * *", "timezone": "Mars/Base"}, "timezone"),
        ],
    )
    def test_bad_combinations(self, kwargs: dict[str, object], field: str) -> None:
        """The error names the field."""
        with pytest.raises(cs.exceptions.ConfigurationError) as info:
            cs.SyncPolicy(**kwargs)  # type: ignore[arg-type]

        assert field == info.value.field

    def test_properties(self) -> None:
        """period, chosen_time and sub_hourly describe the schedule."""
        every = cs.SyncPolicy.every(timedelta(minutes=15))
        at = cs.SyncPolicy.daily(at=time(6))
        cron = cs.SyncPolicy.cron("*/10 9 * * *")

        assert (timedelta(minutes=15), False, True) == (
            every.period,
            every.chosen_time,
            every.sub_hourly,
        )
        assert (timedelta(days=1), True, False) == (at.period, at.chosen_time, at.sub_hourly)
        assert (None, True, True) == (cron.period, cron.chosen_time, cron.sub_hourly)
        assert not cs.SyncPolicy.every(timedelta(hours=1)).sub_hourly
        assert not cs.SyncPolicy.cron("0 * * * *").sub_hourly

    def test_spread_periods(self) -> None:
        """The allocator counts intervals in their interval, weekly in the day, not cron."""
        assert 900 == spread_period(cs.SyncPolicy.every(timedelta(minutes=15)))
        assert 86_400 == spread_period(cs.SyncPolicy.weekly("mon"))
        assert 86_400 == spread_period(cs.SyncPolicy.daily(at=time(6)))
        assert spread_period(cs.SyncPolicy.cron("0 6 * * *")) is None


# -- through the Scheduler, on every store ---------------------------------------------


START = datetime(2030, 1, 7, 10, 50, tzinfo=UTC)  # a Monday


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage()
    elif request.param == "sqlite":
        sqlite = SQLiteStorage(tmp_path / "s.db")
        yield sqlite
        sqlite.close()
    else:
        dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
        if not dsn:
            if os.environ.get("CI"):
                pytest.fail("COHORTSYNC_TEST_POSTGRES_DSN is not set, and CI must run these")
            pytest.skip("no PostgreSQL server (COHORTSYNC_TEST_POSTGRES_DSN)")
        psycopg = pytest.importorskip("psycopg")
        from cohortsync.storage import PostgresStorage

        pg = PostgresStorage(dsn, schema=f"cs_test_{secrets.token_hex(6)}")
        yield pg
        pg.close()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {pg.schema} CASCADE")


def scheduler_on(store: Storage, clock: FakeClock) -> cs.Scheduler:
    scheduler = cs.Scheduler(store, clock=clock)
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1", "u2"]))
    scheduler.add_destination("d", RecordingDestination())
    return scheduler


NEW_POLICIES = [
    cs.SyncPolicy.every(timedelta(minutes=15)),
    cs.SyncPolicy.every(timedelta(days=2), first_run="next_slot"),
    cs.SyncPolicy.daily("America/New_York", at=time(6, 0)),
    cs.SyncPolicy.weekly(["mon", "wed"], at=time(9, 30), timezone="Europe/Berlin"),
    cs.SyncPolicy.weekly("fri"),
    cs.SyncPolicy.cron("0 6 * * 1-5", timezone="America/New_York"),
    cs.SyncPolicy.cron("*/5 * * * *", first_run="next_slot", on_ineligible="pause"),
    cs.SyncPolicy.hourly(first_run="next_slot"),
]
POLICY_IDS = [
    "every-15m",
    "every-2d",
    "daily-at",
    "weekly-at",
    "weekly",
    "cron",
    "cron-5",
    "hourly",
]


class TestThroughTheStores:
    """Every new policy round-trips through each store and the converter, and runs on its grid."""

    @pytest.mark.parametrize("policy", NEW_POLICIES, ids=POLICY_IDS)
    def test_round_trip_and_first_runs(self, store: Storage, policy: cs.SyncPolicy) -> None:
        """Stored and read back equal; runs at once (or at its slot), then on the grid."""
        clock = FakeClock(START)
        scheduler = scheduler_on(store, clock)
        sync = scheduler.create_sync("c", "d", policy, sync_id="s1")

        assert policy == scheduler.get_sync(sync.id).policy
        assert policy == loads(dumps(policy), cs.SyncPolicy)
        record = store.get_sync(sync.id)
        fixed = fixed_offset(policy)
        if fixed is not None:
            assert fixed == record.offset  # a chosen time is never moved
        first = scheduler.next_run(sync.id)
        assert first is not None
        if policy.first_run is cs.FirstRun.NOW:
            assert START == first
        else:
            # Its first slot: now, if now is one.
            tick = timedelta(microseconds=1)
            assert first == next_due(policy, START, record.offset, START - tick)
        upcoming = [u.at for u in scheduler.upcoming(START + timedelta(days=8))]
        assert upcoming == sorted(upcoming)
        assert upcoming[1:] == walk(policy, record.offset, upcoming[0], upcoming[-1])
        clock.set(first)
        (run,) = scheduler.run_due()
        assert cs.RunStatus.SUCCEEDED is run.status
        assert run.cadence is policy.cadence
        later = scheduler.next_run(sync.id)
        assert later == next_due(policy, START, record.offset, first)

    def test_catch_up_once_for_a_cron(self, store: Storage) -> None:
        """Three days down: one catch-up run of a weekday cron, then back on its times."""
        clock = FakeClock(START)
        scheduler = scheduler_on(store, clock)
        policy = cs.SyncPolicy.cron("0 6 * * 1-5")
        scheduler.create_sync("c", "d", policy, sync_id="s1")
        scheduler.run_due()
        clock.set(START + timedelta(days=3, hours=1))  # Thursday 11:50

        (run,) = scheduler.run_due()

        assert (cs.Trigger.CATCH_UP, datetime(2030, 1, 8, 6, tzinfo=UTC)) == (run.trigger, run.slot)
        assert 2 == run.coalesced  # Wednesday's and Thursday's 06:00
        assert datetime(2030, 1, 11, 6, tzinfo=UTC) == scheduler.next_run("s1")
        assert [] == scheduler.run_due()


class TestSpreading:
    """Chosen times stay put; automatic syncs spread around them."""

    def test_automatic_daily_syncs_avoid_a_crowded_chosen_minute(self) -> None:
        """500 syncs at 06:00 sharp and 1440 automatic ones: the automatic ones skip 06:00."""
        clock = FakeClock(START)
        scheduler = scheduler_on(MemoryStorage(), clock)
        for i in range(500):
            scheduler.create_sync("c", "d", cs.SyncPolicy.daily(at=time(6)), sync_id=f"f{i}")
        automatic = [
            scheduler.create_sync("c", "d", cs.SyncPolicy.daily(), sync_id=f"a{i}").id
            for i in range(1_439)
        ]
        offsets_ = [scheduler.storage.get_sync(s).offset for s in automatic]

        assert all(o // 60 != 360 for o in offsets_)
        assert {6 * 3600} == {scheduler.storage.get_sync(f"f{i}").offset for i in range(500)}
        assert spread_ratio(offsets_, 86_400) <= 1.1

    def test_intervals_spread_within_the_interval(self) -> None:
        """300 syncs every 15 minutes fill the 15 minutes evenly (busiest <= 1.1 x mean)."""
        clock = FakeClock(START)
        scheduler = scheduler_on(MemoryStorage(), clock)
        policy = cs.SyncPolicy.every(timedelta(minutes=15))
        ids = [scheduler.create_sync("c", "d", policy, sync_id=f"e{i}").id for i in range(300)]
        offsets_ = [scheduler.storage.get_sync(s).offset for s in ids]

        assert all(0 <= o < 900 for o in offsets_)
        assert spread_ratio(offsets_, 900) <= 1.1


class TestEligibility:
    """
    Scheduled cadences are open to real-time-ineligible cohorts; sub-hourly
    ones are limited like real time.
    """

    def big(
        self, size: int = 2_000_000, kind: cs.CohortType = cs.CohortType.BEHAVIORAL
    ) -> cs.Cohort:
        return cs.Cohort(id="big", name="Big", type=kind, size=size, source=list)

    @pytest.mark.parametrize("policy", NEW_POLICIES[2:6], ids=POLICY_IDS[2:6])
    def test_scheduled_policies_reach_every_destination(self, policy: cs.SyncPolicy) -> None:
        """A 2M-member funnel cohort can sync daily-at, weekly or by cron to Facebook Ads."""
        cohort = self.big(kind=cs.CohortType.FUNNEL)
        caps = cs.destinations.catalog.FACEBOOK_ADS

        assert check_eligibility(cohort, caps, policy).eligible
        assert "facebook_ads" in available_destinations(cohort, policy)

    def test_sub_hourly_limits(self) -> None:
        """Every 15 minutes: the size and cohort-type limits apply, the destination one not."""
        policy = cs.SyncPolicy.every(timedelta(minutes=15))
        caps = cs.destinations.catalog.FACEBOOK_ADS

        assert {ReasonCode.SUB_HOURLY_SIZE_LIMIT} == check_eligibility(
            self.big(), caps, policy
        ).codes - {ReasonCode.BELOW_MIN_AUDIENCE}
        assert {ReasonCode.SUB_HOURLY_COHORT_TYPE} == check_eligibility(
            self.big(10, cs.CohortType.RETENTION), caps, policy
        ).codes - {ReasonCode.BELOW_MIN_AUDIENCE}
        assert check_eligibility(self.big(10), caps, policy).eligible
        assert [] == available_destinations(self.big(), policy)
        assert available_destinations(self.big(), cs.SyncPolicy.every(timedelta(hours=1)))


class TestAdvice:
    """A sync every 1 to 5 minutes that mostly updates nobody is advised to run hourly."""

    def runs(self, cadence: cs.Cadence, updated: int, count: int = 40) -> list[cs.SyncRun]:
        return [
            cs.SyncRun(
                id=f"r{i}",
                sync_id="s",
                generation=1,
                trigger=cs.Trigger.SCHEDULED,
                slot=START,
                started_at=START,
                finished_at=START,
                status=cs.RunStatus.SUCCEEDED,
                cadence=cadence,
                added=updated,
            )
            for i in range(count)
        ]

    def sync(self, policy: cs.SyncPolicy) -> cs.Sync:
        return cs.Sync(
            id="s",
            cohort_id="c",
            destination_id="d",
            policy=policy,
            created_at=START,
            updated_at=START,
        )

    @pytest.mark.parametrize("minutes", [1, 5])
    def test_short_idle_interval(self, minutes: int) -> None:
        """Idle runs every 1-5 minutes: move to hourly."""
        advice = recommend(
            self.sync(cs.SyncPolicy.every(timedelta(minutes=minutes))),
            self.runs(cs.Cadence.EVERY, 0),
        )

        assert advice is not None
        assert ("short_interval_to_hourly", cs.Cadence.HOURLY) == (
            advice.code,
            advice.suggested_cadence,
        )
        assert 40 == advice.zero_update_runs

    @pytest.mark.parametrize(
        ("minutes", "updated"), [(6, 0), (15, 0), (5, 3)], ids=["6m", "15m", "busy"]
    )
    def test_no_advice(self, minutes: int, updated: int) -> None:
        """Longer intervals, or runs that update members, get no advice."""
        sync = self.sync(cs.SyncPolicy.every(timedelta(minutes=minutes)))

        assert recommend(sync, self.runs(cs.Cadence.EVERY, updated)) is None


class TestCoalescedAcrossDst:
    """
    A catch-up run counts the slots it coalesced as they really were, across a
    spring gap too (an outside test found cron in a zone one short or two over:
    wall times were counted, and a gap's times share one run).
    """

    A = datetime(2030, 3, 8, 12, 0, tzinfo=timezone.utc)
    B = datetime(2030, 3, 11, 15, 0, tzinfo=timezone.utc)

    @pytest.mark.parametrize(
        ("policy", "down", "back", "coalesced"),
        [
            (cs.SyncPolicy.daily("America/New_York", at=time(2, 30)), A, B, 2),
            (cs.SyncPolicy.cron("30 2 * * *", timezone="America/New_York"), A, B, 2),
            (cs.SyncPolicy.cron("*/30 * * * *", timezone="America/New_York"), A, B, 149),
            (cs.SyncPolicy.cron("*/30 * * * *"), A, B, 149),
            (
                cs.SyncPolicy.cron("*/15 * * * *", timezone="Australia/Lord_Howe"),
                datetime(2030, 10, 5, tzinfo=timezone.utc),
                datetime(2030, 10, 8, tzinfo=timezone.utc),
                287,
            ),
        ],
    )
    def test_catch_up_counts_the_real_slots(
        self, policy: cs.SyncPolicy, down: datetime, back: datetime, coalesced: int
    ) -> None:
        clock = FakeClock(down)
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock, seed=0)
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1"]))
        scheduler.add_destination("d", RecordingDestination())
        scheduler.create_sync("c", "d", policy, sync_id="s")
        scheduler.run_due()
        clock.set(back)

        (run,) = scheduler.run_due()

        assert (cs.Trigger.CATCH_UP, coalesced) == (run.trigger, run.coalesced)
