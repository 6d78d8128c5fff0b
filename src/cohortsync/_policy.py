"""
How often a sync runs and how it behaves: :class:`SyncPolicy`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from cohortsync import _validators as v
from cohortsync.exceptions import ConfigurationError

__all__ = [
    "Cadence",
    "FirstRun",
    "MassRemovalGuard",
    "OnDelete",
    "OnIneligible",
    "RetryPolicy",
    "SyncPolicy",
    "Weekday",
]


class Cadence(enum.Enum):
    """
    How often a sync runs.
    """

    ONE_TIME = "one_time"
    HOURLY = "hourly"
    DAILY = "daily"
    REALTIME = "realtime"
    EVERY = "every"
    """A fixed interval (:meth:`SyncPolicy.every`)."""
    WEEKLY = "weekly"
    """Chosen days of the week (:meth:`SyncPolicy.weekly`)."""
    CRON = "cron"
    """A cron expression (:meth:`SyncPolicy.cron`)."""

    # Hashed by identity, in C (see IdentifierKind): the hot path keys dicts by it.
    __hash__ = object.__hash__

    @property
    def period(self) -> timedelta | None:
        """
        The length of one scheduling period, or ``None`` for one-time syncs
        and for cadences whose period depends on the policy (every, weekly,
        cron: see :attr:`SyncPolicy.period`).
        """
        return _PERIODS[self]


_PERIODS = {
    Cadence.ONE_TIME: None,
    Cadence.HOURLY: timedelta(hours=1),
    Cadence.DAILY: timedelta(days=1),
    Cadence.REALTIME: timedelta(minutes=1),
    Cadence.EVERY: None,
    Cadence.WEEKLY: None,
    Cadence.CRON: None,
}


# The values of each enum as a Literal, so the string spelling of an option
# (``on_delete="remove_delivered"``) is checked by mypy like the member is.
_CadenceValue = Literal["one_time", "hourly", "daily", "realtime", "every", "weekly", "cron"]


def _to_cadence(value: Cadence | _CadenceValue) -> Cadence:
    return v.to_enum(Cadence, "cadence")(value)


class OnIneligible(enum.Enum):
    """
    What a real-time sync does when a run finds it no longer eligible (for
    example, its cohort grew past 1,000,000 members).
    """

    FALLBACK_HOURLY = "fallback_hourly"
    PAUSE = "pause"


class OnDelete(enum.Enum):
    """
    What deleting a sync does to the destination.
    """

    LEAVE = "leave"
    REMOVE_DELIVERED = "remove_delivered"


class FirstRun(enum.Enum):
    """
    When a recurring sync first runs after it is created or updated.
    """

    NOW = "now"
    """At once (the default): the first two runs may be closer than one period."""
    NEXT_SLOT = "next_slot"
    """At its first slot: for hosts that do not want a run on every edit."""


class Weekday(enum.Enum):
    """
    A day of the week, for :meth:`SyncPolicy.weekly`; the order is Monday
    first, as :meth:`datetime.date.weekday` counts.
    """

    MONDAY = "mon"
    TUESDAY = "tue"
    WEDNESDAY = "wed"
    THURSDAY = "thu"
    FRIDAY = "fri"
    SATURDAY = "sat"
    SUNDAY = "sun"

    @property
    def number(self) -> int:
        """0 for Monday to 6 for Sunday, as :meth:`datetime.date.weekday`."""
        return _WEEKDAY_NUMBERS[self]


_WEEKDAY_NUMBERS = {day: i for i, day in enumerate(Weekday)}

_OnIneligibleValue = Literal["fallback_hourly", "pause"]
_FirstRunValue = Literal["now", "next_slot"]
_WeekdayValue = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_Days = Weekday | _WeekdayValue | Iterable[Weekday | _WeekdayValue]

_OnDeleteValue = Literal["leave", "remove_delivered"]


def _to_on_ineligible(value: OnIneligible | _OnIneligibleValue) -> OnIneligible:
    return v.to_enum(OnIneligible, "on_ineligible")(value)


def _to_on_delete(value: OnDelete | _OnDeleteValue) -> OnDelete:
    return v.to_enum(OnDelete, "on_delete")(value)


def _to_first_run(value: FirstRun | _FirstRunValue) -> FirstRun:
    return v.to_enum(FirstRun, "first_run")(value)


def _to_days(value: _Days) -> tuple[Weekday, ...]:
    """Days of the week as a sorted tuple without repeats (Monday first)."""
    one = v.to_enum(Weekday, "on")
    if isinstance(value, (Weekday, str)):
        return (one(value),)
    try:
        days = {one(day) for day in value}
    except TypeError:
        raise ConfigurationError("on", value, "must be a day of the week or several") from None
    return tuple(sorted(days, key=_WEEKDAY_NUMBERS.__getitem__))


@attrs.frozen(kw_only=True)
class MassRemovalGuard:
    """
    Holds back removals that look like an accident.

    A run is ``guarded`` (removals not sent, host asked to confirm) when the
    source returned no members while the audience is not empty, or when it would
    remove more than *max_share* of a delivered audience of at least
    *min_audience* members.
    """

    enabled: bool = attrs.field(default=True, validator=v.instance_of(bool))
    max_share: float = attrs.field(default=0.5, validator=v.share)
    min_audience: int = attrs.field(default=1_000, validator=v.count(0))

    @classmethod
    def disabled(cls) -> MassRemovalGuard:
        """
        A guard that never trips, for syncs whose cohorts really do empty out
        (a daily "signed up today" cohort): every removal is sent as computed,
        even when the source returns nothing.
        """
        return cls(enabled=False)

    def trips(self, delivered: int, removing: int, source_empty: bool) -> bool:
        """
        Whether removing *removing* of *delivered* members must wait for confirmation.

        Raises:
            ConfigurationError: *source_empty* is not a bool.
        """
        v.check_bool("source_empty", source_empty)
        if not self.enabled or removing == 0:
            return False
        if source_empty:
            return True
        if delivered < self.min_audience:
            return False
        # Compare shares, not products: 0.29 * 3000 is 869.99..., which would
        # trip on removing exactly 29 %, not "more than" it.
        return delivered == 0 or removing / delivered > self.max_share


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """
    Exponential backoff with jitter for transient delivery errors.

    The defaults retry 8 times, waiting 1, 2, 4, ... 128 seconds plus up to
    10 % jitter: the last wait is past two minutes. Jitter only lengthens a
    wait, so the nominal backoff is a floor (and ``max_delay`` a ceiling).
    Waits for a rate limit do not count as retries.
    """

    max_retries: int = attrs.field(default=8, validator=v.count(0))
    initial: float = attrs.field(default=1.0, validator=v.number(0.0))
    multiplier: float = attrs.field(default=2.0, validator=v.number(1.0))
    max_delay: float = attrs.field(default=300.0, validator=v.number(0.0))
    jitter: float = attrs.field(default=0.1, validator=v.share)

    def delay(self, attempt: int, random: float) -> float:
        """
        The wait before retry number *attempt* (0-based), given *random* in [0, 1).
        """
        try:
            base = self.initial * self.multiplier**attempt
        except OverflowError:
            base = self.max_delay
        return min(self.max_delay, base * (1.0 + self.jitter * random))


_ZONED = frozenset({Cadence.DAILY, Cadence.WEEKLY, Cadence.CRON})
_TIMED = frozenset({Cadence.DAILY, Cadence.WEEKLY})
MIN_INTERVAL = timedelta(minutes=1)
"""The shortest interval of :meth:`SyncPolicy.every`."""
MAX_INTERVAL = timedelta(days=7)
"""The longest interval of :meth:`SyncPolicy.every`."""


def _check_timezone(inst: SyncPolicy, _attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if inst.cadence not in _ZONED:
        raise ConfigurationError(
            "timezone", value, "only daily, weekly and cron syncs take a time zone"
        )
    if not isinstance(value, str) or not value:
        raise ConfigurationError("timezone", value, "must be an IANA time zone name")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError("timezone", value, "unknown IANA time zone") from None


def _check_at(inst: SyncPolicy, _attribute: attrs.Attribute[Any], value: time | None) -> None:
    if value is None:
        return
    if inst.cadence not in _TIMED:
        raise ConfigurationError("at", value, "only daily and weekly syncs take a time of day")
    if not isinstance(value, time):
        raise ConfigurationError("at", value, "must be a datetime.time")
    if value.tzinfo is not None:
        raise ConfigurationError(
            "at", value, "must be a wall time without tzinfo: the zone is the policy's timezone"
        )
    if value.microsecond:
        raise ConfigurationError("at", value, "must be a whole second")


def _check_interval(
    inst: SyncPolicy, _attribute: attrs.Attribute[Any], value: timedelta | None
) -> None:
    if inst.cadence is not Cadence.EVERY:
        if value is not None:
            raise ConfigurationError("interval", value, "only every() syncs take an interval")
        return
    if not isinstance(value, timedelta):
        raise ConfigurationError("interval", value, "every() needs a datetime.timedelta")
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise ConfigurationError("interval", value, "must be from 1 minute to 7 days")
    if value % MIN_INTERVAL:
        raise ConfigurationError("interval", value, "must be a whole number of minutes")


def _check_on(
    inst: SyncPolicy, _attribute: attrs.Attribute[Any], value: tuple[Weekday, ...]
) -> None:
    if inst.cadence is Cadence.WEEKLY:
        if not value:
            raise ConfigurationError("on", value, "weekly() needs at least one day of the week")
    elif value:
        raise ConfigurationError("on", value, "only weekly syncs take days of the week")


def _check_cron(inst: SyncPolicy, _attribute: attrs.Attribute[Any], value: str | None) -> None:
    if inst.cadence is not Cadence.CRON:
        if value is not None:
            raise ConfigurationError("expression", value, "only cron syncs take a cron expression")
        return
    if value is None:
        raise ConfigurationError("expression", value, "cron() needs a cron expression")
    from cohortsync._cron import parse_cron  # noqa: PLC0415 - _cron imports the exceptions only

    parse_cron(value)


def _check_first_run(inst: SyncPolicy, _attribute: attrs.Attribute[Any], value: FirstRun) -> None:
    if value is FirstRun.NEXT_SLOT and inst.cadence is Cadence.ONE_TIME:
        raise ConfigurationError("first_run", value, "a one-time sync has no slot to wait for")


def _grid_seconds(policy: SyncPolicy) -> int:
    """
    The policy's slot period in seconds if it is a plain UTC grid (hourly,
    daily without a zone, every()), else 0. Runs before the validators, so
    it must not trust the fields.
    """
    if policy.cadence not in _UTC_GRIDS or policy.timezone is not None:
        return 0
    period = policy.period
    if not isinstance(period, timedelta) or period.microseconds or period <= timedelta(0):
        return 0
    return period.days * 86_400 + period.seconds


_UTC_GRIDS = frozenset({Cadence.HOURLY, Cadence.DAILY, Cadence.EVERY})
"""The cadences whose slots lie on a grid of fixed seconds (real-time's offset is always 0)."""


def _hour_grid(policy: SyncPolicy) -> int:
    """
    A period shorter than an hour that divides it, in seconds (its grid lines
    up with every UTC hour), or 0.
    """
    seconds = _grid_seconds(policy)
    return seconds if seconds and seconds < 3_600 and not 3_600 % seconds else 0


def _day_grid(policy: SyncPolicy) -> int:
    """A period of an hour or more that divides a day, in seconds, or 0."""
    seconds = _grid_seconds(policy)
    return seconds if seconds >= 3_600 and not 86_400 % seconds else 0


@attrs.frozen(kw_only=True)
class SyncPolicy:
    """
    A sync's cadence and behaviour. Build it with a named constructor:
    :meth:`one_time`, :meth:`hourly`, :meth:`daily`, :meth:`weekly`,
    :meth:`every`, :meth:`cron` or :meth:`realtime`. Each takes the options
    below that apply to its cadence, as keywords; enum options also take
    their string values (``on_delete="remove_delivered"``).

    Args:
        cadence: How often the sync runs.
        timezone: For daily, weekly and cron syncs, an IANA zone whose local
            wall clock the sync follows (across DST, see
            docs/concepts/scheduling.md); ``None`` means UTC.
        at: For daily and weekly syncs, the local time of day to run at;
            ``None`` lets cohortsync pick a slot that spreads load.
        interval: For :meth:`every` syncs, the time between runs.
        on: For weekly syncs, the days of the week.
        expression: For cron syncs, the 5-field cron expression.
        first_run: Whether a recurring sync runs at once when it is created
            or updated (``now``), or waits for its first slot (``next_slot``).
        send_removals: Whether members who left the cohort are removed at the
            destination (ignored when the destination cannot remove).
        guard: The mass-removal guard.
        on_ineligible: What a real-time sync does when it stops being eligible.
        on_delete: What deleting the sync does to the destination.
        retry: Backoff for transient delivery errors.
        one_time_attempts: How many times a failing one-time sync, or the
            final run removing a deleted sync's members (any cadence), is
            tried before the sync is ``failed``.
        rejection_attempts: How many runs retry a member the destination
            rejected before it becomes a dead letter.
    """

    cadence: Cadence = attrs.field(converter=_to_cadence)
    timezone: str | None = attrs.field(default=None, validator=_check_timezone)
    at: time | None = attrs.field(default=None, validator=_check_at)
    interval: timedelta | None = attrs.field(default=None, validator=_check_interval)
    on: tuple[Weekday, ...] = attrs.field(default=(), converter=_to_days, validator=_check_on)
    expression: str | None = attrs.field(default=None, validator=_check_cron)
    first_run: FirstRun = attrs.field(
        default=FirstRun.NOW, converter=_to_first_run, validator=_check_first_run
    )
    send_removals: bool = attrs.field(default=True, validator=v.instance_of(bool))
    guard: MassRemovalGuard = attrs.field(
        factory=MassRemovalGuard, validator=v.instance_of(MassRemovalGuard)
    )
    on_ineligible: OnIneligible = attrs.field(
        default=OnIneligible.FALLBACK_HOURLY, converter=_to_on_ineligible
    )
    on_delete: OnDelete = attrs.field(default=OnDelete.LEAVE, converter=_to_on_delete)
    retry: RetryPolicy = attrs.field(factory=RetryPolicy, validator=v.instance_of(RetryPolicy))
    one_time_attempts: int = attrs.field(default=5, validator=v.count(1))
    rejection_attempts: int = attrs.field(default=3, validator=v.count(1))
    # Derived from the fields above, not part of the value (no init, eq, repr
    # or serialisation): the UTC grid next_due() builds a slot on from the
    # calendar fields of the instant, read once per call instead of worked
    # out from the cadence and interval on every call (the hot path).
    _hour_grid: int = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(_hour_grid, takes_self=True)
    )
    _day_grid: int = attrs.field(
        init=False, eq=False, repr=False, default=attrs.Factory(_day_grid, takes_self=True)
    )

    # Each named constructor spells out the options that apply to its cadence,
    # so a misspelled or misplaced option is a type error, and its signature
    # shows the class's defaults (TestNamedConstructors keeps them equal).

    @classmethod
    def one_time(
        cls,
        *,
        send_removals: bool = True,
        guard: MassRemovalGuard = MassRemovalGuard(),
        on_delete: OnDelete | _OnDeleteValue = OnDelete.LEAVE,
        retry: RetryPolicy = RetryPolicy(),
        one_time_attempts: int = 5,
        rejection_attempts: int = 3,
    ) -> SyncPolicy:
        """
        Run once, as soon as possible; then the sync is ``completed``.

        The options are the class's (see :class:`SyncPolicy`).
        """
        return cls(
            cadence=Cadence.ONE_TIME,
            send_removals=send_removals,
            guard=guard,
            on_delete=on_delete,
            retry=retry,
            one_time_attempts=one_time_attempts,
            rejection_attempts=rejection_attempts,
        )

    @classmethod
    def hourly(
        cls,
        *,
        send_removals: bool = True,
        guard: MassRemovalGuard = MassRemovalGuard(),
        on_delete: OnDelete | _OnDeleteValue = OnDelete.LEAVE,
        retry: RetryPolicy = RetryPolicy(),
        one_time_attempts: int = 5,
        rejection_attempts: int = 3,
        first_run: FirstRun | _FirstRunValue = FirstRun.NOW,
    ) -> SyncPolicy:
        """
        Run now, then once an hour at a slot cohortsync picks to spread load.

        The options are the class's (see :class:`SyncPolicy`).
        """
        return cls(
            cadence=Cadence.HOURLY,
            first_run=first_run,
            send_removals=send_removals,
            guard=guard,
            on_delete=on_delete,
            retry=retry,
            one_time_attempts=one_time_attempts,
            rejection_attempts=rejection_attempts,
        )

    @classmethod
    def daily(
        cls,
        timezone: str | None = None,
        *,
        at: time | None = None,
        send_removals: bool = True,
        guard: MassRemovalGuard = MassRemovalGuard(),
        on_delete: OnDelete | _OnDeleteValue = OnDelete.LEAVE,
        retry: RetryPolicy = RetryPolicy(),
        one_time_attempts: int = 5,
        rejection_attempts: int = 3,
        first_run: FirstRun | _FirstRunValue = FirstRun.NOW,
    ) -> SyncPolicy:
        """
        Run now, then once a day (a local day of *timezone* if given): at the
        local time *at*, or without it at a slot cohortsync picks to spread
        load.

        The options are the class's (see :class:`SyncPolicy`); *timezone* is
        the one option that may be passed by position.
        """
        return cls(
            cadence=Cadence.DAILY,
            timezone=timezone,
            at=at,
            first_run=first_run,
            send_removals=send_removals,
            guard=guard,
            on_delete=on_delete,
            retry=retry,
            one_time_attempts=one_time_attempts,
            rejection_attempts=rejection_attempts,
        )

    @classmethod
    def weekly(
        cls,
        on: _Days,
        *,
        at: time | None = None,
        timezone: str | None = None,
        send_removals: bool = True,
        guard: MassRemovalGuard = MassRemovalGuard(),
        on_delete: OnDelete | _OnDeleteValue = OnDelete.LEAVE,
        retry: RetryPolicy = RetryPolicy(),
        one_time_attempts: int = 5,
        rejection_attempts: int = 3,
        first_run: FirstRun | _FirstRunValue = FirstRun.NOW,
    ) -> SyncPolicy:
        """
        Run now, then on the days of the week *on* (``"mon"``, a
        :class:`Weekday`, or several), at the local time *at* of *timezone*
        (UTC if ``None``), or without *at* at a time of day cohortsync picks
        to spread load.

        The options are the class's (see :class:`SyncPolicy`).
        """
        return cls(
            cadence=Cadence.WEEKLY,
            on=on,
            at=at,
            timezone=timezone,
            first_run=first_run,
            send_removals=send_removals,
            guard=guard,
            on_delete=on_delete,
            retry=retry,
            one_time_attempts=one_time_attempts,
            rejection_attempts=rejection_attempts,
        )

    @classmethod
    def every(
        cls,
        interval: timedelta,
        *,
        send_removals: bool = True,
        guard: MassRemovalGuard = MassRemovalGuard(),
        on_ineligible: OnIneligible | _OnIneligibleValue = OnIneligible.FALLBACK_HOURLY,
        on_delete: OnDelete | _OnDeleteValue = OnDelete.LEAVE,
        retry: RetryPolicy = RetryPolicy(),
        one_time_attempts: int = 5,
        rejection_attempts: int = 3,
        first_run: FirstRun | _FirstRunValue = FirstRun.NOW,
    ) -> SyncPolicy:
        """
        Run now, then every *interval* (a whole number of minutes, from 1
        minute to 7 days) at a slot inside the interval that cohortsync picks
        to spread load, on a fixed grid so runs never drift.

        The options are the class's (see :class:`SyncPolicy`); *on_ineligible*
        applies to intervals under an hour (see docs/concepts/eligibility.md).
        """
        return cls(
            cadence=Cadence.EVERY,
            interval=interval,
            first_run=first_run,
            send_removals=send_removals,
            guard=guard,
            on_ineligible=on_ineligible,
            on_delete=on_delete,
            retry=retry,
            one_time_attempts=one_time_attempts,
            rejection_attempts=rejection_attempts,
        )

    @classmethod
    def cron(
        cls,
        expression: str,
        *,
        timezone: str | None = None,
        send_removals: bool = True,
        guard: MassRemovalGuard = MassRemovalGuard(),
        on_ineligible: OnIneligible | _OnIneligibleValue = OnIneligible.FALLBACK_HOURLY,
        on_delete: OnDelete | _OnDeleteValue = OnDelete.LEAVE,
        retry: RetryPolicy = RetryPolicy(),
        one_time_attempts: int = 5,
        rejection_attempts: int = 3,
        first_run: FirstRun | _FirstRunValue = FirstRun.NOW,
    ) -> SyncPolicy:
        """
        Run now, then at the times of a standard 5-field cron *expression*
        (``"0 6 * * 1-5"``) on the wall clock of *timezone* (UTC if ``None``).

        Raises:
            CronExpressionError: The expression does not parse or never runs;
                the error names the bad field.

        The options are the class's (see :class:`SyncPolicy`); *on_ineligible*
        applies to expressions that run more than once an hour.
        """
        return cls(
            cadence=Cadence.CRON,
            expression=expression,
            timezone=timezone,
            first_run=first_run,
            send_removals=send_removals,
            guard=guard,
            on_ineligible=on_ineligible,
            on_delete=on_delete,
            retry=retry,
            one_time_attempts=one_time_attempts,
            rejection_attempts=rejection_attempts,
        )

    @classmethod
    def realtime(
        cls,
        *,
        send_removals: bool = True,
        guard: MassRemovalGuard = MassRemovalGuard(),
        on_ineligible: OnIneligible | _OnIneligibleValue = OnIneligible.FALLBACK_HOURLY,
        on_delete: OnDelete | _OnDeleteValue = OnDelete.LEAVE,
        retry: RetryPolicy = RetryPolicy(),
        one_time_attempts: int = 5,
        rejection_attempts: int = 3,
        first_run: FirstRun | _FirstRunValue = FirstRun.NOW,
    ) -> SyncPolicy:
        """
        Send the full cohort now, then check for changes every minute.

        The options are the class's (see :class:`SyncPolicy`); *on_ineligible*
        applies to real-time syncs and to intervals under an hour.
        """
        return cls(
            cadence=Cadence.REALTIME,
            first_run=first_run,
            send_removals=send_removals,
            guard=guard,
            on_ineligible=on_ineligible,
            on_delete=on_delete,
            retry=retry,
            one_time_attempts=one_time_attempts,
            rejection_attempts=rejection_attempts,
        )

    @property
    def period(self) -> timedelta | None:
        """
        The time between two slots when it is fixed: the cadence's period, or
        an :meth:`every` sync's interval; ``None`` for one-time, weekly and
        cron syncs.
        """
        if self.interval is not None:
            return self.interval
        return self.cadence.period

    def describe(self) -> str:
        """
        The schedule in a few words, for people: ``"hourly"``, ``"daily at
        06:00 America/New_York"``, ``"every 15m"``, ``"weekly mon,fri at
        09:30"``, ``"cron '0 6 * * 1-5' UTC"``.
        """
        cadence = self.cadence
        zone = f" {self.timezone}" if self.timezone else ""
        at = (
            ""
            if self.at is None
            else f" at {self.at.isoformat('minutes' if not self.at.second else 'seconds')}"
        )
        if cadence is Cadence.DAILY:
            return f"daily{at}{zone}"
        if cadence is Cadence.WEEKLY:
            days = ",".join(day.value for day in self.on)
            return f"weekly {days}{at}{zone}"
        if cadence is Cadence.EVERY and self.interval is not None:
            minutes = int(self.interval.total_seconds()) // 60
            if minutes % 1_440 == 0:
                return f"every {minutes // 1_440}d"
            if minutes % 60 == 0:
                return f"every {minutes // 60}h"
            return f"every {minutes}m"
        if cadence is Cadence.CRON:
            return f"cron {self.expression!r} {self.timezone or 'UTC'}"
        return str(cadence.value).replace("_", "-")

    @property
    def chosen_time(self) -> bool:
        """
        Whether the user chose when the sync runs (a daily or weekly ``at``, a
        cron expression): such syncs are never moved to spread load.
        """
        return self.at is not None or self.cadence is Cadence.CRON

    @property
    def sub_hourly(self) -> bool:
        """
        Whether the policy runs more than once an hour on a schedule: an
        :meth:`every` interval under an hour, or a cron expression matching
        several minutes. Eligibility treats these like real time where the
        limits are about load (docs/concepts/eligibility.md).
        """
        if self.interval is not None:
            return self.interval < timedelta(hours=1)
        if self.expression is not None:
            from cohortsync._cron import parse_cron  # noqa: PLC0415 - kept off the import path

            return parse_cron(self.expression).sub_hourly
        return False
