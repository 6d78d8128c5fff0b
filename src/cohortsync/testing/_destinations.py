"""
Destinations for tests: one that records everything, one that misbehaves on cue.
"""

from __future__ import annotations

import enum
import random
import threading
from collections.abc import Iterable, Mapping

import attrs

from cohortsync._destination import (
    Batch,
    Capabilities,
    DeliveryResult,
    Destination,
    Operation,
    Rejection,
    RunContext,
)
from cohortsync.destinations import catalog
from cohortsync.exceptions import (
    AuthenticationError,
    BadDataError,
    PermanentError,
    RateLimitedError,
    TransientError,
)

__all__ = ["Fault", "FaultKind", "FaultyDestination", "RecordedBatch", "RecordingDestination"]


@attrs.frozen(kw_only=True)
class RecordedBatch:
    """
    One call a :class:`RecordingDestination` received.
    """

    sync_id: str
    run_id: str
    operation: Operation
    sequence: int
    idempotency_key: str
    keys: tuple[str, ...] = attrs.field(repr=False)
    identifiers: tuple[str, ...] = attrs.field(repr=False)
    outcome: str = "ok"
    """``ok``, ``partial``, ``dropped`` or the name of the error raised."""


def _capabilities(value: Capabilities | str | None) -> Capabilities:
    if value is None:
        return Capabilities(name="Recording")
    if isinstance(value, str):
        return catalog.get(value)
    return value


class RecordingDestination(Destination):
    """
    Records every batch and keeps the audience it would hold, per sync.

    Args:
        capabilities: Capabilities to declare, or a catalog key such as
            ``"braze"`` to behave like that destination (batch size, real-time
            support, ...). Default: library defaults.
    """

    def __init__(self, capabilities: Capabilities | str | None = None) -> None:
        self.capabilities = _capabilities(capabilities)  # type: ignore[misc]
        self.batches: list[RecordedBatch] = []
        self._audiences: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self.opened = 0
        self.closed = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.capabilities.name!r} batches={len(self.batches)}>"

    # -- the contract -------------------------------------------------------

    def add(self, batch: Batch) -> DeliveryResult:
        return self._handle(batch)

    def remove(self, batch: Batch) -> DeliveryResult:
        return self._handle(batch)

    def open(self, context: RunContext) -> None:  # noqa: ARG002 - only counted
        self.opened += 1

    def close(self, context: RunContext, *, succeeded: bool) -> None:  # noqa: ARG002
        self.closed += 1

    def _handle(self, batch: Batch) -> DeliveryResult:
        self._apply(batch, batch.identifiers)
        self._record(batch, "ok")
        return DeliveryResult.ok()

    def _apply(self, batch: Batch, identifiers: Iterable[str]) -> None:
        with self._lock:
            audience = self._audiences.setdefault(batch.context.sync_id, set())
            if batch.operation is Operation.REMOVE:
                audience.difference_update(identifiers)
            else:
                audience.update(identifiers)

    def _record(self, batch: Batch, outcome: str) -> None:
        with self._lock:
            self.batches.append(
                RecordedBatch(
                    sync_id=batch.context.sync_id,
                    run_id=batch.context.run_id,
                    operation=batch.operation,
                    sequence=batch.sequence,
                    idempotency_key=batch.idempotency_key,
                    keys=tuple(batch.keys),
                    identifiers=tuple(batch.identifiers),
                    outcome=outcome,
                )
            )

    # -- what tests look at --------------------------------------------------

    def audience(self, sync_id: str | None = None) -> set[str]:
        """
        The identifiers the destination holds for *sync_id* (or, with one sync,
        the only audience; with none, an empty set).
        """
        with self._lock:
            if sync_id is None:
                if len(self._audiences) > 1:
                    raise ValueError(
                        f"this destination holds {len(self._audiences)} audiences; pass sync_id"
                    )
                return set(next(iter(self._audiences.values()), set()))
            return set(self._audiences.get(sync_id, set()))

    @property
    def members(self) -> set[str]:
        """
        The single audience this destination holds (see :meth:`audience`).
        """
        return self.audience()

    def calls(self, operation: Operation | None = None) -> list[RecordedBatch]:
        """
        Recorded calls, optionally of one operation.
        """
        return [b for b in self.batches if operation is None or b.operation is operation]

    def resent_keys(self) -> list[str]:
        """
        Idempotency keys received more than once (re-sent batches).
        """
        seen: dict[str, int] = {}
        for b in self.batches:
            seen[b.idempotency_key] = seen.get(b.idempotency_key, 0) + 1
        return sorted(k for k, n in seen.items() if n > 1)


class FaultKind(enum.Enum):
    """
    What a :class:`Fault` makes the destination do: one kind per error an
    adapter raises (or answer it gives), so a test names the failure it means.
    """

    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"
    RATE_LIMITED = "rate_limited"
    REJECT = "reject"
    DROP = "drop"
    AUTH = "auth"
    PERMANENT = "permanent"
    BAD_DATA = "bad_data"


@attrs.frozen(kw_only=True)
class Fault:
    """
    One scripted misbehaviour. Build with the named constructors.
    """

    kind: FaultKind
    retry_after: float | None = None
    share: float = 1.0
    """For ``REJECT`` and ``DROP``: the share of the batch affected."""
    identifiers: frozenset[str] = frozenset()
    """For ``REJECT`` and ``BAD_DATA``: exactly these identifiers (overrides ``share``)."""
    reason: str = "rejected by test"

    @classmethod
    def timeout(cls) -> Fault:
        """
        No answer: raises ``TransientError``, which the engine retries with backoff.
        """
        return cls(kind=FaultKind.TIMEOUT)

    @classmethod
    def server_error(cls, retry_after: float | None = None) -> Fault:
        """
        An HTTP 503: raises ``TransientError``, with *retry_after* seconds if
        given (the engine waits at least that long before retrying).
        """
        return cls(kind=FaultKind.SERVER_ERROR, retry_after=retry_after)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0) -> Fault:
        """
        An HTTP 429: raises ``RateLimitedError`` with *retry_after*; the engine
        waits it out without using up the retry budget.
        """
        return cls(kind=FaultKind.RATE_LIMITED, retry_after=retry_after)

    @classmethod
    def reject(
        cls,
        share: float = 1.0,
        *,
        identifiers: Iterable[str] = (),
        reason: str = "rejected by test",
    ) -> Fault:
        """
        Accept the batch but refuse some members, as ``DeliveryResult.partial``:
        they go to the ledger with *reason* and are retried by later runs.

        Args:
            share: The chance that each member is refused (drawn from the
                destination's seeded random generator).
            identifiers: Refuse exactly these identifiers instead.
            reason: The reason recorded for each refused member.
        """
        return cls(
            kind=FaultKind.REJECT, share=share, identifiers=frozenset(identifiers), reason=reason
        )

    @classmethod
    def drop(cls, share: float = 1.0) -> Fault:
        """
        Report success but keep nothing (or only part): a silent drop.
        """
        return cls(kind=FaultKind.DROP, share=share)

    @classmethod
    def auth(cls) -> Fault:
        """
        An HTTP 401: raises ``AuthenticationError``, which stops the run and
        pauses the sync until the host resumes it.
        """
        return cls(kind=FaultKind.AUTH)

    @classmethod
    def permanent(cls) -> Fault:
        """
        An HTTP 404 (the audience is gone): raises ``PermanentError``, which
        fails the run without retrying; the next slot tries again.
        """
        return cls(kind=FaultKind.PERMANENT)

    @classmethod
    def bad_data(cls, identifiers: Iterable[str]) -> Fault:
        """
        Refuse any batch containing one of *identifiers* as a whole (bisection finds them).
        """
        return cls(kind=FaultKind.BAD_DATA, identifiers=frozenset(identifiers))


class FaultyDestination(RecordingDestination):
    """
    A :class:`RecordingDestination` that misbehaves at chosen calls, or at
    random with a seed.

    Args:
        capabilities: As for :class:`RecordingDestination`.
        script: Faults by 0-based call number (every ``add``/``remove`` call
            counts, retries included).
        always: A fault applied to every call not in *script* (e.g. a
            ``Fault.bad_data(...)`` that persists).
        random_faults: Faults drawn at random: ``{fault: probability}``.
        seed: Seed for the random draws and the affected shares.
    """

    def __init__(
        self,
        capabilities: Capabilities | str | None = None,
        *,
        script: Mapping[int, Fault] | None = None,
        always: Fault | None = None,
        random_faults: Mapping[Fault, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(capabilities)
        self.script = dict(script or {})
        self.always = always
        self.random_faults = dict(random_faults or {})
        self._rng = random.Random(seed)  # noqa: S311 - test data
        self.call_count = 0
        self.faults_injected: list[tuple[int, FaultKind]] = []

    def _fault(self, call: int) -> Fault | None:
        if call in self.script:
            return self.script[call]
        for fault, probability in self.random_faults.items():
            if self._rng.random() < probability:
                return fault
        return self.always

    def _handle(self, batch: Batch) -> DeliveryResult:
        with self._lock:
            call = self.call_count
            self.call_count += 1
        fault = self._fault(call)
        if fault is None:
            return super()._handle(batch)
        self.faults_injected.append((call, fault.kind))
        ids = batch.identifiers
        kind = fault.kind
        if kind is FaultKind.TIMEOUT:
            self._record(batch, "TransientError")
            raise TransientError("timed out (injected)")
        if kind is FaultKind.SERVER_ERROR:
            self._record(batch, "TransientError")
            raise TransientError("HTTP 503 (injected)", retry_after=fault.retry_after)
        if kind is FaultKind.RATE_LIMITED:
            self._record(batch, "RateLimitedError")
            raise RateLimitedError("HTTP 429 (injected)", retry_after=fault.retry_after)
        if kind is FaultKind.AUTH:
            self._record(batch, "AuthenticationError")
            raise AuthenticationError("HTTP 401 (injected)")
        if kind is FaultKind.PERMANENT:
            self._record(batch, "PermanentError")
            raise PermanentError("HTTP 404 audience not found (injected)")
        if kind is FaultKind.BAD_DATA:
            if fault.identifiers.intersection(ids):
                self._record(batch, "BadDataError")
                raise BadDataError("HTTP 400 invalid identifier in batch (injected)")
            return super()._handle(batch)
        affected = self._pick(ids, fault)
        kept = [i for i in ids if i not in affected]
        self._apply(batch, kept)
        if kind is FaultKind.DROP:
            self._record(batch, "dropped")
            return DeliveryResult.ok()
        self._record(batch, "partial")
        return DeliveryResult.partial(Rejection(i, fault.reason) for i in ids if i in affected)

    def _pick(self, ids: list[str], fault: Fault) -> set[str]:
        if fault.identifiers:
            return set(fault.identifiers).intersection(ids)
        return {i for i in ids if self._rng.random() < fault.share}
