"""
Tests for the cron parser and matcher in cohortsync._cron, and for cron
policies' next runs.

Many cases are ported from the test suites of croniter
(kiorky/croniter, src/croniter/tests/test_croniter.py) and APScheduler 3
(agronholm/apscheduler, tests/test_triggers.py): the expression, the start
and the expected answers are theirs, rewritten for this API. Where their
semantics differ from Vixie cron's (APScheduler numbers days of the week from
Monday and always ANDs the day fields; croniter runs both passes of a
repeated hour), the comment says what changed and why.
"""

# Cron matches wall-clock times, which are naive datetimes by design here.
# ruff: noqa: DTZ001

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohortsync import SyncPolicy
from cohortsync._cron import parse_cron
from cohortsync._schedule import next_due, slot_of, slots_between
from cohortsync.exceptions import ConfigurationError, CronExpressionError
from strategies import CRON_EXPRESSIONS

UTC = timezone.utc
MINUTE = timedelta(minutes=1)


def wall_runs(expression: str, start: datetime, count: int) -> list[datetime]:
    """The next *count* matches after the wall time *start* (naive, UTC policy)."""
    policy = SyncPolicy.cron(expression)
    at = start.replace(tzinfo=UTC)
    out = []
    for _ in range(count):
        nxt = next_due(policy, at, 0, at)
        assert nxt is not None
        out.append(nxt.replace(tzinfo=None))
        at = nxt
    return out


def first(expression: str, start: datetime) -> datetime:
    return wall_runs(expression, start, 1)[0]


def reference_next(expression: str, after: datetime) -> datetime:
    """The next match by checking every day, then every minute of a matching day."""
    spec = parse_cron(expression)
    day = after.date()
    # Forty years: "* * 29 2 */3" (a leap day on a Sunday, Wednesday or
    # Saturday, as Vixie cron ANDs a starred day-of-week) can be 28 years off.
    for _ in range(40 * 366):
        if spec.day_matches(day.year, day.month, day.day):
            for hour in range(24):
                for minute in range(60):
                    at = datetime(day.year, day.month, day.day, hour, minute)
                    if at > after and hour in spec.hours and minute in spec.minutes:
                        return at
        day += timedelta(days=1)
    raise AssertionError("no match within forty years")


class TestParse:
    """Expressions parse to the sets of values cron gives them."""

    @pytest.mark.parametrize(
        ("expression", "minutes", "hours"),
        [
            ("* * * * *", tuple(range(60)), tuple(range(24))),
            ("*/15 * * * *", (0, 15, 30, 45), tuple(range(24))),
            ("1-9/2 0 1 * *", (1, 3, 5, 7, 9), (0,)),  # croniter test_rangeGenerator
            ("0 4/6 * * *", (0,), (4, 10, 16, 22)),  # croniter testBug57: "a/n" runs to the end
            ("0 0/6 * * *", (0,), (0, 6, 12, 18)),  # croniter testBug57
            ("* 5,5,1-6 * * *", tuple(range(60)), (1, 2, 3, 4, 5, 6)),  # testBlockDupRanges
            ("* 4,1-4,5,4 * * *", tuple(range(60)), (1, 2, 3, 4, 5)),  # testBlockDupRanges
            ("30 1-12,0,10-23 15-21 * fri", (30,), tuple(range(24))),  # testOptimize...
        ],
    )
    def test_minutes_and_hours(
        self, expression: str, minutes: tuple[int, ...], hours: tuple[int, ...]
    ) -> None:
        """Lists, ranges, steps and repeats give the sorted set of values."""
        spec = parse_cron(expression)

        assert (minutes, hours) == (spec.minutes, spec.hours)

    @pytest.mark.parametrize(
        ("field", "weekdays"),
        [
            ("2-3,4-5,3,3,3", {2, 3, 4, 5}),  # croniter testBlockDupRanges
            ("wed,fri,mon-thu,tue,tue", {1, 2, 3, 4, 5}),  # croniter testBlockDupRanges
            ("0-6", set(range(7))),
            ("1-7", set(range(7))),  # 7 is Sunday too (croniter testOptimize...)
            ("7", {0}),
            ("SUN-sat", set(range(7))),
        ],
    )
    def test_weekdays(self, field: str, weekdays: set[int]) -> None:
        """Day-of-week names, ranges and Sunday as 7."""
        spec = parse_cron(f"0 0 * * {field}")

        assert weekdays == {w for w in range(7) if spec.weekdays >> w & 1}

    @pytest.mark.parametrize(
        ("expression", "days_or"),
        [
            ("0 0 1 * mon", True),
            ("0 0 * * mon", False),
            ("0 0 1 * *", False),
            ("0 0 */2 * mon", False),  # Vixie: a field starting with "*" does not restrict
            ("0 0 1 * */2", False),
        ],
    )
    def test_day_fields_combine_as_vixie_cron(self, expression: str, days_or: bool) -> None:
        """Both day fields restricted: either matches; one starting with '*': both must."""
        assert days_or == parse_cron(expression).days_or

    @pytest.mark.parametrize(
        ("nickname", "expression"),
        [
            ("@yearly", "0 0 1 1 *"),
            ("@annually", "0 0 1 1 *"),
            ("@monthly", "0 0 1 * *"),
            ("@weekly", "0 0 * * 0"),
            ("@daily", "0 0 * * *"),
            ("@midnight", "0 0 * * *"),
            ("@HOURLY", "0 * * * *"),
        ],
    )
    def test_nicknames(self, nickname: str, expression: str) -> None:
        """The @ nicknames stand for their expressions."""
        assert attrs_without_text(parse_cron(expression)) == attrs_without_text(
            parse_cron(nickname)
        )


def attrs_without_text(spec: object) -> tuple[object, ...]:
    return tuple(getattr(spec, f) for f in ("minutes", "hours", "days", "months", "weekdays"))


class TestErrors:
    """Bad expressions are CronExpressionErrors naming the field, at construction."""

    @pytest.mark.parametrize(
        ("expression", "field", "message"),
        [
            # croniter testError
            ("* * * *", None, "needs 5 fields"),
            ("* * 5-1 * *", "day-of-month", "runs backwards"),
            ("-90 * * * *", "minute", "is not a number"),
            ("a * * * *", "minute", "is not a number"),
            ("* * * janu-jun *", "month", "'janu' is not"),
            ("1-1_0 * * * *", "minute", "is not a number"),
            ("0-10/ * * * *", "minute", "step ''"),
            ("0-1& * * * *", "minute", "is not a number"),
            # ranges and steps
            ("60 * * * *", "minute", "out of range 0-59"),
            ("* 24 * * *", "hour", "out of range 0-23"),
            ("* * 0 * *", "day-of-month", "out of range 1-31"),
            ("* * 32 * *", "day-of-month", "out of range 1-31"),
            ("* * * 13 *", "month", "out of range 1-12"),
            ("* * * * 8", "day-of-week", "out of range 0-7"),
            ("*/0 * * * *", "minute", "step 0"),
            ("*/61 * * * *", "minute", "step 61"),
            ("1,,2 * * * *", "minute", "empty list item"),
            ("* * * * fri-mon", "day-of-week", "runs backwards"),
            # extensions that are not standard cron
            ("0 0 L * *", "day-of-month", "is not a number"),
            ("0 0 * * sat#1", "day-of-week", "is not"),
            ("0 0 * * * 2030", None, "needs 5 fields"),
            ("", None, "needs 5 fields"),
            # never runs: croniter test_bug34 looks for it at run time; we refuse it up front
            ("* * 31 2 *", "day-of-month", "never runs"),
            ("0 0 30,31 2 *", "day-of-month", "never runs"),
            ("0 0 31 4,6,9,11 *", "day-of-month", "never runs"),
            ("0 0 31 2 */2", "day-of-month", "never runs"),
        ],
    )
    def test_bad_expression(self, expression: str, field: str | None, message: str | None) -> None:
        """The error says which field is wrong, and is a ConfigurationError too."""
        with pytest.raises(CronExpressionError) as info:
            SyncPolicy.cron(expression)

        assert field == info.value.cron_field
        assert expression == info.value.expression
        assert "cron" == info.value.field
        assert isinstance(info.value, ConfigurationError)
        if message is not None:
            assert message in str(info.value)

    def test_not_a_string(self) -> None:
        """A cron policy without a string expression is a ConfigurationError."""
        with pytest.raises(ConfigurationError):
            SyncPolicy.cron(None)  # type: ignore[arg-type]

    @pytest.mark.parametrize("expression", ["0 0 29 2 *", "0 0 29 2 1", "0 0 31 * *"])
    def test_rare_is_not_never(self, expression: str) -> None:
        """Leap days and 31sts are rare, not impossible: accepted."""
        SyncPolicy.cron(expression)


class TestPortedNextRuns:
    """Next runs of the cases in croniter's and APScheduler's suites."""

    def test_minute_steps(self) -> None:
        """croniter testMinute: every minute, then every five, across the hour."""
        base = datetime(2010, 1, 23, 12, 18)
        runs = wall_runs("*/1 * * * *", base, 42)
        assert (19, 59, 0, 13) == (runs[0].minute, runs[40].minute, runs[41].minute, runs[41].hour)
        runs = wall_runs("*/5 * * * *", base, 9)
        assert [20, 55, 0] == [runs[0].minute, runs[7].minute, runs[8].minute]

    def test_hour_steps(self) -> None:
        """croniter testHour."""
        runs = wall_runs("0 */3 * * *", datetime(2010, 1, 24, 12, 2), 4)
        assert datetime(2010, 1, 24, 15) == runs[0]
        assert datetime(2010, 1, 25, 0) == runs[3]

    def test_day_steps_and_leap_years(self) -> None:
        """croniter testDay."""
        assert [datetime(2010, 2, 25), datetime(2010, 2, 28), datetime(2010, 3, 1)] == wall_runs(
            "0 0 */3 * *", datetime(2010, 2, 24, 12, 9), 3
        )
        assert [datetime(1996, 2, 28), datetime(1996, 2, 29)] == wall_runs(
            "0 0 * * *", datetime(1996, 2, 27), 2
        )
        assert [datetime(2000, 2, 28), datetime(2000, 2, 29)] == wall_runs(
            "0 0 * * *", datetime(2000, 2, 27), 2
        )

    def test_weekday(self) -> None:
        """croniter testWeekDay and testISOWeekday: names and 7 for Sunday."""
        assert [datetime(2010, 2, 27), datetime(2010, 3, 6)] == wall_runs(
            "0 0 * * sat", datetime(2010, 2, 25), 2
        )
        assert [datetime(2010, 2, 28), datetime(2010, 3, 7)] == wall_runs(
            "0 0 * * 7", datetime(2010, 2, 25), 2
        )

    def test_day_or_weekday(self) -> None:
        """croniter testWeekDay: the 1st or a Wednesday (Vixie's OR)."""
        assert [datetime(2010, 1, 27), datetime(2010, 2, 1), datetime(2010, 2, 3)] == wall_runs(
            "0 0 1 * wed", datetime(2010, 1, 25), 3
        )

    def test_day_and_weekday_with_a_star(self) -> None:
        """
        croniter testWeekDayDayAnd asks for the 1st *and* a Monday with
        day_or=False; Vixie cron ANDs when a day field starts with '*', so the
        same days come from "*/31" (only the 1st) and a Monday.
        """
        assert [datetime(2010, 2, 1), datetime(2010, 3, 1), datetime(2010, 11, 1)] == wall_runs(
            "0 0 */31 * mon", datetime(2010, 1, 25), 3
        )

    def test_month(self) -> None:
        """croniter testMonth."""
        runs = wall_runs("0 0 1 * *", datetime(2010, 1, 25), 12)
        assert (2, 3, 12, 1, 2011) == (
            runs[0].month,
            runs[1].month,
            runs[10].month,
            runs[11].month,
            runs[11].year,
        )

    def test_sunday_to_thursday(self) -> None:
        """croniter testSundayToThursdayWithAlphaConversion."""
        assert datetime(2010, 8, 25, 22, 30) == first(
            "30 22 * * sun-thu", datetime(2010, 8, 25, 15, 56)
        )

    def test_hours_of_a_month(self) -> None:
        """croniter testBug2."""
        assert [datetime(2012, 3, 1, h) for h in range(3)] == wall_runs(
            "0 * * 3 *", datetime(2012, 1, 1), 3
        )

    def test_two_days_of_the_month(self) -> None:
        """croniter testBug3."""
        assert [datetime(2013, 3, 16, 3), datetime(2013, 3, 30, 3), datetime(2013, 4, 16, 3)] == (
            wall_runs("00 03 16,30 * *", datetime(2013, 3, 1, 12, 17, 34, 257877), 3)
        )

    def test_hour_from_a_start(self) -> None:
        """croniter testBug57."""
        assert datetime(2012, 2, 24, 4) == first("0 4/6 * * *", datetime(2012, 2, 24))
        assert datetime(2012, 2, 24, 6) == first("0 0/6 * * *", datetime(2012, 2, 24))

    @pytest.mark.parametrize(
        ("start", "expected"),
        [
            (datetime(2016, 3, 1), datetime(2016, 6, 1)),
            (datetime(2016, 2, 15), datetime(2016, 3, 1)),
            (datetime(2016, 12, 3, 10), datetime(2017, 3, 1)),
        ],
    )
    def test_multiple_months(self, start: datetime, expected: datetime) -> None:
        """croniter test_multiple_months."""
        assert expected == first("0 0 1 3,6,9,12 *", start)

    @pytest.mark.parametrize(
        ("start", "expected"),
        [
            (datetime(2016, 3, 1), datetime(2015, 12, 1)),
            (datetime(2016, 2, 1), datetime(2016, 1, 31)),
            (datetime(2016, 6, 1), datetime(2016, 3, 1)),
        ],
    )
    def test_previous(self, start: datetime, expected: datetime) -> None:
        """croniter test_multiple_months' get_prev cases, as the slot at or before."""
        expression = "0 0 1,15,31 * *" if start.month == 2 else "0 0 1 3,6,9,12 *"
        policy = SyncPolicy.cron(expression)

        got = slot_of(policy, start.replace(tzinfo=UTC) - timedelta(microseconds=1), offset=0)

        assert expected == got.replace(tzinfo=None)

    @pytest.mark.parametrize(
        ("expression", "start", "expected"),
        [
            # APScheduler test_cron_trigger_3: month 2, hours 8-10.
            ("0 8-10 * 2 *", datetime(2009, 1, 1), datetime(2009, 2, 1, 8)),
            # test_cron_weekday_overlap: days 6-10 AND Wed-Fri (APScheduler
            # numbers Monday 0, so its "2-4" is cron's 3-5); a starred day
            # field keeps the AND in Vixie cron: "*" days narrowed by weekday.
            ("0 0 6-10 1 3-5", datetime(2009, 1, 5), datetime(2009, 1, 6)),
            # test_cron_extra_coverage: the 6th or 8th, from the last day of a year.
            ("0 0 6,8 * *", datetime(2009, 12, 31), datetime(2010, 1, 6)),
            # test_cron_increment_weekday: hour 5-6, from 6:xx to the next day.
            ("0 5-6 * * *", datetime(2009, 9, 25, 7), datetime(2009, 9, 26, 5)),
            # test_cron_bad_kwarg's neighbours: the last minute of a year.
            ("59 23 31 12 *", datetime(2009, 6, 1), datetime(2009, 12, 31, 23, 59)),
        ],
    )
    def test_apscheduler_cases(self, expression: str, start: datetime, expected: datetime) -> None:
        """APScheduler 3's CronTrigger cases, translated to 5-field cron."""
        assert expected == first(expression, start - MINUTE)

    def test_leap_day_across_a_skipped_leap_year(self) -> None:
        """2100 is not a leap year: Feb 29 after 2096 is in 2104, found at once."""
        assert datetime(2104, 2, 29) == first("0 0 29 2 *", datetime(2096, 3, 1))

    def test_leap_day_or_monday(self) -> None:
        """'0 0 29 2 1' is Feb 29 or any Monday of February (OR), found at once."""
        assert datetime(2098, 2, 3) == first("0 0 29 2 1", datetime(2097, 3, 1))

    def test_end_of_time(self) -> None:
        """No match before year 10,000 is an error the scheduler turns into 'no next slot'."""
        policy = SyncPolicy.cron("0 0 29 2 *")
        at = datetime(9997, 1, 1, tzinfo=UTC)
        with pytest.raises((OverflowError, ValueError)):
            next_due(policy, at, 0, at)


class TestTimeZones:
    """Cron in a zone follows its wall clock with the daily DST rules."""

    def test_autumn_repeat_runs_once_in_the_later_fold(self) -> None:
        """
        croniter testTimezoneWinterTime: Athens repeats 03:00-04:00 on 27 Oct
        2013. croniter runs '*/30' in both passes; our documented rule runs a
        repeated wall time once, in the later fold, so 03:00 and 03:30 run in
        the second pass only.
        """
        athens = ZoneInfo("Europe/Athens")
        policy = SyncPolicy.cron("*/30 * * * *", timezone="Europe/Athens")
        at = datetime(2013, 10, 27, 2, 0, tzinfo=athens).astimezone(UTC)
        runs = []
        for _ in range(5):
            at = next_due(policy, at, 0, at)  # type: ignore[assignment]
            local = at.astimezone(athens)
            runs.append((local.hour, local.minute, int(local.utcoffset().total_seconds())))  # type: ignore[union-attr]

        assert [(2, 30, 10800), (3, 0, 7200), (3, 30, 7200), (4, 0, 7200), (4, 30, 7200)] == runs

    def test_spring_gap_runs_at_its_end(self) -> None:
        """
        croniter testTimezoneSummerTime: Athens skips 03:00-04:00 on 31 Mar
        2013; 03:00 and 03:30 share one run at 04:00, the end of the gap.
        """
        athens = ZoneInfo("Europe/Athens")
        policy = SyncPolicy.cron("*/30 * * * *", timezone="Europe/Athens")
        at = datetime(2013, 3, 31, 1, 0, tzinfo=athens).astimezone(UTC)
        runs = []
        for _ in range(5):
            at = next_due(policy, at, 0, at)  # type: ignore[assignment]
            local = at.astimezone(athens)
            runs.append((local.hour, local.minute))

        assert [(1, 30), (2, 0), (2, 30), (4, 0), (4, 30)] == runs

    @pytest.mark.parametrize(
        ("start", "expected"),
        [
            # croniter test_std_dst2: Sao Paulo's clock fell back at midnight
            # on 18 Feb 2018 (00:00 -> 23:00 on the 17th).
            (datetime(2018, 2, 17, 21, 0), datetime(2018, 2, 18, 0, 0)),
            (datetime(2018, 2, 17, 23, 5), datetime(2018, 2, 18, 0, 0)),
            (datetime(2018, 2, 18, 0, 0), datetime(2018, 2, 19, 0, 0)),
        ],
    )
    def test_midnight_after_a_fall_back(self, start: datetime, expected: datetime) -> None:
        """Daily at midnight runs once per local day around a midnight fall-back."""
        zone = ZoneInfo("America/Sao_Paulo")
        policy = SyncPolicy.cron("0 0 * * *", timezone="America/Sao_Paulo")
        at = start.replace(tzinfo=zone, fold=1).astimezone(UTC)

        got = next_due(policy, at, 0, at)

        assert got is not None
        assert expected == got.astimezone(zone).replace(tzinfo=None)

    def test_warsaw_hourly_across_the_gap(self) -> None:
        """croniter test_std_dst: hourly at 01:00 on 26 Mar 2017 is next due at 03:00."""
        zone = ZoneInfo("Europe/Warsaw")
        policy = SyncPolicy.cron("0 * * * *", timezone="Europe/Warsaw")
        at = datetime(2017, 3, 26, 1, tzinfo=zone).astimezone(UTC)

        got = next_due(policy, at, 0, at)

        assert got is not None
        assert datetime(2017, 3, 26, 3) == got.astimezone(zone).replace(tzinfo=None)


class TestAgainstReference:
    """The field-by-field jump agrees with checking every minute."""

    @settings(max_examples=300)
    @given(
        expression=st.sampled_from(CRON_EXPRESSIONS)
        | st.builds(
            "{} {} {} {} {}".format,
            st.sampled_from(["*", "0", "*/7", "5-10", "59", "0,30"]),
            st.sampled_from(["*", "0", "*/5", "9-17", "23"]),
            st.sampled_from(["*", "1", "15", "*/10", "28-31", "29"]),
            st.sampled_from(["*", "2", "1-3", "*/4", "dec"]),
            st.sampled_from(["*", "0", "mon-fri", "*/3", "6"]),
        ),
        after=st.datetimes(datetime(1999, 1, 1), datetime(2101, 1, 1)),
    )
    def test_next_and_previous(self, expression: str, after: datetime) -> None:
        """Next and slot-at-or-before match a minute-by-minute walk, for UTC policies."""
        try:
            policy = SyncPolicy.cron(expression)
        except CronExpressionError:
            return  # a never-running combination, refused (tested above)
        at = after.replace(tzinfo=UTC)
        expected = reference_next(expression, after)

        got = next_due(policy, at, 0, at)

        assert expected.replace(tzinfo=UTC) == got
        assert got == slot_of(policy, got, offset=0)
        assert got == slot_of(policy, got + timedelta(seconds=59), offset=0)
        assert slot_of(policy, got - timedelta(microseconds=1), offset=0) <= at
        assert 0 == slots_between(policy, 0, at, got)
