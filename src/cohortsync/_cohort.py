"""
Cohorts and the membership sources that say who is in them.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, Protocol, TypeGuard, runtime_checkable

import attrs

from cohortsync import _validators as v
from cohortsync.exceptions import ConfigurationError

__all__ = [
    "CallableSource",
    "ChangeFeed",
    "Changes",
    "Cohort",
    "CohortType",
    "MembershipSource",
    "StaticSource",
]


class CohortType(enum.Enum):
    """
    How a cohort is defined. Some types cannot sync in real time (see
    :func:`cohortsync.eligibility.check_eligibility`).
    """

    BEHAVIORAL = "behavioral"
    STATIC = "static"
    PREDICTIVE = "predictive"
    COMPUTED = "computed"
    FUNNEL = "funnel"
    RETENTION = "retention"
    STICKINESS = "stickiness"
    NTH_TIME_EVENT = "nth_time_event"
    EVENT_WITHIN = "event_within"
    DISTINCT_INTERVAL = "distinct_interval"

    # Hashed by identity, in C (see IdentifierKind): eligibility keys sets by it.
    __hash__ = object.__hash__


@runtime_checkable
class MembershipSource(Protocol):
    """
    What the host implements to say who is in a cohort right now.

    ``members()`` returns a full snapshot of member keys (non-empty strings).
    It may be huge: it is iterated once per run and never materialised as a
    list by cohortsync. A source that knows it yields keys in ascending order
    sets ``sorted_keys = True``, which lets the engine diff in bounded memory.
    """

    def members(self) -> Iterable[str]:
        """
        Return every member key in the cohort now.

        Called once per run and iterated once, so a generator or a database
        cursor keeps a large cohort out of memory. Raising (or returning a
        ``str``, ``bytes`` or mapping) fails the run before anything is sent.
        """
        ...


@runtime_checkable
class ChangeFeed(Protocol):
    """
    Optional incremental feed a :class:`MembershipSource` may also implement.

    Real-time syncs use it, when present, to deliver in O(changes) per minute
    instead of diffing the full snapshot.
    """

    def cursor(self) -> str:
        """
        Return an opaque position meaning "now": changes after it are not yet seen.
        """
        ...

    def changes_since(self, cursor: str) -> Changes:
        """
        Return who entered and left after *cursor*, and the new cursor.
        """
        ...


def _to_keys(field: str, value: Iterable[str]) -> tuple[str, ...]:
    # A lone string is an iterable of characters: never what a feed means.
    if isinstance(value, (str, bytes, bytearray, Mapping)):
        raise ConfigurationError(
            field, value, f"must be an iterable of member keys, not a {type(value).__name__}"
        )
    return tuple(value)


def _to_added(value: Iterable[str]) -> tuple[str, ...]:
    return _to_keys("added", value)


def _to_removed(value: Iterable[str]) -> tuple[str, ...]:
    return _to_keys("removed", value)


@attrs.frozen
class Changes:
    """
    What a :class:`ChangeFeed` reports: members who entered and left since a cursor.
    """

    added: tuple[str, ...] = attrs.field(converter=_to_added)
    removed: tuple[str, ...] = attrs.field(converter=_to_removed)
    cursor: str = attrs.field(validator=v.instance_of(str))


@attrs.frozen
class CallableSource:
    """
    Adapts a zero-argument callable returning member keys to :class:`MembershipSource`.
    """

    func: Callable[[], Iterable[str]]
    sorted_keys: bool = False

    def members(self) -> Iterable[str]:
        """
        Call the function: each run sees the cohort as it is at that run.
        """
        return self.func()


def _to_frozenset(value: Iterable[str]) -> frozenset[str]:
    if isinstance(value, (str, bytes)):
        raise ConfigurationError("keys", value, "must be an iterable of member keys, not a str")
    return frozenset(value)


@attrs.frozen
class StaticSource:
    """
    A fixed set of member keys, for static (uploaded) cohorts, examples and tests.
    """

    keys: frozenset[str] = attrs.field(converter=_to_frozenset)
    sorted_keys: bool = True

    def members(self) -> Iterable[str]:
        """
        The keys in ascending order, as ``sorted_keys`` promises, so the engine
        merge-diffs them without building a set.
        """
        return sorted(self.keys)


_CohortTypeValue = Literal[
    "behavioral",
    "static",
    "predictive",
    "computed",
    "funnel",
    "retention",
    "stickiness",
    "nth_time_event",
    "event_within",
    "distinct_interval",
]


def _to_cohort_type(value: CohortType | _CohortTypeValue) -> CohortType:
    return v.to_enum(CohortType, "type")(value)


def has_change_feed(source: object) -> TypeGuard[ChangeFeed]:
    """
    Whether *source* also implements :class:`ChangeFeed` (cheaply: runs check it).
    """
    return callable(getattr(source, "changes_since", None)) and callable(
        getattr(source, "cursor", None)
    )


def _require_sync(name: str, function: object) -> None:
    """
    Refuse an ``async def`` where a run calls and iterates: it would only fail
    mid-run (a coroutine is not iterable).
    """
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        raise ConfigurationError(
            name,
            getattr(function, "__qualname__", function),
            "is async; the scheduler reads sources synchronously: give a plain def that "
            "returns or yields member keys (an async source is not supported yet)",
        )


def _to_source(value: object) -> MembershipSource | None:
    # A structural check, not isinstance() on the runtime-checkable protocol:
    # that inspects every protocol attribute and runs on every Cohort copy.
    if value is None:
        return None
    members = getattr(value, "members", None)
    if callable(members):
        _require_sync("source.members", members)
        return value  # type: ignore[return-value]
    if callable(value):
        _require_sync("source", value)
        return CallableSource(value)
    raise ConfigurationError(
        "source", value, "must be a MembershipSource or a callable returning member keys"
    )


@attrs.frozen(kw_only=True)
class Cohort:
    """
    A named set of users whose membership cohortsync keeps in sync.

    Args:
        id: Stable identifier, used to register and look the cohort up.
        name: Human-readable name (sent to destinations that show it).
        type: How the cohort is defined (a :class:`CohortType` or its value).
        size: Known size, if the host knows it cheaply; eligibility uses it
            (real-time needs <= 1,000,000 members). ``None`` means unknown.
        source: Who is in the cohort now: a :class:`MembershipSource` or a
            callable returning member keys. Not serialised: a cohort read back
            from JSON has no source until the host registers one.
    """

    id: str = attrs.field(validator=v.identifier)
    name: str = attrs.field(validator=v.instance_of(str))
    type: CohortType = attrs.field(default=CohortType.BEHAVIORAL, converter=_to_cohort_type)
    size: int | None = attrs.field(default=None, validator=v.optional_count(0))
    source: MembershipSource | None = attrs.field(
        default=None, converter=_to_source, eq=False, repr=False
    )

    def with_size(self, size: int | None) -> Cohort:
        """
        Return a copy with a new known *size*.
        """
        if size is not None:
            v.check_count("size", size)
        # Every run measures its cohort: the rest of the cohort was validated.
        return v.evolve_trusted(self, size=size)
