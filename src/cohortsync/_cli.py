"""
The ``cohortsync`` command line (standard library only).

    cohortsync demo                      a simulated day of syncs, printed as history
    cohortsync syncs --db STORE          the syncs in a store
    cohortsync history SYNC --db STORE   a sync's runs, newest first
    cohortsync upcoming --db STORE       runs due in the next hours
    cohortsync check ...                 eligibility of a cohort for a destination
    cohortsync worker --app mod:attr     run a host's scheduler until SIGINT/SIGTERM

A STORE is an SQLite file or a PostgreSQL DSN (``--dsn``, or ``COHORTSYNC_DB``
in the environment). No message shows a DSN's password.
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

from cohortsync._clock import Clock, SystemClock
from cohortsync._cohort import Cohort, CohortType
from cohortsync._converter import unstructure
from cohortsync._events import BatchDelivered, RunFinished, RunPlanned
from cohortsync._policy import _TIMED, _ZONED, Cadence, SyncPolicy
from cohortsync._progress import Display, make_display, wanted
from cohortsync._scheduler import Scheduler
from cohortsync._sync import Sync
from cohortsync._table import grow, render, table
from cohortsync.destinations import catalog
from cohortsync.eligibility import check_eligibility
from cohortsync.exceptions import CohortSyncError, ConfigurationError
from cohortsync.storage._dsn import POSTGRES_SCHEMES, is_keyword_dsn, mask_secrets, url_scheme
from cohortsync.storage._protocol import Storage

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_READER_GONE = 128 + 13
"""What a command killed by SIGPIPE exits with, so ``set -o pipefail`` scripts
recognise a reader that stopped early (``| head``) as they do for ``cat``."""


DB_VARIABLE = "COHORTSYNC_DB"
"""The environment variable naming the store when neither --db nor --dsn does."""
DEMO_MAX_HOURS = 366 * 24
"""The longest simulation the demo runs: a year."""
_SYNCS_BLOCK = 10_000
"""Syncs listed per block: columns are sized to a block, and grow if a later one needs it."""


class _CliError(Exception):
    """
    A problem to report in one line, with a non-zero exit code (2 unless told).
    """

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _FixedClock:
    """The clock of ``upcoming --at``: always the instant asked about."""

    def __init__(self, at: datetime) -> None:
        self._at = at

    def now(self) -> datetime:
        return self._at

    def sleep(self, seconds: float) -> None:
        """Never called: the store commands do not wait."""

    def __repr__(self) -> str:
        return f"_FixedClock({self._at.isoformat()})"


def _store_target(args: argparse.Namespace) -> tuple[str, str, bool]:
    """
    ``(where it came from, the value, whether it is PostgreSQL)`` of the store
    the options (or the environment) name.
    """
    if args.dsn is not None:
        return "--dsn", args.dsn, True
    if args.db is not None:
        source, value = "--db", args.db
    else:
        value = os.environ.get(DB_VARIABLE, "")
        if not value.strip():
            raise _CliError(
                f"no store given: pass --db FILE (an SQLite store) or --db DSN / --dsn DSN "
                f"(a PostgreSQL store), or set {DB_VARIABLE}"
            )
        source = f"${DB_VARIABLE}"
    scheme = url_scheme(value)
    if scheme is not None:
        if scheme not in POSTGRES_SCHEMES:
            raise _CliError(
                f"{source} {mask_secrets(value)!r} is a {scheme}:// URL; a store is an "
                "SQLite file path or a PostgreSQL DSN (postgresql://... or 'host=... dbname=...')"
            )
        return source, value, True
    if is_keyword_dsn(value):
        if Path(value).exists():
            raise _CliError(
                f"{source} {mask_secrets(value)!r} is both a file and a PostgreSQL "
                f"connection string: give the file as ./{value} or the DSN with --dsn"
            )
        return source, value, True
    return source, value, False


def _open_store(args: argparse.Namespace, clock: Clock | None = None) -> Scheduler:
    """
    The scheduler on the store the options name, which must exist: the
    store commands only read, so they never create an empty store where a
    typo pointed them.
    """
    source, value, postgres = _store_target(args)
    if postgres:
        schema = "cohortsync" if args.schema is None else args.schema
        storage = _open_postgres(source, value, schema)
    else:
        if args.schema is not None:
            raise _CliError(f"--schema applies only to a PostgreSQL store, not {source} {value!r}")
        storage = _open_sqlite(source, value)
    return Scheduler(storage, clock=clock or SystemClock())


def _open_sqlite(source: str, path: str) -> Storage:
    import sqlite3  # noqa: PLC0415 - only for store commands

    from cohortsync.storage._sqlite import SQLiteStorage  # noqa: PLC0415 - only for store commands

    if not Path(path).exists():
        raise _CliError(
            f"{source} {path!r}: no such file; give the SQLite file your workers use "
            "(the store commands read a store, they never create one)"
        )
    if not Path(path).is_file():
        raise _CliError(f"{source} {path!r} is not a file; give an SQLite store's file")
    try:
        # Read-only, to look: an empty database would otherwise become an empty store.
        peek = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = peek.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            peek.close()
    except sqlite3.Error:
        tables = None  # not SQLite, or unreadable: SQLiteStorage says which
    if tables == 0:
        raise _CliError(
            f"{source} {path!r} is empty (no tables), not a cohortsync store; "
            "give the SQLite file your workers use"
        )
    return SQLiteStorage(path)


def _open_postgres(source: str, dsn: str, schema: str) -> Storage:
    try:
        import psycopg  # noqa: PLC0415 - the postgres extra is optional
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415 - as psycopg

        from cohortsync.storage._postgres import (  # noqa: PLC0415 - the postgres extra is optional
            PostgresStorage,
            store_exists,
        )
    except ImportError as e:
        cause = e.__cause__ or e
        raise _CliError(
            f"a PostgreSQL store needs psycopg 3, which is not installed ({cause}): "
            "pip install 'cohortsync[postgres]'",
            code=EXIT_ERROR,
        ) from None
    try:
        params = conninfo_to_dict(dsn)
        # libpq reads the port only when it connects: a port that is no
        # number is a DSN that does not parse, not a server that fails.
        for port in str(params.get("port") or "").split(","):
            if port and not port.strip().isdigit():
                raise psycopg.ProgrammingError("port")
    except psycopg.Error:
        # The driver's message quotes the DSN, which may hold a password.
        raise _CliError(
            f"{source} is not a valid PostgreSQL DSN (not shown: it may hold a password); "
            "give postgresql://user:password@host:port/dbname or 'host=... dbname=...'"
        ) from None
    try:
        exists = store_exists(dsn, schema)
    except ConfigurationError as e:
        raise _CliError(f"--schema {schema!r}: {_reason(e)}") from None
    if not exists:
        raise _CliError(
            f"no cohortsync store in schema {schema!r} of the database at "
            f"{mask_secrets(dsn)!r} (the store commands never create one); give the "
            "database and --schema your workers use"
        )
    return PostgresStorage(dsn, schema=schema)


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from cohortsync._demo import run_demo  # noqa: PLC0415 - the demo pulls in the adapters

    progress = False if args.no_progress else None
    directory = Path(args.dir) if args.dir else None
    if directory is not None:
        if directory.exists() and not directory.is_dir():
            raise _CliError(f"--dir {args.dir!r} is a file; give a directory (made if missing)")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _CliError(f"--dir {args.dir!r}: cannot create it ({e.strerror})") from None
    return run_demo(
        directory=directory,
        hours=args.hours,
        seed=args.seed,
        progress=progress,
        out=out,
    )


_SYNC_COLUMNS = ("sync", "cohort", "destination", "status", "gen", "schedule")


def _cmd_syncs(args: argparse.Namespace, out: TextIO) -> int:
    scheduler = _open_store(args)
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
        # Columns fit the longest value: in blocks, so a huge store is neither
        # held whole nor read before the first line shows.
        widths = [len(column) for column in _SYNC_COLUMNS]
        shown = 0
        last = ""
        while block := [_sync_row(s) for s in islice(syncs, _SYNCS_BLOCK)]:
            widths = grow(widths, block)
            if not shown:
                print(render(_SYNC_COLUMNS, widths, right={4}), file=out)
            for row in block:
                print(render(row, widths, right={4}), file=out)
            shown += len(block)
            last = block[-1][0]
        if not shown:
            print("(no syncs)", file=out)
        elif shown == args.limit and next(scheduler.iter_syncs(after=last), None) is not None:
            print(f"... more after {last} (raise --limit)", file=out)
    finally:
        scheduler.close()
    return 0


def _sync_row(s: Sync) -> tuple[str, ...]:
    return (
        s.id,
        s.cohort_id,
        s.destination_id,
        s.status.value,
        str(s.generation),
        _schedule_text(s),
    )


def _cmd_history(args: argparse.Namespace, out: TextIO) -> int:
    scheduler = _open_store(args)
    try:
        try:
            scheduler.get_sync(args.sync)
        except ConfigurationError as e:
            raise _CliError(f"SYNC {args.sync!r}: {_reason(e)}") from None
        if args.json:
            json.dump(scheduler.export_history(args.sync)[: args.limit], out, indent=2)
            out.write("\n")
            return 0
        from cohortsync._demo import _table  # noqa: PLC0415 - shared table layout

        runs = scheduler.history(args.sync, args.limit)
        if not runs:
            print(f"(no runs of {args.sync} yet)", file=out)
            return 0
        for line in _table(runs, slot_format="%Y-%m-%d %H:%M:%S"):
            print(line, file=out)
    finally:
        scheduler.close()
    return 0


def _cmd_upcoming(args: argparse.Namespace, out: TextIO) -> int:
    at = args.at
    scheduler = _open_store(args, _FixedClock(at) if at is not None else None)
    try:
        try:
            until = scheduler.clock.now() + timedelta(hours=args.hours)
        except OverflowError:
            start = "--at" if at is not None else "now"
            raise _CliError(
                f"{start} plus --hours {args.hours:.6g} reaches past {date.max:%Y-%m-%d}, "
                "the last date a horizon can be; give fewer hours"
            ) from None
        # One more than shown, to say whether there are more: never the whole list.
        upcoming = scheduler.upcoming(until, limit=args.limit + 1)
        schedules: dict[str, str] = {}  # one read per sync listed, not per run
        rows = []
        for item in upcoming[: args.limit]:
            text = schedules.get(item.sync_id)
            if text is None:
                text = schedules[item.sync_id] = _schedule_text(scheduler.get_sync(item.sync_id))
            rows.append((f"{item.at:%Y-%m-%d %H:%M:%S}", item.sync_id, item.trigger.value, text))
        if rows:
            for line in table(("at (UTC)", "sync", "trigger", "schedule"), rows):
                print(line, file=out)
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


def _reason(e: ConfigurationError) -> str:
    """The library's message without its ``field=value:`` prefix."""
    return str(e).removeprefix(f"{e.field}={e.value!r}: ")


def _option_error(e: ConfigurationError, args: argparse.Namespace) -> _CliError:
    """The library's error about a value, told as the option that gave it."""
    option, dest = _OPTION_OF_FIELD[e.field]
    given = e.value if dest is None else getattr(args, dest)
    return _CliError(f"{option} {given!r}: {_reason(e)}")


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
        except CohortSyncError:
            raise  # the app's store failed (a refused password...): exit 1, not bad arguments
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
        return json.dumps(
            {key: _strict_json(value) for key, value in data.items()},
            default=str,
            ensure_ascii=False,
            allow_nan=False,
        )


def _strict_json(value: object) -> object:
    """A float JSON has no number for (NaN, infinity) as its text: strict parsers refuse ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


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
            if stop.is_set():
                # A second signal: stop now, as Celery's second Ctrl-C does.
                # The run in progress is cut short like a crashed worker's:
                # its lease expires and its slot runs again, re-sending at
                # most its one unacknowledged batch.
                _WORKER_LOG.warning(
                    "cohortsync worker: received %s again, stopping now",
                    _signal_name(signum),
                    extra={"signal": _signal_name(signum)},
                )
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            _WORKER_LOG.info(
                "cohortsync worker: received %s, stopping after the current run "
                "(send it again to stop now)",
                _signal_name(signum),
                extra={"signal": _signal_name(signum)},
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


def _signal_name(signum: int) -> str:
    """``SIGTERM``, not ``15``: numbers differ between systems, names are what kill takes."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _positive(text: str) -> int:
    """A count of at least 1: a limit of 0 would list nothing and say nothing true."""
    return _whole(text, "", _MAX_LIMIT, f"{_MAX_LIMIT:,}")


_MAX_LIMIT = 1_000_000_000
"""The most rows a --limit asks for: more than any store lists, and within every integer type."""


def _demo_hours(text: str) -> int:
    """Whole simulated hours, from 1 to a year (more would run for hours and say nothing new)."""
    return _whole(text, " of hours", DEMO_MAX_HOURS, f"{DEMO_MAX_HOURS} hours (a year)")


def _whole(text: str, of: str, most: int, most_text: str) -> int:
    """A whole number from 1 to *most*; the message quotes at most 30 characters of *text*."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number{of}: {text!r}") from None
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"must be 1 to {most_text}, not {text.strip()[:30]}")
    return value


def _hours(text: str) -> float:
    """A finite number of hours above 0 (whether it fits a date is checked against now)."""
    return _above_zero(text, "hours")


def _seconds(text: str) -> float:
    """A finite number of seconds above 0."""
    return _above_zero(text, "seconds")


def _above_zero(text: str, unit: str) -> float:
    """A finite number of *unit* above 0; the message quotes at most 30 characters of *text*."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number of {unit} above 0, not {text.strip()[:30]!r}"
        )
    return value


def _instant(text: str) -> datetime:
    """An ISO 8601 instant with its UTC offset (``Z`` allowed), as aware UTC."""
    # Python 3.10's fromisoformat does not read "Z".
    iso = text.strip()
    iso = iso[:-1] + "+00:00" if iso[-1:] in {"Z", "z"} else iso
    try:
        value = datetime.fromisoformat(iso)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 instant such as 2030-03-04T12:00:00Z: {text!r}"
        ) from None
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset, so it is a different instant on every host: "
            "add one, as in 2030-03-04T12:00:00Z or 2030-03-04T13:00:00+01:00"
        )
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is outside the years 1 to 9999 in UTC"
        ) from None


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument in one line, as every other error is (docs/cli.md)."""

    def error(self, message: str) -> NoReturn:
        # argparse quotes what was typed ("unrecognized arguments: ..."): a DSN's too.
        self.exit(
            EXIT_USAGE, f"cohortsync: error: {mask_secrets(message)} (see '{self.prog} --help')\n"
        )


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """
    Descriptions as written, and each option's default unless it has none
    (``None``, a flag's ``False``) or its help already says it.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class _Version(argparse.Action):
    """``--version``: the version is read only when asked for (importlib.metadata is slow)."""

    def __init__(self, option_strings: Sequence[str], dest: str) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(  # argparse calls it so; only the parser is used
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,  # noqa: ARG002
        values: object,  # noqa: ARG002
        option_string: str | None = None,  # noqa: ARG002
    ) -> NoReturn:
        import cohortsync  # noqa: PLC0415 - the package, for its version

        print(f"cohortsync {cohortsync.__version__}")
        parser.exit()


_STORE_HELP = f"""
The store is named by --db (an SQLite file, or a PostgreSQL DSN: a
postgresql:// or postgres:// URL, or a 'host=... dbname=...' string), by
--dsn (a PostgreSQL DSN), or else by the {DB_VARIABLE} environment variable.
It must exist: this command only reads. No message shows a DSN's password.
"""


def _store_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--db",
        metavar="FILE|DSN",
        help=f"the store: an SQLite file or a PostgreSQL DSN (default: ${DB_VARIABLE})",
    )
    where.add_argument("--dsn", metavar="DSN", help="the store: a PostgreSQL DSN")
    parser.add_argument(
        "--schema",
        metavar="NAME",
        help="PostgreSQL: the schema holding the store (default: cohortsync)",
    )


def _command(
    sub: argparse._SubParsersAction[_Parser],
    name: str,
    summary: str,
    description: str,
    *,
    store: bool = False,
) -> _Parser:
    text = textwrap.dedent(description).strip()
    if store:
        text += "\n\n" + _STORE_HELP.strip()
    return sub.add_parser(name, help=summary, description=text, formatter_class=_Help)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cohortsync",
        description="Keep user cohorts in sync with third-party destinations.",
        epilog="Exit codes: 0 success, 1 an error from cohortsync (or not eligible), "
        "2 bad arguments or a missing store, 141 the reader closed the pipe. "
        "See 'cohortsync COMMAND --help'.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _command(
        sub,
        "demo",
        "run a simulated day of syncs and print the history",
        """
        Run a simulated day of five syncs on a fresh SQLite store, against a
        local HTTP server and a directory of CSV files, on a fake clock (it
        takes seconds), then print each sync's history and what was received.
        """,
    )
    demo.add_argument(
        "--dir",
        help="where to put the store (cohortsync.db) and files; a store there is replaced "
        "(default: a new temporary directory)",
    )
    demo.add_argument(
        "--hours",
        type=_demo_hours,
        default=24,
        help=f"simulated hours, from 1 to {DEMO_MAX_HOURS}",
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed of the simulated users")
    demo.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    demo.set_defaults(func=_cmd_demo)

    syncs = _command(
        sub,
        "syncs",
        "list the syncs in a store",
        """
        List the syncs in a store, ordered by id: id, cohort, destination,
        status, generation and schedule. The store is read a page at a time,
        and no further than --limit.
        """,
        store=True,
    )
    _store_options(syncs)
    syncs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    syncs.add_argument(
        "--limit", type=_positive, help="most syncs to list, at least 1 (default: all)"
    )
    syncs.set_defaults(func=_cmd_syncs)

    history = _command(
        sub,
        "history",
        "show a sync's runs, newest first",
        """
        Show a sync's runs, newest first: slot, trigger, status, members added,
        removed, skipped and rejected, batches, retries, and the error or notes.
        """,
        store=True,
    )
    history.add_argument("sync", metavar="SYNC", help="the sync id")
    _store_options(history)
    history.add_argument("--limit", type=_positive, default=20, help="most runs to show")
    history.add_argument(
        "--json", action="store_true", help="print JSON, with the skipped and rejected members"
    )
    history.set_defaults(func=_cmd_history)

    upcoming = _command(
        sub,
        "upcoming",
        "list runs due in the next hours",
        """
        List the runs due from now (or from --at) until --hours later,
        earliest first, assuming each starts on time. An overdue sync is
        listed once, at its due time: the one catch-up run it will get.
        """,
        store=True,
    )
    _store_options(upcoming)
    upcoming.add_argument(
        "--at",
        type=_instant,
        metavar="ISO-TIME",
        help="list from this instant instead of now, with its UTC offset, e.g. "
        "2030-03-04T12:00:00Z (for a store whose clock is not the present, as the demo's)",
    )
    upcoming.add_argument(
        "--hours", type=_hours, default=24, help="how far ahead, a number above 0"
    )
    upcoming.add_argument("--limit", type=_positive, default=50, help="most runs to list")
    upcoming.set_defaults(func=_cmd_upcoming)

    check = _command(
        sub,
        "check",
        "check eligibility against a catalog destination",
        """
        Check a cohort's eligibility for a catalog destination under a
        schedule, with the default rules, and print every reason. Exits 0 when
        eligible (warnings allowed), 1 when a blocking reason was found.
        """,
    )
    check.add_argument(
        "--destination",
        required=True,
        choices=sorted(catalog.PRESETS),
        metavar="KEY",
        help="a catalog key: %(choices)s",
    )
    check.add_argument(
        "--cadence",
        required=True,
        choices=[c.value for c in Cadence],
        metavar="CADENCE",
        help="%(choices)s",
    )
    check.add_argument(
        "--every", default=None, help="every: the interval, e.g. 15 or 15m (minutes), 2h, 1d"
    )
    check.add_argument("--at", default=None, help="daily/weekly: the local time, e.g. 06:30")
    check.add_argument("--on", default=None, help="weekly: days, e.g. mon,wed,fri (any case)")
    check.add_argument("--cron", default=None, help="cron: a 5-field expression")
    check.add_argument(
        "--timezone", default=None, help="daily/weekly/cron: an IANA zone (default: UTC)"
    )
    check.add_argument(
        "--cohort-type",
        default="behavioral",
        choices=[t.value for t in CohortType],
        metavar="TYPE",
        help="the cohort's type: %(choices)s",
    )
    check.add_argument(
        "--size", type=int, default=None, help="the cohort's member count (default: unknown)"
    )
    check.add_argument(
        "--identifier",
        action="append",
        help="an identifier kind the mapping produces (repeatable); omit to skip the check",
    )
    check.set_defaults(func=_cmd_check)

    worker = _command(
        sub,
        "worker",
        "run a host scheduler until SIGINT/SIGTERM",
        """
        Run your scheduler's run_forever() until SIGINT or SIGTERM, then
        finish the run in progress, close the store and exit 0. The current
        directory is put on sys.path first.
        """,
    )
    worker.add_argument("--app", required=True, help="module:attribute of a Scheduler (or factory)")
    worker.add_argument(
        "--idle", type=_seconds, default=30.0, help="longest sleep between polls, in seconds"
    )
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
        _report(e)
        return e.code
    except CohortSyncError as e:
        _report(e)
        return EXIT_ERROR
    return code


def _report(error: Exception) -> None:
    """
    The error in one line (a driver's message may span several), masked once
    more: a DSN may hide in any message.
    """
    text = re.sub(r"\s*\n\s*", " ", str(error).strip())
    print(f"cohortsync: error: {mask_secrets(text)}", file=sys.stderr)
