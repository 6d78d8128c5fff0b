"""
The embedded default store: :class:`SQLiteStorage`, one SQLite file.

It is safe with several threads and several processes on one host. Every
write runs in a ``BEGIN IMMEDIATE`` transaction, which takes SQLite's single
write lock before reading anything, so a check and the write that depends on
it (is the lease still ours? is the sync due?) can never interleave with
another writer. Readers never block writers thanks to the WAL journal.

Instants are stored as integer microseconds since the Unix epoch (UTC): they
compare fast in indexes and round-trip exactly.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from itertools import islice, repeat
from operator import itemgetter
from typing import Any, TypeVar

import attrs

from cohortsync._clock import add_saturating, require_aware
from cohortsync._destination import Identifier, IdentifierKind
from cohortsync._sync import SyncRun, SyncStatus
from cohortsync._tokens import token_hex
from cohortsync.exceptions import (
    ConfigurationError,
    ConflictError,
    CorruptStoreError,
    DuplicateRunError,
    LeaseLostError,
    StorageClosedError,
    StorageError,
    SyncNotFoundError,
)
from cohortsync.storage import _sql as q
from cohortsync.storage._base import (
    StorageBase,
    placed,
    placement_of,
    require_distinct_ids,
    written,
)
from cohortsync.storage._protocol import (
    AppliedBatch,
    Claim,
    Completion,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    PendingBatch,
    Placement,
    Progress,
    SyncRecord,
)
from cohortsync.storage._rules import (
    collect_holders,
    earliest_claimable,
    identity_keys,
    require_buckets,
    slot_bucket_of,
)

__all__ = ["SQLiteStorage"]

_FETCH = 10_000
"""Rows per ``fetchmany`` when streaming, and keys per lookup query."""
_US = q.MICROSECONDS

# Each migration is a list of statements run in one transaction (through
# _sql.sqlite_text, which leaves them as they are); the schema version is the
# number of migrations applied. Never edit a released step: append a new one.
_C = TypeVar("_C")
"""What a claim statement decodes to: a Lease or a Claim."""

_MIGRATIONS: list[tuple[str, ...]] = [
    (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        """
        CREATE TABLE syncs (
            id TEXT PRIMARY KEY,
            definition TEXT NOT NULL,
            generation INTEGER NOT NULL,
            status TEXT NOT NULL,
            next_due INTEGER,
            next_trigger TEXT NOT NULL,
            slot_offset INTEGER NOT NULL,
            slot_bucket INTEGER,
            anchor INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            full_resync INTEGER NOT NULL,
            feed_cursor TEXT,
            last_full_sync_at INTEGER,
            lease_owner TEXT,
            lease_token TEXT,
            lease_expires INTEGER,
            lease_slot INTEGER,
            lease_generation INTEGER,
            lease_trigger TEXT
        )
        """,
        "CREATE INDEX syncs_due ON syncs (status, next_due, id)",
        "CREATE TABLE slot_periods (period INTEGER PRIMARY KEY, buckets INTEGER NOT NULL)",
        """
        CREATE TABLE slots (
            period INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (period, bucket)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX slots_load ON slots (period, count, bucket)",
        """
        CREATE TABLE delivered (
            sync_id TEXT NOT NULL,
            key TEXT NOT NULL,
            id_kind TEXT,
            id_value TEXT,
            PRIMARY KEY (sync_id, key)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE ledger (
            sync_id TEXT NOT NULL,
            key TEXT NOT NULL,
            reason TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            dead INTEGER NOT NULL,
            first_seen INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            PRIMARY KEY (sync_id, key)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE runs (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL,
            sync_id TEXT NOT NULL,
            generation INTEGER NOT NULL,
            trigger TEXT NOT NULL,
            status TEXT NOT NULL,
            slot INTEGER NOT NULL,
            started_at INTEGER NOT NULL,
            finished_at INTEGER NOT NULL,
            data TEXT NOT NULL,
            UNIQUE (sync_id, slot)
        )
        """,
        "CREATE INDEX runs_history ON runs (sync_id, started_at)",
        "CREATE INDEX runs_finished ON runs (finished_at)",
        "CREATE INDEX runs_id ON runs (id)",
        """
        CREATE TABLE batches (
            seq INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            sequence INTEGER NOT NULL,
            operation TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            at INTEGER NOT NULL
        )
        """,
        "CREATE INDEX batches_run ON batches (run_id)",
        """
        CREATE TABLE issues (
            seq INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            key TEXT NOT NULL,
            kind TEXT NOT NULL,
            reason TEXT NOT NULL
        )
        """,
        "CREATE INDEX issues_run ON issues (run_id, kind, key)",
    ),
    # 2: a version token of each sync's delivered state, so workers can keep
    # a copy in memory and know when it is stale; and the write-ahead record
    # of batches in flight, so a crash between send and apply loses nothing.
    (
        "ALTER TABLE syncs ADD COLUMN delivered_version TEXT NOT NULL DEFAULT ''",
        """
        CREATE TABLE pending (
            sync_id TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            run_id TEXT NOT NULL,
            operation TEXT NOT NULL,
            members TEXT NOT NULL,
            UNIQUE (sync_id, idempotency_key)
        )
        """,
    ),
    # 3: run records unique per slot by construction (the last recorded slot),
    # clock-jump detection (the instant the schedule was computed from), the
    # slot period a sync is counted in (so counts move with the sync write),
    # the progress of attempts that have not completed, the delivered state
    # indexed by identifier (members sharing one), and the status column
    # checked by the database.
    (
        "ALTER TABLE syncs ADD COLUMN last_slot INTEGER",
        "UPDATE syncs SET last_slot = (SELECT max(slot) FROM runs WHERE runs.sync_id = syncs.id)",
        "ALTER TABLE syncs ADD COLUMN scheduled_from INTEGER",
        "ALTER TABLE syncs ADD COLUMN slot_period INTEGER",
        """
        UPDATE syncs SET slot_period = CASE json_extract(definition, '$.policy.cadence')
            WHEN 'hourly' THEN 3600 WHEN 'daily' THEN 86400 END
        WHERE slot_bucket IS NOT NULL
        """,
        "CREATE INDEX syncs_rebase ON syncs (status, scheduled_from)",
        """
        CREATE INDEX delivered_by_identifier ON delivered (sync_id, id_value)
        WHERE id_value IS NOT NULL
        """,
        """
        CREATE TABLE progress (
            sync_id TEXT PRIMARY KEY,
            slot INTEGER NOT NULL,
            added INTEGER NOT NULL,
            removed INTEGER NOT NULL,
            rejected INTEGER NOT NULL,
            batches INTEGER NOT NULL,
            collisions INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
        "ALTER TABLE syncs ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE syncs ADD COLUMN lease_revision INTEGER",
        """
        CREATE TRIGGER syncs_status_insert BEFORE INSERT ON syncs
        WHEN NEW.status NOT IN ('active', 'paused', 'completed', 'failed', 'deleted')
        BEGIN SELECT RAISE(ABORT, 'cohortsync: unknown sync status'); END
        """,
        """
        CREATE TRIGGER syncs_status_update BEFORE UPDATE OF status ON syncs
        WHEN NEW.status NOT IN ('active', 'paused', 'completed', 'failed', 'deleted')
        BEGIN SELECT RAISE(ABORT, 'cohortsync: unknown sync status'); END
        """,
    ),
    # 4: the size of each sync's delivered state on its row, kept by the
    # transactions that change the state, so a claim hands a run everything
    # it needs without counting (see Claim).
    (
        "ALTER TABLE syncs ADD COLUMN delivered_count INTEGER NOT NULL DEFAULT 0",
        """
        UPDATE syncs SET delivered_count =
            (SELECT count(*) FROM delivered WHERE delivered.sync_id = syncs.id)
        """,
    ),
]

_SELECT_SYNCS = q.sqlite_text(q.SELECT_SYNCS)
_INSERT_SYNC = q.sqlite_text(q.INSERT_SYNC)
_UPDATE_SYNC = q.sqlite_text(q.UPDATE_SYNC)
_UPDATE_SYNC_AT = q.sqlite_text(q.UPDATE_SYNC_AT)
_SLOT_OF_SYNC = q.sqlite_text(q.SLOT_OF_SYNC)
_REVISION_OF_SYNC = q.sqlite_text(q.REVISION_OF_SYNC)
_DELETE_SYNC = q.sqlite_text(q.DELETE_SYNC)
_DELETE_SYNC_STATE = tuple(
    f"DELETE FROM {table} WHERE sync_id = ?"  # noqa: S608 - constant table names
    for table in q.SYNC_STATE_TABLES
)
_SCHEDULED_AFTER = q.sqlite_text(q.SCHEDULED_AFTER)
_UNSCHEDULE = q.sqlite_text(q.UNSCHEDULE)
_IS_HELD = q.sqlite_text(q.IS_HELD)
_HELD = q.sqlite_text(q.HELD)
_EXTEND_LEASE = q.sqlite_text(q.EXTEND_LEASE)
_RELEASE_LEASE = q.sqlite_text(q.RELEASE_LEASE)
_DELETE_PENDING = q.sqlite_text(q.DELETE_PENDING)
_SELECT_PROGRESS = q.sqlite_text(q.SELECT_PROGRESS)
_ADD_PROGRESS = q.sqlite_text(q.ADD_PROGRESS)
_DELETE_PROGRESS = q.sqlite_text(q.DELETE_PROGRESS)
_INSERT_BATCH = q.sqlite_text(q.INSERT_BATCH)
_HAS_LEDGER = q.sqlite_text(q.HAS_LEDGER)
_SELECT_LEDGER = q.sqlite_text(q.SELECT_LEDGER)
_DEAD_LETTERS = q.sqlite_text(q.DEAD_LETTERS)
_COUNT_SLOT = """
    INSERT INTO slots (period, bucket, count) VALUES (?, ?, 1)
    ON CONFLICT (period, bucket) DO UPDATE SET count = count + 1
"""
_UNCOUNT_SLOT = "UPDATE slots SET count = count - 1 WHERE period = ? AND bucket = ? AND count > 0"
_COUNT_SLOTS = """
    INSERT INTO slots (period, bucket, count) VALUES (?, ?, ?)
    ON CONFLICT (period, bucket) DO UPDATE SET count = count + excluded.count
"""
_IDS_PER_LOOKUP = 500
"""Ids per ``IN (...)`` lookup: well under SQLite's bound on parameters (999 before 3.32)."""
# The slot rule of cohortsync.storage._rules.claim_slot: never at or before the last
# recorded run's slot. SET expressions all see the row as it was before.
_CLAIMED_SLOT = (
    "CASE WHEN last_slot IS NOT NULL AND next_due <= last_slot THEN last_slot + 1 ELSE next_due END"
)
_CLAIM = f"""
    UPDATE syncs SET
        lease_owner = :owner,
        lease_token = :prefix || lower(hex(randomblob(8))),
        lease_expires = :expires,
        next_due = {_CLAIMED_SLOT},
        lease_slot = {_CLAIMED_SLOT},
        lease_generation = generation,
        lease_trigger = next_trigger,
        lease_revision = revision
    WHERE id IN (
        SELECT id FROM syncs
        WHERE status = :active AND next_due <= :now
            AND (lease_token IS NULL OR lease_expires < :now)
        ORDER BY next_due, id
        LIMIT :limit
    )
    RETURNING id, generation, next_due, next_trigger, lease_token, revision
"""  # noqa: S608 - a constant expression, no values
_CLAIM_RUNS = _CLAIM.replace(
    "RETURNING id, generation, next_due, next_trigger, lease_token, revision",
    f"RETURNING {q.sqlite_text(q.CLAIM_RUN_COLUMNS)}",
)
_INSERT_RUN = """
    INSERT INTO runs (id, sync_id, generation, trigger, status, slot, started_at, finished_at, data)
    VALUES (:id, :sync_id, :generation, :trigger, :status, :slot, :started_at, :finished_at,
        :record)
    ON CONFLICT (sync_id, slot) DO NOTHING
"""
# Inserted and updated apart: an add is nearly always a new row (an upsert
# costs a fifth more per row), and the rows inserted are counted (an
# upsert's rowcount cannot tell the two apart), so delivered_count stays exact.
_INSERT_DELIVERED = """
    INSERT INTO delivered (sync_id, key, id_kind, id_value) VALUES (?, ?, ?, ?)
    ON CONFLICT (sync_id, key) DO NOTHING
"""
_UPDATE_DELIVERED = """
    UPDATE delivered SET id_kind = ?, id_value = ? WHERE sync_id = ? AND key = ?
"""
_MOVE_DELIVERED = (
    "UPDATE syncs SET delivered_version = ?, delivered_count = delivered_count + ? WHERE id = ?"
)
_REJECT = """
    INSERT INTO ledger (sync_id, key, reason, attempts, dead, first_seen, last_seen)
    VALUES (:sync_id, :key, :reason, 1, 1 >= :max, :at, :at)
    ON CONFLICT (sync_id, key) DO UPDATE SET
        reason = excluded.reason,
        attempts = attempts + 1,
        dead = attempts + 1 >= :max,
        last_seen = excluded.last_seen
"""
# Key lists travel as one JSON array parameter: no statement is ever built from
# values, there is no limit on the number of SQL variables, and SQLite still
# answers with one primary-key search per key.
_FILTER = """
    SELECT d.key FROM delivered AS d
    WHERE d.sync_id = ? AND d.key IN (SELECT value FROM json_each(?))
"""
_IDENTIFIERS = """
    SELECT d.key, d.id_kind, d.id_value FROM delivered AS d
    WHERE d.sync_id = ? AND d.key IN (SELECT value FROM json_each(?))
"""
# INDEXED BY: without statistics SQLite prefers the primary key's range of
# the sync (``sync_id = ?``) to this partial index, and reads every member
# the sync has delivered (100 ms at 1,000,000 members) to find a handful.
_HOLDERS = """
    SELECT d.key, d.id_kind, d.id_value FROM delivered AS d INDEXED BY delivered_by_identifier
    WHERE d.sync_id = ? AND d.id_value IS NOT NULL
        AND d.id_value IN (SELECT value FROM json_each(?))
"""
_MAPPED = """
    SELECT 1 FROM delivered INDEXED BY delivered_by_identifier
    WHERE sync_id = ? AND id_value IS NOT NULL LIMIT 1
"""
_IDENTITY_HOLDERS = """
    SELECT d.key FROM delivered AS d
    WHERE d.sync_id = ? AND d.id_kind IS NULL AND d.key IN (SELECT value FROM json_each(?))
"""


def _chunks(items: Iterable[str]) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(islice(it, _FETCH)):
        yield chunk


_fork_lock = threading.Lock()
_inherited: list[object] = []
"""Connections a forked child inherited: kept referenced so they are never closed there."""


def _reset_fork_lock() -> None:
    global _fork_lock  # noqa: PLW0603 - a lock held by a thread that did not survive fork()
    _fork_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_reset_fork_lock)


def _close_connections(connections: list[sqlite3.Connection], in_use: threading.RLock) -> None:
    # Waits for a call in flight on these connections: closing a connection
    # while another thread's statement runs on it crashed the process
    # (SIGSEGV inside sqlite3), an outside tester's web-app shutdown.
    with in_use:
        for conn in list(connections):
            with suppress(sqlite3.Error):
                conn.close()
        connections.clear()


class _ThreadConnections:
    """
    The connections one thread uses: its own for statements and write
    transactions, plus an idle reader kept for the next :meth:`iter_delivered`.

    Streaming reads get a connection of their own so that they see one
    snapshot of the delivered state while the same thread applies batches.
    """

    __slots__ = ("__weakref__", "all", "ident", "in_use", "main", "reader")

    def __init__(self, main: sqlite3.Connection) -> None:
        self.main = main
        self.reader: sqlite3.Connection | None = None
        self.all = [main]
        self.ident = threading.get_ident()
        self.in_use = threading.RLock()
        """Held while a statement runs on these connections; close() waits for it."""


class SQLiteStorage(StorageBase):
    """
    A :class:`~cohortsync.storage.Storage` in one SQLite file, shared by threads and processes.

    Each thread gets its own connection (connections are opened with
    ``check_same_thread=False`` only so that :meth:`close` can close them from
    whichever thread calls it; a connection is never used by two threads). A
    process forked after the store was opened (a pre-forking web server, Celery)
    opens connections of its own instead of sharing the parent's.

    Args:
        path: The database file. It is created if missing; an existing file
            must be an empty SQLite database or one written by cohortsync.
        busy_timeout: Seconds to wait for another writer's lock before giving up
            with :class:`~cohortsync.exceptions.StorageError`.

    Raises:
        CorruptStoreError: The file is not SQLite, or belongs to another application.
        SchemaVersionError: The file was written by a newer cohortsync.
        StorageError: The file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 30.0) -> None:
        self._path = os.fspath(path)
        if self._path in {"", ":memory:"} or self._path.startswith("file::memory:"):
            raise ConfigurationError(
                "path", path, "SQLiteStorage needs a file; use MemoryStorage for an in-memory store"
            )
        if busy_timeout < 0:
            raise ConfigurationError("busy_timeout", busy_timeout, "must be >= 0")
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._writer = threading.Lock()
        """Held by this process's writer: see :meth:`_write`."""
        self._finalizers: list[weakref.finalize[Any, Any]] = []
        self._closed = False
        self._pid = os.getpid()
        try:
            self._prepare(self._threaded().main)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path!r})"

    @property
    def path(self) -> str:
        """
        The database file, as given: check it when two processes should share
        a store but one sees syncs the other does not.
        """
        return self._path

    # -- connections ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,  # we issue BEGIN IMMEDIATE ourselves
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {self._path!r}: {exc}") from exc
        try:
            # NORMAL is durable across application crashes in WAL mode; only a
            # power loss may roll back the last transactions, never corrupt.
            conn.execute("PRAGMA synchronous = NORMAL")
            # 8 MB: enough for the hot index pages of claims and batch writes;
            # more only holds pages of large scans in memory for no gain.
            conn.execute("PRAGMA cache_size = -8000")
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc) from exc
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosedError(repr(self))

    def _forget_parent(self) -> None:
        """
        In a forked child, drop the connections inherited from the parent without
        touching them (SQLite connections must not cross fork(); closing them here
        could disturb the parent's locks) and start afresh.
        """
        with _fork_lock:
            if self._pid == os.getpid():
                return
            for finalizer in self._finalizers:
                finalizer.detach()
            _inherited.append(self._local)  # dropping it would close the parent's connections
            self._finalizers = []
            self._lock = threading.Lock()
            self._writer = threading.Lock()
            self._local = threading.local()
            self._pid = os.getpid()

    def _threaded(self) -> _ThreadConnections:
        self._check_open()
        if self._pid != os.getpid():
            self._forget_parent()
        mine: _ThreadConnections | None = getattr(self._local, "connections", None)
        if mine is not None:
            return mine
        mine = _ThreadConnections(self._connect())
        # Closes the thread's connections when the thread ends, or on close().
        finalizer = weakref.finalize(mine, _close_connections, mine.all, mine.in_use)
        finalizer.atexit = False
        with self._lock:
            self._finalizers = [f for f in self._finalizers if f.alive]
            self._finalizers.append(finalizer)
            registered = not self._closed
        if not registered:  # close() ran meanwhile in another thread
            finalizer()
            self._check_open()
        self._local.connections = mine
        return mine

    def _error(self, exc: sqlite3.Error) -> StorageError:
        message = str(exc)
        if "not a database" in message:
            return CorruptStoreError(f"{self._path!r} is not an SQLite database ({message})")
        if "malformed" in message:
            return CorruptStoreError(f"{self._path!r}: {message}")
        return StorageError(f"SQLite error on {self._path!r}: {message}")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        mine = self._threaded()
        with mine.in_use:
            self._check_open()  # close() may have closed it while this call waited
            try:
                yield mine.main
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """
        One write transaction holding SQLite's write lock from its first statement,
        so reads inside it cannot be invalidated by another writer.
        """
        mine = self._threaded()
        conn = mine.main
        # Threads of this process queue here, first come first served, and
        # each starts as soon as the one before commits. Left to SQLite, they
        # would all ask for its write lock and the losers would sleep in its
        # busy handler's growing steps (up to 100 ms) however soon the lock
        # is free: with ten runs writing at once, a 0.5 ms write took 5 ms.
        # Other processes still wait in SQLite's busy handler.
        waited = (
            self._writer.acquire(timeout=self._busy_timeout)
            if self._busy_timeout > 0
            else self._writer.acquire(blocking=False)
        )
        if not waited:
            raise StorageError(
                f"SQLite error on {self._path!r}: database is locked (another thread of "
                f"this process held the write lock for {self._busy_timeout:g}s)"
            )
        try:
            with mine.in_use:
                self._check_open()  # close() may have closed it while this call waited
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException as exc:
                    if conn.in_transaction:
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise self._error(exc) from exc
                    raise
        finally:
            self._writer.release()

    def close(self) -> None:
        """
        Close every connection this store opened, in any thread. Idempotent.
        """
        with self._lock:
            self._closed = True
            finalizers, self._finalizers = self._finalizers, []
        for finalizer in finalizers:
            finalizer()

    # -- schema ----------------------------------------------------------------------

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """
        :meth:`_prepare_once`, again while the file is locked, up to the busy
        timeout: processes opening a new file at once race to switch it to
        WAL and migrate it, and SQLite answers some of those races with
        "database is locked" at once instead of waiting (a test of three
        processes opening one new file failed so once, in CI).
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.005
        while True:
            try:
                self._prepare_once(conn)
            except sqlite3.Error as exc:  # noqa: PERF203 - a retry loop: the error is the signal
                locked = isinstance(exc, sqlite3.OperationalError) and (
                    "locked" in str(exc) or "busy" in str(exc)
                )
                if not locked or time.monotonic() + pause > deadline:
                    raise self._error(exc) from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
            else:
                return

    def _prepare_once(self, conn: sqlite3.Connection) -> None:
        """
        Check the file is ours (or empty), switch it to WAL and migrate it;
        SQLite's errors are :meth:`_prepare`'s to retry or report.

        Nothing is written to a file that is not ours: the checks come first.
        """
        supported = len(_MIGRATIONS)
        version = self._schema_version(conn, supported)
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if mode.lower() != "wal":
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode.lower() != "wal":
                raise StorageError(f"cannot switch {self._path!r} to WAL (it is in {mode!r})")
        if version == supported:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            version = self._schema_version(conn, supported)
            # executescript() is avoided on purpose: it commits first, which
            # would let a failed step leave a half-migrated file.
            q.migrate(
                lambda statement, params: conn.execute(q.sqlite_text(statement), params),
                _MIGRATIONS,
                version,
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _schema_version(self, conn: sqlite3.Connection, supported: int) -> int:
        """
        The file's schema version: 0 for an empty database (see :func:`_sql.schema_version`).
        """
        tables = sorted(
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        )

        def read_meta() -> dict[str, str] | None:
            try:
                return dict(conn.execute(q.sqlite_text(q.READ_META)).fetchall())
            except sqlite3.OperationalError:  # a meta table of another shape
                return None

        return q.schema_version(
            tables,
            read_meta,
            supported,
            foreign=(
                f"{self._path!r} is an SQLite database of another application "
                f"(tables: {', '.join(tables[:10])}); cohortsync only opens empty files "
                "and its own databases, to never modify someone else's data"
            ),
            where=repr(self._path),
        )

    # -- sync definitions ------------------------------------------------------------

    def create_sync(self, record: SyncRecord) -> None:
        params = q.sync_params(record, _US)
        slot = slot_bucket_of(record)
        with self._write() as conn:
            if conn.execute(_INSERT_SYNC, params).rowcount != 1:
                raise ConfigurationError("id", record.id, "a sync with this id already exists")
            if slot is not None:
                conn.execute(_COUNT_SLOT, slot)

    def get_sync(self, sync_id: str) -> SyncRecord:
        with self._read() as conn:
            row = conn.execute(f"{_SELECT_SYNCS} WHERE id = ?", (sync_id,)).fetchone()
        if row is None:
            raise SyncNotFoundError(sync_id)
        return q.decode_sync(row, _US)

    def list_syncs(self) -> list[SyncRecord]:
        with self._read() as conn:
            rows = conn.execute(f"{_SELECT_SYNCS} ORDER BY id").fetchall()
        return [q.decode_sync(row, _US) for row in rows]

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        params = q.sync_params(record, _US)
        slot = slot_bucket_of(record)
        with self._write() as conn:
            row = conn.execute(_SLOT_OF_SYNC, (record.id,)).fetchone()
            if row is None:
                raise SyncNotFoundError(record.id)
            if row[0] != expected_generation:
                raise ConflictError(record.id, expected_generation, row[0])
            conn.execute(_UPDATE_SYNC, params)
            _move_count(conn, row[1], row[2], slot)

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        """
        The read of the revision and the conditional update in one write
        transaction, as :meth:`save_sync` (SQLite's write lock is taken first).
        """
        params = q.sync_params(record, _US)
        params["expected_revision"] = expected_revision
        slot = slot_bucket_of(record)
        with self._write() as conn:
            row = conn.execute(_REVISION_OF_SYNC, (record.id,)).fetchone()
            if row is None:
                raise SyncNotFoundError(record.id)
            if row[0] != expected_revision or conn.execute(_UPDATE_SYNC_AT, params).rowcount != 1:
                raise ConflictError(record.id, expected_revision, row[0], counter="revision")
            _move_count(conn, row[1], row[2], slot)

    def delete_sync(self, sync_id: str) -> None:
        with self._write() as conn:
            row = conn.execute(_DELETE_SYNC, (sync_id,)).fetchone()
            if row is not None and row[0] is not None and row[1] is not None:
                conn.execute(_UNCOUNT_SLOT, row)
            for statement in _DELETE_SYNC_STATE:
                conn.execute(statement, (sync_id,))

    def next_due(self) -> datetime | None:
        """
        Walk active syncs in due order (an index scan) until the rule of
        :func:`~cohortsync.storage._rules.earliest_claimable` has its answer,
        one row at a time: usually the first row answers (only a sync with a
        lease can be claimable later than due). Each row read costs a lookup
        of its lease in the table, through a B-tree that is deeper in a
        bigger store: reading a page of 64 rows to use one or two made an
        idle worker's round cost more with more syncs.
        """
        with self._read() as conn:
            cursor = conn.execute(
                "SELECT next_due, lease_expires FROM syncs "
                "WHERE status = ? AND next_due IS NOT NULL ORDER BY next_due, id",
                (SyncStatus.ACTIVE.value,),
            )
            try:
                rows = ((_US.decode(due), _US.decode_optional(expires)) for due, expires in cursor)
                return earliest_claimable(rows)
            finally:
                cursor.close()

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        with self._read() as conn:
            rows = conn.execute(_SCHEDULED_AFTER, (_US.encode(require_aware(now, "now")),))
            return [q.decode_sync(row, _US) for row in rows.fetchall()]

    def due_between(
        self, after: tuple[datetime, str] | None, until: datetime, limit: int
    ) -> list[SyncRecord]:
        """
        A range of the claim's index ``(status, next_due, id)``, from the key *after*.
        """
        params = [SyncStatus.ACTIVE.value, _US.encode(require_aware(until, "until"))]
        where = ""
        if after is not None:
            where = " AND (next_due, id) > (?, ?)"
            params += [_US.encode(require_aware(after[0], "after")), after[1]]
        with self._read() as conn:
            rows = conn.execute(
                f"{_SELECT_SYNCS} WHERE status = ? AND next_due <= ?{where}"
                " ORDER BY next_due, id LIMIT ?",
                (*params, max(limit, 0)),
            ).fetchall()
        return [q.decode_sync(row, _US) for row in rows]

    def page_syncs(self, after: str | None, limit: int) -> list[SyncRecord]:
        with self._read() as conn:
            if after is None:
                rows = conn.execute(
                    f"{_SELECT_SYNCS} ORDER BY id LIMIT ?", (max(limit, 0),)
                ).fetchall()
            else:
                rows = conn.execute(
                    f"{_SELECT_SYNCS} WHERE id > ? ORDER BY id LIMIT ?", (after, max(limit, 0))
                ).fetchall()
        return [q.decode_sync(row, _US) for row in rows]

    # -- slot allocation -----------------------------------------------------------

    def least_loaded_slot(self, period: int, buckets: int, preferred: int) -> int:
        require_buckets(buckets)
        with self._write() as conn:
            return _pick_slot(conn, period, buckets, preferred % buckets)

    def create_sync_least_loaded(self, record: SyncRecord, buckets: int) -> SyncRecord:
        """
        The pick, the sync and its count in one write transaction.
        """
        period, preferred = placement_of(record, buckets)
        with self._write() as conn:
            stored = placed(record, _pick_slot(conn, period, buckets, preferred))
            if conn.execute(_INSERT_SYNC, q.sync_params(stored, _US)).rowcount != 1:
                raise ConfigurationError("id", record.id, "a sync with this id already exists")
            conn.execute(_COUNT_SLOT, (period, stored.slot_bucket))
        return stored

    def slot_counts(self, period: int, buckets: int) -> list[int]:
        with self._read() as conn:
            return _slot_counts(conn, period, buckets)

    def create_syncs(self, records: Sequence[SyncRecord]) -> list[str]:
        """
        One write transaction: the taken ids are looked up first (under the
        write lock, so none can be taken in between), the rest inserted with
        one ``executemany`` and their slot counts added per bucket.
        """
        require_distinct_ids(records)
        if not records:
            return []
        # Encoded before the write lock is taken: other writers wait less.
        params = [q.sync_params(record, _US) for record in records]
        with self._write() as conn:
            return _insert_syncs(conn, records, params)

    def create_syncs_placed(
        self, ids: Sequence[str], place: Placement
    ) -> tuple[list[SyncRecord], list[str]]:
        """
        *place* reads the counts inside the write transaction, under
        SQLite's write lock: creators in other threads and processes pick
        in turn.
        """
        with self._write() as conn:
            taken = _taken_ids(conn, ids)
            records = list(
                place(lambda period, buckets: _slot_counts(conn, period, buckets), taken)
            )
            require_distinct_ids(records)
            params = [q.sync_params(record, _US) for record in records]
            inserted = _insert_syncs(conn, records, params, taken) if records else []
            return written(records, inserted)

    # -- claims and leases ----------------------------------------------------------

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        """
        Lease up to *limit* due syncs with one ``UPDATE ... RETURNING`` inside
        ``BEGIN IMMEDIATE``: choosing the rows and leasing them is one statement
        under the write lock, so two workers can never pick the same sync.
        """
        return self._claim(
            _CLAIM, q.decode_claims, now=now, owner=owner, lease_for=lease_for, limit=limit
        )

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        """
        :meth:`claim_due` returning the whole row and the delivered-state facts
        (one statement, see :data:`~cohortsync.storage._sql.CLAIM_RUN_COLUMNS`).
        """
        return self._claim(
            _CLAIM_RUNS, q.decode_claim_runs, now=now, owner=owner, lease_for=lease_for, limit=limit
        )

    def _claim(
        self,
        statement: str,
        decode: Callable[..., list[_C]],
        *,
        now: datetime,
        owner: str,
        lease_for: timedelta,
        limit: int,
    ) -> list[_C]:
        now = require_aware(now, "now")
        if limit < 1:
            return []
        expires_at = add_saturating(now, lease_for)
        params = {
            "owner": owner,
            # The token's first half comes from the OS's CSPRNG in this process,
            # so forked workers (which share SQLite's PRNG state) never collide.
            "prefix": secrets.token_hex(8),
            "expires": _US.encode(expires_at),
            "active": SyncStatus.ACTIVE.value,
            "now": _US.encode(now),
            "limit": limit,
        }
        with self._write() as conn:
            rows = conn.execute(statement, params).fetchall()
            return decode(
                rows, owner, expires_at, _US, lambda sync_id: conn.execute(_UNSCHEDULE, (sync_id,))
            )

    @staticmethod
    def _check_lease(conn: sqlite3.Connection, lease: Lease) -> None:
        if conn.execute(_IS_HELD, (lease.sync_id, lease.token)).fetchone() is None:
            raise LeaseLostError(lease.sync_id, lease.owner, lease.token)

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        expires_at = add_saturating(require_aware(now, "now"), lease_for)
        extended = attrs.evolve(lease, expires_at=expires_at)
        with self._write() as conn:
            cursor = conn.execute(
                _EXTEND_LEASE, (_US.encode(extended.expires_at), lease.sync_id, lease.token)
            )
            if cursor.rowcount != 1:
                raise LeaseLostError(lease.sync_id, lease.owner, lease.token)
        return extended

    def release_lease(self, lease: Lease) -> None:
        with self._write() as conn:
            if conn.execute(_RELEASE_LEASE, (lease.sync_id, lease.token)).rowcount != 1:
                raise LeaseLostError(lease.sync_id, lease.owner, lease.token)

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        """
        In one write transaction: read the held sync's row, insert the run,
        write what :func:`~cohortsync.storage.apply_completion` decides from
        the row, and delete the resolved pending batches and the progress.
        Any error rolls all of it back.
        """
        with self._write() as conn:
            self._complete(conn, lease, completion)

    def complete_runs(
        self, completions: Sequence[tuple[Lease, Completion]]
    ) -> list[Exception | None]:
        """
        Every completion in one write transaction (one commit). Each one checks
        its lease and its slot before it writes anything (see :meth:`_complete`),
        so one refused completion leaves nothing to roll back and fails alone.
        """
        out: list[Exception | None] = []
        if not completions:
            return out
        with self._write() as conn:
            for lease, completion in completions:
                try:
                    self._complete(conn, lease, completion)
                except (LeaseLostError, DuplicateRunError) as exc:  # noqa: PERF203 - per completion
                    out.append(exc)
                else:
                    out.append(None)
        return out

    @staticmethod
    def _complete(conn: sqlite3.Connection, lease: Lease, completion: Completion) -> None:
        """
        One completion inside the caller's transaction. The two checks come
        before any write: the lease read, then the run insert that does
        nothing on a recorded slot. A refused completion has written nothing.
        """
        run = completion.run
        held = conn.execute(_HELD, (lease.sync_id, lease.token)).fetchone()
        if held is None:
            raise LeaseLostError(lease.sync_id, lease.owner, lease.token)
        if conn.execute(_INSERT_RUN, q.run_params(run, _US)).rowcount != 1:
            raise DuplicateRunError(run.sync_id, run.slot)
        statement, params = q.completion_update(held, lease, completion, _US)
        conn.execute(q.sqlite_text(statement), params)
        if completion.resolved:
            conn.executemany(_DELETE_PENDING, ((lease.sync_id, key) for key in completion.resolved))
        conn.execute(_DELETE_PROGRESS, (lease.sync_id,))

    def begin_batch(
        self, lease: Lease, batch: PendingBatch, *, replaces: str | None = None
    ) -> None:
        members = q.encode_members(batch.members)
        with self._write() as conn:
            self._check_lease(conn, lease)
            if replaces is not None:
                conn.execute(_DELETE_PENDING, (lease.sync_id, replaces))
            # REPLACE deletes then inserts: a re-begun batch becomes the newest row.
            conn.execute(
                "INSERT OR REPLACE INTO pending "
                "(sync_id, idempotency_key, run_id, operation, members) VALUES (?, ?, ?, ?, ?)",
                (
                    lease.sync_id,
                    batch.idempotency_key,
                    batch.run_id,
                    batch.operation.value,
                    members,
                ),
            )

    def pending_batches(self, sync_id: str) -> list[PendingBatch]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT idempotency_key, run_id, operation, members FROM pending "
                "WHERE sync_id = ? ORDER BY rowid",
                (sync_id,),
            ).fetchall()
        return q.decode_pending(sync_id, rows)

    def progress(self, sync_id: str) -> Progress | None:
        with self._read() as conn:
            row = conn.execute(_SELECT_PROGRESS, (sync_id,)).fetchone()
        return q.decode_progress(sync_id, row, _US)

    # -- delivered state ------------------------------------------------------------

    def iter_delivered(self, sync_id: str) -> Iterator[str]:
        """
        Stream the keys chunk by chunk from one read snapshot taken when iteration
        starts, on a reader connection of its own, so batches the same thread
        applies meanwhile neither disturb the stream nor wait for it.
        """
        mine = self._threaded()
        reader = mine.reader
        if reader is None:
            reader = self._connect()
            # It only streams the delivered keys once per run: a page cache
            # would hold a copy of the index it will not read again.
            reader.execute("PRAGMA cache_size = -1000")
            mine.all.append(reader)
        else:
            mine.reader = None
        # Each statement and fetch holds the connections' in-use lock, not the
        # whole stream: close() waits for a fetch, never for a consumer.
        try:
            with mine.in_use:
                self._check_open()
                cursor = reader.execute(
                    "SELECT key FROM delivered WHERE sync_id = ? ORDER BY key", (sync_id,)
                )
            try:
                while True:
                    with mine.in_use:
                        self._check_open()
                        rows = cursor.fetchmany(_FETCH)
                    if not rows:
                        break
                    yield from map(itemgetter(0), rows)
            finally:
                with mine.in_use, suppress(sqlite3.Error):
                    cursor.close()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        finally:
            with mine.in_use:
                if mine.reader is None and not self._closed and threading.get_ident() == mine.ident:
                    mine.reader = reader
                else:
                    with suppress(ValueError):
                        mine.all.remove(reader)
                    with suppress(sqlite3.Error):
                        reader.close()

    def count_delivered(self, sync_id: str) -> int:
        with self._read() as conn:
            row = conn.execute(
                "SELECT delivered_count FROM syncs WHERE id = ?", (sync_id,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def filter_delivered(self, sync_id: str, keys: Iterable[str]) -> set[str]:
        found: set[str] = set()
        with self._read() as conn:
            for chunk in _chunks(keys):
                rows = conn.execute(_FILTER, (sync_id, json.dumps(chunk))).fetchall()
                found.update(map(itemgetter(0), rows))
        return found

    def delivered_identifiers(self, sync_id: str, keys: Sequence[str]) -> dict[str, Identifier]:
        out: dict[str, Identifier] = {}
        with self._read() as conn:
            for chunk in _chunks(keys):
                for key, kind, value in conn.execute(_IDENTIFIERS, (sync_id, json.dumps(chunk))):
                    out[key] = q.decode_identifier(sync_id, key, kind, value)
        # Answer in the order asked, like the reference store.
        return {k: out[k] for k in keys if k in out}

    def has_mapped_identifiers(self, sync_id: str) -> bool:
        """As :meth:`~cohortsync.storage.MemoryStorage.has_mapped_identifiers`, by one probe."""
        with self._read() as conn:
            return conn.execute(_MAPPED, (sync_id,)).fetchone() is not None

    def identifier_holders(
        self, sync_id: str, identifiers: Iterable[Identifier]
    ) -> dict[Identifier, list[str]]:
        wanted = set(identifiers)
        by_value = sorted({i.value for i in wanted})
        own = sorted({i.value for i in wanted if i.kind is IdentifierKind.USER_ID})
        with self._read() as conn:
            rows = [
                (key, q.decode_identifier(sync_id, key, kind, value))
                for chunk in _chunks(by_value)
                for key, kind, value in conn.execute(_HOLDERS, (sync_id, json.dumps(chunk)))
            ]
            keys = [
                key
                for chunk in _chunks(own)
                for (key,) in conn.execute(_IDENTITY_HOLDERS, (sync_id, json.dumps(chunk)))
            ]
        return collect_holders(wanted, rows, keys)

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        """
        Check the lease and apply the whole batch in one write transaction, with
        ``executemany`` so a 10,000-member batch costs one statement preparation.
        """
        sync_id = lease.sync_id
        # Under the identity mapping (the common case) the rows are bound at C
        # speed: a first sync writes every member of the cohort here.
        keys = identity_keys(batch.added)
        if keys is None:
            added = [(sync_id, m.key, *q.identifier_columns(m)) for m in batch.added]
            keys = [row[1] for row in added]
        else:
            added = None
        at = _US.encode(batch.at)
        with self._write() as conn:
            self._check_lease(conn, lease)
            change = 0
            if keys:
                rows = added or zip(repeat(sync_id), keys, repeat(None), repeat(None))
                change = conn.executemany(_INSERT_DELIVERED, rows).rowcount
                if change != len(keys):
                    # Some were delivered already: give them the identifier sent now.
                    rows = added or zip(repeat(sync_id), keys, repeat(None), repeat(None))
                    conn.executemany(_UPDATE_DELIVERED, ((*r[2:], *r[:2]) for r in rows))
            if batch.removed:
                change -= conn.executemany(
                    "DELETE FROM delivered WHERE sync_id = ? AND key = ?",
                    ((sync_id, key) for key in batch.removed),
                ).rowcount
            has_ledger = conn.execute(_HAS_LEDGER, (sync_id,)).fetchone()
            if has_ledger and (keys or batch.removed):
                touched = [*keys, *batch.removed]
                conn.executemany(
                    "DELETE FROM ledger WHERE sync_id = ? AND key = ?",
                    ((sync_id, key) for key in touched),
                )
            if batch.rejected:
                conn.executemany(
                    _REJECT,
                    (
                        {
                            "sync_id": sync_id,
                            "key": key,
                            "reason": reason,
                            "max": batch.max_rejection_attempts,
                            "at": at,
                        }
                        for key, reason in batch.rejected
                    ),
                )
                conn.executemany(
                    "INSERT INTO issues (run_id, key, kind, reason) VALUES (?, ?, ?, ?)",
                    (
                        (batch.run_id, key, IssueKind.REJECTED.value, reason)
                        for key, reason in batch.rejected
                    ),
                )
            conn.execute(
                _INSERT_BATCH,
                (batch.run_id, batch.sequence, batch.operation.value, batch.idempotency_key, at),
            )
            conn.execute(_DELETE_PENDING, (sync_id, batch.idempotency_key))
            if batch.slot is not None and batch.tally:
                conn.execute(
                    _ADD_PROGRESS, q.progress_params(sync_id, batch.slot, batch.tally, _US)
                )
            version = token_hex(8)
            conn.execute(_MOVE_DELIVERED, (version, change, sync_id))
        return version

    def delivered_version(self, sync_id: str) -> str:
        with self._read() as conn:
            row = conn.execute(
                "SELECT delivered_version FROM syncs WHERE id = ?", (sync_id,)
            ).fetchone()
        return "" if row is None else str(row[0])

    def record_issues(self, lease: Lease, issues: Sequence[MemberIssue]) -> None:
        with self._write() as conn:
            self._check_lease(conn, lease)
            conn.executemany(
                "INSERT INTO issues (run_id, key, kind, reason) VALUES (?, ?, ?, ?)",
                ((i.run_id, i.key, i.kind.value, i.reason) for i in issues),
            )

    # -- ledger and history ------------------------------------------------------------

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        with self._read() as conn:
            rows = conn.execute(_SELECT_LEDGER, (sync_id,)).fetchall()
        return q.decode_ledger(sync_id, rows, _US)

    def dead_letters(self, sync_id: str) -> set[str]:
        with self._read() as conn:
            rows = conn.execute(_DEAD_LETTERS, (sync_id,)).fetchall()
        return {key for (key,) in rows}

    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, data FROM runs WHERE sync_id = ? "
                "ORDER BY started_at DESC, slot DESC LIMIT ?",
                (sync_id, -1 if limit is None or limit < 0 else limit),  # -1: no limit
            ).fetchall()
        return q.limit_history([q.decode_run(run_id, data) for run_id, data in rows], limit)

    def run_issues(self, run_id: str) -> list[MemberIssue]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT key, kind, reason FROM issues WHERE run_id = ? ORDER BY kind, key, seq",
                (run_id,),
            ).fetchall()
        return [
            MemberIssue(run_id=run_id, key=key, kind=kind, reason=reason)
            for key, kind, reason in rows
        ]

    def purge_history(self, before: datetime) -> int:
        cut = (_US.encode(require_aware(before, "before")),)
        old_runs = "SELECT id FROM runs WHERE finished_at < ?"
        with self._write() as conn:
            conn.execute(f"DELETE FROM issues WHERE run_id IN ({old_runs})", cut)  # noqa: S608 - constant
            conn.execute(f"DELETE FROM batches WHERE run_id IN ({old_runs})", cut)  # noqa: S608 - constant
            # Batches of runs that never completed (a crashed worker) have no
            # run to go with: they age out on their own time.
            conn.execute("DELETE FROM batches WHERE at < ?", cut)
            deleted: int = conn.execute("DELETE FROM runs WHERE finished_at < ?", cut).rowcount
        return deleted


def _move_count(
    conn: sqlite3.Connection,
    period: int | None,
    bucket: int | None,
    slot: tuple[int, int] | None,
) -> None:
    """
    Move a saved sync's count from the stored ``(period, bucket)`` to *slot*
    when they differ, inside the caller's write transaction.
    """
    old = None if period is None or bucket is None else (period, bucket)
    if old != slot:
        if old is not None:
            conn.execute(_UNCOUNT_SLOT, old)
        if slot is not None:
            conn.execute(_COUNT_SLOT, slot)


def _pick_slot(conn: sqlite3.Connection, period: int, buckets: int, preferred: int) -> int:
    """
    The least loaded of *buckets* buckets of *period*, inside the caller's
    write transaction: the first at or after *preferred* holding the lowest
    count, else the first before it.
    """
    row = conn.execute("SELECT buckets FROM slot_periods WHERE period = ?", (period,)).fetchone()
    known = 0 if row is None else row[0]
    if known < buckets:
        # Every bucket gets a row up front, so the least loaded one is
        # always the first entry of the (period, count, bucket) index.
        conn.executemany(
            "INSERT OR IGNORE INTO slots (period, bucket, count) VALUES (?, ?, 0)",
            ((period, b) for b in range(known, buckets)),
        )
        conn.execute(
            "INSERT INTO slot_periods (period, buckets) VALUES (?, ?) "
            "ON CONFLICT (period) DO UPDATE SET buckets = excluded.buckets",
            (period, buckets),
        )
    (least,) = conn.execute(
        "SELECT count FROM slots WHERE period = ? AND bucket < ? ORDER BY count LIMIT 1",
        (period, buckets),
    ).fetchone()
    pick = "SELECT bucket FROM slots WHERE period = ? AND count = ? AND bucket >= ? AND bucket < ? ORDER BY bucket LIMIT 1"  # noqa: E501 - one query reads better on one line
    # The first bucket at or after `preferred`, else wrap around to the start.
    row = conn.execute(pick, (period, least, preferred, buckets)).fetchone()
    if row is None:
        row = conn.execute(pick, (period, least, 0, preferred)).fetchone()
    bucket: int = row[0]
    return bucket


def _slot_counts(conn: sqlite3.Connection, period: int, buckets: int) -> list[int]:
    """How many syncs each of the *buckets* slot buckets of *period* holds."""
    require_buckets(buckets)
    counts = [0] * buckets
    rows = conn.execute(
        "SELECT bucket, count FROM slots WHERE period = ? AND bucket >= 0 AND bucket < ?",
        (period, buckets),
    ).fetchall()
    for bucket, count in rows:
        counts[bucket] = count
    return counts


def _insert_syncs(
    conn: sqlite3.Connection,
    records: Sequence[SyncRecord],
    params: list[dict[str, Any]],
    taken: set[str] | None = None,
) -> list[str]:
    """
    Inside a write transaction: insert the records whose id is not taken
    (*taken*, when the transaction has looked them up already), count them
    in their slot buckets; the taken ids, in order.
    """
    found = _taken_ids(conn, [r.id for r in records]) if taken is None else taken
    new = [r for r in records if r.id not in found] if found else records
    conn.executemany(_INSERT_SYNC, [p for p in params if p["id"] not in found])
    counts = Counter(slot for slot in map(slot_bucket_of, new) if slot is not None)
    conn.executemany(_COUNT_SLOTS, [(*slot, n) for slot, n in sorted(counts.items())])
    return [r.id for r in records if r.id in found]


def _taken_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    """The *ids* the store holds (looked up in groups the SQL parameter limit allows)."""
    found: set[str] = set()
    for start in range(0, len(ids), _IDS_PER_LOOKUP):
        group = list(ids[start : start + _IDS_PER_LOOKUP])
        marks = ", ".join("?" * len(group))
        lookup = f"SELECT id FROM syncs WHERE id IN ({marks})"  # noqa: S608 - placeholders
        found.update(row[0] for row in conn.execute(lookup, group))
    return found
