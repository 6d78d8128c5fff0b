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
import logging
import os
import secrets
import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone
from itertools import islice
from operator import itemgetter
from types import TracebackType
from typing import Any

import attrs
from typing_extensions import Self

from cohortsync import _schedule
from cohortsync._clock import add_saturating, require_aware
from cohortsync._converter import dumps, load_sync, loads
from cohortsync._destination import Identifier, IdentifierKind
from cohortsync._sync import Sync, SyncRun, SyncStatus, Trigger
from cohortsync.exceptions import (
    ConfigurationError,
    ConflictError,
    CorruptStoreError,
    DuplicateRunError,
    LeaseLostError,
    SchemaVersionError,
    StorageError,
    SyncNotFoundError,
)
from cohortsync.storage._protocol import (
    AppliedBatch,
    Completion,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    PendingBatch,
    Progress,
    SyncRecord,
    Tally,
)
from cohortsync.storage._rows import decode_pending, encode_members
from cohortsync.storage._rules import collect_holders, slot_bucket_of

__all__ = ["SQLiteStorage"]

log = logging.getLogger("cohortsync.storage")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)
_APPLICATION = "cohortsync"
_FETCH = 10_000
"""Rows per ``fetchmany`` when streaming, and keys per lookup query."""

# Each migration is a list of statements run in one transaction; the schema
# version is the number of migrations applied. Never edit a released step:
# append a new one.
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
]

_SYNC_COLUMNS = (
    "id, definition, next_due, next_trigger, slot_offset, slot_bucket, anchor, attempts, "
    "full_resync, feed_cursor, last_full_sync_at, "
    "lease_owner, lease_token, lease_expires, lease_slot, lease_generation, lease_trigger, "
    "status, generation, last_slot, scheduled_from, revision, lease_revision"
)
_SELECT_SYNC = f"SELECT {_SYNC_COLUMNS} FROM syncs"  # noqa: S608 - constant column list

_INSERT_SYNC = """
    INSERT INTO syncs (
        definition, generation, status, next_due, next_trigger, slot_offset, slot_bucket,
        anchor, attempts, full_resync, feed_cursor, last_full_sync_at, scheduled_from,
        slot_period, id
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_UPDATE_SYNC = """
    UPDATE syncs SET
        definition = ?, generation = ?, status = ?, next_due = ?, next_trigger = ?,
        slot_offset = ?, slot_bucket = ?, anchor = ?, attempts = ?, full_resync = ?,
        feed_cursor = ?, last_full_sync_at = ?, scheduled_from = ?, slot_period = ?,
        revision = revision + 1
    WHERE id = ?
"""
_COUNT_SLOT = """
    INSERT INTO slots (period, bucket, count) VALUES (?, ?, 1)
    ON CONFLICT (period, bucket) DO UPDATE SET count = count + 1
"""
_UNCOUNT_SLOT = "UPDATE slots SET count = count - 1 WHERE period = ? AND bucket = ? AND count > 0"
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
_UNSCHEDULE = """
    UPDATE syncs SET
        next_due = NULL,
        lease_owner = NULL, lease_token = NULL, lease_expires = NULL,
        lease_slot = NULL, lease_generation = NULL, lease_trigger = NULL, lease_revision = NULL
    WHERE id = ?
"""
_RELEASE = """
    UPDATE syncs SET
        lease_owner = NULL, lease_token = NULL, lease_expires = NULL,
        lease_slot = NULL, lease_generation = NULL, lease_trigger = NULL, lease_revision = NULL
    WHERE id = ? AND lease_token = ?
"""
# SET expressions all see the row as it was before the update, so the
# conditions below are evaluated against the stored generation and next_due.
_COMPLETE = """
    UPDATE syncs SET
        lease_owner = NULL, lease_token = NULL, lease_expires = NULL,
        lease_slot = NULL, lease_generation = NULL, lease_trigger = NULL, lease_revision = NULL,
        next_due = CASE WHEN generation = :generation
            AND revision = :revision AND next_due = :slot
            THEN :next_due ELSE next_due END,
        next_trigger = CASE WHEN generation = :generation
            AND revision = :revision AND next_due = :slot
            THEN :next_trigger ELSE next_trigger END,
        attempts = CASE WHEN generation = :generation
            AND revision = :revision AND next_due = :slot
            THEN :attempts ELSE attempts END,
        scheduled_from = CASE WHEN generation = :generation
            AND revision = :revision AND next_due = :slot
            THEN :scheduled_from ELSE scheduled_from END,
        last_slot = CASE WHEN last_slot IS NULL OR last_slot < :slot
            THEN :slot ELSE last_slot END,
        definition = CASE WHEN generation = :generation AND revision = :revision
            AND :definition IS NOT NULL THEN :definition ELSE definition END,
        status = CASE WHEN generation = :generation AND revision = :revision
            AND :definition IS NOT NULL THEN :status ELSE status END,
        generation = CASE WHEN generation = :generation AND revision = :revision
            AND :definition IS NOT NULL THEN :new_generation ELSE generation END,
        feed_cursor = coalesce(:feed_cursor, feed_cursor),
        full_resync = CASE WHEN :full_sync_done AND generation = :generation
            AND revision = :revision AND next_due = :slot THEN 0 ELSE full_resync END,
        last_full_sync_at = CASE WHEN :full_sync_done THEN :started_at ELSE last_full_sync_at END
    WHERE id = :id AND lease_token = :token
"""
_INSERT_RUN = """
    INSERT INTO runs (
        id, sync_id, generation, trigger, status, slot, started_at, finished_at, data
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_UPSERT_DELIVERED = """
    INSERT INTO delivered (sync_id, key, id_kind, id_value) VALUES (?, ?, ?, ?)
    ON CONFLICT (sync_id, key) DO UPDATE SET
        id_kind = excluded.id_kind, id_value = excluded.id_value
"""
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
_HOLDERS = """
    SELECT d.key, d.id_kind, d.id_value FROM delivered AS d
    WHERE d.sync_id = ? AND d.id_value IS NOT NULL
        AND d.id_value IN (SELECT value FROM json_each(?))
"""
_IDENTITY_HOLDERS = """
    SELECT d.key FROM delivered AS d
    WHERE d.sync_id = ? AND d.id_kind IS NULL AND d.key IN (SELECT value FROM json_each(?))
"""
_PROGRESS = """
    INSERT INTO progress (sync_id, slot, added, removed, rejected, batches, collisions)
    VALUES (:sync_id, :slot, :added, :removed, :rejected, :batches, :collisions)
    ON CONFLICT (sync_id) DO UPDATE SET
        added = added + excluded.added,
        removed = removed + excluded.removed,
        rejected = rejected + excluded.rejected,
        batches = batches + excluded.batches,
        collisions = collisions + excluded.collisions,
        slot = excluded.slot
"""


def _us(value: datetime) -> int:
    return (require_aware(value) - _EPOCH) // _ONE_US


def _opt_us(value: datetime | None) -> int | None:
    return None if value is None else _us(value)


def _dt(value: int) -> datetime:
    try:
        return _EPOCH + timedelta(microseconds=value)
    except (OverflowError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"stored time {value!r} is not a usable timestamp") from exc


def _lease(row: tuple[Any, ...], owner: str, expires_at: datetime) -> Lease:
    sync_id, generation, due, trigger, token, revision = row
    # Any integer is an instant (before 1970 is negative); generations start at 1.
    damaged = [
        f"{name} {value!r}"
        for name, value, least in (("generation", generation, 1), ("next_due", due, None))
        if isinstance(value, bool)
        or not isinstance(value, int)
        or (least is not None and value < least)
    ]
    if damaged:
        raise CorruptStoreError(
            f"sync {sync_id!r} has a damaged schedule row: {', '.join(damaged)}"
        )
    try:
        return Lease(
            sync_id=sync_id,
            generation=generation,
            slot=_dt(due),
            trigger=Trigger(trigger),
            owner=owner,
            token=token,
            expires_at=expires_at,
            revision=revision,
        )
    except (CorruptStoreError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"sync {sync_id!r} has a damaged schedule row: {exc}") from exc


def _opt_dt(value: int | None) -> datetime | None:
    return None if value is None else _dt(value)


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


def _close_connections(connections: list[sqlite3.Connection]) -> None:
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

    __slots__ = ("__weakref__", "all", "ident", "main", "reader")

    def __init__(self, main: sqlite3.Connection) -> None:
        self.main = main
        self.reader: sqlite3.Connection | None = None
        self.all = [main]
        self.ident = threading.get_ident()


class SQLiteStorage:
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
        self._finalizers: list[weakref.finalize[Any, Any]] = []
        self._closed = False
        self._pid = os.getpid()
        try:
            self._prepare(self._threaded().main)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteStorage({self._path!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> str:
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
            raise StorageError(f"{self!r} is closed")

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
        finalizer = weakref.finalize(mine, _close_connections, mine.all)
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
        conn = self._threaded().main
        try:
            yield conn
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """
        One write transaction holding SQLite's write lock from its first statement,
        so reads inside it cannot be invalidated by another writer.
        """
        conn = self._threaded().main
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
        Check the file is ours (or empty), switch it to WAL and migrate it.

        Nothing is written to a file that is not ours: the checks come first.
        """
        supported = len(_MIGRATIONS)
        try:
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
                _migrate(conn, version, supported)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _schema_version(self, conn: sqlite3.Connection, supported: int) -> int:
        """
        The file's schema version: 0 for an empty database.

        Raises:
            CorruptStoreError: The file belongs to another application.
            SchemaVersionError: The version is newer than *supported*.
        """
        tables = sorted(
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        )
        if not tables:
            return 0
        foreign = CorruptStoreError(
            f"{self._path!r} is an SQLite database of another application "
            f"(tables: {', '.join(tables[:10])}); cohortsync only opens empty files "
            "and its own databases, to never modify someone else's data"
        )
        if "meta" not in tables:
            raise foreign
        try:
            meta = dict(
                conn.execute(
                    "SELECT key, value FROM meta WHERE key IN ('application', 'schema_version')"
                ).fetchall()
            )
        except sqlite3.OperationalError:
            raise foreign from None
        if meta.get("application") != _APPLICATION:
            raise foreign
        try:
            version = int(meta["schema_version"])
        except (KeyError, ValueError):
            raise CorruptStoreError(
                f"{self._path!r}: schema_version is missing or invalid "
                f"({meta.get('schema_version')!r})"
            ) from None
        if version > supported:
            raise SchemaVersionError(version, supported)
        return version

    # -- sync definitions ------------------------------------------------------------

    @staticmethod
    def _sync_values(record: SyncRecord) -> tuple[object, ...]:
        sync = record.sync
        return (
            dumps(sync),
            sync.generation,
            sync.status.value,
            _opt_us(record.next_due),
            record.next_trigger.value,
            record.offset,
            record.slot_bucket,
            _us(record.anchor),
            record.attempts,
            int(record.full_resync),
            record.feed_cursor,
            _opt_us(record.last_full_sync_at),
            _opt_us(record.scheduled_from),
            None if (slot := slot_bucket_of(record)) is None else slot[0],
            sync.id,
        )

    @staticmethod
    def _record(row: tuple[Any, ...]) -> SyncRecord:
        sync_id = row[0]
        try:
            sync: Sync = load_sync(row[1])
            lease = None
            if row[12] is not None:
                lease = Lease(
                    sync_id=sync_id,
                    generation=row[15],
                    slot=_dt(row[14]),
                    trigger=Trigger(row[16]),
                    owner=row[11],
                    token=row[12],
                    expires_at=_dt(row[13]),
                    revision=row[22] or 0,
                )
            record = SyncRecord(
                sync=sync,
                next_due=_opt_dt(row[2]),
                next_trigger=Trigger(row[3]),
                offset=row[4],
                slot_bucket=row[5],
                anchor=_dt(row[6]),
                attempts=row[7],
                full_resync=bool(row[8]),
                feed_cursor=row[9],
                last_full_sync_at=_opt_dt(row[10]),
                lease=lease,
                last_slot=_opt_dt(row[19]),
                scheduled_from=_opt_dt(row[20]),
                revision=row[21],
            )
        except Exception as exc:
            raise CorruptStoreError(
                f"the stored row of sync {sync_id!r} cannot be read "
                f"({type(exc).__name__}: {exc}); fix or delete it"
            ) from exc
        if record.id != sync_id:
            raise CorruptStoreError(
                f"the stored row of sync {sync_id!r} holds the definition of {record.id!r}"
            )
        # The indexed columns claims read must agree with the definition, or a
        # sync would show as due and never run (or run off a stale schedule).
        if (row[17], row[18]) != (sync.status.value, sync.generation):
            raise CorruptStoreError(
                f"sync {sync_id!r}: status/generation columns {row[17]!r}/{row[18]!r} disagree "
                f"with its definition ({sync.status.value!r}/{sync.generation})"
            )
        period = _schedule.period_seconds(sync.policy.cadence)
        if period is not None and not 0 <= record.offset < period:
            raise CorruptStoreError(
                f"sync {sync_id!r}: slot offset {record.offset} is outside its "
                f"{period}-second period"
            )
        return record

    def create_sync(self, record: SyncRecord) -> None:
        values = self._sync_values(record)
        slot = slot_bucket_of(record)
        with self._write() as conn:
            try:
                conn.execute(_INSERT_SYNC, values)
            except sqlite3.IntegrityError:
                raise ConfigurationError(
                    "id", record.id, "a sync with this id already exists"
                ) from None
            if slot is not None:
                conn.execute(_COUNT_SLOT, slot)

    def get_sync(self, sync_id: str) -> SyncRecord:
        with self._read() as conn:
            row = conn.execute(f"{_SELECT_SYNC} WHERE id = ?", (sync_id,)).fetchone()
        if row is None:
            raise SyncNotFoundError(sync_id)
        return self._record(row)

    def list_syncs(self) -> list[SyncRecord]:
        with self._read() as conn:
            rows = conn.execute(f"{_SELECT_SYNC} ORDER BY id").fetchall()
        return [self._record(row) for row in rows]

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        values = self._sync_values(record)
        slot = slot_bucket_of(record)
        with self._write() as conn:
            row = conn.execute(
                "SELECT generation, slot_period, slot_bucket FROM syncs WHERE id = ?", (record.id,)
            ).fetchone()
            if row is None:
                raise SyncNotFoundError(record.id)
            if row[0] != expected_generation:
                raise ConflictError(record.id, expected_generation, row[0])
            conn.execute(_UPDATE_SYNC, values)
            old = None if row[1] is None or row[2] is None else (row[1], row[2])
            if old != slot:
                if old is not None:
                    conn.execute(_UNCOUNT_SLOT, old)
                if slot is not None:
                    conn.execute(_COUNT_SLOT, slot)

    def delete_sync(self, sync_id: str) -> None:
        with self._write() as conn:
            row = conn.execute(
                "DELETE FROM syncs WHERE id = ? RETURNING slot_period, slot_bucket", (sync_id,)
            ).fetchone()
            if row is not None and row[0] is not None and row[1] is not None:
                conn.execute(_UNCOUNT_SLOT, row)
            conn.execute("DELETE FROM delivered WHERE sync_id = ?", (sync_id,))
            conn.execute("DELETE FROM ledger WHERE sync_id = ?", (sync_id,))
            conn.execute("DELETE FROM pending WHERE sync_id = ?", (sync_id,))
            conn.execute("DELETE FROM progress WHERE sync_id = ?", (sync_id,))

    def next_due(self) -> datetime | None:
        """
        Walk active syncs in due order (an index scan); a leased one counts
        from its lease expiry. Leased syncs are the few runs in flight, so
        the walk stops after a handful of rows.
        """
        best: int | None = None
        with self._read() as conn:
            cursor = conn.execute(
                "SELECT next_due, lease_expires FROM syncs "
                "WHERE status = ? AND next_due IS NOT NULL ORDER BY next_due, id",
                (SyncStatus.ACTIVE.value,),
            )
            try:
                while rows := cursor.fetchmany(64):
                    for due, expires in rows:
                        if best is not None and due >= best:
                            return _dt(best)
                        at = due if expires is None else max(due, expires + 1)
                        best = at if best is None else min(best, at)
            finally:
                cursor.close()
        return None if best is None else _dt(best)

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        with self._read() as conn:
            rows = conn.execute(
                f"{_SELECT_SYNC} WHERE status = ? AND scheduled_from > ? AND lease_token IS NULL",
                (SyncStatus.ACTIVE.value, _us(require_aware(now, "now"))),
            ).fetchall()
        return [self._record(row) for row in rows]

    # -- slot allocation -----------------------------------------------------------

    def least_loaded_slot(self, period: int, buckets: int, preferred: int) -> int:
        if buckets < 1:
            raise ConfigurationError("buckets", buckets, "must be >= 1")
        preferred %= buckets
        with self._write() as conn:
            row = conn.execute(
                "SELECT buckets FROM slot_periods WHERE period = ?", (period,)
            ).fetchone()
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

    # -- claims and leases ----------------------------------------------------------

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        """
        Lease up to *limit* due syncs with one ``UPDATE ... RETURNING`` inside
        ``BEGIN IMMEDIATE``: choosing the rows and leasing them is one statement
        under the write lock, so two workers can never pick the same sync.
        """
        now = require_aware(now, "now")
        if limit < 1:
            return []
        expires_at = add_saturating(now, lease_for)
        params = {
            "owner": owner,
            # The token's first half comes from the OS's CSPRNG in this process,
            # so forked workers (which share SQLite's PRNG state) never collide.
            "prefix": secrets.token_hex(8),
            "expires": _us(expires_at),
            "active": SyncStatus.ACTIVE.value,
            "now": _us(now),
            "limit": limit,
        }
        with self._write() as conn:
            rows = conn.execute(_CLAIM, params).fetchall()
            # Decode inside the transaction. A damaged row is taken off the
            # schedule (lease cleared, next_due NULL) and reported, instead of
            # being leased to nobody or blocking every healthy sync behind it.
            leases = []
            for row in rows:
                try:
                    leases.append(_lease(row, owner, expires_at))
                except CorruptStoreError as exc:  # noqa: PERF203 - rare, and must not stop the rest
                    log.error("unscheduling sync %r: %s", row[0], exc)  # noqa: TRY400 - typed, no trace needed
                    conn.execute(_UNSCHEDULE, (row[0],))
        leases.sort(key=lambda lease: (lease.slot, lease.sync_id))
        return leases

    @staticmethod
    def _check_lease(conn: sqlite3.Connection, lease: Lease) -> None:
        held = conn.execute(
            "SELECT 1 FROM syncs WHERE id = ? AND lease_token = ?", (lease.sync_id, lease.token)
        ).fetchone()
        if held is None:
            raise LeaseLostError(lease.sync_id, lease.owner, lease.token)

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        expires_at = add_saturating(require_aware(now, "now"), lease_for)
        extended = attrs.evolve(lease, expires_at=expires_at)
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE syncs SET lease_expires = ? WHERE id = ? AND lease_token = ?",
                (_us(extended.expires_at), lease.sync_id, lease.token),
            )
            if cursor.rowcount != 1:
                raise LeaseLostError(lease.sync_id, lease.owner, lease.token)
        return extended

    def release_lease(self, lease: Lease) -> None:
        with self._write() as conn:
            if conn.execute(_RELEASE, (lease.sync_id, lease.token)).rowcount != 1:
                raise LeaseLostError(lease.sync_id, lease.owner, lease.token)

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        """
        Release the lease, advance the schedule and insert the run in one
        transaction; the schedule fields change only when the stored generation
        and next_due are still those the lease saw (see ``_COMPLETE``).
        """
        run = completion.run
        definition = completion.sync
        params = {
            "id": lease.sync_id,
            "token": lease.token,
            "generation": lease.generation,
            "slot": _us(lease.slot),
            "next_due": _opt_us(completion.next_due),
            "next_trigger": completion.next_trigger.value,
            "attempts": completion.attempts,
            "definition": None if definition is None else dumps(definition),
            "status": None if definition is None else definition.status.value,
            "new_generation": None if definition is None else definition.generation,
            "feed_cursor": completion.feed_cursor,
            "full_sync_done": int(completion.full_sync_done),
            "started_at": _us(run.started_at),
            "scheduled_from": _opt_us(completion.scheduled_from),
            "revision": lease.revision,
        }
        run_values = self._run_values(run)
        with self._write() as conn:
            # Conditional update first: if the lease is gone, nothing else happens.
            if conn.execute(_COMPLETE, params).rowcount != 1:
                raise LeaseLostError(lease.sync_id, lease.owner, lease.token)
            try:
                conn.execute(_INSERT_RUN, run_values)
            except sqlite3.IntegrityError:
                # Rolls back the update above too: nothing is written.
                raise DuplicateRunError(run.sync_id, run.slot) from None
            if completion.resolved:
                conn.executemany(
                    "DELETE FROM pending WHERE sync_id = ? AND idempotency_key = ?",
                    ((lease.sync_id, key) for key in completion.resolved),
                )
            conn.execute("DELETE FROM progress WHERE sync_id = ?", (lease.sync_id,))

    def begin_batch(
        self, lease: Lease, batch: PendingBatch, *, replaces: str | None = None
    ) -> None:
        members = encode_members(batch.members)
        with self._write() as conn:
            self._check_lease(conn, lease)
            if replaces is not None:
                conn.execute(
                    "DELETE FROM pending WHERE sync_id = ? AND idempotency_key = ?",
                    (lease.sync_id, replaces),
                )
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
        return decode_pending(sync_id, rows)

    def progress(self, sync_id: str) -> Progress | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT slot, added, removed, rejected, batches, collisions FROM progress "
                "WHERE sync_id = ?",
                (sync_id,),
            ).fetchone()
        if row is None:
            return None
        slot, added, removed, rejected, batches, collisions = row
        try:
            return Progress(
                slot=_dt(slot),
                tally=Tally(
                    added=added,
                    removed=removed,
                    rejected=rejected,
                    batches=batches,
                    collisions=collisions,
                ),
            )
        except (TypeError, ValueError) as exc:
            raise CorruptStoreError(f"the progress row of sync {sync_id!r}: {exc}") from exc

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
        try:
            cursor = reader.execute(
                "SELECT key FROM delivered WHERE sync_id = ? ORDER BY key", (sync_id,)
            )
            try:
                while rows := cursor.fetchmany(_FETCH):
                    yield from map(itemgetter(0), rows)
            finally:
                with suppress(sqlite3.Error):
                    cursor.close()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        finally:
            if mine.reader is None and not self._closed and threading.get_ident() == mine.ident:
                mine.reader = reader
            else:
                with suppress(ValueError):
                    mine.all.remove(reader)
                with suppress(sqlite3.Error):
                    reader.close()

    def count_delivered(self, sync_id: str) -> int:
        with self._read() as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM delivered WHERE sync_id = ?", (sync_id,)
            ).fetchone()
        return int(count)

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
                    out[key] = self._identifier(sync_id, key, kind, value)
        # Answer in the order asked, like the reference store.
        return {k: out[k] for k in keys if k in out}

    def identifier_holders(
        self, sync_id: str, identifiers: Iterable[Identifier]
    ) -> dict[Identifier, list[str]]:
        wanted = set(identifiers)
        by_value = sorted({i.value for i in wanted})
        own = sorted({i.value for i in wanted if i.kind is IdentifierKind.USER_ID})
        with self._read() as conn:
            rows = [
                (key, self._identifier(sync_id, key, kind, value))
                for chunk in _chunks(by_value)
                for key, kind, value in conn.execute(_HOLDERS, (sync_id, json.dumps(chunk)))
            ]
            keys = [
                key
                for chunk in _chunks(own)
                for (key,) in conn.execute(_IDENTITY_HOLDERS, (sync_id, json.dumps(chunk)))
            ]
        return collect_holders(wanted, rows, keys)

    @staticmethod
    def _identifier(sync_id: str, key: str, kind: str | None, value: str | None) -> Identifier:
        if kind is None:
            return Identifier(IdentifierKind.USER_ID, key)
        try:
            return Identifier(IdentifierKind(kind), value or "")  # "" is refused: corrupt
        except (ValueError, TypeError) as exc:
            raise CorruptStoreError(
                f"the delivered identifier of member {key!r} of sync {sync_id!r} "
                f"cannot be read ({exc})"
            ) from exc

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        """
        Check the lease and apply the whole batch in one write transaction, with
        ``executemany`` so a 10,000-member batch costs one statement preparation.
        """
        sync_id = lease.sync_id
        added: list[tuple[str, str, str | None, str | None]] = []
        for m in batch.added:
            ident = m.identifier
            if ident.kind is IdentifierKind.USER_ID and ident.value == m.key:
                # The identity mapping is the common case: store it as NULLs.
                added.append((sync_id, m.key, None, None))
            else:
                added.append((sync_id, m.key, ident.kind.value, ident.value))
        at = _us(batch.at)
        with self._write() as conn:
            self._check_lease(conn, lease)
            if added:
                conn.executemany(_UPSERT_DELIVERED, added)
            if batch.removed:
                conn.executemany(
                    "DELETE FROM delivered WHERE sync_id = ? AND key = ?",
                    ((sync_id, key) for key in batch.removed),
                )
            has_ledger = conn.execute(
                "SELECT 1 FROM ledger WHERE sync_id = ? LIMIT 1", (sync_id,)
            ).fetchone()
            if has_ledger and (added or batch.removed):
                touched = [*(row[1] for row in added), *batch.removed]
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
                        (batch.run_id, key, IssueKind.REJECTED, reason)
                        for key, reason in batch.rejected
                    ),
                )
            conn.execute(
                "INSERT INTO batches (run_id, sequence, operation, idempotency_key, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (batch.run_id, batch.sequence, batch.operation.value, batch.idempotency_key, at),
            )
            conn.execute(
                "DELETE FROM pending WHERE sync_id = ? AND idempotency_key = ?",
                (sync_id, batch.idempotency_key),
            )
            if batch.slot is not None and batch.tally:
                tally = batch.tally
                conn.execute(
                    _PROGRESS,
                    {
                        "sync_id": sync_id,
                        "slot": _us(batch.slot),
                        "added": tally.added,
                        "removed": tally.removed,
                        "rejected": tally.rejected,
                        "batches": tally.batches,
                        "collisions": tally.collisions,
                    },
                )
            version = secrets.token_hex(8)
            conn.execute("UPDATE syncs SET delivered_version = ? WHERE id = ?", (version, sync_id))
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
                ((i.run_id, i.key, i.kind, i.reason) for i in issues),
            )

    # -- ledger and history ------------------------------------------------------------

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT key, reason, attempts, dead, first_seen, last_seen FROM ledger "
                "WHERE sync_id = ? ORDER BY key",
                (sync_id,),
            ).fetchall()
        return [
            LedgerEntry(
                sync_id=sync_id,
                key=key,
                reason=reason,
                attempts=attempts,
                dead=bool(dead),
                first_seen=_dt(first_seen),
                last_seen=_dt(last_seen),
            )
            for key, reason, attempts, dead, first_seen, last_seen in rows
        ]

    def dead_letters(self, sync_id: str) -> set[str]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT key FROM ledger WHERE sync_id = ? AND dead", (sync_id,)
            ).fetchall()
        return {key for (key,) in rows}

    @staticmethod
    def _run_values(run: SyncRun) -> tuple[object, ...]:
        return (
            run.id,
            run.sync_id,
            run.generation,
            run.trigger.value,
            run.status.value,
            _us(run.slot),
            _us(run.started_at),
            _us(run.finished_at),
            dumps(run),
        )

    @staticmethod
    def _run(run_id: str, data: str) -> SyncRun:
        try:
            return loads(data, SyncRun)
        except Exception as exc:
            raise CorruptStoreError(
                f"the stored run {run_id!r} cannot be read ({type(exc).__name__}: {exc})"
            ) from exc

    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, data FROM runs WHERE sync_id = ? "
                "ORDER BY started_at DESC, slot DESC LIMIT ?",
                (sync_id, -1 if limit is None else max(limit, 0)),
            ).fetchall()
        return [self._run(run_id, data) for run_id, data in rows]

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
        cut = (_us(require_aware(before, "before")),)
        old_runs = "SELECT id FROM runs WHERE finished_at < ?"
        with self._write() as conn:
            conn.execute(f"DELETE FROM issues WHERE run_id IN ({old_runs})", cut)  # noqa: S608 - constant
            conn.execute(f"DELETE FROM batches WHERE run_id IN ({old_runs})", cut)  # noqa: S608 - constant
            # Batches of runs that never completed (a crashed worker) have no
            # run to go with: they age out on their own time.
            conn.execute("DELETE FROM batches WHERE at < ?", cut)
            deleted: int = conn.execute("DELETE FROM runs WHERE finished_at < ?", cut).rowcount
        return deleted


def _migrate(conn: sqlite3.Connection, found: int, target: int) -> None:
    """
    Apply migrations ``found + 1 .. target`` on *conn*, inside the caller's transaction.

    ``executescript`` is avoided on purpose: it commits first, which would let a
    failed step leave a half-migrated file.
    """
    for step in _MIGRATIONS[found:target]:
        for statement in step:
            conn.execute(statement)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [("application", _APPLICATION), ("schema_version", str(target))],
    )
