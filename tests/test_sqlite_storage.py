"""
SQLiteStorage beyond the contract suite: schema versions, damaged and foreign
files, hostile input, connections, and several processes on one file.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest

from cohortsync._converter import dumps
from cohortsync._destination import Identifier, IdentifierKind, Member, Operation
from cohortsync._policy import Cadence, SyncPolicy
from cohortsync._sync import RunStatus, Sync, SyncRun
from cohortsync.exceptions import (
    ConfigurationError,
    CorruptStoreError,
    DuplicateRunError,
    LeaseLostError,
    SchemaVersionError,
    StorageClosedError,
    StorageError,
)
from cohortsync.storage import IssueKind, MemoryStorage, SQLiteStorage
from cohortsync.storage import _sqlite as sqlite_module
from cohortsync.storage._protocol import AppliedBatch, Completion, Lease, MemberIssue, SyncRecord

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
LEASE = timedelta(seconds=60)
HOUR = 3600


def record(sync_id: str = "s1", *, next_due: datetime | None = T0, offset: int = 0) -> SyncRecord:
    sync = Sync(
        id=sync_id,
        cohort_id="cohort",
        destination_id="destination",
        policy=SyncPolicy.hourly(),
        created_at=T0,
        updated_at=T0,
    )
    return SyncRecord(sync=sync, next_due=next_due, offset=offset, anchor=T0)


def run_for(lease: Lease, run_id: str | None = None, at: datetime | None = None) -> SyncRun:
    at = at or lease.slot
    return SyncRun(
        id=run_id or f"{lease.sync_id}@{lease.slot.isoformat()}",
        sync_id=lease.sync_id,
        generation=lease.generation,
        trigger=lease.trigger,
        slot=lease.slot,
        started_at=at,
        finished_at=at,
        status=RunStatus.SUCCEEDED,
        cadence=Cadence.HOURLY,
    )


def batch(
    *,
    added: tuple[str, ...] = (),
    removed: tuple[str, ...] = (),
    rejected: tuple[tuple[str, str], ...] = (),
    run_id: str = "run",
) -> AppliedBatch:
    return AppliedBatch(
        run_id=run_id,
        sequence=0,
        operation=Operation.ADD,
        idempotency_key="k",
        added=tuple(Member(k, Identifier(IdentifierKind.USER_ID, k)) for k in added),
        removed=removed,
        rejected=rejected,
        at=T0,
    )


def raw(path: Path) -> closing[sqlite3.Connection]:
    """
    A plain connection to look at or damage the file behind the store's back.
    """
    return closing(sqlite3.connect(path, isolation_level=None))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cohortsync.db"


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStorage]:
    with SQLiteStorage(path) as s:
        yield s


class TestFile:
    """
    A new store is a WAL-mode SQLite file that survives reopening.
    """

    def test_wal_mode_and_version(self, store: SQLiteStorage, path: Path) -> None:
        """
        The file is in WAL mode and records its application and schema version.
        """
        with raw(path) as conn:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())

        assert "wal" == mode
        assert {
            "application": "cohortsync",
            "schema_version": str(len(sqlite_module._MIGRATIONS)),
        } == meta

    def test_a_locked_file_is_opened_again(self, path: Path) -> None:
        """
        Opening a file SQLite answers "database is locked" at once (processes
        racing to switch a new file to WAL) is tried again, not given up:
        three processes opening one new file failed so once in CI.
        """

        class LockedTwice(SQLiteStorage):
            attempts = 0

            def _prepare_once(self, conn: sqlite3.Connection) -> None:
                type(self).attempts += 1
                if type(self).attempts <= 2:
                    raise locked()
                super()._prepare_once(conn)

        with LockedTwice(path) as store:
            store.create_sync(record())
        assert 3 == LockedTwice.attempts

    def test_a_file_locked_past_the_timeout_is_refused(self, path: Path) -> None:
        """The retries end at the busy timeout, with the error SQLite gave."""

        class AlwaysLocked(SQLiteStorage):
            def _prepare_once(self, conn: sqlite3.Connection) -> None:
                raise locked()

        started = time.perf_counter()
        with pytest.raises(StorageError, match="database is locked"):
            AlwaysLocked(path, busy_timeout=0.3)
        assert 0.2 <= time.perf_counter() - started < 2

    def test_another_error_on_opening_is_not_retried(self, path: Path) -> None:
        path.write_bytes(b"not a database, and long enough to be read as one" * 100)
        started = time.perf_counter()
        with pytest.raises(CorruptStoreError):
            SQLiteStorage(path)
        assert time.perf_counter() - started < 1

    @pytest.mark.reliability
    def test_processes_opening_a_new_file_at_once(self, tmp_path: Path) -> None:
        """Six processes open one new file at the same instant, ten times: all open it."""
        ctx = multiprocessing.get_context("spawn")
        for round_ in range(10):
            target = tmp_path / f"new-{round_}.db"
            barrier = ctx.Barrier(6)
            results = ctx.Queue()
            procs = [
                ctx.Process(target=open_at_once, args=(str(target), barrier, results))
                for _ in range(6)
            ]
            for p in procs:
                p.start()
            answers = [results.get(timeout=60) for _ in procs]
            for p in procs:
                p.join(timeout=30)
            results.close()
            results.join_thread()
            assert ["opened"] * 6 == answers, f"round {round_}"

    def test_connection_settings(self, store: SQLiteStorage) -> None:
        """
        Connections use synchronous=NORMAL and the configured busy timeout.
        """
        conn = store._threaded().main

        assert 1 == conn.execute("PRAGMA synchronous").fetchone()[0]
        assert 30_000 == conn.execute("PRAGMA busy_timeout").fetchone()[0]

    def test_reopen_keeps_data(self, path: Path) -> None:
        """
        Everything written is there after closing and reopening the file.
        """
        with SQLiteStorage(path) as first:
            first.create_sync(record())
            lease = first.claim_due(T0, "w", LEASE, 1)[0]
            first.apply_batch(lease, batch(added=("a", "b"), rejected=(("c", "no"),)))
            run = run_for(lease)
            first.complete_run(lease, Completion(run=run, next_due=T0 + timedelta(hours=1)))
            first.create_sync(attrs.evolve(record("s2"), slot_bucket=7))
            saved = first.get_sync("s1")

        with SQLiteStorage(path) as second:
            assert saved == second.get_sync("s1")
            assert ["a", "b"] == list(second.iter_delivered("s1"))
            assert [run] == second.history("s1")
            assert ["c"] == [e.key for e in second.ledger("s1")]
            assert 1 == len(second.run_issues("run"))
            # The slot counts come back with the syncs: bucket 7 is taken.
            assert 8 == second.least_loaded_slot(3600, 60, 7)

    def test_repr_shows_path(self, store: SQLiteStorage, path: Path) -> None:
        """
        The repr names the file, so logs say which store is meant.
        """
        assert f"SQLiteStorage({str(path)!r})" == repr(store)
        assert str(path) == store.path

    def test_empty_existing_file_is_initialised(self, path: Path) -> None:
        """
        A zero-byte file (e.g. from mkstemp) is an empty database and gets the schema.
        """
        path.write_bytes(b"")

        with SQLiteStorage(path) as s:
            s.create_sync(record())

            assert ["s1"] == [r.id for r in s.list_syncs()]

    @pytest.mark.parametrize("bad", ["", ":memory:", "file::memory:?cache=shared"])
    def test_memory_paths_refused(self, bad: str) -> None:
        """
        In-memory databases are refused: each connection would see a different one.
        """
        with pytest.raises(ConfigurationError, match="MemoryStorage"):
            SQLiteStorage(bad)

    def test_negative_busy_timeout_refused(self, path: Path) -> None:
        """
        A negative busy timeout is a configuration error.
        """
        with pytest.raises(ConfigurationError, match="busy_timeout"):
            SQLiteStorage(path, busy_timeout=-1)

    def test_unopenable_path(self, tmp_path: Path) -> None:
        """
        A path in a missing directory raises StorageError naming it.
        """
        with pytest.raises(StorageError, match="no-such-dir"):
            SQLiteStorage(tmp_path / "no-such-dir" / "x.db")

    def test_concurrent_first_open(self, path: Path) -> None:
        """
        Threads creating the same new file at once all open it; the schema is made once.
        """
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []

        def open_it() -> None:
            try:
                barrier.wait()
                with SQLiteStorage(path) as s:
                    s.list_syncs()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert [] == errors


class TestSchemaVersions:
    """
    Schema versions are checked on open and migrated forward in one transaction.
    """

    def test_newer_version_refused(self, path: Path) -> None:
        """
        A file written by a newer cohortsync raises SchemaVersionError and is left alone.
        """
        SQLiteStorage(path).close()
        with raw(path) as conn:
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")

        with pytest.raises(SchemaVersionError) as caught:
            SQLiteStorage(path)

        assert (99, len(sqlite_module._MIGRATIONS)) == (caught.value.found, caught.value.supported)
        with raw(path) as conn:
            assert (
                "99"
                == conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
            )

    def test_migrates_older_version(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """
        A file at the previous version is migrated to the current one, keeping its data.
        """
        with SQLiteStorage(path) as old:
            old.create_sync(record())
        current = len(sqlite_module._MIGRATIONS)
        monkeypatch.setattr(
            sqlite_module,
            "_MIGRATIONS",
            [
                *sqlite_module._MIGRATIONS,
                (
                    "ALTER TABLE syncs ADD COLUMN note TEXT",
                    "CREATE INDEX syncs_note ON syncs (note)",
                ),
            ],
        )

        with SQLiteStorage(path) as new:
            assert record() == new.get_sync("s1")

        with raw(path) as conn:
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            columns = [row[1] for row in conn.execute("PRAGMA table_info(syncs)")]
        assert (str(current + 1),) == version
        assert "note" in columns

    def test_version_1_files_gain_delivered_versions(
        self, path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        A file written by schema 1 opens under the current schema with its
        data and a delivered-version token that then changes with each batch.
        """
        # The row as schema 1 stored it: the current row, cut to its columns.
        current = path.with_name("current.db")
        with SQLiteStorage(current) as store:
            store.create_sync(record())
        monkeypatch.setattr(sqlite_module, "_MIGRATIONS", sqlite_module._MIGRATIONS[:1])
        SQLiteStorage(path).close()
        monkeypatch.undo()
        with raw(path) as conn:
            columns = [row[1] for row in conn.execute("PRAGMA table_info(syncs)")]
        with raw(current) as conn:
            values = conn.execute(f"SELECT {', '.join(columns)} FROM syncs").fetchone()  # noqa: S608
        with raw(path) as conn:
            marks = ", ".join("?" * len(columns))
            conn.execute(f"INSERT INTO syncs ({', '.join(columns)}) VALUES ({marks})", values)  # noqa: S608

        with SQLiteStorage(path) as new:
            assert record() == new.get_sync("s1")
            assert "" == new.delivered_version("s1")

        with raw(path) as conn:
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert (str(len(sqlite_module._MIGRATIONS)),) == version

    def test_failed_migration_changes_nothing(
        self, path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        A migration step that fails rolls back entirely: no half-migrated file.
        """
        SQLiteStorage(path).close()
        current = len(sqlite_module._MIGRATIONS)
        monkeypatch.setattr(
            sqlite_module,
            "_MIGRATIONS",
            [
                *sqlite_module._MIGRATIONS,
                ("CREATE TABLE added_by_next (x)", "THIS IS NOT SQL"),
            ],
        )

        with pytest.raises(StorageError, match="syntax error"):
            SQLiteStorage(path)

        with raw(path) as conn:
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert (str(current),) == version
        assert "added_by_next" not in tables

    def test_version_zero_is_initialised(self, path: Path) -> None:
        """
        A file holding only cohortsync's meta table at version 0 gets the whole schema.
        """
        with raw(path) as conn:
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute(
                "INSERT INTO meta VALUES ('application', 'cohortsync'), ('schema_version', '0')"
            )

        with SQLiteStorage(path) as s:
            s.create_sync(record())

            assert 1 == len(s.list_syncs())

    def test_missing_version_is_corrupt(self, path: Path) -> None:
        """
        Our meta table without a usable schema_version is reported as corrupt.
        """
        SQLiteStorage(path).close()
        with raw(path) as conn:
            conn.execute("UPDATE meta SET value = 'one' WHERE key = 'schema_version'")

        with pytest.raises(CorruptStoreError, match="schema_version"):
            SQLiteStorage(path)


class TestForeignFiles:
    """
    Files that are not cohortsync stores are refused and never modified.
    """

    def test_not_sqlite(self, path: Path) -> None:
        """
        A file that is not SQLite raises CorruptStoreError and keeps its bytes.
        """
        content = b"these are not the bytes of an SQLite database\n" * 200
        path.write_bytes(content)

        with pytest.raises(CorruptStoreError, match="not an SQLite database"):
            SQLiteStorage(path)

        assert content == path.read_bytes()

    def test_other_applications_database(self, path: Path) -> None:
        """
        An SQLite file with someone else's tables is refused, untouched, naming them.
        """
        with raw(path) as conn:
            conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
            conn.execute("INSERT INTO users (name) VALUES ('ada')")
        before = path.read_bytes()

        with pytest.raises(CorruptStoreError, match=r"another application.*users"):
            SQLiteStorage(path)

        assert before == path.read_bytes()
        with raw(path) as conn:
            assert "delete" == conn.execute("PRAGMA journal_mode").fetchone()[0]
            assert [("users",)] == conn.execute("SELECT name FROM sqlite_master").fetchall()

    @pytest.mark.parametrize(
        "ddl",
        [
            "CREATE TABLE meta (name TEXT, data BLOB)",
            "CREATE TABLE meta (key TEXT, value TEXT)",
        ],
    )
    def test_someone_elses_meta_table(self, path: Path, ddl: str) -> None:
        """
        A table called meta is not enough to be taken for a cohortsync store.
        """
        with raw(path) as conn:
            conn.execute(ddl)

        with pytest.raises(CorruptStoreError, match="another application"):
            SQLiteStorage(path)


class TestDamagedRows:
    """
    Hand-edited rows raise CorruptStoreError naming what is damaged, on read.
    """

    @pytest.mark.parametrize(
        ("column", "value"),
        [
            ("definition", '{"id": "s1", broken'),
            ("definition", '{"id": "s1"}'),
            ("definition", dumps(record("other").sync)),
            ("next_trigger", "whenever"),
        ],
    )
    def test_damaged_sync_row(
        self, store: SQLiteStorage, path: Path, column: str, value: str
    ) -> None:
        """
        A damaged sync row names its sync; other syncs stay readable.
        """
        store.create_sync(record("s1"))
        store.create_sync(record("s2"))
        with raw(path) as conn:
            sql = {"definition": "UPDATE syncs SET definition = ? WHERE id = 's1'"}.get(
                column, "UPDATE syncs SET next_trigger = ? WHERE id = 's1'"
            )
            conn.execute(sql, (value,))

        with pytest.raises(CorruptStoreError, match="sync 's1'"):
            store.get_sync("s1")
        with pytest.raises(CorruptStoreError, match="sync 's1'"):
            store.list_syncs()
        assert "s2" == store.get_sync("s2").id

    def test_damaged_sync_row_can_be_overwritten(self, store: SQLiteStorage, path: Path) -> None:
        """
        save_sync repairs a damaged definition, since the generation is its own column.
        """
        store.create_sync(record())
        with raw(path) as conn:
            conn.execute("UPDATE syncs SET definition = 'garbage'")

        store.save_sync(record(), expected_generation=1)

        # Restored, with the revision a host write bumps.
        assert attrs.evolve(record(), revision=1) == store.get_sync("s1")

    def test_damaged_identifier(self, store: SQLiteStorage, path: Path) -> None:
        """
        A delivered identifier of an unknown kind names the member and the sync.
        """
        store.create_sync(record())
        lease = store.claim_due(T0, "w", LEASE, 1)[0]
        store.apply_batch(lease, batch(added=("m1",)))
        with raw(path) as conn:
            conn.execute("UPDATE delivered SET id_kind = 'fax', id_value = '123'")

        with pytest.raises(CorruptStoreError, match="member 'm1' of sync 's1'"):
            store.delivered_identifiers("s1", ["m1"])

    def test_damaged_run_row(self, store: SQLiteStorage, path: Path) -> None:
        """
        A damaged run names the run.
        """
        store.create_sync(record())
        lease = store.claim_due(T0, "w", LEASE, 1)[0]
        store.complete_run(lease, Completion(run=run_for(lease, "run-7"), next_due=None))
        with raw(path) as conn:
            conn.execute('UPDATE runs SET data = \'{"status": "exploded"}\'')

        with pytest.raises(CorruptStoreError, match="run 'run-7'"):
            store.history("s1")


class TestHistoryLimit:
    """
    history()'s limit slices like the reference store's list.
    """

    @pytest.mark.parametrize("limit", [None, 0, 1, 2, -1, -2])
    def test_like_the_reference(self, store: SQLiteStorage, limit: int | None) -> None:
        """A negative limit leaves out the oldest runs (it used to return none)."""
        reference = MemoryStorage()
        for target in (store, reference):
            target.create_sync(record())
            for hour in range(3):
                (lease,) = target.claim_due(T0 + timedelta(hours=hour), "w", LEASE, 1)
                target.complete_run(
                    lease, Completion(run=run_for(lease), next_due=T0 + timedelta(hours=hour + 1))
                )

        assert reference.history("s1", limit) == store.history("s1", limit)


class TestHostileInput:
    """
    Every value travels as a parameter: SQL in ids and keys is just text.
    """

    def test_hostile_ids_and_keys(self, store: SQLiteStorage, path: Path) -> None:
        """
        Ids and keys full of SQL are stored and read back verbatim; no table is harmed.
        """
        evil = "x'; DROP TABLE syncs; --"
        keys = ("'); DELETE FROM delivered; --", '" OR 1=1 --', evil, "%_\\", "[]{}")
        store.create_sync(record(evil))
        store.create_sync(record("victim"))
        leases = {x.sync_id: x for x in store.claim_due(T0, evil, LEASE, 5)}
        lease = leases[evil]
        store.apply_batch(lease, batch(added=keys, rejected=((evil, evil),), run_id=evil))
        store.apply_batch(leases["victim"], batch(added=("safe",)))
        store.record_issues(
            lease, [MemberIssue(run_id=evil, key=evil, kind=IssueKind.SKIPPED, reason=evil)]
        )
        store.complete_run(lease, Completion(run=run_for(lease, evil), next_due=None))

        assert evil == store.get_sync(evil).id
        assert sorted(keys) == list(store.iter_delivered(evil))
        assert set(keys) == store.filter_delivered(evil, keys)
        assert set(keys) == set(store.delivered_identifiers(evil, keys))
        assert [evil] == [e.key for e in store.ledger(evil)]
        assert [evil] == [r.id for r in store.history(evil)]
        assert {evil} == {i.key for i in store.run_issues(evil)}
        assert ["safe"] == list(store.iter_delivered("victim"))

        store.delete_sync(evil)

        assert ["victim"] == [r.id for r in store.list_syncs()]
        assert ["safe"] == list(store.iter_delivered("victim"))
        with raw(path) as conn:
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        assert {"syncs", "delivered", "ledger", "runs", "batches", "issues", "meta"} <= tables


class TestIssueKinds:
    """
    Issue kinds are stored as the plain text they always were.
    """

    def test_stored_as_text_and_read_back_as_kinds(self, store: SQLiteStorage, path: Path) -> None:
        """
        Skipped and rejected members are rows of plain 'skipped'/'rejected' text,
        and run_issues gives back IssueKind members.
        """
        store.create_sync(record())
        (lease,) = store.claim_due(T0, "worker", LEASE, 1)
        store.apply_batch(lease, batch(rejected=(("m1", "refused"),)))
        store.record_issues(
            lease, [MemberIssue(run_id="run", key="m2", kind=IssueKind.SKIPPED, reason="no email")]
        )

        with raw(path) as conn:
            rows = conn.execute(
                "SELECT key, kind, typeof(kind) FROM issues ORDER BY key"
            ).fetchall()
        assert [("m1", "rejected", "text"), ("m2", "skipped", "text")] == rows
        assert [("m1", IssueKind.REJECTED), ("m2", IssueKind.SKIPPED)] == [
            (i.key, i.kind) for i in store.run_issues("run")
        ]
        assert [IssueKind, IssueKind] == [type(i.kind) for i in store.run_issues("run")]


class TestConnections:
    """
    Connections are per thread, streams have their own, and close() closes them all.
    """

    def test_close_waits_for_a_call_in_flight(self, path: Path) -> None:
        """
        close() from one thread waits for another thread's statement to end
        before it closes that thread's connection (closing it mid-statement
        crashed the process with SIGSEGV); that thread's next call is refused.
        """
        store = SQLiteStorage(path)
        inside, leave = threading.Event(), threading.Event()
        raised: list[BaseException] = []

        def write() -> None:
            with store._write() as conn:
                conn.execute("SELECT 1")
                inside.set()
                leave.wait()
                conn.execute("SELECT 1")  # still open: close() is waiting
            try:
                store.list_syncs()
            except StorageClosedError as exc:
                raised.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        inside.wait()
        closer = threading.Thread(target=store.close)
        closer.start()
        closer.join(timeout=0.3)
        assert closer.is_alive()  # waiting for the write in flight
        leave.set()
        closer.join(timeout=10)
        writer.join(timeout=10)
        assert not closer.is_alive()
        assert 1 == len(raised)

    @pytest.mark.reliability
    def test_closing_while_another_thread_creates_never_crashes(self, tmp_path: Path) -> None:
        """
        A web app's shutdown: one thread creates syncs while the main thread
        closes the scheduler, 150 times in a child process. The old code died
        with SIGSEGV (exit 139) within 50 rounds; each creator must get
        StorageClosedError instead.
        """
        script = tmp_path / "close_race.py"
        script.write_text(_CLOSE_RACE)
        done = subprocess.run(  # noqa: S603 - our own interpreter and script
            [sys.executable, str(script), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert 0 == done.returncode, done.stderr[-2000:]
        assert {"StorageClosedError"} == set(done.stdout.split())

    def test_close_closes_every_threads_connections(self, path: Path) -> None:
        """
        close() from one thread closes the connections other threads opened.
        """
        store = SQLiteStorage(path)
        store.create_sync(record())
        opened: list[sqlite3.Connection] = []
        release = threading.Event()
        ready = threading.Barrier(4)

        def use() -> None:
            keys = store.iter_delivered("s1")
            list(keys)
            mine = store._threaded()
            opened.extend(mine.all)
            ready.wait()
            release.wait()  # stay alive so the thread's connections stay open

        threads = [threading.Thread(target=use) for _ in range(3)]
        for t in threads:
            t.start()
        ready.wait()

        store.close()
        release.set()
        for t in threads:
            t.join()

        assert 6 == len(opened)  # a connection and a stream reader per thread
        for conn in opened:
            with pytest.raises(sqlite3.ProgrammingError):
                conn.execute("SELECT 1")

    def test_thread_exit_closes_its_connections(self, store: SQLiteStorage) -> None:
        """
        A thread's connections close when the thread ends, not only on close().
        """
        opened: list[sqlite3.Connection] = []

        def use() -> None:
            store.list_syncs()
            opened.extend(store._threaded().all)

        t = threading.Thread(target=use)
        t.start()
        t.join()
        gc.collect()

        assert 1 == len(opened)
        with pytest.raises(sqlite3.ProgrammingError):
            opened[0].execute("SELECT 1")

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_forked_child_uses_its_own_connection(self, store: SQLiteStorage) -> None:
        """
        A child forked after the store was used opens its own connection, and both
        processes keep working on the file.
        """
        store.create_sync(record("parent"))
        inherited = store._threaded().main
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            code = 1
            try:
                own = store._threaded().main is not inherited
                store.create_sync(record("child"))
                code = 0 if own and 2 == len(store.list_syncs()) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)

        assert 0 == os.waitstatus_to_exitcode(status)
        assert inherited is store._threaded().main
        assert ["child", "parent"] == [r.id for r in store.list_syncs()]

    def test_closed_store_refuses_work(self, path: Path) -> None:
        """
        Using a closed store raises StorageError instead of reopening behind your back.
        """
        with SQLiteStorage(path) as s:
            pass

        with pytest.raises(StorageError, match="is closed"):
            s.list_syncs()
        s.close()  # idempotent

    def test_stream_is_a_snapshot(self, store: SQLiteStorage) -> None:
        """
        A stream keeps its snapshot while the same thread applies batches.
        """
        store.create_sync(record())
        lease = store.claim_due(T0, "w", LEASE, 1)[0]
        keys = tuple(f"k{i:05d}" for i in range(25_000))
        store.apply_batch(lease, batch(added=keys))

        stream = store.iter_delivered("s1")
        seen = [next(stream) for _ in range(10)]
        store.apply_batch(lease, batch(added=("k99999", "a"), removed=keys[:20] + keys[-5:]))
        seen.extend(stream)

        assert list(keys) == seen
        assert 25_000 - 25 + 2 == store.count_delivered("s1")

    def test_nested_and_abandoned_streams(self, store: SQLiteStorage) -> None:
        """
        Two streams can be interleaved, and an abandoned one gives its reader back.
        """
        store.create_sync(record())
        lease = store.claim_due(T0, "w", LEASE, 1)[0]
        store.apply_batch(lease, batch(added=("a", "b", "c")))

        pairs = [(x, y) for x in store.iter_delivered("s1") for y in store.iter_delivered("s1")]
        abandoned = store.iter_delivered("s1")
        next(abandoned)
        del abandoned
        gc.collect()

        assert 9 == len(pairs)
        assert store._threaded().reader is not None
        assert 2 == len(store._threaded().all)  # one connection, one idle reader: no leak

    def test_streaming_in_other_threads(self, store: SQLiteStorage) -> None:
        """
        A stream started in one thread and finished in another closes its reader.
        """
        store.create_sync(record())
        lease = store.claim_due(T0, "w", LEASE, 1)[0]
        store.apply_batch(lease, batch(added=("a", "b")))
        stream = store.iter_delivered("s1")
        first = next(stream)
        rest: list[str] = []
        t = threading.Thread(target=lambda: rest.extend(stream))
        t.start()
        t.join()

        assert ["a", "b"] == [first, *rest]
        assert 1 == len(store._threaded().all)

    def test_large_batches_are_fast(self, store: SQLiteStorage) -> None:
        """
        Ten batches of 10,000 members apply in well under a second each.
        """
        store.create_sync(record())
        lease = store.claim_due(T0, "w", LEASE, 1)[0]
        start = time.perf_counter()
        for n in range(10):
            store.apply_batch(lease, batch(added=tuple(f"m{n}-{i}" for i in range(10_000))))
        elapsed = time.perf_counter() - start

        assert 100_000 == store.count_delivered("s1")
        assert elapsed < 10.0, f"{elapsed:.2f}s for 100,000 members"


# -- several processes on one file -----------------------------------------------------

WORKERS = 4
SYNCS = 50
STEP = 300  # seconds of simulated time between two "now" instants
SPAN = 2 * 24 * HOUR
START = int(T0.timestamp())


def offset_of(sync_id: str) -> int:
    return int(sync_id.split("-")[1]) * (HOUR // SYNCS)


def locked() -> sqlite3.OperationalError:
    """What SQLite raises when it answers "database is locked"."""
    return sqlite3.OperationalError("database is locked")


def open_at_once(path: str, barrier: Any, results: Any) -> None:
    """In a spawned process: open *path* when every process is ready; report how it went."""
    barrier.wait()
    try:
        with SQLiteStorage(path) as store:
            store.list_syncs()
        results.put("opened")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"{type(exc).__name__}: {exc}")


def claim_worker(path: str, nows: list[int], seed: int, barrier: Any, results: Any) -> None:
    """
    One worker process: step through the shared list of simulated instants,
    claiming and completing whatever is due at each.
    """
    rng = random.Random(seed)
    counts = {"claims": 0, "runs": 0, "duplicates": 0, "lost": 0}
    owner = f"worker-{seed}"
    with SQLiteStorage(path) as store:
        barrier.wait()
        for ts in nows:
            now = datetime.fromtimestamp(ts, timezone.utc)
            while leases := store.claim_due(now, owner, LEASE, 5):
                counts["claims"] += len(leases)
                for lease in leases:
                    if rng.random() < 0.3:
                        time.sleep(rng.uniform(0.001, 0.004))
                    slot_ts = int(lease.slot.timestamp())
                    next_ts = (slot_ts // HOUR + 1) * HOUR + offset_of(lease.sync_id)
                    run = run_for(lease, f"{lease.sync_id}@{slot_ts}@{owner}", now)
                    completion = Completion(
                        run=run, next_due=datetime.fromtimestamp(next_ts, timezone.utc)
                    )
                    try:
                        store.complete_run(lease, completion)
                        counts["runs"] += 1
                    except DuplicateRunError:
                        counts["duplicates"] += 1
                    except LeaseLostError:
                        counts["lost"] += 1
    results.put(counts)


class TestSeveralProcesses:
    """
    Worker processes sharing one file run every due slot exactly once.
    """

    def test_every_slot_runs_once(self, path: Path) -> None:
        """
        Four spawned workers over two simulated days: no duplicate, no missed slot.
        """
        with SQLiteStorage(path) as store:
            for i in range(SYNCS):
                sync_id = f"sync-{i:02d}"
                first = datetime.fromtimestamp(START + offset_of(sync_id), timezone.utc)
                store.create_sync(record(sync_id, next_due=first, offset=offset_of(sync_id)))
        nows = list(range(START, START + SPAN + 1, STEP))
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(WORKERS)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=claim_worker, args=(str(path), nows, seed, barrier, results))
            for seed in range(WORKERS)
        ]
        started = time.perf_counter()
        for p in procs:
            p.start()
        counts = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        elapsed = time.perf_counter() - started
        results.close()
        results.join_thread()

        with SQLiteStorage(path) as store:
            records = store.list_syncs()
            recorded = {
                r.id: [int(run.slot.timestamp()) for run in store.history(r.id)] for r in records
            }
        assert [None] * SYNCS == [r.lease for r in records]  # every lease was released
        expected = {
            f"sync-{i:02d}": list(range(START + offset_of(f"sync-{i:02d}"), nows[-1] + 1, HOUR))
            for i in range(SYNCS)
        }
        duplicates = sum(len(v) - len(set(v)) for v in recorded.values())
        missed = sum(len(set(expected[k]) - set(recorded[k])) for k in expected)
        extra = sum(len(set(recorded[k]) - set(expected[k])) for k in expected)
        total = {k: sum(c[k] for c in counts) for k in counts[0]}
        print(
            f"\nmulti-process: {total}, expected runs {sum(map(len, expected.values()))}, "
            f"duplicates {duplicates}, missed {missed}, per worker "
            f"{[c['runs'] for c in counts]}, {elapsed:.1f}s"
        )

        assert [0] * WORKERS == [p.exitcode for p in procs]
        assert 0 == duplicates
        assert 0 == missed
        assert 0 == extra
        assert sum(map(len, expected.values())) == total["runs"]
        assert 0 == total["duplicates"]
        assert total["claims"] == total["runs"] + total["lost"]
        assert sum(1 for c in counts if c["runs"]) >= 2, "the workers did not overlap at all"


_CLOSE_RACE = """
import sys, threading, time
from pathlib import Path
import cohortsync as cs
from cohortsync.storage import SQLiteStorage
from cohortsync.testing import RecordingDestination

for trial in range(150):
    scheduler = cs.Scheduler(SQLiteStorage(Path(sys.argv[1]) / f"race-{trial}.db"))
    scheduler.add_destination("d", RecordingDestination())
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["a"]))

    def create(scheduler=scheduler):
        i = 0
        try:
            while True:
                i += 1
                scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id=f"s{i}")
        except Exception as exc:
            print(type(exc).__name__)

    creator = threading.Thread(target=create)
    creator.start()
    time.sleep(0.01 + trial % 5 * 0.005)
    scheduler.close()
    creator.join()
"""
