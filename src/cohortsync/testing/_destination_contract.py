"""
The destination contract suite: :func:`check_destination` verifies any adapter.

A host that writes a :class:`~cohortsync.Destination` or an
:class:`~cohortsync.AsyncDestination` calls
``check_destination(make_destination, ...)`` from its own tests, usually with
the adapter wired to a fake of the remote API (a fake HTTP transport, a fake
SDK client). cohortsync runs the same suite on its own adapters. The suite
imports no test framework: a failed check raises :class:`AssertionError`
naming the check and what was wrong.

The checks are written once, against one way of calling the adapter
(:meth:`_Suite.call`): a synchronous adapter's methods are called, an
asynchronous one's coroutines are run to completion on an event loop the
suite keeps in a thread of its own for the whole suite (one loop, so an
adapter may keep a client bound to it from ``open`` to ``close``). That thread
is also why the suite works when called from inside a running event loop.

What the suite can verify depends on what the host lets it see, so every
probe is optional and the returned :class:`DestinationReport` lists the
checks that were skipped and why: a contract that silently checks nothing
would be worse than none.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Generic, TypeAlias, TypeVar

import attrs

from cohortsync._aio import LoopThread
from cohortsync._delivery import make_batch
from cohortsync._destination import (
    AsyncDestination,
    Batch,
    Capabilities,
    DeliveryResult,
    Destination,
    Identifier,
    IdentifierKind,
    Member,
    Operation,
    RunContext,
    check_destination_kind,
)
from cohortsync.exceptions import ConfigurationError, DeliveryError

__all__ = ["DestinationReport", "ErrorCase", "check_destination"]

D = TypeVar("D", bound="Destination | AsyncDestination")
T = TypeVar("T")

SYNC_ID = "contract-sync"
COHORT_ID = "contract-cohort"
_COMPUTED_AT = datetime(2030, 1, 1, tzinfo=timezone.utc)
_SMALL = 6
"""Members in the batches of the error, idempotency and rejection checks."""


def _default_identifier(i: int) -> str:
    return f"contract-user-{i:07d}"


def _check_raises(_inst: object, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if not (isinstance(value, type) and issubclass(value, DeliveryError)):
        raise TypeError(
            f"ErrorCase.raises must be a cohortsync.exceptions error class (TransientError, "
            f"RateLimitedError, PermanentError, BadDataError, AuthenticationError), not {value!r}"
        )


@attrs.frozen
class ErrorCase(Generic[D]):
    """
    One way the remote can fail, and the error the adapter must raise for it.

    Args:
        raises: The :mod:`cohortsync.exceptions` class the adapter must raise
            (an instance of it, so a subclass passes).
        setup: Puts a fresh adapter (usually its fake transport or client)
            into the failure, for example "answer the next request with HTTP
            503". It is called once per adapter, before the run opens; if it
            returns an awaitable (an ``async def`` setup), that is awaited
            on the suite's event loop.

    Example::

        ErrorCase(TransientError, lambda dest: dest.client.fail_next(503))
    """

    raises: type[DeliveryError] = attrs.field(validator=_check_raises)
    setup: Callable[[D], object]


def _read_only(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class DestinationReport:
    """
    What :func:`check_destination` verified.

    Attributes:
        destination: ``repr`` of one adapter the factory built.
        passed: The checks that ran and passed, in order.
        skipped: Checks that could not run, with the missing argument that
            would enable them.
    """

    destination: str
    passed: tuple[str, ...]
    skipped: Mapping[str, str] = attrs.field(converter=_read_only, repr=lambda m: repr(dict(m)))


_Observe: TypeAlias = Callable[[D], Iterable[int] | Awaitable[Iterable[int]]]
_RemoteMembers: TypeAlias = Callable[[D, RunContext], Iterable[str] | Awaitable[Iterable[str]]]


@attrs.define
class _Suite(Generic[D]):
    make_destination: Callable[[], D]
    observe: _Observe[D] | None
    remote_members: _RemoteMembers[D] | None
    make_identifier: Callable[[int], str]
    identifier_kind: IdentifierKind
    caps: Capabilities = attrs.field(init=False)
    is_async: bool = attrs.field(init=False)
    _runs: int = 0
    _members: list[Member] = attrs.Factory(list)
    _values: set[str] = attrs.Factory(set)
    _loop: LoopThread = attrs.Factory(LoopThread)

    # -- the one way the checks call an adapter ------------------------------

    def call(self, dest: D, method: str, *args: object, **kwargs: object) -> object:
        """
        Call the adapter's *method* and give back its answer: for an
        :class:`~cohortsync.AsyncDestination`, the coroutine's result, run
        on the suite's event loop. Every check calls adapters through here,
        so each check is written once for both kinds.

        A synchronous adapter's answer is given back as it is, awaitable or
        not, because the engine would not await it either.
        """
        answer = getattr(dest, method)(*args, **kwargs)
        if self.is_async:
            return self.settle(answer)
        if inspect.iscoroutine(answer):
            answer.close()  # judged below as what it is; never awaited, never warned about
        return answer

    def settle(self, value: T | Awaitable[T]) -> T:
        """
        *value*, or if it is awaitable (an ``async def`` adapter method,
        setup or probe), what it resolves to on the suite's event loop.
        """
        if inspect.isawaitable(value):
            result: T = self._loop.portal().call(_awaited(value))
            return result
        return value

    def close(self) -> None:
        """Stop the suite's event loop (if an asynchronous call started it)."""
        self._loop.stop()

    @property
    def small(self) -> int:
        """
        Members per batch in the checks that are not about size.
        """
        return min(_SMALL, self.caps.max_batch_size)

    # -- building blocks ------------------------------------------------------

    def new(self) -> tuple[D, Capabilities]:
        dest = self.make_destination()
        if not isinstance(dest, (Destination, AsyncDestination)):
            raise AssertionError(  # noqa: TRY004 - a contract failure, not a caller's type error
                f"make_destination() returned {type(dest).__name__}, not a "
                "cohortsync.Destination or cohortsync.AsyncDestination"
            )
        try:
            check_destination_kind(dest)
        except ConfigurationError as exc:
            raise AssertionError(str(exc)) from None
        is_async = isinstance(dest, AsyncDestination)
        if getattr(self, "is_async", is_async) != is_async:
            kinds = ["cohortsync.Destination", "cohortsync.AsyncDestination"]
            before, now = kinds if is_async else kinds[::-1]
            raise AssertionError(
                f"make_destination() returned adapters of both kinds: a {before}, then a "
                f"{now} ({type(dest).__name__}); it must build the same adapter each time"
            )
        self.is_async = is_async
        caps = dest.capabilities
        if not isinstance(caps, Capabilities):
            raise AssertionError(  # noqa: TRY004 - a contract failure, not a caller's type error
                f"{type(dest).__name__}.capabilities is {type(caps).__name__}, "
                "not cohortsync.Capabilities"
            )
        if getattr(self, "caps", caps) != caps:
            raise AssertionError(
                "make_destination() returned adapters with different capabilities: "
                f"{self.caps!r} and {caps!r}"
            )
        self.caps = caps
        return dest, caps

    def members(self, start: int, count: int) -> list[Member]:
        while len(self._members) < start + count:
            i = len(self._members)
            value = self.make_identifier(i)
            if not isinstance(value, str) or not value:
                raise AssertionError(
                    f"make_identifier({i}) returned {value!r}, not a non-empty str"
                )
            if value in self._values:
                raise AssertionError(
                    f"make_identifier({i}) returned {value!r} again; it must return a "
                    "different identifier for each number"
                )
            self._values.add(value)
            self._members.append(
                Member(f"contract-member-{i}", Identifier(self.identifier_kind, value))
            )
        return self._members[start : start + count]

    def context(self, full_sync: bool) -> RunContext:
        # Each run a minute after the one before, as a real schedule would.
        self._runs += 1
        return RunContext(
            run_id=f"contract-run-{self._runs:04d}",
            sync_id=SYNC_ID,
            generation=1,
            cohort_id=COHORT_ID,
            cohort_name="Contract cohort",
            computed_at=_COMPUTED_AT + timedelta(minutes=self._runs),
            full_sync=full_sync,
        )

    def deliver(
        self, dest: D, batch: Batch, *, rejections_expected: bool = False
    ) -> DeliveryResult:
        """
        Send *batch* to a healthy remote and validate the answer.
        """
        call = "remove" if batch.operation is Operation.REMOVE else "add"
        what = f"{call}() with a {len(batch)}-member {batch.operation.value.upper()} batch"
        try:
            answer = self.call(dest, call, batch)
        except Exception as exc:
            raise AssertionError(
                f"{what} raised {type(exc).__name__} on a healthy remote: {exc}"
            ) from exc
        result = _check_result(answer, batch, what)
        if result.rejected and not rejections_expected:
            raise AssertionError(
                f"{what} rejected {len(result.rejected)} member(s) on a healthy remote "
                f"(first: {result.rejected[0].reason!r}); if your remote refuses these "
                "identifiers, pass make_identifier= returning ones it accepts"
            )
        return result

    @contextmanager
    def run(self, dest: D, caps: Capabilities, *, close: bool = True) -> Iterator[RunContext]:
        """
        One run's life cycle: ``open``, the batches, ``close(succeeded=True)``.
        With *close* false the run is abandoned, as when a worker crashes.
        """
        context = self.context(caps.full_sync_only)
        _call(lambda: self.call(dest, "open", context), "open()")
        yield context
        if close:
            _call(
                lambda: self.call(dest, "close", context, succeeded=True), "close(succeeded=True)"
            )

    def remote(self, dest: D, context: RunContext) -> Counter[str]:
        assert self.remote_members is not None  # noqa: S101 - callers check
        try:
            return Counter(self.settle(self.remote_members(dest, context)))
        except Exception as exc:
            raise AssertionError(f"remote_members() raised {type(exc).__name__}: {exc}") from exc

    def requests(self, dest: D) -> list[int]:
        assert self.observe is not None  # noqa: S101 - callers check
        try:
            sizes = list(self.settle(self.observe(dest)))
        except Exception as exc:
            raise AssertionError(f"observe() raised {type(exc).__name__}: {exc}") from exc
        for size in sizes:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise AssertionError(
                    f"observe() must return the member count of each request, got {size!r}"
                )
        return sizes

    # -- the checks -----------------------------------------------------------

    def check_empty_run(self) -> None:
        dest, caps = self.new()
        with self.run(dest, caps):
            pass

    def check_batch_size(self) -> None:
        dest, caps = self.new()
        size = caps.max_batch_size
        before = len(self.requests(dest)) if self.observe else 0
        # A full batch, then one over half full: an adapter that buffers across
        # batches, or merges them, shows up as a request above the size.
        plan = [(Operation.ADD, size), (Operation.ADD, size // 2 + 1)]
        if caps.full_sync_only:
            plan.append((Operation.EXISTING, size))
        if caps.supports_removals:
            plan.append((Operation.REMOVE, size))
        sent = 0
        start = 0
        with self.run(dest, caps) as context:
            for sequence, (operation, count) in enumerate(plan):
                if operation is Operation.REMOVE:
                    members = self.members(0, count)  # remove what the first batch added
                else:
                    members = self.members(start, count)
                    start += count
                self.deliver(dest, make_batch(context, operation, members, sequence))
                sent += count
        if self.observe is None:
            return
        sizes = self.requests(dest)[before:]
        over = [s for s in sizes if s > size]
        if over:
            raise AssertionError(
                f"capabilities.max_batch_size is {size}, but the adapter sent request(s) of "
                f"{over} members (all request sizes: {_short(sizes)}); it must never put "
                "more than max_batch_size members in one request"
            )
        if sum(sizes) != sent:
            raise AssertionError(
                f"{len(plan)} batches held {sent} members in all, but the adapter's requests "
                f"carried {sum(sizes)} (request sizes: {_short(sizes)}); every member of "
                "every batch must be sent exactly once by the time the run closes"
            )

    def check_error_case(self, name: str, case: ErrorCase[D]) -> None:
        operations = [Operation.ADD]
        if self.caps.supports_removals:
            operations.append(Operation.REMOVE)
        for operation in operations:
            dest, caps = self.new()
            call = "remove" if operation is Operation.REMOVE else "add"
            what = f"{name!r} on {call}()"
            try:
                self.settle(case.setup(dest))
            except Exception as exc:
                raise AssertionError(
                    f"{what}: the case's setup raised {type(exc).__name__}: {exc}"
                ) from exc
            context = self.context(caps.full_sync_only)
            batch = make_batch(context, operation, self.members(0, self.small), 0)
            raised: BaseException | None = None
            try:
                self.call(dest, "open", context)
                self.call(dest, call, batch)
            except Exception as exc:  # noqa: BLE001 - judging whatever the adapter raised
                raised = exc
            finally:
                # The engine only logs a failing close() of a failed run; so do we.
                with contextlib.suppress(Exception):
                    self.call(dest, "close", context, succeeded=False)
            _judge(what, case.raises, raised)

    def check_idempotency(self) -> None:
        batch_members = self.members(0, self.small)
        sent = {m.identifier.value for m in batch_members}

        def adding(times: int, *, across_runs: bool = False) -> Counter[str]:
            dest, caps = self.new()
            if across_runs:
                # The first attempt's run never closes (the worker crashed after
                # the remote applied the batch); the next run re-sends it.
                with self.run(dest, caps, close=False) as context:
                    self.deliver(dest, make_batch(context, Operation.ADD, batch_members, 0))
            with self.run(dest, caps) as context:
                batch = make_batch(context, Operation.ADD, batch_members, 0)
                for _ in range(times):
                    self.deliver(dest, batch)
            return self.remote(dest, context)

        once = adding(1)
        if set(once) != sent:
            raise AssertionError(
                f"after adding {len(sent)} members to a fresh destination, remote_members() "
                f"holds {_short(sorted(once))}; expected exactly {_short(sorted(sent))}"
            )
        twice = adding(2)
        if twice != once:
            raise AssertionError(
                "sending the same batch (same idempotency_key) twice in a run changed the "
                f"remote state: once {_counted(once)}, twice {_counted(twice)}; de-duplicate on "
                "batch.idempotency_key (or make the operation idempotent)"
            )
        again = adding(1, across_runs=True)
        if again != once:
            raise AssertionError(
                "re-sending a batch in the next run (same idempotency_key, after a run that "
                f"never closed) changed the remote state: once {_counted(once)}, "
                f"re-sent {_counted(again)}"
            )
        if self.caps.supports_removals:
            self.check_removal_idempotency(batch_members)

    def check_removal_idempotency(self, batch_members: list[Member]) -> None:
        leaving = batch_members[: max(1, len(batch_members) // 2)]
        staying = {m.identifier.value for m in batch_members[len(leaving) :]}

        def removing(times: int) -> Counter[str]:
            dest, caps = self.new()
            with self.run(dest, caps) as context:
                self.deliver(dest, make_batch(context, Operation.ADD, batch_members, 0))
            with self.run(dest, caps) as context:
                batch = make_batch(context, Operation.REMOVE, leaving, 0)
                for _ in range(times):
                    self.deliver(dest, batch)
            return self.remote(dest, context)

        once = removing(1)
        left = {m.identifier.value for m in leaving} & set(once)
        if left:
            raise AssertionError(
                f"after removing {len(leaving)} members, remote_members() still holds "
                f"{_short(sorted(left))}"
            )
        # A full-sync-only remote holds only what the last run listed, so
        # there "the rest" is not expected to stay.
        if not self.caps.full_sync_only and set(once) != staying:
            raise AssertionError(
                f"after adding {len(batch_members)} and removing {len(leaving)}, "
                f"remote_members() holds {_short(sorted(once))}; expected {_short(sorted(staying))}"
            )
        twice = removing(2)
        if twice != once:
            raise AssertionError(
                "sending the same removal batch twice changed the remote state: once "
                f"{_counted(once)}, twice {_counted(twice)}"
            )

    def check_rejections(self, reject: Callable[[D, Collection[str]], object]) -> None:
        dest, caps = self.new()
        batch_members = self.members(0, self.small)
        outsider = self.members(self.small, 1)[0].identifier.value
        # Every third member from the second on (the only one in a batch of one).
        refused = {m.identifier.value for m in batch_members[1::3] or batch_members}
        try:
            self.settle(reject(dest, sorted({*refused, outsider})))
        except Exception as exc:
            raise AssertionError(f"reject() raised {type(exc).__name__}: {exc}") from exc
        with self.run(dest, caps) as context:
            batch = make_batch(context, Operation.ADD, batch_members, 0)
            result = self.deliver(dest, batch, rejections_expected=True)
        reported = {r.identifier for r in result.rejected}
        if reported != refused:
            raise AssertionError(
                f"the remote refused {sorted(refused)} of the batch (and was told to refuse "
                f"{outsider!r}, which was not in it); the adapter reported "
                f"{sorted(reported)}: it must report exactly the batch's refused members"
            )
        if self.remote_members is not None:
            held = set(self.remote(dest, context))
            accepted = {m.identifier.value for m in batch_members} - refused
            if held != accepted:
                raise AssertionError(
                    f"after a batch with {len(refused)} refused members, remote_members() "
                    f"holds {_short(sorted(held))}; expected the accepted "
                    f"{_short(sorted(accepted))}"
                )


def _check_result(result: object, batch: Batch, what: str) -> DeliveryResult:
    """
    *result*, failing unless it is a :class:`DeliveryResult` whose rejections
    name only members of *batch*, each once, with a reason.
    """
    if not isinstance(result, DeliveryResult):
        raise AssertionError(  # noqa: TRY004 - a contract failure, not a caller's type error
            f"{what} returned {type(result).__name__}, not DeliveryResult"
        )
    sent = set(batch.identifiers)
    seen: set[str] = set()
    for rejection in result.rejected:
        if rejection.identifier not in sent:
            raise AssertionError(
                f"{what} rejected an identifier that was not in the batch "
                f"({rejection.identifier!r}); rejections must name members of the batch, or "
                "the rejected-members ledger records people who were never sent"
            )
        if rejection.identifier in seen:
            raise AssertionError(f"{what} rejected {rejection.identifier!r} more than once")
        if not isinstance(rejection.reason, str) or not rejection.reason.strip():
            raise AssertionError(
                f"{what} rejected {rejection.identifier!r} without a reason; the ledger shows it"
            )
        seen.add(rejection.identifier)
    return result


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _call(fn: Callable[[], object], what: str) -> None:
    try:
        fn()
    except Exception as exc:
        raise AssertionError(
            f"{what} raised {type(exc).__name__} on a healthy remote: {exc}"
        ) from exc


def _judge(what: str, expected: type[DeliveryError], raised: BaseException | None) -> None:
    if raised is None:
        raise AssertionError(
            f"{what}: expected {expected.__name__}, but the call returned normally; the "
            "adapter must raise when the remote fails, or the engine records a success"
        )
    if not isinstance(raised, DeliveryError):
        raise AssertionError(  # noqa: TRY004 - a contract failure, not a caller's type error
            f"{what}: expected {expected.__name__}, got a bare {type(raised).__name__}: "
            f"{raised}. Adapters must raise cohortsync.exceptions errors, so the engine knows "
            "whether to retry, wait, bisect, pause or fail"
        ) from raised
    if not isinstance(raised, expected):
        raise AssertionError(  # noqa: TRY004 - a contract failure, not a caller's type error
            f"{what}: expected {expected.__name__}, got {type(raised).__name__}: {raised}"
        ) from raised


def _short(values: Sequence[object], limit: int = 8) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _counted(counter: Counter[str]) -> str:
    repeated = {k: n for k, n in counter.items() if n > 1}
    extra = f", repeated {repeated}" if repeated else ""
    return f"{len(counter)} members ({sum(counter.values())} entries{extra})"


def check_destination(
    make_destination: Callable[[], D],
    *,
    observe: _Observe[D] | None = None,
    remote_members: _RemoteMembers[D] | None = None,
    errors: Mapping[str, ErrorCase[D]] | None = None,
    reject: Callable[[D, Collection[str]], object] | None = None,
    make_identifier: Callable[[int], str] = _default_identifier,
    identifier_kind: IdentifierKind = IdentifierKind.USER_ID,
) -> DestinationReport:
    """
    Verify that a destination adapter keeps the contract the engine relies on.

    The checks, in order:

    ``empty_run``
        ``open()`` then ``close(succeeded=True)`` with no batch in between works.
    ``batch_size``
        A batch of exactly ``capabilities.max_batch_size`` members is accepted
        (no error, no rejection), and so are the other batches of a run (a
        full add, one over half full, a full ``EXISTING`` batch for
        full-sync-only destinations, a full removal when removals are supported). With
        *observe*, no request carried more than ``max_batch_size`` members and
        the requests carried every member exactly once.
    ``error_mapping``
        For each of *errors*, on ``add()`` and ``remove()``: the adapter raises
        an instance of the expected :mod:`cohortsync.exceptions` class (from
        ``open()`` or from the call), never a bare exception and never nothing.
    ``idempotency``
        With *remote_members*: adding a batch to a fresh destination leaves
        exactly its members; sending the same batch (same idempotency key)
        twice in a run, or again in the next run after a run that never
        closed, leaves the same remote state as sending it once; removing
        twice equals removing once.
    ``rejections``
        With *reject*: when the remote refuses some members of a batch, the
        result rejects exactly those (not an identifier outside the batch the
        remote also named), and with *remote_members* the remote holds the rest.

    Every result of every call is also checked: a :class:`~cohortsync.DeliveryResult`
    whose rejections name members of the batch, once each, with a reason.

    An :class:`~cohortsync.AsyncDestination` goes through the same checks,
    which fail with the same messages. The suite runs its coroutines (and
    any probe or setup written with ``async def``: what they return is
    awaited) on an event loop of its own, in a thread, one loop for the whole
    suite. So it is called the same way from a plain test function and from
    inside a running event loop (an ``async def`` test); in the latter it
    blocks that loop until it returns, so a fake remote *served by that same
    loop* (a server started on it) could never answer: serve it from a
    thread, or call the suite from a plain test function.

    Args:
        make_destination: Returns a **new** adapter (a
            :class:`~cohortsync.Destination` or an
            :class:`~cohortsync.AsyncDestination`, the same kind each time)
            with its own, empty remote (for example wired to a new fake
            transport) each time it is called.
        observe: Returns the number of members in each request the adapter
            has sent so far, oldest first (read it from your fake transport).
            Enables the request-size half of ``batch_size``.
        remote_members: Returns the identifiers the remote holds for the run's
            audience (``context.sync_id``, ``context.cohort_id``) after the run
            closed, repeated if the remote holds one twice. Enables
            ``idempotency``.
        errors: Named failure cases, e.g. ``{"HTTP 503": ErrorCase(TransientError,
            lambda d: d.transport.fail_next(503))}``. Enables ``error_mapping``.
        reject: Makes the remote refuse the given identifiers individually on
            the next request (the list also names one identifier outside the
            batch). Enables ``rejections``.
        make_identifier: The *i*-th identifier value to send; make it a value
            your remote accepts (an email, a hash). Must differ for each *i*.
        identifier_kind: The kind of those identifiers.

    Returns:
        Which checks passed and which were skipped for want of an argument.

    Raises:
        AssertionError: A check failed; the message names it and what was wrong.
    """
    suite: _Suite[D] = _Suite(
        make_destination, observe, remote_members, make_identifier, identifier_kind
    )
    try:
        dest, _ = suite.new()
    except AssertionError as exc:
        raise AssertionError(f"capabilities: {exc}") from exc
    try:
        return _run_checks(suite, dest, errors, reject)
    finally:
        suite.close()


def _run_checks(
    suite: _Suite[D],
    dest: D,
    errors: Mapping[str, ErrorCase[D]] | None,
    reject: Callable[[D, Collection[str]], object] | None,
) -> DestinationReport:
    passed: list[str] = []
    skipped: dict[str, str] = {}

    def run(name: str, check: Callable[[], None]) -> None:
        try:
            check()
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        except Exception as exc:
            raise AssertionError(f"{name} raised {type(exc).__name__}: {exc}") from exc
        passed.append(name)

    run("empty_run", suite.check_empty_run)
    run("batch_size", suite.check_batch_size)
    if suite.observe is None:
        skipped["batch_size.requests"] = "pass observe= to check the size of each request"
    if errors:
        for name, case in errors.items():
            run(f"error_mapping[{name!r}]", functools.partial(suite.check_error_case, name, case))
    else:
        skipped["error_mapping"] = "pass errors= with an ErrorCase per failure of your remote"
    if suite.remote_members is not None:
        run("idempotency", suite.check_idempotency)
    else:
        skipped["idempotency"] = "pass remote_members= to compare the remote state"
    if reject is not None:
        run("rejections", lambda: suite.check_rejections(reject))
    else:
        skipped["rejections"] = "pass reject= to make the remote refuse members"
    return DestinationReport(destination=repr(dest), passed=tuple(passed), skipped=skipped)
