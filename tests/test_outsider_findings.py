"""
What an outside tester found by building host applications from the docs
alone (a strict vendor over real HTTP, admin calls at odd moments, hostile
clocks), each pinned as a test that fails on the code before its fix.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import cohortsync as cs
from cohortsync.exceptions import ConfigurationError
from cohortsync.storage import MemoryStorage, SQLiteStorage, Storage
from cohortsync.testing import FakeClock, RecordingDestination

START = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)


def build(
    clock: FakeClock,
    destination: cs.Destination,
    members: list[str],
    *,
    storage: Storage | None = None,
    policy: cs.SyncPolicy | None = None,
) -> cs.Scheduler:
    scheduler = cs.Scheduler(storage or MemoryStorage(), clock=clock, seed=1)
    scheduler.add_destination("d", destination)
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: members))
    scheduler.create_sync("c", "d", policy or cs.SyncPolicy.hourly(), sync_id="s1")
    return scheduler


class TestRateLimitCountsFromTheEndOfARequest:
    """
    Found: with a real clock, six calls of RateLimit(5, 1 s) fell within
    0.9996 s at the vendor: a request arrives after it starts, so a slow one
    followed by fast ones crowded a window. The window is now counted from
    the end of the request `requests` places back.
    """

    @pytest.mark.parametrize("requests", [1, 2, 5])
    def test_arrivals_requests_apart_are_more_than_a_window_apart(self, requests: int) -> None:
        clock = FakeClock(START)
        arrivals: list[datetime] = []
        latencies = [0.6, 0.01, 0.3, 0.001, 0.45, 0.02, 0.9, 0.05]

        class Slow(RecordingDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                latency = latencies[len(arrivals) % len(latencies)]
                clock.advance(timedelta(seconds=latency))  # the request travels...
                arrivals.append(clock.now())  # ...arrives as late as possible
                return super().add(batch)

        limit = cs.RateLimit(requests, 1.0)
        destination = Slow(cs.Capabilities(max_batch_size=1, rate_limit=limit))
        scheduler = build(clock, destination, [f"u{i:02d}" for i in range(24)])

        scheduler.run_due()

        assert 24 == len(arrivals)
        gaps = [b - a for a, b in zip(arrivals, arrivals[requests:], strict=False)]
        assert min(gaps) > timedelta(seconds=1)


class FakeRetryAfter(RecordingDestination):
    """Answers 429 with the given Retry-After a few times, then accepts."""

    def __init__(self, retry_after: float, times: int = 3) -> None:
        super().__init__(cs.Capabilities(max_batch_size=10))
        self.retry_after = retry_after
        self.left = times
        self.calls = 0

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise cs.exceptions.RateLimitedError("429", retry_after=self.retry_after)
        return super().add(batch)


class TestRetryAfterValues:
    """
    Found: Retry-After 0, negative or NaN meant no wait at all (a vendor
    answering 429 forever was hit 1,001 times in 0.01 s); infinity failed the
    run with a raw OverflowError; a huge one held the worker for days.
    """

    @pytest.mark.parametrize("asked", [0.0, -5.0, math.nan])
    def test_a_meaningless_wait_falls_back_to_the_backoff(self, asked: float) -> None:
        clock = FakeClock(START)
        destination = FakeRetryAfter(asked)
        scheduler = build(clock, destination, ["u1"])

        (run,) = scheduler.run_due()

        assert cs.RunStatus.SUCCEEDED == run.status
        assert 3 == len([s for s in clock.slept if s > 0])  # a real wait each time

    @pytest.mark.parametrize("asked", [math.inf, 1e300, 400 * 86_400.0, 3_601.0])
    def test_a_wait_beyond_an_hour_ends_the_run_as_transient(self, asked: float) -> None:
        clock = FakeClock(START)
        destination = FakeRetryAfter(asked)
        scheduler = build(clock, destination, ["u1"])

        (run,) = scheduler.run_due()

        assert cs.RunStatus.FAILED == run.status
        assert "TransientError" == run.error_type
        assert "longest wait a run sits through" in (run.error_message or "")
        assert 1 == destination.calls
        assert sum(clock.slept) < 600  # the worker was not held
        assert cs.SyncStatus.ACTIVE == scheduler.get_sync("s1").status

    def test_an_honest_wait_is_honoured(self) -> None:
        clock = FakeClock(START)
        scheduler = build(clock, FakeRetryAfter(7.0, times=1), ["u1"])

        (run,) = scheduler.run_due()

        assert cs.RunStatus.SUCCEEDED == run.status
        assert 7.0 in clock.slept


class TestClocksBeforeTheEpoch:
    """
    Found: a sync created while the clock read 1970 or earlier never ran on
    SQLite (its own row was called damaged: next_due 0); memory ran it.
    """

    @pytest.mark.parametrize("year", [1969, 1970])
    def test_a_sync_created_in_the_sixties_runs(self, tmp_path: Path, year: int) -> None:
        clock = FakeClock(datetime(year, 1, 1, tzinfo=timezone.utc))
        with SQLiteStorage(tmp_path / "s.db") as storage:
            destination = RecordingDestination()
            scheduler = build(clock, destination, ["u1"], storage=storage)

            (run,) = scheduler.run_due()
            clock.set(datetime(2030, 1, 1, tzinfo=timezone.utc))  # the clock is corrected
            later = scheduler.run_due()

            assert cs.RunStatus.SUCCEEDED == run.status
            assert {"u1"} == destination.audience("s1")
            assert 1 == len(later)


class TestUpcomingAtTheEndOfTime:
    """Found: upcoming() in the last hour of year 9999 raised a bare ValueError."""

    def test_upcoming_lists_what_is_left(self) -> None:
        clock = FakeClock(datetime(9999, 12, 31, 23, 0, tzinfo=timezone.utc))
        scheduler = build(clock, RecordingDestination(), ["u1"])
        scheduler.run_due()

        upcoming = scheduler.upcoming(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc))

        assert all(u.sync_id == "s1" for u in upcoming)


class TestPausedSyncs:
    """
    Found: pausing a sync being deleted hid the deletion (reason "paused",
    members left for days); sync_now on a paused sync did nothing silently.
    """

    def test_pausing_a_deletion_keeps_it_visible_and_resume_finishes_it(self) -> None:
        clock = FakeClock(START)
        destination = RecordingDestination()
        policy = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)
        scheduler = build(clock, destination, ["u1", "u2"], policy=policy)
        scheduler.run_due()
        scheduler.delete_sync("s1")

        paused = scheduler.pause_sync("s1")
        clock.advance(timedelta(days=2))
        assert [] == scheduler.run_due()
        assert "deleting" in (paused.status_reason or "")
        assert {"u1", "u2"} == destination.audience("s1")

        scheduler.resume_sync("s1")
        (teardown,) = scheduler.run_due()
        assert cs.Trigger.TEARDOWN == teardown.trigger
        assert set() == destination.audience("s1")
        assert cs.SyncStatus.DELETED == scheduler.get_sync("s1").status

    def test_sync_now_on_a_paused_sync_is_refused(self) -> None:
        clock = FakeClock(START)
        scheduler = build(clock, RecordingDestination(), ["u1"])
        scheduler.pause_sync("s1")

        with pytest.raises(ConfigurationError, match="resume_sync"):
            scheduler.sync_now("s1")

    def test_a_full_resync_requested_while_paused_happens_after_resume(self) -> None:
        clock = FakeClock(START)
        destination = RecordingDestination()
        scheduler = build(clock, destination, ["u1"])
        scheduler.run_due()
        scheduler.pause_sync("s1")

        scheduler.request_full_resync("s1")
        scheduler.resume_sync("s1")
        (run,) = scheduler.run_due()

        assert run.full_sync
        assert 2 == len(destination.batches)  # u1 sent again


class TestSecondRound:
    """What the second outside attack found (after the first fixes)."""

    def test_deleting_again_keeps_a_parked_teardown_parked(self) -> None:
        clock = FakeClock(START)
        destination = RecordingDestination()
        policy = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)
        scheduler = build(clock, destination, ["u1"], policy=policy)
        scheduler.run_due()
        scheduler.delete_sync("s1")
        scheduler.pause_sync("s1")

        again = scheduler.delete_sync("s1")
        clock.advance(timedelta(hours=3))

        assert cs.SyncStatus.PAUSED == again.status
        assert [] == scheduler.run_due()
        assert {"u1"} == destination.audience("s1")

    def test_an_email_change_is_sent_by_a_full_resync_and_torn_down(self) -> None:
        """
        k1 stays in the cohort but its email changes: a full resync removes the
        old address and adds the new one (it used to add the new one and
        forget the old, which then survived even a REMOVE_DELIVERED teardown).
        """
        emails = {"k1": "old@x.io", "k2": "k2@x.io"}
        clock = FakeClock(START)
        destination = RecordingDestination()
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock, seed=1)
        scheduler.add_destination("d", destination)
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["k1", "k2"]))
        scheduler.add_mapping(
            "email", cs.IdentifierMapping([(cs.IdentifierKind.EMAIL, emails.get)])
        )
        policy = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)
        scheduler.create_sync("c", "d", policy, sync_id="s1", mapping_id="email")
        scheduler.run_due()
        emails["k1"] = "new@x.io"

        clock.advance(timedelta(hours=1))
        (ordinary,) = scheduler.run_due()
        assert (0, 0) == (ordinary.added, ordinary.removed)  # documented: full sends only
        scheduler.request_full_resync("s1")
        (full,) = scheduler.run_due()

        assert {"new@x.io", "k2@x.io"} == destination.audience("s1")
        assert "identifier_changed" in full.notes
        scheduler.delete_sync("s1")
        scheduler.run_due()
        assert set() == destination.audience("s1")
