"""
How a run's thread hands coroutines to an event loop (``cohortsync._aio``):
:meth:`Portal.start` wakes the loop once for every coroutine started before
it runs, tells each outcome exactly once, and a cancelled portal tells its
pending ones at once.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cohortsync._aio import Interrupted, Outcome, Portal, RunCancelled


class CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the wake-ups other threads ask of it."""

    def __init__(self) -> None:
        super().__init__()
        self.woken = 0

    def call_soon_threadsafe(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, **kw: Any
    ) -> Any:
        self.woken += 1
        return super().call_soon_threadsafe(callback, *args, **kw)


@pytest.fixture
def loop() -> Iterator[CountingLoop]:
    loop = CountingLoop()
    yield loop
    loop.close()


def settle(loop: asyncio.AbstractEventLoop) -> None:
    """Let the loop run what was handed to it, and what that scheduled, to the end."""

    async def turns() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    loop.run_until_complete(turns())


async def answer(value: int) -> int:
    await asyncio.sleep(0)
    return value


class TestStart:
    def test_one_wake_up_for_every_start_before_the_loop_runs(self, loop: CountingLoop) -> None:
        """Three starts made while the loop is busy cost one wake-up, and each result comes back."""
        portal = Portal(loop)
        told: queue.SimpleQueue[Outcome[int]] = queue.SimpleQueue()
        for i in range(3):
            portal.start(answer(i), told.put)
        assert 1 == loop.woken

        settle(loop)

        assert [0, 1, 2] == sorted(told.get_nowait().result() for _ in range(3))
        assert told.empty()
        portal.start(answer(3), told.put)
        assert 2 == loop.woken  # the loop ran meanwhile: a new start wakes it again
        settle(loop)
        assert 3 == told.get_nowait().result()

    def test_starts_from_another_thread_run_on_the_loop(self) -> None:
        """A coroutine started from a worker thread runs on the loop's thread."""
        loop = asyncio.new_event_loop()
        server = threading.Thread(target=loop.run_forever, daemon=True)
        server.start()
        portal = Portal(loop)
        told: queue.SimpleQueue[Outcome[str]] = queue.SimpleQueue()

        async def where() -> str:
            return threading.current_thread().name

        try:
            portal.start(where(), told.put)
            outcome = told.get(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            server.join()
            loop.close()

        assert server.name == outcome.result()

    def test_errors_and_interrupts_are_outcomes(self, loop: CountingLoop) -> None:
        """An exception is the outcome's; an interrupt comes back carried, not raised."""
        portal = Portal(loop)
        told: queue.SimpleQueue[Outcome[None]] = queue.SimpleQueue()

        async def fail() -> None:
            raise ValueError("bad")

        async def interrupt() -> None:
            raise KeyboardInterrupt

        portal.start(fail(), told.put)
        portal.start(interrupt(), told.put)
        settle(loop)

        first, second = told.get_nowait(), told.get_nowait()
        assert isinstance(first.exception(), ValueError)
        carried = second.exception()
        assert isinstance(carried, Interrupted)
        assert isinstance(carried.interrupt, KeyboardInterrupt)


class TestCancel:
    def test_pending_starts_are_told_at_once_and_only_once(self, loop: CountingLoop) -> None:
        """Cancelling tells each pending start it was cancelled before its task has ended."""
        portal = Portal(loop)
        told: list[Outcome[int]] = []
        gate = asyncio.Event()

        async def held() -> int:
            await gate.wait()
            return 1

        portal.start(held(), told.append)
        settle(loop)  # the task runs, and waits
        assert [] == told

        portal.cancel()

        assert [True] == [outcome.cancelled() for outcome in told]
        settle(loop)  # the task is cancelled on the loop, and its end is not told again
        assert 1 == len(told)
        assert "0 pending" in repr(portal)

    def test_a_start_cancelled_before_it_ran_is_closed_unrun(self, loop: CountingLoop) -> None:
        """Cancelled between start and the loop's next turn: never run, never warned about."""
        portal = Portal(loop)
        told: list[Outcome[int]] = []
        ran: list[int] = []

        async def work() -> int:
            ran.append(1)
            return 1

        portal.start(work(), told.append)
        portal.cancel()
        settle(loop)
        gc.collect()  # an unawaited coroutine would warn here (warnings are errors)

        assert [] == ran
        assert [True] == [outcome.cancelled() for outcome in told]

    def test_a_start_after_cancel_is_refused(self, loop: CountingLoop) -> None:
        """A cancelled portal refuses new starts with RunCancelled, closing the coroutine."""
        portal = Portal(loop)
        portal.cancel()
        coro = answer(1)

        with pytest.raises(RunCancelled):
            portal.start(coro, lambda _outcome: None)

        assert inspect.CORO_CLOSED == inspect.getcoroutinestate(coro)  # never runs, nor warns

    def test_a_start_on_a_closed_loop_raises_and_leaves_nothing_queued(self) -> None:
        """A closed loop refuses each start (never a silent wait): the coroutines are closed."""
        loop = asyncio.new_event_loop()
        loop.close()
        portal = Portal(loop)
        first, second = answer(1), answer(2)

        for coro in (first, second):
            with pytest.raises(RuntimeError):
                portal.start(coro, lambda _outcome: None)
            assert inspect.CORO_CLOSED == inspect.getcoroutinestate(coro)
        assert "0 pending" in repr(portal)
