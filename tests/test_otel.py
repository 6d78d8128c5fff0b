"""
OpenTelemetry: real spans and metrics from the OpenTelemetry SDK's in-memory
exporter and reader, built from a scheduler's events on a fake clock.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta

import attrs
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import cohortsync as cs
from cohortsync import otel
from cohortsync.events import RunStarted
from cohortsync.otel import OpenTelemetryListener, instrument
from cohortsync.testing import FakeClock, Fault, FaultyDestination, MemoryStorage
from single_sync import build, run_next


@attrs.frozen
class Telemetry:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, object], object]]:
        """(attributes, value or histogram point) of each data point of *metric*."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            (dict(point.attributes or {}), getattr(point, "value", point))
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for m in scope.metrics
            if m.name == metric
            for point in m.data.data_points
        ]


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Telemetry(spans, reader, tracer_provider, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


def _ns(instant: datetime) -> int:
    return int(instant.timestamp()) * 1_000_000_000 + instant.microsecond * 1_000


def _instrumented(
    clock: FakeClock, telemetry: Telemetry, members: list[str], **options: object
) -> cs.Scheduler:
    scheduler = build(clock, lambda: list(members), **options)
    instrument(
        scheduler,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    return scheduler


def _keys(n: int) -> list[str]:
    return [f"k{i:03d}" for i in range(n)]


class TestRunSpans:
    """A span per run, timed by the scheduler's clock, with its counts."""

    def test_run_span(self, clock: FakeClock, telemetry: Telemetry) -> None:
        """One run span with ids, destination, cadence, trigger, counts and status."""
        scheduler = _instrumented(clock, telemetry, _keys(5), policy=cs.SyncPolicy.daily())
        run = run_next(scheduler, clock)

        (span,) = telemetry.finished("cohortsync.run")
        assert {
            "cohortsync.sync_id": "s1",
            "cohortsync.run_id": run.id,
            "cohortsync.destination_id": "dest",
            "cohortsync.cadence": "daily",
            "cohortsync.trigger": "scheduled",
            "cohortsync.slot": run.slot.isoformat(),
            "cohortsync.status": "succeeded",
            "cohortsync.added": 5,
            "cohortsync.removed": 0,
            "cohortsync.skipped": 0,
            "cohortsync.rejected": 0,
            "cohortsync.batches": 1,
            "cohortsync.retries": 0,
            "cohortsync.full_sync": False,
            "cohortsync.planned.adds": 5,
            "cohortsync.planned.removes": 0,
            "cohortsync.planned.resends": 0,
            "cohortsync.planned.batches": 1,
        } == dict(span.attributes or {})
        assert (_ns(run.started_at), _ns(run.finished_at)) == (span.start_time, span.end_time)
        assert StatusCode.UNSET == span.status.status_code
        assert ["cohortsync.planned"] == [e.name for e in span.events]

    def test_failed_run_is_an_error(self, clock: FakeClock, telemetry: Telemetry) -> None:
        """A failed run's span ends with an error status naming the error class."""
        dest = FaultyDestination(cs.Capabilities(), always=Fault.permanent())
        scheduler = _instrumented(clock, telemetry, _keys(2), destination=dest)

        run = run_next(scheduler, clock)

        (span,) = telemetry.finished("cohortsync.run")
        assert cs.RunStatus.FAILED == run.status
        assert (StatusCode.ERROR, "PermanentError") == (
            span.status.status_code,
            span.status.description,
        )
        assert ("failed", "PermanentError") == (
            (span.attributes or {})["cohortsync.status"],
            (span.attributes or {})["error.type"],
        )

    def test_guard_is_a_span_event(self, clock: FakeClock, telemetry: Telemetry) -> None:
        """A tripped guard is an event on the run span, and counted."""
        members = [f"m{i:04d}" for i in range(1_200)]
        scheduler = _instrumented(
            clock,
            telemetry,
            members,
            destination=FaultyDestination(cs.Capabilities(max_batch_size=1_000)),
        )
        run_next(scheduler, clock)
        members[:] = members[:10]

        run = run_next(scheduler, clock)

        guarded = [
            s
            for s in telemetry.finished("cohortsync.run")
            if (s.attributes or {})["cohortsync.run_id"] == run.id
        ]
        (span,) = guarded
        (event,) = [e for e in span.events if e.name == "cohortsync.guard_tripped"]
        assert {
            "cohortsync.delivered": 1_200,
            "cohortsync.removing": 1_190,
            "cohortsync.source_empty": False,
        } == dict(event.attributes or {})
        assert [({"cohortsync.destination_id": "dest"}, 1)] == telemetry.points(
            "cohortsync.guard.trips"
        )

    def test_paused_sync_is_a_span_event(self, clock: FakeClock, telemetry: Telemetry) -> None:
        """An authentication failure pauses the sync: an event and a stopped-sync count."""
        dest = FaultyDestination(cs.Capabilities(), always=Fault.auth())
        scheduler = _instrumented(clock, telemetry, _keys(2), destination=dest)

        run_next(scheduler, clock)

        (span,) = telemetry.finished("cohortsync.run")
        assert ["cohortsync.planned", "cohortsync.sync_stopped"] == [e.name for e in span.events]
        assert [({"cohortsync.status": "paused"}, 1)] == telemetry.points(
            "cohortsync.syncs.stopped"
        )

    def test_span_without_its_start(self, clock: FakeClock, telemetry: Telemetry) -> None:
        """A listener added mid-run still ends a span for the run, from the record."""
        listener = OpenTelemetryListener(
            tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
        )
        scheduler = build(
            clock,
            lambda: _keys(2),
            listeners=[lambda e: None if isinstance(e, RunStarted) else listener(e)],
        )

        run = run_next(scheduler, clock)

        (span,) = telemetry.finished("cohortsync.run")
        assert (_ns(run.started_at), run.id) == (
            span.start_time,
            (span.attributes or {})["cohortsync.run_id"],
        )

    def test_a_run_never_finished_is_ended_by_the_next(
        self, clock: FakeClock, telemetry: Telemetry
    ) -> None:
        """A run whose end was never seen is ended as an error when its sync runs again."""
        listener = OpenTelemetryListener(
            tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
        )
        first = RunStarted(
            sync_id="s",
            run_id="r1",
            trigger=cs.Trigger.SCHEDULED,
            slot=clock.now(),
            at=clock.now(),
        )
        listener(first)
        listener(attrs.evolve(first, run_id="r2", at=clock.advance(60)))

        (span,) = telemetry.finished("cohortsync.run")
        assert ("r1", StatusCode.ERROR) == (
            (span.attributes or {})["cohortsync.run_id"],
            span.status.status_code,
        )
        assert "OpenTelemetryListener(open_runs=1)" == repr(listener)

    def test_open_runs_are_bounded(
        self, clock: FakeClock, telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Beyond MAX_OPEN_RUNS unfinished runs, the oldest is ended."""
        monkeypatch.setattr(otel, "MAX_OPEN_RUNS", 2)
        listener = OpenTelemetryListener(
            tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
        )
        for i in range(3):
            listener(
                RunStarted(
                    sync_id=f"s{i}",
                    run_id=f"r{i}",
                    trigger=cs.Trigger.SCHEDULED,
                    slot=clock.now(),
                    at=clock.now(),
                )
            )

        assert ["r0"] == [
            (s.attributes or {})["cohortsync.run_id"] for s in telemetry.finished("cohortsync.run")
        ]


class TestBatchSpans:
    """A child span per batch, from in flight to answered."""

    def test_batch_spans(self, clock: FakeClock, telemetry: Telemetry) -> None:
        """Each batch is a child of its run span, timed with its retry wait."""
        dest = FaultyDestination(
            cs.Capabilities(max_batch_size=3), script={1: Fault.server_error(retry_after=20.0)}
        )
        scheduler = _instrumented(clock, telemetry, _keys(5), destination=dest)

        run = run_next(scheduler, clock)

        (run_span,) = telemetry.finished("cohortsync.run")
        batches = telemetry.finished("cohortsync.batch")
        assert [1, 2] == [(s.attributes or {})["cohortsync.batch.sequence"] for s in batches]
        assert [3, 2] == [(s.attributes or {})["cohortsync.batch.size"] for s in batches]
        assert {run_span.context.span_id} == {s.parent.span_id for s in batches if s.parent}
        assert {run_span.context.trace_id} == {s.context.trace_id for s in batches}
        waited = batches[1]
        assert waited.end_time is not None
        assert waited.start_time is not None
        assert 20 * 10**9 <= waited.end_time - waited.start_time
        assert run.retries == 1


class TestMetrics:
    """Counters and histograms with the values of the runs."""

    def test_counts_and_histograms(self, clock: FakeClock, telemetry: Telemetry) -> None:
        """Runs by status, members by operation, rejections, retries, latency and lag."""
        members = _keys(6)
        dest = FaultyDestination(
            cs.Capabilities(max_batch_size=4),
            script={0: Fault.server_error(), 2: Fault.reject(identifiers={"k005"})},
        )
        scheduler = _instrumented(clock, telemetry, members, destination=dest)
        run_next(scheduler, clock)
        members[:] = members[2:]
        run_next(scheduler, clock)  # removes 2, and re-sends the rejected member

        dest_ = {"cohortsync.destination_id": "dest"}
        hourly = {"cohortsync.cadence": "hourly", "cohortsync.trigger": "scheduled", **dest_}
        assert sorted(
            [
                ({"cohortsync.status": "partial", **hourly}, 1),
                ({"cohortsync.status": "succeeded", **hourly}, 1),
            ],
            key=repr,
        ) == sorted(telemetry.points("cohortsync.runs"), key=repr)
        assert sorted(
            [
                ({"cohortsync.operation": "add", **dest_}, 7),
                ({"cohortsync.operation": "remove", **dest_}, 2),
            ],
            key=repr,
        ) == sorted(telemetry.points("cohortsync.members.sent"), key=repr)
        assert [({"cohortsync.operation": "add", **dest_}, 1)] == telemetry.points(
            "cohortsync.members.rejected"
        )
        assert [(dest_, 1)] == telemetry.points("cohortsync.retries")
        latency = {
            str(a["cohortsync.operation"]): p
            for a, p in telemetry.points("cohortsync.batch.duration")
        }
        assert isinstance(latency["add"], HistogramDataPoint)
        assert (3, 1) == (latency["add"].count, latency["remove"].count)
        assert latency["add"].max >= 1.0  # the retried batch waited out its backoff
        ((_, lag),) = telemetry.points("cohortsync.run.lag")
        assert isinstance(lag, HistogramDataPoint)
        assert (2, 0.0) == (lag.count, lag.min)
        durations = telemetry.points("cohortsync.run.duration")
        assert 2 == sum(p.count for _, p in durations if isinstance(p, HistogramDataPoint))

    def test_lag_behind_the_slot(self, clock: FakeClock, telemetry: Telemetry) -> None:
        """A run that starts late records how late, in seconds."""
        scheduler = _instrumented(clock, telemetry, _keys(1))
        run_next(scheduler, clock)
        due = scheduler.next_run("s1")
        assert due is not None
        clock.set(due + timedelta(seconds=90))

        scheduler.run_due()

        ((_, lag),) = telemetry.points("cohortsync.run.lag")
        assert isinstance(lag, HistogramDataPoint)
        assert 90.0 == lag.max


class TestLazy:
    """The core never imports OpenTelemetry."""

    def test_core_does_not_import_opentelemetry(self) -> None:
        """A fresh interpreter running a sync has not imported opentelemetry."""
        code = (
            "import sys, cohortsync as cs\n"
            "from cohortsync.testing import MemoryStorage, RecordingDestination\n"
            "s = cs.Scheduler(MemoryStorage())\n"
            "s.add_destination('d', RecordingDestination())\n"
            "s.add_cohort(cs.Cohort(id='c', name='C', source=lambda: ['a']))\n"
            "s.create_sync('c', 'd', cs.SyncPolicy.hourly())\n"
            "s.run_due()\n"
            "sys.exit(any(m.startswith('opentelemetry') for m in sys.modules))\n"
        )

        assert 0 == subprocess.run([sys.executable, "-c", code], check=False).returncode  # noqa: S603 - fixed code

    def test_missing_api_is_a_clear_error(self) -> None:
        """Without the API installed, importing cohortsync.otel says which extra to install."""
        code = (
            "import sys\n"
            "sys.modules['opentelemetry'] = None\n"
            "try:\n"
            "    import cohortsync.otel\n"
            "except ImportError as e:\n"
            '    sys.exit(0 if "cohortsync[otel]" in str(e) else 2)\n'
            "sys.exit(1)\n"
        )

        assert 0 == subprocess.run([sys.executable, "-c", code], check=False).returncode  # noqa: S603 - fixed code

    def test_instrument_returns_the_listener(self, telemetry: Telemetry) -> None:
        """instrument() adds the listener to the scheduler and returns it."""
        scheduler = cs.Scheduler(MemoryStorage())

        listener = instrument(scheduler, tracer_provider=telemetry.tracer_provider)

        assert [listener] == scheduler._listeners
