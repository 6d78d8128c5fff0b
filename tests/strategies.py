"""
Reusable Hypothesis strategies for cohortsync's tests.

Keep strategies here rather than in test modules so that every test draws
instants, policies and offsets the same way. Group them by topic below.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from hypothesis import strategies as st

from cohortsync._policy import Cadence, SyncPolicy
from cohortsync._schedule import period_seconds

UTC = timezone.utc

# --- Time -------------------------------------------------------------------

#: Zones with the interesting shapes: a one-hour DST shift in each hemisphere
#: of the calendar (New York, Berlin), a half-hour DST shift (Lord Howe), a
#: half-hour offset without DST (Kolkata), and no offset at all.
TIMEZONES = (
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "UTC",
)
#: The zones above that change their offset, for DST-focused tests.
DST_TIMEZONES = ("America/New_York", "Europe/Berlin", "Australia/Lord_Howe")

MIN_INSTANT = datetime(1970, 1, 1, tzinfo=UTC)
MAX_INSTANT = datetime(2200, 1, 1, tzinfo=UTC)


def aware_datetimes(
    min_value: datetime = MIN_INSTANT,
    max_value: datetime = MAX_INSTANT,
    *,
    any_zone: bool = False,
) -> st.SearchStrategy[datetime]:
    """
    Aware instants between *min_value* and *max_value* (aware, UTC), with
    microseconds.

    With *any_zone*, the same instants are expressed in one of
    :data:`TIMEZONES`, to check that code compares instants, not wall clocks.
    """
    instants = st.datetimes(
        min_value=min_value.astimezone(UTC).replace(tzinfo=None),
        max_value=max_value.astimezone(UTC).replace(tzinfo=None),
        timezones=st.just(UTC),
    )
    if not any_zone:
        return instants
    return st.builds(
        lambda instant, zone: instant.astimezone(ZoneInfo(zone)),
        instants,
        st.sampled_from(TIMEZONES),
    )


@functools.cache
def dst_transitions(
    zone: str, first_year: int = 2020, last_year: int = 2030
) -> tuple[datetime, ...]:
    """
    The instants (aware UTC, to the second) at which *zone* changes its UTC
    offset between *first_year* and *last_year* inclusive.

    Found by scanning days and bisecting, independently of the code under test
    (the zones tested change their offset at most once a day).
    """
    tz = ZoneInfo(zone)

    def offset_at(seconds: int) -> timedelta | None:
        return datetime.fromtimestamp(seconds, tz).utcoffset()

    found = []
    start = int(datetime(first_year, 1, 1, tzinfo=UTC).timestamp())
    end = int(datetime(last_year + 1, 1, 1, tzinfo=UTC).timestamp())
    for day in range(start, end, 86_400):
        low, high = day, day + 86_400
        if offset_at(low) == offset_at(high):
            continue
        while high - low > 1:
            middle = (low + high) // 2
            if offset_at(middle) == offset_at(low):
                low = middle
            else:
                high = middle
        found.append(datetime.fromtimestamp(high, UTC))
    return tuple(found)


def near_dst_transitions(zone: str, days: int = 2) -> st.SearchStrategy[datetime]:
    """
    Aware UTC instants within *days* of one of *zone*'s offset changes in the
    2020s, where schedule code in local time is most likely to be wrong.
    """
    span = days * 86_400 * 10**6
    return st.builds(
        lambda transition, micros: transition + timedelta(microseconds=micros),
        st.sampled_from(dst_transitions(zone)),
        st.integers(-span, span),
    )


# --- Policies and schedules -------------------------------------------------


@st.composite
def policies(
    draw: st.DrawFn,
    cadences: tuple[Cadence, ...] = tuple(Cadence),
    timezones: tuple[str, ...] = TIMEZONES,
) -> SyncPolicy:
    """
    Sync policies of the given *cadences*; daily ones with or without one of
    *timezones*.
    """
    cadence = draw(st.sampled_from(cadences))
    zone = None
    if cadence is Cadence.DAILY and timezones:
        zone = draw(st.none() | st.sampled_from(timezones))
    return SyncPolicy(cadence=cadence, timezone=zone)


def offsets(policy: SyncPolicy) -> st.SearchStrategy[int]:
    """
    Valid slot offsets for *policy*: anywhere in the period for hourly and
    daily syncs, biased towards quarter hours (where DST transitions happen),
    and 0 for one-time and real-time syncs, which are not spread.
    """
    if policy.cadence not in {Cadence.HOURLY, Cadence.DAILY}:
        return st.just(0)
    period = period_seconds(policy.cadence)
    assert period is not None
    quarter_hours = st.integers(0, period // 900 - 1).map(lambda k: k * 900)
    return st.integers(0, period - 1) | quarter_hours


@st.composite
def schedules(
    draw: st.DrawFn,
    cadences: tuple[Cadence, ...] = (Cadence.HOURLY, Cadence.DAILY, Cadence.REALTIME),
    timezones: tuple[str, ...] = TIMEZONES,
) -> tuple[SyncPolicy, int]:
    """
    A recurring policy and a valid slot offset for it.
    """
    policy = draw(policies(cadences, timezones))
    return policy, draw(offsets(policy))
