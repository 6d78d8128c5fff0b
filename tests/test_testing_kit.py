"""
The testing kit hosts use: fake clocks, recording and faulty destinations,
simulate(), the destination contract suite and the opt-in pytest plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest

import cohortsync as cs
from cohortsync._delivery import make_batch
from cohortsync.destinations import (
    CsvDirectoryDestination,
    HttpResponse,
    WebhookDestination,
    catalog,
)
from cohortsync.events import RunFinished
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
    ErrorCase,
    FakeClock,
    Fault,
    FaultKind,
    FaultyDestination,
    MemoryStorage,
    RecordingDestination,
    SharedFakeClock,
    check_destination,
    simulate,
)

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
WEEK = timedelta(days=7)
ROOT = Path(__file__).resolve().parent.parent

CONTEXT = cs.RunContext(
    run_id="run-1",
    sync_id="sync-1",
    generation=1,
    cohort_id="c",
    cohort_name="C",
    computed_at=T0,
    full_sync=False,
)


def batch_of(
    users: Iterable[str],
    operation: cs.Operation = cs.Operation.ADD,
    context: cs.RunContext = CONTEXT,
) -> cs.Batch:
    members = [cs.Member(u, cs.Identifier(cs.IdentifierKind.USER_ID, u)) for u in users]
    return make_batch(context, operation, members, 0)


def new_scheduler(clock: FakeClock, destination: cs.Destination | None = None) -> cs.Scheduler:
    scheduler = cs.Scheduler(MemoryStorage(), clock=clock, seed=0)
    scheduler.add_destination("dest", destination or RecordingDestination())
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: {"u1", "u2", "u3"}))
    return scheduler


# -- clocks ---------------------------------------------------------------------


class TestFakeClock:
    def test_starts_aware_utc(self) -> None:
        """The default start is 2030-01-01 00:00 UTC, an aware instant."""
        clock = FakeClock()

        assert T0 == clock.now()
        assert timedelta(0) == clock.now().utcoffset()

    def test_naive_start_refused(self) -> None:
        """A naive start is a TypeError: it means different instants on different hosts."""
        with pytest.raises(TypeError, match="naive"):
            FakeClock(datetime(2030, 1, 1))  # noqa: DTZ001 - the naive value under test

    def test_advance(self) -> None:
        """advance() moves forward by a timedelta or seconds and returns the new instant."""
        clock = FakeClock(T0)

        assert T0 + timedelta(minutes=5) == clock.advance(timedelta(minutes=5))
        assert T0 + timedelta(minutes=5, seconds=30) == clock.advance(30)
        assert T0 + timedelta(minutes=5, seconds=30) == clock.now()

    def test_advance_negative_refused(self) -> None:
        """Advancing by a negative amount raises and leaves the time alone."""
        clock = FakeClock(T0)

        with pytest.raises(ValueError, match="negative"):
            clock.advance(-1)
        assert T0 == clock.now()

    @pytest.mark.parametrize(
        ("by", "message"),
        [
            (float("nan"), "finite"),
            (float("inf"), "finite"),
            (10**20, "more seconds than a timedelta holds"),
            (timedelta(days=999_999_999), "past year 9999"),
            ("10", "timedelta or a number"),
            (True, "timedelta or a number"),
        ],
    )
    def test_advance_bad_amounts(self, by: object, message: str) -> None:
        """NaN, infinity, huge amounts and non-numbers are ConfigurationErrors; time stays."""
        clock = FakeClock(T0)

        with pytest.raises(cs.exceptions.ConfigurationError, match=message):
            clock.advance(by)  # type: ignore[arg-type]
        assert T0 == clock.now()

    def test_set_forward(self) -> None:
        """set() jumps to an aware instant."""
        clock = FakeClock(T0)

        assert T0 + WEEK == clock.set(T0 + WEEK)
        assert T0 + WEEK == clock.now()

    def test_set_backwards_refused_unless_asked(self) -> None:
        """Going back raises unless backwards=True says the test means it."""
        clock = FakeClock(T0 + WEEK)

        with pytest.raises(ValueError, match="backwards=True"):
            clock.set(T0)
        assert T0 + WEEK == clock.now()
        assert T0 == clock.set(T0, backwards=True)
        assert T0 == clock.now()

    def test_set_backwards_must_be_a_bool(self) -> None:
        """backwards="no" is refused, not taken as permission to go back."""
        clock = FakeClock(T0 + WEEK)

        with pytest.raises(ConfigurationError, match="backwards"):
            clock.set(T0, backwards="no")  # type: ignore[arg-type]
        assert T0 + WEEK == clock.now()

    def test_set_naive_refused(self) -> None:
        """set() refuses a naive datetime."""
        with pytest.raises(TypeError, match="naive"):
            FakeClock(T0).set(datetime(2031, 1, 1))  # noqa: DTZ001 - the naive value under test

    def test_sleep_advances_and_records(self) -> None:
        """sleep() advances instead of blocking and remembers each duration."""
        clock = FakeClock(T0)

        clock.sleep(1.5)
        clock.sleep(0)

        assert T0 + timedelta(seconds=1.5) == clock.now()
        assert [1.5, 0] == clock.slept

    def test_repr(self) -> None:
        """The repr shows the current instant."""
        assert "FakeClock(2030-01-01T00:00:00+00:00)" == repr(FakeClock(T0))

    def test_asleep_advances_and_records(self) -> None:
        """asleep() advances like sleep() and lists each duration in slept."""
        clock = FakeClock(T0)

        async def main() -> None:
            await clock.asleep(1.5)
            await clock.asleep(0)
            clock.sleep(2)

        asyncio.run(main())

        assert T0 + timedelta(seconds=3.5) == clock.now()
        assert [1.5, 0, 2] == clock.slept

    def test_asleep_lets_other_tasks_run(self) -> None:
        """asleep() yields to the loop once, as a real wait would: a ready task runs first."""
        clock = FakeClock(T0)
        order: list[str] = []

        async def other() -> None:
            order.append("other task")

        async def main() -> None:
            task = asyncio.create_task(other())
            await clock.asleep(60)
            order.append("after the sleep")
            await task

        asyncio.run(main())

        assert ["other task", "after the sleep"] == order

    def test_two_sleeping_tasks_interleave_the_same_way_every_run(self) -> None:
        """
        Two tasks sleeping on one fake clock take turns in a fixed order, and
        each sleep moves the one clock both read.
        """

        def interleaving() -> list[tuple[str, float]]:
            clock = FakeClock(T0)
            seen: list[tuple[str, float]] = []

            async def sleeper(name: str, seconds: float) -> None:
                for _ in range(3):
                    await clock.asleep(seconds)
                    seen.append((name, (clock.now() - T0).total_seconds()))

            async def main() -> None:
                await asyncio.gather(sleeper("a", 1), sleeper("b", 10))

            asyncio.run(main())
            return seen

        expected = [("a", 11), ("b", 12), ("a", 22), ("b", 23), ("a", 33), ("b", 33)]
        assert [expected] * 5 == [interleaving() for _ in range(5)]


def _shared_clock_worker(path: str, advance_minutes: int, out: Any) -> None:
    clock = SharedFakeClock(path)
    if advance_minutes:
        clock.advance(timedelta(minutes=advance_minutes))
    out.put(clock.now().isoformat())


class TestSharedFakeClock:
    def test_processes_share_one_time(self, tmp_path: Path) -> None:
        """Time moved by one spawned process is seen by another and by the parent."""
        path = str(tmp_path / "clock")
        parent = SharedFakeClock(path, start=T0)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()

        results = []
        for minutes in (90, 0):
            process = ctx.Process(target=_shared_clock_worker, args=(path, minutes, out))
            process.start()
            results.append(out.get(timeout=60))
            process.join(timeout=60)
            assert 0 == process.exitcode

        expected = T0 + timedelta(minutes=90)
        assert [expected.isoformat()] * 2 == results
        assert expected == parent.now()

    def test_existing_file_keeps_its_time(self, tmp_path: Path) -> None:
        """A clock opened without start= joins the time already in the file."""
        SharedFakeClock(tmp_path / "clock", start=T0 + WEEK)

        assert T0 + WEEK == SharedFakeClock(tmp_path / "clock").now()

    def test_joining_with_the_same_start_does_not_move_time_back(self, tmp_path: Path) -> None:
        """
        A process that opens the file later with the same start= leaves the
        time where the others moved it (found by an outsider attack: it reset
        every process's clock to start).
        """
        first = SharedFakeClock(tmp_path / "clock", start=T0)
        first.advance(timedelta(days=5).total_seconds())

        late = SharedFakeClock(tmp_path / "clock", start=T0)

        assert T0 + timedelta(days=5) == late.now() == first.now()
        assert T0 + WEEK == SharedFakeClock(tmp_path / "clock", start=T0 + WEEK).now()

    def test_a_file_that_is_not_a_clock_is_named(self, tmp_path: Path) -> None:
        """Junk in the file is a clear ValueError, not a struct error."""
        (tmp_path / "clock").write_bytes(b"junk")

        with pytest.raises(ValueError, match="not a SharedFakeClock file"):
            SharedFakeClock(tmp_path / "clock").now()

    def test_backwards_refused_unless_asked(self, tmp_path: Path) -> None:
        """The shared clock, too, only goes back when told to."""
        clock = SharedFakeClock(tmp_path / "clock", start=T0 + WEEK)

        with pytest.raises(ValueError, match="backwards"):
            clock.set(T0)
        with pytest.raises(ConfigurationError, match="backwards"):
            clock.set(T0, backwards="no")  # type: ignore[arg-type]
        assert T0 + WEEK == clock.now()
        assert T0 == clock.set(T0, backwards=True)

    def test_asleep_advances_the_shared_time(self, tmp_path: Path) -> None:
        """asleep() moves the time every clock on the file reads, then yields once."""
        clock = SharedFakeClock(tmp_path / "clock", start=T0)
        order: list[str] = []

        async def other() -> None:
            order.append("other task")

        async def main() -> None:
            task = asyncio.create_task(other())
            await clock.asleep(90)
            order.append("after the sleep")
            await task

        asyncio.run(main())

        assert T0 + timedelta(seconds=90) == SharedFakeClock(tmp_path / "clock").now()
        assert ["other task", "after the sleep"] == order

    def test_repr(self, tmp_path: Path) -> None:
        """The repr names the file and the current instant."""
        clock = SharedFakeClock(tmp_path / "clock", start=T0)

        assert repr(clock).endswith("now=2030-01-01T00:00:00+00:00)")


# -- destinations ---------------------------------------------------------------


class TestRecordingDestination:
    def test_membership_per_sync(self, clock: FakeClock) -> None:
        """Each sync's audience is kept apart, and follows the cohort."""
        dest = RecordingDestination()
        scheduler = new_scheduler(clock, dest)
        other = {"v1", "v2"}
        scheduler.add_cohort(cs.Cohort(id="other", name="Other", source=lambda: set(other)))
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s1")
        scheduler.create_sync("other", "dest", cs.SyncPolicy.hourly(), sync_id="s2")

        scheduler.run_due()
        other.discard("v1")
        clock.advance(timedelta(hours=2))
        scheduler.run_due()

        assert {"u1", "u2", "u3"} == dest.audience("s1")
        assert {"v2"} == dest.audience("s2")
        assert set() == dest.audience("never-synced")
        assert ["v1"] == [i for b in dest.calls(cs.Operation.REMOVE) for i in b.identifiers]

    def test_members_needs_a_single_audience(self) -> None:
        """members is the one audience; with several it asks for a sync id."""
        dest = RecordingDestination()
        assert set() == dest.members

        dest.add(batch_of(["a"]))
        assert {"a"} == dest.members

        dest.add(batch_of(["b"], context=attrs.evolve(CONTEXT, sync_id="sync-2")))
        with pytest.raises(ValueError, match="pass sync_id"):
            _ = dest.members

    def test_resent_keys(self, clock: FakeClock) -> None:
        """A batch retried after a timeout is recorded twice under one key."""
        dest = FaultyDestination(script={0: Fault.timeout()})
        scheduler = new_scheduler(clock, dest)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.one_time(), sync_id="s1")

        (run,) = scheduler.run_due()

        assert cs.RunStatus.SUCCEEDED == run.status
        assert 1 == run.retries
        first = dest.batches[0]
        assert ["TransientError", "ok"] == [b.outcome for b in dest.batches]
        assert [first.idempotency_key] == dest.resent_keys()
        assert {"u1", "u2", "u3"} == dest.audience("s1")

    def test_catalog_preset(self) -> None:
        """A catalog key gives the destination that preset's capabilities."""
        dest = RecordingDestination("braze")

        assert catalog.BRAZE == dest.capabilities
        assert 1_000 == dest.capabilities.max_batch_size

    def test_open_and_close_counted(self, clock: FakeClock) -> None:
        """Every run opens and closes the destination once."""
        dest = RecordingDestination()
        scheduler = new_scheduler(clock, dest)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.one_time())

        scheduler.run_due()

        assert (1, 1) == (dest.opened, dest.closed)


RAISING_FAULTS = [
    (Fault.timeout(), TransientError, None),
    (Fault.server_error(retry_after=5.0), TransientError, 5.0),
    (Fault.rate_limited(retry_after=2.0), RateLimitedError, 2.0),
    (Fault.auth(), AuthenticationError, None),
    (Fault.permanent(), PermanentError, None),
    (Fault.bad_data(["b"]), BadDataError, None),
]


class TestFaultyDestination:
    @pytest.mark.parametrize(
        ("make", "field"),
        [
            (lambda: Fault.reject(1.5), "share"),
            (lambda: Fault.reject(-0.1), "share"),
            (lambda: Fault.reject(math.nan), "share"),
            (lambda: Fault.drop(2), "share"),
            (lambda: Fault.server_error(-5), "retry_after"),
            (lambda: Fault.rate_limited(math.nan), "retry_after"),
            (lambda: Fault.rate_limited(math.inf), "retry_after"),
            (lambda: FaultyDestination(script={"0": Fault.timeout()}), "script"),
            (lambda: FaultyDestination(script={-1: Fault.timeout()}), "script"),
            (lambda: FaultyDestination(script={0: "timeout"}), "script[0]"),
            (lambda: FaultyDestination(random_faults={Fault.timeout(): 1.2}), "random_faults"),
        ],
        ids=[
            "reject-1.5",
            "reject-negative",
            "reject-nan",
            "drop-2",
            "retry-after-negative",
            "retry-after-nan",
            "retry-after-inf",
            "script-str-call",
            "script-negative-call",
            "script-not-a-fault",
            "random-over-1",
        ],
    )
    def test_a_fault_that_could_never_happen_is_refused(
        self, make: Callable[[], object], field: str
    ) -> None:
        """
        Arguments that would make a host's test quietly test nothing are
        refused, by name (found by an outsider attack: all were accepted).
        """
        with pytest.raises(ConfigurationError) as info:
            make()

        assert field == info.value.field

    @pytest.mark.parametrize(
        ("fault", "error", "retry_after"),
        RAISING_FAULTS,
        ids=[f.kind.value for f, _, _ in RAISING_FAULTS],
    )
    def test_raising_fault_at_chosen_call(
        self, fault: Fault, error: type[DeliveryError], retry_after: float | None
    ) -> None:
        """A scripted fault hits exactly the chosen call, with the library's error."""
        dest = FaultyDestination(script={1: fault})

        dest.add(batch_of(["a"]))
        with pytest.raises(error) as caught:
            dest.add(batch_of(["b"]))
        dest.add(batch_of(["c"]))

        assert error is type(caught.value)
        assert retry_after == getattr(caught.value, "retry_after", None)
        assert [(1, fault.kind)] == dest.faults_injected
        assert {"a", "c"} == dest.members
        assert ["ok", error.__name__, "ok"] == [b.outcome for b in dest.batches]

    def test_bad_data_only_for_batches_holding_the_bad_members(self) -> None:
        """A persistent bad-data fault refuses only batches that contain a bad identifier."""
        dest = FaultyDestination(always=Fault.bad_data(["bad"]))

        assert cs.DeliveryResult.ok() == dest.add(batch_of(["a", "b"]))
        with pytest.raises(BadDataError):
            dest.add(batch_of(["c", "bad"]))
        assert {"a", "b"} == dest.members

    def test_bad_data_is_isolated_by_the_engine(self, clock: FakeClock) -> None:
        """Through the scheduler, bisection rejects only the bad member."""
        dest = FaultyDestination(always=Fault.bad_data(["u2"]))
        scheduler = new_scheduler(clock, dest)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.one_time(), sync_id="s1")

        (run,) = scheduler.run_due()

        assert (cs.RunStatus.PARTIAL, 2, 1) == (run.status, run.added, run.rejected)
        assert {"u1", "u3"} == dest.audience("s1")

    def test_reject_named_members(self) -> None:
        """A reject fault refuses exactly the named members present and keeps the rest."""
        dest = FaultyDestination(script={0: Fault.reject(identifiers=["b", "zz"], reason="nope")})

        result = dest.add(batch_of(["a", "b", "c"]))

        assert (cs.Rejection("b", "nope"),) == result.rejected
        assert {"a", "c"} == dest.members
        assert "partial" == dest.batches[0].outcome

    def test_reject_share_is_seeded(self) -> None:
        """A share-based rejection picks the same members for the same seed."""
        users = [f"u{i}" for i in range(100)]

        def rejected(seed: int) -> list[str]:
            dest = FaultyDestination(always=Fault.reject(0.3), seed=seed)
            return [r.identifier for r in dest.add(batch_of(users)).rejected]

        assert rejected(1) == rejected(1)
        assert rejected(1) != rejected(2)
        assert 10 < len(rejected(1)) < 50

    def test_drop_reports_success_but_keeps_nothing(self) -> None:
        """A silent drop answers ok and keeps none of the batch."""
        dest = FaultyDestination(script={0: Fault.drop()})

        assert cs.DeliveryResult.ok() == dest.add(batch_of(["a", "b"]))
        assert set() == dest.members
        assert "dropped" == dest.batches[0].outcome

    def test_random_faults_reproducible_with_a_seed(self) -> None:
        """The same seed injects the same faults at the same calls; another seed differs."""

        def injected(seed: int) -> list[tuple[int, FaultKind]]:
            dest = FaultyDestination(
                random_faults={Fault.timeout(): 0.2, Fault.rate_limited(): 0.1}, seed=seed
            )
            for i in range(60):
                with contextlib.suppress(TransientError):
                    dest.add(batch_of([f"u{i}"]))
            return dest.faults_injected

        first = injected(7)
        assert first == injected(7)
        assert first != injected(8)
        assert {FaultKind.TIMEOUT, FaultKind.RATE_LIMITED} == {kind for _, kind in first}

    def test_engine_converges_through_random_faults(self, clock: FakeClock) -> None:
        """With seeded timeouts and 429s, hourly runs still deliver the cohort."""
        dest = FaultyDestination(
            random_faults={Fault.timeout(): 0.3, Fault.rate_limited(retry_after=3.0): 0.2},
            seed=3,
        )
        scheduler = new_scheduler(clock, dest)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s1")

        runs = simulate(scheduler, span=timedelta(hours=3))

        assert {"u1", "u2", "u3"} == dest.audience("s1")
        assert dest.faults_injected
        assert all(r.status is cs.RunStatus.SUCCEEDED for r in runs)


# -- simulate -------------------------------------------------------------------


def _sync_counts(runs: Iterable[cs.SyncRun]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.sync_id] = counts.get(run.sync_id, 0) + 1
    return counts


class TestSimulate:
    @pytest.mark.reliability
    def test_week_of_mixed_syncs(self, clock: FakeClock) -> None:
        """Over a week: hourly 1 + 168, daily 1 + 7, one-time 1, real-time 1 + 10,080."""
        scheduler = new_scheduler(clock)
        expected: dict[str, int] = {}
        for i in range(9):
            scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id=f"hourly-{i}")
            expected[f"hourly-{i}"] = 1 + 7 * 24
        for i in range(9):
            scheduler.create_sync("c", "dest", cs.SyncPolicy.daily(), sync_id=f"daily-{i}")
            expected[f"daily-{i}"] = 1 + 7
        scheduler.create_sync("c", "dest", cs.SyncPolicy.one_time(), sync_id="once")
        expected["once"] = 1
        scheduler.create_sync("c", "dest", cs.SyncPolicy.realtime(), sync_id="live")
        expected["live"] = 1 + 7 * 24 * 60

        runs = simulate(scheduler, span=WEEK)

        assert expected == _sync_counts(runs)
        assert T0 + WEEK == clock.now()
        assert cs.SyncStatus.COMPLETED == scheduler.get_sync("once").status
        assert all(r.status is cs.RunStatus.SUCCEEDED for r in runs)

    def test_runs_start_when_due_in_order(self, clock: FakeClock) -> None:
        """Every run starts exactly at its slot, and runs come back in time order."""
        scheduler = new_scheduler(clock)
        for i in range(5):
            scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id=f"h{i}")
        scheduler.create_sync("c", "dest", cs.SyncPolicy.daily(), sync_id="d")

        runs = simulate(scheduler, span=timedelta(days=2))

        assert [] == [r for r in runs if r.started_at != r.slot]
        assert sorted(runs, key=lambda r: r.started_at) == runs

    def test_matches_upcoming(self, clock: FakeClock) -> None:
        """The runs simulated are the ones upcoming() announced."""
        scheduler = new_scheduler(clock)
        for i in range(3):
            scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id=f"h{i}")
        announced = [(u.sync_id, u.at) for u in scheduler.upcoming(T0 + timedelta(hours=6))]

        runs = simulate(scheduler, until=T0 + timedelta(hours=6))

        assert sorted(announced) == sorted((r.sync_id, r.slot) for r in runs)

    def test_until_is_inclusive(self, clock: FakeClock) -> None:
        """A run due exactly at until= happens."""
        scheduler = new_scheduler(clock)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="h")
        scheduler.run_due()
        second = scheduler.next_run("h")
        assert second is not None

        runs = simulate(scheduler, until=second)

        assert [second] == [r.slot for r in runs]
        assert second == clock.now()

    def test_empty_span_runs_what_is_due_now(self, clock: FakeClock) -> None:
        """span=0 runs what is due at the current instant and nothing else."""
        scheduler = new_scheduler(clock)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="h")

        assert ["h"] == [r.sync_id for r in simulate(scheduler, span=timedelta(0))]
        assert T0 == clock.now()

    def test_nothing_to_run(self, clock: FakeClock) -> None:
        """With no syncs, the clock still reaches the end."""
        assert [] == simulate(new_scheduler(clock), span=timedelta(days=1))
        assert T0 + timedelta(days=1) == clock.now()

    @pytest.mark.parametrize(
        ("step", "first_run"),
        [
            (timedelta(minutes=1), T0 + timedelta(minutes=11)),
            (timedelta(seconds=10), T0 + timedelta(minutes=10, seconds=10)),
        ],
    )
    def test_step_bounds_how_late_a_freed_sync_runs(
        self, clock: FakeClock, step: timedelta, first_run: datetime
    ) -> None:
        """A sync held by a crashed worker's lease runs within one step after the lease expires."""
        scheduler = new_scheduler(clock)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.one_time(), sync_id="once")
        (_crashed,) = scheduler.storage.claim_due(T0, "crashed-worker", timedelta(minutes=10), 1)

        runs = simulate(scheduler, span=timedelta(hours=1), step=step)

        assert [first_run] == [r.started_at for r in runs]

    def test_sees_syncs_created_during_a_run(self, clock: FakeClock) -> None:
        """A sync created by a listener mid-simulation runs at once and then on schedule."""
        scheduler = new_scheduler(clock)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="first")

        def on_event(event: object) -> None:
            if isinstance(event, RunFinished) and "second" not in {s.id for s in scheduler.syncs()}:
                scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="second")

        scheduler.add_listener(on_event)

        runs = simulate(scheduler, span=timedelta(hours=2))

        assert {"first": 3, "second": 3} == _sync_counts(runs)
        assert T0 == next(r.started_at for r in runs if r.sync_id == "second")

    def test_backoff_sleeps_pass_on_the_same_clock(self, clock: FakeClock) -> None:
        """Time a run spends waiting out a 429 passes on the simulated clock."""
        dest = FaultyDestination(script={0: Fault.rate_limited(retry_after=90.0)})
        scheduler = new_scheduler(clock, dest)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.one_time(), sync_id="once")

        (run,) = simulate(scheduler, span=timedelta(hours=1))

        assert T0 + timedelta(seconds=90) == run.finished_at
        assert [90.0] == clock.slept

    def test_needs_a_fake_clock(self) -> None:
        """A scheduler on the system clock cannot be simulated."""
        scheduler = cs.Scheduler(MemoryStorage(), clock=cs.SystemClock())

        with pytest.raises(TypeError, match="FakeClock"):
            simulate(scheduler, span=WEEK)

    def test_shared_fake_clock_accepted(self, tmp_path: Path) -> None:
        """A SharedFakeClock can drive a simulation too."""
        clock = SharedFakeClock(tmp_path / "clock", start=T0)
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock, seed=0)
        scheduler.add_destination("dest", RecordingDestination())
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: {"u1"}))
        scheduler.create_sync("c", "dest", cs.SyncPolicy.daily(), sync_id="d")

        runs = simulate(scheduler, span=timedelta(days=2), step=timedelta(hours=6))

        assert 3 == len(runs)
        assert T0 + timedelta(days=2) == clock.now()

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({}, ValueError, "exactly one"),
            ({"until": T0 + WEEK, "span": WEEK}, ValueError, "exactly one"),
            ({"until": T0 - WEEK}, ValueError, "before the clock"),
            ({"until": datetime(2030, 2, 1)}, TypeError, "naive"),  # noqa: DTZ001 - under test
            ({"span": -WEEK}, ValueError, "non-negative"),
            ({"span": WEEK, "step": timedelta(0)}, ValueError, "positive"),
        ],
    )
    def test_bad_arguments(
        self, clock: FakeClock, kwargs: dict[str, Any], error: type[Exception], match: str
    ) -> None:
        """Bad spans and steps are refused before anything runs."""
        scheduler = new_scheduler(clock)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.one_time(), sync_id="once")

        with pytest.raises(error, match=match):
            simulate(scheduler, **kwargs)
        assert T0 == clock.now()
        assert [] == scheduler.history("once")


# -- the destination contract -----------------------------------------------------


@attrs.define
class FakeWebhookReceiver:
    """
    An ``HttpTransport`` that records each POST and answers like a receiver
    that de-duplicates on ``message_id``; failures and rejections are scripted.
    """

    requests: list[dict[str, Any]] = attrs.Factory(list)
    audiences: dict[str, list[str]] = attrs.Factory(dict)
    scripted: list[HttpResponse] = attrs.Factory(list)
    refuse: set[str] = attrs.Factory(set)
    raise_next: Exception | None = None
    _seen: set[str] = attrs.Factory(set)

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        message = json.loads(body)
        self.requests.append(message)
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            raise error
        if self.scripted:
            return self.scripted.pop(0)
        refused = sorted(self.refuse)  # named even when not in this message, like some APIs
        self.refuse = set()
        if message["message_id"] not in self._seen:
            self._seen.add(message["message_id"])
            audience = self.audiences.setdefault(message["cohort_id"], [])
            for user in message["users"]:
                if user in refused:
                    continue
                if message["in_cohort"] and user not in audience:
                    audience.append(user)
                elif not message["in_cohort"] and user in audience:
                    audience.remove(user)
        body_out = json.dumps(
            {"rejected": [{"user": u, "reason": "unknown user"} for u in refused]}
        )
        return HttpResponse(200, {}, body_out.encode())


def receiver_of(dest: WebhookDestination) -> FakeWebhookReceiver:
    receiver = dest._transport
    assert isinstance(receiver, FakeWebhookReceiver)
    return receiver


def make_webhook(batch_size: int = 50) -> WebhookDestination:
    return WebhookDestination(
        "https://hooks.example.com/cohorts",
        headers={"Authorization": "Bearer t0ken"},
        batch_size=batch_size,
        transport=FakeWebhookReceiver(),
        clock=FakeClock(T0),
    )


def answer(status: int, headers: Mapping[str, str] | None = None) -> Callable[[Any], None]:
    def setup(dest: WebhookDestination) -> None:
        receiver_of(dest).scripted.append(HttpResponse(status, headers or {}))

    return setup


def webhook_requests(dest: WebhookDestination) -> list[int]:
    return [len(message["users"]) for message in receiver_of(dest).requests]


def webhook_audience(dest: WebhookDestination, context: cs.RunContext) -> list[str]:
    return receiver_of(dest).audiences.get(context.cohort_id, [])


def webhook_reject(dest: WebhookDestination, identifiers: Collection[str]) -> None:
    receiver_of(dest).refuse = set(identifiers)


def timing_out(dest: WebhookDestination) -> None:
    receiver_of(dest).raise_next = TimeoutError("timed out")


WEBHOOK_ERRORS: Mapping[str, ErrorCase[WebhookDestination]] = {
    "HTTP 500": ErrorCase(TransientError, answer(500)),
    "HTTP 503 with Retry-After": ErrorCase(TransientError, answer(503, {"Retry-After": "30"})),
    "HTTP 429": ErrorCase(RateLimitedError, answer(429, {"Retry-After": "5"})),
    "HTTP 401": ErrorCase(AuthenticationError, answer(401)),
    "HTTP 403": ErrorCase(AuthenticationError, answer(403)),
    "HTTP 400": ErrorCase(BadDataError, answer(400)),
    "HTTP 404": ErrorCase(PermanentError, answer(404)),
    "socket timeout": ErrorCase(TransientError, timing_out),
}


def recording_reject(dest: FaultyDestination, identifiers: Collection[str]) -> None:
    dest.script[dest.call_count] = Fault.reject(identifiers=identifiers)


def scripted(fault: Fault) -> Callable[[FaultyDestination], None]:
    def setup(dest: FaultyDestination) -> None:
        dest.script[dest.call_count] = fault

    return setup


def recording_requests(dest: RecordingDestination) -> list[int]:
    return [len(b.identifiers) for b in dest.batches]


def recording_audience(dest: RecordingDestination, context: cs.RunContext) -> set[str]:
    return dest.audience(context.sync_id)


class TestCheckDestinationOnOurAdapters:
    def test_recording_destination(self) -> None:
        """RecordingDestination (as FaultyDestination for the failures) passes every check."""
        report = check_destination(
            FaultyDestination,
            observe=recording_requests,
            remote_members=recording_audience,
            errors={
                "timeout": ErrorCase(TransientError, scripted(Fault.timeout())),
                "429": ErrorCase(RateLimitedError, scripted(Fault.rate_limited())),
                "401": ErrorCase(AuthenticationError, scripted(Fault.auth())),
                "404": ErrorCase(PermanentError, scripted(Fault.permanent())),
            },
            reject=recording_reject,
        )

        assert {} == dict(report.skipped)
        assert "rejections" in report.passed

    def test_recording_destination_with_a_catalog_preset(self) -> None:
        """With Marketo's batch of 300, full batches and requests are checked at 300."""
        report = check_destination(
            lambda: RecordingDestination("marketo"),
            observe=recording_requests,
            remote_members=recording_audience,
        )

        assert ("empty_run", "batch_size", "idempotency") == report.passed
        assert {"error_mapping", "rejections"} == set(report.skipped)

    def test_webhook_destination(self) -> None:
        """WebhookDestination over a fake transport passes every check."""
        report = check_destination(
            make_webhook,
            observe=webhook_requests,
            remote_members=webhook_audience,
            errors=WEBHOOK_ERRORS,
            reject=webhook_reject,
        )

        assert {} == dict(report.skipped)
        assert len(WEBHOOK_ERRORS) + 4 == len(report.passed)
        assert "WebhookDestination('https://hooks.example.com/cohorts')" == report.destination

    def test_csv_directory_destination(self, tmp_path: Path) -> None:
        """CsvDirectoryDestination passes where the checks apply (it makes no requests)."""
        made: list[Path] = []

        def make() -> CsvDirectoryDestination:
            made.append(tmp_path / f"out-{len(made)}")
            return CsvDirectoryDestination(made[-1])

        def published(dest: CsvDirectoryDestination, context: cs.RunContext) -> list[str]:
            files = dest.read_latest(context.sync_id)
            return files["entering"] + files["existing"]

        def blocked(dest: CsvDirectoryDestination) -> None:
            dest.directory.mkdir(parents=True)
            (dest.directory / "contract-sync").write_text("not a directory")

        report = check_destination(
            make,
            remote_members=published,
            errors={"sync directory blocked": ErrorCase(TransientError, blocked)},
        )

        assert ("batch_size.requests", "rejections") == tuple(report.skipped)
        assert "idempotency" in report.passed


# Adapters with the bugs the suite exists to catch, over one fake API.


@attrs.define
class PushApi:
    """
    A fake push-notification API: audiences of users, de-duplicated by request key.
    """

    requests: list[list[str]] = attrs.Factory(list)
    audience: list[str] = attrs.Factory(list)
    fail_with: int | None = None
    refuse: set[str] = attrs.Factory(set)
    keys: set[str] = attrs.Factory(set)

    def send(self, users: list[str], *, add: bool, key: str | None) -> tuple[int, list[str]]:
        self.requests.append(list(users))
        if self.fail_with is not None:
            return self.fail_with, []
        if key is not None and key in self.keys:
            return 200, []
        if key is not None:
            self.keys.add(key)
        for user in users:
            if user in self.refuse:
                continue
            if add:
                self.audience.append(user)
            elif user in self.audience:
                self.audience.remove(user)
        return 200, sorted(self.refuse)


class PushAdapter(cs.Destination):
    """
    A correct adapter: one request per batch, statuses mapped, refused users reported.
    """

    capabilities: ClassVar[cs.Capabilities] = cs.Capabilities(max_batch_size=100)

    def __init__(self) -> None:
        self.api = PushApi()

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self.send(batch.identifiers, add=True, key=batch.idempotency_key, batch=batch)

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self.send(batch.identifiers, add=False, key=batch.idempotency_key, batch=batch)

    def send(
        self, users: list[str], *, add: bool, key: str | None, batch: cs.Batch
    ) -> cs.DeliveryResult:
        status, refused = self.api.send(users, add=add, key=key)
        if status == 429:
            raise RateLimitedError("429")
        if status >= 500:
            raise TransientError(f"HTTP {status}")
        return cs.DeliveryResult.partial(self.rejections(refused, batch))

    def rejections(self, refused: list[str], batch: cs.Batch) -> list[cs.Rejection]:
        sent = set(batch.identifiers)
        return [cs.Rejection(u, "refused") for u in refused if u in sent]


class PostsOneAndAHalfBatches(PushAdapter):
    """Declares 100 per request but buffers and posts 150 at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer: list[str] = []

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.buffer.extend(batch.identifiers)
        while len(self.buffer) >= 150:
            self.api.send(self.buffer[:150], add=True, key=None)
            del self.buffer[:150]
        return cs.DeliveryResult.ok()

    def close(self, context: cs.RunContext, *, succeeded: bool) -> None:
        if self.buffer:
            self.api.send(self.buffer, add=True, key=None)
            self.buffer = []


class SendsBatchesInPairs(PushAdapter):
    """Saves a request by sending every second batch together with the one before."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[str] = []

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        if not self.pending:
            self.pending = batch.identifiers
            return cs.DeliveryResult.ok()
        users, self.pending = self.pending + batch.identifiers, []
        self.api.send(users, add=True, key=None)
        return cs.DeliveryResult.ok()

    def close(self, context: cs.RunContext, *, succeeded: bool) -> None:
        if self.pending:
            self.api.send(self.pending, add=True, key=None)
            self.pending = []


class RaisesRuntimeErrorOn500(PushAdapter):
    """Lets a server error escape as a bare RuntimeError."""

    def send(
        self, users: list[str], *, add: bool, key: str | None, batch: cs.Batch
    ) -> cs.DeliveryResult:
        status, _ = self.api.send(users, add=add, key=key)
        if status >= 500:
            raise RuntimeError(f"push API answered {status}")
        return cs.DeliveryResult.ok()


class SwallowsErrors(PushAdapter):
    """Treats any answer as success."""

    def send(
        self, users: list[str], *, add: bool, key: str | None, batch: cs.Batch
    ) -> cs.DeliveryResult:
        self.api.send(users, add=add, key=key)
        return cs.DeliveryResult.ok()


class EchoesAllRejections(PushAdapter):
    """Reports every user the API named, even ones not in this batch."""

    def rejections(self, refused: list[str], batch: cs.Batch) -> list[cs.Rejection]:
        return [cs.Rejection(u, "refused") for u in refused]


class IgnoresIdempotencyKey(PushAdapter):
    """Never passes the key on, so a re-sent batch is applied twice."""

    def send(
        self, users: list[str], *, add: bool, key: str | None, batch: cs.Batch
    ) -> cs.DeliveryResult:
        return super().send(users, add=add, key=None, batch=batch)


class DeclaresTooBigABatch(PushAdapter):
    """Declares a batch size its API refuses (the API takes at most 100)."""

    capabilities: ClassVar[cs.Capabilities] = cs.Capabilities(max_batch_size=500)

    def send(
        self, users: list[str], *, add: bool, key: str | None, batch: cs.Batch
    ) -> cs.DeliveryResult:
        if len(users) > 100:
            raise BadDataError("413 payload too large")
        return super().send(users, add=add, key=key, batch=batch)


def push_check(adapter: Callable[[], PushAdapter | AsyncPush]) -> cs.testing.DestinationReport:
    def fail(status: int) -> Callable[[PushAdapter | AsyncPush], None]:
        def setup(dest: PushAdapter | AsyncPush) -> None:
            dest.api.fail_with = status

        return setup

    def reject(dest: PushAdapter | AsyncPush, identifiers: Collection[str]) -> None:
        dest.api.refuse = set(identifiers)

    return check_destination(
        adapter,
        observe=lambda dest: [len(r) for r in dest.api.requests],
        remote_members=lambda dest, _: dest.api.audience,
        errors={
            "HTTP 500": ErrorCase(TransientError, fail(500)),
            "HTTP 429": ErrorCase(RateLimitedError, fail(429)),
        },
        reject=reject,
    )


class AsyncPush(cs.AsyncDestination):
    """
    One of the adapters above written with ``async def``: each call yields to
    the event loop (as a request would), then does what the wrapped adapter does.
    """

    def __init__(self, adapter: PushAdapter) -> None:
        self.adapter = adapter
        self.capabilities = adapter.capabilities  # type: ignore[misc]

    @property
    def api(self) -> PushApi:
        return self.adapter.api

    async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        await asyncio.sleep(0)
        return self.adapter.add(batch)

    async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        await asyncio.sleep(0)
        return self.adapter.remove(batch)

    async def open(self, context: cs.RunContext) -> None:
        await asyncio.sleep(0)
        self.adapter.open(context)

    async def close(self, context: cs.RunContext, *, succeeded: bool) -> None:
        await asyncio.sleep(0)
        self.adapter.close(context, succeeded=succeeded)


BROKEN_ADAPTERS = [
    (PostsOneAndAHalfBatches, r"batch_size: .*max_batch_size is 100.*\[150"),
    (SendsBatchesInPairs, r"batch_size: .*max_batch_size is 100.*\[151\]"),
    (DeclaresTooBigABatch, r"batch_size: add\(\) with a 500-member ADD batch raised BadData"),
    (RaisesRuntimeErrorOn500, r"error_mapping\['HTTP 500'\].*bare RuntimeError"),
    (SwallowsErrors, r"error_mapping\['HTTP 500'\].*returned normally"),
    (EchoesAllRejections, r"not in the batch"),
    (IgnoresIdempotencyKey, r"idempotency: sending the same batch .* twice"),
]


class TestCheckDestinationCatchesBrokenAdapters:
    def test_correct_adapter_passes(self) -> None:
        """The fake API's correct adapter passes, so the failures below are the bugs'."""
        push_check(PushAdapter)

    @pytest.mark.parametrize(("adapter", "match"), BROKEN_ADAPTERS)
    def test_broken_adapter_fails(self, adapter: Callable[[], PushAdapter], match: str) -> None:
        """Each classic adapter bug fails the suite with a message naming the check."""
        with pytest.raises(AssertionError, match=match):
            push_check(adapter)

    def test_result_not_a_delivery_result(self) -> None:
        """Returning something other than a DeliveryResult fails."""

        class ReturnsNone(PushAdapter):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                self.api.send(batch.identifiers, add=True, key=batch.idempotency_key)
                return None  # type: ignore[return-value]

        with pytest.raises(AssertionError, match="returned NoneType, not DeliveryResult"):
            check_destination(ReturnsNone)

    def test_factory_must_build_destinations(self) -> None:
        """A factory returning something else is named in the failure."""
        with pytest.raises(AssertionError, match=r"not a cohortsync\.Destination"):
            check_destination(object)  # type: ignore[type-var]

    def test_error_case_needs_a_library_error(self) -> None:
        """An ErrorCase expecting a builtin exception is refused up front."""
        with pytest.raises(TypeError, match=r"cohortsync\.exceptions"):
            ErrorCase(RuntimeError, lambda _: None)  # type: ignore[arg-type]


def suite_failure(make: Callable[[], Any], **probes: Any) -> str:
    """
    The message ``check_destination`` fails with on *make*'s adapters.
    """
    with pytest.raises(AssertionError) as caught:
        check_destination(make, **probes)
    return str(caught.value)


def push_failure(adapter: Callable[[], PushAdapter | AsyncPush]) -> str:
    with pytest.raises(AssertionError) as caught:
        push_check(adapter)
    return str(caught.value)


class ReturnsNothing(cs.Destination):
    """Forgets to return the result."""

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return None  # type: ignore[return-value]

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return None  # type: ignore[return-value]


class AsyncReturnsNothing(cs.AsyncDestination):
    """Forgets to return the result, with ``async def``."""

    async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return None  # type: ignore[return-value]

    async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return None  # type: ignore[return-value]


class RaisesBareException(cs.Destination):
    """Lets its client's own exception out when the remote is down."""

    def __init__(self) -> None:
        self.down = False

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        if self.down:
            raise Exception("connection reset by peer")  # noqa: TRY002 - the bug under test
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return self.add(batch)


class AsyncRaisesBareException(cs.AsyncDestination):
    """Lets its client's own exception out when the remote is down, with ``async def``."""

    def __init__(self) -> None:
        self.down = False

    async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        await asyncio.sleep(0)
        if self.down:
            raise Exception("connection reset by peer")  # noqa: TRY002 - the bug under test
        return cs.DeliveryResult.ok()

    async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return await self.add(batch)


def going_down(dest: RaisesBareException | AsyncRaisesBareException) -> None:
    dest.down = True


def loop_watching(loops: list[asyncio.AbstractEventLoop]) -> type[AsyncRecordingDestination]:
    """
    An AsyncRecordingDestination that notes the loop each run's ``open`` runs on.
    """

    class Watched(AsyncRecordingDestination):
        async def open(self, context: cs.RunContext) -> None:
            loops.append(asyncio.get_running_loop())
            await super().open(context)

    return Watched


def loop_threads() -> set[threading.Thread]:
    """
    The event loop threads alive now (cohortsync's LoopThread names them).
    """
    return {t for t in threading.enumerate() if t.name == "cohortsync-loop"}


RECORDING_ERRORS: Mapping[str, ErrorCase[Any]] = {
    "timeout": ErrorCase(TransientError, scripted(Fault.timeout())),
    "429": ErrorCase(RateLimitedError, scripted(Fault.rate_limited())),
    "401": ErrorCase(AuthenticationError, scripted(Fault.auth())),
    "404": ErrorCase(PermanentError, scripted(Fault.permanent())),
}


class TestCheckDestinationOnAsyncAdapters:
    def test_async_faulty_destination_passes_as_its_twin(self) -> None:
        """AsyncFaultyDestination passes the same checks as FaultyDestination."""
        probes: dict[str, Any] = {
            "observe": recording_requests,
            "remote_members": recording_audience,
            "errors": RECORDING_ERRORS,
            "reject": recording_reject,
        }

        expected = check_destination(FaultyDestination, **probes)
        actual = check_destination(AsyncFaultyDestination, **probes)

        assert {} == dict(actual.skipped)
        assert expected.passed == actual.passed
        assert "<AsyncFaultyDestination 'Recording' batches=0>" == actual.destination

    def test_correct_async_adapter_passes(self) -> None:
        """The fake API's correct adapter, written with async def, passes every check."""
        report = push_check(lambda: AsyncPush(PushAdapter()))

        assert {} == dict(report.skipped)
        assert 6 == len(report.passed)

    @pytest.mark.parametrize(("adapter", "match"), BROKEN_ADAPTERS)
    def test_broken_async_adapter_fails_as_its_sync_twin(
        self, adapter: Callable[[], PushAdapter], match: str
    ) -> None:
        """Each classic adapter bug, written with async def, fails with the same message."""
        expected = push_failure(adapter)

        actual = push_failure(lambda: AsyncPush(adapter()))

        assert expected == actual
        assert re.search(match, actual)

    def test_returning_none_fails_as_in_sync(self) -> None:
        """An async add() that returns None fails with the synchronous adapter's message."""
        expected = suite_failure(ReturnsNothing)

        actual = suite_failure(AsyncReturnsNothing)

        assert expected == actual
        assert "returned NoneType, not DeliveryResult" in actual

    def test_bare_exception_fails_as_in_sync(self) -> None:
        """An async add() letting a bare Exception out fails with the synchronous message."""
        errors = {"connection reset": ErrorCase(TransientError, going_down)}
        expected = suite_failure(RaisesBareException, errors=errors)

        actual = suite_failure(AsyncRaisesBareException, errors=errors)

        assert expected == actual
        assert "got a bare Exception: connection reset by peer" in actual

    def test_plain_method_on_an_async_adapter_fails(self) -> None:
        """An AsyncDestination with a plain add() would block the loop: the suite says so."""

        class Blocking(cs.AsyncDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:  # type: ignore[override]
                return cs.DeliveryResult.ok()

            async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        with pytest.raises(AssertionError, match=r"capabilities: .*`add` must be `async def`"):
            check_destination(Blocking)

    def test_async_method_on_a_sync_adapter_fails(self) -> None:
        """A Destination with an async def add() is told to subclass AsyncDestination."""

        class Confused(cs.Destination):
            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:  # type: ignore[override]
                return cs.DeliveryResult.ok()

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        with pytest.raises(AssertionError, match=r"subclass cohortsync\.AsyncDestination"):
            check_destination(Confused)

    def test_sync_adapter_returning_a_coroutine_fails(self) -> None:
        """A plain add() that hands back a coroutine fails: the engine would not await it."""

        class Sneaky(cs.Destination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                return self._add(batch)  # type: ignore[return-value]

            async def _add(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        with pytest.raises(AssertionError, match="returned coroutine, not DeliveryResult"):
            check_destination(Sneaky)

    def test_factory_keeps_to_one_kind(self) -> None:
        """A factory that builds a Destination, then an AsyncDestination, fails."""
        made = itertools.count()

        def make() -> RecordingDestination | AsyncRecordingDestination:
            return AsyncRecordingDestination() if next(made) else RecordingDestination()

        with pytest.raises(AssertionError, match=r"empty_run: .*adapters of both kinds"):
            check_destination(make)

    def test_async_probes_and_setups_are_awaited(self) -> None:
        """Probes, setups and reject written with async def work as plain ones do."""

        async def observe(dest: AsyncFaultyDestination) -> list[int]:
            await asyncio.sleep(0)
            return recording_requests(dest)  # type: ignore[arg-type]

        async def remote(dest: AsyncFaultyDestination, context: cs.RunContext) -> set[str]:
            await asyncio.sleep(0)
            return dest.audience(context.sync_id)

        async def reject(dest: AsyncFaultyDestination, identifiers: Collection[str]) -> None:
            await asyncio.sleep(0)
            dest.script[dest.call_count] = Fault.reject(identifiers=identifiers)

        async def timing_out(dest: AsyncFaultyDestination) -> None:
            await asyncio.sleep(0)
            dest.script[dest.call_count] = Fault.timeout()

        report = check_destination(
            AsyncFaultyDestination,
            observe=observe,
            remote_members=remote,
            errors={"timeout": ErrorCase(TransientError, timing_out)},
            reject=reject,
        )

        assert {} == dict(report.skipped)
        assert "rejections" in report.passed

    def test_one_event_loop_for_the_whole_suite(self) -> None:
        """Every run of the suite opens on one loop, whose thread is gone when it returns."""
        loops: list[asyncio.AbstractEventLoop] = []
        before = loop_threads()

        check_destination(loop_watching(loops), remote_members=recording_audience)

        assert 4 < len(loops)
        assert 1 == len({id(loop) for loop in loops})
        assert set() == loop_threads() - before

    def test_called_from_inside_a_running_loop(self) -> None:
        """Called from a coroutine, the suite runs the adapter on a loop of its own."""
        loops: list[asyncio.AbstractEventLoop] = []

        async def host_test() -> tuple[cs.testing.DestinationReport, asyncio.AbstractEventLoop]:
            report = check_destination(loop_watching(loops), remote_members=recording_audience)
            return report, asyncio.get_running_loop()

        report, host_loop = asyncio.run(host_test())

        assert ("empty_run", "batch_size", "idempotency") == report.passed
        assert loops
        assert host_loop not in loops

    def test_sync_adapters_run_in_the_callers_thread(self) -> None:
        """A synchronous adapter is called from the caller's thread; no loop thread starts."""
        seen: list[tuple[threading.Thread, frozenset[threading.Thread]]] = []
        before = loop_threads()

        class Watched(RecordingDestination):
            def open(self, context: cs.RunContext) -> None:
                seen.append((threading.current_thread(), frozenset(loop_threads() - before)))
                super().open(context)

        check_destination(Watched, remote_members=recording_audience)

        assert {(threading.current_thread(), frozenset())} == set(seen)


# -- the pytest plugin ----------------------------------------------------------------


PLUGIN = "cohortsync.testing.pytest_plugin"

PLUGIN_TEST = """
from datetime import timedelta

import cohortsync as cs
from cohortsync.testing import simulate


def test_fixtures(
    cohortsync_clock, cohortsync_storage, cohortsync_scheduler, cohortsync_recording_destination
):
    scheduler, destination = cohortsync_scheduler, cohortsync_recording_destination
    assert scheduler.clock is cohortsync_clock and scheduler.storage is cohortsync_storage
    scheduler.add_destination("push", destination)
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: {"a", "b"}))
    scheduler.create_sync("c", "push", cs.SyncPolicy.daily(), sync_id="s")
    assert 3 == len(simulate(scheduler, span=timedelta(days=2)))
    assert {"a", "b"} == destination.members
"""


PLUGIN_ASYNC_TEST = """
import asyncio
import threading
from datetime import timedelta

import pytest

import cohortsync as cs
from cohortsync.exceptions import StorageClosedError

held = {}


def test_async_scheduler(
    cohortsync_async_scheduler, cohortsync_clock, cohortsync_storage,
    cohortsync_recording_destination,
):
    scheduler, destination = cohortsync_async_scheduler, cohortsync_recording_destination
    assert scheduler.clock is cohortsync_clock and scheduler.storage is cohortsync_storage
    scheduler.add_destination("push", destination)
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: {"a", "b"}))
    asyncio.run(scheduler.create_sync("c", "push", cs.SyncPolicy.hourly(), sync_id="s"))
    assert 1 == len(asyncio.run(scheduler.run_due()))
    cohortsync_clock.advance(timedelta(hours=2))
    assert 1 == len(asyncio.run(scheduler.run_due()))  # another loop, the same scheduler
    assert {"a", "b"} == destination.members
    held["lanes"] = [t for t in threading.enumerate() if t.name.startswith("cohortsync-run")]
    held["scheduler"] = scheduler


def test_closed_after_the_test():
    assert held["lanes"]
    assert not any(t.is_alive() for t in held["lanes"])
    with pytest.raises(StorageClosedError):
        asyncio.run(held["scheduler"].get_sync("s"))
"""


def _entry_points() -> dict[str, str]:
    """
    The pytest11 entry points pyproject.toml declares.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the oldest Python we support
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return dict(project.get("entry-points", {}).get("pytest11", {}))


def _installed(site: Path) -> Path:
    """
    A directory holding only the metadata an installed cohortsync carries for
    its pytest11 entry points, as pip writes it: on ``sys.path`` it makes
    pytest autoload the plugin as it would for a host that installed cohortsync.
    """
    info = site / "cohortsync_entry_points-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cohortsync-entry-points\n")
    lines = [f"{name} = {target}" for name, target in _entry_points().items()]
    (info / "entry_points.txt").write_text("[pytest11]\n" + "\n".join(lines) + "\n")
    return site


def _pytest_in(
    directory: Path, *args: str, site: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # The child imports the cohortsync this process imported (a relative
    # PYTHONPATH=src would not survive the change of directory), and with
    # *site* it also sees that site's entry points.
    source = str(Path(cs.__file__).resolve().parent.parent)
    paths = [str(site)] if site is not None else []
    paths += [source, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


class TestPytestPlugin:
    def test_entry_point(self) -> None:
        """
        pyproject.toml registers the plugin under its module's name, which is
        what lets a conftest list it too without loading it twice.
        """
        assert {PLUGIN: PLUGIN} == _entry_points()

    def test_loaded_when_installed(self, tmp_path: Path) -> None:
        """An installed cohortsync gives a host the four fixtures with no conftest at all."""
        (tmp_path / "host").mkdir()
        (tmp_path / "host" / "test_host.py").write_text(PLUGIN_TEST)

        result = _pytest_in(tmp_path / "host", site=_installed(tmp_path / "site"))

        assert 0 == result.returncode, result.stdout + result.stderr
        assert "1 passed" in result.stdout

    def test_installed_and_listed_loads_once(self, tmp_path: Path) -> None:
        """A root conftest that also lists the plugin (the old way) still works."""
        (tmp_path / "host").mkdir()
        (tmp_path / "host" / "conftest.py").write_text(f"pytest_plugins = [{PLUGIN!r}]\n")
        (tmp_path / "host" / "test_host.py").write_text(PLUGIN_TEST)

        result = _pytest_in(tmp_path / "host", site=_installed(tmp_path / "site"))

        assert 0 == result.returncode, result.stdout + result.stderr
        assert "1 passed" in result.stdout

    def test_enabled_by_pytest_plugins(self, tmp_path: Path) -> None:
        """Without autoloading, a root conftest with pytest_plugins gets the fixtures."""
        (tmp_path / "conftest.py").write_text(f"pytest_plugins = [{PLUGIN!r}]\n")
        (tmp_path / "test_host.py").write_text(PLUGIN_TEST)

        result = _pytest_in(tmp_path)

        assert 0 == result.returncode, result.stdout + result.stderr
        assert "1 passed" in result.stdout

    def test_host_fixtures_keep_their_names(self, tmp_path: Path) -> None:
        """A host's own clock, storage and scheduler fixtures are not shadowed, nor shadow."""
        (tmp_path / "host").mkdir()
        (tmp_path / "host" / "conftest.py").write_text(
            textwrap.dedent(
                """
                import pytest

                @pytest.fixture
                def clock():
                    return "the host's clock"

                @pytest.fixture
                def storage():
                    return "the host's storage"

                @pytest.fixture
                def scheduler():
                    return "the host's scheduler"
                """
            )
        )
        (tmp_path / "host" / "test_host.py").write_text(
            textwrap.dedent(
                """
                def test_both(clock, storage, scheduler, cohortsync_scheduler, cohortsync_clock):
                    assert ("the host's clock", "the host's storage", "the host's scheduler") == (
                        clock, storage, scheduler
                    )
                    assert cohortsync_scheduler.clock is cohortsync_clock
                """
            )
        )

        result = _pytest_in(tmp_path / "host", site=_installed(tmp_path / "site"))

        assert 0 == result.returncode, result.stdout + result.stderr
        assert "1 passed" in result.stdout

    def test_async_scheduler_fixture(self, tmp_path: Path) -> None:
        """
        cohortsync_async_scheduler runs under asyncio.run in a plain test, on
        any number of loops, and is closed after the test: threads and store.
        """
        (tmp_path / "host").mkdir()
        (tmp_path / "host" / "test_host.py").write_text(PLUGIN_ASYNC_TEST)

        result = _pytest_in(tmp_path / "host", site=_installed(tmp_path / "site"))

        assert 0 == result.returncode, result.stdout + result.stderr
        assert "2 passed" in result.stdout

    def test_turned_off(self, tmp_path: Path) -> None:
        """-p no:<module> turns the installed plugin off: its fixtures are gone."""
        (tmp_path / "host").mkdir()
        (tmp_path / "host" / "test_host.py").write_text(PLUGIN_TEST)

        result = _pytest_in(
            tmp_path / "host", "-p", f"no:{PLUGIN}", site=_installed(tmp_path / "site")
        )

        assert 0 != result.returncode
        assert "fixture 'cohortsync_clock' not found" in result.stdout

    def test_testing_package_imports_no_pytest(self) -> None:
        """cohortsync.testing itself works where pytest is not installed."""
        code = (
            "import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('pytest', '_pytest'):\n"
            "        raise ImportError('no pytest here')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import cohortsync.testing\n"
            "print(sorted(m for m in sys.modules if 'pytest' in m))\n"
        )
        result = subprocess.run(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
        )

        assert (0, "[]") == (result.returncode, result.stdout.strip()), result.stderr
