"""
Pure schedule math: when a sync is due next, and which slot an instant belongs to.

Every recurring sync runs on an *absolute* slot grid: the instants
``period start + offset`` for every period, where periods are aligned to the
Unix epoch (hour boundaries, UTC midnights, minute boundaries) and the offset is
fixed when the sync is created or updated. A daily sync in a named time zone
uses one instant per *local* day instead (local midnight + offset of local wall
time).

Why absolute grids rather than "last run + period": the next run is computed
from the grid and the time the previous run *finished*, never from when it
started or how long it took. So run durations, restarts, late workers and clock
jumps cannot make a sync drift away from its slot; a run that overlaps several
slots simply coalesces them (the next run is the first slot strictly after it
finished). And because the grid is a closed-form function of the offset, every
function here is O(1) whatever the gap: a clock 200 years ahead costs the same
as one a second ahead.

Everything here is pure: no clock reads, no I/O, no state but a bounded memo
of immutable datetimes. The scheduler owns time and storage and calls in with
the instants it has.
"""

from __future__ import annotations

import hashlib
import math
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import attrs

from cohortsync._clock import require_aware
from cohortsync._cron import CronSpec, next_minute, parse_cron
from cohortsync._policy import Cadence, SyncPolicy
from cohortsync._sync import Sync, Trigger
from cohortsync.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "NextRun",
    "effective_trigger",
    "fallback_offset",
    "fixed_offset",
    "grid_policy",
    "hour_of",
    "next_after_run",
    "next_due",
    "next_due_ts",
    "next_slot_after",
    "period_seconds",
    "slot_of",
    "slots_between",
    "spread_period",
    "spread_ratio",
    "stable_offset",
    "uneven_grid",
]

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_DAY = 86_400
_ONE_DAY = timedelta(days=1)
_ONE_HOUR = timedelta(hours=1)
_ONE_MINUTE = timedelta(minutes=1)
_HOURLY = Cadence.HOURLY
_DAILY = Cadence.DAILY
_REALTIME = Cadence.REALTIME
_EVERY = Cadence.EVERY
_WEEKLY = Cadence.WEEKLY
_CRON = Cadence.CRON
# Bound once: next_due_ts is the hot path and a global lookup is cheaper than an
# attribute lookup on every call.
_floor = math.floor
_from_ts = datetime.fromtimestamp

_PERIOD_SECONDS: dict[Cadence, int | None] = {
    cadence: None if cadence.period is None else int(cadence.period.total_seconds())
    for cadence in Cadence
}
# Offsets must lie in [0, bound). One-time and real-time syncs are not spread
# (real-time runs at *every* minute boundary), so their only valid offset is 0.
_OFFSET_BOUND: dict[Cadence, int] = {
    Cadence.ONE_TIME: 1,
    Cadence.HOURLY: 3_600,
    Cadence.DAILY: _DAY,
    Cadence.REALTIME: 1,
    # A weekly slot is a time of day; a cron expression chooses its own
    # times; an interval's bound is the interval (see offset_bound).
    Cadence.WEEKLY: _DAY,
    Cadence.CRON: 1,
    Cadence.EVERY: 7 * _DAY,
}
# The UTC grid period of each recurring cadence (daily in a named zone excepted).
_GRID_SECONDS: dict[Cadence, int] = {
    Cadence.HOURLY: 3_600,
    Cadence.DAILY: _DAY,
    Cadence.REALTIME: 60,
}
# Domain separation: the slot offset of a key is uncorrelated with any other
# hash of the same key (for example one used to shard syncs across workers).
_OFFSET_PERSON = b"cohortsync.slot"

GRID_CACHE_SIZE = 4_096
"""Most grid instants kept as datetimes; the least recently used leaves first."""


@lru_cache(maxsize=GRID_CACHE_SIZE)
def _grid_instant(due: int) -> datetime:
    """
    The datetime of a grid point (epoch seconds), shared between callers: a
    bounded LRU, so the instants every sync keeps asking for (this minute,
    this hour) survive a burst of one-off ones.

    No longer on :func:`next_due`'s path: it builds a slot from its input's
    calendar fields for less than this memo costs on a miss (the lookup, the
    eviction, then ``fromtimestamp``), and next-run inputs rarely repeat. The
    benchmarks still report its hit rate (``benchmarks/sc_schedule.py``), so
    it stays until that report goes with it.
    """
    return _from_ts(due, _UTC)


def period_seconds(cadence: Cadence) -> int | None:
    """
    The length of one period of *cadence* in whole seconds.

    The schedule math works on integers so that it is exact; this is the bridge
    from :attr:`Cadence.period`.

    Args:
        cadence: The cadence.

    Returns:
        3600 for hourly, 86400 for daily, 60 for real-time, ``None`` for one-time
        (which has no period).
    """
    return _PERIOD_SECONDS[cadence]


def next_due_ts(period_seconds: int, offset: int, after_ts: float) -> int:
    """
    The first point of a UTC grid strictly after *after_ts*, in epoch seconds.

    This is the integer core of :func:`next_due` for hourly, daily (UTC) and
    real-time syncs, kept free of datetime objects so that the scheduler and the
    benchmarks can compute millions of due times per second. Grid points are
    whole seconds, so the first one after *after_ts* is also the first one after
    ``floor(after_ts)``, which keeps the arithmetic exact for float input.

    Args:
        period_seconds: The grid period, a positive number of seconds.
        offset: Where in each period the grid point lies, in
            ``[0, period_seconds)``.
        after_ts: Epoch seconds; the result is strictly greater.

    Returns:
        The smallest ``k * period_seconds + offset`` greater than *after_ts*.

    Raises:
        ConfigurationError: If *period_seconds* is not a positive ``int`` or
            *offset* is not an ``int`` in range.
    """
    if (
        type(offset) is not int
        or type(period_seconds) is not int
        or not 0 <= offset < period_seconds
    ):
        raise _bad_grid(period_seconds, offset)
    floor = _floor(after_ts)
    return floor - (floor - offset) % period_seconds + period_seconds


def next_due(  # noqa: C901, PLR0915 - flat branches, no calls: this is the hot path
    policy: SyncPolicy, anchor: datetime, offset: int, after: datetime
) -> datetime | None:
    """
    When a sync is next due, strictly after *after*.

    The scheduler runs a sync immediately at *anchor* (its creation or last
    update) and then calls this with the instant the previous run *finished*.
    Basing the answer on the slot grid rather than on the previous run is what
    keeps a sync on "around the same time" forever: a slow run, or several slots
    missed while it ran, only coalesce into the next slot after it.

    Args:
        policy: The sync's policy; its cadence and time zone select the grid.
        anchor: When the sync was created or last updated. UTC grids do not
            depend on it; it is validated so that every caller passes aware
            datetimes, and keeps the signature stable for grids that might.
        offset: The sync's slot offset in seconds: in ``[0, 3600)`` for hourly,
            ``[0, 86400)`` for daily (of local wall time for a daily sync with a
            time zone), and ``0`` for one-time and real-time syncs, which are not
            spread.
        after: The result is strictly later than this instant.

    Returns:
        An aware UTC datetime, or ``None`` for a one-time sync: its single run is
        due at *anchor* and it has no next run.

    Raises:
        TypeError: If *anchor* or *after* is naive.
        ConfigurationError: If *offset* is out of range for the cadence, or a
            non-UTC *anchor* or *after* is outside the datetime range in UTC.
        ValueError: If a UTC grid has no slot after *after* before year 10000.
        OverflowError: If a local-day grid has none.
    """
    # The engine's own values are exact UTC datetimes and pass as they are;
    # anything else (other zones, subclasses, naive values) goes through
    # require_aware, which converts or refuses it.
    if (
        type(anchor) is not datetime
        or anchor.tzinfo is not _UTC
        or type(after) is not datetime
        or after.tzinfo is not _UTC
    ):
        require_aware(anchor, "anchor")
        after = require_aware(after, "after")
    # A UTC grid whose period divides an hour (every 15 minutes) or a day
    # (hourly, daily, every 6 hours) lines up with each UTC hour or midnight, so
    # the next slot is built from *after*'s own calendar fields: `into` is how
    # far into the hour (day) *after* is, in whole seconds, and `due` the
    # first slot strictly later, counted from the same hour (day). Exact, and
    # cheaper than going to epoch seconds and back: the datetime constructor
    # is most of what this function costs. The policy works its grid out once
    # (SyncPolicy._hour_grid, _day_grid); the cadences are module constants
    # because Cadence.DAILY is an enum class lookup (~0.1 us).
    grid = policy._hour_grid  # noqa: SLF001 - derived by SyncPolicy for this function
    if grid:
        if type(offset) is not int or not 0 <= offset < grid:
            raise _bad_offset(policy.cadence, offset, policy)
        into = after.minute * 60 + after.second
        due = into - (into - offset) % grid + grid
        if due < 3_600:
            return datetime(
                after.year, after.month, after.day, after.hour, due // 60, due % 60, 0, _UTC
            )
        # Due in the next hour: built directly, but for the last hour of a
        # day (the calendar's business: a period on from this hour's slot).
        due -= 3_600
        hour = after.hour
        if hour < 23:
            return datetime(
                after.year, after.month, after.day, hour + 1, due // 60, due % 60, 0, _UTC
            )
        slot = datetime(after.year, after.month, after.day, hour, due // 60, due % 60, 0, _UTC)
        period = _ONE_HOUR
    elif policy._day_grid:  # noqa: SLF001 - as above
        grid = policy._day_grid  # noqa: SLF001
        if type(offset) is not int or not 0 <= offset < grid:
            raise _bad_offset(policy.cadence, offset, policy)
        if grid == 3_600:
            # One slot an hour: this hour's, or the next one. A comparison of
            # datetimes is cheaper than the seconds arithmetic below.
            slot = datetime(
                after.year, after.month, after.day, after.hour, offset // 60, offset % 60, 0, _UTC
            )
            if slot > after:
                return slot
            try:
                return slot + _ONE_HOUR
            except OverflowError:
                raise _end_of_time() from None
        if grid == _DAY:
            # One slot a day: today's, or tomorrow's, as for hourly.
            slot = datetime(
                after.year, after.month, after.day,
                offset // 3_600, offset // 60 % 60, offset % 60, 0, _UTC,
            )  # fmt: skip
            if slot > after:
                return slot
            try:
                return slot + _ONE_DAY
            except OverflowError:
                raise _end_of_time() from None
        into = after.hour * 3_600 + after.minute * 60 + after.second
        due = into - (into - offset) % grid + grid
        if due < _DAY:
            hours, rest = divmod(due, 3_600)
            return datetime(
                after.year, after.month, after.day, hours, rest // 60, rest % 60, 0, _UTC
            )
        hours, rest = divmod(due - _DAY, 3_600)
        slot = datetime(after.year, after.month, after.day, hours, rest // 60, rest % 60, 0, _UTC)
        period = _ONE_DAY
    else:
        cadence = policy.cadence
        if cadence is not _REALTIME:
            if cadence is _DAILY:
                # Only a zoned daily policy has no UTC grid.
                if type(offset) is not int or not 0 <= offset < _DAY:
                    raise _bad_offset(cadence, offset)
                return _next_local(ZoneInfo(policy.timezone), offset, after)  # type: ignore[arg-type]
            if cadence is _EVERY:
                # An interval that divides neither an hour nor a day (7
                # minutes, 5 hours, a week): the epoch-aligned grid.
                return _next_every(policy, offset, after)
            return _next_other(policy, offset, after)
        # Real-time syncs are not spread: their offset is 0.
        if type(offset) is not int or offset:
            raise _bad_offset(cadence, offset)
        slot = datetime(after.year, after.month, after.day, after.hour, after.minute, 0, 0, _UTC)
        period = _ONE_MINUTE
    # The slot built from *after*'s fields is not after it: the answer is a
    # period on (hour and day grids), or the next minute.
    try:
        return slot + period
    except OverflowError:
        raise _end_of_time() from None


def _end_of_time() -> ValueError:
    # A period past 9999-12-31 is the end of time: fail as the epoch-seconds
    # version did (datetime.fromtimestamp), which callers already expect.
    return ValueError("year 10000 is out of range")


def slot_of(policy: SyncPolicy, when: datetime, *, offset: int) -> datetime:
    """
    The grid slot at or before *when*.

    The scheduler uses it to name the slot a late or catch-up run belongs to
    (a run record is unique per slot), and to tell a few seconds late (still the
    due slot) from more than a period late (one catch-up run, then back on the
    grid).

    Args:
        policy: The sync's policy; its cadence and time zone select the grid.
        when: Any aware instant.
        offset: The sync's slot offset, as for :func:`next_due`. The grid
            depends on it, so it is required; it is keyword-only so that it is
            not confused with the instant.

    Returns:
        The latest grid point not after *when*, as an aware UTC datetime.

    Raises:
        TypeError: If *when* is naive.
        ConfigurationError: If the policy is one-time (it has no grid) or
            *offset* is out of range for the cadence.
    """
    if type(when) is not datetime or when.tzinfo is not _UTC:
        when = require_aware(when, "when")
    cadence = policy.cadence
    if type(offset) is not int or not 0 <= offset < offset_bound(policy):
        raise _bad_offset(cadence, offset, policy)
    if cadence is Cadence.ONE_TIME:
        raise ConfigurationError("cadence", cadence, "a one-time sync has no slot grid")
    if cadence is _EVERY:
        period = _interval_seconds(policy)
        seconds = _exact_seconds(when)
        return _from_ts(seconds - (seconds - offset) % period, _UTC)
    if cadence is _WEEKLY:
        return _last_weekly(_zone(policy), _weekdays(policy), offset, when)
    if cadence is _CRON:
        return _last_cron(_spec(policy), _zone_or_none(policy), when)
    if policy.timezone is not None:
        return _slot_local(ZoneInfo(policy.timezone), offset, when)
    seconds = _exact_seconds(when)
    return _from_ts(seconds - (seconds - offset) % _GRID_SECONDS[cadence], _UTC)


def stable_offset(key: str, period_seconds: int) -> int:
    """
    A slot offset for *key*, the same in every process, spread over the period.

    Offsets must survive restarts and agree between workers, so they come from
    a cryptographic digest rather than :func:`hash`, which is salted per
    process. A 64-bit digest makes the modulo bias negligible for any period.

    Args:
        key: What identifies the sync's schedule, for example its id.
        period_seconds: The period to spread over, a positive number of
            seconds.

    Returns:
        An ``int`` in ``[0, period_seconds)``.

    Raises:
        ConfigurationError: If *key* is not a ``str`` or *period_seconds* is not
            a positive ``int``.
    """
    if not isinstance(key, str):
        raise ConfigurationError("key", key, f"must be a str, not {type(key).__name__}")
    _check_positive("period_seconds", period_seconds)
    digest = hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), digest_size=8, person=_OFFSET_PERSON
    ).digest()
    return int.from_bytes(digest, "big") % period_seconds


def spread_ratio(offsets: Iterable[int], period_seconds: int, bucket_seconds: int = 60) -> float:
    """
    How uneven a set of slot offsets is: busiest bucket count / mean bucket count.

    1.0 is perfectly flat load; the busiest minute is what sizes the workers,
    so this is the number the spread goal is stated in.

    Args:
        offsets: Slot offsets, each in ``[0, period_seconds)``.
        period_seconds: The period the offsets live in.
        bucket_seconds: The bucket width; it must divide the period, since a
            short last bucket would skew the mean.

    Returns:
        The ratio, at least 1.0.

    Raises:
        ConfigurationError: If *offsets* is empty or holds an offset out of
            range, or the bucket does not divide the period.
    """
    _check_positive("period_seconds", period_seconds)
    _check_positive("bucket_seconds", bucket_seconds)
    if period_seconds % bucket_seconds:
        raise ConfigurationError(
            "bucket_seconds", bucket_seconds, f"must divide period_seconds={period_seconds}"
        )
    counts = [0] * (period_seconds // bucket_seconds)
    total = 0
    for offset in offsets:
        if type(offset) is not int or not 0 <= offset < period_seconds:
            raise ConfigurationError(
                "offsets", offset, f"every offset must be an int in [0, {period_seconds})"
            )
        counts[offset // bucket_seconds] += 1
        total += 1
    if not total:
        raise ConfigurationError("offsets", [], "must not be empty")
    return max(counts) * len(counts) / total


# -- a run's place on the grid ----------------------------------------------


def effective_trigger(
    trigger: Trigger,
    cadence: Cadence,
    slot: datetime,
    started: datetime,
    *,
    next_slot: datetime | None = None,
) -> Trigger:
    """
    Why a claimed slot runs, as docs/concepts/history.md defines it: a
    scheduled or real-time slot that starts more than one period late is a
    ``catch_up``; host-requested runs (manual, one-time, teardown) keep their
    trigger whatever the delay.

    A grid whose slots are not a fixed period apart (every, weekly, cron,
    daily in a time zone: :func:`uneven_grid`) passes its slot after *slot*
    as *next_slot*: starting at or after it is a catch-up (for a fixed
    period, the same rule).
    """
    if trigger not in (Trigger.SCHEDULED, Trigger.REALTIME):
        return trigger
    if cadence is Cadence.ONE_TIME:
        return Trigger.ONE_TIME
    period = cadence.period
    if next_slot is not None:
        if started >= next_slot:
            return Trigger.CATCH_UP
    elif period is not None and started - slot >= period:
        return Trigger.CATCH_UP
    return Trigger.REALTIME if cadence is Cadence.REALTIME else Trigger.SCHEDULED


def uneven_grid(sync: Sync) -> bool:
    """
    Whether the sync's slots are not a fixed period apart (every, weekly and
    cron grids, and daily in a time zone, whose days last 23 or 25 hours at
    DST changes): its catch-ups are told by the slot after its own
    (:func:`effective_trigger`'s *next_slot*).
    """
    cadence = sync.cadence
    if cadence is Cadence.ONE_TIME:
        return False
    return cadence.period is None or (cadence is Cadence.DAILY and sync.policy.timezone is not None)


@attrs.frozen
class NextRun:
    """
    When a recurring sync is due after a run, and how many grid slots the run
    coalesced (slots strictly between the run's own slot and the next one:
    missed before it started, or passed while it ran).
    """

    due: datetime | None
    coalesced: int = 0


def slots_between(policy: SyncPolicy, offset: int, low: datetime, high: datetime) -> int:
    """
    How many grid slots lie strictly between *low* and *high*, in constant time.
    """
    if high <= low or policy.cadence is Cadence.ONE_TIME:
        return 0
    first = next_due(policy, low, offset, low)
    if first is None or first >= high:
        return 0
    last = slot_of(policy, high - _TICK, offset=offset)
    if last < first:
        return 0
    cadence = policy.cadence
    if cadence is _WEEKLY:
        zone = _zone(policy)
        return _count_weekdays(
            first.astimezone(zone).date(), last.astimezone(zone).date(), _weekdays(policy)
        )
    if cadence is _CRON:
        spec, cron_zone = _spec(policy), _zone_or_none(policy)
        if cron_zone is None:
            return spec.count_between(_naive(first), _naive(last))
        # In a zone, wall times miscount DST days (a gap's times share one
        # run at its end; a skipped wall time still runs there): walk the
        # real slots, which a catch-up window of hours or days allows.
        walked = _walk_slots(policy, offset, first, high)
        if walked is not None:
            return walked
        # Longer than the walk: wall times, off by a few per DST change in
        # the reported number only.
        return spec.count_between(
            _naive(first.astimezone(cron_zone)), _naive(last.astimezone(cron_zone))
        )
    if policy.timezone is None:
        period = policy.period
        assert period is not None  # noqa: S101 - the other recurring policies have one
        return int((last - first).total_seconds()) // int(period.total_seconds()) + 1
    # One slot per local day: count local dates (a skipped local day has none,
    # a rare over-count by one that only affects the reported number).
    from zoneinfo import ZoneInfo  # noqa: PLC0415 - only zoned policies need it

    zone = ZoneInfo(policy.timezone)
    return (last.astimezone(zone).date() - first.astimezone(zone).date()).days + 1


_TICK = timedelta(microseconds=1)
_WALK = 20_000
"""Most slots :func:`slots_between` counts one by one (about 0.1 s)."""


def _walk_slots(policy: SyncPolicy, offset: int, first: datetime, high: datetime) -> int | None:
    """The slots from *first* (one) to before *high*, or ``None`` past :data:`_WALK`."""
    count = 0
    at: datetime | None = first
    while at is not None and at < high:
        count += 1
        if count > _WALK:
            return None
        at = next_due(policy, first, offset, at)
    return count


def next_after_run(
    policy: SyncPolicy,
    offset: int,
    slot: datetime,
    started: datetime,
    finished: datetime,
) -> NextRun:
    """
    The next due slot of a recurring sync after a run of *slot* that ran from
    *started* to *finished*, on the slot grid of *policy* and *offset*.

    Slots that fell due before the run started are covered by it (one
    catch-up run, never a burst). A slot that fell due while the run was
    running is not dropped: it is due at once (the overrun delays it, and the
    slots before it are coalesced into it). Otherwise the next slot is the
    first one after the run finished. Either way the count of skipped slots
    is returned, so every slot is run or accounted for.
    """
    grid = policy._hour_grid or policy._day_grid  # noqa: SLF001 - see next_due
    if not grid and policy.cadence is _REALTIME:
        grid = _PERIOD_SECONDS[_REALTIME] or 0
    if (
        grid
        and type(offset) is int
        and 0 <= offset < grid
        and type(slot) is datetime
        and slot.tzinfo is _UTC
        and type(started) is datetime
        and started.tzinfo is _UTC
        and type(finished) is datetime
        and finished.tzinfo is _UTC
    ):
        return _next_on_utc_grid(grid, offset, slot, started, finished)
    return _next_after_run(policy, offset, slot, started, finished)


def _next_on_utc_grid(
    grid: int, offset: int, slot: datetime, started: datetime, finished: datetime
) -> NextRun:
    """
    :func:`next_after_run` on a UTC grid of whole seconds, in epoch seconds:
    the same answer (a property test holds them equal) at a third of the cost,
    which every run of an hourly, daily or real-time sync pays.
    """
    at = _exact_seconds(finished)
    last = at - (at - offset) % grid  # the grid point at or before *finished*
    low = _exact_seconds(slot)
    # Grid points are whole seconds: "after an instant" is "after its whole second".
    due = last if last > low and last > _exact_seconds(started) else last + grid
    first = next_due_ts(grid, offset, low)  # the first grid point after *slot*
    try:
        return NextRun(due=_EPOCH + timedelta(seconds=due), coalesced=max(0, (due - first) // grid))
    except OverflowError:
        raise _end_of_time() from None


def _next_after_run(
    policy: SyncPolicy,
    offset: int,
    slot: datetime,
    started: datetime,
    finished: datetime,
) -> NextRun:
    """:func:`next_after_run` on any grid, through the slot functions."""
    anchor = min(slot, started)
    try:
        last: datetime | None = slot_of(policy, finished, offset=offset)
    except (OverflowError, ValueError):
        # The beginning of time: no slot at or before *finished* exists (a
        # clock in the first period of year 1), so none fell due during the run.
        last = None
    if last is not None and last > started and last > slot:
        due = last
    else:
        # From when it finished, not from its slot: a slot the store put ahead
        # of a clock that went back must not hold the sync until then.
        due_or_none = next_due(policy, anchor, offset, finished)
        assert due_or_none is not None  # noqa: S101 - recurring policies always have one
        due = due_or_none
    return NextRun(due=due, coalesced=slots_between(policy, offset, slot, due))


def fallback_offset(sync_id: str, cadence: Cadence) -> int:
    """
    The offset of a sync on the grid of a cadence it was given no slot for
    (a real-time sync falling back to hourly): derived from its id, so the
    fallback runs keep one time in the hour on every worker.
    """
    period = period_seconds(cadence)
    return 0 if period is None else stable_offset(sync_id, period)


def grid_policy(sync: Sync, offset: int) -> tuple[SyncPolicy, int]:
    """
    The policy whose slot grid *sync* runs on now (its effective cadence,
    which differs from the policy's while a real-time sync falls back), and
    the offset on that grid (*offset* is the one allocated for the policy's
    own cadence).
    """
    cadence = sync.cadence
    policy = sync.policy
    if cadence is policy.cadence:
        return policy, offset
    policy = attrs.evolve(
        policy, cadence=cadence, timezone=None, at=None, interval=None, on=(), expression=None
    )
    return policy, fallback_offset(sync.id, cadence)


def next_slot_after(sync: Sync, anchor: datetime, offset: int, after: datetime) -> datetime | None:
    """
    The sync's first slot after *after* on its current grid, or ``None``
    when none exists before the end of time (year 9999).
    """
    policy, grid_offset = grid_policy(sync, offset)
    try:
        return next_due(policy, anchor, grid_offset, after)
    except ConfigurationError:
        raise  # a damaged schedule row, not the end of time
    except (OverflowError, ValueError):
        return None


def offset_bound(policy: SyncPolicy) -> int:
    """
    Offsets of *policy*'s grid lie in ``[0, bound)``: the interval of an
    every() sync, a day for weekly syncs (a time of day), 1 for the cadences
    that are not spread.
    """
    if policy.cadence is _EVERY:
        return _interval_seconds(policy)
    return _OFFSET_BOUND[policy.cadence]


def spread_period(policy: SyncPolicy) -> int | None:
    """
    The period, in seconds, whose one-minute buckets the slot allocator
    counts a sync of *policy* in, or ``None`` when it is not counted.

    Hourly, daily and weekly syncs are counted in the hour or the day (a
    weekly slot is a time of day); an every() sync in its interval, so
    every(1 hour) shares the hourly buckets. Syncs at a chosen time (a
    daily or weekly ``at``) are counted too, in the bucket of that time, so
    the syncs cohortsync places spread around them. Cron and real-time syncs
    run at times no single bucket describes: they are not counted.
    """
    cadence = policy.cadence
    if cadence is _HOURLY:
        return 3_600
    if cadence is _DAILY or cadence is _WEEKLY:
        return _DAY
    if cadence is _EVERY:
        return _interval_seconds(policy)
    return None


def fixed_offset(policy: SyncPolicy) -> int | None:
    """
    The offset of a sync whose time was chosen: a daily or weekly ``at`` as
    seconds of wall time after midnight, 0 for cron (the expression places
    every run), 0 for one-time and real-time syncs; ``None`` when cohortsync
    picks the offset to spread load.
    """
    at = policy.at
    if at is not None:
        return at.hour * 3_600 + at.minute * 60 + at.second
    if spread_period(policy) is None:
        return 0
    return None


def _interval_seconds(policy: SyncPolicy) -> int:
    interval = policy.interval
    if interval is None:
        raise ConfigurationError("interval", interval, "an every() policy needs an interval")
    return interval.days * _DAY + interval.seconds


def _zone(policy: SyncPolicy) -> ZoneInfo | timezone:
    return _UTC if policy.timezone is None else ZoneInfo(policy.timezone)


def _zone_or_none(policy: SyncPolicy) -> ZoneInfo | None:
    return None if policy.timezone is None else ZoneInfo(policy.timezone)


def _spec(policy: SyncPolicy) -> CronSpec:
    if policy.expression is None:
        raise ConfigurationError("expression", None, "a cron policy needs an expression")
    return parse_cron(policy.expression)


def _weekdays(policy: SyncPolicy) -> frozenset[int]:
    return frozenset(day.number for day in policy.on)


def _naive(when: datetime) -> datetime:
    return when.replace(tzinfo=None)


def _next_every(policy: SyncPolicy, offset: int, after: datetime) -> datetime:
    """
    :func:`next_due` for every() policies: an epoch-aligned grid, like the
    hourly one, so intervals that divide a day line up with UTC midnights
    and no interval drifts.
    """
    interval = policy.interval
    if interval is None:
        raise ConfigurationError("interval", None, "an every() policy needs an interval")
    seconds = interval.days * _DAY + interval.seconds
    if type(offset) is not int or not 0 <= offset < seconds:
        raise _bad_offset(policy.cadence, offset, policy)
    if not _DAY % seconds:
        # The grid lines up with each UTC midnight: the answer is usually
        # built from *after*'s own calendar fields, as for hourly syncs.
        into = after.hour * 3_600 + after.minute * 60 + after.second
        due = into - (into - offset) % seconds + seconds
        if due < _DAY:
            return datetime(
                after.year, after.month, after.day,
                due // 3_600, due // 60 % 60, due % 60, 0, _UTC,
            )  # fmt: skip
    delta = after - _EPOCH
    now = delta.days * _DAY + delta.seconds
    return _from_ts(now - (now - offset) % seconds + seconds, _UTC)


def _next_other(policy: SyncPolicy, offset: int, after: datetime) -> datetime | None:
    """:func:`next_due` for one-time, every, weekly and cron policies."""
    cadence = policy.cadence
    if cadence is _CRON and offset == 0 and type(offset) is int:
        expression, zone_name = policy.expression, policy.timezone
        if expression is not None:
            return _next_cron(
                parse_cron(expression), None if zone_name is None else ZoneInfo(zone_name), after
            )
    if type(offset) is not int or not 0 <= offset < offset_bound(policy):
        raise _bad_offset(cadence, offset, policy)
    if cadence is _EVERY:
        # Epoch-aligned like the hourly grid: intervals that divide a day
        # line up with UTC midnights, and no interval drifts.
        period = _interval_seconds(policy)
        seconds = _exact_seconds(after)
        return _from_ts(seconds - (seconds - offset) % period + period, _UTC)
    if cadence is _WEEKLY:
        return _next_weekly(_zone(policy), _weekdays(policy), offset, after)
    if cadence is _CRON:
        return _next_cron(_spec(policy), _zone_or_none(policy), after)
    return None  # one-time: its single run is due at the anchor


def _next_weekly(
    zone: ZoneInfo | timezone, days: frozenset[int], offset: int, after: datetime
) -> datetime:
    """
    The first slot strictly after *after* of a local-day grid kept to the
    days of the week *days*: the daily rule (:func:`_next_local_day`),
    then at most six more days forward.
    """
    day, slot = _next_local_day_with_date(zone, offset, after)
    while day.weekday() not in days:
        day, slot = _existing_slot(zone, day + _ONE_DAY, offset, _ONE_DAY)
    return slot


def _last_weekly(
    zone: ZoneInfo | timezone, days: frozenset[int], offset: int, when: datetime
) -> datetime:
    """The last slot at or before *when* of a weekly grid: the mirror of :func:`_next_weekly`."""
    day = when.astimezone(zone).date()
    slot = _local_slot(zone, day, offset)
    while slot is None or slot > when or day.weekday() not in days:
        day -= _ONE_DAY
        slot = _local_slot(zone, day, offset)
    return slot


def _count_weekdays(first: date, last: date, days: frozenset[int]) -> int:
    """How many dates in ``[first, last]`` fall on one of *days*, in constant time."""
    if last < first:
        return 0
    weeks, rest = divmod((last - first).days + 1, 7)
    start = first.weekday()
    return weeks * len(days) + sum(1 for i in range(rest) if (start + i) % 7 in days)


def _next_cron(spec: CronSpec, zone: ZoneInfo | None, after: datetime) -> datetime:
    """
    The first time of a cron expression strictly after *after*, on the wall
    clock of *zone* (UTC if ``None``), with the daily rules for DST: a wall
    time in a gap runs when the gap ends (times that share a gap share one
    run), unless the zone skipped its whole date; a repeated wall time runs
    once, in the later fold.

    Wall-clock times map to instants in order (fold 1 never goes back), so
    the answer is the first match at or after one start: the next minute of
    *after*'s wall clock, or, when *after* falls in the first pass of a
    repeated hour, the start of the repetition (its times run in the second
    pass, after *after*). No minute-by-minute walk.

    The common case needs no DST rule: when the zone's offset is the same at
    *after* and two days later, no transition lies between (the tz database
    never changes an offset and back within two days:
    ``tests/test_schedule_policies.py`` checks every zone from 1900 to 2100),
    so a match within a day of *after* is its wall time minus that offset.
    Otherwise :func:`_next_cron_near` applies the rules step by step.
    """
    if zone is None:
        y, mo, d, h, mi = spec.next_fields(
            after.year, after.month, after.day, after.hour, after.minute + 1
        )
        return datetime(y, mo, d, h, mi, 0, 0, _UTC)
    local = after.astimezone(zone)
    offset = local.utcoffset()
    y, mo, d, h, mi = spec.next_fields(
        local.year, local.month, local.day, local.hour, local.minute + 1
    )
    if offset is not None:
        try:
            instant = datetime(y, mo, d, h, mi, 0, 0, _UTC) - offset
            # Probes two days apart with *after*'s offset, up to a day past
            # the match: no transition anywhere in between.
            if instant - after < _FAST_SPAN:
                probe, until = after + _STABLE, instant + _ONE_DAY
                while probe.astimezone(zone).utcoffset() == offset:
                    if probe >= until:
                        return instant
                    probe += _STABLE
        except OverflowError:
            pass  # the end of time: the careful path says so
    return _next_cron_near(spec, zone, after)


_STABLE = timedelta(days=2)
_FAST_SPAN = timedelta(days=8)
"""Matches further than this from *after* (rare schedules) take the careful path."""


def _next_cron_near(spec: CronSpec, zone: ZoneInfo, after: datetime) -> datetime:
    """:func:`_next_cron` for a zone, with every DST rule checked step by step."""
    local = after.astimezone(zone)
    start = None
    if local.fold == 0:
        second = local.replace(fold=1)
        first_offset, second_offset = local.utcoffset(), second.utcoffset()
        if first_offset is not None and second_offset is not None and first_offset > second_offset:
            start = _repeat_start(zone, after, first_offset - second_offset)
    if start is None:
        start = next_minute(_naive(local))
    while True:
        wall = spec.first_at_or_after(start)
        instant = _wall_instant(zone, wall)
        if instant is not None:
            return instant
        # The zone skipped this whole date: its times have no run.
        start = datetime.combine(wall.date() + _ONE_DAY, _MIDNIGHT)


def _last_cron(spec: CronSpec, zone: ZoneInfo | None, when: datetime) -> datetime:
    """The last time of a cron expression at or before *when*: the mirror of :func:`_next_cron`."""
    if zone is None:
        return spec.last_at_or_before(_naive(when)).replace(tzinfo=_UTC)
    local = when.astimezone(zone)
    end = _naive(local)
    if local.fold == 0:
        second = local.replace(fold=1)
        first_offset, second_offset = local.utcoffset(), second.utcoffset()
        if first_offset is not None and second_offset is not None and first_offset > second_offset:
            # The repeated times run in the second pass, after *when*.
            end = _repeat_start(zone, when, first_offset - second_offset) - _TICK
    while True:
        wall = spec.last_at_or_before(end)
        instant = _wall_instant(zone, wall)
        if instant is not None:
            return instant
        end = datetime.combine(wall.date(), _MIDNIGHT) - _TICK


def _repeat_start(zone: ZoneInfo, first_pass: datetime, repeat: timedelta) -> datetime:
    """
    The first wall time (naive, rounded up to a minute) of the repetition
    that the instant *first_pass* shows for the first time: the clock goes
    back within *repeat* of it, found by bisection to the second.
    """
    low = _exact_seconds(first_pass)
    high = low + int(repeat.total_seconds())
    before = _from_ts(low, zone).utcoffset()
    while high - low > 1:
        middle = (low + high) // 2
        if _from_ts(middle, zone).utcoffset() == before:
            low = middle
        else:
            high = middle
    wall = _naive(_from_ts(high, zone))
    if wall.second or wall.microsecond:
        wall = next_minute(wall)
    return wall


_MIDNIGHT = datetime.min.time()


def hour_of(when: datetime) -> int:
    """The hour since the epoch that *when* falls in."""
    delta = when - _EPOCH
    return (delta.days * _DAY + delta.seconds) // 3_600


def _next_local(zone: ZoneInfo, offset: int, after: datetime) -> datetime:
    """
    The first slot of a local-day grid strictly after *after*: see
    :func:`_next_local_day`. At the beginning of time (a clock in the first
    days of year 1) the local date or the day before it may not exist; the
    slots are then found walking forward from the first local date.
    """
    try:
        return _next_local_day(zone, offset, after)
    except OverflowError:
        if after.year > 1:
            raise  # the end of time: no slot before year 10,000
    day = date.min
    while True:
        try:
            slot = _local_slot(zone, day, offset)
        except OverflowError:
            slot = None  # that local time is before year 1 in UTC
        if slot is not None and slot > after:
            return slot
        day += _ONE_DAY


def _next_local_day(zone: ZoneInfo, offset: int, after: datetime) -> datetime:
    """
    The first slot of a local-day grid strictly after *after* (aware UTC).

    Slots never go backwards as the local date advances, so the answer is the
    slot of the local date of *after* or of a neighbour; no loop over the gap.

    If the slot of *after*'s date has passed, the answer is the slot of the
    next day that exists: the next date, or the one after it when the zone
    skipped the next date altogether (:func:`_local_slot`); the tz database
    never skips two days running. That slot is after *after*: it shows a wall
    time on a later date, and if a backward jump repeats that wall time, the
    later fold is taken, which comes after everything shown before the repeat.

    Earlier days' slots can also be after *after*, but only when *after* falls
    before a backward jump that repeats them: rare, and bounded by the longest
    jump in the tz database (a whole day, in Alaska in 1867), so the walk back
    takes at most one step, whatever the distance from the anchor.
    """
    return _next_local_day_with_date(zone, offset, after)[1]


def _next_local_day_with_date(
    zone: ZoneInfo | timezone, offset: int, after: datetime
) -> tuple[date, datetime]:
    """:func:`_next_local_day`, with the local date whose slot it is."""
    day = after.astimezone(zone).date()
    slot = _local_slot(zone, day, offset)
    if slot is None or slot <= after:
        return _existing_slot(zone, day + _ONE_DAY, offset, _ONE_DAY)
    while True:
        earlier_day, earlier = _existing_slot(zone, day - _ONE_DAY, offset, -_ONE_DAY)
        if earlier <= after:
            return day, slot
        day, slot = earlier_day, earlier


def _slot_local(zone: ZoneInfo, offset: int, when: datetime) -> datetime:
    """
    The last slot of a local-day grid at or before *when* (aware UTC).

    The mirror image of :func:`_next_local`: the next day's slot is never at or
    before *when*, and walking back takes one step, or two when *when* falls
    before a backward jump of a whole day, plus one over a skipped day.
    """
    day = when.astimezone(zone).date()
    slot = _local_slot(zone, day, offset)
    while slot is None or slot > when:
        day -= _ONE_DAY
        slot = _local_slot(zone, day, offset)
    return slot


def _existing_slot(
    zone: ZoneInfo | timezone, day: date, offset: int, step: timedelta
) -> tuple[date, datetime]:
    """
    The slot of *day*, or if the zone skipped *day*, of the nearest day in the
    direction of *step* (one day forward or back) that exists, with that day.
    """
    slot = _local_slot(zone, day, offset)
    while slot is None:
        day += step
        slot = _local_slot(zone, day, offset)
    return day, slot


def _local_slot(zone: ZoneInfo | timezone, day: date, offset: int) -> datetime | None:
    """
    The instant of *day*'s slot: *offset* seconds of wall time after local
    midnight, as aware UTC; ``None`` if the zone skips *day* altogether.

    A wall time repeated by a backward transition resolves to the later fold,
    so the sync runs once, after the repeated hour has begun for the second
    time. A wall time skipped by a forward transition resolves to the
    transition itself, the first instant that exists after it: running early
    would mean running before the local day's slot.

    A day is skipped when the gap holding its wall time began at or before its
    midnight and ended at or after the next one: Samoa went from 2011-12-29
    23:59:59 to 2011-12-31 00:00, so no clock there showed 2011-12-30. Such a
    day has no slot. Resolving it to the transition, like any other gap, would
    run the sync twice on the next day: at its midnight and at its own slot.
    A day that exists keeps its slot even when a gap reaching past midnight
    skips it: Sofia went from 1979-03-31 23:00 to 1979-04-01 00:00, so a 23:30
    slot of the 31st runs at that transition, shown as midnight on the 1st.
    """
    hours, rest = divmod(offset, 3_600)
    minutes, seconds = divmod(rest, 60)
    return _wall_instant(
        zone,
        datetime(day.year, day.month, day.day, hours, minutes, seconds),  # noqa: DTZ001 - a wall time
    )


def _wall_instant(zone: ZoneInfo | timezone, wall_time: datetime) -> datetime | None:
    """
    The instant a wall time (naive) of *zone* runs at, by the rules of
    :func:`_local_slot`: the later fold of a repeated time, the end of the
    gap for a skipped one, ``None`` if the zone skipped its whole date.
    """
    day = wall_time.date()
    wall = wall_time.replace(tzinfo=zone, fold=1)
    instant = wall.astimezone(_UTC)
    # Both sides carry the same tzinfo, so == compares wall clock readings: a
    # mismatch means the wall time does not exist (it is in a gap).
    if instant.astimezone(zone) == wall:
        return instant
    assert isinstance(zone, ZoneInfo)  # noqa: S101 - fixed offsets have no gaps
    transition = _end_of_gap(zone, wall)
    # Just before the transition the clock shows the last moment before the
    # gap, and at it the first moment after: the day is skipped if neither is
    # on it.
    if (
        transition.astimezone(zone).date() > day
        and (transition - timedelta.resolution).astimezone(zone).date() < day
    ):
        return None
    return transition


def _end_of_gap(zone: ZoneInfo, wall: datetime) -> datetime:
    """
    The transition instant that skips over *wall*, which is in a gap.

    zoneinfo does not expose its transitions, but it does resolve a gap's wall
    time with the offsets either side of it (``fold`` picks which). The
    transition lies between those two instants; bisecting on "has the wall
    clock reached *wall* yet" finds it to the second in at most 17 steps, as no
    gap is longer than a day: bounded, whatever the date.
    """
    # In a gap, fold=1 applies the offset from after the jump, which maps to an
    # instant before it, and fold=0 the offset from before, which maps after it.
    low = _exact_seconds(wall.replace(fold=1))
    high = _exact_seconds(wall.replace(fold=0))
    # Invariant: the wall clock reads earlier than *wall* at low, later at high.
    while high - low > 1:
        middle = (low + high) // 2
        if _from_ts(middle, zone) >= wall:
            high = middle
        else:
            low = middle
    return _from_ts(high, _UTC)


def _exact_seconds(value: datetime) -> int:
    delta = value - _EPOCH
    return delta.days * _DAY + delta.seconds


def _check_positive(field: str, value: object) -> None:
    if type(value) is not int or value <= 0:
        raise ConfigurationError(field, value, "must be a positive int number of seconds")


def _bad_grid(period: object, offset: object) -> ConfigurationError:
    if type(period) is not int or period <= 0:
        return ConfigurationError("period_seconds", period, "must be a positive int")
    return ConfigurationError(
        "offset", offset, f"must be an int number of seconds in [0, {period})"
    )


def _bad_offset(
    cadence: Cadence, offset: object, policy: SyncPolicy | None = None
) -> ConfigurationError:
    bound = _OFFSET_BOUND[cadence] if policy is None else offset_bound(policy)
    if bound == 1:
        return ConfigurationError(
            "offset",
            offset,
            f"{cadence.value} syncs are not spread over a period; their offset must be 0",
        )
    return ConfigurationError(
        "offset",
        offset,
        f"must be an int number of seconds in [0, {bound}) for {cadence.value} syncs",
    )
