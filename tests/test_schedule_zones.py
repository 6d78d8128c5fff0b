"""
Local-day schedules checked against every transition of every zone in the tz database.

zoneinfo does not expose a zone's transitions, so this module finds them
itself: it reads ``utcoffset()`` at every step through 1970-2100 and bisects
where it changes. From those transitions alone, an independent reference
(:class:`Timeline`) says which local dates exist and which instant is each
date's slot, and the tests compare ``next_due`` and ``slot_of`` with it around
each transition.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import operator
import random
import zoneinfo
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cohortsync._policy import SyncPolicy
from cohortsync._schedule import next_due, slot_of

if TYPE_CHECKING:
    from collections.abc import Iterator

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ANCHOR = datetime(2024, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
SECOND = timedelta(seconds=1)
DAY = 86_400
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

#: Every transition from FIRST (inclusive) to LAST (exclusive) is checked.
FIRST = 0
LAST = int((datetime(2100, 1, 1, tzinfo=UTC) - EPOCH).total_seconds())
#: The scan reaches a little further, so that windows at the edges know their offsets.
SCAN_MARGIN = 31 * DAY
#: The scan step. A step cannot see two transitions that cancel out inside it,
#: so it must stay well below the shortest time between two transitions of a
#: zone; TestTransitionScan checks that margin on every run.
SCAN_STEP = 2 * DAY
NEVER = 2**62

ZONES = tuple(sorted(zoneinfo.available_timezones()))
#: Zones with unusual transitions in 1970-2100, drawn more often by the property test.
ODD_ZONES = (
    "Pacific/Apia",  # skipped 2011-12-30
    "Pacific/Kiritimati",  # skipped 1994-12-31; also jumped 40 minutes in 1979
    "Pacific/Kwajalein",  # skipped 1993-08-21
    "Antarctica/Vostok",  # 7 hours back across midnight, then 7 hours forward, in 1994
    "Antarctica/Casey",  # 3-hour jumps both ways, one at 00:01
    "Antarctica/Troll",  # 2-hour summer time
    "America/Danmarkshavn",  # a 3-hour gap from midnight in 1996
    "Africa/Monrovia",  # a gap of 44 minutes 30 seconds in 1972
    "Asia/Kathmandu",  # a gap of 15 minutes in 1986
    "Australia/Lord_Howe",  # 30-minute summer time
    "Europe/Sofia",  # gaps ending at midnight
    "Africa/Cairo",  # folds across midnight
)


def instant(seconds: int) -> datetime:
    return EPOCH + timedelta(seconds=seconds)


def epoch_seconds(value: datetime) -> int:
    """
    Whole epoch seconds of *value*, floored, without float rounding.
    """
    delta = value - EPOCH
    return delta.days * DAY + delta.seconds


def local_date(day: int) -> date:
    return date.fromordinal(EPOCH_ORDINAL + day)


@dataclass(frozen=True)
class Timeline:
    """
    A zone's UTC offsets as piecewise constant intervals: ``offsets[i]`` is in
    force from ``changes[i - 1]`` (inclusive) to ``changes[i]``, in epoch
    seconds. Wall times are "local epoch seconds": ``instant + offset``, so local
    day *n* shows the wall times ``[n * DAY, (n + 1) * DAY)``.
    """

    name: str
    changes: tuple[int, ...]
    offsets: tuple[int, ...]

    @functools.cached_property
    def extremes(self) -> tuple[int, int]:
        return min(self.offsets), max(self.offsets)

    @functools.cached_property
    def checked(self) -> range:
        """
        The indexes of the transitions from FIRST to LAST.
        """
        return range(
            bisect.bisect_left(self.changes, FIRST), bisect.bisect_left(self.changes, LAST)
        )

    def offset_at(self, when: int) -> int:
        return self.offsets[bisect.bisect_right(self.changes, when)]

    def wall(self, when: int) -> int:
        return when + self.offset_at(when)

    def intervals(self, first_wall: int, last_wall: int) -> Iterator[tuple[int, int, int]]:
        """
        ``(start, end, offset)`` for each interval of constant offset whose
        instants might show a wall time from *first_wall* to *last_wall*.
        """
        lowest, highest = self.extremes
        first = bisect.bisect_right(self.changes, first_wall - highest)
        last = bisect.bisect_right(self.changes, last_wall - lowest)
        for index in range(first, last + 1):
            start = self.changes[index - 1] if index else -NEVER
            end = self.changes[index] if index < len(self.changes) else NEVER
            yield start, end, self.offsets[index]

    def showing(self, wall: int) -> list[int]:
        """
        Every instant at which the clock shows *wall*, earliest first.
        """
        return sorted(
            wall - offset
            for start, end, offset in self.intervals(wall, wall)
            if start <= wall - offset < end
        )

    def has_day(self, day: int) -> bool:
        """
        Whether some instant shows a wall time on local day *day*.
        """
        midnight, next_midnight = day * DAY, (day + 1) * DAY
        return any(
            start + offset < next_midnight and end + offset > midnight
            for start, end, offset in self.intervals(midnight, next_midnight)
        )

    def slot(self, day: int, offset: int) -> int | None:
        """
        The slot of local day *day*, or ``None`` if the zone skips the day: the
        last instant showing its wall time, or the transition that jumps over it.
        """
        if not self.has_day(day):
            return None
        wall = day * DAY + offset
        shown = self.showing(wall)
        if shown:
            return shown[-1]
        jumps = [
            end
            for (_, end, before), (_, _, after) in itertools.pairwise(self.intervals(wall, wall))
            if end + before <= wall < end + after
        ]
        assert 1 == len(jumps), f"{self.name}: {local_date(day)} {offset} skipped {jumps}"
        return jumps[0]

    def slots(self, first_day: int, last_day: int, offset: int) -> list[int]:
        """
        The slots of the local days that exist from *first_day* to *last_day*.
        """
        found = (self.slot(day, offset) for day in range(first_day, last_day + 1))
        return [slot for slot in found if slot is not None]

    def next_slot(self, offset: int, after: datetime) -> datetime:
        """
        The first slot strictly after *after*, from the local days around it.
        """
        day = self.wall(epoch_seconds(after)) // DAY
        return min(
            slot for slot in map(instant, self.slots(day - 2, day + 3, offset)) if slot > after
        )

    def last_slot(self, offset: int, when: datetime) -> datetime:
        """
        The last slot at or before *when*, from the local days around it.
        """
        day = self.wall(epoch_seconds(when)) // DAY
        return max(
            slot for slot in map(instant, self.slots(day - 3, day + 2, offset)) if slot <= when
        )


@functools.cache
def timeline(name: str) -> Timeline:
    """
    The transitions of *name*, found by stepping through time and bisecting
    each step where ``utcoffset()`` changes.
    """
    zone = ZoneInfo(name)
    from_ts = datetime.fromtimestamp
    points = range(FIRST - SCAN_MARGIN, LAST + SCAN_MARGIN + SCAN_STEP, SCAN_STEP)
    values = [from_ts(point, zone).utcoffset() for point in points]
    changes = []
    offsets = [values[0]]
    for index in itertools.compress(range(1, len(values)), map(operator.ne, values, values[1:])):
        low, high = points[index - 1], points[index]
        while high - low > 1:
            middle = (low + high) // 2
            if from_ts(middle, zone).utcoffset() == values[index - 1]:
                low = middle
            else:
                high = middle
        changes.append(high)
        offsets.append(values[index])
    seconds = [offset // SECOND for offset in offsets if offset is not None]
    assert len(offsets) == len(seconds)
    return Timeline(name, tuple(changes), tuple(seconds))


def window_offsets(line: Timeline, index: int, rng: random.Random) -> list[int]:
    """
    The slot offsets worth checking around transition *index*, most telling
    first: where the clock jumps from and to, inside the jump, its last second,
    an hour either side, the ends of the day and a random one.
    """
    change = line.changes[index]
    before, after = line.offsets[index], line.offsets[index + 1]
    low, high = change + min(before, after), change + max(before, after)
    candidates = [
        change + before,
        change + after,
        (low + high) // 2,
        high - 1,
        low - 3_600,
        high + 3_600,
        0,
        DAY - 1,
        rng.randrange(DAY),
    ]
    return list(dict.fromkeys(candidate % DAY for candidate in candidates))


def check_window(
    line: Timeline,
    policy: SyncPolicy,
    index: int,
    offset: int,
    *,
    days: int,
    rng: random.Random | None,
) -> list[str]:
    """
    Compare next_due and slot_of with the reference from *days* local days
    before transition *index* to *days* after it; with *rng*, also at a random
    instant between each two slots. Returns the mismatches, described.
    """
    change = line.changes[index]
    first_day = line.wall(change - 1) // DAY - days
    last_day = line.wall(change) // DAY + days
    expected = [instant(slot) for slot in line.slots(first_day - 1, last_day, offset)]
    where = f"{line.name} transition {instant(change)} offset {offset}"
    if sorted(set(expected)) != expected:
        return [f"{where}: reference slots not increasing {expected}"]
    # Walk from the slot before the window: one slot per existing local date.
    walked = [expected[0]]
    for _ in expected[1:]:
        due = next_due(policy, ANCHOR, offset, walked[-1])
        assert due is not None
        walked.append(due)
    if expected != walked:
        return [f"{where}: walked {walked[1:]}, expected {expected[1:]}"]
    problems = []
    for previous, slot in itertools.pairwise(expected):
        at_and_before = (
            slot_of(policy, slot, offset=offset),
            slot_of(policy, slot - MICROSECOND, offset=offset),
        )
        if (slot, previous) != at_and_before:
            problems.append(f"{where}: slot_of {slot} and just before gave {at_and_before}")
        if rng is None:
            continue
        between = previous + rng.randrange(1, (slot - previous) // MICROSECOND) * MICROSECOND
        around = (
            slot_of(policy, between, offset=offset),
            next_due(policy, ANCHOR, offset, between),
        )
        if (previous, slot) != around:
            problems.append(f"{where}: slot_of/next_due at {between} gave {around}")
    return problems


def check_zone(name: str, thorough: bool) -> list[str]:
    """
    Check every transition of zone *name*. Quickly: a local day either side,
    where the clock jumps from and to, and one more offset, rotating through the
    others. Thoroughly: two local days either side, every offset, and random
    instants between slots too.
    """
    line = timeline(name)
    policy = SyncPolicy.daily(name)
    problems = []
    for index in line.checked:
        rng = random.Random(f"{name}:{line.changes[index]}")
        offsets = window_offsets(line, index, rng)
        if thorough:
            for offset in offsets:
                problems += check_window(line, policy, index, offset, days=2, rng=rng)
            continue
        for offset in [*offsets[:2], offsets[2 + index % (len(offsets) - 2)]]:
            problems += check_window(line, policy, index, offset, days=1, rng=None)
    return problems


def walk(zone: str, offset: int, start: datetime, count: int) -> list[datetime]:
    policy = SyncPolicy.daily(zone)
    dues = []
    due: datetime | None = start
    for _ in range(count):
        assert due is not None
        due = next_due(policy, ANCHOR, offset, due)
        assert due is not None
        dues.append(due)
    return dues


def local_dates(zone: str, dues: list[datetime]) -> list[date]:
    return [due.astimezone(ZoneInfo(zone)).date() for due in dues]


class TestTransitionScan:
    @pytest.mark.reliability  # scans all ~600 zones: seconds, shared with TestEveryTransition
    def test_step_is_well_below_transition_spacing(self) -> None:
        """
        No zone changes its offset twice within two scan steps, so stepping misses nothing.
        """
        closest = min(
            (b - a, name)
            for name in ZONES
            for a, b in zip(timeline(name).changes, timeline(name).changes[1:], strict=False)
        )

        assert 2 * SCAN_STEP < closest[0], closest

    @pytest.mark.parametrize(
        ("zone", "changes"),
        [
            ("UTC", ()),
            ("Pacific/Apia", (datetime(2011, 12, 30, 10, tzinfo=UTC),)),
            ("Europe/Berlin", (datetime(2024, 3, 31, 1, tzinfo=UTC),)),
            ("America/New_York", (datetime(2099, 11, 1, 6, tzinfo=UTC),)),
        ],
    )
    def test_finds_known_transitions(self, zone: str, changes: tuple[datetime, ...]) -> None:
        """
        The scan finds transitions known from the tz source, to the second.
        """
        found = {instant(change) for change in timeline(zone).changes}

        assert set(changes) <= found
        assert (not changes) == (not found)


class TestSkippedDays:
    # Offsets 00:00, 00:00:01, 09:00, 23:59:59.
    OFFSETS = (0, 1, 32_400, DAY - 1)

    @pytest.mark.parametrize("offset", OFFSETS)
    def test_apia_2011_12_30(self, offset: int) -> None:
        """
        Samoa skipped 2011-12-30: no run that day, one run on the 31st.
        """
        zone = "Pacific/Apia"  # 2011-12-29 23:59:59 -10 was followed by 2011-12-31 00:00 +14
        start = datetime(2011, 12, 28, tzinfo=ZoneInfo(zone)) + timedelta(seconds=offset)

        dues = walk(zone, offset, start, 4)

        expected = [date(2011, 12, 29), date(2011, 12, 31), date(2012, 1, 1), date(2012, 1, 2)]
        assert expected == local_dates(zone, dues)
        assert datetime(2011, 12, 30, 10, tzinfo=UTC) + timedelta(seconds=offset) == dues[1]

    @pytest.mark.parametrize("offset", OFFSETS)
    def test_kiritimati_1995_01_01(self, offset: int) -> None:
        """
        Kiritimati skipped 1994-12-31: no run that day, one run on 1995-01-01.
        """
        zone = "Pacific/Kiritimati"  # 1994-12-30 23:59:59 -10 then 1995-01-01 00:00 +14
        start = datetime(1994, 12, 29, tzinfo=ZoneInfo(zone)) + timedelta(seconds=offset)

        dues = walk(zone, offset, start, 4)

        expected = [date(1994, 12, 30), date(1995, 1, 1), date(1995, 1, 2), date(1995, 1, 3)]
        assert expected == local_dates(zone, dues)
        assert datetime(1994, 12, 31, 10, tzinfo=UTC) + timedelta(seconds=offset) == dues[1]

    @pytest.mark.parametrize(
        ("zone", "skipped"),
        [
            ("Pacific/Apia", date(2011, 12, 30)),
            ("Pacific/Fakaofo", date(2011, 12, 30)),
            ("Pacific/Kiritimati", date(1994, 12, 31)),
            ("Pacific/Kanton", date(1994, 12, 31)),
            ("Pacific/Kwajalein", date(1993, 8, 21)),
        ],
    )
    @pytest.mark.parametrize("offset", OFFSETS)
    def test_slot_of_in_the_following_day(self, zone: str, skipped: date, offset: int) -> None:
        """
        Just after a skipped day begins the next, the slot is still the one before the gap.
        """
        policy = SyncPolicy.daily(zone)
        local = ZoneInfo(zone)
        eve = datetime.combine(skipped - timedelta(days=1), datetime.min.time(), local)
        eve_slot = (eve + timedelta(seconds=offset)).astimezone(UTC)
        following = datetime.combine(skipped + timedelta(days=1), datetime.min.time(), local)
        next_slot = (following + timedelta(seconds=offset)).astimezone(UTC)

        assert eve_slot == slot_of(policy, next_slot - MICROSECOND, offset=offset)
        assert next_slot == next_due(policy, ANCHOR, offset, eve_slot)
        assert next_slot == slot_of(policy, next_slot, offset=offset)

    @pytest.mark.parametrize("offset", [0, 81_000, 84_600, DAY - 1])
    def test_gap_ending_at_midnight(self, offset: int) -> None:
        """
        A slot skipped by a gap ending at midnight runs then, and the next day still runs too.
        """
        # Sofia 1979-03-31 23:00 EET -> 1979-04-01 00:00 EEST: the 31st exists until 23:00.
        zone = "Europe/Sofia"
        local = ZoneInfo(zone)
        start = datetime(1979, 3, 30, tzinfo=local) + timedelta(seconds=offset)
        march_31 = datetime(1979, 3, 31, tzinfo=local) + timedelta(seconds=offset)
        if offset >= 23 * 3_600:
            march_31 = datetime(1979, 3, 31, 21, tzinfo=UTC)  # 1979-04-01 00:00 EEST
        april_1 = datetime(1979, 4, 1, tzinfo=local) + timedelta(seconds=offset)

        assert [march_31, april_1] == walk(zone, offset, start, 2)


class TestEveryTransition:
    @pytest.mark.reliability  # every zone of the tz database; the fast suite samples them below
    @pytest.mark.parametrize("zone", ZONES)
    def test_one_slot_per_local_date(self, zone: str) -> None:
        """
        Around every transition, each local date that exists has one slot, as the reference says.
        """
        assert [] == check_zone(zone, thorough=False)[:10]

    @pytest.mark.slow
    @pytest.mark.parametrize("zone", ZONES)
    def test_one_slot_per_local_date_every_offset(self, zone: str) -> None:
        """
        The same with every telling offset around every transition, not a rotating sample.
        """
        assert [] == check_zone(zone, thorough=True)[:10]


@st.composite
def zone_instants(draw: st.DrawFn) -> tuple[str, datetime]:
    """
    A zone (often an odd one) and an instant in 1970-2100, half the time
    within three days of one of the zone's transitions (often an odd one).
    """
    name = draw(st.sampled_from(ZONES) | st.sampled_from(ODD_ZONES))
    line = timeline(name)
    changes = [line.changes[index] for index in line.checked]
    # Jumps other than an hour are rare and the likeliest to go wrong.
    odd = [
        line.changes[index]
        for index in line.checked
        if abs(line.offsets[index + 1] - line.offsets[index]) != 3_600
    ]
    near_a_transition = draw(st.booleans())
    if changes and near_a_transition:
        center = draw(st.sampled_from(changes) | st.sampled_from(odd or changes))
        seconds = draw(st.integers(center - 3 * DAY, center + 3 * DAY))
    else:
        seconds = draw(st.integers(FIRST, LAST))
    return name, instant(seconds) + draw(st.integers(0, 999_999)) * MICROSECOND


class TestAgainstReference:
    @settings(max_examples=300, deadline=None)
    @given(zone_instant=zone_instants(), offset=st.integers(0, DAY - 1))
    @example(zone_instant=("Pacific/Apia", datetime(2011, 12, 30, 12, tzinfo=UTC)), offset=32_400)
    @example(zone_instant=("Pacific/Kiritimati", datetime(1994, 12, 31, 9, tzinfo=UTC)), offset=1)
    def test_next_due_and_slot_of(self, zone_instant: tuple[str, datetime], offset: int) -> None:
        """
        In any zone, next_due and slot_of are the reference's first slot after and last slot before.
        """
        zone, when = zone_instant
        line = timeline(zone)
        policy = SyncPolicy.daily(zone)

        following = next_due(policy, ANCHOR, offset, when)
        slot = slot_of(policy, when, offset=offset)

        assert line.next_slot(offset, when) == following
        assert line.last_slot(offset, when) == slot
        assert following == slot_of(policy, following, offset=offset)
        assert following == next_due(policy, ANCHOR, offset, slot)
