"""
Memory the async scheduler's run threads freed goes back to the system: the
throttle, glibc's real trim, and the scheduler's use of it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

import cohortsync as cs
from cohortsync._trim import (
    PROCESS_TRIM,
    RESIDENT_LIMIT,
    MemoryTrim,
    malloc_trim,
    resident_bytes,
)
from cohortsync.destinations import RateLimits
from cohortsync.exceptions import ConfigurationError
from cohortsync.testing import FakeClock, MemoryStorage


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


SMALL = 64 * 1024 * 1024


class TestThrottle:
    def test_trims_at_most_once_per_interval(self) -> None:
        calls: list[float] = []
        ticks = Ticks()
        trim = MemoryTrim(
            every=1.0,
            trim=lambda: lambda: calls.append(ticks.now),
            resident=lambda: SMALL,
            monotonic=ticks,
        )

        assert trim()
        assert not trim()
        ticks.now += 0.999
        assert not trim()
        ticks.now += 0.001
        assert trim()
        ticks.now += 5
        assert trim()
        assert [100.0, 101.0, 106.0] == calls

    def test_looks_for_malloc_trim_once(self) -> None:
        """Where the C library has none, nothing is done, and nothing is looked up again."""
        looked: list[int] = []
        ticks = Ticks()

        def find() -> None:
            looked.append(1)

        trim = MemoryTrim(every=0.0, trim=find, monotonic=ticks)
        assert not trim()
        ticks.now += 1
        assert not trim()
        assert [1] == looked

    def test_a_thread_trimming_does_not_hold_up_the_others(self) -> None:
        inside = threading.Event()
        release = threading.Event()

        def slow() -> None:
            inside.set()
            release.wait(5)

        trim = MemoryTrim(every=0.0, trim=lambda: slow, resident=lambda: SMALL)
        first = threading.Thread(target=trim)
        first.start()
        assert inside.wait(5)
        try:
            assert not trim()  # at once, not after the first one
        finally:
            release.set()
            first.join()
        assert trim()

    def test_a_large_process_is_not_trimmed(self) -> None:
        """
        Above the limit a trim would stall other threads' allocations for
        tens of milliseconds (an outsider's event loop, at 1.3 GB), for a
        few MB: it is skipped, and tried again once the process is smaller.
        """
        calls: list[int] = []
        size = [RESIDENT_LIMIT + 1]
        ticks = Ticks()
        trim = MemoryTrim(
            every=1.0,
            trim=lambda: lambda: calls.append(size[0]),
            resident=lambda: size[0],
            monotonic=ticks,
        )
        assert not trim()
        size[0] = RESIDENT_LIMIT
        assert not trim()  # within the second of the last attempt
        ticks.now += 1
        assert trim()
        size[0] = None  # type: ignore[call-overload]
        ticks.now += 1
        assert not trim()  # unknown: not trimmed
        assert [RESIDENT_LIMIT] == calls
        assert RESIDENT_LIMIT == 128 * 1024 * 1024


@pytest.mark.skipif(resident_bytes() is None, reason="no /proc/self/statm")
def test_reads_the_resident_size() -> None:
    assert abs(resident_bytes() - _rss_kb() * 1024) < 4 * 1024 * 1024  # type: ignore[operator]


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_gives_back_what_a_thread_freed() -> None:
    """
    A thread keeps every 64th of 32,000 blocks of 2 KB: the rest are holes
    in its arena, resident until trimmed. The thread stays alive, so its
    arena does too, as a run thread's does.
    """
    ready = threading.Event()
    done = threading.Event()
    kept: list[bytearray] = []

    def work() -> None:
        blocks = [bytearray(b"x" * 2048) for _ in range(32_000)]
        kept.extend(blocks[::64])
        del blocks
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=work)
    thread.start()
    try:
        assert ready.wait(10)
        before = _rss_kb()
        assert MemoryTrim(every=0.0, limit=2**40)()
        after = _rss_kb()
    finally:
        done.set()
        thread.join()
    assert before - after > 30_000, (before, after)  # of about 62 MB freed
    assert 500 == len(kept)


class Accepts(cs.AsyncDestination):
    capabilities = cs.Capabilities(name="test", max_batch_size=10)

    async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()

    async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()


class Counting:
    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> bool:
        with self.lock:
            self.calls += 1
        return True


@pytest.mark.parametrize("trim_memory", [True, False])
def test_the_async_scheduler_trims_after_each_run_unless_told_not_to(trim_memory: bool) -> None:
    async def main() -> int:
        async with cs.AsyncScheduler(
            MemoryStorage(),
            clock=FakeClock(),
            seed=0,
            rate_limits=RateLimits(),
            max_concurrent_runs=3,
            trim_memory=trim_memory,
        ) as scheduler:
            assert (PROCESS_TRIM if trim_memory else None) is scheduler._trim
            counting = Counting()
            if trim_memory:
                scheduler._trim = counting
            scheduler.add_destination("d", Accepts())
            for i in range(7):
                scheduler.add_cohort(cs.Cohort(id=f"c{i}", name="c", source=lambda: ["a", "b"]))
                await scheduler.create_sync(f"c{i}", "d", cs.SyncPolicy.hourly(), sync_id=f"s{i}")
            runs = await scheduler.run_due()
            assert 7 == len(runs)
            return counting.calls

    assert (7 if trim_memory else 0) == asyncio.run(main())


@pytest.mark.parametrize("value", ["no", 0, None])
def test_trim_memory_must_be_a_bool(value: object) -> None:
    """A truthy string must not switch trimming on (or a falsy one off) unnoticed."""
    with pytest.raises(ConfigurationError, match="trim_memory"):
        cs.AsyncScheduler(MemoryStorage(), trim_memory=value)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_during_a_trim_can_trim() -> None:
    """The process's trim lock is new in a child forked while a thread held it."""
    held = PROCESS_TRIM._lock
    assert held.acquire(timeout=5)  # as a thread in the middle of a trim holds it
    try:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            code = 1
            try:
                code = 0 if PROCESS_TRIM._lock.acquire(blocking=False) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        held.release()
    assert 0 == os.waitstatus_to_exitcode(status)
