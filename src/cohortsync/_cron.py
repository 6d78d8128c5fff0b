"""
Standard 5-field cron expressions, parsed once and matched by jumping field by
field: pure, no clock, no I/O, no dependency.

``minute hour day-of-month month day-of-week``, each field a ``*``, a value, a
range ``a-b``, a step ``*/n``, ``a-b/n`` or ``a/n`` (from *a* to the field's
maximum), or a comma-separated list of those. Months and days of the week take
their three-letter English names (``jan``, ``mon``), in any case; day of week
``0`` and ``7`` are both Sunday. The nicknames ``@yearly`` (``@annually``),
``@monthly``, ``@weekly``, ``@daily`` (``@midnight``) and ``@hourly`` stand
for their usual expressions.

Day of month and day of week combine as Vixie cron combines them: when both
are restricted, a day matches if *either* matches (``0 0 1 * mon`` runs on the
1st and on every Monday); when either field starts with ``*`` (``*`` itself or
a step such as ``*/2``) a day must match both.

The matcher works on naive wall-clock fields; :mod:`cohortsync._schedule`
turns wall times into instants in a time zone.
"""

from __future__ import annotations

import calendar
from bisect import bisect_left, bisect_right
from datetime import date, datetime, timedelta
from functools import lru_cache

import attrs

from cohortsync.exceptions import CronExpressionError

__all__ = ["FIELD_NAMES", "CronSpec", "parse_cron"]

FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_MONTH_NAMES = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_NAMES: tuple[dict[str, int], ...] = ({}, {}, {}, _MONTH_NAMES, _DAY_NAMES)
_NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Longest each month can be (February in a leap year): a day-of-month list
# that fits none of the chosen months never matches.
_LONGEST = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MINUTE = timedelta(minutes=1)
_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 0)
_date = date
_LAST_YEAR = 9999


@attrs.frozen
class CronSpec:
    """
    A parsed, validated cron expression.

    Args:
        expression: The text as given.
        minutes: Matching minutes, sorted.
        hours: Matching hours, sorted.
        days: Bit *d* set for each matching day of the month (1-31).
        months: Matching months, sorted.
        weekdays: Bit *w* set for each matching day of the week (0 is Sunday).
        days_or: Whether a day matches on either day field (both restricted)
            or must match both (either starts with ``*``).
    """

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: int
    months: tuple[int, ...]
    weekdays: int
    days_or: bool
    # Lookup tables for the hot path, derived from the sets above: the first
    # matching value at or after each index, -1 past the last one.
    _next_minute: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)
    _next_hour: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)
    _next_month: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "_next_minute", _first_at_or_after(self.minutes, 61))
        set_(self, "_next_hour", _first_at_or_after(self.hours, 25))
        set_(self, "_next_month", _first_at_or_after(self.months, 14))

    def next_fields(  # noqa: C901 - one flat loop: helpers would cost a call per step
        self, year: int, month: int, day: int, hour: int, minute: int
    ) -> tuple[int, int, int, int, int]:
        """
        The first match at or after a wall time given as fields (minute may
        be 60, hour 24 and day past the month's end: they roll over), as
        ``(year, month, day, hour, minute)``. Field by field through lookup
        tables: a handful of steps whatever the distance.

        Raises:
            OverflowError: No match before year 10,000.
        """
        next_minute, next_hour, next_month = self._next_minute, self._next_hour, self._next_month
        days, weekdays, either = self.days, self.weekdays, self.days_or
        while True:
            found = next_month[month]
            if found != month:
                if found < 0:
                    year, month = year + 1, self.months[0]
                else:
                    month = found
                day, hour, minute = 1, 0, 0
                if year > _LAST_YEAR:
                    raise OverflowError("no cron match before year 10000")
            last = _DAYS_IN_MONTH[month]
            if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
                last = 29
            start = day
            if day <= last:
                weekday = (_date(year, month, day).weekday() + 1) % 7
                while day <= last:
                    by_day = days >> day & 1
                    by_weekday = weekdays >> weekday & 1
                    if (by_day or by_weekday) if either else (by_day and by_weekday):
                        break
                    day += 1
                    weekday = (weekday + 1) % 7
            if day > last:
                month, day, hour, minute = month + 1, 1, 0, 0
                continue
            if day != start:
                hour, minute = 0, 0
            found = next_hour[hour]
            if found < 0:
                day, hour, minute = day + 1, 0, 0
                continue
            if found != hour:
                hour, minute = found, 0
            found = next_minute[minute]
            if found < 0:
                hour, minute = hour + 1, 0
                continue
            return year, month, day, hour, found

    @property
    def sub_hourly(self) -> bool:
        """
        Whether it can run more than once in an hour (several minutes match).
        """
        return len(self.minutes) > 1

    def day_matches(self, year: int, month: int, day: int) -> bool:
        """
        Whether the date matches the month and the two day fields.
        """
        if month not in self.months:
            return False
        weekday = (date(year, month, day).weekday() + 1) % 7
        by_day = self.days >> day & 1
        by_weekday = self.weekdays >> weekday & 1
        return bool(by_day or by_weekday) if self.days_or else bool(by_day and by_weekday)

    def _first_day(self, year: int, month: int, day: int) -> int | None:
        """The first matching day of the month at or after *day*, or ``None``."""
        last = calendar.monthrange(year, month)[1]
        weekday = (date(year, month, day).weekday() + 1) % 7 if day <= last else 0
        days, weekdays, either = self.days, self.weekdays, self.days_or
        while day <= last:
            by_day = days >> day & 1
            by_weekday = weekdays >> weekday & 1
            if (by_day or by_weekday) if either else (by_day and by_weekday):
                return day
            day += 1
            weekday = (weekday + 1) % 7
        return None

    def _last_day(self, year: int, month: int, day: int) -> int | None:
        """The last matching day of the month at or before *day*, or ``None``."""
        day = min(day, calendar.monthrange(year, month)[1])
        if day < 1:
            return None
        weekday = (date(year, month, day).weekday() + 1) % 7
        days, weekdays, either = self.days, self.weekdays, self.days_or
        while day >= 1:
            by_day = days >> day & 1
            by_weekday = weekdays >> weekday & 1
            if (by_day or by_weekday) if either else (by_day and by_weekday):
                return day
            day -= 1
            weekday = (weekday - 1) % 7
        return None

    def first_at_or_after(self, start: datetime) -> datetime:
        """
        The first matching wall time at or after *start* (naive, whole
        minutes; seconds are dropped), jumping field by field.

        Raises:
            OverflowError: No match before year 10,000.
        """
        year, month, day, hour, minute = (
            start.year, start.month, start.day, start.hour, start.minute,
        )  # fmt: skip
        months, hours, minutes = self.months, self.hours, self.minutes
        while True:
            if month not in months:
                i = bisect_left(months, month)
                if i == len(months):
                    year, month = year + 1, months[0]
                else:
                    month = months[i]
                day, hour, minute = 1, 0, 0
            if year > _LAST_YEAR:
                raise OverflowError("no cron match before year 10000")
            found = self._first_day(year, month, day)
            if found is None:
                year, month = (year + 1, 1) if month == 12 else (year, month + 1)
                day, hour, minute = 1, 0, 0
                continue
            if found != day:
                day, hour, minute = found, 0, 0
            i = bisect_left(hours, hour)
            if i == len(hours):
                day, hour, minute = day + 1, 0, 0
                continue
            if hours[i] != hour:
                hour, minute = hours[i], 0
            i = bisect_left(minutes, minute)
            if i == len(minutes):
                hour, minute = hour + 1, 0
                continue
            return datetime(year, month, day, hour, minutes[i])  # noqa: DTZ001 - a wall time

    def last_at_or_before(self, end: datetime) -> datetime:
        """
        The last matching wall time at or before *end* (naive; seconds are
        dropped), jumping field by field.

        Raises:
            OverflowError: No match since year 1.
        """
        year, month, day, hour, minute = end.year, end.month, end.day, end.hour, end.minute
        months, hours, minutes = self.months, self.hours, self.minutes
        while True:
            if month not in months:
                year, month = _month_at_or_before(months, year, month)
                day, hour, minute = 31, 23, 59
            if year < 1:
                raise OverflowError("no cron match since year 1")
            found = self._last_day(year, month, day)
            if found is None:
                year, month = (year - 1, 12) if month == 1 else (year, month - 1)
                day, hour, minute = 31, 23, 59
                continue
            if found != day:
                day, hour, minute = found, 23, 59
            i = bisect_right(hours, hour) - 1
            if i < 0:
                year, month, day = _day_before(year, month, day)
                hour, minute = 23, 59
                continue
            if hours[i] != hour:
                hour, minute = hours[i], 59
            i = bisect_right(minutes, minute) - 1
            if i < 0:
                if hour == 0:
                    year, month, day = _day_before(year, month, day)
                    hour = 24
                hour, minute = hour - 1, 59
                continue
            return datetime(year, month, day, hour, minutes[i])  # noqa: DTZ001 - a wall time

    def times_in_day_from(self, hour: int, minute: int) -> int:
        """How many matching (hour, minute) pairs of a day are at or after hour:minute."""
        later = len(self.hours) - bisect_right(self.hours, hour)
        here = len(self.minutes) - bisect_left(self.minutes, minute) if hour in self.hours else 0
        return later * len(self.minutes) + here

    def count_between(self, first: datetime, last: datetime) -> int:
        """
        How many matching wall times lie in ``[first, last]`` (naive), counted
        day by day rather than match by match.
        """
        if last < first:
            return 0
        per_day = len(self.hours) * len(self.minutes)
        day, end = first.date(), last.date()
        total = 0
        if self.day_matches(day.year, day.month, day.day):
            total += self.times_in_day_from(first.hour, first.minute)
        if day == end:
            return total - self.times_in_day_from(last.hour, last.minute + 1) * self.day_matches(
                day.year, day.month, day.day
            )
        day += timedelta(days=1)
        while day < end:
            total += per_day * self.day_matches(day.year, day.month, day.day)
            day += timedelta(days=1)
        if self.day_matches(end.year, end.month, end.day):
            total += per_day - self.times_in_day_from(last.hour, last.minute + 1)
        return total


def _first_at_or_after(values: tuple[int, ...], size: int) -> tuple[int, ...]:
    """For each index below *size*, the first of the sorted *values* at or after it, or -1."""
    table = []
    for index in range(size):
        i = bisect_left(values, index)
        table.append(values[i] if i < len(values) else -1)
    return tuple(table)


def _month_at_or_before(months: tuple[int, ...], year: int, month: int) -> tuple[int, int]:
    """The last of *months* at or before *month* of *year*, going back a year if need be."""
    i = bisect_right(months, month) - 1
    return (year - 1, months[-1]) if i < 0 else (year, months[i])


def _day_before(year: int, month: int, day: int) -> tuple[int, int, int]:
    """The day before, where day 31 stands for the last day of a shorter month."""
    if day > 1:
        return year, month, day - 1
    return (year - 1, 12, 31) if month == 1 else (year, month - 1, 31)


def _field_error(expression: str, index: int, text: str, message: str) -> CronExpressionError:
    return CronExpressionError(expression, FIELD_NAMES[index], text, message)


def _value(expression: str, index: int, field: str, token: str) -> int:
    low, high = _BOUNDS[index]
    names = _NAMES[index]
    lowered = token.lower()
    if lowered in names:
        return names[lowered]
    if not token.isdigit() or not token.isascii():
        expected = f"a number {low}-{high}"
        if names:
            expected += " or a name (" + ", ".join(names) + ")"
        raise _field_error(expression, index, field, f"{token!r} is not {expected}")
    value = int(token)
    if not low <= value <= high:
        raise _field_error(expression, index, field, f"{value} is out of range {low}-{high}")
    return value


def _parse_field(expression: str, index: int, field: str) -> set[int]:
    low, high = _BOUNDS[index]
    values: set[int] = set()
    for item in field.split(","):
        if not item:
            raise _field_error(expression, index, field, "an empty list item")
        body, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or not step_text.isascii():
                raise _field_error(expression, index, field, f"step {step_text!r} is not a number")
            step = int(step_text)
            if not 1 <= step <= high - low + 1:
                raise _field_error(
                    expression, index, field, f"step {step} must be in 1-{high - low + 1}"
                )
        if body == "*":
            first, last = low, high
        else:
            start, dash, end = body.partition("-")
            first = _value(expression, index, field, start)
            if dash:
                last = _value(expression, index, field, end)
                if last < first:
                    raise _field_error(expression, index, field, f"range {body!r} runs backwards")
            else:
                # "a/n" runs from a to the field's end, as croniter and
                # APScheduler read it; a lone value is just itself.
                last = high if slash else first
        values.update(range(first, last + 1, step))
    return values


@lru_cache(maxsize=1_024)
def parse_cron(expression: str) -> CronSpec:
    """
    Parse and validate a 5-field cron expression.

    Raises:
        CronExpressionError: Naming the bad field and why (a value out of
            range, an unknown name, a backwards range, a bad step, the wrong
            number of fields), or a day-of-month that no chosen month has
            (``0 0 31 2 *`` never runs).
    """
    if not isinstance(expression, str):
        raise CronExpressionError(repr(expression), None, None, "must be a string")
    text = expression.strip()
    text = _NICKNAMES.get(text.lower(), text)
    fields = text.split()
    if len(fields) != len(FIELD_NAMES):
        raise CronExpressionError(
            expression,
            None,
            None,
            f"needs 5 fields ({' '.join(FIELD_NAMES)}), got {len(fields)}",
        )
    parsed = [_parse_field(expression, i, field) for i, field in enumerate(fields)]
    minutes, hours, days, months, weekdays = parsed
    if 7 in weekdays:
        weekdays = (weekdays - {7}) | {0}
    # Vixie cron: a field that starts with "*" does not restrict the day.
    days_star = fields[2].startswith("*")
    weekdays_star = fields[4].startswith("*")
    days_or = not (days_star or weekdays_star)
    if not days_or and not days_star and not any(d <= _LONGEST[m] for m in months for d in days):
        month_list = ",".join(calendar.month_abbr[m].lower() for m in sorted(months))
        message = f"no chosen month ({month_list}) has such a day: it never runs"
        raise _field_error(expression, 2, fields[2], message)
    return CronSpec(
        expression=expression,
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=sum(1 << d for d in days),
        months=tuple(sorted(months)),
        weekdays=sum(1 << w for w in weekdays),
        days_or=days_or,
    )


def next_minute(wall: datetime) -> datetime:
    """The whole minute after *wall*'s minute."""
    return wall.replace(second=0, microsecond=0) + _MINUTE
