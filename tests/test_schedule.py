"""
Tests for the pure schedule math in cohortsync._schedule.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable, Iterator
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cohortsync import _schedule
from cohortsync._clock import require_aware
from cohortsync._policy import Cadence, SyncPolicy
from cohortsync._schedule import (
    GRID_CACHE_SIZE,
    _grid_instant,
    effective_trigger,
    next_after_run,
    next_due,
    next_due_ts,
    period_seconds,
    slot_of,
    slots_between,
    spread_ratio,
    stable_offset,
)
from cohortsync._sync import Trigger
from cohortsync.exceptions import ConfigurationError
from strategies import (
    DST_TIMEZONES,
    aware_datetimes,
    near_dst_transitions,
    offsets,
    policies,
    schedules,
)

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ANCHOR = datetime(2024, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
UTC_CADENCES = (Cadence.HOURLY, Cadence.DAILY, Cadence.REALTIME)

WallTime = tuple[int, int, int, int, int, int]


def seconds(instant: datetime) -> int:
    """
    Whole epoch seconds of *instant*, floored, without float rounding.
    """
    delta = instant - EPOCH
    return delta.days * 86_400 + delta.seconds


def on_grid(instant: datetime, offset: int, period: int) -> bool:
    """
    Whether *instant* is a point of the UTC grid: a whole second, *offset*
    seconds after an epoch-aligned period start.
    """
    return instant.microsecond == 0 and (seconds(instant) - offset) % period == 0


def grid_period(policy: SyncPolicy) -> int:
    period = period_seconds(policy.cadence)
    assert period is not None
    return period


def wall(instant: datetime, zone: ZoneInfo) -> WallTime:
    """
    What a clock on the wall in *zone* shows at *instant*.
    """
    local = instant.astimezone(zone)
    return (local.year, local.month, local.day, local.hour, local.minute, local.second)


def target_wall(day: date, offset: int) -> WallTime:
    return (day.year, day.month, day.day, offset // 3_600, offset // 60 % 60, offset % 60)


def reference_utc_next(cadence: Cadence, offset: int, after: datetime) -> datetime:
    """
    The next UTC grid point after *after*, found by stepping from the start of
    the calendar period before it: no modular arithmetic.
    """
    after = after.astimezone(UTC)
    if cadence is Cadence.HOURLY:
        start, step = after.replace(minute=0, second=0, microsecond=0), timedelta(hours=1)
    elif cadence is Cadence.DAILY:
        start, step = after.replace(hour=0, minute=0, second=0, microsecond=0), timedelta(days=1)
    else:
        start, step = after.replace(second=0, microsecond=0), timedelta(minutes=1)
    candidate = start - step + timedelta(seconds=offset)
    while candidate <= after:
        candidate += step
    return candidate


@functools.cache
def reference_local_slot(zone_name: str, day: date, offset: int) -> datetime:
    """
    The slot of *day* found by brute force: scan every minute within 15 hours of
    the wall time; take the last instant showing it (the later fold), or if none
    does (a gap), the first instant showing a later time, refined to the second.
    """
    zone = ZoneInfo(zone_name)
    target = target_wall(day, offset)
    as_if_utc = seconds(datetime(day.year, day.month, day.day, tzinfo=UTC)) + offset
    matches = []
    first_later = None
    for instant in range(as_if_utc - 15 * 3_600, as_if_utc + 15 * 3_600 + 1, 60):
        shown = wall(datetime.fromtimestamp(instant, UTC), zone)
        if shown == target:
            matches.append(instant)
        elif shown > target and first_later is None:
            first_later = instant
    if matches:
        return datetime.fromtimestamp(max(matches), UTC)
    assert first_later is not None
    for instant in range(first_later - 59, first_later + 1):
        if wall(datetime.fromtimestamp(instant, UTC), zone) > target:
            return datetime.fromtimestamp(instant, UTC)
    raise AssertionError("unreachable: first_later shows a later time")


def reference_local_next(zone_name: str, offset: int, after: datetime) -> datetime:
    local_day = after.astimezone(ZoneInfo(zone_name)).date()
    candidates = [
        reference_local_slot(zone_name, local_day + timedelta(days=shift), offset)
        for shift in range(-2, 3)
    ]
    return min(slot for slot in candidates if slot > after)


def assert_local_slot(zone: ZoneInfo, day: date, offset: int, instant: datetime) -> None:
    """
    Assert that *instant* is the slot of *day*: it shows the offset as wall time
    (in the later fold if that wall time happens twice), or, if that wall time
    is skipped, it is the first instant after the gap.
    """
    target = target_wall(day, offset)
    local = instant.astimezone(zone)
    if wall(instant, zone) == target:
        ambiguous = local.replace(fold=0).utcoffset() != local.replace(fold=1).utcoffset()
        assert (1 if ambiguous else 0) == local.fold
    else:
        assert wall(instant - timedelta(seconds=1), zone) < target < wall(instant, zone)


class TestPeriodSeconds:
    @pytest.mark.parametrize(
        ("cadence", "expected"),
        [
            (Cadence.ONE_TIME, None),
            (Cadence.HOURLY, 3_600),
            (Cadence.DAILY, 86_400),
            (Cadence.REALTIME, 60),
        ],
    )
    def test_values(self, cadence: Cadence, expected: int | None) -> None:
        """
        Each cadence's period is its whole number of seconds.
        """
        assert expected == period_seconds(cadence)


class TestNextDueTs:
    @given(
        period=st.sampled_from([60, 3_600, 86_400]),
        data=st.data(),
        after=st.integers(-(10**12), 10**12),
    )
    def test_smallest_grid_point_after(self, period: int, data: st.DataObject, after: int) -> None:
        """
        The result is the first point of the grid found by counting up from after.
        """
        offset = data.draw(st.integers(0, period - 1))
        expected = next(
            t for t in range(after + 1, after + period + 1) if (t - offset) % period == 0
        )

        assert expected == next_due_ts(period, offset, after)

    @given(
        period=st.sampled_from([60, 3_600, 86_400]),
        data=st.data(),
        after=st.integers(0, 2**40),
        fraction=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    )
    def test_float_input(
        self, period: int, data: st.DataObject, after: int, fraction: float
    ) -> None:
        """
        A fractional timestamp gives the same int as its whole second.
        """
        offset = data.draw(st.integers(0, period - 1))

        actual = next_due_ts(period, offset, after + fraction)

        assert int is type(actual)
        assert next_due_ts(period, offset, after) == actual

    @pytest.mark.parametrize(
        ("after", "expected"), [(7_200, 10_800), (7_200.5, 10_800), (7_199.5, 7_200)]
    )
    def test_on_a_grid_point(self, after: float, expected: int) -> None:
        """
        Being exactly on a grid point gives the next one: always strictly after.
        """
        assert expected == next_due_ts(3_600, 0, after)

    def test_far_future_is_immediate(self) -> None:
        """
        A timestamp 30 billion years out is answered without iterating periods.
        """
        after = 10**18
        expected = after - after % 3_600 + 3_600 + 5

        assert expected == next_due_ts(3_600, 5, after)

    @pytest.mark.parametrize(
        ("period", "offset", "field"),
        [
            (0, 0, "period_seconds"),
            (-60, 0, "period_seconds"),
            (3_600.0, 0, "period_seconds"),
            (3_600, 3_600, "offset"),
            (3_600, -1, "offset"),
            (3_600, 1.0, "offset"),
            (3_600, True, "offset"),
        ],
    )
    def test_rejects_bad_grid(self, period: Any, offset: Any, field: str) -> None:
        """
        A grid that is not a positive period with an offset inside it is refused.
        """
        with pytest.raises(ConfigurationError) as info:
            next_due_ts(period, offset, 0)

        assert field == info.value.field


class TestNextDueUtc:
    @given(schedule=schedules(timezones=()), after=aware_datetimes(any_zone=True))
    def test_matches_reference(self, schedule: tuple[SyncPolicy, int], after: datetime) -> None:
        """
        The result is the smallest grid point strictly after `after`, in UTC.
        """
        policy, offset = schedule

        actual = next_due(policy, ANCHOR, offset, after)

        assert reference_utc_next(policy.cadence, offset, after) == actual
        assert actual is not None
        assert UTC is actual.tzinfo

    @given(schedule=schedules(timezones=()), after=aware_datetimes())
    def test_on_grid_and_strictly_after(
        self, schedule: tuple[SyncPolicy, int], after: datetime
    ) -> None:
        """
        The result is a whole second on the grid, after `after` by at most a period.
        """
        policy, offset = schedule
        period = grid_period(policy)

        actual = next_due(policy, ANCHOR, offset, after)

        assert actual is not None
        assert after < actual <= after + timedelta(seconds=period)
        assert on_grid(actual, offset, period)

    @given(schedule=schedules(timezones=()), after=aware_datetimes())
    def test_agrees_with_next_due_ts(
        self, schedule: tuple[SyncPolicy, int], after: datetime
    ) -> None:
        """
        The datetime and the integer variants give the same instant.
        """
        policy, offset = schedule

        actual = next_due(policy, ANCHOR, offset, after)

        assert actual is not None
        assert next_due_ts(grid_period(policy), offset, after.timestamp()) == seconds(actual)

    @given(schedule=schedules(timezones=()), after=aware_datetimes(), steps=st.integers(2, 30))
    def test_repeated_runs_are_one_period_apart(
        self, schedule: tuple[SyncPolicy, int], after: datetime, steps: int
    ) -> None:
        """
        Feeding each result back in walks the grid one period at a time.
        """
        policy, offset = schedule
        period = timedelta(seconds=grid_period(policy))
        dues = []
        for _ in range(steps):
            due = next_due(policy, ANCHOR, offset, after)
            assert due is not None
            dues.append(due)
            after = due

        assert [period] * (steps - 1) == [b - a for a, b in itertools.pairwise(dues)]

    @given(offset=st.integers(0, 86_399), after=aware_datetimes())
    def test_utc_zone_is_the_utc_grid(self, offset: int, after: datetime) -> None:
        """
        A daily sync in the "UTC" zone runs exactly when a plain daily sync does.
        """
        expected = next_due(SyncPolicy.daily(), ANCHOR, offset, after)

        assert expected == next_due(SyncPolicy.daily("UTC"), ANCHOR, offset, after)

    @given(anchor=aware_datetimes(), after=aware_datetimes())
    def test_anchor_does_not_move_the_grid(self, anchor: datetime, after: datetime) -> None:
        """
        The grid is absolute: the anchor does not change the answer.
        """
        expected = next_due(SyncPolicy.hourly(), ANCHOR, 1_234, after)

        assert expected == next_due(SyncPolicy.hourly(), anchor, 1_234, after)

    @pytest.mark.parametrize(
        ("policy", "offset", "after", "expected"),
        [
            (
                SyncPolicy.hourly(),
                125,
                datetime(2200, 1, 1, tzinfo=UTC),
                datetime(2200, 1, 1, 0, 2, 5, tzinfo=UTC),
            ),
            (
                SyncPolicy.daily(),
                3_600,
                datetime(2200, 6, 15, 12, tzinfo=UTC),
                datetime(2200, 6, 16, 1, tzinfo=UTC),
            ),
            (
                SyncPolicy.realtime(),
                0,
                datetime(2200, 1, 1, 0, 0, 30, tzinfo=UTC),
                datetime(2200, 1, 1, 0, 1, tzinfo=UTC),
            ),
            (
                SyncPolicy.daily("America/New_York"),
                9_000,
                datetime(2200, 7, 1, 12, tzinfo=UTC),
                datetime(2200, 7, 2, 6, 30, tzinfo=UTC),
            ),
            (
                SyncPolicy.hourly(),
                0,
                datetime(9000, 5, 5, 5, 5, 5, tzinfo=UTC),
                datetime(9000, 5, 5, 6, tzinfo=UTC),
            ),
        ],
    )
    def test_far_future(
        self, policy: SyncPolicy, offset: int, after: datetime, expected: datetime
    ) -> None:
        """
        A clock centuries past a 1970 anchor gets the next slot directly, no catching up.
        """
        assert expected == next_due(policy, EPOCH, offset, after)

    def test_one_time_has_no_next_run(self) -> None:
        """
        A one-time sync's single run is at its anchor; there is no next one.
        """
        assert None is next_due(SyncPolicy.one_time(), ANCHOR, 0, ANCHOR)


# -- next_due's fast path against the epoch-seconds reference -------------------

#: Every offset a fixed-offset zone may have: strictly within a day, down to
#: the microsecond.
FIXED_OFFSETS = st.timedeltas(
    min_value=timedelta(hours=-24) + MICROSECOND, max_value=timedelta(hours=24) - MICROSECOND
)
#: Zones an instant may come in: UTC itself, a zero-offset zone that is not the
#: timezone.utc singleton, fixed offsets of any size, and zones with DST.
ANY_ZONE = (
    st.just(UTC)
    | st.just(timezone(timedelta(0), "UTC"))
    | st.sampled_from([ZoneInfo("UTC"), *(ZoneInfo(zone) for zone in DST_TIMEZONES)])
    | FIXED_OFFSETS.map(timezone)
)


class _Instant(datetime):
    """A datetime subclass: not the exact type the fast path takes as it is."""


def reference_epoch_next(
    policy: SyncPolicy, anchor: datetime, offset: int, after: datetime
) -> datetime | None:
    """
    next_due on a UTC grid as it was before it built slots from calendar
    fields: both instants checked and converted by require_aware, *after*
    floored to whole epoch seconds, the integer grid (next_due_ts), and the
    answer built by fromtimestamp (which refuses year 10000).
    """
    require_aware(anchor, "anchor")
    after = require_aware(after, "after")
    if policy.cadence is Cadence.ONE_TIME:
        return None
    return datetime.fromtimestamp(next_due_ts(grid_period(policy), offset, seconds(after)), UTC)


def outcome(compute: Callable[[], datetime | None]) -> object:
    """What *compute* returns, or the type and message of what it raises."""
    try:
        return compute()
    except (TypeError, ValueError, OverflowError) as error:
        return type(error), str(error)


@st.composite
def instants_near_the_grid(draw: st.DrawFn, policy: SyncPolicy, offset: int) -> datetime:
    """
    Grid points of *policy* and *offset* in any year, give or take a
    microsecond or a second (where "strictly after" matters), in any zone.
    """
    period = grid_period(policy)
    first = seconds(datetime(1, 1, 3, tzinfo=UTC)) // period
    last = seconds(datetime(9999, 12, 29, tzinfo=UTC)) // period
    point = EPOCH + timedelta(seconds=draw(st.integers(first, last)) * period + offset)
    shift = draw(st.sampled_from([-1_000_000, -1, 0, 1, 1_000_000]))
    return (point + shift * MICROSECOND).astimezone(draw(ANY_ZONE))


class TestNextDueFastPath:
    """
    next_due builds a UTC grid's slot from its input's calendar fields; the
    answers (and the errors) are those of the epoch-seconds computation it
    replaced, for aware inputs of any year, zone and microsecond.
    """

    @given(
        schedule=schedules(timezones=()),
        after=st.datetimes(timezones=ANY_ZONE),
        anchor=st.datetimes(timezones=ANY_ZONE),
        subclass=st.booleans(),
    )
    @example(
        schedule=(SyncPolicy.hourly(), 3_599),
        after=datetime.max.replace(tzinfo=UTC),
        anchor=ANCHOR,
        subclass=False,
    )
    @example(
        schedule=(SyncPolicy.realtime(), 0),
        after=datetime(9999, 12, 31, 23, 58, 59, 999_999, tzinfo=UTC),
        anchor=ANCHOR,
        subclass=False,
    )
    @example(
        schedule=(SyncPolicy.daily(), 0),
        after=datetime.min.replace(tzinfo=UTC),
        anchor=datetime.min.replace(tzinfo=UTC),
        subclass=True,
    )
    @example(
        schedule=(SyncPolicy.hourly(), 0),
        after=datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
        anchor=ANCHOR,
        subclass=False,
    )
    @settings(max_examples=500)
    def test_equals_the_epoch_seconds_reference(
        self,
        schedule: tuple[SyncPolicy, int],
        after: datetime,
        anchor: datetime,
        subclass: bool,
    ) -> None:
        policy, offset = schedule
        if subclass:
            after = _Instant.combine(after, after.timetz())

        actual = outcome(lambda: next_due(policy, anchor, offset, after))

        assert outcome(lambda: reference_epoch_next(policy, anchor, offset, after)) == actual
        if isinstance(actual, datetime):
            assert type(actual) is datetime
            assert actual.tzinfo is UTC

    @given(schedule=schedules(timezones=()), data=st.data())
    @settings(max_examples=500)
    def test_equals_the_reference_on_and_next_to_grid_points(
        self, schedule: tuple[SyncPolicy, int], data: st.DataObject
    ) -> None:
        policy, offset = schedule
        after = data.draw(instants_near_the_grid(policy, offset))

        actual = next_due(policy, ANCHOR, offset, after)

        assert reference_epoch_next(policy, ANCHOR, offset, after) == actual
        assert actual is not None
        assert after < actual <= after + timedelta(seconds=grid_period(policy))

    @given(
        policy=st.sampled_from(
            [
                SyncPolicy.one_time(),
                SyncPolicy.hourly(),
                SyncPolicy.daily(),
                SyncPolicy.daily("Europe/Berlin"),
                SyncPolicy.realtime(),
            ]
        ),
        naive=st.datetimes(),
        aware=aware_datetimes(any_zone=True),
        which=st.sampled_from(["anchor", "after"]),
    )
    def test_naive_instants_are_refused(
        self, policy: SyncPolicy, naive: datetime, aware: datetime, which: str
    ) -> None:
        anchor, after = (naive, aware) if which == "anchor" else (aware, naive)

        with pytest.raises(TypeError, match=f"{which} must be timezone-aware"):
            next_due(policy, anchor, 0, after)

    @pytest.mark.parametrize(
        "value",
        [
            date(2030, 1, 1),
            time(12, tzinfo=UTC),
            "2030-01-01T00:00:00+00:00",
            1_893_456_000,
        ],
    )
    @pytest.mark.parametrize("which", ["anchor", "after"])
    def test_what_is_not_a_datetime_is_refused(self, value: object, which: str) -> None:
        anchor, after = (value, ANCHOR) if which == "anchor" else (ANCHOR, value)

        with pytest.raises(TypeError, match=f"{which} must be a datetime"):
            next_due(SyncPolicy.hourly(), anchor, 0, after)  # type: ignore[arg-type]


class TestNextDueLocal:
    @settings(max_examples=60, deadline=None)
    @given(data=st.data(), zone=st.sampled_from(DST_TIMEZONES))
    def test_matches_brute_force_near_transitions(self, data: st.DataObject, zone: str) -> None:
        """
        Around DST changes, the result is the first brute-forced local slot after `after`.
        """
        policy = SyncPolicy.daily(zone)
        offset = data.draw(offsets(policy))
        after = data.draw(near_dst_transitions(zone))

        assert reference_local_next(zone, offset, after) == next_due(policy, ANCHOR, offset, after)

    @given(schedule=schedules(cadences=(Cadence.DAILY,)), data=st.data())
    def test_is_a_local_slot(self, schedule: tuple[SyncPolicy, int], data: st.DataObject) -> None:
        """
        Any result is strictly after `after` and is its local day's slot.
        """
        policy, offset = schedule
        zone_name = policy.timezone or "UTC"
        instants = aware_datetimes(any_zone=True)
        if zone_name in DST_TIMEZONES:
            instants |= near_dst_transitions(zone_name)
        after = data.draw(instants)
        zone = ZoneInfo(zone_name)

        actual = next_due(policy, ANCHOR, offset, after)

        assert actual is not None
        assert after < actual
        assert UTC is actual.tzinfo
        assert_local_slot(zone, actual.astimezone(zone).date(), offset, actual)

    @given(data=st.data(), zone=st.sampled_from(DST_TIMEZONES))
    def test_next_run_is_next_local_day(self, data: st.DataObject, zone: str) -> None:
        """
        Feeding a result back in gives the slot of the following local day.
        """
        policy = SyncPolicy.daily(zone)
        offset = data.draw(offsets(policy))
        first = next_due(policy, ANCHOR, offset, data.draw(near_dst_transitions(zone)))
        assert first is not None

        second = next_due(policy, ANCHOR, offset, first)

        assert second is not None
        local = ZoneInfo(zone)
        expected_day = first.astimezone(local).date() + timedelta(days=1)
        assert expected_day == second.astimezone(local).date()

    # Expected UTC instants as a shift from UTC midnight of the local date.
    NEW_YORK_SPRING = (  # 02:00 EST -> 03:00 EDT
        (0, timedelta(hours=5)),
        (5_400, timedelta(hours=6, minutes=30)),  # 01:30 EST
        (7_200, timedelta(hours=7)),  # 02:00 skipped: the transition
        (9_000, timedelta(hours=7)),  # 02:30 skipped: the transition
        (10_800, timedelta(hours=7)),  # 03:00 EDT
        (12_600, timedelta(hours=7, minutes=30)),  # 03:30 EDT
        (43_200, timedelta(hours=16)),
    )
    NEW_YORK_AUTUMN = (  # 02:00 EDT -> 01:00 EST
        (1_800, timedelta(hours=4, minutes=30)),  # 00:30 EDT
        (3_600, timedelta(hours=6)),  # 01:00 twice: the EST one
        (5_400, timedelta(hours=6, minutes=30)),  # 01:30 twice: the EST one
        (7_199, timedelta(hours=6, minutes=59, seconds=59)),  # 01:59:59 EST
        (7_200, timedelta(hours=7)),  # 02:00 EST
        (43_200, timedelta(hours=17)),
    )
    BERLIN_SPRING = (  # 02:00 CET -> 03:00 CEST
        (0, timedelta(hours=-1)),
        (5_400, timedelta(minutes=30)),  # 01:30 CET
        (7_200, timedelta(hours=1)),  # 02:00 skipped: the transition
        (9_000, timedelta(hours=1)),  # 02:30 skipped: the transition
        (10_800, timedelta(hours=1)),  # 03:00 CEST
        (12_600, timedelta(hours=1, minutes=30)),  # 03:30 CEST
        (43_200, timedelta(hours=10)),
    )
    BERLIN_AUTUMN = (  # 03:00 CEST -> 02:00 CET
        (5_400, timedelta(minutes=-30)),  # 01:30 CEST, the evening before in UTC
        (7_200, timedelta(hours=1)),  # 02:00 twice: the CET one
        (9_000, timedelta(hours=1, minutes=30)),  # 02:30 twice: the CET one
        (10_800, timedelta(hours=2)),  # 03:00 CET
        (43_200, timedelta(hours=11)),
    )
    DST_DAYS = (
        ("America/New_York", date(2024, 3, 10), NEW_YORK_SPRING),
        ("America/New_York", date(2024, 11, 3), NEW_YORK_AUTUMN),
        ("America/New_York", date(2025, 3, 9), NEW_YORK_SPRING),
        ("America/New_York", date(2025, 11, 2), NEW_YORK_AUTUMN),
        ("America/New_York", date(2026, 3, 8), NEW_YORK_SPRING),
        ("America/New_York", date(2026, 11, 1), NEW_YORK_AUTUMN),
        ("Europe/Berlin", date(2024, 3, 31), BERLIN_SPRING),
        ("Europe/Berlin", date(2024, 10, 27), BERLIN_AUTUMN),
        ("Europe/Berlin", date(2025, 3, 30), BERLIN_SPRING),
        ("Europe/Berlin", date(2025, 10, 26), BERLIN_AUTUMN),
        ("Europe/Berlin", date(2026, 3, 29), BERLIN_SPRING),
        ("Europe/Berlin", date(2026, 10, 25), BERLIN_AUTUMN),
    )

    @pytest.mark.parametrize(
        ("zone", "day", "offset", "expected"),
        [
            (zone, day, offset, datetime(day.year, day.month, day.day, tzinfo=UTC) + shift)
            for zone, day, table in DST_DAYS
            for offset, shift in table
        ],
    )
    def test_dst_days(self, zone: str, day: date, offset: int, expected: datetime) -> None:
        """
        On DST days a gap slot runs at the transition and a repeated slot in the later fold.
        """
        policy = SyncPolicy.daily(zone)
        eve_noon = datetime(day.year, day.month, day.day, 12, tzinfo=ZoneInfo(zone)) - timedelta(
            days=1
        )

        assert expected == next_due(policy, ANCHOR, offset, eve_noon)
        assert expected == next_due(policy, ANCHOR, offset, expected - MICROSECOND)
        assert expected == slot_of(policy, expected, offset=offset)
        assert expected == slot_of(policy, expected + timedelta(hours=20), offset=offset)

        following = next_due(policy, ANCHOR, offset, expected)
        assert following is not None
        assert day + timedelta(days=1) == following.astimezone(ZoneInfo(zone)).date()
        assert following > slot_of(policy, expected - MICROSECOND, offset=offset) + timedelta(
            hours=40
        )

    @pytest.mark.parametrize(
        ("zone", "year"),
        [
            *(
                (zone, year)
                for zone in (*DST_TIMEZONES, "Asia/Kolkata")
                for year in (2024, 2025, 2026)
            ),
            ("America/Sitka", 1867),  # a whole day repeated
        ],
    )
    def test_one_run_per_local_day_all_year(self, zone: str, year: int) -> None:
        """
        Walking a whole year gives exactly one slot per local date, strictly increasing.
        """
        local = ZoneInfo(zone)
        days = [date(year, 1, 1) + timedelta(days=n) for n in range(366)]
        days = [day for day in days if day.year == year]
        policy = SyncPolicy.daily(zone)
        for offset in (0, 1_800, 3_600, 5_400, 7_199, 7_200, 9_000, 10_800, 12_600, 43_200, 86_399):
            after = datetime(year, 1, 1, tzinfo=local) - MICROSECOND
            dues = []
            for _ in days:
                due = next_due(policy, ANCHOR, offset, after)
                assert due is not None
                dues.append(due)
                after = due

            assert days == [due.astimezone(local).date() for due in dues]
            assert sorted(set(dues)) == dues
            for day, due in zip(days, dues, strict=True):
                assert_local_slot(local, day, offset, due)

    @pytest.mark.parametrize(
        ("offset", "expected_next", "expected_slot"),
        [
            (  # 20:00 on the 18th happens twice; the later one is still to come
                72_000,
                datetime(1867, 10, 19, 5, 1, 13, tzinfo=UTC),
                datetime(1867, 10, 17, 5, 1, 13, tzinfo=UTC),
            ),
            (  # 10:00 on the 19th is happening now for the first time
                36_000,
                datetime(1867, 10, 19, 19, 1, 13, tzinfo=UTC),
                datetime(1867, 10, 17, 19, 1, 13, tzinfo=UTC),
            ),
        ],
    )
    def test_whole_day_repeated(
        self, offset: int, expected_next: datetime, expected_slot: datetime
    ) -> None:
        """
        When Alaska lived a day twice (1867), slots of the repeated day are in the later pass.
        """
        policy = SyncPolicy.daily("America/Sitka")
        # 10:00 on the 19th, the first time round (fold=0), before the clock went
        # back from the 19th 15:30 to the 18th 15:30.
        now = datetime(1867, 10, 19, 10, tzinfo=ZoneInfo("America/Sitka"))

        assert expected_next == next_due(policy, ANCHOR, offset, now)
        assert expected_slot == slot_of(policy, now, offset=offset)


class TestSlotOf:
    @given(schedule=schedules(), when=aware_datetimes(any_zone=True))
    def test_brackets_when(self, schedule: tuple[SyncPolicy, int], when: datetime) -> None:
        """
        The slot is at or before `when`, and the next one is after it.
        """
        policy, offset = schedule

        slot = slot_of(policy, when, offset=offset)

        assert UTC is slot.tzinfo
        assert slot <= when
        following = next_due(policy, ANCHOR, offset, slot)
        assert following is not None
        assert when < following
        assert slot == slot_of(policy, slot, offset=offset)

    @settings(max_examples=50, deadline=None)
    @given(data=st.data(), zone=st.sampled_from(DST_TIMEZONES))
    def test_local_slot_matches_brute_force(self, data: st.DataObject, zone: str) -> None:
        """
        Around DST changes, the slot is the latest brute-forced local slot not after `when`.
        """
        policy = SyncPolicy.daily(zone)
        offset = data.draw(offsets(policy))
        when = data.draw(near_dst_transitions(zone))
        local_day = when.astimezone(ZoneInfo(zone)).date()
        candidates = [
            reference_local_slot(zone, local_day + timedelta(days=shift), offset)
            for shift in range(-2, 3)
        ]

        assert max(c for c in candidates if c <= when) == slot_of(policy, when, offset=offset)

    def test_one_time_has_no_grid(self) -> None:
        """
        Asking for the slot of a one-time sync is a configuration error.
        """
        with pytest.raises(ConfigurationError) as info:
            slot_of(SyncPolicy.one_time(), ANCHOR, offset=0)

        expected = ("cadence", Cadence.ONE_TIME)
        assert expected == (info.value.field, info.value.value)


class TestNoDrift:
    @pytest.mark.parametrize("cadence", UTC_CADENCES)
    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_slots_stay_on_grid(self, cadence: Cadence, seed: int) -> None:
        """
        Random run durations, overruns and restarts never move a sync off its grid.
        """
        rng = random.Random(seed)
        policy = SyncPolicy(cadence=cadence)
        period = grid_period(policy)
        offset = 0 if cadence is Cadence.REALTIME else rng.randrange(period)
        anchor = EPOCH + timedelta(seconds=rng.randrange(60 * 365 * 86_400), microseconds=17)
        start = anchor  # the first run is due immediately
        slots = []
        for _ in range(2_000):
            # Mostly short runs, some longer than several periods.
            share = rng.uniform(0, 0.5) if rng.random() < 0.8 else rng.uniform(0.5, 3.5)
            finish = start + timedelta(seconds=share * period)

            due = next_due(policy, anchor, offset, finish)

            assert due is not None
            # Overlapped slots are coalesced: the first slot after the run, no later.
            assert finish < due <= finish + timedelta(seconds=period)
            assert on_grid(due, offset, period)
            if rng.random() < 0.1:
                # Every worker was down for a while: one catch-up run, in the
                # latest slot, then back on the grid.
                start = due + timedelta(seconds=rng.uniform(period, 5 * period))
                slot = slot_of(policy, start, offset=offset)
                assert due < slot <= start < slot + timedelta(seconds=period)
            else:
                # A worker picking the run up a few seconds late keeps its slot.
                start = due + timedelta(seconds=rng.uniform(0, min(5, period / 2)))
                slot = slot_of(policy, start, offset=offset)
                assert due == slot
            slots.append(slot)

        assert sorted(set(slots)) == slots
        assert all(on_grid(slot, offset, period) for slot in slots)


class TestValidation:
    @pytest.mark.parametrize("policy", [SyncPolicy.one_time(), SyncPolicy.hourly()])
    def test_naive_anchor(self, policy: SyncPolicy) -> None:
        """
        A naive anchor is refused, whatever the cadence.
        """
        with pytest.raises(TypeError, match="anchor"):
            next_due(policy, ANCHOR.replace(tzinfo=None), 0, ANCHOR)

    @pytest.mark.parametrize(
        "policy", [SyncPolicy.one_time(), SyncPolicy.hourly(), SyncPolicy.daily("Europe/Berlin")]
    )
    def test_naive_after(self, policy: SyncPolicy) -> None:
        """
        A naive `after` is refused, whatever the cadence.
        """
        with pytest.raises(TypeError, match="after"):
            next_due(policy, ANCHOR, 0, ANCHOR.replace(tzinfo=None))

    def test_naive_when(self) -> None:
        """
        slot_of refuses a naive instant.
        """
        with pytest.raises(TypeError, match="when"):
            slot_of(SyncPolicy.hourly(), ANCHOR.replace(tzinfo=None), offset=0)

    @pytest.mark.parametrize(
        ("policy", "offset"),
        [
            (SyncPolicy.hourly(), -1),
            (SyncPolicy.hourly(), 3_600),
            (SyncPolicy.hourly(), 1.0),
            (SyncPolicy.hourly(), True),
            (SyncPolicy.hourly(), "0"),
            (SyncPolicy.daily(), 86_400),
            (SyncPolicy.daily("Asia/Kolkata"), 86_400),
            (SyncPolicy.daily("Asia/Kolkata"), -1),
            (SyncPolicy.realtime(), 5),
            (SyncPolicy.one_time(), 1),
        ],
    )
    def test_bad_offset(self, policy: SyncPolicy, offset: Any) -> None:
        """
        An offset outside the cadence's period is refused, naming the field.
        """
        with pytest.raises(ConfigurationError) as info:
            next_due(policy, ANCHOR, offset, ANCHOR)

        assert ("offset", offset) == (info.value.field, info.value.value)

        if policy.cadence is not Cadence.ONE_TIME:
            with pytest.raises(ConfigurationError, match="offset"):
                slot_of(policy, ANCHOR, offset=offset)


class TestStableOffset:
    @pytest.mark.parametrize(
        ("key", "period", "expected"),
        [
            ("sync-1", 86_400, 2_361),
            ("sync-2", 3_600, 1_924),
            ("ünïcødé \U0001f600", 86_400, 23_049),
        ],
    )
    def test_fixed_values(self, key: str, period: int, expected: int) -> None:
        """
        Offsets are pinned: a change of algorithm would move every sync's slot.
        """
        assert expected == stable_offset(key, period)

    @given(key=st.text(), period=st.integers(1, 10**9))
    def test_in_range(self, key: str, period: int) -> None:
        """
        Any key gets an offset inside the period.
        """
        assert 0 <= stable_offset(key, period) < period

    def test_daily_spread(self) -> None:
        """
        100,000 daily keys spread over the day's minutes like a good hash (busiest < 2x mean).
        """
        ratio = spread_ratio((stable_offset(f"sync-{n}", 86_400) for n in range(100_000)), 86_400)

        assert 1.0 < ratio < 2.0

    @pytest.mark.parametrize(
        ("key", "period", "field"),
        [
            (b"sync-1", 3_600, "key"),
            ("sync-1", 0, "period_seconds"),
            ("sync-1", 60.0, "period_seconds"),
        ],
    )
    def test_rejects(self, key: Any, period: Any, field: str) -> None:
        """
        A non-str key or a non-positive period is refused, naming the field.
        """
        with pytest.raises(ConfigurationError) as info:
            stable_offset(key, period)

        assert field == info.value.field


class TestSpreadRatio:
    @pytest.mark.parametrize(
        ("offsets", "expected"),
        [
            (list(range(0, 3_600, 60)), 1.0),  # one per minute: flat
            (list(range(3_600)), 1.0),  # one per second: flat
            ([5] * 1_000, 60.0),  # all in one minute of the hour's 60
            ([0, 1, 60], 40.0),  # busiest minute holds 2 of a mean of 3/60
        ],
    )
    def test_ratio(self, offsets: list[int], expected: float) -> None:
        """
        The ratio is the busiest minute's count over the mean count per minute.
        """
        assert expected == spread_ratio(offsets, 3_600)

    @pytest.mark.parametrize(
        ("offsets", "bucket", "field"),
        [
            ([], 60, "offsets"),
            ([3_600], 60, "offsets"),
            ([-1], 60, "offsets"),
            ([0], 7, "bucket_seconds"),
            ([0], 0, "bucket_seconds"),
        ],
    )
    def test_rejects(self, offsets: list[int], bucket: int, field: str) -> None:
        """
        Empty or out-of-range offsets and buckets that do not divide the period are refused.
        """
        with pytest.raises(ConfigurationError) as info:
            spread_ratio(offsets, 3_600, bucket)

        assert field == info.value.field


# -- a run's place on the grid --------------------------------------------------

RUN_LOW = datetime.fromisoformat("2000-01-01T00:00:00+00:00")
RUN_HIGH = datetime.fromisoformat("2090-01-01T00:00:00+00:00")
RUN_ANCHOR = datetime.fromisoformat("1999-01-01T00:00:00+00:00")


def run_grid(policy: SyncPolicy, offset: int, low: datetime, high: datetime) -> Iterator[datetime]:
    """Every grid slot strictly between *low* and *high*, by walking next_due."""
    at = _schedule.next_due(policy, RUN_ANCHOR, offset, low)
    while at is not None and at < high:
        yield at
        at = _schedule.next_due(policy, RUN_ANCHOR, offset, at)


lateness = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3))


class TestEffectiveTrigger:
    @given(
        trigger=st.sampled_from(Trigger),
        cadence=st.sampled_from(Cadence),
        slot=aware_datetimes(RUN_LOW, RUN_HIGH),
        late=lateness,
    )
    def test_follows_the_history_definitions(
        self, trigger: Trigger, cadence: Cadence, slot: datetime, late: timedelta
    ) -> None:
        """Late by a period or more is a catch-up; host-requested triggers never change."""
        got = effective_trigger(trigger, cadence, slot, slot + late)

        if trigger not in (Trigger.SCHEDULED, Trigger.REALTIME):
            assert trigger == got
        elif cadence is Cadence.ONE_TIME:
            assert Trigger.ONE_TIME == got
        elif cadence.period is not None and late >= cadence.period:
            assert Trigger.CATCH_UP == got
        else:
            expected = Trigger.REALTIME if cadence is Cadence.REALTIME else Trigger.SCHEDULED
            assert expected == got


class TestSlotsBetween:
    @given(
        schedule=schedules(cadences=UTC_CADENCES),
        low=aware_datetimes(RUN_LOW, RUN_HIGH),
        span=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=4)),
    )
    def test_counts_the_grid_strictly_between(
        self, schedule: tuple[SyncPolicy, int], low: datetime, span: timedelta
    ) -> None:
        policy, offset = schedule
        high = low + span
        if policy.cadence is Cadence.REALTIME and span > timedelta(hours=6):
            high = low + timedelta(hours=6)  # keep the brute force small

        assert len(list(run_grid(policy, offset, low, high))) == slots_between(
            policy, offset, low, high
        )


class TestNextAfterRun:
    @given(
        schedule=schedules(cadences=UTC_CADENCES),
        slot=aware_datetimes(RUN_LOW, RUN_HIGH),
        on_grid=st.booleans(),
        late=lateness,
        took=st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=30)),
    )
    def test_every_slot_is_run_or_counted(
        self,
        schedule: tuple[SyncPolicy, int],
        slot: datetime,
        on_grid: bool,
        late: timedelta,
        took: timedelta,
    ) -> None:
        """
        The next due slot is on the grid and after the run's own slot; it is
        the first slot after the run finished, unless a slot fell due while
        the run ran (then that one, at once); and every grid slot skipped in
        between is counted as coalesced.
        """
        policy, offset = schedule
        if on_grid:  # a scheduled slot; otherwise a host's "now"
            slot = _schedule.slot_of(policy, slot, offset=offset)
        started = slot + late
        finished = started + took

        nxt = next_after_run(policy, offset, slot, started, finished)

        assert nxt.due is not None
        assert nxt.due > slot
        assert nxt.due == _schedule.slot_of(policy, nxt.due, offset=offset)
        passed = list(run_grid(policy, offset, max(slot, started), finished))
        # Slots due at or before the start are covered by this run (a catch-up).
        if finished > max(slot, started) and finished == _schedule.slot_of(
            policy, finished, offset=offset
        ):
            passed.append(finished)
        if passed:
            assert passed[-1] == nxt.due  # it fell due while the run ran: next, at once
        else:
            assert nxt.due > finished
            assert nxt.due == _schedule.next_due(policy, RUN_ANCHOR, offset, finished)
        assert slots_between(policy, offset, slot, nxt.due) == nxt.coalesced


def _answer(call: Callable[[], object]) -> object:
    """What *call* returns, or the type of what it raises."""
    try:
        return call()
    except (OverflowError, ValueError, ConfigurationError) as error:
        return type(error)


class TestNextAfterRunOnUtcGrids:
    """
    The epoch-seconds path of next_after_run (UTC grids of whole seconds)
    gives exactly what the general path through the slot functions gives.
    """

    @settings(max_examples=2_000)
    @given(
        st.data(),
        policies(cadences=(Cadence.HOURLY, Cadence.DAILY, Cadence.EVERY, Cadence.REALTIME)),
        aware_datetimes(max_value=datetime(9999, 12, 31, tzinfo=timezone.utc)),
        st.booleans(),
        st.tuples(
            st.timedeltas(min_value=timedelta(hours=-2), max_value=timedelta(days=3)),
            st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3)),
        ),
    )
    def test_same_as_the_general_path(
        self,
        data: st.DataObject,
        policy: SyncPolicy,
        slot: datetime,
        on_grid: bool,
        late_and_took: tuple[timedelta, timedelta],
    ) -> None:
        """Same next slot and coalesced count, or the same error at the end of time."""
        late, took = late_and_took
        offset = data.draw(offsets(policy))
        if on_grid:
            slot = _answer(lambda: _schedule.slot_of(policy, slot, offset=offset))  # type: ignore[assignment]
            if not isinstance(slot, datetime):
                return
        started = _answer(lambda: slot + late)
        finished = _answer(lambda: started + took)  # type: ignore[operator]
        if not isinstance(started, datetime) or not isinstance(finished, datetime):
            return
        general = _answer(
            lambda: _schedule._next_after_run(policy, offset, slot, started, finished)
        )
        assert general == _answer(lambda: next_after_run(policy, offset, slot, started, finished))

    def test_the_fast_path_is_taken(self) -> None:
        """Hourly, daily and real-time syncs take it (so the test above compares two paths)."""
        for policy in (SyncPolicy.hourly(), SyncPolicy.daily(), SyncPolicy.realtime()):
            grid = policy._hour_grid or policy._day_grid or 60
            t = datetime(2030, 1, 1, 12, 0, 30, tzinfo=timezone.utc)
            expected = _schedule._next_after_run(policy, 0, t, t, t)
            assert expected == _schedule._next_on_utc_grid(grid, 0, t, t, t)


class TestGridInstantCache:
    """The grid-instant memo is a bounded LRU: the busy minute survives a flood."""

    def test_a_hot_instant_survives_more_than_the_bound_of_others(self) -> None:
        """The instant every real-time sync asks for stays shared while 10,000+ others pass."""
        _grid_instant.cache_clear()
        minute = seconds(datetime(2030, 1, 1, 12, 1, tzinfo=UTC))
        hot = _grid_instant(minute)
        first_cold = _grid_instant(minute + 86_400)

        for n in range(10_000 + GRID_CACHE_SIZE):
            _grid_instant(minute + 86_400 + 60 * n)
            if n % 100 == 0:
                assert hot is _grid_instant(minute)

        assert hot is _grid_instant(minute)
        assert first_cold is not _grid_instant(minute + 86_400)
        assert GRID_CACHE_SIZE == _grid_instant.cache_info().currsize

    def test_next_due_does_not_use_it(self) -> None:
        """
        Building a slot from its input's fields costs less than a miss of the
        memo, and next-run inputs rarely repeat: next_due keeps out of it.
        """
        _grid_instant.cache_clear()
        for after in [ANCHOR, ANCHOR, ANCHOR + timedelta(seconds=90)]:
            for policy in (SyncPolicy.hourly(), SyncPolicy.daily(), SyncPolicy.realtime()):
                next_due(policy, ANCHOR, 0, after)

        assert (0, 0) == _grid_instant.cache_info()[:2]
