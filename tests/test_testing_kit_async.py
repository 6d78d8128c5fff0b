"""
The testing kit's asynchronous twins, AsyncRecordingDestination and
AsyncFaultyDestination: alone, against their synchronous twins, and driven by
an AsyncScheduler under ``asyncio.run`` on a FakeClock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import pytest

import cohortsync as cs
from cohortsync._delivery import make_batch
from cohortsync._destination import check_destination_kind
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
from cohortsync.testing import (
    AsyncFaultyDestination,
    AsyncRecordingDestination,
    FakeClock,
    Fault,
    FaultKind,
    FaultyDestination,
    MemoryStorage,
    RecordingDestination,
)

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
SYNC = "s1"
MEMBERS = [f"u{i}" for i in range(1, 6)]

CONTEXT = cs.RunContext(
    run_id="run-1",
    sync_id="sync-1",
    generation=1,
    cohort_id="c",
    cohort_name="C",
    computed_at=T0,
    full_sync=False,
)

AnyRecording = RecordingDestination | AsyncRecordingDestination
AnyFaulty = FaultyDestination | AsyncFaultyDestination


def batch_of(
    users: Iterable[str],
    operation: cs.Operation = cs.Operation.ADD,
    context: cs.RunContext = CONTEXT,
) -> cs.Batch:
    members = [cs.Member(u, cs.Identifier(cs.IdentifierKind.USER_ID, u)) for u in users]
    return make_batch(context, operation, members, 0)


def call(dest: AnyRecording, batch: cs.Batch) -> cs.DeliveryResult:
    """
    One ``add`` (or ``remove``, for a removal batch) of either kind, from a plain test.
    """
    method = dest.remove if batch.operation is cs.Operation.REMOVE else dest.add
    result = method(batch)
    if isinstance(result, cs.DeliveryResult):
        return result
    return asyncio.run(result)


def answer(dest: AnyRecording, batch: cs.Batch) -> object:
    """
    What one call gives: its result, or the error it raised as comparable values.
    """
    try:
        return call(dest, batch)
    except DeliveryError as e:
        return type(e), str(e), getattr(e, "retry_after", None)


def outcomes(dest: AnyRecording) -> list[tuple[str, tuple[str, ...]]]:
    return [(b.outcome, b.identifiers) for b in dest.batches]


# -- the twins on their own ------------------------------------------------------


class TestAsyncRecordingDestination:
    def test_records_what_the_sync_twin_records(self) -> None:
        """The same calls leave the same batches, keys, audiences and re-sent keys."""
        first = batch_of(["a", "b", "c"])
        calls = [
            first,
            batch_of(["d"], context=attrs.evolve(CONTEXT, sync_id="sync-2")),
            first,
            batch_of(["b"], cs.Operation.REMOVE),
        ]
        sync, twin = RecordingDestination(), AsyncRecordingDestination()

        for batch in calls:
            assert call(sync, batch) == call(twin, batch)

        assert sync.batches == twin.batches
        assert {"a", "c"} == twin.audience("sync-1") == sync.audience("sync-1")
        assert {"d"} == twin.audience("sync-2")
        assert [first.idempotency_key] == twin.resent_keys() == sync.resent_keys()
        assert [calls[3].idempotency_key] == [
            b.idempotency_key for b in twin.calls(cs.Operation.REMOVE)
        ]
        with pytest.raises(ValueError, match="pass sync_id"):
            _ = twin.members

    def test_catalog_preset(self) -> None:
        """A catalog key gives the twin that preset's capabilities, as for the sync one."""
        assert catalog.BRAZE == AsyncRecordingDestination("braze").capabilities

    def test_is_an_async_destination(self) -> None:
        """The twin is an AsyncDestination whose every method is a coroutine function."""
        twin = AsyncRecordingDestination()

        check_destination_kind(twin)  # raises for a plain method

        assert isinstance(twin, cs.AsyncDestination)
        assert "<AsyncRecordingDestination 'Recording' batches=0>" == repr(twin)


class TestLatency:
    @pytest.mark.parametrize("kind", [RecordingDestination, FaultyDestination])
    def test_sync_twin_sleeps_on_its_clock(self, kind: type[RecordingDestination]) -> None:
        """Each call of a synchronous destination with latency sleeps it on the clock."""
        clock = FakeClock(T0)
        dest = kind(latency=0.25, clock=clock)

        dest.add(batch_of(["a"]))
        dest.remove(batch_of(["a"], cs.Operation.REMOVE))

        assert [0.25, 0.25] == clock.slept
        assert T0 + timedelta(seconds=0.5) == clock.now()

    @pytest.mark.parametrize("kind", [AsyncRecordingDestination, AsyncFaultyDestination])
    def test_async_twin_awaits_it_on_its_clock(self, kind: type[AsyncRecordingDestination]) -> None:
        """Each call of an asynchronous destination with latency awaits it on the clock."""
        clock = FakeClock(T0)
        dest = kind(latency=0.25, clock=clock)

        async def calls() -> None:
            await dest.add(batch_of(["a"]))
            await dest.remove(batch_of(["a"], cs.Operation.REMOVE))

        asyncio.run(calls())

        assert [0.25, 0.25] == clock.slept
        assert T0 + timedelta(seconds=0.5) == clock.now()

    def test_async_latency_lets_other_tasks_run(self) -> None:
        """While a request waits out its latency, the loop runs other tasks."""
        clock = FakeClock(T0)
        dest = AsyncRecordingDestination(latency=1.0, clock=clock)
        order: list[str] = []

        async def request() -> None:
            await dest.add(batch_of(["a"]))
            order.append("answered")

        async def other() -> None:
            order.append("other task")

        async def main() -> None:
            await asyncio.gather(request(), other())

        asyncio.run(main())

        assert ["other task", "answered"] == order

    def test_no_latency_no_sleep(self) -> None:
        """Without latency the clock is never slept on, so slept shows only the engine's waits."""
        clock = FakeClock(T0)

        RecordingDestination(clock=clock).add(batch_of(["a"]))
        asyncio.run(AsyncRecordingDestination(clock=clock).add(batch_of(["a"])))

        assert [] == clock.slept

    @pytest.mark.parametrize(
        "kind",
        [
            RecordingDestination,
            FaultyDestination,
            AsyncRecordingDestination,
            AsyncFaultyDestination,
        ],
    )
    @pytest.mark.parametrize(
        ("latency", "message"),
        [(-1.0, ">= 0"), (float("nan"), "finite"), (float("inf"), "finite"), ("1", "number")],
    )
    def test_bad_latency_refused(self, kind: Any, latency: object, message: str) -> None:
        """Negative, NaN, infinite or non-numeric latency is a ConfigurationError."""
        with pytest.raises(ConfigurationError, match=message) as caught:
            kind(latency=latency)

        assert "latency" == caught.value.field


RAISING_FAULTS = [
    (Fault.timeout(), TransientError, None),
    (Fault.server_error(retry_after=5.0), TransientError, 5.0),
    (Fault.rate_limited(retry_after=2.0), RateLimitedError, 2.0),
    (Fault.auth(), AuthenticationError, None),
    (Fault.permanent(), PermanentError, None),
    (Fault.bad_data(["b"]), BadDataError, None),
]


class TestAsyncFaultyDestination:
    @pytest.mark.parametrize(
        ("fault", "error", "retry_after"),
        RAISING_FAULTS,
        ids=[f.kind.value for f, _, _ in RAISING_FAULTS],
    )
    def test_raising_fault_at_chosen_call(
        self, fault: Fault, error: type[DeliveryError], retry_after: float | None
    ) -> None:
        """A scripted fault hits exactly the chosen call, with the library's error."""
        dest = AsyncFaultyDestination(script={1: fault})

        call(dest, batch_of(["a"]))
        with pytest.raises(error) as caught:
            call(dest, batch_of(["b"]))
        call(dest, batch_of(["c"]))

        assert error is type(caught.value)
        assert retry_after == getattr(caught.value, "retry_after", None)
        assert [(1, fault.kind)] == dest.faults_injected
        assert {"a", "c"} == dest.members
        assert ["ok", error.__name__, "ok"] == [b.outcome for b in dest.batches]

    def test_same_script_same_answers_as_the_sync_twin(self) -> None:
        """
        Seeded random faults, rejections and drops: call by call, both kinds
        inject the same faults, answer the same and keep the same audience.
        """

        def play(dest: AnyFaulty) -> list[object]:
            return [answer(dest, batch_of([f"u{i}", f"v{i}", f"w{i}"])) for i in range(80)]

        faults = {
            Fault.timeout(): 0.1,
            Fault.rate_limited(retry_after=3.0): 0.1,
            Fault.reject(0.5, reason="unknown user"): 0.2,
            Fault.drop(0.5): 0.1,
        }
        script = {3: Fault.auth(), 4: Fault.bad_data(["u4"])}
        sync = FaultyDestination(script=script, random_faults=faults, seed=11)
        twin = AsyncFaultyDestination(script=script, random_faults=faults, seed=11)

        assert play(sync) == play(twin)
        assert sync.faults_injected == twin.faults_injected
        assert set(FaultKind) - {FaultKind.SERVER_ERROR, FaultKind.PERMANENT} == {
            kind for _, kind in twin.faults_injected
        }
        assert outcomes(sync) == outcomes(twin)
        assert sync.members == twin.members

    def test_script_is_read_and_assigned_through(self) -> None:
        """script, always and random_faults can be changed between calls; counts are read-only."""
        dest = AsyncFaultyDestination(random_faults={Fault.timeout(): 1.0})

        with pytest.raises(TransientError):
            call(dest, batch_of(["a"]))
        dest.random_faults = {}
        dest.script[dest.call_count] = Fault.permanent()
        with pytest.raises(PermanentError):
            call(dest, batch_of(["a"]))
        dest.always = Fault.drop()
        call(dest, batch_of(["a"]))

        assert 3 == dest.call_count
        assert [FaultKind.TIMEOUT, FaultKind.PERMANENT, FaultKind.DROP] == [
            kind for _, kind in dest.faults_injected
        ]
        with pytest.raises(AttributeError, match="read-only"):
            dest.call_count = 0  # type: ignore[misc]


# -- driven by a scheduler ---------------------------------------------------------


CAPS = cs.Capabilities(name="Twin", max_batch_size=2)


def cohort(members: Iterable[str] = MEMBERS) -> cs.Cohort:
    keys = set(members)
    return cs.Cohort(id="c", name="C", source=lambda: set(keys))


def sync_world(
    dest: AnyRecording, clock: FakeClock, members: Iterable[str] = MEMBERS
) -> cs.SyncRun:
    """
    One one-time run of *dest* through a synchronous Scheduler (an async
    destination's requests go through its loop thread).
    """
    with cs.Scheduler(MemoryStorage(), clock=clock, seed=0) as scheduler:
        scheduler.add_destination("d", dest)
        scheduler.add_cohort(cohort(members))
        scheduler.create_sync("c", "d", cs.SyncPolicy.one_time(), sync_id=SYNC)
        (run,) = scheduler.run_due()
        return run


async def async_world(
    dest: AnyRecording, clock: FakeClock, members: Iterable[str] = MEMBERS
) -> cs.SyncRun:
    """
    The same run through an AsyncScheduler, on the running loop.
    """
    async with cs.AsyncScheduler(MemoryStorage(), clock=clock, seed=0) as scheduler:
        scheduler.add_destination("d", dest)
        scheduler.add_cohort(cohort(members))
        await scheduler.create_sync("c", "d", cs.SyncPolicy.one_time(), sync_id=SYNC)
        (run,) = await scheduler.run_due()
        return run


def summary(run: cs.SyncRun) -> tuple[cs.RunStatus, int, int, int]:
    return run.status, run.added, run.rejected, run.retries


class TestDrivenByAnAsyncScheduler:
    def test_backoff_advances_the_fake_clock_as_in_the_sync_world(self) -> None:
        """
        One script of timeouts, a 503 with Retry-After and a 429: the async
        twin under an AsyncScheduler (and under a Scheduler's loop thread)
        waits exactly what the sync one waits under a Scheduler.
        """
        script = {
            0: Fault.timeout(),
            1: Fault.server_error(retry_after=7.0),
            3: Fault.rate_limited(retry_after=30.0),
            4: Fault.timeout(),
        }
        sync_clock, loop_clock, async_clock = FakeClock(T0), FakeClock(T0), FakeClock(T0)
        sync = FaultyDestination(CAPS, script=script)
        loop_thread = AsyncFaultyDestination(CAPS, script=script)
        twin = AsyncFaultyDestination(CAPS, script=script)

        expected = summary(sync_world(sync, sync_clock))
        by_thread = summary(sync_world(loop_thread, loop_clock))
        actual = summary(asyncio.run(async_world(twin, async_clock)))

        assert (cs.RunStatus.SUCCEEDED, 5, 0, 3) == expected == by_thread == actual
        assert 4 == len(sync_clock.slept)
        assert 7.0 <= sync_clock.slept[1]
        assert 30.0 == sync_clock.slept[2]
        assert sync_clock.slept == loop_clock.slept == async_clock.slept
        assert sync_clock.now() == async_clock.now()
        assert outcomes(sync) == outcomes(loop_thread) == outcomes(twin)

    def test_rate_limit_honours_retry_after_for_free(self) -> None:
        """A scripted 429 waits exactly its Retry-After on the fake clock, and is no retry."""
        clock = FakeClock(T0)
        twin = AsyncFaultyDestination(CAPS, script={0: Fault.rate_limited(retry_after=45.0)})

        run = asyncio.run(async_world(twin, clock, ["u1"]))

        assert (cs.RunStatus.SUCCEEDED, 1, 0, 0) == summary(run)
        assert [45.0] == clock.slept
        assert T0 + timedelta(seconds=45) <= clock.now()
        assert ["RateLimitedError", "ok"] == [b.outcome for b in twin.batches]

    def test_bisection_isolates_the_bad_member(self) -> None:
        """A persistent bad-data fault is split down to the one bad member, which is rejected."""
        clock = FakeClock(T0)
        twin = AsyncFaultyDestination(
            cs.Capabilities(max_batch_size=4), always=Fault.bad_data(["u2"])
        )

        run = asyncio.run(async_world(twin, clock, ["u1", "u2", "u3", "u4"]))

        assert (cs.RunStatus.PARTIAL, 3, 1, 0) == summary(run)
        assert {"u1", "u3", "u4"} == twin.audience(SYNC)
        refused = [set(ids) for outcome, ids in outcomes(twin) if outcome == "BadDataError"]
        assert {"u2"} in refused
        assert all("u2" in ids for ids in refused)

    def test_auth_error_pauses_the_sync(self) -> None:
        """A 401 fails the run and pauses the sync; nothing runs until it is resumed."""
        clock = FakeClock(T0)
        twin = AsyncFaultyDestination(CAPS, script={0: Fault.auth()})

        async def scenario() -> tuple[cs.SyncRun, cs.Sync, datetime | None, list[cs.SyncRun]]:
            async with cs.AsyncScheduler(MemoryStorage(), clock=clock, seed=0) as scheduler:
                scheduler.add_destination("d", twin)
                scheduler.add_cohort(cohort())
                await scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id=SYNC)
                (run,) = await scheduler.run_due()
                clock.advance(timedelta(days=1))
                later = await scheduler.run_due()
                return run, await scheduler.get_sync(SYNC), await scheduler.next_run(SYNC), later

        run, sync, next_run, later = asyncio.run(scenario())

        assert (cs.RunStatus.FAILED, "AuthenticationError") == (run.status, run.error_type)
        assert cs.SyncStatus.PAUSED == sync.status
        assert (None, []) == (next_run, later)
        assert set() == twin.audience(SYNC)

    def test_latency_passes_on_the_fake_clock(self) -> None:
        """Each request's latency is awaited on the scheduler's fake clock."""
        clock = FakeClock(T0)
        twin = AsyncRecordingDestination(CAPS, latency=0.5, clock=clock)

        run = asyncio.run(async_world(twin, clock))

        assert (cs.RunStatus.SUCCEEDED, 5, 0, 0) == summary(run)
        assert [0.5, 0.5, 0.5] == clock.slept
        assert set(MEMBERS) == twin.members

    def test_parallel_requests_arrive_in_the_same_order_every_run(self) -> None:
        """
        With up to max_parallel requests in flight and latency on a fake clock,
        the destination sees (and records) the batches in the same order every run.
        """
        caps = cs.Capabilities(name="Parallel", max_batch_size=1, max_parallel=4)
        members = [f"u{i:02d}" for i in range(12)]

        def arrivals() -> list[tuple[str, ...]]:
            clock = FakeClock(T0)
            twin = AsyncRecordingDestination(caps, latency=1.0, clock=clock)
            asyncio.run(async_world(twin, clock, members))
            assert [1.0] * 12 == clock.slept
            return [b.identifiers for b in twin.batches]

        first = arrivals()

        assert sorted(first) == [(m,) for m in members]
        assert [first] * 5 == [arrivals() for _ in range(5)]


class TestSchedulerLoopThread:
    def test_close_stops_the_loop_thread(self) -> None:
        """A Scheduler that ran the async twin leaves no event loop thread once closed."""
        before = {t for t in threading.enumerate() if t.name == "cohortsync-loop"}

        sync_world(AsyncRecordingDestination(), FakeClock(T0))

        after = {t for t in threading.enumerate() if t.name == "cohortsync-loop"}
        assert set() == after - before
