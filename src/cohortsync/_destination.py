"""
The destination side: what a destination can do (:class:`Capabilities`), what
it is sent (:class:`Batch`), what it answers (:class:`DeliveryResult`), and the
:class:`Destination` base class hosts subclass.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from itertools import repeat
from typing import ClassVar, Literal, TypeAlias

import attrs

from cohortsync import _validators as v
from cohortsync._keep import KEEP, Keep
from cohortsync.exceptions import ConfigurationError

__all__ = [
    "Batch",
    "Capabilities",
    "DeliveryResult",
    "Destination",
    "Identifier",
    "IdentifierKind",
    "Member",
    "Operation",
    "RateLimit",
    "Rejection",
    "RunContext",
]


class IdentifierKind(enum.Enum):
    """
    The kinds of user identifier a destination may accept.
    """

    USER_ID = "user_id"
    DEVICE_ID = "device_id"
    ADVERTISING_ID = "advertising_id"
    EMAIL = "email"
    EMAIL_SHA256 = "email_sha256"
    PHONE = "phone"
    PHONE_SHA256 = "phone_sha256"

    # Enum's own __hash__ is Python code (it hashes the member's name); a run
    # hashes every changed member's identifier, and so its kind, a dozen
    # times. Members are singletons compared by identity, so the identity
    # hash agrees with equality and runs in C. Never persisted (SPEC 4).
    __hash__ = object.__hash__


_IdentifierKindValue = Literal[
    "user_id",
    "device_id",
    "advertising_id",
    "email",
    "email_sha256",
    "phone",
    "phone_sha256",
]


def _kinds(
    value: Iterable[IdentifierKind | _IdentifierKindValue] | None,
) -> frozenset[IdentifierKind] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(
            "accepted_identifiers", value, "must be a collection of IdentifierKind values"
        )
    return frozenset(v.to_enum(IdentifierKind, "accepted_identifiers")(k) for k in value)


@attrs.frozen
class RateLimit:
    """
    At most *requests* calls per *per_seconds*, shared by every sync to the same
    destination in one process.
    """

    requests: int = attrs.field(validator=v.count(1))
    per_seconds: float = attrs.field(validator=v.number(0.0, inclusive=False))

    @property
    def interval(self) -> float:
        """
        Seconds between two requests at the sustained rate.
        """
        return self.per_seconds / self.requests


@attrs.frozen(kw_only=True)
class Capabilities:
    """
    What a destination can do; eligibility and delivery read it.

    Args:
        name: Display name (catalog presets set it, e.g. ``"Facebook Ads"``).
        supports_realtime: Whether real-time (every minute) syncs may target it.
        supports_removals: Whether members can be removed. If not, members
            who leave the cohort are not sent anywhere.
        full_sync_only: The destination takes the whole membership every run
            (files, some DSPs) instead of adds and removes.
        max_batch_size: Most members per request.
        max_parallel: Most requests in flight at once for one run.
        rate_limit: Request rate the destination allows, or ``None``.
        min_audience_size: Audiences smaller than this are not served by the
            destination; a warning, not a blocker.
        accepted_identifiers: Identifier kinds it accepts; ``None`` means any.
        membership_ttl: Memberships expire at the destination after this long;
            cohortsync re-sends the full audience before that.
    """

    name: str = attrs.field(default="custom", validator=v.instance_of(str))
    supports_realtime: bool = attrs.field(default=True, validator=v.instance_of(bool))
    supports_removals: bool = attrs.field(default=True, validator=v.instance_of(bool))
    full_sync_only: bool = attrs.field(default=False, validator=v.instance_of(bool))
    max_batch_size: int = attrs.field(default=1_000, validator=v.count(1))
    max_parallel: int = attrs.field(default=1, validator=v.count(1))
    rate_limit: RateLimit | None = attrs.field(
        default=None, validator=attrs.validators.optional(v.instance_of(RateLimit))
    )
    min_audience_size: int | None = attrs.field(default=None, validator=v.optional_count(0))
    accepted_identifiers: frozenset[IdentifierKind] | None = attrs.field(
        default=None, converter=_kinds
    )
    membership_ttl: timedelta | None = attrs.field(default=None, validator=v.positive_timedelta)

    def accepts(self, kind: IdentifierKind) -> bool:
        """
        Whether the destination matches on identifiers of *kind*: mappings
        resolve only accepted kinds, so nothing is hashed or looked up in vain.
        """
        return self.accepted_identifiers is None or kind in self.accepted_identifiers

    def evolve(
        self,
        *,
        name: str | Keep = KEEP,
        supports_realtime: bool | Keep = KEEP,
        supports_removals: bool | Keep = KEEP,
        full_sync_only: bool | Keep = KEEP,
        max_batch_size: int | Keep = KEEP,
        max_parallel: int | Keep = KEEP,
        rate_limit: RateLimit | Keep | None = KEEP,
        min_audience_size: int | Keep | None = KEEP,
        accepted_identifiers: Iterable[IdentifierKind | _IdentifierKindValue] | Keep | None = KEEP,
        membership_ttl: timedelta | Keep | None = KEEP,
    ) -> Capabilities:
        """
        A copy with the fields given changed, so an adapter can start from a
        catalog preset. Fields left out keep their value; the copy is validated
        like a new instance.

        Raises:
            ConfigurationError: A new value is invalid.
        """
        # Spelled out rather than **changes, so a misspelled field is a type error.
        return attrs.evolve(
            self,
            name=self.name if name is KEEP else name,
            supports_realtime=(
                self.supports_realtime if supports_realtime is KEEP else supports_realtime
            ),
            supports_removals=(
                self.supports_removals if supports_removals is KEEP else supports_removals
            ),
            full_sync_only=self.full_sync_only if full_sync_only is KEEP else full_sync_only,
            max_batch_size=self.max_batch_size if max_batch_size is KEEP else max_batch_size,
            max_parallel=self.max_parallel if max_parallel is KEEP else max_parallel,
            rate_limit=self.rate_limit if rate_limit is KEEP else rate_limit,
            min_audience_size=(
                self.min_audience_size if min_audience_size is KEEP else min_audience_size
            ),
            accepted_identifiers=(
                self.accepted_identifiers if accepted_identifiers is KEEP else accepted_identifiers
            ),
            membership_ttl=self.membership_ttl if membership_ttl is KEEP else membership_ttl,
        )


_KIND = v.to_enum(IdentifierKind, "kind")


def _to_kind(value: IdentifierKind | _IdentifierKindValue) -> IdentifierKind:
    return _KIND(value)


@attrs.frozen
class Identifier:
    """
    One identifier of a user as a destination knows it.
    """

    kind: IdentifierKind = attrs.field(converter=_to_kind)
    value: str = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.value, str) or not self.value:
            raise ConfigurationError("value", self.value, "must be a non-empty str")
        if not v.holdable(self.value):
            raise ConfigurationError(
                "value", self.value, "must not hold NUL or lone surrogates (no store can keep them)"
            )

    @classmethod
    def _trusted(cls, kind: IdentifierKind, value: str) -> Identifier:
        """
        Build without validation, for the delivery hot path where *kind* is an
        ``IdentifierKind`` and *value* a checked non-empty str (a million
        members per run make per-object validation the dominant cost).
        """
        self = object.__new__(cls)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "value", value)
        return self


@attrs.frozen
class Member:
    """
    A cohort member as sent: its member key and the identifier mapped for the destination.
    """

    key: str
    identifier: Identifier


def identity_members(kind: IdentifierKind, keys: Sequence[str]) -> list[Member]:
    """
    ``[Member(k, Identifier(kind, k)) for k in keys]`` without validation or a
    Python call per member, for the delivery hot path: *kind* is an
    ``IdentifierKind`` and every key a checked non-empty str (see
    ``Identifier._trusted``). A first sync builds one Member and one
    Identifier per member of the cohort; writing the slots directly at C
    speed costs a third of calling the constructors.
    """
    n = len(keys)
    new = object.__new__
    identifiers = identity_identifiers(kind, keys)
    members = list(map(new, repeat(Member, n)))
    deque(map(_SET_KEY, members, keys), maxlen=0)
    deque(map(_SET_IDENTIFIER, members, identifiers), maxlen=0)
    return members


def identity_identifiers(kind: IdentifierKind, keys: Sequence[str]) -> list[Identifier]:
    """
    ``[Identifier(kind, k) for k in keys]`` built as :func:`identity_members`
    builds them, for a run that asks the store about them before sending.
    """
    n = len(keys)
    identifiers = list(map(object.__new__, repeat(Identifier, n)))
    deque(map(_SET_KIND, identifiers, repeat(kind, n)), maxlen=0)
    deque(map(_SET_VALUE, identifiers, keys), maxlen=0)
    return identifiers


# The slot descriptors of the two frozen classes (attrs makes them slotted):
# setting through them is what object.__setattr__ does, one C call each.
_SET_KIND = Identifier.__dict__["kind"].__set__
_SET_VALUE = Identifier.__dict__["value"].__set__
_SET_KEY = Member.__dict__["key"].__set__
_SET_IDENTIFIER = Member.__dict__["identifier"].__set__


class Operation(enum.Enum):
    """
    What a batch asks the destination to do.

    ``EXISTING`` is only sent to full-sync-only destinations: members that were
    already in the audience and still are (S3's "existing" file).
    """

    ADD = "add"
    REMOVE = "remove"
    EXISTING = "existing"

    # Hashed by identity, in C (see IdentifierKind): the hot path keys dicts by it.
    __hash__ = object.__hash__


@attrs.frozen(kw_only=True)
class RunContext:
    """
    What a destination learns about the run its batches belong to, in
    :meth:`Destination.open` and :meth:`Destination.close`.
    """

    run_id: str
    sync_id: str
    generation: int
    cohort_id: str
    cohort_name: str
    computed_at: datetime
    full_sync: bool
    slot: datetime | None = None
    """
    The scheduled slot the run belongs to. A run that takes over a crashed
    attempt runs the same slot, so adapters that publish one export per run
    (files) can name it by slot and make it idempotent.
    """


@attrs.frozen(kw_only=True)
class Batch:
    """
    Members sent to a destination in one request.

    The ``idempotency_key`` is a stable hash of sync, generation, operation and
    content: a batch re-sent after a crash carries the same key, so a destination
    that de-duplicates on it applies it once.
    """

    context: RunContext
    operation: Operation
    members: tuple[Member, ...]
    sequence: int
    idempotency_key: str

    @property
    def identifiers(self) -> list[str]:
        """
        The identifier values, in batch order: usually all a destination API needs.
        """
        return [m.identifier.value for m in self.members]

    @property
    def keys(self) -> list[str]:
        """
        The host's member keys, in batch order: for adapters that look members
        up in the host's own data rather than send the mapped identifiers.
        """
        return [m.key for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        # Never list member keys or identifiers: they are personal data.
        return (
            f"Batch(sync_id={self.context.sync_id!r}, operation={self.operation.value!r}, "
            f"sequence={self.sequence}, size={len(self.members)}, "
            f"idempotency_key={self.idempotency_key[:12]!r})"
        )


@attrs.frozen
class Rejection:
    """
    One member the destination refused, and why.

    Args:
        identifier: The identifier value as sent in the batch.
        reason: The destination's reason, recorded in the ledger.
    """

    identifier: str = attrs.field(repr=False)
    reason: str = attrs.field(converter=v.to_storable)


def _to_rejections(value: Iterable[Rejection]) -> tuple[Rejection, ...]:
    return tuple(value)


@attrs.frozen
class DeliveryResult:
    """
    A destination's answer to one batch: everything was accepted except ``rejected``.
    """

    rejected: tuple[Rejection, ...] = attrs.field(default=(), converter=_to_rejections)

    @classmethod
    def ok(cls) -> DeliveryResult:
        """
        The whole batch was applied: what an adapter returns when the remote
        accepted the request (one shared value, since nothing varies).
        """
        return _OK

    @classmethod
    def partial(cls, rejected: Iterable[Rejection]) -> DeliveryResult:
        """
        The batch was applied except for *rejected*, which go to the ledger
        and are retried by later runs; an empty iterable means ``ok()``, so an
        adapter can always return this with whatever the remote refused.

        Args:
            rejected: The refused members, by the identifier value sent, each
                once, with the remote's reason.
        """
        return cls(tuple(rejected))


_OK = DeliveryResult()


class Destination(ABC):
    """
    Base class for destination adapters: the only code a host writes per destination.

    Implement :meth:`add` and :meth:`remove`; declare what the destination can do
    in ``capabilities`` (start from a catalog preset with
    ``cohortsync.destinations.catalog.FACEBOOK_ADS.evolve(...)``). Signal failures with the
    errors in :mod:`cohortsync.exceptions` (``TransientError``,
    ``RateLimitedError``, ``PermanentError``, ``BadDataError``,
    ``AuthenticationError``); report refused members in the result.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()

    @abstractmethod
    def add(self, batch: Batch) -> DeliveryResult:
        """
        Add the batch's members to the remote audience (or, for ``Operation.EXISTING``
        on full-sync-only destinations, confirm they are still in it).
        """

    @abstractmethod
    def remove(self, batch: Batch) -> DeliveryResult:
        """
        Remove the batch's members from the remote audience.
        """

    def open(self, context: RunContext) -> None:  # noqa: B027 - optional hook
        """
        Called before a run sends its first batch: create the remote audience if needed.
        """

    def close(self, context: RunContext, *, succeeded: bool) -> None:  # noqa: B027
        """
        Called after a run's last batch (also when the run failed).
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.capabilities.name!r}>"


class AsyncDestination(ABC):
    """
    Base class for destination adapters written with ``async def``: the twin
    of :class:`Destination` for hosts whose vendor clients are asynchronous
    (``httpx.AsyncClient``, aiohttp).

    Everything else is the same: the same ``capabilities``, the same
    :class:`Batch` in and :class:`DeliveryResult` out, the same errors from
    :mod:`cohortsync.exceptions`, and the engine around it is the same one
    (idempotency keys, the write-ahead record before each batch, retries
    with backoff and ``retry_after``, bisection, rate limits shared with
    synchronous adapters of the same destination id). Under an
    :class:`~cohortsync.AsyncScheduler` its requests run on the host's event
    loop, up to ``capabilities.max_parallel`` of one run at once; a plain
    :class:`~cohortsync.Scheduler` runs them on an event loop of its own in
    one background thread, started when the first such request is made and
    stopped by :meth:`Scheduler.close <cohortsync.Scheduler.close>`.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()

    @abstractmethod
    async def add(self, batch: Batch) -> DeliveryResult:
        """
        Add the batch's members to the remote audience (or, for ``Operation.EXISTING``
        on full-sync-only destinations, confirm they are still in it).
        """

    @abstractmethod
    async def remove(self, batch: Batch) -> DeliveryResult:
        """
        Remove the batch's members from the remote audience.
        """

    async def open(self, context: RunContext) -> None:  # noqa: B027 - optional hook
        """
        Called before a run sends its first batch: create the remote audience if needed.
        """

    async def close(self, context: RunContext, *, succeeded: bool) -> None:  # noqa: B027
        """
        Called after a run's last batch (also when the run failed).
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.capabilities.name!r}>"


AnyDestination: TypeAlias = "Destination | AsyncDestination"
"""A destination adapter of either kind."""


def check_destination_kind(destination: object) -> None:
    """
    Refuse what is not an adapter, and adapters of one kind written like the
    other: a :class:`Destination` with ``async def`` methods would hand the
    engine coroutines instead of results, an :class:`AsyncDestination` with
    plain ones would block the event loop.

    Raises:
        ConfigurationError: With what to change.
    """
    import inspect  # noqa: PLC0415 - registration only

    if isinstance(destination, AsyncDestination):
        for name in ("add", "remove", "open", "close"):
            if not inspect.iscoroutinefunction(getattr(destination, name, None)):
                raise ConfigurationError(
                    "destination",
                    type(destination).__name__,
                    f"is a cohortsync.AsyncDestination, so `{name}` must be `async def` "
                    "(a plain method would block the event loop); or subclass "
                    "cohortsync.Destination for a synchronous adapter",
                )
        return
    if not isinstance(destination, Destination):
        raise ConfigurationError(
            "destination",
            destination,
            "must be an instance of a cohortsync.Destination or cohortsync.AsyncDestination "
            "subclass",
        )
    for name in ("add", "remove", "open", "close"):
        if inspect.iscoroutinefunction(getattr(destination, name, None)):
            raise ConfigurationError(
                "destination",
                type(destination).__name__,
                f"defines `async def {name}` on a cohortsync.Destination, which the engine "
                "calls synchronously (it would get a coroutine, not a result); subclass "
                "cohortsync.AsyncDestination for an adapter written with async def",
            )
