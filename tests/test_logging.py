"""
Logging: the documented logger names, the NullHandler, the fields every
record about a run carries, one INFO line at each end of a run, no member
key at INFO or above, and nothing built for a level that is off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

import cohortsync
import cohortsync as cs
from cohortsync import _delivery, _events, _run, _scheduler
from cohortsync.destinations import _webhook
from cohortsync.storage import Lease, _sql
from cohortsync.testing import FakeClock, Fault, FaultyDestination
from single_sync import build, run_next

START = datetime(2030, 1, 1, tzinfo=timezone.utc)

DOCS = Path(__file__).parent.parent / "docs"

RUN_FIELDS = ("sync_id", "run_id", "slot", "destination_id")
FINISH_FIELDS = (
    "status",
    "added",
    "removed",
    "skipped",
    "rejected",
    "batches",
    "retries",
    "duration",
)
# Every attribute a LogRecord has by itself: the rest came in through extra=.
STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record under ``cohortsync`` at DEBUG, whatever pytest's own capture does."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("cohortsync")
    handler = Keep(logging.DEBUG)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def _extra(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in STANDARD}


class TestLoggerNames:
    """The logger names are the documented ones."""

    def test_package_logger_has_a_null_handler(self) -> None:
        """Importing cohortsync adds a NullHandler to its logger, and only that."""
        handlers = logging.getLogger("cohortsync").handlers

        assert [logging.NullHandler] == [type(h) for h in handlers]
        assert "cohortsync" == cohortsync.__name__

    def test_module_loggers(self) -> None:
        """Runs, delivery, the scheduler, listeners, stores and adapters log under their names."""
        assert {
            "run": "cohortsync.run",
            "events": "cohortsync.run",
            "delivery": "cohortsync.delivery",
            "scheduler": "cohortsync.scheduler",
            "storage": "cohortsync.storage",
            "destinations": "cohortsync.destinations",
        } == {
            "run": _run.log.name,
            "events": _events.log.name,
            "delivery": _delivery.log.name,
            "scheduler": _scheduler.log.name,
            "storage": _sql.log.name,
            "destinations": _webhook.log.name,
        }

    @pytest.mark.parametrize(
        "name",
        [
            "cohortsync",
            "cohortsync.run",
            "cohortsync.delivery",
            "cohortsync.scheduler",
            "cohortsync.storage",
            "cohortsync.destinations",
        ],
    )
    def test_documented(self, name: str) -> None:
        """The operating page lists each logger name."""
        assert f"`{name}`" in (DOCS / "operating.md").read_text(encoding="utf-8")


class TestRunLines:
    """A run logs one INFO line as it starts and one as it ends, with its fields."""

    def test_one_line_at_each_end(self, clock: FakeClock, records: list[logging.LogRecord]) -> None:
        """Exactly two INFO lines: started, and finished with every count."""
        scheduler = build(clock, lambda: ["a", "b", "c"])

        run = run_next(scheduler, clock)

        info = [r for r in records if r.levelno == logging.INFO]
        assert ["cohortsync.run", "cohortsync.run"] == [r.name for r in info]
        started, finished = info
        assert "started" in started.getMessage()
        assert {
            "sync_id": "s1",
            "run_id": run.id,
            "slot": run.slot.isoformat(),
            "destination_id": "dest",
            "status": "succeeded",
            "added": 3,
            "removed": 0,
            "skipped": 0,
            "rejected": 0,
            "batches": 1,
            "retries": 0,
            "duration": 0.0,
        } == {k: v for k, v in _extra(finished).items() if k in RUN_FIELDS + FINISH_FIELDS}
        assert {"trigger": "scheduled", "cadence": "hourly"} == {
            k: _extra(started)[k] for k in ("trigger", "cadence")
        }

    def test_ids_in_the_text_too(self, clock: FakeClock, records: list[logging.LogRecord]) -> None:
        """The sync id, run id and slot lead the message of both lines."""
        scheduler = build(clock, lambda: ["a"])

        run = run_next(scheduler, clock)

        lead = f"sync s1 run {run.id} slot {run.slot.isoformat()}: "
        info = [r.getMessage() for r in records if r.levelno == logging.INFO]
        assert [True, True] == [m.startswith(lead) for m in info]
        assert "succeeded +1 -0 skipped=0 rejected=0 batches=1 retries=0" in info[1]

    def test_every_record_about_the_run_carries_its_fields(
        self, clock: FakeClock, records: list[logging.LogRecord]
    ) -> None:
        """Retries, batches, the plan and skips: each record names sync, run and slot."""
        dest = FaultyDestination(
            cs.Capabilities(max_batch_size=2),
            script={0: Fault.server_error(), 2: Fault.rate_limited(retry_after=2)},
        )
        scheduler = build(clock, lambda: ["a", "b", "c", "", None], destination=dest)

        run = run_next(scheduler, clock)

        about = [r for r in records if r.name in ("cohortsync.run", "cohortsync.delivery")]
        assert len(about) >= 7  # started, planned, 2 batches, retry, rate limit, skip, finished
        missing = [
            (r.name, r.getMessage()) for r in about if any(f not in vars(r) for f in RUN_FIELDS)
        ]
        assert [] == missing
        assert {run.id} == {vars(r)["run_id"] for r in about}
        assert all(f"run {run.id}" in r.getMessage() for r in about)

    def test_retry_lines_name_the_batch(
        self, clock: FakeClock, records: list[logging.LogRecord]
    ) -> None:
        """A transient error's line names sync, run, slot, destination and batch."""
        dest = FaultyDestination(cs.Capabilities(), script={0: Fault.server_error()})
        scheduler = build(clock, lambda: ["a"], destination=dest)

        run = run_next(scheduler, clock)

        (retry,) = [r for r in records if r.name == "cohortsync.delivery"]
        assert (logging.INFO, 1, 1) == (retry.levelno, vars(retry)["batch"], run.retries)
        assert {
            "sync_id": "s1",
            "run_id": run.id,
            "slot": run.slot.isoformat(),
            "destination_id": "dest",
        } == {k: vars(retry)[k] for k in RUN_FIELDS}
        assert retry.getMessage().startswith(
            f"sync s1 run {run.id} slot {run.slot.isoformat()} destination dest batch 1: "
            "transient error (TransientError); retry 1 in "
        )

    def test_plan_and_batches_at_debug(
        self, clock: FakeClock, records: list[logging.LogRecord]
    ) -> None:
        """DEBUG tells the plan's totals and each batch against them."""
        scheduler = build(
            clock,
            lambda: [f"k{i}" for i in range(5)],
            destination=FaultyDestination(cs.Capabilities(max_batch_size=2)),
        )

        run_next(scheduler, clock)

        debug = [r.getMessage().split(": ", 1)[1] for r in records if r.levelno == logging.DEBUG]
        assert [
            "planned +5 -0 resend=0 in 3 batch(es) of up to 2",
            "batch 1 add: 2 sent, 0 rejected; 1/3 batches, 2/5 members",
            "batch 2 add: 2 sent, 0 rejected; 2/3 batches, 4/5 members",
            "batch 3 add: 1 sent, 0 rejected; 3/3 batches, 5/5 members",
        ] == debug


class TestSchedulerLines:
    """The scheduler's lines about a run name it too."""

    def test_lost_lease(self, records: list[logging.LogRecord]) -> None:
        """A lost lease's WARNING names the sync, run and slot, in text and fields."""
        lease = Lease(
            sync_id="s1",
            generation=1,
            slot=START,
            trigger=cs.Trigger.SCHEDULED,
            owner="w",
            token="t",  # noqa: S106 - a lease token, not a password
            expires_at=START,
        )

        _scheduler._lease_lost(lease, "r1")

        (record,) = records
        assert ("cohortsync.scheduler", logging.WARNING) == (record.name, record.levelno)
        assert {"sync_id": "s1", "run_id": "r1", "slot": START.isoformat()} == _extra(record)
        assert record.getMessage().startswith(f"sync s1 run r1 slot {START.isoformat()}: lost")


class TestNoMemberKeys:
    """Member keys never reach INFO or above."""

    def test_a_run_with_rejections_skips_and_retries(
        self, clock: FakeClock, records: list[logging.LogRecord]
    ) -> None:
        """Every record at INFO+, text, fields and traceback, is free of member keys."""
        members = [f"member-XYZ-{i:03d}" for i in range(12)]
        script = {
            0: Fault.server_error(),
            1: Fault.rate_limited(retry_after=3),
            2: Fault.reject(identifiers={members[1]}),
            3: Fault.bad_data({members[4]}),
            9: Fault.permanent(),
        }
        dest = FaultyDestination(cs.Capabilities(max_batch_size=4), script=script)
        source = [*members, "", None]
        scheduler = build(clock, lambda: list(source), destination=dest)

        first = run_next(scheduler, clock)
        source[:] = members[:5]
        second = run_next(scheduler, clock)

        assert (cs.RunStatus.PARTIAL, 1, 2) == (first.status, first.rejected, first.skipped)
        assert first.retries >= 1
        assert "PermanentError" == second.error_type
        loud = [r for r in records if r.levelno >= logging.INFO]
        texts = [
            " ".join([r.getMessage(), r.exc_text or "", *map(str, _extra(r).values())])
            for r in loud
        ]
        assert [] == [t for t in texts if "member-XYZ" in t]
        # The check saw what it had to see: both runs' lines, a retry, the failure.
        assert {first.id, second.id} <= {_extra(r).get("run_id") for r in loud}
        assert any(r.name == "cohortsync.delivery" for r in loud)
        assert any(r.levelno >= logging.WARNING for r in loud)


def _loud_texts(records: list[logging.LogRecord]) -> list[str]:
    """Each INFO+ record's text, traceback and fields, as one string."""
    return [
        " ".join([r.getMessage(), r.exc_text or "", *map(str, _extra(r).values())])
        for r in records
        if r.levelno >= logging.INFO
    ]


class _Buggy(cs.Destination):
    """An adapter with a bug whose message quotes the members it got."""

    capabilities = cs.Capabilities(max_batch_size=10)

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        raise ValueError(f"cannot handle {list(batch.identifiers)}")

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()


class TestForeignExceptions:
    """An exception from host code is at ERROR by its class, its text and traceback at DEBUG."""

    def test_an_adapter_bug(self, clock: FakeClock, records: list[logging.LogRecord]) -> None:
        """One ERROR line naming the batch and the class; the members only at DEBUG."""
        scheduler = build(clock, lambda: ["member-XYZ-1", "member-XYZ-2"], destination=_Buggy())

        run = run_next(scheduler, clock)

        assert cs.RunStatus.FAILED == run.status
        errors = [r for r in records if r.levelno == logging.ERROR]
        assert 1 == len(errors)
        (error,) = errors
        assert "cohortsync.delivery" == error.name
        assert "ValueError" in error.getMessage()
        assert "_Buggy.add()" in error.getMessage()
        assert {
            "sync_id": "s1",
            "run_id": run.id,
            "batch": 1,
            "error_type": "ValueError",
        }.items() <= (_extra(error).items())
        assert error.exc_info is None
        assert [] == [t for t in _loud_texts(records) if "member-XYZ" in t]
        debug = [r for r in records if r.levelno == logging.DEBUG and r.exc_info]
        assert any("member-XYZ-1" in r.getMessage() for r in debug)

    def test_a_resolver_and_a_listener_that_raise(
        self, clock: FakeClock, records: list[logging.LogRecord]
    ) -> None:
        """A failing bulk lookup and listener: ERROR lines with the run's fields, no member key."""

        def lookup(keys: object) -> dict[str, str]:
            raise RuntimeError(f"lookup failed for {keys}")

        def listener(event: object) -> None:
            raise RuntimeError(f"listener saw {event!r} and member-XYZ-1")

        mapping = cs.IdentifierMapping(
            rules=[(cs.IdentifierKind.USER_ID, cs.identifiers.Bulk(lookup))]
        )
        scheduler = build(
            clock,
            lambda: ["member-XYZ-1"],
            mapping=mapping,
            listeners=[listener],
        )

        run = run_next(scheduler, clock)

        assert cs.RunStatus.FAILED == run.status
        errors = [r for r in records if r.levelno == logging.ERROR]
        assert {"cohortsync.run"} == {r.name for r in errors}
        assert any(
            "RuntimeError" in r.getMessage() and "listener" in r.getMessage() for r in errors
        )
        assert any("failed unexpectedly" in r.getMessage() for r in errors)
        finished = [r for r in errors if "RunFinished" in r.getMessage()]
        assert finished
        assert {"slot", "destination_id"} <= set(_extra(finished[0]))
        assert [] == [t for t in _loud_texts(records) if "member-XYZ" in t]


class TestNothingBuiltWhenOff:
    """A level that is off costs no message and no fields."""

    def test_no_fields_built_at_warning(
        self, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With cohortsync at WARNING, a run builds no run-log fields; at INFO it does."""
        built: list[str] = []
        fields = _run._fields

        def counting(*args: object, **more: object) -> dict[str, object]:
            built.append("x")
            return fields(*args, **more)  # type: ignore[arg-type]

        monkeypatch.setattr(_run, "_fields", counting)
        logger = logging.getLogger("cohortsync")
        old = logger.level
        try:
            logger.setLevel(logging.WARNING)
            scheduler = build(clock, lambda: ["a", "b"])
            run_next(scheduler, clock)
            quiet = len(built)
            logger.setLevel(logging.INFO)
            run_next(scheduler, clock)
        finally:
            logger.setLevel(old)

        assert (0, 2) == (quiet, len(built))
