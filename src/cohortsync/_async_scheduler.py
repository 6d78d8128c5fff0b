"""
The asynchronous scheduler: the same engine, driven from an event loop.

:class:`AsyncScheduler` is a second driver over the engine the synchronous
:class:`~cohortsync.Scheduler` drives, not a copy of it: it owns a
``Scheduler`` (same store, same registrations, same decisions) and adds what
an event loop needs:

- runs of several syncs at once, each in a worker thread of its own (a run's
  store calls and its source read block; they never block the loop), at most
  ``max_concurrent_runs`` at a time, still one run per sync (the store's
  leases see to that across every worker);
- the requests of :class:`~cohortsync.AsyncDestination` adapters as
  coroutines on the host's loop, up to the destination's ``max_parallel`` of
  one run in flight at once, with waits (backoff, rate limits) awaited on the
  clock;
- cancellation (shutdown, :func:`asyncio.timeout`) that stops every run at
  its next step, cancels what is in flight (it is re-sent under the same
  keys), gives each lease back at once and records nothing as failed;
- ``await``-able versions of the store-reading methods, run in a thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import attrs
from typing_extensions import Self

from cohortsync._aio import Portal, RunCancelled, finish, to_thread_to_the_end
from cohortsync._clock import Clock, is_system_clock, sleep_async
from cohortsync._cohort import Cohort
from cohortsync._delivery import PROCESS_RATE_LIMITS, RateLimits
from cohortsync._destination import AnyDestination, AsyncDestination, Destination
from cohortsync._events import Event, Listener
from cohortsync._policy import SyncPolicy
from cohortsync._run import RunEnvironment
from cohortsync._scheduler import (
    Scheduler,
    _Batch,
    _SlotAllocation,
    check_stop,
    poll_delay,
)
from cohortsync._sync import SyncRun
from cohortsync._trim import PROCESS_TRIM
from cohortsync._validators import check_bool, check_count, check_number
from cohortsync.eligibility import DEFAULT_RULES, Eligibility, Ruleset
from cohortsync.exceptions import ConfigurationError, StorageClosedError
from cohortsync.identifiers import IdentifierMapping
from cohortsync.storage import Storage

__all__ = ["AsyncScheduler"]

P = ParamSpec("P")
T = TypeVar("T")
D = TypeVar("D", bound="Destination | AsyncDestination")


def _in_thread(
    method: Callable[Concatenate[Scheduler, P], T], *, wakes: bool = False
) -> Callable[Concatenate[AsyncScheduler, P], Coroutine[Any, Any, T]]:
    """
    The awaitable twin of a :class:`Scheduler` method: the same call, in a
    worker thread, so its store round trips never block the event loop.
    With *wakes*, a :meth:`AsyncScheduler.run_forever` of the same scheduler
    waiting between rounds goes round at once (the call may have made a run
    due now).
    """

    @functools.wraps(method)
    async def call(self: AsyncScheduler, /, *args: P.args, **kwargs: P.kwargs) -> T:
        result = await self._store_call(functools.partial(method, self.scheduler, *args, **kwargs))
        if wakes and self._wake is not None:
            self._wake.set()
        return result

    note = (
        " A :meth:`run_forever` of this scheduler waiting between rounds goes round at "
        "once, so a run due now starts now."
        if wakes
        else ""
    )
    call.__doc__ = (
        f"Awaitable :meth:`Scheduler.{method.__name__} <cohortsync.Scheduler."
        f"{method.__name__}>`: the same arguments, result and errors; it runs in a "
        f"worker thread, so the store call never blocks the event loop.{note}"
    )
    return call


@attrs.define
class _Round:
    """One :meth:`AsyncScheduler.run_due` call, shared by its lanes."""

    limit: int | None
    started: int = 0
    stop: bool = False
    halt: Callable[[], bool] | None = None
    """run_forever's "stopping?": asked by the lanes' threads before each
    claim, so a run that sets the host's stop event is the last one started."""
    runs: list[SyncRun] = attrs.Factory(list)
    seen: set[str] = attrs.Factory(set)
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def take(self) -> bool:
        """Whether a lane may claim one more sync."""
        with self.lock:
            if self.stop or (self.limit is not None and self.started >= self.limit):
                return False
            if self.halt is not None and self.halt():
                return False
            self.started += 1
            return True

    def give_back(self) -> None:
        """A lane found nothing to claim: its place is free again."""
        with self.lock:
            self.started -= 1


class AsyncScheduler:
    """
    The :class:`~cohortsync.Scheduler` for asyncio hosts (FastAPI, Starlette,
    aiohttp): ``await scheduler.run_due()``, ``await scheduler.run_forever()``,
    ``async with``. Destinations may be :class:`~cohortsync.AsyncDestination`
    adapters (their requests run on the host's loop) or plain
    :class:`~cohortsync.Destination` ones (their requests run in the run's
    worker thread), mixed freely.

    It drives the same engine over the same store as the synchronous
    scheduler, which it owns as :attr:`scheduler`: synchronous and
    asynchronous workers may share one store, and either takes over a run the
    other left (a crash, a cancellation). Stores stay synchronous: their calls
    run in worker threads.

    Args:
        storage: As for :class:`~cohortsync.Scheduler`.
        max_concurrent_runs: Most syncs this worker runs at once (each run
            keeps up to its destination's ``max_parallel`` requests in
            flight). One run per sync at a time always holds.
        clock: As for :class:`~cohortsync.Scheduler`; a clock with an
            ``asleep`` coroutine (:class:`~cohortsync.SystemClock`,
            :class:`~cohortsync.testing.FakeClock`) is awaited, any other is
            slept in a thread.
        owner: As for :class:`~cohortsync.Scheduler`.
        lease_for: As for :class:`~cohortsync.Scheduler`.
        rules: As for :class:`~cohortsync.Scheduler`.
        retention: As for :class:`~cohortsync.Scheduler`.
        slot_allocation: As for :class:`~cohortsync.Scheduler`.
        listeners: As for :class:`~cohortsync.Scheduler`. Listeners are
            plain callables, called from the run's worker thread: keep them
            quick, or hand the event to the loop with
            ``loop.call_soon_threadsafe``.
        seed: As for :class:`~cohortsync.Scheduler`.
        state_cache_keys: As for :class:`~cohortsync.Scheduler`.
        pause_after_failures: As for :class:`~cohortsync.Scheduler`.
        rate_limits: As for :class:`~cohortsync.Scheduler`: by default shared
            with every scheduler of the process, synchronous or not.
        trim_memory: After a run, hand the memory the process has freed back
            to the system (glibc's ``malloc_trim``, at most once a second per
            process; nothing elsewhere). Runs in threads of their own leave
            freed memory in each thread's allocator arena, resident; this
            keeps a worker's memory at what its runs hold. ``False`` leaves
            the allocator alone.
    """

    def __init__(
        self,
        storage: Storage | str | os.PathLike[str] | None = None,
        *,
        max_concurrent_runs: int = 10,
        clock: Clock | None = None,
        owner: str | None = None,
        lease_for: timedelta = timedelta(minutes=5),
        rules: Ruleset = DEFAULT_RULES,
        retention: timedelta = timedelta(days=14),
        slot_allocation: _SlotAllocation = "balanced",
        listeners: Iterable[Listener] = (),
        seed: int | None = None,
        state_cache_keys: int = 5_000_000,
        pause_after_failures: int = 5,
        rate_limits: RateLimits = PROCESS_RATE_LIMITS,
        trim_memory: bool = True,
    ) -> None:
        check_count("max_concurrent_runs", max_concurrent_runs, minimum=1)
        check_bool("trim_memory", trim_memory)
        if max_concurrent_runs > _MAX_CONCURRENT_RUNS:
            raise ConfigurationError(
                "max_concurrent_runs",
                max_concurrent_runs,
                f"must be at most {_MAX_CONCURRENT_RUNS:,} (each run in progress holds a thread)",
            )
        self.max_concurrent_runs = max_concurrent_runs
        self.scheduler = Scheduler(
            storage,
            clock=clock,
            owner=owner,
            lease_for=lease_for,
            rules=rules,
            retention=retention,
            slot_allocation=slot_allocation,
            listeners=listeners,
            seed=seed,
            state_cache_keys=state_cache_keys,
            pause_after_failures=pause_after_failures,
            rate_limits=rate_limits,
        )
        """The synchronous scheduler this one drives: same store, same registrations."""
        self._lanes: ThreadPoolExecutor | None = None
        self._io: ThreadPoolExecutor | None = None
        """Threads of the awaitable store calls: :meth:`aclose` waits for them."""
        self._closed = False
        self._wake: asyncio.Event | None = None
        """Set by calls that may make a run due now, while run_forever waits."""
        self._busy = 0
        """Lanes still running (run_forever starts rounds only within the rest)."""
        self._trim: Callable[[], object] | None = PROCESS_TRIM if trim_memory else None
        """Called by a lane after each run (see :mod:`cohortsync._trim`)."""

    def __repr__(self) -> str:
        inner = self.scheduler
        return (
            f"AsyncScheduler(storage={inner.storage!r}, clock={inner.clock!r}, "
            f"owner={inner.owner!r}, max_concurrent_runs={self.max_concurrent_runs})"
        )

    # -- registration (no I/O: plain methods) ------------------------------------

    @property
    def storage(self) -> Storage:
        """The store (shared with :attr:`scheduler`)."""
        return self.scheduler.storage

    @property
    def clock(self) -> Clock:
        """The clock (shared with :attr:`scheduler`)."""
        return self.scheduler.clock

    @property
    def owner(self) -> str:
        """This worker's name on leases."""
        return self.scheduler.owner

    def add_cohort(self, cohort: Cohort, *, replace: bool = False) -> Cohort:
        """As :meth:`Scheduler.add_cohort <cohortsync.Scheduler.add_cohort>`."""
        return self.scheduler.add_cohort(cohort, replace=replace)

    def add_destination(self, destination_id: str, destination: D, *, replace: bool = False) -> D:
        """
        As :meth:`Scheduler.add_destination <cohortsync.Scheduler.add_destination>`:
        a :class:`~cohortsync.Destination` or an
        :class:`~cohortsync.AsyncDestination`.
        """
        return self.scheduler.add_destination(destination_id, destination, replace=replace)

    def add_mapping(
        self, mapping_id: str, mapping: IdentifierMapping, *, replace: bool = False
    ) -> IdentifierMapping:
        """As :meth:`Scheduler.add_mapping <cohortsync.Scheduler.add_mapping>`."""
        return self.scheduler.add_mapping(mapping_id, mapping, replace=replace)

    def add_listener(
        self, listener: Listener, *, events: Iterable[type[Event]] | None = None
    ) -> None:
        """
        As :meth:`Scheduler.add_listener <cohortsync.Scheduler.add_listener>`;
        listeners are called from the run's worker thread.
        """
        if events is None:
            self.scheduler.add_listener(listener)
        else:
            self.scheduler.add_listener(listener, events=events)

    def cohort(self, cohort_id: str) -> Cohort:
        """As :meth:`Scheduler.cohort <cohortsync.Scheduler.cohort>`."""
        return self.scheduler.cohort(cohort_id)

    def destination(self, destination_id: str) -> AnyDestination:
        """As :meth:`Scheduler.destination <cohortsync.Scheduler.destination>`."""
        return self.scheduler.destination(destination_id)

    def mapping(self, mapping_id: str | None) -> IdentifierMapping:
        """As :meth:`Scheduler.mapping <cohortsync.Scheduler.mapping>`."""
        return self.scheduler.mapping(mapping_id)

    def check(
        self,
        cohort_id: str,
        destination_id: str,
        policy: SyncPolicy,
        *,
        mapping_id: str | None = None,
    ) -> Eligibility:
        """As :meth:`Scheduler.check <cohortsync.Scheduler.check>` (no store call)."""
        return self.scheduler.check(cohort_id, destination_id, policy, mapping_id=mapping_id)

    # -- definitions and queries (store calls, in a thread) ----------------------

    create_sync = _in_thread(Scheduler.create_sync, wakes=True)
    create_syncs = _in_thread(Scheduler.create_syncs, wakes=True)
    apply_syncs = _in_thread(Scheduler.apply_syncs, wakes=True)
    get_sync = _in_thread(Scheduler.get_sync)
    syncs = _in_thread(Scheduler.syncs)
    update_sync = _in_thread(Scheduler.update_sync, wakes=True)
    pause_sync = _in_thread(Scheduler.pause_sync)
    resume_sync = _in_thread(Scheduler.resume_sync, wakes=True)
    sync_now = _in_thread(Scheduler.sync_now, wakes=True)
    request_full_resync = _in_thread(Scheduler.request_full_resync, wakes=True)
    confirm_removals = _in_thread(Scheduler.confirm_removals, wakes=True)
    delete_sync = _in_thread(Scheduler.delete_sync, wakes=True)
    next_run = _in_thread(Scheduler.next_run)
    upcoming = _in_thread(Scheduler.upcoming)
    preview = _in_thread(Scheduler.preview)
    history = _in_thread(Scheduler.history)
    ledger = _in_thread(Scheduler.ledger)
    export_history = _in_thread(Scheduler.export_history)
    recommend = _in_thread(Scheduler.recommend)

    # -- running -----------------------------------------------------------------

    async def run_due(self, *, limit: int | None = None) -> list[SyncRun]:
        """
        Claim and run every sync due now, up to ``max_concurrent_runs`` at
        once; return the runs (:class:`~cohortsync.SyncRun`), in the order
        they finished.

        The guarantees are :meth:`Scheduler.run_due
        <cohortsync.Scheduler.run_due>`'s: each due slot runs exactly once
        across every worker on the store, a sync runs at most once per call,
        and a sync that cannot be run never stops the others.

        Cancelling the call (a shutdown, :func:`asyncio.timeout`) stops each
        run at its next step: requests in flight are cancelled, the runs'
        leases are given back at once (their slots run again, re-sending
        what was in flight under the same idempotency keys), nothing is
        recorded as failed, and the call returns (raising
        :class:`asyncio.CancelledError`) only once every run has stopped, so
        no worker thread outlives it. A run reading a large source stops when
        the read is done.

        Args:
            limit: Run at most this many.
        """
        if limit is not None:
            check_count("limit", limit)
        width = self.max_concurrent_runs if limit is None else min(limit, self.max_concurrent_runs)
        return await self._round(limit, width)

    async def _round(
        self, limit: int | None, width: int, halt: Callable[[], bool] | None = None
    ) -> list[SyncRun]:
        """
        A :meth:`run_due` round of *width* lanes (none: nothing to do); once
        *halt* says so, the lanes finish their runs and claim no more.
        """
        if width <= 0:
            return []
        inner = self.scheduler
        portal = Portal(asyncio.get_running_loop())
        env = attrs.evolve(inner._environment(), portal=lambda: portal, scope=portal)  # noqa: SLF001
        state = _Round(limit, halt=halt)
        await self._store_call(self._housekeeping)
        # Taken after the await, with no await before the submits: an
        # aclose() meanwhile has shut the pool down, and a submit to it raised
        # a bare RuntimeError (an outsider's race, 13 of 40 tries).
        lanes = self._lane_pool()
        waiting = [asyncio.wrap_future(lanes.submit(self._lane, env, state)) for _ in range(width)]
        # Each lane is busy until its thread ends (not until the round does):
        # run_forever gives the lanes that found nothing to the next round.
        self._busy += width
        for lane in waiting:
            lane.add_done_callback(self._lane_ended)
        try:
            # asyncio.wait, not gather: a cancellation must not drop the lanes
            # (they are threads; they stop at their next step, not now).
            await asyncio.wait(waiting)
        except BaseException:
            state.stop = True
            portal.cancel()
            await finish(asyncio.wait(waiting))
            await finish(portal.drain())
            raise
        for lane in waiting:
            error = lane.exception()
            if error is not None:
                raise error
        return list(state.runs)

    async def _store_call(self, call: Callable[[], T]) -> T:
        """
        Run a store call in one of this scheduler's threads. A cancelled
        caller returns at once, but the call runs to its end, and
        :meth:`aclose` waits for it before closing the store.
        """
        if self._closed:
            raise StorageClosedError(repr(self.scheduler.storage))
        if self._io is None:
            self._io = ThreadPoolExecutor(
                max_workers=_STORE_THREADS, thread_name_prefix="cohortsync-store"
            )
        context = contextvars.copy_context()
        return await asyncio.wrap_future(self._io.submit(context.run, call))

    def _lane_ended(self, _lane: asyncio.Future[None]) -> None:
        self._busy -= 1

    def _housekeeping(self) -> None:
        inner = self.scheduler
        inner._purge_if_due()  # noqa: SLF001 - the driver shares its scheduler's steps
        inner._rebase_if_clock_went_back()  # noqa: SLF001

    def _lane_pool(self) -> ThreadPoolExecutor:
        if self._closed:
            raise StorageClosedError(repr(self.scheduler.storage))
        if self._lanes is None:
            self._lanes = ThreadPoolExecutor(
                max_workers=self.max_concurrent_runs, thread_name_prefix="cohortsync-run"
            )
        return self._lanes

    def _lane(self, env: RunEnvironment, state: _Round) -> None:
        """
        One worker thread of a round: claim one due sync, run it, store its
        record; again, until nothing is due (or a sync came due again).
        """
        inner = self.scheduler
        while state.take():
            claims = inner._claim_runs(inner._now(), 1)  # noqa: SLF001
            if not claims:
                state.give_back()
                return
            try:
                repeat = _Batch(inner, env, claims, state.seen, state.runs).run()
            except RunCancelled:
                return
            if self._trim is not None:
                self._trim()
            if repeat:
                state.give_back()
                return

    async def run_forever(self, stop: asyncio.Event | None = None, *, idle: float = 30.0) -> None:
        """
        Run due syncs until *stop* is set (the runs in progress then finish,
        and no other sync is started) or the task is cancelled (the usual
        way to end it: cancel the task in your app's shutdown). Between
        rounds it waits on the clock until the next due run, the expiry of
        another worker's lease, or *idle* seconds, as
        :meth:`Scheduler.run_forever <cohortsync.Scheduler.run_forever>` does;
        and an awaited call of this scheduler that may make a run due now
        (:meth:`create_sync`, :meth:`sync_now`, :meth:`resume_sync`, ...)
        wakes it at once, so a sync created from a request handler has its
        first run straight away.
        """
        idle = check_number("idle", idle, minimum=0.0, inclusive=False)
        check_stop(stop, awaitable=True)
        stop = stop or asyncio.Event()
        inner = self.scheduler
        self._wake = woken = asyncio.Event()
        rounds: set[asyncio.Task[list[SyncRun]]] = set()
        # Set as run_forever ends, however it ends: no lane claims again.
        ending = threading.Event()

        def halted() -> bool:
            return stop.is_set() or ending.is_set()

        real_time = is_system_clock(inner.clock)
        start = True
        try:
            while not stop.is_set():
                woken.clear()
                # A new round takes the lanes the rounds still running leave
                # free: one slow run never holds up a sync that falls due (or
                # is created) meanwhile, and max_concurrent_runs still holds.
                free = self.max_concurrent_runs - self._busy
                if start and free > 0:
                    rounds.add(asyncio.ensure_future(self._round(None, free, halted)))
                due = await self._store_call(inner.storage.next_due)
                delay = poll_delay(due, inner._now(), idle)  # noqa: SLF001
                why = await _until_next_round(
                    rounds, woken, stop, inner.clock, delay, real_time=real_time
                )
                for ended in [r for r in rounds if r.done()]:
                    rounds.discard(ended)
                    ended.result()  # a store failure ends run_forever, as it does run_due
                # A round ending frees lanes but makes nothing due: the next
                # one starts when something may be (a wake-up, the due time,
                # the idle poll), as the synchronous run_forever goes round.
                start = why != "ended" or (due is not None and due <= inner._now())  # noqa: SLF001
        except asyncio.CancelledError:
            for running in rounds:
                running.cancel()
            raise
        finally:
            if self._wake is woken:
                self._wake = None
            # Cancelled: the rounds stop at their next step. Stopped, or ended
            # by an error of its own (the store failed a poll): the runs in
            # progress are not cut short; they finish and record what they
            # can, and no lane claims another sync.
            ending.set()
            if rounds:
                await finish(asyncio.wait(rounds))

    # -- closing -----------------------------------------------------------------

    async def aclose(self) -> None:
        """
        Close the store (as :meth:`Scheduler.close <cohortsync.Scheduler.close>`)
        and stop this scheduler's worker threads. Safe to repeat.
        """
        self._closed = True
        pools = [pool for pool in (self._lanes, self._io) if pool is not None]
        self._lanes = self._io = None

        def close() -> None:
            # Every run and store call still going (a cancelled caller does
            # not stop its thread) ends before the store closes under it.
            for pool in pools:
                pool.shutdown(wait=True)
            self.scheduler.close()

        await to_thread_to_the_end(close)

    async def __aenter__(self) -> Self:
        """``async with AsyncScheduler(...) as scheduler:`` closes it at the end."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_STORE_THREADS = 4
"""Threads for awaitable store calls (each is short; a run has a thread of its own)."""
_MAX_CONCURRENT_RUNS = 1_000
"""The most runs one asynchronous worker may hold at once (each holds a thread)."""


async def _nap(
    clock: Clock, seconds: float, woken: asyncio.Event, ended: asyncio.Future[Any]
) -> None:
    """Sleep on the clock for *seconds*, or until *woken* is set or *ended* is done."""
    if woken.is_set() or ended.done():
        return
    sleeping = asyncio.ensure_future(sleep_async(clock, seconds))
    waking = asyncio.ensure_future(woken.wait())
    try:
        await asyncio.wait((sleeping, waking, ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeping, waking):
            task.cancel()
        await asyncio.gather(sleeping, waking, return_exceptions=True)


async def _until_next_round(
    rounds: set[asyncio.Task[list[SyncRun]]],
    woken: asyncio.Event,
    stop: asyncio.Event,
    clock: Clock,
    delay: float,
    *,
    real_time: bool,
) -> str:
    """
    Wait until the next round may be worth starting, and say why:
    ``"woken"`` (or *stop* set), ``"ended"`` (a round ended: its lanes are
    free) or ``"timer"`` (*delay* seconds passed). On a fake clock, time is
    not advanced while a round runs (a run in progress would see its lease
    expire in no real time): only its end, a wake-up or the stop count then.
    """
    if rounds and not real_time:
        waiters = {asyncio.ensure_future(woken.wait()), asyncio.ensure_future(stop.wait())}
        try:
            await asyncio.wait({*rounds, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        return "woken" if woken.is_set() or stop.is_set() else "ended"
    ended = asyncio.ensure_future(
        asyncio.wait(rounds, return_when=asyncio.FIRST_COMPLETED) if rounds else stop.wait()
    )
    try:
        while delay > 0 and not stop.is_set() and not woken.is_set() and not ended.done():
            step = min(delay, 1.0)
            await _nap(clock, step, woken, ended)
            delay -= step
    finally:
        ended.cancel()
        await asyncio.gather(ended, return_exceptions=True)
    if woken.is_set() or stop.is_set():
        return "woken"
    return "timer" if delay <= 0 else "ended"
