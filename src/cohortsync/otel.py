"""
OpenTelemetry traces and metrics for cohortsync, built from the scheduler's
events: a span per run with a child span per batch, and counters and
histograms of runs, members, retries, rejections, latency and lag.

Needs the OpenTelemetry API (``pip install 'cohortsync[otel]'``); the rest
of cohortsync never imports it. The host configures the SDK and exporters
as for any instrumented library, then::

    from cohortsync.otel import instrument

    instrument(scheduler)

Every instant comes from the events, so from the scheduler's clock: a
``FakeClock`` gives spans on its own time line, and a span's timing is the
run's, not the moment the listener happened to see it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime, timedelta, timezone

import attrs

try:
    from opentelemetry import metrics, trace
    from opentelemetry.trace import Span, Status, StatusCode
except ImportError as e:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "cohortsync.otel needs the OpenTelemetry API: pip install 'cohortsync[otel]'"
    ) from e

from cohortsync._events import (
    BatchDelivered,
    EligibilityChanged,
    Event,
    GuardTripped,
    RunFinished,
    RunPlanned,
    RunStarted,
    SyncFailed,
)
from cohortsync._scheduler import Scheduler
from cohortsync._sync import RunStatus

__all__ = ["MAX_OPEN_RUNS", "OpenTelemetryListener", "instrument"]

MAX_OPEN_RUNS = 10_000
"""Most run spans kept open at once. A run whose end this listener never
sees (its worker lost the lease, or the listener was added mid-run) would
otherwise be held forever; the oldest beyond this many is ended as
abandoned."""

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NS = timedelta(microseconds=1)


def _ns(instant: datetime) -> int:
    """An aware instant as OpenTelemetry's nanoseconds since the epoch (exact to the µs)."""
    return (instant - _EPOCH) // _NS * 1_000


@attrs.frozen
class _OpenRun:
    span: Span
    sync_id: str
    destination_id: str | None


class OpenTelemetryListener:
    """
    A scheduler listener that turns events into spans and metrics.

    Spans: ``cohortsync.run`` from :class:`~cohortsync.events.RunStarted` to
    :class:`~cohortsync.events.RunFinished` (status ERROR when the run
    failed), with a child ``cohortsync.batch`` per
    :class:`~cohortsync.events.BatchDelivered`, from when the batch was
    recorded as in flight to its answer. The plan, a tripped guard, an
    eligibility change and a paused or failed sync are events on the run span.

    Metrics (see ``docs/operating.md`` for units and attributes):
    ``cohortsync.runs``, ``cohortsync.members.sent``,
    ``cohortsync.members.rejected``, ``cohortsync.retries``,
    ``cohortsync.batch.duration``, ``cohortsync.run.duration``,
    ``cohortsync.run.lag``, ``cohortsync.guard.trips`` and
    ``cohortsync.syncs.stopped``. Sync and run ids are span attributes only:
    a metric series per sync would not scale to 100,000 syncs.

    One listener may serve several schedulers and threads.

    Args:
        tracer_provider: Where spans go (default: the global provider).
        meter_provider: Where metrics go (default: the global provider).
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("cohortsync", tracer_provider=tracer_provider)
        meter = metrics.get_meter("cohortsync", meter_provider=meter_provider)
        self._runs = meter.create_counter(
            "cohortsync.runs", unit="{run}", description="Runs finished, by status."
        )
        self._sent = meter.create_counter(
            "cohortsync.members.sent",
            unit="{member}",
            description="Members sent to destinations in answered batches, by operation.",
        )
        self._rejected = meter.create_counter(
            "cohortsync.members.rejected",
            unit="{member}",
            description="Members destinations rejected, by operation.",
        )
        self._retries = meter.create_counter(
            "cohortsync.retries",
            unit="{retry}",
            description="Batch attempts retried after a transient error.",
        )
        self._batch_duration = meter.create_histogram(
            "cohortsync.batch.duration",
            unit="s",
            description="From a batch recorded as in flight to its answer, retries included.",
        )
        self._run_duration = meter.create_histogram(
            "cohortsync.run.duration", unit="s", description="Run duration, by status."
        )
        self._lag = meter.create_histogram(
            "cohortsync.run.lag", unit="s", description="How long after its slot a run started."
        )
        self._guard_trips = meter.create_counter(
            "cohortsync.guard.trips",
            unit="{run}",
            description="Runs whose removals the mass-removal guard held back.",
        )
        self._stopped = meter.create_counter(
            "cohortsync.syncs.stopped",
            unit="{sync}",
            description="Syncs paused or failed (left the schedule), by status.",
        )
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _OpenRun] = OrderedDict()
        """Open runs by run id, oldest first."""
        self._by_sync: dict[str, str] = {}
        """The open run of each sync, by sync id."""

    def __repr__(self) -> str:
        return f"OpenTelemetryListener(open_runs={len(self._open)})"

    def __call__(self, event: Event) -> None:
        """Record *event* (every event class is handled; the rest is ignored)."""
        if isinstance(event, BatchDelivered):
            self._batch(event)
        elif isinstance(event, RunStarted):
            self._started(event)
        elif isinstance(event, RunPlanned):
            self._planned(event)
        elif isinstance(event, RunFinished):
            self._finished(event)
        elif isinstance(event, GuardTripped):
            self._guard(event)
        elif isinstance(event, EligibilityChanged):
            self._eligibility(event)
        elif isinstance(event, SyncFailed):
            self._stopped_sync(event)

    # -- runs -----------------------------------------------------------------

    def _started(self, event: RunStarted) -> None:
        cadence = None if event.cadence is None else event.cadence.value
        attributes: dict[str, str] = {
            "cohortsync.sync_id": event.sync_id,
            "cohortsync.run_id": event.run_id,
            "cohortsync.trigger": event.trigger.value,
            "cohortsync.slot": event.slot.isoformat(),
        }
        metric: dict[str, str] = {"cohortsync.trigger": event.trigger.value}
        if event.destination_id is not None:
            attributes["cohortsync.destination_id"] = event.destination_id
            metric["cohortsync.destination_id"] = event.destination_id
        if cadence is not None:
            attributes["cohortsync.cadence"] = cadence
            metric["cohortsync.cadence"] = cadence
        span = self._tracer.start_span(
            "cohortsync.run", attributes=attributes, start_time=_ns(event.at)
        )
        self._lag.record(max((event.at - event.slot).total_seconds(), 0.0), metric)
        with self._lock:
            earlier = self._by_sync.get(event.sync_id)
            stale = [] if earlier is None else [self._forget(earlier)]
            self._open[event.run_id] = _OpenRun(span, event.sync_id, event.destination_id)
            self._by_sync[event.sync_id] = event.run_id
            while len(self._open) > MAX_OPEN_RUNS:
                stale.append(self._forget(next(iter(self._open))))
        for old in stale:
            if old is not None:
                # A sync runs once at a time: an earlier run still open here
                # ended without this listener hearing of it.
                old.span.set_status(Status(StatusCode.ERROR, "run ended unseen (lease lost?)"))
                old.span.end(end_time=_ns(event.at))

    def _forget(self, run_id: str) -> _OpenRun | None:
        """Drop an open run (the caller holds the lock) and return it."""
        entry = self._open.pop(run_id, None)
        if entry is not None and self._by_sync.get(entry.sync_id) == run_id:
            del self._by_sync[entry.sync_id]
        return entry

    def _planned(self, event: RunPlanned) -> None:
        span = self._span(event.run_id)
        if span is None:
            return
        planned = {
            "cohortsync.planned.adds": event.adds,
            "cohortsync.planned.removes": event.removes,
            "cohortsync.planned.resends": event.resends,
            "cohortsync.planned.batches": event.batches,
        }
        span.set_attributes({**planned, "cohortsync.full_sync": event.full_sync})
        span.add_event("cohortsync.planned", planned, timestamp=_ns(event.at))

    def _finished(self, event: RunFinished) -> None:
        run = event.run
        with self._lock:
            entry = self._forget(run.id)
        span = None if entry is None else entry.span
        destination = event.destination_id
        if destination is None and entry is not None:
            destination = entry.destination_id
        if span is None:
            # Started before this listener was added (or by another worker's
            # crash takeover): the record has all the span needs.
            span = self._tracer.start_span(
                "cohortsync.run",
                attributes={
                    "cohortsync.sync_id": run.sync_id,
                    "cohortsync.run_id": run.id,
                    "cohortsync.trigger": run.trigger.value,
                    "cohortsync.slot": run.slot.isoformat(),
                },
                start_time=_ns(run.started_at),
            )
        metric: dict[str, str] = {
            "cohortsync.status": run.status.value,
            "cohortsync.cadence": run.cadence.value,
            "cohortsync.trigger": run.trigger.value,
        }
        attributes: dict[str, str | int | bool] = {
            "cohortsync.status": run.status.value,
            "cohortsync.cadence": run.cadence.value,
            "cohortsync.added": run.added,
            "cohortsync.removed": run.removed,
            "cohortsync.skipped": run.skipped,
            "cohortsync.rejected": run.rejected,
            "cohortsync.batches": run.batches,
            "cohortsync.retries": run.retries,
            "cohortsync.full_sync": run.full_sync,
        }
        if destination is not None:
            metric["cohortsync.destination_id"] = destination
            attributes["cohortsync.destination_id"] = destination
        if run.error_type is not None:
            attributes["error.type"] = run.error_type
        span.set_attributes(attributes)
        if run.status is RunStatus.FAILED:
            # The class only: an adapter's message may quote what it sent.
            span.set_status(Status(StatusCode.ERROR, run.error_type or "failed"))
        span.end(end_time=_ns(run.finished_at))
        self._runs.add(1, metric)
        self._run_duration.record(run.duration, metric)
        if run.retries:
            by_destination = {k: v for k, v in metric.items() if k == "cohortsync.destination_id"}
            self._retries.add(run.retries, by_destination)

    # -- batches ----------------------------------------------------------------

    def _batch(self, event: BatchDelivered) -> None:
        metric: dict[str, str] = {"cohortsync.operation": event.operation.value}
        if event.destination_id is not None:
            metric["cohortsync.destination_id"] = event.destination_id
        self._sent.add(event.size, metric)
        if event.rejected:
            self._rejected.add(event.rejected, metric)
        if event.started_at is None or event.at is None:
            return  # built by hand, without instants: counted, not timed
        self._batch_duration.record(max((event.at - event.started_at).total_seconds(), 0.0), metric)
        parent = self._span(event.run_id)
        span = self._tracer.start_span(
            "cohortsync.batch",
            context=None if parent is None else trace.set_span_in_context(parent),
            attributes={
                "cohortsync.sync_id": event.sync_id,
                "cohortsync.run_id": event.run_id,
                "cohortsync.operation": event.operation.value,
                "cohortsync.batch.sequence": event.sequence,
                "cohortsync.batch.size": event.size,
                "cohortsync.batch.rejected": event.rejected,
                "cohortsync.batch.idempotency_key": event.idempotency_key,
                **metric,
            },
            start_time=_ns(event.started_at),
        )
        span.end(end_time=_ns(event.at))

    # -- what happens to syncs -----------------------------------------------------

    def _guard(self, event: GuardTripped) -> None:
        self._guard_trips.add(1, self._destination_of(event.run_id))
        span = self._span(event.run_id)
        if span is not None:
            span.add_event(
                "cohortsync.guard_tripped",
                {
                    "cohortsync.delivered": event.delivered,
                    "cohortsync.removing": event.removing,
                    "cohortsync.source_empty": event.source_empty,
                },
                timestamp=_ns(event.at),
            )

    def _eligibility(self, event: EligibilityChanged) -> None:
        span = self._sync_span(event.sync_id)
        if span is not None:
            span.add_event(
                "cohortsync.eligibility_changed",
                {
                    "cohortsync.eligible": event.eligible,
                    "cohortsync.codes": list(event.codes),
                    "cohortsync.cadence": event.cadence.value,
                },
                timestamp=_ns(event.at),
            )

    def _stopped_sync(self, event: SyncFailed) -> None:
        self._stopped.add(1, {"cohortsync.status": event.status.value})
        span = self._sync_span(event.sync_id)
        if span is not None:
            span.add_event(
                "cohortsync.sync_stopped",
                {"cohortsync.status": event.status.value, "cohortsync.reason": event.reason},
                timestamp=_ns(event.at),
            )

    # -- lookups ------------------------------------------------------------------

    def _span(self, run_id: str) -> Span | None:
        with self._lock:
            entry = self._open.get(run_id)
        return None if entry is None else entry.span

    def _sync_span(self, sync_id: str) -> Span | None:
        with self._lock:
            run_id = self._by_sync.get(sync_id)
            entry = None if run_id is None else self._open.get(run_id)
        return None if entry is None else entry.span

    def _destination_of(self, run_id: str) -> dict[str, str]:
        with self._lock:
            entry = self._open.get(run_id)
        if entry is None or entry.destination_id is None:
            return {}
        return {"cohortsync.destination_id": entry.destination_id}


def instrument(
    scheduler: Scheduler,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> OpenTelemetryListener:
    """
    Add an :class:`OpenTelemetryListener` to *scheduler* and return it (to
    add to other schedulers of the process too, if you like).

    Args:
        scheduler: The scheduler whose runs to trace and measure.
        tracer_provider: Where spans go (default: the global provider).
        meter_provider: Where metrics go (default: the global provider).

    Returns:
        The listener, already added.
    """
    listener = OpenTelemetryListener(tracer_provider=tracer_provider, meter_provider=meter_provider)
    scheduler.add_listener(listener)
    return listener
