"""
Progress of long runs, drawn from events, for the command line (the demo's
bar and ``cohortsync worker --progress``): plain text, or ``rich`` when it is
installed. Nothing here is imported by the library's core, and ``rich`` is
imported only when a rich display is made.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, TextIO

import attrs

from cohortsync._events import BatchDelivered, Event, RunFinished, RunPlanned

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["Display", "RichProgress", "TextProgress", "bar", "make_display", "wanted"]

MIN_BATCHES = 2
"""Runs planning fewer batches get no bar: one request has no progress to show."""

ERASE = "\r\x1b[K"
"""Back to the start of the line and erase it (ANSI; every terminal today)."""


def wanted(flag: bool | None, stream: TextIO) -> bool:
    """
    Whether to draw progress: as asked (``--progress`` / ``--no-progress``),
    else only when *stream* is a terminal. The demo and the worker decide
    the same way.
    """
    if flag is not None:
        return flag
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def bar(done: float, width: int = 30) -> str:
    """A bar of ``#`` and ``-`` for a share *done* between 0 and 1."""
    filled = int(width * min(max(done, 0.0), 1.0))
    return "#" * filled + "-" * (width - filled)


class Display(Protocol):
    """A progress display: an event listener whose output can step aside for a log line."""

    def __call__(self, event: Event) -> None: ...

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """While inside, the display is off the screen (a log line is being written)."""
        ...

    def close(self) -> None: ...


@attrs.define
class _Run:
    sync_id: str
    run_id: str
    batches_total: int
    members_total: int
    batches_done: int = 0
    members_done: int = 0
    step: int = -1
    """The last tenth reported (for streams that are not terminals)."""

    @property
    def share(self) -> float:
        if self.members_total:
            return self.members_done / self.members_total
        return self.batches_done / self.batches_total if self.batches_total else 1.0

    def text(self) -> str:
        return (
            f"  {self.sync_id} [{bar(self.share)}] {self.share:4.0%}  "
            f"{self.batches_done}/{self.batches_total} batches  "
            f"{self.members_done:,}/{self.members_total:,} members"
        )


class TextProgress:
    """
    A one-line bar for the run in progress, redrawn in place on a terminal;
    elsewhere, a line at each tenth of the way.

    Args:
        stream: Where to draw (the worker uses standard error, as tqdm does).
        min_batches: Runs planning fewer batches get no bar.
        terminal: Whether *stream* is a terminal (default: ask it).
    """

    def __init__(
        self, stream: TextIO, *, min_batches: int = MIN_BATCHES, terminal: bool | None = None
    ) -> None:
        self._stream = stream
        self._min_batches = min_batches
        self._terminal = wanted(terminal, stream)
        self._run: _Run | None = None
        self._drawn = False
        self._lock = threading.RLock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, RunPlanned):
                self._end()
                if event.batches >= self._min_batches:
                    self._run = _Run(event.sync_id, event.run_id, event.batches, event.members)
                    self._draw()
            elif isinstance(event, BatchDelivered):
                run = self._run
                if run is not None and event.run_id == run.run_id:
                    run.batches_done = event.batches_done
                    run.members_done = event.members_done
                    run.batches_total = max(run.batches_total, event.batches_total)
                    run.members_total = max(run.members_total, event.members_total)
                    self._draw()
            elif (
                isinstance(event, RunFinished)
                and self._run is not None
                and event.run.id == self._run.run_id
            ):
                self._end()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            drawn = self._drawn
            if drawn:
                self._write(ERASE)
                self._drawn = False
            try:
                yield
            finally:
                if drawn:
                    self._draw()

    def close(self) -> None:
        with self._lock:
            self._end()

    def _draw(self) -> None:
        run = self._run
        if run is None:
            return
        if self._terminal:
            self._write(ERASE + run.text())
            self._drawn = True
            return
        step = int(run.share * 10)
        if step > run.step:
            run.step = step
            self._write(run.text() + "\n")

    def _end(self) -> None:
        """The run is over (or another began): take its bar off the screen."""
        if self._drawn:
            self._write(ERASE)
            self._drawn = False
        self._run = None

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()


class RichProgress:
    """
    A ``rich`` progress bar per long run, with its rate and time left; it
    disappears when the run finishes (its end is in the log).

    Args:
        stream: Where to draw.
        min_batches: Runs planning fewer batches get no bar.
        terminal: Force ``rich`` to treat *stream* as a terminal (tests).

    Raises:
        ImportError: ``rich`` is not installed.
    """

    def __init__(
        self, stream: TextIO, *, min_batches: int = MIN_BATCHES, terminal: bool | None = None
    ) -> None:
        from rich.console import Console  # noqa: PLC0415 - rich is optional
        from rich.progress import (  # noqa: PLC0415 - rich is optional
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self._min_batches = min_batches
        self.progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(file=stream, force_terminal=terminal),
            transient=True,
            # Log lines go to their own stream; the worker steps the bar
            # aside for them (paused) instead of rich rerouting them.
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._live = False
        self._lock = threading.RLock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, RunPlanned):
                if event.batches >= self._min_batches:
                    self._tasks[event.run_id] = self.progress.add_task(
                        f"{event.sync_id} ({event.batches} batches)", total=event.members
                    )
                    self._start()
            elif isinstance(event, BatchDelivered):
                task = self._tasks.get(event.run_id)
                if task is not None:
                    self.progress.update(
                        task, completed=event.members_done, total=event.members_total
                    )
            elif isinstance(event, RunFinished):
                task = self._tasks.pop(event.run.id, None)
                if task is not None:
                    self.progress.remove_task(task)
                    if not self._tasks:
                        self._stop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            live = self._live
            if live:
                self._stop()
            try:
                yield
            finally:
                if live:
                    self._start()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> None:
        if not self._live:
            self.progress.start()
            self._live = True

    def _stop(self) -> None:
        if self._live:
            self.progress.stop()
            self._live = False


def make_display(
    stream: TextIO, *, use_rich: bool | None = None, min_batches: int = MIN_BATCHES
) -> Display:
    """
    A progress display on *stream*: ``rich`` when it is installed and
    *stream* is a terminal (or *use_rich* says so), else plain text.

    Raises:
        ImportError: *use_rich* is true and ``rich`` is not installed.
    """
    if use_rich is None:
        use_rich = wanted(None, stream)
        if use_rich:
            try:
                return RichProgress(stream, min_batches=min_batches)
            except ImportError:
                use_rich = False
    if use_rich:
        return RichProgress(stream, min_batches=min_batches)
    return TextProgress(stream, min_batches=min_batches)
