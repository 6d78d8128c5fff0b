"""
The asynchronous scheduler and asynchronous destinations: the same engine
driven from an event loop, runs of many syncs at once, cancellation that
loses nothing, and async adapters under the synchronous scheduler too.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import cohortsync as cs
from cohortsync._run import CLOSE_GRACE
from cohortsync.destinations import RateLimits
from cohortsync.events import RunFinished, RunStarted
from cohortsync.exceptions import ConfigurationError, StorageClosedError
from cohortsync.storage import SQLiteStorage
from cohortsync.testing import (
    FakeClock,
    Fault,
    FaultyDestination,
    MemoryStorage,
    RecordingDestination,
)

MEMBERS = [f"u{i:03d}" for i in range(40)]


class AsyncOf(cs.AsyncDestination):
    """
    An asynchronous adapter in front of a synchronous test double: each
    request awaits *delay* real seconds, then answers as *inner* does.
    Counts requests in flight, overall and per sync.
    """

    def __init__(self, inner: cs.Destination, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.per_sync: Counter[str] = Counter()
        self.peak_per_sync = 0
        self.opened: list[str] = []
        self.closed: list[tuple[str, bool]] = []
        self.cancelled = 0

    @property
    def capabilities(self) -> cs.Capabilities:  # type: ignore[override]
        return self.inner.capabilities

    async def _call(self, batch: cs.Batch, method: Any) -> cs.DeliveryResult:
        sync_id = batch.context.sync_id
        self.in_flight += 1
        self.per_sync[sync_id] += 1
        self.peak = max(self.peak, self.in_flight)
        self.peak_per_sync = max(self.peak_per_sync, self.per_sync[sync_id])
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        else:
            result: cs.DeliveryResult = method(batch)
            return result
        finally:
            self.in_flight -= 1
            self.per_sync[sync_id] -= 1

    async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return await self._call(batch, self.inner.add)

    async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return await self._call(batch, self.inner.remove)

    async def open(self, context: cs.RunContext) -> None:
        self.opened.append(context.sync_id)

    async def close(self, context: cs.RunContext, *, succeeded: bool) -> None:
        self.closed.append((context.sync_id, succeeded))


async def within(seconds: float, work: Coroutine[Any, Any, object]) -> None:
    """
    Run *work* under ``asyncio.timeout`` (Python 3.11+), else ``wait_for``:
    both cancel it when the time is up.
    """
    timeout = getattr(asyncio, "timeout", None)
    if timeout is None:
        await asyncio.wait_for(work, seconds)
        return
    async with timeout(seconds):
        await work


def caps(batch: int = 10, parallel: int = 1, **more: Any) -> cs.Capabilities:
    return cs.Capabilities(
        name="test", supports_realtime=True, max_batch_size=batch, max_parallel=parallel, **more
    )


class Accepts(cs.AsyncDestination):
    """An asynchronous adapter that accepts every batch at once."""

    capabilities = caps(batch=40)

    async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()

    async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()


def cohort(cohort_id: str, members: list[str] = MEMBERS) -> cs.Cohort:
    return cs.Cohort(
        id=cohort_id, name=cohort_id, type=cs.CohortType.STATIC, source=lambda: list(members)
    )


def async_scheduler(storage: Any = None, **kwargs: Any) -> cs.AsyncScheduler:
    return cs.AsyncScheduler(
        storage if storage is not None else MemoryStorage(),
        clock=kwargs.pop("clock", FakeClock()),
        seed=0,
        rate_limits=RateLimits(),
        **kwargs,
    )


async def create(scheduler: cs.AsyncScheduler, n: int, destination: str = "d") -> list[str]:
    ids = []
    for i in range(n):
        scheduler.add_cohort(cohort(f"c{i}"), replace=True)
        sync = await scheduler.create_sync(
            f"c{i}", destination, cs.SyncPolicy.hourly(), sync_id=f"s{i}"
        )
        ids.append(sync.id)
    return ids


class TestRunDue:
    def test_runs_every_due_sync_concurrently_within_the_bounds(self) -> None:
        """Up to max_concurrent_runs runs at once, each with up to max_parallel requests."""
        inner = RecordingDestination(caps(batch=10, parallel=3))
        adapter = AsyncOf(inner, delay=0.02)

        async def main() -> list[cs.SyncRun]:
            async with async_scheduler(max_concurrent_runs=4) as scheduler:
                scheduler.add_destination("d", adapter)
                await create(scheduler, 12)
                return await scheduler.run_due()

        runs = asyncio.run(main())

        assert 12 == len(runs)
        assert {cs.RunStatus.SUCCEEDED} == {run.status for run in runs}
        assert 12 == len({run.sync_id for run in runs})
        assert 4 * 3 == adapter.peak
        assert 3 == adapter.peak_per_sync
        assert all(set(MEMBERS) == inner.audience(f"s{i}") for i in range(12))
        assert 12 == len(adapter.opened) == len(adapter.closed)
        assert all(ok for _, ok in adapter.closed)

    def test_is_faster_than_one_run_at_a_time(self) -> None:
        """Twelve runs of four 50 ms batches overlap: far under the 2.4 s of sequential runs."""
        adapter = AsyncOf(RecordingDestination(caps(batch=10, parallel=4)), delay=0.05)

        async def main() -> float:
            async with async_scheduler(max_concurrent_runs=12) as scheduler:
                scheduler.add_destination("d", adapter)
                await create(scheduler, 12)
                started = time.perf_counter()
                await scheduler.run_due()
                return time.perf_counter() - started

        assert 1.2 > asyncio.run(main())

    def test_limit_bounds_the_runs(self) -> None:
        """limit=3 runs three syncs; the others stay due for the next call."""
        adapter = AsyncOf(RecordingDestination(caps()))

        async def main() -> tuple[int, int]:
            async with async_scheduler(max_concurrent_runs=8) as scheduler:
                scheduler.add_destination("d", adapter)
                await create(scheduler, 7)
                first = await scheduler.run_due(limit=3)
                rest = await scheduler.run_due()
                return len(first), len(rest)

        assert (3, 4) == asyncio.run(main())

    def test_a_sync_runs_once_per_call_even_when_due_again(self) -> None:
        """A real-time sync due again at once (the clock stands) is not run twice in one call."""
        adapter = AsyncOf(RecordingDestination(caps()))

        async def main() -> list[int]:
            async with async_scheduler(max_concurrent_runs=4) as scheduler:
                scheduler.add_destination("d", adapter)
                scheduler.add_cohort(cohort("c"))
                await scheduler.create_sync("c", "d", cs.SyncPolicy.realtime(), sync_id="rt")
                counts = []
                for _ in range(3):
                    counts.append(len(await scheduler.run_due()))
                    scheduler.clock.advance(60)  # type: ignore[attr-defined]
                return counts

        assert [1, 1, 1] == asyncio.run(main())

    def test_history_matches_the_synchronous_scheduler(self) -> None:
        """Retries, backoff waits, rejections and bisection come out as the sync engine's."""
        script = {
            0: Fault.server_error(retry_after=3.0),
            1: Fault.timeout(),
            3: Fault.reject(identifiers=["u015", "u016"]),
        }

        def faulty() -> FaultyDestination:
            return FaultyDestination(caps(batch=10), script=script, always=Fault.bad_data(["u031"]))

        def sync_world() -> tuple[list[Any], list[float]]:
            clock = FakeClock()
            inner = faulty()
            scheduler = cs.Scheduler(MemoryStorage(), clock=clock, seed=0, rate_limits=RateLimits())
            scheduler.add_destination("d", inner)
            scheduler.add_cohort(cohort("c"))
            scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
            scheduler.run_due()
            return _comparable(scheduler.history("s")), clock.slept

        def async_world() -> tuple[list[Any], list[float]]:
            clock = FakeClock()
            inner = faulty()

            async def main() -> list[Any]:
                async with async_scheduler(clock=clock) as scheduler:
                    scheduler.add_destination("d", AsyncOf(inner))
                    scheduler.add_cohort(cohort("c"))
                    await scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
                    await scheduler.run_due()
                    return _comparable(await scheduler.history("s"))

            return asyncio.run(main()), clock.slept

        expected = sync_world()
        actual = async_world()

        assert expected == actual
        assert cs.RunStatus.PARTIAL.value == expected[0][0]["status"]
        assert expected[1]  # the backoff waits happened, on the fake clock

    def test_mixed_sync_and_async_destinations(self) -> None:
        """One scheduler, a blocking adapter and an async one: both audiences complete."""
        blocking = RecordingDestination(caps(batch=7, parallel=2))
        asynchronous = RecordingDestination(caps(batch=7, parallel=2))

        async def main() -> list[cs.SyncRun]:
            async with async_scheduler(max_concurrent_runs=3) as scheduler:
                scheduler.add_destination("sync", blocking)
                scheduler.add_destination("async", AsyncOf(asynchronous, delay=0.01))
                scheduler.add_cohort(cohort("c"))
                for i in range(3):
                    await scheduler.create_sync(
                        "c", "sync", cs.SyncPolicy.hourly(), sync_id=f"b{i}"
                    )
                    await scheduler.create_sync(
                        "c", "async", cs.SyncPolicy.hourly(), sync_id=f"a{i}"
                    )
                return await scheduler.run_due()

        runs = asyncio.run(main())

        assert 6 == len(runs)
        assert {cs.RunStatus.SUCCEEDED} == {run.status for run in runs}
        assert all(set(MEMBERS) == blocking.audience(f"b{i}") for i in range(3))
        assert all(set(MEMBERS) == asynchronous.audience(f"a{i}") for i in range(3))

    def test_a_failing_async_adapter_is_recorded_like_a_sync_one(self) -> None:
        """An exception that is not a DeliveryError fails the run (PermanentError), others go on."""

        class Broken(cs.AsyncDestination):
            capabilities = caps()

            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                raise KeyError("bug")

            async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                raise KeyError("bug")

        good = RecordingDestination(caps())

        async def main() -> dict[str, cs.SyncRun]:
            async with async_scheduler() as scheduler:
                scheduler.add_destination("broken", Broken())
                scheduler.add_destination("good", AsyncOf(good))
                scheduler.add_cohort(cohort("c"))
                await scheduler.create_sync("c", "broken", cs.SyncPolicy.hourly(), sync_id="x")
                await scheduler.create_sync("c", "good", cs.SyncPolicy.hourly(), sync_id="y")
                return {run.sync_id: run for run in await scheduler.run_due()}

        runs = asyncio.run(main())

        assert cs.RunStatus.FAILED == runs["x"].status
        assert "PermanentError" == runs["x"].error_type
        assert "KeyError" in (runs["x"].error_message or "")
        assert cs.RunStatus.SUCCEEDED == runs["y"].status

    def test_rate_limit_holds_across_concurrent_runs(self) -> None:
        """Ten runs at once share one limiter: no window of 1 s holds more than 5 requests."""
        clock = FakeClock()
        limited = caps(batch=10, parallel=4, rate_limit=cs.RateLimit(requests=5, per_seconds=1.0))
        inner = RecordingDestination(limited)
        starts: list[float] = []

        class Timed(AsyncOf):
            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                starts.append(clock.now().timestamp())
                return await super().add(batch)

        async def main() -> None:
            async with async_scheduler(clock=clock, max_concurrent_runs=10) as scheduler:
                scheduler.add_destination("d", Timed(inner))
                await create(scheduler, 10)
                await scheduler.run_due()

        asyncio.run(main())

        assert 40 == len(starts)
        starts.sort()
        assert all(starts[i + 5] - starts[i] >= 1.0 for i in range(len(starts) - 5))


def _comparable(history: list[cs.SyncRun]) -> list[dict[str, Any]]:
    """What two runs of the same script must agree on (not ids or durations)."""
    return [
        {
            "status": run.status.value,
            "added": run.added,
            "rejected": run.rejected,
            "batches": run.batches,
            "retries": run.retries,
            "error": run.error_type,
            "slot": run.slot,
            "finished": run.finished_at,
        }
        for run in history
    ]


class TestCancellation:
    def test_cancel_mid_batch_releases_the_lease_and_records_nothing(self, tmp_path: Path) -> None:
        """Cancelled with requests in flight: lease given back, no run recorded, then converges."""
        path = tmp_path / "store.db"
        inner = RecordingDestination(caps(batch=5, parallel=2))
        adapter = AsyncOf(inner, delay=10.0)  # would take forever

        async def main() -> float:
            async with async_scheduler(SQLiteStorage(path)) as scheduler:
                scheduler.add_destination("d", adapter)
                await create(scheduler, 3)
                started = time.perf_counter()
                with pytest.raises(asyncio.TimeoutError):
                    await within(0.3, scheduler.run_due())
                return time.perf_counter() - started

        took = asyncio.run(main())

        assert 2.0 > took
        assert 6 == adapter.cancelled  # 3 runs x 2 requests in flight
        store = SQLiteStorage(path)
        try:
            for i in range(3):
                record = store.get_sync(f"s{i}")
                assert record.lease is None
                assert [] == store.history(f"s{i}")
                assert 2 == len(store.pending_batches(f"s{i}"))  # in flight: re-sent later
        finally:
            store.close()

        # A synchronous worker on the same file takes over at once.
        recorder = RecordingDestination(caps(batch=5, parallel=2))
        with cs.Scheduler(SQLiteStorage(path), clock=FakeClock(), rate_limits=RateLimits()) as sync:
            sync.add_destination("d", recorder)
            for i in range(3):
                sync.add_cohort(cohort(f"c{i}"))
            runs = sync.run_due()
            assert 3 == len(runs)
            assert {cs.RunStatus.SUCCEEDED} == {run.status for run in runs}
            for i in range(3):
                assert set(MEMBERS) == recorder.audience(f"s{i}")

    def test_resent_batches_keep_their_keys(self, tmp_path: Path) -> None:
        """What was in flight when cancelled is re-sent under the same idempotency key."""
        path = tmp_path / "store.db"
        keys: list[str] = []

        class Slow(cs.AsyncDestination):
            capabilities = caps(batch=40)

            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                keys.append(batch.idempotency_key)
                await asyncio.sleep(10)
                return cs.DeliveryResult.ok()

            async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        async def main() -> None:
            async with async_scheduler(SQLiteStorage(path)) as scheduler:
                scheduler.add_destination("d", Slow())
                await create(scheduler, 1)
                task = asyncio.create_task(scheduler.run_due())
                await asyncio.sleep(0.2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        asyncio.run(main())
        recorder = RecordingDestination(caps(batch=40))
        with cs.Scheduler(SQLiteStorage(path), clock=FakeClock(), rate_limits=RateLimits()) as sync:
            sync.add_destination("d", recorder)
            sync.add_cohort(cohort("c0"))
            sync.run_due()

        assert keys == [call.idempotency_key for call in recorder.calls()]

    @pytest.mark.parametrize("kind", ["async", "sync"])
    def test_cancel_during_a_backoff_wait(self, kind: str) -> None:
        """A run waiting out a long backoff stops within about a second of the cancellation."""
        failing = FaultyDestination(caps(batch=40), always=Fault.server_error(retry_after=30.0))
        adapter: cs.Destination | cs.AsyncDestination = (
            AsyncOf(failing) if kind == "async" else failing
        )
        storage = MemoryStorage()

        async def main() -> float:
            scheduler = async_scheduler(storage, clock=cs.SystemClock())
            scheduler.add_destination("d", adapter)
            await create(scheduler, 1)
            started = time.perf_counter()
            with pytest.raises(asyncio.TimeoutError):
                await within(0.3, scheduler.run_due())
            return time.perf_counter() - started

        took = asyncio.run(main())

        assert 2.0 > took
        assert storage.get_sync("s0").lease is None
        assert [] == storage.history("s0")

    @pytest.mark.parametrize("hook", ["open", "close"])
    def test_a_hook_that_hangs_does_not_hold_up_a_cancellation(self, hook: str) -> None:
        """
        An adapter whose open() or close() never returns: the cancelled
        run_due() returns at once (open) or after close()'s grace, the hook is
        cancelled and the lease given back (outsider attack: it used to wait
        for the hook for ever).
        """
        seen: list[str] = []

        class Hangs(Accepts):
            async def _hang(self, name: str) -> None:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    seen.append(f"{name} cancelled")
                    raise

            async def open(self, context: cs.RunContext) -> None:
                if hook == "open":
                    await self._hang("open")

            async def close(self, context: cs.RunContext, *, succeeded: bool) -> None:
                if hook == "close":
                    await self._hang("close")

        storage = MemoryStorage()

        async def main() -> float:
            scheduler = async_scheduler(storage, clock=cs.SystemClock())
            scheduler.add_destination("d", Hangs())
            await create(scheduler, 1)
            started = time.perf_counter()
            with pytest.raises(asyncio.TimeoutError):
                await within(0.3, scheduler.run_due())
            return time.perf_counter() - started

        took = asyncio.run(main())

        grace = 0.0 if hook == "open" else CLOSE_GRACE
        assert 0.3 + grace <= took + 0.05
        assert took < 0.3 + grace + 1.0
        assert [f"{hook} cancelled"] == seen
        assert storage.get_sync("s0").lease is None

    def test_a_slow_close_finishes_within_its_grace(self) -> None:
        """close() still running when the scheduler is cancelled may finish if it is quick."""
        seen: list[str] = []

        class SlowClose(Accepts):
            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                await asyncio.sleep(0.5)  # cancelled: the run stops here
                return cs.DeliveryResult.ok()

            async def close(self, context: cs.RunContext, *, succeeded: bool) -> None:
                await asyncio.sleep(CLOSE_GRACE / 4)
                seen.append(f"closed succeeded={succeeded}")

        storage = MemoryStorage()

        async def main() -> None:
            scheduler = async_scheduler(storage, clock=cs.SystemClock())
            scheduler.add_destination("d", SlowClose())
            await create(scheduler, 1)
            with pytest.raises(asyncio.TimeoutError):
                await within(0.2, scheduler.run_due())

        asyncio.run(main())

        assert ["closed succeeded=False"] == seen
        assert storage.get_sync("s0").lease is None
        assert [] == storage.history("s0")

    def test_cancelling_run_forever_stops_it(self) -> None:
        """run_forever as a task ends on cancel, its runs stopped, leases given back."""
        storage = MemoryStorage()
        adapter = AsyncOf(RecordingDestination(caps(batch=10)), delay=5.0)

        async def main() -> None:
            scheduler = async_scheduler(storage, clock=cs.SystemClock())
            scheduler.add_destination("d", adapter)
            await create(scheduler, 2)
            task = asyncio.create_task(scheduler.run_forever(idle=0.05))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())

        assert all(storage.get_sync(f"s{i}").lease is None for i in range(2))
        assert 2 == adapter.cancelled

    def test_a_sync_created_while_run_forever_waits_runs_at_once(self) -> None:
        """create_sync wakes run_forever (idle 30 s): the first run starts within a moment."""
        inner = RecordingDestination(caps())

        async def main() -> float:
            async with async_scheduler(clock=cs.SystemClock()) as scheduler:
                scheduler.add_destination("d", AsyncOf(inner))
                scheduler.add_cohort(cohort("c"))
                task = asyncio.create_task(scheduler.run_forever(idle=30.0))
                await asyncio.sleep(0.2)  # waiting between rounds now
                started = time.perf_counter()
                await scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
                while not await scheduler.history("s"):  # noqa: ASYNC110 - polls the store
                    await asyncio.sleep(0.01)
                took = time.perf_counter() - started
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return took

        assert 2.0 > asyncio.run(main())
        assert set(MEMBERS) == inner.audience("s")

    def test_aclose_waits_for_a_store_call_its_cancelled_caller_left(self, tmp_path: Path) -> None:
        """Cancelled inside a slow store call, then closed: the call ends before the store does."""
        store = SQLiteStorage(tmp_path / "store.db")
        calls: list[str] = []
        original = store.purge_history

        def slow_purge(before: Any) -> int:
            calls.append("purge starts")
            time.sleep(0.2)
            result = original(before)
            calls.append("purge ends")
            return result

        store.purge_history = slow_purge  # type: ignore[method-assign]
        original_close = store.close

        def close() -> None:
            calls.append("close")
            original_close()

        store.close = close  # type: ignore[method-assign]
        errors: list[BaseException | None] = []
        hook = threading.excepthook
        threading.excepthook = lambda args: errors.append(args.exc_value)

        async def main() -> None:
            scheduler = async_scheduler(store, clock=cs.SystemClock())
            worker = asyncio.create_task(scheduler.run_forever())
            await asyncio.sleep(0.05)  # inside the purge now
            worker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await worker
            await scheduler.aclose()

        try:
            asyncio.run(main())
        finally:
            threading.excepthook = hook

        assert ["purge starts", "purge ends", "close"] == calls
        assert [] == errors

    def test_run_forever_stops_when_told(self) -> None:
        """With a stop event and a fake clock: runs the due syncs, waits, stops when set."""
        clock = FakeClock()
        adapter = AsyncOf(RecordingDestination(caps()))

        async def main() -> int:
            stop = asyncio.Event()
            async with async_scheduler(clock=clock) as scheduler:
                scheduler.add_destination("d", adapter)
                await create(scheduler, 2)

                def stop_after(event: object) -> None:
                    if isinstance(event, RunFinished) and clock.now() > start + timedelta(hours=2):
                        loop.call_soon_threadsafe(stop.set)

                loop = asyncio.get_running_loop()
                start = clock.now()
                scheduler.add_listener(stop_after)
                await asyncio.wait_for(scheduler.run_forever(stop, idle=60.0), timeout=20)
                return len(await scheduler.history("s0"))

        assert 3 <= asyncio.run(main())


class TestSynchronousSchedulerWithAsyncAdapters:
    def test_no_loop_thread_until_an_async_adapter_runs(self) -> None:
        """The sync scheduler starts its loop thread on first use, and close() stops it."""
        before = {t.name for t in threading.enumerate()}
        scheduler = cs.Scheduler(MemoryStorage(), clock=FakeClock(), rate_limits=RateLimits())
        scheduler.add_destination("sync", RecordingDestination(caps()))
        scheduler.add_cohort(cohort("c"))
        scheduler.create_sync("c", "sync", cs.SyncPolicy.hourly(), sync_id="b")
        scheduler.run_due()
        assert "cohortsync-loop" not in {t.name for t in threading.enumerate()} - before

        inner = RecordingDestination(caps(batch=10, parallel=3))
        adapter = AsyncOf(inner, delay=0.01)
        scheduler.add_destination("async", adapter)
        scheduler.create_sync("c", "async", cs.SyncPolicy.hourly(), sync_id="a")
        runs = scheduler.run_due()

        assert [cs.RunStatus.SUCCEEDED] == [run.status for run in runs]
        assert set(MEMBERS) == inner.audience("a")
        assert 3 == adapter.peak
        assert "cohortsync-loop" in {t.name for t in threading.enumerate()}
        scheduler.close()
        assert "cohortsync-loop" not in {t.name for t in threading.enumerate()}

    def test_the_base_no_op_hooks_never_go_to_the_loop(self) -> None:
        """A run with nothing to send to an adapter without open/close starts no loop thread."""

        class NoHooks(cs.AsyncDestination):
            capabilities = caps()

            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                raise AssertionError("nothing to send")

            async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                raise AssertionError("nothing to send")

        with cs.Scheduler(MemoryStorage(), clock=FakeClock(), rate_limits=RateLimits()) as sched:
            sched.add_destination("d", NoHooks())
            sched.add_cohort(cohort("c", members=[]))
            sched.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
            (run,) = sched.run_due()

            assert cs.RunStatus.SUCCEEDED == run.status
            assert "cohortsync-loop" not in {t.name for t in threading.enumerate()}

    def test_hooks_an_adapter_defines_still_run_on_the_loop(self) -> None:
        """open/close written by the adapter (or set on the instance) are awaited on the loop."""
        calls: list[tuple[str, str]] = []

        class Hooks(cs.AsyncDestination):
            capabilities = caps()

            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                raise AssertionError("nothing to send")

            async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                raise AssertionError("nothing to send")

            async def open(self, context: cs.RunContext) -> None:
                calls.append(("open", threading.current_thread().name))

        async def close(context: cs.RunContext, *, succeeded: bool) -> None:
            calls.append(("close", threading.current_thread().name))

        adapter = Hooks()
        adapter.close = close  # type: ignore[method-assign]
        with cs.Scheduler(MemoryStorage(), clock=FakeClock(), rate_limits=RateLimits()) as sched:
            sched.add_destination("d", adapter)
            sched.add_cohort(cohort("c", members=[]))
            sched.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
            sched.run_due()

        assert [("open", "cohortsync-loop"), ("close", "cohortsync-loop")] == calls

    def test_lone_batches_and_bisection(self) -> None:
        """max_parallel=1 and a bad member: the halves go out as coroutines too."""
        inner = FaultyDestination(caps(batch=40), always=Fault.bad_data(["u017"]))
        with cs.Scheduler(MemoryStorage(), clock=FakeClock(), rate_limits=RateLimits()) as sched:
            sched.add_destination("d", AsyncOf(inner))
            sched.add_cohort(cohort("c"))
            sched.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
            (run,) = sched.run_due()

        assert cs.RunStatus.PARTIAL == run.status
        assert 1 == run.rejected
        assert set(MEMBERS) - {"u017"} == inner.audience("s")


class TestRegistrationAndConfiguration:
    def test_an_async_destination_with_plain_methods_is_refused(self) -> None:
        """An AsyncDestination whose add is a plain def would block the loop: refused."""

        class Plain(cs.AsyncDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:  # type: ignore[override]
                return cs.DeliveryResult.ok()

            async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        with pytest.raises(ConfigurationError, match="`add` must be `async def`"):
            async_scheduler().add_destination("d", Plain())
        with pytest.raises(ConfigurationError, match="`add` must be `async def`"):
            cs.Scheduler(MemoryStorage()).add_destination("d", Plain())

    def test_a_coroutine_returned_by_a_sync_adapter_fails_with_a_hint(self) -> None:
        """A Destination whose add returns a coroutine (not async def) fails the run, with why."""

        class Sneaky(cs.Destination):
            capabilities = caps()

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                return self._later()  # type: ignore[return-value]

            async def _later(self) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        with cs.Scheduler(MemoryStorage(), clock=FakeClock(), rate_limits=RateLimits()) as sched:
            sched.add_destination("d", Sneaky())
            sched.add_cohort(cohort("c"))
            sched.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
            (run,) = sched.run_due()

        assert cs.RunStatus.FAILED == run.status
        assert "subclass cohortsync.AsyncDestination" in (run.error_message or "")

    @pytest.mark.parametrize("bad", [0, -1, 1_001, 2.5, "10", True])
    def test_max_concurrent_runs_is_validated(self, bad: Any) -> None:
        """A bad max_concurrent_runs is a ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match="max_concurrent_runs"):
            cs.AsyncScheduler(MemoryStorage(), max_concurrent_runs=bad)

    def test_closed_scheduler_refuses_to_run(self) -> None:
        """After aclose, run_due raises StorageClosedError instead of running anything."""

        async def main() -> None:
            scheduler = async_scheduler()
            await scheduler.aclose()
            with pytest.raises(StorageClosedError):
                await scheduler.run_due()
            await scheduler.aclose()  # twice is harmless

        asyncio.run(main())

    def test_run_due_racing_aclose_says_closed(self) -> None:
        """
        run_due calls in flight while aclose() shuts the worker threads down
        raise StorageClosedError; a bare "cannot schedule new futures after
        shutdown" RuntimeError escaped in 13 of 40 of an outsider's tries.
        """
        raised: Counter[str] = Counter()

        async def trial() -> None:
            scheduler = async_scheduler()
            scheduler.add_destination("d", RecordingDestination(caps()))
            scheduler.add_cohort(cohort("c"))
            for i in range(20):
                await scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id=f"s{i}")

            async def loop() -> None:
                try:
                    while True:
                        await scheduler.run_due(limit=1)
                        await scheduler.sync_now("s0")
                except Exception as exc:  # noqa: BLE001 - counted below
                    raised[type(exc).__name__] += 1

            task = asyncio.create_task(loop())
            await asyncio.sleep(0.005)
            await scheduler.aclose()
            await task

        for _ in range(30):
            asyncio.run(trial())
        assert {"StorageClosedError": 30} == dict(raised)

    def test_awaitable_methods_are_the_sync_ones(self) -> None:
        """create_sync, pause_sync, next_run, ... give what the sync scheduler gives."""

        async def main() -> None:
            async with async_scheduler() as scheduler:
                scheduler.add_destination("d", AsyncOf(RecordingDestination(caps())))
                scheduler.add_cohort(cohort("c"))
                sync = await scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
                assert sync == await scheduler.get_sync("s")
                assert scheduler.scheduler.next_run("s") == await scheduler.next_run("s")
                paused = await scheduler.pause_sync("s", reason="maintenance")
                assert cs.SyncStatus.PAUSED == paused.status
                assert [] == await scheduler.run_due()
                with pytest.raises(cs.exceptions.SyncNotFoundError):
                    await scheduler.history("missing")

        asyncio.run(main())

    def test_repr_names_the_bounds(self) -> None:
        """The repr shows the store, the clock and max_concurrent_runs."""
        assert "max_concurrent_runs=7" in repr(
            cs.AsyncScheduler(MemoryStorage(), max_concurrent_runs=7)
        )


class TestFakeClockAsleep:
    def test_asleep_advances_and_yields(self) -> None:
        """Awaiting asleep moves the fake clock and lets other tasks run in between."""
        clock = FakeClock()
        order: list[str] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.asleep(seconds)
            order.append(name)

        async def main() -> None:
            await asyncio.gather(sleeper("a", 5), sleeper("b", 1))

        start = clock.now()
        asyncio.run(main())

        assert timedelta(seconds=6) == clock.now() - start
        assert [5, 1] == clock.slept
        assert ["a", "b"] == order


class TestOutsiderFindings:
    """Regression tests for what an outsider's attack on the asyncio support found."""

    def test_a_cancelled_request_gives_its_rate_limit_place_back(self) -> None:
        """After a cancelled round, the next run to a rate-limited destination still sends."""
        limited = caps(batch=40, rate_limit=cs.RateLimit(requests=1, per_seconds=1.0))
        inner = RecordingDestination(limited)
        limits = RateLimits()

        async def main() -> list[cs.SyncRun]:
            scheduler = cs.AsyncScheduler(
                MemoryStorage(), clock=cs.SystemClock(), rate_limits=limits, seed=0
            )
            scheduler.add_destination("d", AsyncOf(inner, delay=5.0))
            await create(scheduler, 1)
            with pytest.raises(asyncio.TimeoutError):
                await within(0.2, scheduler.run_due())
            # A second scheduler of the process, same destination id, same limiter.
            again = cs.AsyncScheduler(
                MemoryStorage(), clock=cs.SystemClock(), rate_limits=limits, seed=0
            )
            again.add_destination("d", AsyncOf(inner))
            await create(again, 1)
            return await asyncio.wait_for(again.run_due(), 10)

        runs = asyncio.run(main())

        assert [cs.RunStatus.SUCCEEDED] == [run.status for run in runs]

    def test_a_slow_run_does_not_hold_up_a_new_sync(self) -> None:
        """run_forever busy with a slow run: a sync created meanwhile starts at once."""
        started: dict[str, float] = {}
        t0 = time.monotonic()
        slow = AsyncOf(RecordingDestination(caps(batch=1)), delay=0.5)
        fast = AsyncOf(RecordingDestination(caps()))

        async def main() -> None:
            async with async_scheduler(clock=cs.SystemClock()) as scheduler:
                scheduler.add_listener(
                    lambda e: started.setdefault(e.sync_id, time.monotonic() - t0),
                    events=(RunStarted,),
                )
                scheduler.add_destination("slow", slow)
                scheduler.add_destination("fast", fast)
                scheduler.add_cohort(cohort("c", MEMBERS[:8]))
                worker = asyncio.create_task(scheduler.run_forever(idle=30))
                await scheduler.create_sync("c", "slow", cs.SyncPolicy.hourly(), sync_id="long")
                await asyncio.sleep(0.3)
                await scheduler.create_sync("c", "fast", cs.SyncPolicy.hourly(), sync_id="quick")
                for _ in range(200):
                    if "quick" in started:
                        break
                    await asyncio.sleep(0.01)
                worker.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await worker

        asyncio.run(main())

        assert started["quick"] < 1.5  # the slow run takes 4 s

    @pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
    def test_an_interrupt_in_an_async_adapter_reaches_the_sync_caller(
        self, interrupt: type[BaseException]
    ) -> None:
        """Raised in the loop thread it would kill the loop: it is raised by run_due instead."""

        class Interrupting(cs.AsyncDestination):
            capabilities = caps()

            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                raise interrupt

            async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        scheduler = cs.Scheduler(MemoryStorage(), clock=FakeClock(), rate_limits=RateLimits())
        scheduler.add_destination("d", Interrupting())
        scheduler.add_cohort(cohort("c"))
        scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
        with pytest.raises(interrupt):
            scheduler.run_due()
        scheduler.close()

        assert "cohortsync-loop" not in {t.name for t in threading.enumerate()}

    def test_cancelled_error_from_the_adapter_itself_is_a_failed_request(self) -> None:
        """A client's own CancelledError is retried as transient, then recorded: never silent."""

        class SelfCancelling(cs.AsyncDestination):
            capabilities = caps()
            calls = 0

            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                SelfCancelling.calls += 1
                raise asyncio.CancelledError

            async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        async def main() -> list[cs.SyncRun]:
            async with async_scheduler() as scheduler:
                scheduler.add_destination("d", SelfCancelling())
                scheduler.add_cohort(cohort("c"))
                await scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
                return await scheduler.run_due()

        (run,) = asyncio.run(main())

        assert cs.RunStatus.FAILED == run.status
        assert "TransientError" == run.error_type
        assert "CancelledError" in (run.error_message or "")
        assert 9 == SelfCancelling.calls  # the first try and 8 retries

    def test_run_due_with_limit_zero_runs_nothing(self) -> None:
        """limit=0 is an empty round, as for the synchronous scheduler."""

        async def main() -> list[cs.SyncRun]:
            async with async_scheduler() as scheduler:
                scheduler.add_destination("d", AsyncOf(RecordingDestination(caps())))
                await create(scheduler, 1)
                return await scheduler.run_due(limit=0)

        assert [] == asyncio.run(main())

    def test_bad_arguments_are_configuration_errors_in_both_worlds(self) -> None:
        """A policy that is not a SyncPolicy, a negative or string limit: ConfigurationError."""

        async def main() -> None:
            async with async_scheduler() as scheduler:
                scheduler.add_destination("d", AsyncOf(RecordingDestination(caps())))
                await create(scheduler, 1)
                with pytest.raises(ConfigurationError, match="policy"):
                    await scheduler.update_sync("s0", "daily")  # type: ignore[arg-type]
                for bad in (-5, "3"):
                    with pytest.raises(ConfigurationError, match="limit"):
                        await scheduler.history("s0", limit=bad)  # type: ignore[arg-type]

        asyncio.run(main())

    @pytest.mark.parametrize("idle", [0, -1.0, float("nan"), float("inf"), "30"])
    def test_run_forever_refuses_a_bad_idle(self, idle: Any) -> None:
        """idle 0, negative, NaN or not a number would spin: ConfigurationError, both worlds."""

        async def main() -> None:
            async with async_scheduler() as scheduler:
                with pytest.raises(ConfigurationError, match="idle"):
                    await scheduler.run_forever(idle=idle)

        asyncio.run(main())
        with pytest.raises(ConfigurationError, match="idle"):
            cs.Scheduler(MemoryStorage()).run_forever(idle=idle)

    def test_a_failed_poll_lets_the_runs_in_progress_finish(self) -> None:
        """The store fails run_forever's poll mid-run: the run still completes, then it raises."""
        failing = threading.Event()

        class PollFails(MemoryStorage):
            def next_due(self) -> Any:
                if failing.is_set():
                    raise cs.exceptions.StorageError("the poll failed")
                return super().next_due()

        storage = PollFails()
        adapter = AsyncOf(RecordingDestination(caps(batch=10)), delay=0.1)

        async def main() -> None:
            scheduler = async_scheduler(storage, clock=cs.SystemClock())
            scheduler.add_destination("d", adapter)
            await create(scheduler, 1)
            worker = asyncio.create_task(scheduler.run_forever(idle=0.05))
            await asyncio.sleep(0.05)  # the run is delivering its 4 batches
            failing.set()
            with pytest.raises(cs.exceptions.StorageError):
                await asyncio.wait_for(worker, 10)

        asyncio.run(main())

        record = storage.get_sync("s0")
        assert record.lease is None
        assert [cs.RunStatus.SUCCEEDED] == [run.status for run in storage.history("s0")]
