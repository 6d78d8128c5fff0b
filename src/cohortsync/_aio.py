"""
Where the engine's threads meet an event loop.

A run is driven by one thread (its store calls and source reads block); the
requests of an :class:`~cohortsync.AsyncDestination` are coroutines that must
run on an event loop. A :class:`Portal` hands them over: it submits a
coroutine to its loop from the run's thread and gives back a
:class:`concurrent.futures.Future`, so the engine waits for coroutines the way
it waits for its own request threads. An asynchronous scheduler's portal is
also its cancellation scope: cancelling it cancels the requests in flight and
makes the run stop at its next step, with nothing recorded as failed.

Nothing here imports :mod:`asyncio` until a portal is made: synchronous hosts
never load it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import Future

__all__ = [
    "Interrupted",
    "LoopThread",
    "Outcome",
    "Portal",
    "RunCancelled",
    "finish",
    "to_thread_to_the_end",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Outcome(Protocol[T_co]):
    """
    How a started coroutine (or a pool's call) ended, read by the thread that
    waits for it: an :class:`asyncio.Task` or a
    :class:`concurrent.futures.Future` that is done.
    """

    def cancelled(self) -> bool:
        """Whether it was cancelled (then it has neither result nor exception)."""

    def exception(self) -> BaseException | None:
        """What it raised, if it raised."""

    def result(self) -> T_co:
        """What it returned."""


class _Cancelled:
    """The :class:`Outcome` of a start the portal's cancellation ended."""

    def cancelled(self) -> bool:
        return True

    def exception(self) -> BaseException | None:  # pragma: no cover - cancelled() is asked first
        raise RunCancelled

    def result(self) -> Any:  # pragma: no cover - cancelled() is asked first
        raise RunCancelled


_CANCELLED = _Cancelled()


class _Start:
    """A coroutine handed to :meth:`Portal.start`, until its outcome is told."""

    __slots__ = ("coro", "done")

    def __init__(
        self, coro: Coroutine[Any, Any, Any], done: Callable[[Outcome[Any]], object]
    ) -> None:
        self.coro = coro
        self.done = done


class RunCancelled(BaseException):
    """
    The asynchronous scheduler driving this run was cancelled (shutdown,
    ``asyncio.timeout``). A :class:`BaseException`, like
    :class:`asyncio.CancelledError`, so that no ``except Exception`` in the
    engine or in host code records it as the run's failure: the run stops,
    its lease is given back, and the slot runs again (re-sending what was in
    flight under the same idempotency keys).
    """


class Interrupted(Exception):  # noqa: N818 - it carries an interrupt, it is not an error
    """
    A ``KeyboardInterrupt`` or ``SystemExit`` raised by an asynchronous
    adapter, carried out of its task (where it would stop the event loop: the
    host's, or the scheduler's loop thread, leaving the run waiting forever)
    to the run's thread, which raises :attr:`interrupt` itself.
    """

    def __init__(self, interrupt: KeyboardInterrupt | SystemExit) -> None:
        super().__init__(f"{type(interrupt).__name__} in an asynchronous adapter")
        self.interrupt = interrupt


async def _guarded(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    except (KeyboardInterrupt, SystemExit) as e:
        raise Interrupted(e) from e


class Portal:
    """
    Runs coroutines on one event loop for threads that are not its own, and
    can be cancelled as a whole.

    Args:
        loop: The event loop the coroutines run on. It must keep running
            while anything submitted is pending.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: set[Future[Any]] = set()
        self._started: set[_Start] = set()
        """Handed to :meth:`start`, outcome not told yet."""
        self._queued: list[_Start] = []
        """Handed to :meth:`start`, not made a task yet (the loop is woken once for all)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cancel = threading.Event()
        self._calls: set[threading.Event] = set()
        """One per :meth:`call` waiting: set when its coroutine ends or the portal is cancelled."""
        self.cancelled = False

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """
        Start *coro* on the loop; cancelled with the portal.

        Raises:
            RunCancelled: The portal is cancelled (*coro* is closed unrun).
        """
        import asyncio  # noqa: PLC0415 - loaded by whoever made the loop already

        with self._lock:
            if self.cancelled:
                coro.close()
                raise RunCancelled
            future = asyncio.run_coroutine_threadsafe(self._tracked(coro), self.loop)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def start(self, coro: Coroutine[Any, Any, T], done: Callable[[Outcome[T]], object]) -> None:
        """
        Start *coro* on the loop and call *done* with its :class:`Outcome`
        once it has ended (on the loop), or at once if the portal is
        cancelled first (from the cancelling thread): exactly once either way.

        :meth:`submit` for a thread that starts many coroutines and waits for
        each in turn: no :class:`concurrent.futures.Future` per coroutine, and
        the loop is woken once for all those started before it next runs,
        not once each. A run sends its batches this way; every handoff the
        loop thread makes is time the requests of every other run wait for.

        Raises:
            RunCancelled: The portal is cancelled (*coro* is closed unrun).
        """
        call = _Start(coro, done)
        with self._lock:
            if self.cancelled:
                coro.close()
                raise RunCancelled
            self._started.add(call)
            self._queued.append(call)
            wake = len(self._queued) == 1
        if not wake:
            return  # the loop is woken already, and takes this one too
        try:
            self.loop.call_soon_threadsafe(self._start_queued)
        except BaseException:
            # The loop is closed: nothing queued will run. The others that
            # counted on this wake-up are told they were cancelled.
            with self._lock:
                stranded, self._queued = self._queued, []
                self._started.difference_update(stranded)
            for other in stranded:
                other.coro.close()
                if other is not call:
                    other.done(_CANCELLED)
            raise

    def _start_queued(self) -> None:
        """On the loop: make a task of each coroutine :meth:`start` queued."""
        with self._lock:
            queued, self._queued = self._queued, []
            live = [call in self._started for call in queued]
        for call, alive in zip(queued, live, strict=True):
            if not alive:
                call.coro.close()  # cancelled before it ran: its outcome is told
                continue
            task = self.loop.create_task(_guarded(call.coro))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._ended, call))

    def _ended(self, call: _Start, task: asyncio.Task[Any]) -> None:
        """On the loop: a started coroutine's task is done; tell its outcome."""
        self._tasks.discard(task)
        if task.cancelled():
            # Cancelled before its first step, the coroutine never ran: close
            # it, or it would warn that it was never awaited.
            call.coro.close()
        with self._lock:
            if call not in self._started:
                return  # told already: the portal was cancelled
            self._started.discard(call)
        call.done(task)

    def _cancel_tasks(self) -> None:
        """On the loop: cancel the tasks :meth:`start` made that still run."""
        for task in list(self._tasks):
            task.cancel()

    async def _tracked(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run *coro* as a task :meth:`drain` can wait for (it runs on the loop)."""
        import asyncio  # noqa: PLC0415 - see submit

        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - run_coroutine_threadsafe makes one
        self._tasks.add(task)
        try:
            return await _guarded(coro)
        finally:
            self._tasks.discard(task)

    async def drain(self) -> None:
        """
        Wait on the loop until every submitted coroutine has really ended: a
        cancelled one may still be finishing a store call it must not leave
        half done (see :func:`to_thread_to_the_end`).
        """
        import asyncio  # noqa: PLC0415 - see submit

        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def call(self, coro: Coroutine[Any, Any, T], *, grace: float = 0.0) -> T:
        """
        Run *coro* on the loop and wait for its result: for a destination's
        ``open`` and ``close``. Once the portal is cancelled (before *coro*
        runs or while it does), *coro* has *grace* more seconds to finish;
        then it is cancelled like a request and :class:`RunCancelled` is
        raised, so a hook that hangs cannot hold up a shutdown. ``close``
        gets a grace (it tells the adapter how the run ended and may release
        a connection); ``open`` gets none (the run has sent nothing yet).

        Raises:
            RunCancelled: The portal was cancelled and *coro* did not finish in time.
        """
        import asyncio  # noqa: PLC0415 - see submit
        from concurrent.futures import CancelledError, wait  # noqa: PLC0415 - loaded with asyncio

        # Not one of the tasks a cancel stops at once: the grace is this call's.
        future = asyncio.run_coroutine_threadsafe(_guarded(coro), self.loop)
        woken = threading.Event()
        future.add_done_callback(lambda _: woken.set())
        with self._lock:
            self._calls.add(woken)
            if self.cancelled:
                woken.set()
        try:
            woken.wait()
        finally:
            with self._lock:
                self._calls.discard(woken)
        if not future.done() and not wait([future], timeout=grace).done:
            future.cancel()
            raise RunCancelled
        try:
            return future.result()
        except Interrupted as e:
            raise e.interrupt from None
        except CancelledError:
            raise RunCancelled from None

    def check(self) -> None:
        """
        Raises:
            RunCancelled: The portal is cancelled: stop before the next step.
        """
        if self.cancelled:
            raise RunCancelled

    def wait(self, seconds: float) -> None:
        """
        Block this (non-loop) thread for *seconds* of real time, or until the
        portal is cancelled, then :meth:`check`: a blocking adapter's backoff
        under a cancelled scheduler ends at once.

        Raises:
            RunCancelled: The portal is (or became) cancelled.
        """
        self._cancel.wait(seconds)
        self.check()

    def cancel(self) -> None:
        """
        Cancel every submitted coroutine still running, and make the next
        :meth:`submit` or :meth:`check` raise :class:`RunCancelled`. Safe from
        any thread, and to repeat.
        """
        with self._lock:
            self.cancelled = True
            self._cancel.set()
            pending = list(self._pending)
            started = list(self._started)
            self._started.clear()
            calls = list(self._calls)
        for woken in calls:
            woken.set()
        for future in pending:
            future.cancel()
        for call in started:
            call.done(_CANCELLED)
        # The tasks stop at their next await; a loop closed meanwhile has none.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._cancel_tasks)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "open"
        return f"<Portal {state}, {len(self._pending) + len(self._started)} pending>"


async def to_thread_to_the_end(function: Callable[..., T], *args: object) -> T:
    """
    :func:`asyncio.to_thread` for a store call that must finish even if the
    awaiting task is cancelled: the cancellation is passed on only once the
    call has returned, so no store call outlives the run (or the close of
    the store) that made it.
    """
    import asyncio  # noqa: PLC0415 - see Portal.submit
    import contextvars  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    call = loop.run_in_executor(None, functools.partial(context.run, function, *args))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        await finish(call)
        raise


async def finish(work: Awaitable[object]) -> None:
    """
    Await *work* to its end through any cancellation of the caller (who
    re-raises its own): what runs in threads stops at its own next step,
    not when a task is cancelled.
    """
    import asyncio  # noqa: PLC0415 - see Portal.submit

    task = asyncio.ensure_future(work)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait((task,))


async def _wind_down() -> None:
    """Cancel and await what still runs on this loop, then shut its executors down."""
    import asyncio  # noqa: PLC0415 - see Portal.submit

    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    loop = asyncio.get_running_loop()
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()


class LoopThread:
    """
    An event loop in a daemon thread of its own, for a synchronous scheduler
    that has asynchronous destinations: started by the first :meth:`portal`
    call (never before), stopped by :meth:`stop`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._portal: Portal | None = None
        self._thread: threading.Thread | None = None

    def portal(self) -> Portal:
        """The portal to the loop, starting the thread on first use."""
        with self._lock:
            if self._portal is None:
                import asyncio  # noqa: PLC0415 - only hosts with async adapters load it

                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=serve, name="cohortsync-loop", daemon=True)
                thread.start()
                ready.wait()
                self._thread = thread
                self._portal = Portal(loop)
            return self._portal

    def stop(self) -> None:
        """
        Stop the loop and join its thread (what is still pending is
        cancelled first); a no-op if it never started. Safe to repeat.
        """
        with self._lock:
            portal, thread = self._portal, self._thread
            self._portal = self._thread = None
        if portal is None or thread is None:
            return
        portal.cancel()
        loop = portal.loop
        if thread.is_alive():
            import asyncio  # noqa: PLC0415 - see portal

            asyncio.run_coroutine_threadsafe(_wind_down(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
        loop.close()

    def __repr__(self) -> str:
        return f"<LoopThread {'running' if self._thread is not None else 'not started'}>"
