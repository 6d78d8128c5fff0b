"""
The ``cohortsync`` command line (standard library only).

    cohortsync demo                      a simulated day of syncs, printed as history
    cohortsync syncs --db FILE           the syncs in a store
    cohortsync history SYNC --db FILE    a sync's runs, newest first
    cohortsync upcoming --db FILE        runs due in the next hours
    cohortsync check ...                 eligibility of a cohort for a destination
    cohortsync worker --app mod:attr     run a host's scheduler until SIGINT/SIGTERM
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import re
import signal
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from datetime import date, datetime, time, timedelta, timezone
from itertools import islice
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, TextIO

from typing_extensions import override

from cohortsync._clock import SystemClock
from cohortsync._cohort import Cohort, CohortType
from cohortsync._converter import unstructure
from cohortsync._events import BatchDelivered, RunFinished, RunPlanned
from cohortsync._policy import _TIMED, _ZONED, Cadence, SyncPolicy
from cohortsync._progress import Display, make_display, wanted
from cohortsync._scheduler import Scheduler
from cohortsync._sync import Sync
from cohortsync.destinations import catalog
from cohortsync.eligibility import check_eligibility
from cohortsync.exceptions import CohortSyncError, ConfigurationError

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_READER_GONE = 128 + 13
"""What a command killed by SIGPIPE exits with, so ``set -o pipefail`` scripts
recognise a reader that stopped early (``| head``) as they do for ``cat``."""


class _CliError(Exception):
    """
    A problem to report in one line, with a non-zero exit code.
    """


def _open_store(path: str) -> Scheduler:
    from cohortsync.storage._sqlite import SQLiteStorage  # noqa: PLC0415 - only for store commands

    if not Path(path).is_file():
        raise _CliError(f"no store at {path!r} (give an existing SQLite file with --db)")
    return Scheduler(SQLiteStorage(path), clock=SystemClock())


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from cohortsync._demo import run_demo  # noqa: PLC0415 - the demo pulls in the adapters

    progress = False if args.no_progress else None
    return run_demo(
        directory=Path(args.dir) if args.dir else None,
        hours=args.hours,
        seed=args.seed,
        progress=progress,
        out=out,
    )


def _cmd_syncs(args: argparse.Namespace, out: TextIO) -> int:
    scheduler = _open_store(args.db)
    try:
        # Streamed: the store is read a page at a time, and no further than --limit.
        syncs = islice(scheduler.iter_syncs(), args.limit)
        if args.json:
            out.write("[")
            wrote = False
            for sync in syncs:
                out.write(",\n" if wrote else "\n")
                out.write(textwrap.indent(json.dumps(unstructure(sync), indent=2), "  "))
                wrote = True
            out.write("\n]\n" if wrote else "]\n")
            return 0
        print(
            f"{'sync':<24} {'cohort':<16} {'destination':<14} {'status':<9} gen  schedule",
            file=out,
        )
        shown = 0
        for s in syncs:
            shown += 1
            print(
                f"{s.id:<24} {s.cohort_id:<16} {s.destination_id:<14} "
                f"{s.status.value:<9} {s.generation:<4} {_schedule_text(s)}",
                file=out,
            )
        if not shown:
            print("(no syncs)", file=out)
        elif shown == args.limit and next(scheduler.iter_syncs(after=s.id), None) is not None:
            print(f"... more after {s.id} (raise --limit)", file=out)
    finally:
        scheduler.close()
    return 0


def _cmd_history(args: argparse.Namespace, out: TextIO) -> int:
    scheduler = _open_store(args.db)
    try:
        scheduler.get_sync(args.sync)
        if args.json:
            json.dump(scheduler.export_history(args.sync)[: args.limit], out, indent=2)
            out.write("\n")
            return 0
        from cohortsync._demo import _table  # noqa: PLC0415 - shared table layout

        for line in _table(scheduler.history(args.sync, args.limit)):
            print(line, file=out)
    finally:
        scheduler.close()
    return 0


def _cmd_upcoming(args: argparse.Namespace, out: TextIO) -> int:
    scheduler = _open_store(args.db)
    try:
        try:
            until = scheduler.clock.now() + timedelta(hours=args.hours)
        except OverflowError:
            raise _CliError(
                f"--hours {args.hours:,.0f} reaches past {date.max:%Y-%m-%d}, "
                "the last date a horizon can be; give fewer hours"
            ) from None
        # One more than shown, to say whether there are more: never the whole list.
        upcoming = scheduler.upcoming(until, limit=args.limit + 1)
        schedules: dict[str, str] = {}  # one read per sync listed, not per run
        for item in upcoming[: args.limit]:
            text = schedules.get(item.sync_id)
            if text is None:
                text = schedules[item.sync_id] = _schedule_text(scheduler.get_sync(item.sync_id))
            print(
                f"{item.at:%Y-%m-%d %H:%M:%S} UTC  {item.sync_id:<24} {item.trigger.value:<9} "
                f"{text}",
                file=out,
            )
        if len(upcoming) > args.limit:
            print("... more (raise --limit or lower --hours)", file=out)
        if not upcoming:
            print("(nothing due)", file=out)
    finally:
        scheduler.close()
    return 0


def _schedule_text(sync: Sync) -> str:
    """The sync's schedule in a few words, with a real-time fallback shown."""
    text = sync.policy.describe()
    if sync.cadence is not sync.policy.cadence:
        text += f" (now {sync.cadence.value})"
    return text


# The schedule options of `check`: the argparse dest and the cadences that take
# each (the library's own sets, so the two cannot disagree).
_SCHEDULE_OPTIONS = {
    "--every": ("every", frozenset({Cadence.EVERY})),
    "--at": ("at", _TIMED),
    "--on": ("on", frozenset({Cadence.WEEKLY})),
    "--cron": ("cron", frozenset({Cadence.CRON})),
    "--timezone": ("timezone", _ZONED),
}
_REQUIRED = {Cadence.EVERY: "--every", Cadence.WEEKLY: "--on", Cadence.CRON: "--cron"}
# A ConfigurationError's field -> the option that gave it (and its argparse
# dest, to quote what was typed rather than the converted value).
_OPTION_OF_FIELD = {
    "interval": ("--every", "every"),
    "at": ("--at", "at"),
    "on": ("--on", "on"),
    "expression": ("--cron", "cron"),
    "cron": ("--cron", "cron"),
    "timezone": ("--timezone", "timezone"),
    "size": ("--size", "size"),
    "identifier_kinds": ("--identifier", None),
}
_INTERVAL = re.compile(r"\s*(\d+)\s*([mhd]?)\s*", re.IGNORECASE)
_INTERVAL_UNITS = {"": "minutes", "m": "minutes", "h": "hours", "d": "days"}


def _interval(text: str) -> timedelta:
    """``15``, ``15m``, ``2h`` or ``1d``: whole minutes, hours or days."""
    match = _INTERVAL.fullmatch(text)
    if match is None:
        raise _CliError(f"--every {text!r} is not an interval such as 15, 15m, 2h or 1d")
    number, unit = match.groups()
    try:
        return timedelta(**{_INTERVAL_UNITS[unit.lower()]: int(number)})
    except OverflowError:
        raise _CliError(f"--every {text!r}: must be from 1 minute to 7 days") from None


def _check_policy(args: argparse.Namespace) -> SyncPolicy:
    """The policy the check options describe; options of another cadence are refused."""
    cadence = Cadence(args.cadence)
    for option, (dest, cadences) in _SCHEDULE_OPTIONS.items():
        if getattr(args, dest) is not None and cadence not in cadences:
            *others, last = (c.value for c in Cadence if c in cadences)
            takers = f"{', '.join(others)} or {last}" if others else last
            raise _CliError(f"{option} applies only to --cadence {takers}")
    required = _REQUIRED.get(cadence)
    if required is not None and not getattr(args, _SCHEDULE_OPTIONS[required][0]):
        raise _CliError(f"--cadence {cadence.value} needs {required}")
    at = None
    if args.at is not None:
        try:
            at = time.fromisoformat(args.at)
        except ValueError:
            raise _CliError(f"--at {args.at!r} is not a time such as 06:30") from None
    # Day names in any case: the library takes "mon", a terminal user types "MON" too.
    on = tuple(day.strip().lower() for day in args.on.split(",")) if args.on else ()
    interval = None if args.every is None else _interval(args.every)
    return SyncPolicy(
        cadence=cadence,
        timezone=args.timezone,
        at=at,
        interval=interval,
        on=on,
        expression=args.cron,
    )


def _option_error(e: ConfigurationError, args: argparse.Namespace) -> _CliError:
    """The library's error about a value, told as the option that gave it."""
    option, dest = _OPTION_OF_FIELD[e.field]
    given = e.value if dest is None else getattr(args, dest)
    message = str(e).removeprefix(f"{e.field}={e.value!r}: ")
    return _CliError(f"{option} {given!r}: {message}")


def _cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    try:
        cohort = Cohort(
            id="cohort", name="cohort", type=CohortType(args.cohort_type), size=args.size
        )
        policy = _check_policy(args)
        caps = catalog.get(args.destination)
        result = check_eligibility(cohort, caps, policy, identifier_kinds=args.identifier or None)
    except ConfigurationError as e:
        if e.field not in _OPTION_OF_FIELD:
            raise
        raise _option_error(e, args) from None
    verdict = "eligible" if result.eligible else "NOT eligible"
    print(
        f"{args.cohort_type} cohort ({args.size if args.size is not None else 'unknown'} members) "
        f"-> {caps.name}, {policy.describe()}: {verdict}",
        file=out,
    )
    for reason in result.reasons:
        print(f"  [{reason.severity.value}] {reason.code}: {reason.message}", file=out)
    return 0 if result.eligible else EXIT_ERROR


def _load_app(spec: str) -> Scheduler:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise _CliError(f"--app must look like 'module:attribute', not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise _CliError(f"cannot import {module_name!r}: {e}") from e
    try:
        target = getattr(module, attribute)
    except AttributeError:
        raise _CliError(f"module {module_name!r} has no attribute {attribute!r}") from None
    app = target
    if callable(target) and not isinstance(target, Scheduler):
        try:
            app = target()
        except Exception as e:
            raise _CliError(f"calling {spec} failed: {type(e).__name__}: {e}") from e
    if not isinstance(app, Scheduler):
        raise _CliError(f"{spec} is a {type(app).__name__}, not a cohortsync.Scheduler")
    return app


_WORKER_LOG = logging.getLogger("cohortsync.scheduler")
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
"""What every LogRecord has: the rest came in through ``extra=``."""


def _utc(created: float) -> str:
    return datetime.fromtimestamp(created, tz=timezone.utc).isoformat(timespec="milliseconds")


class _TextFormatter(logging.Formatter):
    """``2030-01-01T00:00:00.000+00:00 INFO cohortsync.run: sync s1 run ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    @override
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc(record.created)


class _JsonFormatter(logging.Formatter):
    """
    One JSON object per line: ``time``, ``level``, ``logger``, ``message``,
    then the record's ``extra=`` fields (``sync_id``, ``run_id``, ``slot``,
    counts...) and ``exc_info`` as text when there is one.
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in data:
                data[key] = value
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str, ensure_ascii=False)


if TYPE_CHECKING:
    _StreamHandler = logging.StreamHandler[TextIO]
else:  # generic at runtime only from Python 3.11
    _StreamHandler = logging.StreamHandler


class _WorkerHandler(_StreamHandler):
    """Writes records to the worker's output, stepping a progress bar aside for each."""

    def __init__(self, stream: TextIO, display: Display | None) -> None:
        super().__init__(stream)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        if self.display is None:
            super().emit(record)
            return
        with self.display.paused():
            super().emit(record)


@contextlib.contextmanager
def _worker_logging(level: str, form: str, out: TextIO) -> Iterator[_WorkerHandler]:
    """
    Send every record at *level* and above to *out*, formatted as *form*,
    for as long as the worker runs (the root logger, so the host's own lines
    come out alike; what was there before is put back).
    """
    handler = _WorkerHandler(out, None)
    handler.setFormatter(_JsonFormatter() if form == "json" else _TextFormatter())
    root = logging.getLogger()
    package = logging.getLogger("cohortsync")
    before = (root.level, package.level)
    root.addHandler(handler)
    root.setLevel(level)
    package.setLevel(level)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(before[0])
        package.setLevel(before[1])


def _cmd_worker(args: argparse.Namespace, out: TextIO) -> int:
    sys.path.insert(0, str(Path.cwd()))
    with _worker_logging(args.log_level, args.log_format, out) as handler:
        scheduler = _load_app(args.app)
        display = None
        if wanted(args.progress, sys.stderr):
            # Progress goes to standard error, as tqdm's does: standard
            # output stays one log line (one JSON object) per line.
            display = make_display(sys.stderr)
            handler.display = display
            scheduler.add_listener(display, events=(RunPlanned, BatchDelivered, RunFinished))
        stop = threading.Event()

        def handle(signum: int, _frame: FrameType | None) -> None:
            _WORKER_LOG.info(
                "cohortsync worker: received signal %d, stopping after the current run",
                signum,
                extra={"signal": signum},
            )
            stop.set()

        previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        _WORKER_LOG.info(
            "cohortsync worker %s started (%r)",
            scheduler.owner,
            scheduler.storage,
            extra={"owner": scheduler.owner},
        )
        try:
            scheduler.run_forever(stop, idle=args.idle)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if display is not None:
                display.close()
            scheduler.close()
        _WORKER_LOG.info("cohortsync worker stopped", extra={"owner": scheduler.owner})
    return 0


def _positive(text: str) -> int:
    """A count of at least 1: a limit of 0 would list nothing and say nothing true."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _hours(text: str) -> float:
    """A finite number of hours above 0 (whether it fits a date is checked against now)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of hours: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of hours above 0, not {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument in one line, as every other error is (docs/cli.md)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"cohortsync: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cohortsync", description="Keep user cohorts in sync with third-party destinations."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run a simulated day of syncs and print the history")
    demo.add_argument("--dir", help="where to put the store and files (default: a new temp dir)")
    demo.add_argument("--hours", type=int, default=24, help="simulated hours (default 24)")
    demo.add_argument("--seed", type=int, default=7, help="random seed of the simulated users")
    demo.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    demo.set_defaults(func=_cmd_demo)

    syncs = sub.add_parser("syncs", help="list the syncs in a store")
    syncs.add_argument("--db", required=True, help="the SQLite store")
    syncs.add_argument("--json", action="store_true", help="print JSON")
    syncs.add_argument(
        "--limit", type=_positive, default=None, help="most syncs to list (default: all)"
    )
    syncs.set_defaults(func=_cmd_syncs)

    history = sub.add_parser("history", help="show a sync's runs, newest first")
    history.add_argument("sync", help="the sync id")
    history.add_argument("--db", required=True, help="the SQLite store")
    history.add_argument("--limit", type=_positive, default=20, help="most runs to show")
    history.add_argument("--json", action="store_true", help="print JSON, with member issues")
    history.set_defaults(func=_cmd_history)

    upcoming = sub.add_parser("upcoming", help="list runs due in the next hours")
    upcoming.add_argument("--db", required=True, help="the SQLite store")
    upcoming.add_argument("--hours", type=_hours, default=24.0, help="how far ahead (default 24)")
    upcoming.add_argument("--limit", type=_positive, default=50, help="most runs to list")
    upcoming.set_defaults(func=_cmd_upcoming)

    check = sub.add_parser("check", help="check eligibility against a catalog destination")
    check.add_argument("--destination", required=True, choices=sorted(catalog.PRESETS))
    check.add_argument("--cadence", required=True, choices=[c.value for c in Cadence])
    check.add_argument(
        "--every", default=None, help="every: the interval, e.g. 15 or 15m (minutes), 2h, 1d"
    )
    check.add_argument("--at", default=None, help="daily/weekly: the local time, e.g. 06:30")
    check.add_argument("--on", default=None, help="weekly: days, e.g. mon,wed,fri (any case)")
    check.add_argument("--cron", default=None, help="cron: a 5-field expression")
    check.add_argument("--timezone", default=None, help="daily/weekly/cron: an IANA zone")
    check.add_argument("--cohort-type", default="behavioral", choices=[t.value for t in CohortType])
    check.add_argument("--size", type=int, default=None, help="the cohort's member count")
    check.add_argument(
        "--identifier",
        action="append",
        help="an identifier kind the mapping produces (repeatable); omit to skip the check",
    )
    check.set_defaults(func=_cmd_check)

    worker = sub.add_parser("worker", help="run a host scheduler until SIGINT/SIGTERM")
    worker.add_argument("--app", required=True, help="module:attribute of a Scheduler (or factory)")
    worker.add_argument("--idle", type=float, default=30.0, help="longest sleep between polls (s)")
    worker.add_argument(
        "--log-level",
        type=str.upper,
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="least severe lines to print (default INFO: a line as each run starts and ends)",
    )
    worker.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text (default) or json: one object per line with the record's fields",
    )
    worker.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw a bar for long runs on standard error (default: when it is a terminal)",
    )
    worker.set_defaults(func=_cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """
    Run the command line; return the exit code.
    """
    out = out or sys.stdout
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args, out)
        out.flush()  # inside the try: a short output may only fail here
    except BrokenPipeError:
        if out is not sys.stdout:
            raise
        # The reader (`| head`) is gone: as the Python docs recommend, point
        # stdout at devnull so that the flush at exit cannot fail again, and
        # exit without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_READER_GONE
    except _CliError as e:
        print(f"cohortsync: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CohortSyncError as e:
        print(f"cohortsync: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return code
