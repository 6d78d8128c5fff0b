"""
Progress displays of the command line: the plain-text bar (redrawn in place
on a terminal, a line per tenth elsewhere), the rich one when rich is
installed, stepping aside for log lines, and the one rule that decides
whether to draw at all.
"""

from __future__ import annotations

import io
import sys
from datetime import datetime, timezone

import pytest

import cohortsync as cs
from cohortsync import _progress
from cohortsync._progress import ERASE, TextProgress, bar, make_display, wanted
from cohortsync.events import BatchDelivered, Event, RunPlanned
from cohortsync.testing import FakeClock, FaultyDestination
from single_sync import build, run_next

START = datetime(2030, 1, 1, tzinfo=timezone.utc)


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _listen(clock: FakeClock, display: _progress.Display, members: int, batch: int) -> cs.SyncRun:
    scheduler = build(
        clock,
        lambda: [f"k{i:04d}" for i in range(members)],
        destination=FaultyDestination(cs.Capabilities(max_batch_size=batch)),
        listeners=[display],
    )
    return run_next(scheduler, clock)


class TestWanted:
    """The demo and the worker decide whether to draw the same way."""

    @pytest.mark.parametrize(
        ("flag", "stream", "expected"),
        [
            (None, Terminal(), True),
            (None, io.StringIO(), False),
            (True, io.StringIO(), True),
            (False, Terminal(), False),
        ],
        ids=["auto-terminal", "auto-pipe", "forced-on", "forced-off"],
    )
    def test_wanted(self, flag: bool | None, stream: io.StringIO, expected: bool) -> None:
        """Asked for or refused, else only on a terminal."""
        assert expected == wanted(flag, stream)

    def test_bar(self) -> None:
        """A bar is as wide as asked and never overflows."""
        assert ["----", "##--", "####", "####"] == [bar(d, 4) for d in (0.0, 0.5, 1.0, 1.5)]


class TestTextProgress:
    """The plain-text display."""

    def test_a_line_per_tenth_off_a_terminal(self, clock: FakeClock) -> None:
        """Off a terminal: a line at the plan and as each tenth is passed, none redrawn."""
        out = io.StringIO()

        _listen(clock, TextProgress(out), members=10, batch=2)

        lines = out.getvalue().splitlines()
        assert [
            "  s1 [------------------------------]   0%  0/5 batches  0/10 members",
            "  s1 [######------------------------]  20%  1/5 batches  2/10 members",
            "  s1 [############------------------]  40%  2/5 batches  4/10 members",
            "  s1 [##################------------]  60%  3/5 batches  6/10 members",
            "  s1 [########################------]  80%  4/5 batches  8/10 members",
            "  s1 [##############################] 100%  5/5 batches  10/10 members",
        ] == lines
        assert ERASE not in out.getvalue()

    def test_redrawn_in_place_on_a_terminal(self, clock: FakeClock) -> None:
        """On a terminal the bar is redrawn over itself and erased when the run ends."""
        out = Terminal()

        _listen(clock, TextProgress(out), members=4, batch=2)

        text = out.getvalue()
        assert "\n" not in text
        assert 4 == text.count(ERASE)  # planned, two batches, then erased
        assert text.endswith(ERASE)
        assert "2/2 batches  4/4 members" in text

    def test_short_runs_draw_nothing(self, clock: FakeClock) -> None:
        """A run of fewer batches than min_batches gets no bar."""
        out = Terminal()

        _listen(clock, TextProgress(out, min_batches=3), members=4, batch=2)

        assert "" == out.getvalue()

    def test_steps_aside_for_a_log_line(self) -> None:
        """paused() erases the bar, lets the line through, then redraws it."""
        out = Terminal()
        display = TextProgress(out)
        display(_planned())
        out.seek(0)
        out.truncate()

        with display.paused():
            out.write("a log line\n")

        assert ERASE + "a log line\n" + ERASE + "  s1 [" == out.getvalue()[: len(ERASE) * 2 + 17]

    def test_paused_without_a_bar_writes_nothing(self) -> None:
        """With nothing drawn, stepping aside costs no output."""
        out = Terminal()

        with TextProgress(out).paused():
            pass

        assert "" == out.getvalue()

    def test_close_erases(self) -> None:
        """close() takes a drawn bar off the screen."""
        out = Terminal()
        display = TextProgress(out)
        display(_planned())

        display.close()

        assert out.getvalue().endswith(ERASE)

    def test_events_of_other_runs_are_ignored(self) -> None:
        """Only the run whose plan was announced last is drawn."""
        out = io.StringIO()
        display = TextProgress(out)
        display(_planned())
        event: Event = BatchDelivered(
            sync_id="other",
            run_id="other-run",
            operation=cs.Operation.ADD,
            sequence=1,
            size=5,
            rejected=0,
            idempotency_key="k",
            batches_done=1,
            batches_total=2,
            members_done=5,
            members_total=10,
        )

        display(event)

        assert 1 == len(out.getvalue().splitlines())


class TestMakeDisplay:
    """Which display the worker gets."""

    def test_plain_off_a_terminal(self) -> None:
        """Off a terminal the plain display is used, rich or not."""
        assert isinstance(make_display(io.StringIO()), TextProgress)

    def test_plain_when_rich_is_missing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """On a terminal without rich installed, the plain display."""
        monkeypatch.setitem(sys.modules, "rich", None)
        monkeypatch.setitem(sys.modules, "rich.console", None)

        assert isinstance(make_display(Terminal()), TextProgress)

    def test_rich_asked_for_but_missing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Asking for rich without it installed is an ImportError, not a silent fallback."""
        monkeypatch.setitem(sys.modules, "rich", None)
        monkeypatch.setitem(sys.modules, "rich.console", None)

        with pytest.raises(ImportError):
            make_display(Terminal(), use_rich=True)


class TestRichProgress:
    """The rich display, when rich is installed."""

    def test_bar_per_long_run(self, clock: FakeClock) -> None:
        """A task per long run, updated per batch, removed when the run ends."""
        pytest.importorskip("rich")
        out = Terminal()
        display = _progress.RichProgress(out, terminal=True)
        seen: list[tuple[float, float | None]] = []

        def spy(event: Event) -> None:
            display(event)
            seen.extend((t.completed, t.total) for t in display.progress.tasks)

        _listen(clock, spy, members=6, batch=2)

        assert [(0, 6), (2, 6), (4, 6), (6, 6)] == seen[:4]
        assert [] == display.progress.tasks
        assert "s1 (3 batches)" in out.getvalue()

    def test_paused_and_closed(self) -> None:
        """paused() stops the live display and starts it again; close() stops it."""
        pytest.importorskip("rich")
        display = _progress.RichProgress(Terminal(), terminal=True)
        display(_planned())
        assert display.progress.live.is_started

        with display.paused():
            assert not display.progress.live.is_started
        assert display.progress.live.is_started

        display.close()
        assert not display.progress.live.is_started

    def test_chosen_on_a_terminal(self) -> None:
        """make_display picks rich on a terminal when it is installed."""
        pytest.importorskip("rich")

        assert isinstance(make_display(Terminal()), _progress.RichProgress)


def _planned() -> RunPlanned:
    return RunPlanned(
        sync_id="s1",
        run_id="r1",
        destination_id="dest",
        slot=START,
        adds=10,
        removes=0,
        resends=0,
        batches=2,
        batch_size=5,
        full_sync=False,
        at=START,
    )
