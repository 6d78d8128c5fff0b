"""
How often a sync runs and how it behaves: :class:`SyncPolicy`.
"""

from __future__ import annotations

import enum
from datetime import timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from cohortsync import _validators as v
from cohortsync.exceptions import ConfigurationError

__all__ = [
    "Cadence",
    "MassRemovalGuard",
    "OnDelete",
    "OnIneligible",
    "RetryPolicy",
    "SyncPolicy",
]


class Cadence(enum.Enum):
    """
    How often a sync runs.
    """

    ONE_TIME = "one_time"
    HOURLY = "hourly"
    DAILY = "daily"
    REALTIME = "realtime"

    @property
    def period(self) -> timedelta | None:
        """
        The length of one scheduling period, or ``None`` for one-time syncs.
        """
        return _PERIODS[self]


_PERIODS = {
    Cadence.ONE_TIME: None,
    Cadence.HOURLY: timedelta(hours=1),
    Cadence.DAILY: timedelta(days=1),
    Cadence.REALTIME: timedelta(minutes=1),
}


# The values of each enum as a Literal, so the string spelling of an option
# (``on_delete="remove_delivered"``) is checked by mypy like the member is.
_CadenceValue = Literal["one_time", "hourly", "daily", "realtime"]


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


_OnIneligibleValue = Literal["fallback_hourly", "pause"]
_OnDeleteValue = Literal["leave", "remove_delivered"]


def _to_on_ineligible(value: OnIneligible | _OnIneligibleValue) -> OnIneligible:
    return v.to_enum(OnIneligible, "on_ineligible")(value)


def _to_on_delete(value: OnDelete | _OnDeleteValue) -> OnDelete:
    return v.to_enum(OnDelete, "on_delete")(value)


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
        return cls(enabled=False)

    def trips(self, delivered: int, removing: int, source_empty: bool) -> bool:
        """
        Whether removing *removing* of *delivered* members must wait for confirmation.
        """
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


def _check_timezone(inst: SyncPolicy, _attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if inst.cadence is not Cadence.DAILY:
        raise ConfigurationError("timezone", value, "only daily syncs take a time zone")
    if not isinstance(value, str) or not value:
        raise ConfigurationError("timezone", value, "must be an IANA time zone name")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError("timezone", value, "unknown IANA time zone") from None


@attrs.frozen(kw_only=True)
class SyncPolicy:
    """
    A sync's cadence and behaviour. Build it with a named constructor:
    :meth:`one_time`, :meth:`hourly`, :meth:`daily` or :meth:`realtime`. Each
    takes the options below that apply to its cadence, as keywords; enum
    options also take their string values (``on_delete="remove_delivered"``).

    Args:
        cadence: How often the sync runs.
        timezone: For daily syncs, an IANA zone whose local days the sync follows
            (exactly one run per local day, across DST); ``None`` means UTC days.
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
    ) -> SyncPolicy:
        """
        Run now, then once an hour at a slot cohortsync picks to spread load.

        The options are the class's (see :class:`SyncPolicy`).
        """
        return cls(
            cadence=Cadence.HOURLY,
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
        send_removals: bool = True,
        guard: MassRemovalGuard = MassRemovalGuard(),
        on_delete: OnDelete | _OnDeleteValue = OnDelete.LEAVE,
        retry: RetryPolicy = RetryPolicy(),
        one_time_attempts: int = 5,
        rejection_attempts: int = 3,
    ) -> SyncPolicy:
        """
        Run now, then once a day (a local day of *timezone* if given) at a slot
        cohortsync picks to spread load.

        The options are the class's (see :class:`SyncPolicy`); only daily
        syncs take a *timezone*, the one option that may be passed by position.
        """
        return cls(
            cadence=Cadence.DAILY,
            timezone=timezone,
            send_removals=send_removals,
            guard=guard,
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
    ) -> SyncPolicy:
        """
        Send the full cohort now, then check for changes every minute.

        The options are the class's (see :class:`SyncPolicy`); only real-time
        syncs take *on_ineligible*.
        """
        return cls(
            cadence=Cadence.REALTIME,
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
        return self.cadence.period
