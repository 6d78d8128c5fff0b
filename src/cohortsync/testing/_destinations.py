"""
Destinations for tests: one that records everything, one that misbehaves on
cue, each in both kinds (:class:`~cohortsync.Destination` and
:class:`~cohortsync.AsyncDestination`).

The two kinds share one core, not a copy: a :class:`_Recorder` keeps what
arrived and the audiences, a :class:`_Script` decides and gives each
request's answer (the scripted fault, or acceptance). A class of either
kind only waits out its latency (blocking or awaited) and hands the batch
to the core, so a test written against one kind means the same against
the other.
"""

from __future__ import annotations

import enum
import random
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar, overload

import attrs

from cohortsync._clock import Clock, SystemClock, sleep_async
from cohortsync._destination import (
    AsyncDestination,
    Batch,
    Capabilities,
    DeliveryResult,
    Destination,
    Operation,
    Rejection,
    RunContext,
)
from cohortsync._validators import check_number
from cohortsync.destinations import catalog
from cohortsync.exceptions import (
    AuthenticationError,
    BadDataError,
    ConfigurationError,
    DeliveryError,
    PermanentError,
    RateLimitedError,
    TransientError,
)

__all__ = [
    "AsyncFaultyDestination",
    "AsyncRecordingDestination",
    "Fault",
    "FaultKind",
    "FaultyDestination",
    "RecordedBatch",
    "RecordingDestination",
]

T = TypeVar("T")


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


def _latency(value: float) -> float:
    """
    Raises:
        ConfigurationError: *value* is not a finite number of seconds >= 0.
    """
    return check_number("latency", value, minimum=0.0)


class _Recorder:
    """
    What a recording destination of either kind keeps: every batch that
    arrived, in order, and the audience each sync would hold. Locked,
    because the engine calls a destination from several threads (or, for
    an asynchronous one, from tasks that a synchronous test reads between).
    """

    def __init__(self) -> None:
        self.batches: list[RecordedBatch] = []
        self.audiences: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    def apply(self, batch: Batch, identifiers: Iterable[str]) -> None:
        with self.lock:
            audience = self.audiences.setdefault(batch.context.sync_id, set())
            if batch.operation is Operation.REMOVE:
                audience.difference_update(identifiers)
            else:
                audience.update(identifiers)

    def record(self, batch: Batch, outcome: str) -> None:
        with self.lock:
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

    def accept(self, batch: Batch) -> DeliveryResult:
        self.apply(batch, batch.identifiers)
        self.record(batch, "ok")
        return DeliveryResult.ok()

    def audience(self, sync_id: str | None) -> set[str]:
        with self.lock:
            if sync_id is None:
                if len(self.audiences) > 1:
                    raise ValueError(
                        f"this destination holds {len(self.audiences)} audiences; pass sync_id"
                    )
                return set(next(iter(self.audiences.values()), set()))
            return set(self.audiences.get(sync_id, set()))

    def calls(self, operation: Operation | None) -> list[RecordedBatch]:
        return [b for b in self.batches if operation is None or b.operation is operation]

    def resent_keys(self) -> list[str]:
        seen: dict[str, int] = {}
        for b in self.batches:
            seen[b.idempotency_key] = seen.get(b.idempotency_key, 0) + 1
        return sorted(k for k, n in seen.items() if n > 1)


class RecordingDestination(Destination):
    """
    Records every batch and keeps the audience it would hold, per sync.

    Args:
        capabilities: Capabilities to declare, or a catalog key such as
            ``"braze"`` to behave like that destination (batch size, real-time
            support, ...). Default: library defaults.
        latency: Seconds each ``add``/``remove`` takes, slept on *clock*
            before the batch is handled: a :class:`~cohortsync.testing.FakeClock`
            advances by it (and lists it in ``slept``), so a test sees time
            pass per request without waiting. Default: none.
        clock: The clock the latency is slept on. Default:
            :class:`~cohortsync.SystemClock` (a real wait).

    Raises:
        ConfigurationError: *latency* is negative, NaN or not a number.
    """

    def __init__(
        self,
        capabilities: Capabilities | str | None = None,
        *,
        latency: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        self.capabilities = _capabilities(capabilities)  # type: ignore[misc]
        self.latency = _latency(latency)
        self.clock: Clock = clock or SystemClock()
        self._recorder = _Recorder()
        self.batches: list[RecordedBatch] = self._recorder.batches
        """Every call received, oldest first (faulted ones too, with their outcome)."""
        self.opened = 0
        self.closed = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.capabilities.name!r} batches={len(self.batches)}>"

    # -- the contract -------------------------------------------------------

    def add(self, batch: Batch) -> DeliveryResult:
        self._wait()
        return self._handle(batch)

    def remove(self, batch: Batch) -> DeliveryResult:
        self._wait()
        return self._handle(batch)

    def open(self, context: RunContext) -> None:  # noqa: ARG002 - only counted
        self.opened += 1

    def close(self, context: RunContext, *, succeeded: bool) -> None:  # noqa: ARG002
        self.closed += 1

    def _wait(self) -> None:
        if self.latency:
            self.clock.sleep(self.latency)

    def _handle(self, batch: Batch) -> DeliveryResult:
        self._apply(batch, batch.identifiers)
        self._record(batch, "ok")
        return DeliveryResult.ok()

    def _apply(self, batch: Batch, identifiers: Iterable[str]) -> None:
        self._recorder.apply(batch, identifiers)

    def _record(self, batch: Batch, outcome: str) -> None:
        self._recorder.record(batch, outcome)

    # -- what tests look at --------------------------------------------------

    def audience(self, sync_id: str | None = None) -> set[str]:
        """
        The identifiers the destination holds for *sync_id* (or, with one sync,
        the only audience; with none, an empty set).
        """
        return self._recorder.audience(sync_id)

    @property
    def members(self) -> set[str]:
        """
        The single audience this destination holds (see :meth:`audience`).
        """
        return self._recorder.audience(None)

    def calls(self, operation: Operation | None = None) -> list[RecordedBatch]:
        """
        Recorded calls, optionally of one operation.
        """
        return self._recorder.calls(operation)

    def resent_keys(self) -> list[str]:
        """
        Idempotency keys received more than once (re-sent batches).
        """
        return self._recorder.resent_keys()


class AsyncRecordingDestination(AsyncDestination):
    """
    :class:`RecordingDestination` as an :class:`~cohortsync.AsyncDestination`:
    the same recording (:attr:`batches`, :meth:`audience`, :attr:`members`,
    :meth:`calls`, :meth:`resent_keys`), with ``async def`` methods, for
    testing code that runs asynchronous adapters (an
    :class:`~cohortsync.AsyncScheduler`, or a synchronous scheduler's loop
    thread).

    Args:
        capabilities: As for :class:`RecordingDestination`.
        latency: Seconds each ``add``/``remove`` takes, awaited on *clock*
            before the batch is handled (with a
            :class:`~cohortsync.testing.FakeClock`: it advances, then the
            loop runs other tasks once, so parallel requests interleave
            the same way every run). Default: none.
        clock: As for :class:`RecordingDestination`; a clock without
            ``asleep`` is slept in a worker thread.

    Raises:
        ConfigurationError: *latency* is negative, NaN or not a number.
    """

    def __init__(
        self,
        capabilities: Capabilities | str | None = None,
        *,
        latency: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        self.capabilities = _capabilities(capabilities)  # type: ignore[misc]
        self.latency = _latency(latency)
        self.clock: Clock = clock or SystemClock()
        self._recorder = _Recorder()
        self.batches: list[RecordedBatch] = self._recorder.batches
        """Every call received, oldest first (faulted ones too, with their outcome)."""
        self.opened = 0
        self.closed = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.capabilities.name!r} batches={len(self.batches)}>"

    # -- the contract -------------------------------------------------------

    async def add(self, batch: Batch) -> DeliveryResult:
        await self._wait()
        return self._handle(batch)

    async def remove(self, batch: Batch) -> DeliveryResult:
        await self._wait()
        return self._handle(batch)

    async def open(self, context: RunContext) -> None:  # noqa: ARG002 - only counted
        self.opened += 1

    async def close(self, context: RunContext, *, succeeded: bool) -> None:  # noqa: ARG002
        self.closed += 1

    async def _wait(self) -> None:
        if self.latency:
            await sleep_async(self.clock, self.latency)

    def _handle(self, batch: Batch) -> DeliveryResult:
        # Synchronous on purpose: once the latency is over, the answer is
        # given in one step, as the synchronous twin gives it.
        return self._recorder.accept(batch)

    # -- what tests look at --------------------------------------------------

    def audience(self, sync_id: str | None = None) -> set[str]:
        """
        As :meth:`RecordingDestination.audience`.
        """
        return self._recorder.audience(sync_id)

    @property
    def members(self) -> set[str]:
        """
        As :attr:`RecordingDestination.members`.
        """
        return self._recorder.audience(None)

    def calls(self, operation: Operation | None = None) -> list[RecordedBatch]:
        """
        As :meth:`RecordingDestination.calls`.
        """
        return self._recorder.calls(operation)

    def resent_keys(self) -> list[str]:
        """
        As :meth:`RecordingDestination.resent_keys`.
        """
        return self._recorder.resent_keys()


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


def _optional_seconds(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    # A host test with retry_after=-5 or NaN would test a case no server sends.
    if value is not None:
        check_number(attribute.name, value, minimum=0.0)


def _check_share(field: str, value: object) -> None:
    # A share outside 0..1 (1.5, NaN) would quietly mean "all" or "none".
    if check_number(field, value, minimum=0.0) > 1:
        raise ConfigurationError(field, value, "must be a share between 0 and 1")


def _share(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _check_share(attribute.name, value)


@attrs.frozen(kw_only=True)
class Fault:
    """
    One scripted misbehaviour. Build with the named constructors.
    """

    kind: FaultKind = attrs.field(validator=attrs.validators.instance_of(FaultKind))
    retry_after: float | None = attrs.field(default=None, validator=_optional_seconds)
    share: float = attrs.field(default=1.0, validator=_share)
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


def _checked_script(script: Mapping[int, Fault] | None) -> dict[int, Fault]:
    """*script* as a dict, refused if a call number could never come (a str, a negative)."""
    checked = dict(script or {})
    for call, fault in checked.items():
        if isinstance(call, bool) or not isinstance(call, int) or call < 0:
            raise ConfigurationError("script", call, "call numbers are ints from 0")
        if not isinstance(fault, Fault):
            raise ConfigurationError(f"script[{call}]", type(fault).__name__, "must be a Fault")
    return checked


def _checked_random_faults(faults: Mapping[Fault, float] | None) -> dict[Fault, float]:
    """*faults* as a dict, refused if a chance is not between 0 and 1."""
    checked = dict(faults or {})
    for fault, chance in checked.items():
        if not isinstance(fault, Fault):
            raise ConfigurationError("random_faults", type(fault).__name__, "keys must be Faults")
        # Each fault is drawn in turn (the first that hits plays), so the
        # chances need not add up to 1, but each is a chance.
        _check_share("random_faults", chance)
    return checked


class _FaultScript:
    """
    The faults a faulty destination of either kind plays, and the answer each
    request gets: one definition, so a script means the same thing, call by
    call, to both kinds. The call number and every random draw are taken in
    one locked step as the request is handled, so concurrent requests (threads
    or tasks) never share a number or interleave their draws.
    """

    def __init__(
        self,
        script: Mapping[int, Fault] | None,
        always: Fault | None,
        random_faults: Mapping[Fault, float] | None,
        seed: int,
    ) -> None:
        self.script = _checked_script(script)
        self.always = always
        self.random_faults = _checked_random_faults(random_faults)
        self.rng = random.Random(seed)  # noqa: S311 - test data
        self.call_count = 0
        self.faults_injected: list[tuple[int, FaultKind]] = []
        self.lock = threading.Lock()

    def _fault(self, call: int) -> Fault | None:
        if call in self.script:
            return self.script[call]
        for fault, probability in self.random_faults.items():
            if self.rng.random() < probability:
                return fault
        return self.always

    def _pick(self, ids: list[str], fault: Fault) -> set[str]:
        if fault.identifiers:
            return set(fault.identifiers).intersection(ids)
        return {i for i in ids if self.rng.random() < fault.share}

    def _draw(self, ids: list[str]) -> tuple[Fault | None, set[str]]:
        """
        The next call's fault and, for a share-based one, the members it hits.
        """
        with self.lock:
            call = self.call_count
            self.call_count += 1
            fault = self._fault(call)
            if fault is None:
                return None, set()
            self.faults_injected.append((call, fault.kind))
            if fault.kind in (FaultKind.REJECT, FaultKind.DROP):
                return fault, self._pick(ids, fault)
            return fault, set()

    def answer(self, recorder: _Recorder, batch: Batch) -> DeliveryResult:
        """
        Number the call, play its fault (or accept the batch), record it.

        Raises:
            DeliveryError: The library error the scripted fault stands for.
        """
        ids = batch.identifiers
        fault, affected = self._draw(ids)
        if fault is None:
            return recorder.accept(batch)
        error = _error(fault)
        if error is not None:
            recorder.record(batch, type(error).__name__)
            raise error
        if fault.kind is FaultKind.BAD_DATA:
            if fault.identifiers.intersection(ids):
                recorder.record(batch, "BadDataError")
                raise BadDataError("HTTP 400 invalid identifier in batch (injected)")
            return recorder.accept(batch)
        recorder.apply(batch, [i for i in ids if i not in affected])
        if fault.kind is FaultKind.DROP:
            recorder.record(batch, "dropped")
            return DeliveryResult.ok()
        recorder.record(batch, "partial")
        return DeliveryResult.partial(Rejection(i, fault.reason) for i in ids if i in affected)


def _error(fault: Fault) -> DeliveryError | None:
    """
    The error a fault raises whatever the batch holds; ``None`` for the
    faults that depend on the members (bad data) or answer (reject, drop).
    """
    kind = fault.kind
    if kind is FaultKind.TIMEOUT:
        return TransientError("timed out (injected)")
    if kind is FaultKind.SERVER_ERROR:
        return TransientError("HTTP 503 (injected)", retry_after=fault.retry_after)
    if kind is FaultKind.RATE_LIMITED:
        return RateLimitedError("HTTP 429 (injected)", retry_after=fault.retry_after)
    if kind is FaultKind.AUTH:
        return AuthenticationError("HTTP 401 (injected)")
    if kind is FaultKind.PERMANENT:
        return PermanentError("HTTP 404 audience not found (injected)")
    return None


class _OnScript(Generic[T]):
    """
    An attribute of a faulty destination that lives on its
    :class:`_FaultScript`, read (and, if *writable*, assigned) through:
    ``dest.script[dest.call_count] = Fault.auth()`` or
    ``dest.random_faults = {}`` between runs work on both kinds without a
    second copy of the script's state.
    """

    def __init__(self, doc: str, *, writable: bool = True) -> None:
        self.__doc__ = doc
        self._writable = writable
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _OnScript[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object, owner: type | None = None) -> T | _OnScript[T]:
        if instance is None:
            return self
        value: T = getattr(_script_of(instance), self._name)
        return value

    def __set__(self, instance: object, value: T) -> None:
        if not self._writable:
            raise AttributeError(f"{self._name} is counted by the destination; it is read-only")
        setattr(_script_of(instance), self._name, value)


def _script_of(destination: object) -> _FaultScript:
    script: _FaultScript = destination._faults  # type: ignore[attr-defined]  # noqa: SLF001
    return script


_SCRIPT = (
    "Faults by 0-based call number; add to it between calls, e.g. "
    "``dest.script[dest.call_count] = Fault.auth()`` for the next one."
)
_ALWAYS = "The fault of every call not in :attr:`script`, or ``None`` for none."
_RANDOM = "Faults drawn at random, ``{fault: probability}``; assign ``{}`` to stop them."
_CALLS = "Calls received so far, retries included (the number the next call gets)."
_INJECTED = "``(call number, kind)`` of every fault played, in order."


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
        latency: As for :class:`RecordingDestination` (faulted calls take
            it too).
        clock: As for :class:`RecordingDestination`.

    Raises:
        ConfigurationError: *latency* is negative, NaN or not a number.
    """

    script = _OnScript[dict[int, Fault]](_SCRIPT)
    always = _OnScript[Fault | None](_ALWAYS)
    random_faults = _OnScript[dict[Fault, float]](_RANDOM)
    call_count = _OnScript[int](_CALLS, writable=False)
    faults_injected = _OnScript[list[tuple[int, FaultKind]]](_INJECTED, writable=False)

    def __init__(
        self,
        capabilities: Capabilities | str | None = None,
        *,
        script: Mapping[int, Fault] | None = None,
        always: Fault | None = None,
        random_faults: Mapping[Fault, float] | None = None,
        seed: int = 0,
        latency: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(capabilities, latency=latency, clock=clock)
        self._faults = _FaultScript(script, always, random_faults, seed)

    def _handle(self, batch: Batch) -> DeliveryResult:
        return self._faults.answer(self._recorder, batch)


class AsyncFaultyDestination(AsyncRecordingDestination):
    """
    :class:`FaultyDestination` as an :class:`~cohortsync.AsyncDestination`:
    the same faults played from the same script (and the same seeded draws),
    so a test can run one script through both kinds and compare.

    Args:
        capabilities: As for :class:`FaultyDestination`.
        script: As for :class:`FaultyDestination`.
        always: As for :class:`FaultyDestination`.
        random_faults: As for :class:`FaultyDestination`.
        seed: As for :class:`FaultyDestination`.
        latency: As for :class:`AsyncRecordingDestination` (faulted calls
            take it too).
        clock: As for :class:`AsyncRecordingDestination`.

    Raises:
        ConfigurationError: *latency* is negative, NaN or not a number.
    """

    script = _OnScript[dict[int, Fault]](_SCRIPT)
    always = _OnScript[Fault | None](_ALWAYS)
    random_faults = _OnScript[dict[Fault, float]](_RANDOM)
    call_count = _OnScript[int](_CALLS, writable=False)
    faults_injected = _OnScript[list[tuple[int, FaultKind]]](_INJECTED, writable=False)

    def __init__(
        self,
        capabilities: Capabilities | str | None = None,
        *,
        script: Mapping[int, Fault] | None = None,
        always: Fault | None = None,
        random_faults: Mapping[Fault, float] | None = None,
        seed: int = 0,
        latency: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(capabilities, latency=latency, clock=clock)
        self._faults = _FaultScript(script, always, random_faults, seed)

    def _handle(self, batch: Batch) -> DeliveryResult:
        return self._faults.answer(self._recorder, batch)
