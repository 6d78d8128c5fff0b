"""
How batches reach a destination: idempotency keys, retries with backoff and
jitter, rate limits shared across a process, bisection of bad batches, and
bounded parallelism.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from operator import attrgetter
from typing import TYPE_CHECKING

import attrs

from cohortsync._clock import Clock, SystemClock, add_saturating
from cohortsync._destination import (
    Batch,
    DeliveryResult,
    Destination,
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
    from concurrent.futures import Future

log = logging.getLogger("cohortsync.delivery")

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

    def reserve(self) -> tuple[float, _Send]:
        """
        Reserve the next send; return how long the caller must wait before
        it, and the reservation to pass to :meth:`done` once it ended. Blocks
        (without the clock) while the send ``requests`` places back is still
        in flight: only parallel senders ever do.
        """
        with self._changed:
            while len(self._sends) == self._limit.requests and self._sends[0].end is None:
                self._changed.wait()
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


@attrs.define
class BatchSender:
    """
    Sends batches of one run to one destination.

    Transient errors are retried with exponential backoff and jitter (the
    destination's ``retry_after`` is honoured when longer); rate-limit answers
    wait without using the retry budget; a :class:`BadDataError` splits the
    batch in halves until the bad members are isolated and rejected; anything
    else ends the run.
    """

    destination: Destination
    retry: RetryPolicy
    clock: Clock
    limiter: RateLimiter | None
    keep_alive: Callable[[float], None]
    """Renew the run's lease so it outlasts the given number of seconds."""
    rng: random.Random
    before_send: Callable[[Batch, str | None], None] = lambda _batch, _replaces: None
    """Called before each batch goes out (the write-ahead record); the second
    argument is the idempotency key of the batch it replaces (a split batch's
    parent), else ``None``."""
    destination_id: str = ""
    """For log lines: the id the destination is registered under."""
    retries: int = 0
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def _attempt(self, batch: Batch) -> DeliveryResult:
        """
        One call to the adapter, with anything it raises mapped to the library's
        errors: the engine never guesses from messages.
        """
        try:
            if batch.operation is Operation.REMOVE:
                result = self.destination.remove(batch)
            else:
                result = self.destination.add(batch)
        except DeliveryError:
            raise
        except (TimeoutError, ConnectionError) as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e
        except Exception as e:
            # An adapter bug is not a reason to retry forever or to guess.
            self._log_bug(batch, e)
            raise PermanentError(
                f"{type(self.destination).__name__} raised {type(e).__name__}: {e}"
            ) from e
        if not isinstance(result, DeliveryResult):
            raise PermanentError(
                f"{type(self.destination).__name__}.{batch.operation.value}() returned "
                f"{type(result).__name__}, not DeliveryResult"
            )
        return result

    def _wait(self, seconds: float) -> None:
        """
        Sleep on the clock, first extending the lease to cover the wait: a long
        rate-limit pause must not let another worker take the run over.
        """
        if seconds > 0:
            self.keep_alive(seconds)
            self.clock.sleep(seconds)

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

    def _limited_attempt(self, batch: Batch) -> DeliveryResult:
        """One request, inside the rate limit: its window place ends when it does."""
        if self.limiter is None:
            return self._attempt(batch)
        delay, reserved = self.limiter.reserve()
        try:
            self._wait(delay)
            return self._attempt(batch)
        finally:
            self.limiter.done(reserved)

    def _call(self, batch: Batch) -> DeliveryResult:
        attempt = 0
        rate_waits = 0
        while True:
            self.keep_alive(0.0)
            try:
                return self._limited_attempt(batch)
            except RateLimitedError as e:
                rate_waits += 1
                if rate_waits > MAX_RATE_LIMIT_WAITS:
                    raise
                wait_for = self._asked(e)
                if wait_for is None:
                    wait_for = self.retry.delay(min(rate_waits - 1, 6), self.rng.random())
                if log.isEnabledFor(logging.INFO):
                    self._log(batch, "rate limited; waiting %.1fs", wait_for, wait=wait_for)
                self._wait(wait_for)
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
                self._wait(delay)

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

    def send(self, batch: Batch) -> list[Acked]:
        """
        Deliver *batch*, bisecting on :class:`BadDataError`; return every
        acknowledged (sub-)batch in order.

        Raises:
            TransientError: Retries exhausted.
            PermanentError: Not retryable; nothing of this batch is acknowledged.
            AuthenticationError: Credentials refused.
        """
        try:
            return [Acked(batch, self._call(batch))]
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
            self.before_send(left, parent)
            acked = self.send(left)
            self.before_send(right, None)
            return acked + self.send(right)

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
        finish and are applied; then the failure is raised.
        """
        if parallel <= 1:
            for batch in batches:
                self.before_send(batch, None)
                for acked in self.send(batch):
                    on_acked(acked)
            return
        # A pool only when requests run in parallel (imported here so that
        # `import cohortsync` does not load concurrent.futures).
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        error: BaseException | None = None
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cohortsync") as pool:
            in_flight: set[Future[list[Acked]]] = set()
            for batch in batches:
                while len(in_flight) >= parallel:
                    error = self._drain(in_flight, on_acked, error)
                if error is not None:
                    break
                self.before_send(batch, None)
                in_flight.add(pool.submit(self.send, batch))
            while in_flight:
                error = self._drain(in_flight, on_acked, error)
        if error is not None:
            raise error

    @staticmethod
    def _drain(
        in_flight: set[Future[list[Acked]]],
        on_acked: Callable[[Acked], None],
        error: BaseException | None,
    ) -> BaseException | None:
        from concurrent.futures import FIRST_COMPLETED, wait  # noqa: PLC0415 - see send_all

        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            in_flight.discard(future)
            exc = future.exception()
            if exc is not None:
                error = error or exc
                continue
            for acked in future.result():
                on_acked(acked)
        return error
