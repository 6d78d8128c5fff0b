"""
Events for progress and telemetry: the plan a run announces before its first
batch, batches counted against it with their start and end instants, the
destination and cadence on run events, listeners that choose their event
classes, and no event built when nobody listens.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import cohortsync as cs
from cohortsync import _run
from cohortsync.events import (
    BatchDelivered,
    Event,
    GuardTripped,
    RunFinished,
    RunPlanned,
    RunStarted,
    SyncFailed,
    subscribe,
)
from cohortsync.exceptions import ConfigurationError
from cohortsync.testing import FakeClock, Fault, FaultyDestination, MemoryStorage
from single_sync import build, run_next

START = datetime(2030, 1, 1, tzinfo=timezone.utc)


def _keys(n: int) -> list[str]:
    return [f"k{i:04d}" for i in range(n)]


def _run_events(
    clock: FakeClock, members: list[str], **options: object
) -> tuple[cs.SyncRun, list[Event]]:
    events: list[Event] = []
    scheduler = build(clock, lambda: list(members), listeners=[events.append], **options)
    return run_next(scheduler, clock), events


class TestRunPlanned:
    """A run announces its totals once, after the diff and before its first batch."""

    def test_order_and_totals(self, clock: FakeClock) -> None:
        """Started, planned, one event per batch, finished; totals of adds in batches of 4."""
        run, events = _run_events(
            clock,
            _keys(10),
            destination=FaultyDestination(cs.Capabilities(max_batch_size=4)),
        )

        assert [RunStarted, RunPlanned, *[BatchDelivered] * 3, RunFinished] == [
            type(e) for e in events
        ]
        planned = events[1]
        assert isinstance(planned, RunPlanned)
        assert (
            RunPlanned(
                sync_id="s1",
                run_id=run.id,
                destination_id="dest",
                slot=run.slot,
                adds=10,
                removes=0,
                resends=0,
                batches=3,
                batch_size=4,
                full_sync=False,
                at=run.started_at,
            ),
            10,
        ) == (planned, planned.members)

    def test_removes_and_adds_batched_apart(self, clock: FakeClock) -> None:
        """Removals and adds are planned in batches of their own."""
        members = _keys(5)
        events: list[Event] = []
        scheduler = build(
            clock,
            lambda: list(members),
            destination=FaultyDestination(cs.Capabilities(max_batch_size=4)),
            listeners=[events.append],
        )
        run_next(scheduler, clock)
        members[:] = [*_keys(5)[2:], "n1", "n2", "n3"]
        events.clear()

        run_next(scheduler, clock)

        (planned,) = [e for e in events if isinstance(e, RunPlanned)]
        assert (3, 2, 0, 2, 5) == (
            planned.adds,
            planned.removes,
            planned.resends,
            planned.batches,
            planned.members,
        )

    def test_guarded_removals_are_not_planned(self, clock: FakeClock) -> None:
        """Removals the mass-removal guard holds back are not in the plan."""
        members = _keys(1_200)
        events: list[Event] = []
        scheduler = build(
            clock,
            lambda: list(members),
            destination=FaultyDestination(cs.Capabilities(max_batch_size=1_000)),
            listeners=[events.append],
        )
        run_next(scheduler, clock)
        members[:] = members[:100]
        events.clear()

        run = run_next(scheduler, clock)

        (planned,) = [e for e in events if isinstance(e, RunPlanned)]
        assert (cs.RunStatus.GUARDED, 0, 0) == (run.status, planned.removes, planned.batches)
        assert 1 == sum(isinstance(e, GuardTripped) for e in events)

    def test_full_resync_plans_resends(self, clock: FakeClock) -> None:
        """A full resync re-sends what the destination holds: planned as resends."""
        events: list[Event] = []
        scheduler = build(clock, lambda: _keys(3), listeners=[events.append])
        run_next(scheduler, clock)
        scheduler.request_full_resync("s1")
        events.clear()

        run_next(scheduler, clock)

        (planned,) = [e for e in events if isinstance(e, RunPlanned)]
        assert (0, 3, True) == (planned.adds, planned.resends, planned.full_sync)

    def test_failed_source_plans_nothing(self, clock: FakeClock) -> None:
        """A run that stops before sending (its source failed) emits no plan."""

        def broken() -> list[str]:
            raise RuntimeError("warehouse down")

        events: list[Event] = []
        scheduler = build(clock, broken, listeners=[events.append])

        run = run_next(scheduler, clock)

        assert cs.RunStatus.FAILED == run.status
        assert [RunStarted, RunFinished] == [type(e) for e in events]


class TestBatchProgress:
    """Each batch event counts batches and members against the plan."""

    def test_counts_climb_to_the_totals(self, clock: FakeClock) -> None:
        """Done counts rise batch by batch and end at the totals."""
        _, events = _run_events(
            clock, _keys(10), destination=FaultyDestination(cs.Capabilities(max_batch_size=4))
        )

        batches = [e for e in events if isinstance(e, BatchDelivered)]
        assert [(1, 3, 4, 10), (2, 3, 8, 10), (3, 3, 10, 10)] == [
            (e.batches_done, e.batches_total, e.members_done, e.members_total) for e in batches
        ]
        assert {"dest"} == {e.destination_id for e in batches}

    def test_latency_includes_the_retry_wait(self, clock: FakeClock) -> None:
        """started_at is taken before the first attempt; at after the answer."""
        dest = FaultyDestination(
            cs.Capabilities(), script={0: Fault.server_error(retry_after=30.0)}
        )
        run, events = _run_events(clock, _keys(2), destination=dest)

        (batch,) = [e for e in events if isinstance(e, BatchDelivered)]
        assert batch.started_at is not None
        assert batch.at is not None
        assert run.started_at <= batch.started_at
        assert timedelta(seconds=30) <= batch.at - batch.started_at
        assert batch.at <= run.finished_at

    def test_split_batches_never_pass_100_percent(self, clock: FakeClock) -> None:
        """Halves of a batch split for bad data raise the total instead of passing it."""
        members = _keys(4)
        dest = FaultyDestination(
            cs.Capabilities(max_batch_size=4), script={0: Fault.bad_data(["k0000"])}
        )
        _, events = _run_events(clock, members, destination=dest)

        batches = [e for e in events if isinstance(e, BatchDelivered)]
        assert len(batches) > 1
        assert all(e.batches_done <= e.batches_total for e in batches)
        assert all(e.members_done <= e.members_total for e in batches)
        assert (4, 4) == (batches[-1].members_done, batches[-1].members_total)
        assert all(e.started_at is not None for e in batches)


class TestRunEvents:
    """Run events name the destination and cadence spans and metrics need."""

    def test_started_and_finished(self, clock: FakeClock) -> None:
        """RunStarted carries destination and cadence; RunFinished the destination."""
        run, events = _run_events(clock, _keys(1), policy=cs.SyncPolicy.daily())

        started, finished = events[0], events[-1]
        assert isinstance(started, RunStarted)
        assert isinstance(finished, RunFinished)
        assert ("dest", cs.Cadence.DAILY, run.started_at) == (
            started.destination_id,
            started.cadence,
            started.at,
        )
        assert (run, "dest") == (finished.run, finished.destination_id)


class TestNoListeners:
    """With nobody listening a run builds no event at all."""

    def test_no_event_built(self, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
        """Neither run events nor batch events are constructed without a listener."""
        built: list[str] = []
        for name in ("RunStarted", "RunPlanned", "BatchDelivered", "RunFinished"):
            monkeypatch.setattr(_run, name, lambda name=name, **_: built.append(name))
        scheduler = build(
            clock,
            lambda: _keys(5),
            destination=FaultyDestination(cs.Capabilities(max_batch_size=2)),
        )

        run = run_next(scheduler, clock)

        assert (cs.RunStatus.SUCCEEDED, 3, []) == (run.status, run.batches, built)

    def test_the_probe_sees_events_when_listened_to(
        self, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same probe records every construction once a listener is registered."""
        built: list[str] = []
        for name in ("RunStarted", "RunPlanned", "BatchDelivered", "RunFinished"):
            monkeypatch.setattr(_run, name, lambda name=name, **_: built.append(name))
        scheduler = build(clock, lambda: _keys(1), listeners=[lambda _e: None])

        run_next(scheduler, clock)

        assert ["RunStarted", "RunPlanned", "BatchDelivered", "RunFinished"] == built


class TestSubscriptions:
    """A listener can ask for some event classes only."""

    def test_add_listener_filters(self, clock: FakeClock) -> None:
        """events=(RunFinished, GuardTripped) gets those, and nothing else."""
        got: list[RunFinished | GuardTripped] = []
        everything: list[Event] = []
        scheduler = build(clock, lambda: _keys(3), listeners=[everything.append])

        def on_end(event: RunFinished | GuardTripped) -> None:
            got.append(event)

        scheduler.add_listener(on_end, events=(RunFinished, GuardTripped))

        run = run_next(scheduler, clock)

        assert [RunFinished(run=run, destination_id="dest")] == got
        assert len(everything) > 1

    def test_constructor_form(self, clock: FakeClock) -> None:
        """subscribe() filters a listener given to the constructor."""
        got: list[RunStarted] = []
        scheduler = build(clock, lambda: _keys(3), listeners=[subscribe(got.append, (RunStarted,))])

        run_next(scheduler, clock)

        assert [RunStarted] == [type(e) for e in got]

    def test_one_class_without_a_tuple(self) -> None:
        """A single class is taken as a one-class tuple."""
        got: list[Event] = []
        listener = subscribe(got.append, SyncFailed)  # type: ignore[call-overload]

        listener(SyncFailed(sync_id="s", status=cs.SyncStatus.PAUSED, reason="r", at=START))

        assert 1 == len(got)

    def test_duplicates_are_harmless(self) -> None:
        """A class named twice delivers each event once."""
        got: list[Event] = []
        listener = subscribe(got.append, (SyncFailed, SyncFailed))

        listener(SyncFailed(sync_id="s", status=cs.SyncStatus.PAUSED, reason="r", at=START))

        assert 1 == len(got)

    @pytest.mark.parametrize(
        "events",
        [(int,), ("RunFinished",), "RunFinished", (), (RunFinished, object), None, 3],
        ids=["not-an-event", "a-name", "a-string", "empty", "one-bad", "none", "a-number"],
    )
    def test_bad_event_classes(self, events: object) -> None:
        """Anything but event classes is a ConfigurationError naming events=."""
        with pytest.raises(ConfigurationError, match=r"^events=") as info:
            subscribe(print, events)  # type: ignore[call-overload]

        assert "events" == info.value.field

    def test_add_listener_validates(self) -> None:
        """add_listener checks the classes too, and registers nothing on a bad call."""
        scheduler = cs.Scheduler(MemoryStorage())

        with pytest.raises(ConfigurationError, match="not an event class"):
            scheduler.add_listener(print, events=(int,))  # type: ignore[call-overload]

        assert [] == scheduler._listeners

    def test_listener_must_be_callable(self) -> None:
        """A listener that cannot be called is refused when registered, not at the first run."""
        scheduler = cs.Scheduler(MemoryStorage())

        with pytest.raises(ConfigurationError, match=r"^listener="):
            scheduler.add_listener("print")  # type: ignore[call-overload]
        with pytest.raises(ConfigurationError, match=r"^listener="):
            subscribe(None, (RunFinished,))  # type: ignore[call-overload]

    def test_repr_names_listener_and_classes(self) -> None:
        """A filtered listener's repr (in a failure's log line) says what it wraps."""
        text = repr(subscribe(print, (RunFinished,)))

        assert "print" in text
        assert "RunFinished" in text
