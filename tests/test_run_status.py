"""
What a run's status says: a source of the wrong shape fails the run, and a
run that skipped members is partial, never succeeded.
"""

from __future__ import annotations

import logging

import pytest

import cohortsync as cs
from cohortsync.exceptions import (
    SourceError,
)
from cohortsync.testing import FakeClock, RecordingDestination
from single_sync import Members, build, run_next

EMAIL = cs.IdentifierKind.EMAIL


class TestSourceShape:
    """A snapshot that is not a collection of keys is a SourceError naming the cohort (12.2)."""

    @pytest.mark.parametrize("junk", ["u1", b"u1", {"u1": 1}, bytearray(b"u1")])
    def test_str_bytes_and_mappings_are_refused(self, clock: FakeClock, junk: object) -> None:
        """`lambda: "u1"` is refused instead of delivering "u" and "1"."""
        dest = RecordingDestination()
        scheduler = build(clock, lambda: junk, destination=dest)

        run = run_next(scheduler, clock)

        assert (cs.RunStatus.FAILED, "SourceError") == (run.status, run.error_type)
        assert "'c'" in (run.error_message or "") or "c" in (run.error_message or "")
        assert [] == dest.batches
        with pytest.raises(SourceError, match="not a collection of member keys"):
            scheduler.preview("s1")


class TestSkippedIsNotSucceeded:
    """A run that skipped members is `partial`; nothing valid at all is `failed` (12.3)."""

    def test_integer_keys_fail_the_run_with_the_reason(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Django-style integer primary keys: the run fails, says why, and logs a warning."""
        dest = RecordingDestination()
        scheduler = build(clock, lambda: [1, 2, 3], destination=dest)

        with caplog.at_level(logging.WARNING, logger="cohortsync"):
            run = run_next(scheduler, clock)

        assert (cs.RunStatus.FAILED, 3, "SourceError") == (
            run.status,
            run.skipped,
            run.error_type,
        )
        assert "not a str (int)" in (run.error_message or "")
        assert [] == dest.batches
        assert any("invalid member key" in r.getMessage() for r in caplog.records)
        assert 3 == len(scheduler.export_history("s1")[0]["members"])  # type: ignore[arg-type]

    def test_some_skipped_members_make_a_partial_run(self, clock: FakeClock) -> None:
        """One unresolvable member among three: `partial`, not `succeeded`."""
        emails = {"u1": "a@example.com", "u2": "b@example.com"}
        scheduler = build(
            clock,
            Members(["u1", "u2", "u3"]),
            mapping=cs.IdentifierMapping([(EMAIL, emails.get)]),
        )

        run = run_next(scheduler, clock)

        assert (cs.RunStatus.PARTIAL, 2, 1) == (run.status, run.added, run.skipped)
