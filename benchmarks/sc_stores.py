"""
Scheduler throughput (SPEC section 9): 10,000 syncs with empty cohorts over 6
simulated hours, on MemoryStorage and on SQLite, the latter against the
like-for-like SQL ceilings.

The ceilings are the run's own SQL without the engine. One untimed pass runs
the SQLite workload on a store whose connections record every statement it
executes (text, parameters, ``executemany`` rows, which connection) and where
each completion starts and ends. The recording is then replayed with plain
``sqlite3`` on a fresh copy of the database as it was before the run phase:

- ceiling A replays it exactly as recorded, one transaction per completion;
- ceiling B drops the ``COMMIT``/``BEGIN IMMEDIATE`` pairs between consecutive
  completions, so up to 64 (the claim batch) commit together: the batched
  ceiling the SPEC goal is about (see :class:`_Program` for the exact rule).

A replay must leave the database exactly as the recorded run left it (its
content is compared), so a replay that does less than the library is caught.

``python benchmarks/sc_stores.py profile [n] [hours]`` prints where a SQLite
run's time goes (cProfile, grouped), at a smaller size; it is not a table row.
"""

from __future__ import annotations

import cProfile
import hashlib
import os
import pickle
import pstats
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import chain
from typing import Any, BinaryIO, cast

from common import START, Noop, Row
from measure import Sample, interleaved

import cohortsync as cs
from cohortsync import _schedule
from cohortsync.storage import Completion, Lease, MemoryStorage, SQLiteStorage, Storage, SyncRecord
from cohortsync.testing import FakeClock

# -- the workload ----------------------------------------------------------------

CLAIM_BATCH = 64
"""Syncs claimed per store round trip by the scheduler, and runs per batched commit."""

_MIX = ((0.70, cs.SyncPolicy.daily), (0.25, cs.SyncPolicy.hourly), (0.05, cs.SyncPolicy.realtime))


def expected_runs(records: list[SyncRecord], start: datetime, end: datetime) -> int:
    """
    How many runs 6 hours must hold: each sync's immediate first run, then
    every slot strictly after it and before *end* (computed independently
    with the integer grid).
    """
    total = 0
    s0 = int((start - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds())
    e0 = int((end - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds())
    for r in records:
        period = _schedule.period_seconds(r.sync.policy.cadence)
        total += 1
        if period is None:
            continue
        t = _schedule.next_due_ts(period, r.offset, s0)
        if t < e0:
            total += (e0 - 1 - t) // period + 1
    return total


def _worker(storage: Storage) -> tuple[cs.Scheduler, FakeClock]:
    """
    A scheduler as every worker builds it: the no-op destination, the empty cohort.
    """
    clock = FakeClock(START)
    scheduler = cs.Scheduler(storage, clock=clock, seed=0)
    scheduler.add_destination("noop", Noop())
    scheduler.add_cohort(cs.Cohort(id="empty", name="Empty", source=lambda: ()))
    return scheduler, clock


def _create_syncs(storage: Storage, n: int, hours: float) -> int:
    """
    Create the *n* syncs (70 % daily, 25 % hourly, 5 % real-time) through a
    scheduler; return how many runs *hours* must hold.
    """
    scheduler, _ = _worker(storage)
    i = 0
    for share, policy in _MIX:
        for _ in range(int(n * share)):
            scheduler.create_sync("empty", "noop", policy(), sync_id=f"s{i:06d}")
            i += 1
    return expected_runs(storage.list_syncs(), START, START + timedelta(hours=hours))


def _drive(storage: Storage, hours: float) -> tuple[int, float]:
    """
    The timed run phase: a fresh worker's scheduler runs what is due, minute
    by minute, for *hours*. Returns the runs and the seconds; asserts no slot
    ran twice.
    """
    scheduler, clock = _worker(storage)
    end = START + timedelta(hours=hours)
    last = end - timedelta(microseconds=1)  # slots before `end` count, slots at it do not
    done = 0
    slots: set[tuple[str, datetime]] = set()
    t = time.perf_counter()
    while True:
        for run in scheduler.run_due(claim_batch=CLAIM_BATCH):
            slots.add((run.sync_id, run.slot))
            done += 1
        now = clock.now()
        if now >= last:
            break
        # Step to the next minute boundary: every real-time sync is due then
        # anyway, and an hourly or daily slot run up to a minute late still
        # runs exactly once (a scan of every sync for the next due time would
        # measure the driver, not the scheduler).
        clock.set(min(now.replace(second=0, microsecond=0) + timedelta(minutes=1), last))
    elapsed = time.perf_counter() - t
    assert done == len(slots), "a slot ran twice"
    return done, elapsed


def _memory_side(n: int, hours: float) -> float:
    """
    One repeat on MemoryStorage: a fresh store, the syncs created (untimed),
    then the run phase; runs per second.
    """
    storage = MemoryStorage()
    expected = _create_syncs(storage, n, hours)
    done, seconds = _drive(storage, hours)
    assert done == expected, (done, expected)
    return done / seconds


def _copy_db(source: str, target: str) -> str:
    """
    Copy a closed database (a closed WAL database is one file: closing the
    last connection checkpoints and removes the WAL).
    """
    assert not os.path.exists(source + "-wal"), "the base database is still open"
    _remove_db(target)
    shutil.copyfile(source, target)
    return target


def _remove_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def _base_db(directory: str, n: int, hours: float) -> tuple[str, int]:
    """
    The database right before the run phase: the syncs created, the store
    closed. Every side starts from a copy of it. Returns its path and the
    expected runs.
    """
    path = os.path.join(directory, "base.db")
    storage = SQLiteStorage(path)
    expected = _create_syncs(storage, n, hours)
    storage.close()
    return path, expected


def _sqlite_side(base: str, directory: str, hours: float, expected: int) -> float:
    """
    One repeat on SQLite: a fresh store on a fresh copy of the base database,
    then the run phase; runs per second.
    """
    path = _copy_db(base, os.path.join(directory, "ours.db"))
    storage = SQLiteStorage(path)
    done, seconds = _drive(storage, hours)
    storage.close()
    _remove_db(path)
    assert done == expected, (done, expected)
    return done / seconds


# -- recording what the store executes ----------------------------------------------

_EXEC, _MANY, _BLOB, _COMPLETE, _COMPLETED = range(5)
"""Record kinds: a statement, an ``executemany``, a ``randomblob()`` result, and
the start and end of a ``complete_run`` call."""

_CHUNK = 20_000
"""Records per pickled chunk of the recording (and per timed slice of a replay)."""

_PRAGMAS = (
    "synchronous",
    "cache_size",
    "journal_mode",
    "busy_timeout",
    "foreign_keys",
    "temp_store",
    "mmap_size",
    "locking_mode",
    "wal_autocheckpoint",
    "cache_spill",
    "automatic_index",
    "recursive_triggers",
)


def _settings(conn: sqlite3.Connection) -> tuple[object, ...]:
    """
    What makes two connections run the same SQL alike: their transaction
    mode and PRAGMAs.
    """
    pragmas = tuple(conn.execute(f"PRAGMA {name}").fetchone()[0] for name in _PRAGMAS)
    return (conn.isolation_level, *pragmas)


class _Recorder:
    """
    Collects the records of the run phase in order and streams them to a
    pickle file in chunks (a full-size run is ~200,000 runs x ~13 statements).
    Each SQL text is stored once and referred to by its number.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._records: list[tuple[Any, ...]] = []
        self.on = False
        self.sql: list[str] = []
        self._sql_ids: dict[str, int] = {}
        self.settings: list[tuple[object, ...]] = []
        self.statements = 0
        self.transactions = 0
        self.completions = 0

    def connection(self, conn: sqlite3.Connection) -> int:
        """
        Register a connection the store opened; returns its number.
        """
        self.settings.append(_settings(conn))
        conn.create_function("randomblob", 1, self.randomblob)
        return len(self.settings) - 1

    def statement(self, kind: int, conn: int, sql: str, params: Any) -> None:
        if not self.on:
            return
        # Only ever cut before a statement, so a statement's randomblob()
        # results are in its own chunk.
        if len(self._records) >= _CHUNK:
            self._flush()
        sql_id = self._sql_ids.get(sql)
        if sql_id is None:
            sql_id = self._sql_ids[sql] = len(self.sql)
            self.sql.append(sql)
        self._records.append((kind, conn, sql_id, params))
        self.statements += 1
        self.transactions += _kind_of(sql) == _BEGIN

    def mark(self, kind: int, completions: int = 1) -> None:
        if self.on:
            self._records.append((kind,))
            self.completions += completions if kind == _COMPLETED else 0

    def randomblob(self, n: int) -> bytes:
        """
        SQLite's ``randomblob()`` (lease tokens), with each result recorded so
        a replay hands out the same tokens and later statements find them.
        """
        blob = os.urandom(n)
        if self.on:
            self._records.append((_BLOB, blob))
        return blob

    def _flush(self) -> None:
        if self._records:
            pickle.dump(self._records, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self._records = []

    def close(self) -> None:
        self._flush()
        self._file.close()


class _RecordingConnection:
    """
    Stands in for the ``sqlite3.Connection`` the store opened: records each
    ``execute``/``executemany`` (parameters copied, rows materialised) and
    forwards everything to the real connection.
    """

    def __init__(self, conn: sqlite3.Connection, index: int, recorder: _Recorder) -> None:
        self._conn = conn
        self._index = index
        self._recorder = recorder

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        params = dict(parameters) if isinstance(parameters, dict) else tuple(parameters)
        self._recorder.statement(_EXEC, self._index, sql, params)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any, /) -> sqlite3.Cursor:
        rows = [dict(r) if isinstance(r, dict) else tuple(r) for r in rows]
        self._recorder.statement(_MANY, self._index, sql, rows)
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _RecordingSQLite(SQLiteStorage):
    """
    SQLiteStorage whose connections record what they execute (benchmark only).
    """

    def __init__(self, path: str, recorder: _Recorder) -> None:
        self._recorder = recorder
        super().__init__(path)

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        index = self._recorder.connection(conn)
        return cast("sqlite3.Connection", _RecordingConnection(conn, index, self._recorder))

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        self._recorder.mark(_COMPLETE)
        super().complete_run(lease, completion)
        self._recorder.mark(_COMPLETED)

    def complete_runs(
        self, completions: Sequence[tuple[Lease, Completion]]
    ) -> list[Exception | None]:
        # What the scheduler calls: a claim batch's completions in one
        # transaction, so one mark pair around all of them.
        self._recorder.mark(_COMPLETE)
        answers = super().complete_runs(completions)
        self._recorder.mark(_COMPLETED, len(completions))
        return answers


def _digest(path: str) -> str:
    """
    The content of every table, for comparing a replay's end state with the
    recorded run's.
    """
    conn = sqlite3.connect(path)
    try:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        h = hashlib.sha256()
        for table in tables:
            h.update(table.encode())
            for row in conn.execute(f'SELECT * FROM "{table}" ORDER BY 1, 2'):  # noqa: S608
                h.update(repr(row).encode())
    finally:
        conn.close()
    return h.hexdigest()


@dataclass
class Recording:
    """
    The run phase of one SQLite workload, as the store executed it.
    """

    path: str
    """The pickle stream of records."""
    base: str
    """The database right before the run phase (closed, one file)."""
    sql: list[str]
    settings: list[tuple[object, ...]]
    """Each recorded connection's settings when the store opened it."""
    runs: int
    statements: int
    transactions: int
    digest: str
    """The database content after the recorded run phase."""


def record(base: str, directory: str, hours: float, expected: int) -> Recording:
    """
    Run the workload once (untimed) on a copy of *base* with a recording store.
    """
    path = _copy_db(base, os.path.join(directory, "recorded.db"))
    recorder = _Recorder(os.path.join(directory, "recording.pickle"))
    storage = _RecordingSQLite(path, recorder)
    recorder.on = True  # from here on, exactly what the timed side runs
    done, _ = _drive(storage, hours)
    recorder.on = False
    storage.close()
    recorder.close()
    assert done == expected, (done, expected)
    assert recorder.completions == done, (recorder.completions, done)
    assert "ROLLBACK" not in recorder.sql, "a transaction of the recorded run failed"
    recording = Recording(
        path=recorder.path,
        base=base,
        sql=recorder.sql,
        settings=recorder.settings,
        runs=done,
        statements=recorder.statements,
        transactions=recorder.transactions,
        digest=_digest(path),
    )
    _remove_db(path)
    return recording


def _chunks(path: str) -> Iterator[list[tuple[Any, ...]]]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while f.tell() < size:
            yield pickle.load(f)  # noqa: S301 - our own file, written above


# -- replaying it ---------------------------------------------------------------------


def _replay_connect(path: str) -> sqlite3.Connection:
    """
    A plain connection set up like SQLiteStorage's (checked against the
    recorded settings by the caller).
    """
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA cache_size = -8000")
    return conn


_OTHER, _BEGIN, _COMMIT = range(3)


def _kind_of(sql: str) -> int:
    word = sql.strip().upper()
    if word == "BEGIN IMMEDIATE":
        return _BEGIN
    if word == "COMMIT":
        return _COMMIT
    return _OTHER


Step = tuple[Callable[..., sqlite3.Cursor], str, Any]
"""A replay's step: a connection's ``execute`` or ``executemany``, the SQL, its parameters."""


class _Program:
    """
    Turns records into the steps of a replay.

    With *group* 1 every statement is kept as recorded. With *group* > 1 the
    completions are regrouped, and nothing else changes:

    - a completion is the ``BEGIN IMMEDIATE ... COMMIT`` transaction inside a
      ``complete_run`` call (between its start and end marks);
    - the ``COMMIT`` of a completion is held back instead of executed;
    - when the next ``BEGIN IMMEDIATE`` is another completion's and the open
      transaction holds fewer than *group* completions, that ``BEGIN`` and the
      held ``COMMIT`` are both dropped: the two completions share one
      transaction, and the reads the run did in between (on the same
      connection, in the same order) run inside it;
    - any other ``BEGIN IMMEDIATE`` (a claim, a purge), a statement on another
      connection, the *group*-th completion or the end of the recording
      executes the held ``COMMIT`` first.

    So the completions of one claim batch (at most 64 runs; a claim
    transaction comes between two batches) commit together; every other
    statement runs once, in the recorded order, and the database ends the same.
    """

    def __init__(
        self, conns: list[sqlite3.Connection], sql: list[str], blobs: deque[bytes], group: int
    ) -> None:
        self._conns = conns
        self._sql = sql
        self._kinds = [_kind_of(s) for s in sql]
        self._blobs = blobs
        self._group = group
        self._in_completion = False
        self._held: tuple[Step, int] | None = None
        self._grouped = 0
        self._out: list[Step] = []
        self.statements = 0
        self.transactions = 0

    def feed(self, records: list[tuple[Any, ...]]) -> list[Step]:
        self._out = out = []
        for rec in records:
            kind = rec[0]
            if kind == _BLOB:
                self._blobs.append(rec[1])
            elif kind == _COMPLETE:
                self._in_completion = True
            elif kind == _COMPLETED:
                self._in_completion = False
            else:
                _, conn, sql_id, params = rec
                self._statement(kind, conn, sql_id, params)
        return out

    def finish(self) -> list[Step]:
        self._out = out = []
        self._release()
        return out

    def _emit(self, step: Step) -> None:
        self._out.append(step)
        self.statements += 1

    def _release(self) -> None:
        if self._held is not None:
            self._emit(self._held[0])
            self._held = None
        self._grouped = 0

    def _statement(self, kind: int, conn: int, sql_id: int, params: Any) -> None:
        c = self._conns[conn]
        step = (c.executemany if kind == _MANY else c.execute, self._sql[sql_id], params)
        what = self._kinds[sql_id]
        if self._group > 1:
            if what == _BEGIN:
                merge = self._in_completion and self._held is not None
                if merge and self._grouped < self._group:
                    self._held = None  # the held COMMIT and this BEGIN are dropped
                    self._grouped += 1
                    return
                self._release()
                self._grouped = 1 if self._in_completion else 0
            elif what == _COMMIT and self._in_completion:
                self._held = (step, conn)
                if self._grouped >= self._group:
                    self._release()
                return
            elif self._held is not None and self._held[1] != conn:
                self._release()
        if what == _BEGIN:
            self.transactions += 1
        self._emit(step)


@dataclass
class Replay:
    """
    One replay: how long the statements took, and what it executed.
    """

    runs: int
    seconds: float
    statements: int
    transactions: int

    @property
    def rate(self) -> float:
        return self.runs / self.seconds


def replay(recording: Recording, directory: str, group: int = 1) -> Replay:
    """
    Replay *recording* with plain ``sqlite3`` on a fresh copy of its base
    database, fetching every row of every statement; time only the
    statements (the records are unpickled and turned into a program between
    timed slices). Asserts the database ends as the recorded run left it.
    """
    path = _copy_db(recording.base, os.path.join(directory, f"replay-{group}.db"))
    conns = [_replay_connect(path) for _ in recording.settings]
    blobs: deque[bytes] = deque()

    # The claim's lease tokens come from randomblob(): the replay hands out
    # the recorded bytes, so later statements find the same tokens. This
    # Python function (~0.2 us more per claimed row) makes the ceilings slightly
    # slower than plain SQL, in ours' favour; it is well under 1 % here.
    def randomblob(n: int) -> bytes:
        blob = blobs.popleft()
        assert len(blob) == n
        return blob

    for conn, settings in zip(conns, recording.settings, strict=True):
        assert _settings(conn) == settings, (_settings(conn), settings)
        conn.create_function("randomblob", 1, randomblob)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # schema loaded, as ours
    program = _Program(conns, recording.sql, blobs, group)
    elapsed = 0.0
    for records in chain(_chunks(recording.path), [None]):
        steps = program.finish() if records is None else program.feed(records)
        t = time.perf_counter()
        for fn, sql, params in steps:
            fn(sql, params).fetchall()
        elapsed += time.perf_counter() - t
    for conn in conns:
        conn.close()
    assert not blobs, "a replayed claim leased fewer syncs than the recorded one"
    assert _digest(path) == recording.digest, "the replay did not do what the recorded run did"
    _remove_db(path)
    return Replay(recording.runs, elapsed, program.statements, program.transactions)


# -- the scenario -----------------------------------------------------------------------


def scenario_throughput(n: int = 10_000, hours: float = 6.0) -> list[Row]:
    with tempfile.TemporaryDirectory() as d:
        base, expected = _base_db(d, n, hours)
        recording = record(base, d, hours, expected)
        replays: dict[int, list[Replay]] = {1: [], CLAIM_BATCH: []}

        def ceiling(group: int) -> Callable[[], float]:
            def side() -> float:
                r = replay(recording, d, group)
                replays[group].append(r)
                return r.rate

            return side

        samples = interleaved(
            {
                "memory": lambda: _memory_side(n, hours),
                "sqlite": lambda: _sqlite_side(base, d, hours, expected),
                "ceiling A": ceiling(1),
                "ceiling B": ceiling(CLAIM_BATCH),
            }
        )
    return _rows(
        n, hours=hours, expected=expected, recording=recording, samples=samples, replays=replays
    )


def _rows(
    n: int,
    *,
    hours: float,
    expected: int,
    recording: Recording,
    samples: dict[str, Sample],
    replays: dict[int, list[Replay]],
) -> list[Row]:
    one, batched = replays[1][0], replays[CLAIM_BATCH][0]
    runs = recording.runs
    checked = (
        f"{expected:,} runs per repeat, as expected, each (sync, slot) once, every repeat checked"
    )
    warn = {
        name: "; CHECK: the ceiling's median is below ours, the replay is wrong"
        if samples[name].median <= samples["sqlite"].median
        else ""
        for name in ("ceiling A", "ceiling B")
    }
    base = (
        f"{checked}. Ceiling: the run phase's own SQL ({recording.statements:,} statements, "
        f"recorded from the store in an untimed pass) replayed with plain sqlite3, same PRAGMAs, "
        f"on a copy of the pre-run database, every row fetched; its end state equals the "
        f"recorded run's"
    )
    return [
        Row.measured(
            f"scheduler, {n:,} syncs x {hours:g} h, MemoryStorage",
            samples["memory"],
            None,
            unit="runs/s",
            goal=">= 20,000 runs/s",
            met=lambda ours, _b, _r: ours >= 20_000,
            note=f"{checked}; claim batch {CLAIM_BATCH}",
        ),
        Row.measured(
            f"scheduler, {n:,} syncs x {hours:g} h, SQLite vs its SQL as recorded",
            samples["sqlite"],
            samples["ceiling A"],
            unit="runs/s",
            goal="report",
            met=None,
            note=f"{base}; as recorded: {one.transactions:,} transactions "
            f"({one.transactions / runs:.2f} per run); ratio = ours / ceiling{warn['ceiling A']}",
        ),
        Row.measured(
            f"scheduler, {n:,} syncs x {hours:g} h, SQLite vs batched SQL ceiling",
            samples["sqlite"],
            samples["ceiling B"],
            unit="runs/s",
            goal=">= 50 % of batched ceiling",
            met=lambda _o, _b, ratio: ratio is not None and ratio >= 0.5,
            note=f"{base}; completions regrouped {CLAIM_BATCH} per transaction: "
            f"{batched.transactions:,} transactions ({batched.transactions / runs:.3f} per run); "
            f"ratio = ours / ceiling{warn['ceiling B']}",
        ),
    ]


# -- where a SQLite run's time goes -------------------------------------------------------


def _sql_begin(conn: sqlite3.Connection, sql: str, params: Any) -> sqlite3.Cursor:
    return conn.execute(sql, params)


def _sql_commit(conn: sqlite3.Connection, sql: str, params: Any) -> sqlite3.Cursor:
    return conn.execute(sql, params)


def _sql_read(conn: sqlite3.Connection, sql: str, params: Any) -> sqlite3.Cursor:
    return conn.execute(sql, params)


def _sql_write(conn: sqlite3.Connection, sql: str, params: Any) -> sqlite3.Cursor:
    return conn.execute(sql, params)


class _SortingConnection:
    """
    Forwards ``execute`` through one function per kind of statement, so the
    profile can tell the C time of a COMMIT from that of a read.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        head = sql.lstrip()[:6].upper()
        if head.startswith("BEGIN"):
            return _sql_begin(self._conn, sql, parameters)
        if head.startswith("COMMIT"):
            return _sql_commit(self._conn, sql, parameters)
        if head.startswith(("SELECT", "PRAGMA")):
            return _sql_read(self._conn, sql, parameters)
        return _sql_write(self._conn, sql, parameters)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _SortingSQLite(SQLiteStorage):
    def _connect(self) -> sqlite3.Connection:
        return cast("sqlite3.Connection", _SortingConnection(super()._connect()))


Func = tuple[str, int, str]
"""A profile entry: file, line, function name."""

_SQL = {
    "_sql_commit": "SQL: COMMIT",
    "_sql_begin": "SQL: BEGIN IMMEDIATE",
    "_sql_read": "SQL: reads (SELECT + fetch)",
    "_sql_write": "SQL: writes (claim, INSERT run, UPDATE sync, DELETE)",
    "claim_due": "SQL: writes (claim, INSERT run, UPDATE sync, DELETE)",
}
_FORWARDING = "(left out: the profile's own forwarding of execute)"


def _own_group(func: Func) -> str | None:
    """
    The group of a function's self time, or None when it belongs to whoever
    called it (the standard library, builtins, cattrs, json).
    """
    filename, _, name = func
    path = filename.replace("\\", "/")
    if path.endswith("sc_stores.py"):
        return "driver (the benchmark loop, FakeClock)" if name == "_drive" else _FORWARDING
    if "attrs generated" in path or path.endswith("attr/_make.py"):
        return "model objects (attrs __init__, evolve)"
    if "/cohortsync/" not in path:
        return None
    if "/cohortsync/testing/" in path:
        return "driver (the benchmark loop, FakeClock)"
    if "_validators.py" in path or name == "require_aware":
        return "validators"
    if path.endswith("storage/_sql.py"):
        if name.startswith(("decode", "_decode", "_from_")):
            return "row decoding"
        if name == "run_params":
            return "run-record encoding"
        return "SQL parameter encoding"
    if path.endswith(("_converter.py", "serialization.py")):
        return "run-record encoding"
    return "engine Python"


def _group_shares(raw: dict[Func, tuple[Any, ...]]) -> dict[Func, dict[str, float]]:
    """
    Each function's self time split over the groups: its own group, or for
    library code the groups of its callers, in proportion to the time spent
    on behalf of each (sqlite3's C methods by the kind of statement).
    """
    shares: dict[Func, dict[str, float]] = {}

    def of(func: Func, visiting: frozenset[Func]) -> dict[str, float]:
        if func in shares:
            return shares[func]
        callers: dict[Func, tuple[Any, ...]] = raw[func][4] if func in raw else {}
        own = _own_group(func)
        if "sqlite3." in func[2]:
            total = sum(v[2] for v in callers.values()) or 1.0
            split: dict[str, float] = {}
            for caller, v in callers.items():
                group = _SQL.get(caller[2], "SQL: reads (SELECT + fetch)")
                split[group] = split.get(group, 0.0) + v[2] / total
            result = split
        elif own is not None:
            result = {own: 1.0}
        elif not callers or func in visiting:
            result = {"other": 1.0}
        else:
            total = sum(v[2] or v[1] for v in callers.values()) or 1.0
            result = {}
            for caller, v in callers.items():
                weight = (v[2] or v[1]) / total
                for group, part in of(caller, visiting | {func}).items():
                    result[group] = result.get(group, 0.0) + weight * part
        shares[func] = result
        return result

    for func in raw:
        of(func, frozenset())
    return shares


def profile_sqlite(n: int = 2_000, hours: float = 1.0, top: int = 25) -> str:
    """
    cProfile the SQLite run phase (a fresh store, like a timed repeat) and
    group the self time (tottime). Profiling slows Python far more than C:
    read the groups as where the time goes, not as what it costs unprofiled.
    """
    with tempfile.TemporaryDirectory() as d:
        base, expected = _base_db(d, n, hours)
        path = _copy_db(base, os.path.join(d, "profiled.db"))
        storage = _SortingSQLite(path)
        profiler = cProfile.Profile()
        profiler.enable()
        done, seconds = _drive(storage, hours)
        profiler.disable()
        storage.close()
    assert done == expected
    raw = cast("dict[Func, tuple[Any, ...]]", pstats.Stats(profiler).stats)  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    for func, split in _group_shares(raw).items():
        for group, part in split.items():
            groups[group] = groups.get(group, 0.0) + part * raw[func][2]
    left_out = groups.pop(_FORWARDING, 0.0)
    total = sum(groups.values())
    head = (
        f"{done:,} runs ({n:,} syncs x {hours:g} h) under cProfile: {seconds:.2f} s, "
        f"{(total + left_out) / done * 1e6:.0f} us/run of self time, of which "
        f"{left_out / done * 1e6:.0f} us/run is the profile's own forwarding (left out)"
    )
    lines = [head]
    for name, value in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<55} {value / done * 1e6:7.1f} us/run {value / total * 100:5.1f} %")
    lines.append(f"top {top} by self time:")
    for (filename, line, name), (_, calls, tottime, cumtime, _) in sorted(
        raw.items(), key=lambda kv: -kv[1][2]
    )[:top]:
        lines.append(
            f"  {tottime / done * 1e6:7.2f} us/run self {cumtime / done * 1e6:8.2f} cum "
            f"{calls / done:6.2f} calls/run  {os.path.basename(filename)}:{line}({name})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["profile"]:
        args = sys.argv[2:]
        print(profile_sqlite(int(args[0]) if args else 2_000, float(args[1]) if args[1:] else 1.0))
    else:
        for row in scenario_throughput(*(int(a) for a in sys.argv[1:2])):
            print(row)
