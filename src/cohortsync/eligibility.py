"""
Whether a cohort may sync to a destination under a policy.

Every rule runs every time and every reason is returned at once, each with a
stable machine-readable ``code``, a message for people and the numbers
involved: a UI can show all problems in one go and a program can branch on
codes without parsing text.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import attrs

from cohortsync._cache import Bounded
from cohortsync._cohort import Cohort, CohortType
from cohortsync._destination import AsyncDestination, Capabilities, Destination, IdentifierKind
from cohortsync._policy import Cadence, OnDelete, SyncPolicy
from cohortsync._validators import to_enum

_to_kind = to_enum(IdentifierKind, "identifier_kinds")

__all__ = [
    "DEFAULT_RULES",
    "REALTIME_MAX_MEMBERS",
    "REALTIME_UNSUPPORTED_TYPES",
    "Eligibility",
    "EligibilityInput",
    "Reason",
    "ReasonCode",
    "Rule",
    "Ruleset",
    "Severity",
    "available_destinations",
    "check_eligibility",
    "identifier_compatibility",
    "min_audience",
    "realtime_cohort_type",
    "realtime_destination",
    "realtime_size",
    "removal_on_delete",
    "sub_hourly_cohort_type",
    "sub_hourly_size",
]

REALTIME_MAX_MEMBERS = 1_000_000
"""Real-time syncs diff the full snapshot every minute: beyond this they cannot keep up."""

REALTIME_UNSUPPORTED_TYPES = frozenset(
    {
        CohortType.FUNNEL,
        CohortType.RETENTION,
        CohortType.STICKINESS,
        CohortType.NTH_TIME_EVENT,
        CohortType.EVENT_WITHIN,
        CohortType.DISTINCT_INTERVAL,
    }
)
"""Cohort types whose membership cannot be recomputed every minute."""


class Severity(enum.Enum):
    """
    How much a reason weighs: a ``blocking`` one prevents creating the sync
    (and at run time pauses it or falls back to hourly); a ``warning`` lets it
    run and is recorded as a note on each run, so the host can show it.
    """

    BLOCKING = "blocking"
    WARNING = "warning"


class ReasonCode:
    """
    The stable codes of the default rules.
    """

    REALTIME_SIZE_LIMIT = "realtime_size_limit"
    REALTIME_COHORT_TYPE = "realtime_cohort_type"
    REALTIME_DESTINATION = "realtime_destination"
    BELOW_MIN_AUDIENCE = "below_min_audience"
    IDENTIFIER_INCOMPATIBLE = "identifier_incompatible"
    REMOVALS_UNSUPPORTED = "removals_unsupported"
    SUB_HOURLY_SIZE_LIMIT = "sub_hourly_size_limit"
    SUB_HOURLY_COHORT_TYPE = "sub_hourly_cohort_type"


def _freeze(value: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(value))


@attrs.frozen
class Reason:
    """
    One finding of an eligibility check.

    Args:
        code: Stable machine-readable code (see :class:`ReasonCode`).
        message: Explanation for people.
        severity: Blocking reasons prevent the sync; warnings are recorded.
        details: The numbers and names involved (e.g. ``size`` and ``limit``).
    """

    code: str
    message: str
    severity: Severity = Severity.BLOCKING
    details: Mapping[str, object] = attrs.field(factory=dict, converter=_freeze)

    @property
    def blocking(self) -> bool:
        """
        Whether this reason prevents the sync, rather than only warning.
        """
        return self.severity is Severity.BLOCKING


def _to_reasons(value: Iterable[Reason]) -> tuple[Reason, ...]:
    return tuple(value)


@attrs.frozen
class Eligibility:
    """
    All reasons found by :func:`check_eligibility`.
    """

    reasons: tuple[Reason, ...] = attrs.field(converter=_to_reasons)

    @property
    def eligible(self) -> bool:
        """
        No blocking reason was found (warnings may remain).
        """
        return not any(r.blocking for r in self.reasons)

    @property
    def blocking(self) -> tuple[Reason, ...]:
        """
        The reasons that prevent the sync: what a UI must show before it lets
        the user save.
        """
        return tuple(r for r in self.reasons if r.blocking)

    @property
    def warnings(self) -> tuple[Reason, ...]:
        """
        The reasons that let the sync run but are worth telling the user (a
        cohort below the destination's minimum audience).
        """
        return tuple(r for r in self.reasons if not r.blocking)

    @property
    def codes(self) -> frozenset[str]:
        """
        Every reason's code, blocking or not: stable strings to branch on,
        where messages may change.
        """
        return frozenset(r.code for r in self.reasons)


@attrs.frozen(kw_only=True)
class EligibilityInput:
    """
    What a rule sees.

    Args:
        cohort: The cohort (``size`` may be ``None`` when unknown).
        capabilities: The destination's capabilities.
        policy: The sync's policy.
        cadence: The cadence being checked (the policy's, unless a fallback
            is being considered).
        identifier_kinds: Kinds the sync's identifier mapping can produce, or
            ``None`` to skip the compatibility check.
    """

    cohort: Cohort
    capabilities: Capabilities
    policy: SyncPolicy
    cadence: Cadence
    identifier_kinds: frozenset[IdentifierKind] | None


Rule = Callable[[EligibilityInput], Iterable[Reason]]
"""A rule returns the reasons it finds (none when it has nothing to say)."""


def realtime_size(i: EligibilityInput) -> Iterable[Reason]:
    """
    A real-time sync's cohort has at most :data:`REALTIME_MAX_MEMBERS`
    members: without a change feed it is diffed whole every minute. An
    unknown size is not checked here; each run re-checks with the size it
    measured.
    """
    size = i.cohort.size
    if i.cadence is Cadence.REALTIME and size is not None and size > REALTIME_MAX_MEMBERS:
        yield Reason(
            ReasonCode.REALTIME_SIZE_LIMIT,
            f"real-time sync supports cohorts of at most {REALTIME_MAX_MEMBERS:,} members; "
            f"this one has {size:,}",
            details={"size": size, "limit": REALTIME_MAX_MEMBERS},
        )


def realtime_cohort_type(i: EligibilityInput) -> Iterable[Reason]:
    """
    A real-time sync's cohort is not of a type in
    :data:`REALTIME_UNSUPPORTED_TYPES`: their membership cannot be recomputed
    every minute.
    """
    if i.cadence is Cadence.REALTIME and i.cohort.type in REALTIME_UNSUPPORTED_TYPES:
        yield Reason(
            ReasonCode.REALTIME_COHORT_TYPE,
            f"real-time sync is not available for {i.cohort.type.value} cohorts",
            details={"cohort_type": i.cohort.type.value},
        )


def realtime_destination(i: EligibilityInput) -> Iterable[Reason]:
    """
    A real-time sync goes to a destination that declares
    ``supports_realtime``: the others take no stream of changes every minute.
    """
    if i.cadence is Cadence.REALTIME and not i.capabilities.supports_realtime:
        yield Reason(
            ReasonCode.REALTIME_DESTINATION,
            f"{i.capabilities.name} does not support real-time sync",
            details={"destination": i.capabilities.name},
        )


def _sub_hourly(i: EligibilityInput) -> bool:
    """
    A scheduled sync that runs more than once an hour (an interval under an
    hour, a cron expression matching several minutes), checked at its own
    cadence: the real-time fallback check asks about hourly runs instead.
    """
    return i.cadence is i.policy.cadence and i.policy.sub_hourly


def _every(policy: SyncPolicy) -> str:
    if policy.interval is not None:
        return f"every {int(policy.interval.total_seconds()) // 60} minutes"
    return f"on cron {policy.expression!r}"


def sub_hourly_size(i: EligibilityInput) -> Iterable[Reason]:
    """
    The real-time size limit, for scheduled syncs that run more than once an
    hour: the limit is about the load of diffing the whole snapshot every
    minute, and a run every few minutes is that load within a small factor.
    """
    size = i.cohort.size
    if size is not None and size > REALTIME_MAX_MEMBERS and _sub_hourly(i):
        yield Reason(
            ReasonCode.SUB_HOURLY_SIZE_LIMIT,
            f"a sync {_every(i.policy)} (more than once an hour) supports cohorts of at most "
            f"{REALTIME_MAX_MEMBERS:,} members, like real time; this one has {size:,}",
            details={"size": size, "limit": REALTIME_MAX_MEMBERS},
        )


def sub_hourly_cohort_type(i: EligibilityInput) -> Iterable[Reason]:
    """
    The real-time cohort types rule, for scheduled syncs that run more than
    once an hour: those cohorts are costly to recompute, which is load too.
    """
    if i.cohort.type in REALTIME_UNSUPPORTED_TYPES and _sub_hourly(i):
        yield Reason(
            ReasonCode.SUB_HOURLY_COHORT_TYPE,
            f"{i.cohort.type.value} cohorts cannot be recomputed more than once an hour "
            f"(a sync {_every(i.policy)}), as for real time",
            details={"cohort_type": i.cohort.type.value},
        )


def min_audience(i: EligibilityInput) -> Iterable[Reason]:
    """
    A warning when the cohort is below the destination's
    ``min_audience_size``: the sync may run, but the destination will not
    serve the audience until it grows, which the user should know.
    """
    floor = i.capabilities.min_audience_size
    size = i.cohort.size
    if floor is not None and size is not None and size < floor:
        yield Reason(
            ReasonCode.BELOW_MIN_AUDIENCE,
            f"{i.capabilities.name} needs at least {floor:,} members to serve an audience; "
            f"this cohort has {size:,}",
            Severity.WARNING,
            details={"size": size, "minimum": floor},
        )


def identifier_compatibility(i: EligibilityInput) -> Iterable[Reason]:
    """
    The sync's identifier mapping produces at least one kind the destination
    accepts: otherwise every member would be skipped as unresolved. Unknown
    kinds on either side are not checked.
    """
    accepted = i.capabilities.accepted_identifiers
    produced = i.identifier_kinds
    if accepted is None or produced is None or produced & accepted:
        return
    yield Reason(
        ReasonCode.IDENTIFIER_INCOMPATIBLE,
        f"{i.capabilities.name} accepts {', '.join(sorted(k.value for k in accepted))}; "
        f"the identifier mapping produces {', '.join(sorted(k.value for k in produced))}",
        details={
            "accepted": sorted(k.value for k in accepted),
            "produced": sorted(k.value for k in produced),
        },
    )


def removal_on_delete(i: EligibilityInput) -> Iterable[Reason]:
    """
    A policy that removes what it delivered on deletion goes to a destination
    that can remove members: otherwise the promise could not be kept, and
    refusing it up front beats a teardown that fails.
    """
    if i.policy.on_delete is OnDelete.REMOVE_DELIVERED and not i.capabilities.supports_removals:
        yield Reason(
            ReasonCode.REMOVALS_UNSUPPORTED,
            f"{i.capabilities.name} cannot remove members, so deleting the sync could not "
            "remove what it delivered (on_delete='remove_delivered'); use on_delete='leave'",
            details={"destination": i.capabilities.name, "on_delete": i.policy.on_delete.value},
        )


@attrs.frozen
class Ruleset:
    """
    An ordered, named set of rules. Extend or override the defaults::

        rules = DEFAULT_RULES.with_rule("no_weekend_realtime", my_rule)
        rules = DEFAULT_RULES.without("realtime_size")
    """

    rules: Mapping[str, Rule] = attrs.field(converter=_freeze)

    def with_rule(self, name: str, rule: Rule) -> Ruleset:
        """
        Return a ruleset with *rule* added, or replacing the rule of that *name*.
        """
        return Ruleset({**self.rules, name: rule})

    def without(self, name: str) -> Ruleset:
        """
        Return a ruleset without the rule called *name*.

        Raises:
            KeyError: No rule of that name.
        """
        if name not in self.rules:
            raise KeyError(f"no rule named {name!r}; rules: {', '.join(self.rules)}")
        return Ruleset({k: r for k, r in self.rules.items() if k != name})

    def check(self, i: EligibilityInput) -> Eligibility:
        """
        Run every rule, in order, and gather every reason: a UI shows all the
        problems at once instead of one per attempt.
        """
        return Eligibility(tuple(reason for rule in self.rules.values() for reason in rule(i)))


DEFAULT_RULES = Ruleset(
    {
        "realtime_size": realtime_size,
        "realtime_cohort_type": realtime_cohort_type,
        "realtime_destination": realtime_destination,
        "sub_hourly_size": sub_hourly_size,
        "sub_hourly_cohort_type": sub_hourly_cohort_type,
        "min_audience": min_audience,
        "identifier_compatibility": identifier_compatibility,
        "removal_on_delete": removal_on_delete,
    }
)
"""The rules from the product description."""


def _capabilities(destination: Destination | AsyncDestination | Capabilities) -> Capabilities:
    return destination if isinstance(destination, Capabilities) else destination.capabilities


def check_eligibility(
    cohort: Cohort,
    destination: Destination | AsyncDestination | Capabilities,
    policy: SyncPolicy,
    *,
    identifier_kinds: Iterable[IdentifierKind] | None = None,
    rules: Ruleset = DEFAULT_RULES,
    cadence: Cadence | None = None,
) -> Eligibility:
    """
    Check whether *cohort* may sync to *destination* under *policy*.

    Args:
        cohort: The cohort; its known ``size`` is used by size rules.
        destination: A destination adapter or its capabilities.
        policy: The intended policy.
        identifier_kinds: Kinds the sync's identifier mapping produces; ``None``
            skips the identifier-compatibility rule.
        rules: The ruleset (default: :data:`DEFAULT_RULES`).
        cadence: Check this cadence instead of the policy's (used when a
            real-time sync considers falling back to hourly).

    Returns:
        Every reason found; ``.eligible`` is true when none is blocking.
    """
    return _check_measured(
        cohort,
        cohort.size,
        destination,
        policy,
        identifier_kinds=identifier_kinds,
        rules=rules,
        cadence=cadence,
    )


def _check_measured(
    cohort: Cohort,
    size: int | None,
    destination: Destination | AsyncDestination | Capabilities,
    policy: SyncPolicy,
    *,
    identifier_kinds: Iterable[IdentifierKind] | None = None,
    rules: Ruleset = DEFAULT_RULES,
    cadence: Cadence | None = None,
) -> Eligibility:
    """
    :func:`check_eligibility` of *cohort* with its size taken as *size* (the
    size a run just measured): a check answered from the cache needs no
    copy of the cohort with that size.
    """
    # A frozenset (a mapping's own kinds: every run passes them) keys the
    # cache as it is; its kinds are converted, and checked, when the rules run.
    given: frozenset[object] | None = None
    if identifier_kinds is not None:
        given = (
            identifier_kinds
            if type(identifier_kinds) is frozenset
            else frozenset(_to_kind(k) for k in identifier_kinds)
        )
    caps = _capabilities(destination)
    cadence = cadence or policy.cadence

    def ask() -> Eligibility:
        return rules.check(
            EligibilityInput(
                cohort=cohort if size == cohort.size else cohort.with_size(size),
                capabilities=caps,
                policy=policy,
                cadence=cadence,
                identifier_kinds=None if given is None else frozenset(_to_kind(k) for k in given),
            )
        )

    if rules is not DEFAULT_RULES:
        # A host rule may read anything (the time of day, a feature flag):
        # only the built-in rules, pure functions of their input, are cached.
        return ask()
    # The built-in rules read the cohort's size and type, the cadence, the
    # identifier kinds, the capabilities and the policy. The last two are
    # keyed by identity (hashing them costs more than checking): the entry
    # keeps them alive, so their ids cannot be reused while it exists.
    # Enum members are singletons: their ids hash faster than they do.
    key = (id(caps), id(policy), size, id(cohort.type), id(cadence), given)
    hit = _CHECKED.get(key)
    if hit is not None and hit[0] is caps and hit[1] is policy:
        return hit[2]
    result = ask()
    _CHECKED.remember(key, (caps, policy, result))
    return result


_CHECKED_MAX = 4_096
_CHECKED: Bounded[tuple[object, ...], tuple[Capabilities, SyncPolicy, Eligibility]] = Bounded(
    _CHECKED_MAX
)
"""Answers of the built-in rules by their whole input (values: the
capabilities, the policy and the answer): every run re-checks eligibility,
and a steady sync asks the same question each time."""


def available_destinations(
    cohort: Cohort,
    policy: SyncPolicy,
    *,
    catalog: Mapping[str, Capabilities] | None = None,
    identifier_kinds: Iterable[IdentifierKind] | None = None,
    rules: Ruleset = DEFAULT_RULES,
) -> list[str]:
    """
    The catalog keys of destinations *cohort* may sync to under *policy*
    (the cadence you choose changes which destinations are available).
    """
    if catalog is None:
        from cohortsync.destinations.catalog import PRESETS  # noqa: PLC0415 - the catalog imports us

        catalog = PRESETS
    return [
        key
        for key, caps in catalog.items()
        if check_eligibility(
            cohort, caps, policy, identifier_kinds=identifier_kinds, rules=rules
        ).eligible
    ]
