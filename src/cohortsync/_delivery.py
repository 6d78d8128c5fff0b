"""
How batches reach a destination: idempotency keys, retries with backoff and
jitter, rate limits shared across a process, bisection of bad batches, and
bounded parallelism.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import random
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterator, Sequence
from datetime import datetime, timedelta
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs
from typing_extensions import Self

from cohortsync._aio import Interrupted, Outcome, Portal, RunCancelled, to_thread_to_the_end
from cohortsync._clock import Clock, SystemClock, add_saturating, is_system_clock, sleep_async
from cohortsync._destination import (
    AnyDestination,
    AsyncDestination,
    Batch,
    DeliveryResult,
    Member,
    Operation,
    RateLimit,
    Rejection,
    RunContext,
)
from cohortsync._logs import log_failure
from cohortsync._policy import RetryPolicy
from cohortsync.exceptions import (
    BadDataError,
    DeliveryError,
    PermanentError,
    RateLimitedError,
    TransientError,
)

__all__ = ["PROCESS_RATE_LIMITS", "BatchSender", "RateLimiter", "RateLimits", "idempotency_key"]

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("cohortsync.delivery")

T = TypeVar("T")

_BATCH_ABOUT = "sync %s run %s slot %s destination %s batch %d: "
"""How every log line about a batch starts (its values are record fields too)."""

_VALUE = attrgetter("identifier.value")

MAX_RATE_LIMIT_WAITS = 1_000
MAX_ASKED_WAIT = 3_600.0
"""Seconds: the longest ``retry_after`` a run waits out (unless ``max_delay`` is longer)."""
"""Rate-limit waits do not use the retry budget, but a destination that says
"too many requests" forever must not hold a run forever either."""


def idempotency_key(
    sync_id: str,
    generation: int,
    operation: Operation,
    identifiers: Sequence[str],
    basis: str = "",
) -> str:
    """
    A stable hash of sync, generation, operation, batch content and *basis*
    (the run's scheduled slot).

    The same batch re-sent after a crash carries the same key, in any
    process: the run that takes a crashed one over runs the same slot. A
    member who leaves and comes back is added again in a later slot, under a
    new key; a receiver that de-duplicates on keys would otherwise drop it.
    """
    h = hashlib.sha256()
    h.update(f"{sync_id}\x1f{generation}\x1f{operation.value}\x1f{basis}\x1f".encode())
    if identifiers:
        # One update of every value followed by \x1e: the same digest as one
        # update per value, without a Python call per member.
        h.update("\x1e".join(identifiers).encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def make_batch(
    context: RunContext,
    operation: Operation,
    members: Sequence[Member],
    sequence: int,
    basis: str = "",
) -> Batch:
    return Batch(
        context=context,
        operation=operation,
        members=tuple(members),
        sequence=sequence,
        idempotency_key=idempotency_key(
            context.sync_id,
            context.generation,
            operation,
            list(map(_VALUE, members)),
            basis,
        ),
    )


@attrs.define
class _Send:
    """One request's place in a rate window: when it may start, when it ended."""

    start: datetime
    end: datetime | None = None


class RateLimiter:
    """
    A sliding-window limit on the injected clock: at most ``requests`` calls
    in ANY window of ``per_seconds`` (what vendors enforce), including the
    first one. One per destination in a :class:`RateLimits` registry, shared by
    all its syncs.

    It remembers the last ``requests`` sends. A new one may start once the
    send ``requests`` places back has *ended* and ``per_seconds`` have passed
    since: a request arrives at the vendor after it starts and before it
    ends, so any two requests ``requests`` apart arrive more than
    ``per_seconds`` apart, whatever the network's jitter or how many threads
    send in parallel. (Counting from the start would let a window see one
    request too many when a fast one follows a slow one; a token bucket would
    let up to twice ``requests`` through in the first window.)
    """

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self._limit = limit
        self._clock = clock
        self._window = timedelta(seconds=limit.per_seconds)
        self._sends: deque[_Send] = deque(maxlen=limit.requests)
        self._changed = threading.Condition()
        self._waiters: list[Callable[[], None]] = []

    def reserve(self) -> tuple[float, _Send]:
        """
        Reserve the next send; return how long the caller must wait before
        it, and the reservation to pass to :meth:`done` once it ended. Blocks
        (without the clock) while the send ``requests`` places back is still
        in flight: only parallel senders ever do.
        """
        with self._changed:
            while self._full():
                self._changed.wait()
            return self._place()

    def reserve_or_notify(self, wake: Callable[[], None]) -> tuple[float, _Send] | None:
        """
        :meth:`reserve` for an event loop, which must not block: the
        reservation, or ``None`` if the send ``requests`` places back is still
        in flight, in which case *wake* is called (once, from whichever thread
        ends a send) when it is worth asking again.
        """
        with self._changed:
            if self._full():
                self._waiters.append(wake)
                return None
            return self._place()

    def _full(self) -> bool:
        return len(self._sends) == self._limit.requests and self._sends[0].end is None

    def _place(self) -> tuple[float, _Send]:
        """Place the next send in the window (the lock is held)."""
        now = self._clock.now()
        last = self._sends[-1] if self._sends else None
        if last is not None and now < last.start - self._window:
            self._sends.clear()  # the clock went back: forget its future
            last = None
        at = now
        if len(self._sends) == self._limit.requests:
            oldest_end = self._sends[0].end
            assert oldest_end is not None  # noqa: S101 - waited for above
            at = max(now, add_saturating(oldest_end, self._window))
        if last is not None and at < last.start:
            at = last.start  # a clock that went back: keep the order
        send = _Send(at)
        self._sends.append(send)
        return max(0.0, (at - now).total_seconds()), send

    def done(self, send: _Send) -> None:
        """The reserved send ended (answered, failed or raised)."""
        with self._changed:
            send.end = max(self._clock.now(), send.start)
            self._changed.notify_all()
            waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake()

    def acquire(self) -> float:
        """
        Wait (on the clock) until a request may be sent, for a request that
        ends at once; return the wait.
        """
        delay, send = self.reserve()
        if delay > 0:
            self._clock.sleep(delay)
        self.done(send)
        return delay


@attrs.define(eq=False, repr=False)
class RateLimits:
    """
    The rate limiters of a process's destinations, one per destination id,
    limit and clock, shared by every :class:`~cohortsync.Scheduler` given
    this object.

    A destination's :class:`~cohortsync.RateLimit` is respected across all
    the workers (threads, schedulers) of a process only if they all draw its
    limiter from one registry. By default every scheduler uses
    :data:`PROCESS_RATE_LIMITS`, so they do. Pass a registry of your own to
    keep a group of schedulers apart from the rest of the process: a test
    that must not wait on another test's sends, or a tenant whose API key
    has a limit of its own.

    Schedulers on the system clock share a limiter whatever clock object they
    hold; each fake clock has limiters of its own, so tests keep their time
    apart even in one registry. A limiter is held only as long as some
    scheduler uses it, so a long-lived registry does not grow with every
    scheduler a process ever built.
    """

    _limiters: weakref.WeakValueDictionary[tuple[str, RateLimit, object], RateLimiter] = (
        attrs.field(init=False, factory=weakref.WeakValueDictionary)
    )
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def __repr__(self) -> str:
        return f"RateLimits(limiters={len(self._limiters)})"

    def limiter(self, destination_id: str, limit: RateLimit, clock: Clock) -> RateLimiter:
        """
        The limiter every sender to *destination_id* under *limit* on *clock*
        shares; the caller keeps a reference for as long as it sends.
        """
        clock_key: object = "system" if type(clock) is SystemClock else id(clock)
        key = (destination_id, limit, clock_key)
        with self._lock:
            limiter = self._limiters.get(key)
            if limiter is None:
                limiter = RateLimiter(limit, clock)
                self._limiters[key] = limiter
            return limiter


PROCESS_RATE_LIMITS = RateLimits()
"""The registry every :class:`~cohortsync.Scheduler` uses unless given another:
one per process, so a destination's limit holds across all its schedulers."""


@attrs.define
class Acked:
    """
    A (sub-)batch the destination answered, with its result.
    """

    batch: Batch
    result: DeliveryResult


@attrs.frozen
class _Attempt:
    """Step: one request to the destination; answered with its result."""

    batch: Batch


@attrs.frozen
class _Reserve:
    """Step: a place in the rate limit's window; answered with ``(wait, reservation)``."""

    limiter: RateLimiter


@attrs.frozen
class _KeepAlive:
    """Step: renew the lease to outlast the next *seconds* (a store call)."""

    seconds: float


@attrs.frozen
class _Sleep:
    """Step: wait *seconds* on the clock."""

    seconds: float


@attrs.frozen
class _BeforeSend:
    """Step: write the ahead record of *batch*, replacing *replaces* (a store call)."""

    batch: Batch
    replaces: str | None


_Step = _Attempt | _Reserve | _KeepAlive | _Sleep | _BeforeSend
_Plan = Generator[_Step, object, T]
"""What sending a batch does, as steps a driver performs: the retry, backoff
and bisection rules are written once, as generators; a blocking driver
(:meth:`BatchSender.send`) and an awaiting one (:meth:`BatchSender.asend`)
perform the steps and send each step's answer (or throw its error) back in."""


class _Steps:
    """
    A plan being driven: each step's answer (or error) goes back in with
    the next :meth:`next`; the plan is closed when the ``with`` block ends,
    however it ends.
    """

    def __init__(self, plan: _Plan[list[Acked]]) -> None:
        self.plan = plan
        self.answer: object = None
        self.error: Exception | None = None
        self.result: list[Acked] = []

    def next(self) -> _Step | None:
        """The next step, or ``None`` once the plan returned (see :attr:`result`)."""
        answer, error = self.answer, self.error
        self.answer = self.error = None
        try:
            return self.plan.send(answer) if error is None else self.plan.throw(error)
        except StopIteration as done:
            self.result = done.value
            return None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.plan.close()


@attrs.define
class BatchSender:
    """
    Sends batches of one run to one destination.

    Transient errors are retried with exponential backoff and jitter (the
    destination's ``retry_after`` is honoured when longer); rate-limit answers
    wait without using the retry budget; a :class:`BadDataError` splits the
    batch in halves until the bad members are isolated and rejected; anything
    else ends the run.

    The rules are written once, as a plan of steps (:data:`_Plan`). A
    :class:`~cohortsync.Destination`'s batches are sent by the blocking
    driver, several at once on a pool of threads; an
    :class:`~cohortsync.AsyncDestination`'s by the awaiting driver, as
    coroutines on the *portal*'s event loop, several at once as tasks. The
    run's thread waits for either kind the same way.
    """

    destination: AnyDestination
    retry: RetryPolicy
    clock: Clock
    limiter: RateLimiter | None
    keep_alive: Callable[[float], None]
    """Renew the run's lease so it outlasts the given number of seconds."""
    rng: random.Random
    renewal_due: Callable[[float], bool] = lambda _seconds: True
    """Whether :attr:`keep_alive` would call the store (asked on the event
    loop, which then calls it in a thread only when it would)."""
    before_send: Callable[[Batch, str | None], None] = lambda _batch, _replaces: None
    """Called before each batch goes out (the write-ahead record); the second
    argument is the idempotency key of the batch it replaces (a split batch's
    parent), else ``None``."""
    destination_id: str = ""
    """For log lines: the id the destination is registered under."""
    portal: Portal | None = None
    """The event loop an asynchronous destination's requests run on; also,
    under an asynchronous scheduler, the scope whose cancellation stops the
    run before its next batch or wait."""
    retries: int = 0
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    # -- the plan: one definition of retries, waits and bisection ---------------

    def _plan_wait(self, seconds: float) -> _Plan[None]:
        """
        Wait on the clock, first extending the lease to cover the wait: a long
        rate-limit pause must not let another worker take the run over.
        """
        if seconds > 0:
            yield _KeepAlive(seconds)
            yield _Sleep(seconds)

    def _plan_limited(self, batch: Batch) -> _Plan[DeliveryResult]:
        """One request, inside the rate limit: its window place ends when it does."""
        if self.limiter is None:
            return cast("DeliveryResult", (yield _Attempt(batch)))
        delay, reserved = cast("tuple[float, _Send]", (yield _Reserve(self.limiter)))
        try:
            yield from self._plan_wait(delay)
            return cast("DeliveryResult", (yield _Attempt(batch)))
        finally:
            self.limiter.done(reserved)

    def _plan_call(self, batch: Batch) -> _Plan[DeliveryResult]:
        attempt = 0
        rate_waits = 0
        while True:
            yield _KeepAlive(0.0)
            try:
                return (yield from self._plan_limited(batch))
            except RateLimitedError as e:
                rate_waits += 1
                if rate_waits > MAX_RATE_LIMIT_WAITS:
                    raise
                wait_for = self._asked(e)
                if wait_for is None:
                    wait_for = self.retry.delay(min(rate_waits - 1, 6), self.rng.random())
                if log.isEnabledFor(logging.INFO):
                    self._log(batch, "rate limited; waiting %.1fs", wait_for, wait=wait_for)
                yield from self._plan_wait(wait_for)
            except TransientError as e:
                if attempt >= self.retry.max_retries:
                    raise
                delay = self.retry.delay(attempt, self.rng.random())
                asked = self._asked(e)
                if asked is not None:
                    delay = max(delay, asked)
                attempt += 1
                with self._lock:
                    self.retries += 1
                if log.isEnabledFor(logging.INFO):
                    self._log(
                        batch,
                        "transient error (%s); retry %d in %.1fs",
                        type(e).__name__,
                        attempt,
                        delay,
                        error_type=type(e).__name__,
                        attempt=attempt,
                        wait=delay,
                    )
                yield from self._plan_wait(delay)

    def _plan_send(self, batch: Batch) -> _Plan[list[Acked]]:
        """
        Deliver *batch*, bisecting on :class:`BadDataError`; every acknowledged
        (sub-)batch in order.
        """
        try:
            return [Acked(batch, (yield from self._plan_call(batch)))]
        except BadDataError as e:
            if len(batch.members) == 1:
                member = batch.members[0]
                rejection = Rejection(member.identifier.value, f"bad_data: {e}")
                return [Acked(batch, DeliveryResult.partial([rejection]))]
            half = len(batch.members) // 2
            ctx = batch.context
            # Halves are keyed from their parent: as stable as it is.
            parent = batch.idempotency_key
            left = make_batch(ctx, batch.operation, batch.members[:half], batch.sequence, parent)
            right = make_batch(ctx, batch.operation, batch.members[half:], batch.sequence, parent)
            # Every batch the destination sees is covered by exactly one
            # write-ahead record: the halves replace their parent's.
            yield _BeforeSend(left, parent)
            acked = yield from self._plan_send(left)
            yield _BeforeSend(right, None)
            return acked + (yield from self._plan_send(right))

    # -- the two drivers ---------------------------------------------------------

    def send(self, batch: Batch) -> list[Acked]:
        """
        Deliver *batch* from this thread, bisecting on :class:`BadDataError`;
        return every acknowledged (sub-)batch in order.

        Raises:
            TransientError: Retries exhausted.
            PermanentError: Not retryable; nothing of this batch is acknowledged.
            AuthenticationError: Credentials refused.
        """
        # Whatever ends the send (an interrupt included), the plan is closed
        # at once: its clean-up (a rate-limit place given back) runs now.
        with _Steps(self._plan_send(batch)) as steps:
            while (step := steps.next()) is not None:
                try:
                    steps.answer = self._perform(step)
                except Exception as e:  # noqa: BLE001, PERF203 - thrown into the plan, which decides
                    steps.error = e
            return steps.result

    def _perform(self, step: _Step) -> object:
        if isinstance(step, _Attempt):
            return self._attempt(step.batch)
        if isinstance(step, _Reserve):
            return step.limiter.reserve()
        if isinstance(step, _KeepAlive):
            self.keep_alive(step.seconds)
        elif isinstance(step, _Sleep):
            self._sleep(step.seconds)
        else:
            self.before_send(step.batch, step.replaces)
        return None

    def _sleep(self, seconds: float) -> None:
        """
        Block on the clock. Under a cancellable portal (an asynchronous
        scheduler driving a blocking adapter), a wait on the real clock ends
        as soon as the portal is cancelled; a fake clock's returns at once.
        """
        portal = self.portal
        if portal is None:
            self.clock.sleep(seconds)
            return
        portal.check()
        if is_system_clock(self.clock):
            portal.wait(seconds)
        else:
            self.clock.sleep(seconds)
            portal.check()

    async def asend(self, batch: Batch) -> list[Acked]:
        """
        :meth:`send` as a coroutine on the portal's loop: requests and waits
        are awaited (cancellable), store calls run in a worker thread.
        """

        # A cancelled task's plan is closed too: its clean-up (a rate-limit
        # place given back) must not wait for the garbage collector.
        with _Steps(self._plan_send(batch)) as steps:
            while (step := steps.next()) is not None:
                try:
                    if isinstance(step, _Attempt):
                        steps.answer = await self._aattempt(step.batch)
                    elif isinstance(step, _Reserve):
                        steps.answer = await _areserve(step.limiter)
                    elif isinstance(step, _Sleep):
                        await sleep_async(self.clock, step.seconds)
                    elif isinstance(step, _KeepAlive):
                        if self.renewal_due(step.seconds):
                            await to_thread_to_the_end(self.keep_alive, step.seconds)
                    else:
                        await to_thread_to_the_end(self.before_send, step.batch, step.replaces)
                except Exception as e:  # noqa: BLE001, PERF203 - thrown into the plan, which decides
                    steps.error = e
            return steps.result

    # -- one request ---------------------------------------------------------------

    def _attempt(self, batch: Batch) -> DeliveryResult:
        """
        One call to the adapter, with anything it raises mapped to the library's
        errors: the engine never guesses from messages.
        """
        destination = self.destination
        # An asynchronous adapter's requests always go through asend.
        assert not isinstance(destination, AsyncDestination)  # noqa: S101
        try:
            if batch.operation is Operation.REMOVE:
                result = destination.remove(batch)
            else:
                result = destination.add(batch)
        except Exception as e:  # mapped, never swallowed: it fails or retries the batch
            raise self._mapped(batch, e) from e
        return self._checked(batch, result)

    async def _aattempt(self, batch: Batch) -> DeliveryResult:
        """:meth:`_attempt` of an asynchronous adapter, awaited."""
        destination = self.destination
        assert isinstance(destination, AsyncDestination)  # noqa: S101 - asend's only adapters
        import asyncio  # noqa: PLC0415 - see asend

        try:
            result = await _request(destination, batch)
        except asyncio.CancelledError as e:
            if self._cancelled_here():
                raise
            # The adapter's own code raised it (some clients do on their own
            # timeouts): a failed request, not a cancelled run.
            raise TransientError(
                f"{type(destination).__name__}.{batch.operation.value}() raised "
                "CancelledError without the run being cancelled (a client's own timeout?)"
            ) from e
        except Exception as e:  # mapped, never swallowed: it fails or retries the batch
            raise self._mapped(batch, e) from e
        return self._checked(batch, result)

    def _cancelled_here(self) -> bool:
        """Whether this request's task is really being cancelled (by the run's scheduler)."""
        import asyncio  # noqa: PLC0415 - see asend

        if self.portal is not None and self.portal.cancelled:
            return True
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+
        return cancelling is not None and cancelling() > 0

    def _mapped(self, batch: Batch, error: Exception) -> Exception:
        """What an adapter's exception means to the engine."""
        if isinstance(error, DeliveryError):
            return error
        if isinstance(error, (TimeoutError, ConnectionError)):
            return TransientError(f"{type(error).__name__}: {error}")
        # An adapter bug is not a reason to retry forever or to guess.
        self._log_bug(batch, error)
        return PermanentError(
            f"{type(self.destination).__name__} raised {type(error).__name__}: {error}"
        )

    def _checked(self, batch: Batch, result: object) -> DeliveryResult:
        if not isinstance(result, DeliveryResult):
            if inspect.isawaitable(result):
                _discard(result)
                hint = (
                    " (an `async def` method: subclass cohortsync.AsyncDestination, "
                    "not cohortsync.Destination)"
                )
            else:
                hint = ""
            raise PermanentError(
                f"{type(self.destination).__name__}.{batch.operation.value}() returned "
                f"{type(result).__name__}, not DeliveryResult{hint}"
            )
        return result

    def _asked(self, error: TransientError) -> float | None:
        """
        The wait a destination asked for, if it is one to honour: ``None``
        (use the backoff) for none, zero, negative or not-a-number (a vendor
        answering "429, retry after 0" forever must not be hammered). A wait
        longer than an hour (or the retry policy's ``max_delay`` if that is
        longer), or infinite, is not slept through, holding the worker: the
        batch fails as transient, the run ends, and the sync retries later.
        """
        asked = error.retry_after
        if asked is None or not isinstance(asked, (int, float)) or not asked > 0:
            return None
        ceiling = max(self.retry.max_delay, MAX_ASKED_WAIT)
        if asked > ceiling:
            raise TransientError(
                f"{type(error).__name__}: the destination asked to wait {asked:.6g}s, longer "
                f"than the longest wait a run sits through ({ceiling:g}s: max_delay or an "
                "hour); the sync retries later"
            ) from error
        return float(asked)

    def _about(self, batch: Batch) -> tuple[tuple[object, ...], dict[str, object]]:
        """
        What leads every line about *batch* (the values of :data:`_BATCH_ABOUT`)
        and the same values as record fields.
        """
        context = batch.context
        slot = None if context.slot is None else context.slot.isoformat()
        fields: dict[str, object] = {
            "sync_id": context.sync_id,
            "run_id": context.run_id,
            "slot": slot,
            "destination_id": self.destination_id,
            "batch": batch.sequence,
            "operation": batch.operation.value,
        }
        return (context.sync_id, context.run_id, slot, self.destination_id, batch.sequence), fields

    def _log_bug(self, batch: Batch, error: Exception) -> None:
        """
        ERROR: the adapter raised something that is none of the library's
        delivery errors (a bug in it); its text and traceback at DEBUG.
        """
        if not log.isEnabledFor(logging.ERROR):
            return
        about, fields = self._about(batch)
        log_failure(
            log,
            _BATCH_ABOUT + "%s.%s() raised an exception that is not a"
            " cohortsync.exceptions.DeliveryError (a bug in the adapter?); the run fails",
            *about,
            type(self.destination).__name__,
            batch.operation.value,
            error=error,
            extra=fields,
        )

    def _log(self, batch: Batch, message: str, *args: object, **more: object) -> None:
        """
        An INFO line about *batch*, led by its sync, run, slot, destination
        and sequence, which are record fields too.
        """
        about, fields = self._about(batch)
        text = _BATCH_ABOUT + message
        log.info(text, *about, *args, extra={**fields, **more}, stacklevel=2)

    def send_all(
        self,
        batches: Iterator[Batch],
        parallel: int,
        on_acked: Callable[[Acked], None],
    ) -> None:
        """
        Send *batches* with at most *parallel* in flight, calling *on_acked* in
        this thread for each acknowledgement (so state is applied serially).

        On the first failure, no new batch starts; batches already in flight
        finish and are applied; then the failure is raised. A cancelled
        portal (:class:`RunCancelled`) counts as a failure too, and wins.
        """
        portal = self.portal
        if isinstance(self.destination, AsyncDestination):
            assert portal is not None  # noqa: S101 - the run gives async adapters a portal
            self._send_each(
                batches, parallel, on_acked, lambda b, done: portal.start(self.asend(b), done)
            )
            return
        if parallel <= 1:
            for batch in batches:
                if portal is not None:
                    portal.check()
                self.before_send(batch, None)
                for acked in self.send(batch):
                    on_acked(acked)
            return
        # A pool only when requests run in parallel (imported here so that
        # `import cohortsync` does not load concurrent.futures).
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cohortsync") as pool:
            self._send_each(
                batches,
                parallel,
                on_acked,
                lambda b, done: pool.submit(self.send, b).add_done_callback(done),
            )

    def _send_each(
        self,
        batches: Iterator[Batch],
        parallel: int,
        on_acked: Callable[[Acked], None],
        start: Callable[[Batch, Callable[[Outcome[list[Acked]]], object]], None],
    ) -> None:
        """
        Keep up to *parallel* batches in flight, each started by *start*
        (on a thread pool, or as a task on the portal's loop), which calls
        back with the request's outcome once it has ended.
        """
        # Each request, once done, queues itself: this thread takes the next
        # one off as it ends, without re-arming a wait on every future in flight.
        import queue  # noqa: PLC0415 - see send_all

        portal = self.portal
        error: BaseException | None = None
        finished: queue.SimpleQueue[Outcome[list[Acked]]] = queue.SimpleQueue()
        in_flight = 0
        try:
            for batch in batches:
                while in_flight >= max(parallel, 1):
                    error = self._settle(finished.get(), on_acked, error)
                    in_flight -= 1
                if error is not None:
                    break
                if portal is not None:
                    portal.check()
                self.before_send(batch, None)
                start(batch, finished.put)
                in_flight += 1
        except BaseException as e:  # noqa: BLE001 - what is in flight is applied, then it is raised
            error = _worse(error, e)
        while in_flight:
            error = self._settle(finished.get(), on_acked, error)
            in_flight -= 1
        if error is not None:
            raise error

    @staticmethod
    def _settle(
        future: Outcome[list[Acked]],
        on_acked: Callable[[Acked], None],
        error: BaseException | None,
    ) -> BaseException | None:
        """Apply a finished request's acknowledgements, or note how it failed."""
        if future.cancelled():
            # Only a cancelled portal cancels a request: the run stops.
            return _worse(error, RunCancelled())
        exc = future.exception()
        if isinstance(exc, Interrupted):
            return _worse(error, exc.interrupt)
        if exc is not None:
            return _worse(error, exc)
        for acked in future.result():
            on_acked(acked)
        return error


def _request(destination: AsyncDestination, batch: Batch) -> Coroutine[Any, Any, DeliveryResult]:
    """The adapter's coroutine for *batch*'s operation."""
    if batch.operation is Operation.REMOVE:
        return destination.remove(batch)
    return destination.add(batch)


def _discard(awaitable: object) -> None:
    """Close a coroutine an adapter returned by mistake (no "never awaited" warning)."""
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()


def _worse(error: BaseException | None, new: BaseException) -> BaseException:
    """
    The failure a batch loop raises: the first one, unless a later one stops
    the run for a reason that is not the batch's (a cancelled scheduler, an
    interrupt), which must not be recorded as the delivery's failure.
    """
    if error is None or (isinstance(error, Exception) and not isinstance(new, Exception)):
        return new
    return error


async def _areserve(limiter: RateLimiter) -> tuple[float, _Send]:
    """
    :meth:`RateLimiter.reserve` without blocking the event loop: while the
    window is full of sends in flight, wait to be woken by one ending (from
    this loop or any thread of the process).
    """
    import asyncio  # noqa: PLC0415 - see BatchSender.asend

    loop = asyncio.get_running_loop()
    while True:
        woken: asyncio.Future[None] = loop.create_future()

        def wake(woken: asyncio.Future[None] = woken) -> None:
            # A loop closed meanwhile has nobody left to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, woken)

        placed = limiter.reserve_or_notify(wake)
        if placed is not None:
            return placed
        await woken


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
