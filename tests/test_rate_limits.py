"""
Pacing a destination: no window holds more requests than its rate limit, and
a vendor's Retry-After is honoured within bounds.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest

import cohortsync as cs
from cohortsync.testing import FakeClock, RecordingDestination
from single_sync import Members, build

START = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)


class TestRateLimitWindows:
    """`RateLimit(n, s)` allows at most n requests in any window of s seconds (12.15, 18.4)."""

    @pytest.mark.parametrize(
        ("requests", "per"), [(18, 1.0), (10, 1.0), (24, 86_400.0), (100, 10.0)]
    )
    def test_no_window_holds_more_than_the_limit(
        self, clock: FakeClock, requests: int, per: float
    ) -> None:
        """Reserved send times never put more than `requests` in any `per`-second window."""
        from cohortsync._delivery import RateLimiter

        limiter = RateLimiter(cs.RateLimit(requests=requests, per_seconds=per), clock)
        times: list[datetime] = []
        for _ in range(requests * 3 + 1):
            limiter.acquire()
            times.append(clock.now())

        window = timedelta(seconds=per)
        assert all(times[i + requests] - times[i] >= window for i in range(len(times) - requests))
        assert times[requests] - times[0] == window  # and no slower than it must be

    @pytest.mark.parametrize("preset", ["tiktok_ads", "hubspot", "marketo", "twitter_ads"])
    def test_catalog_presets_keep_their_first_window(self, clock: FakeClock, preset: str) -> None:
        """TikTok's 24 calls a day: at most 24 in the first 24 hours (was 47)."""
        from cohortsync._delivery import RateLimiter
        from cohortsync.destinations import catalog

        limit = catalog.PRESETS[preset].rate_limit
        assert limit is not None
        limiter = RateLimiter(limit, clock)
        start = clock.now()
        sent = []
        while clock.now() - start < timedelta(seconds=limit.per_seconds):
            limiter.acquire()
            sent.append(clock.now())
        in_first_window = [t for t in sent if t - start < timedelta(seconds=limit.per_seconds)]
        assert limit.requests == len(in_first_window)


class TestRateLimitCountsFromTheEndOfARequest:
    """Arrivals `requests` apart are more than a window apart, however long each request takes."""

    @pytest.mark.parametrize("requests", [1, 2, 5])
    def test_arrivals_requests_apart_are_more_than_a_window_apart(self, requests: int) -> None:
        """A slow request then fast ones no longer crowd a window (six in 0.9996 s)."""
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
        scheduler = build(clock, Members([f"u{i:02d}" for i in range(24)]), destination=destination)

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
    """A meaningless Retry-After falls back to the backoff; one beyond an hour ends the run."""

    @pytest.mark.parametrize("asked", [0.0, -5.0, math.nan])
    def test_a_meaningless_wait_falls_back_to_the_backoff(self, asked: float) -> None:
        """Retry-After 0, negative or NaN waits the backoff (it meant no wait at all)."""
        clock = FakeClock(START)
        destination = FakeRetryAfter(asked)
        scheduler = build(clock, Members(["u1"]), destination=destination)

        (run,) = scheduler.run_due()

        assert cs.RunStatus.SUCCEEDED == run.status
        assert 3 == len([s for s in clock.slept if s > 0])  # a real wait each time

    @pytest.mark.parametrize("asked", [math.inf, 1e300, 400 * 86_400.0, 3_601.0])
    def test_a_wait_beyond_an_hour_ends_the_run_as_transient(self, asked: float) -> None:
        """A Retry-After beyond an hour, or infinite, ends the run as transient."""
        clock = FakeClock(START)
        destination = FakeRetryAfter(asked)
        scheduler = build(clock, Members(["u1"]), destination=destination)

        (run,) = scheduler.run_due()

        assert cs.RunStatus.FAILED == run.status
        assert "TransientError" == run.error_type
        assert "longest wait a run sits through" in (run.error_message or "")
        assert 1 == destination.calls
        assert sum(clock.slept) < 600  # the worker was not held
        assert cs.SyncStatus.ACTIVE == scheduler.get_sync("s1").status

    def test_an_honest_wait_is_honoured(self) -> None:
        """A sensible Retry-After is waited out, then the batch goes through."""
        clock = FakeClock(START)
        scheduler = build(clock, Members(["u1"]), destination=FakeRetryAfter(7.0, times=1))

        (run,) = scheduler.run_due()

        assert cs.RunStatus.SUCCEEDED == run.status
        assert 7.0 in clock.slept
