"""
Scheduler.apply_syncs: the declaration a host applies at start-up in every
process. Creates what is missing, updates what changed, leaves the rest
exactly as it is (a paused sync paused), prunes only what it owns, and
stays correct when several processes apply it at once.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cohortsync as cs
from cohortsync._bulk import prunable
from cohortsync.exceptions import (
    BulkSyncError,
    ConfigurationError,
    ConflictError,
    IneligibleSyncError,
)
from cohortsync.storage import MemoryStorage, SQLiteStorage, Storage, SyncRecord
from cohortsync.testing import FakeClock, RecordingDestination
from host_project.storage import AuditedStorage
from records import sync_record

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
DSN_VARIABLE = "COHORTSYNC_TEST_POSTGRES_DSN"


def _scheduler(storage: Storage, clock: FakeClock | None = None) -> cs.Scheduler:
    """The scheduler every process of the host builds: same cohorts, destinations, mappings."""
    scheduler = cs.Scheduler(storage, clock=clock or FakeClock(T0), seed=0)
    scheduler.add_destination("crm", RecordingDestination())
    scheduler.add_destination("batch-only", RecordingDestination("facebook_ads"))
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1", "u2"]))
    scheduler.add_cohort(cs.Cohort(id="d", name="D", source=lambda: ["u3"]))
    scheduler.add_mapping("upper", cs.IdentifierMapping([("user_id", str.upper)]))
    return scheduler


def declaration(prefix: str = "app:", count: int = 6) -> list[cs.SyncSpec]:
    """A deployment's syncs: daily, hourly and real-time, one with a mapping."""
    policies = [cs.SyncPolicy.daily(), cs.SyncPolicy.hourly(), cs.SyncPolicy.realtime()]
    return [
        cs.SyncSpec(
            "c",
            "crm",
            policies[i % 3],
            sync_id=f"{prefix}{i:02d}",
            mapping_id="upper" if i == 1 else None,
        )
        for i in range(count)
    ]


def _state(storage: Storage) -> dict[str, tuple[object, ...]]:
    """Everything a re-apply must leave alone, per sync."""
    return {
        r.id: (
            r.sync.generation,
            r.sync.status,
            r.sync.status_reason,
            r.offset,
            r.slot_bucket,
            r.next_due,
            r.next_trigger,
            r.sync.updated_at,
        )
        for r in storage.list_syncs()
    }


@pytest.fixture(params=["memory", "sqlite", "plain"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """Memory, SQLite, and a store on the plain protocol (no bulk part)."""
    store: Storage
    if request.param == "memory":
        store = MemoryStorage()
    elif request.param == "sqlite":
        store = SQLiteStorage(os.fspath(tmp_path / "cs.db"))
    else:
        store = AuditedStorage(MemoryStorage(), tenant="t")
    yield store
    store.close()


class TestApplySyncs:
    def test_creates_what_is_missing(self, storage: Storage) -> None:
        """A first apply creates every declared sync, due now like create_sync."""
        scheduler = _scheduler(storage)

        result = scheduler.apply_syncs(declaration())

        assert tuple(f"app:{i:02d}" for i in range(6)) == result.created
        assert ((), (), (), False) == (
            result.updated,
            result.unchanged,
            result.deleted,
            result.dry_run,
        )
        assert [T0] * 6 == [r.next_due for r in storage.list_syncs()]
        assert "upper" == scheduler.get_sync("app:01").mapping_id

    def test_reapplying_changes_nothing(self, storage: Storage) -> None:
        """
        Applying the same declaration again (every restart) keeps each slot,
        generation, next run and status: no run is forced.
        """
        clock = FakeClock(T0)
        scheduler = _scheduler(storage, clock)
        scheduler.apply_syncs(declaration())
        scheduler.run_due()
        clock.advance(30)
        before = _state(storage)

        again = _scheduler(storage, clock).apply_syncs(declaration())

        assert tuple(f"app:{i:02d}" for i in range(6)) == again.unchanged
        assert ((), ()) == (again.created, again.updated)
        assert before == _state(storage)
        assert [] == scheduler.run_due()  # all ran at T0; real-time is next due at T0+60s

    def test_updates_only_what_changed(self, storage: Storage) -> None:
        """A changed policy or mapping is a new generation, due now; the others are untouched."""
        clock = FakeClock(T0)
        scheduler = _scheduler(storage, clock)
        specs = declaration()
        scheduler.apply_syncs(specs)
        scheduler.run_due()
        clock.advance(3_600)
        before = _state(storage)
        specs[0] = attrs.evolve(specs[0], policy=cs.SyncPolicy.hourly())
        specs[1] = attrs.evolve(specs[1], mapping_id=None)

        result = scheduler.apply_syncs(specs)

        assert ("app:00", "app:01") == result.updated
        assert tuple(f"app:{i:02d}" for i in range(2, 6)) == result.unchanged
        after = _state(storage)
        assert {k: v for k, v in before.items() if k not in result.updated} == {
            k: v for k, v in after.items() if k not in result.updated
        }
        assert [2, 2] == [scheduler.get_sync(i).generation for i in result.updated]
        assert cs.Cadence.HOURLY == scheduler.get_sync("app:00").cadence
        assert scheduler.get_sync("app:01").mapping_id is None
        assert [clock.now()] * 2 == [scheduler.next_run(i) for i in result.updated]

    def test_a_paused_sync_stays_paused(self, storage: Storage) -> None:
        """
        An operator's pause survives a re-apply, unchanged or changed: the
        declaration never resumes a sync (resume_sync does).
        """
        scheduler = _scheduler(storage)
        specs = declaration()
        scheduler.apply_syncs(specs)
        scheduler.pause_sync("app:00", "operator: campaign on hold")
        scheduler.pause_sync("app:01", "operator: CRM migration")
        specs[1] = attrs.evolve(specs[1], policy=cs.SyncPolicy.daily())

        result = scheduler.apply_syncs(specs)

        assert ("app:01",) == result.updated
        assert "app:00" in result.unchanged
        paused = [scheduler.get_sync(i) for i in ("app:00", "app:01")]
        assert [cs.SyncStatus.PAUSED] * 2 == [s.status for s in paused]
        assert ["operator: campaign on hold", "operator: CRM migration"] == [
            s.status_reason for s in paused
        ]
        assert [1, 2] == [s.generation for s in paused]
        assert [None, None] == [scheduler.next_run(s.id) for s in paused]
        assert {"app:00", "app:01"}.isdisjoint(r.sync_id for r in scheduler.run_due())
        scheduler.resume_sync("app:01")
        assert cs.Cadence.DAILY == next(
            r.cadence for r in scheduler.run_due() if r.sync_id == "app:01"
        )

    def test_a_completed_one_time_sync_is_not_run_again(self, storage: Storage) -> None:
        """Re-declaring a one-time sync that ran keeps it completed."""
        scheduler = _scheduler(storage)
        spec = cs.SyncSpec("c", "crm", cs.SyncPolicy.one_time(), sync_id="app:once")
        scheduler.apply_syncs([spec])
        assert 1 == len(scheduler.run_due())

        assert ("app:once",) == scheduler.apply_syncs([spec]).unchanged

        assert cs.SyncStatus.COMPLETED == scheduler.get_sync("app:once").status
        assert [] == scheduler.run_due()

    def test_every_refusal_reported_the_rest_applied(self, storage: Storage) -> None:
        """Each bad spec gets its typed error; every good one is applied."""
        scheduler = _scheduler(storage)
        scheduler.create_sync("c", "crm", cs.SyncPolicy.daily(), sync_id="app:moved")
        scheduler.create_sync("c", "crm", cs.SyncPolicy.daily(), sync_id="app:gone")
        scheduler.delete_sync("app:gone")
        daily = cs.SyncPolicy.daily()
        specs = [
            cs.SyncSpec("c", "crm", daily, sync_id="app:ok"),
            cs.SyncSpec("c", "crm", daily),
            cs.SyncSpec("c", "crm", daily, sync_id="other:x"),
            cs.SyncSpec("d", "crm", daily, sync_id="app:moved"),
            cs.SyncSpec("c", "crm", daily, sync_id="app:gone"),
            cs.SyncSpec("c", "batch-only", cs.SyncPolicy.realtime(), sync_id="app:rt"),
            cs.SyncSpec("c", "crm", daily, sync_id="app:ok"),
        ]

        with pytest.raises(BulkSyncError) as caught:
            scheduler.apply_syncs(specs, prefix="app:")

        failures = caught.value.failures
        assert [1, 2, 3, 4, 5, 6] == [f.position for f in failures]
        messages = [str(f.error) for f in failures]
        assert "needs every spec's sync_id" in messages[0]
        assert "prefix 'app:'" in messages[1]
        assert "declare a new id" in messages[2]
        assert "ids are never reused" in messages[3]
        assert isinstance(failures[4].error, IneligibleSyncError)
        assert "given twice" in messages[5]
        assert ("app:ok",) == caught.value.created
        assert "c" == scheduler.get_sync("app:moved").cohort_id

    @pytest.mark.parametrize("prefix", ["", " ", "a\x00"])
    def test_bad_prefix(self, prefix: str) -> None:
        """The prefix is an id's start: empty or unstorable text is refused."""
        with pytest.raises(ConfigurationError, match="prefix"):
            _scheduler(MemoryStorage()).apply_syncs([], prefix=prefix)

    def test_bad_chunk(self) -> None:
        """chunk must be a positive int."""
        with pytest.raises(ConfigurationError, match="chunk"):
            _scheduler(MemoryStorage()).apply_syncs([], chunk=0)

    def test_a_lost_compare_and_set_is_read_again(self) -> None:
        """
        Another process applying the same change between our read and our
        write: ours reads the sync again, finds it equal, and reports it
        unchanged; the generation moves once.
        """
        specs = declaration()
        storage = RacingStorage()
        first, other = _scheduler(storage), _scheduler(storage)
        first.apply_syncs(specs)
        specs[0] = attrs.evolve(specs[0], policy=cs.SyncPolicy.hourly())
        storage.before_save = lambda: other.apply_syncs(specs)

        result = first.apply_syncs(specs)

        assert ((), ("app:00",)) == (result.updated, tuple(storage.conflicts))
        assert "app:00" in result.unchanged
        assert 2 == first.get_sync("app:00").generation

    def test_a_conflict_that_persists_is_reported(self) -> None:
        """A sync changed concurrently on every attempt ends as a refused spec, not a loop."""
        specs = declaration(count=1)
        storage = RacingStorage()
        first, other = _scheduler(storage), _scheduler(storage)
        first.apply_syncs(specs)
        turn = iter(range(100))

        def flip() -> None:
            cadence = next(turn) % 2
            policy = cs.SyncPolicy.hourly() if cadence else cs.SyncPolicy.realtime()
            other.update_sync("app:00", policy)

        storage.before_save = flip

        with pytest.raises(BulkSyncError) as caught:
            first.apply_syncs([attrs.evolve(specs[0], policy=cs.SyncPolicy.weekly("mon"))])

        assert isinstance(caught.value.failures[0].error, ConflictError)
        assert 5 == len(storage.conflicts)  # bounded attempts


class RacingStorage(MemoryStorage):
    """A store that lets another writer in just before each sync update (once per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.before_save: Callable[[], object] | None = None
        self.conflicts: list[str] = []
        self._racing = False

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        if self.before_save is not None and not self._racing:
            self._racing = True
            try:
                self.before_save()
            finally:
                self._racing = False
        try:
            super().save_sync_at(record, expected_revision=expected_revision)
        except ConflictError:
            self.conflicts.append(record.id)
            raise


class TestPrune:
    def _store(self, storage: Storage) -> cs.Scheduler:
        scheduler = _scheduler(storage)
        scheduler.apply_syncs(declaration())
        scheduler.create_sync("c", "crm", cs.SyncPolicy.daily(), sync_id="app-other")
        scheduler.create_sync("c", "crm", cs.SyncPolicy.daily(), sync_id="app")
        scheduler.create_sync("c", "crm", cs.SyncPolicy.daily(), sync_id="ap")
        scheduler.create_sync("c", "crm", cs.SyncPolicy.daily(), sync_id="billing:1")
        scheduler.create_sync("c", "crm", cs.SyncPolicy.daily(), sync_id="zzz")
        return scheduler

    def test_deletes_only_undeclared_syncs_under_the_prefix(self, storage: Storage) -> None:
        """Syncs outside the prefix (even ones sharing its first letters) are never touched."""
        scheduler = self._store(storage)
        scheduler.delete_sync("app:05")  # deleted already: not pruned again
        kept = declaration()[:3]

        result = scheduler.apply_syncs(kept, prefix="app:", prune=True)

        assert ("app:03", "app:04") == result.deleted
        statuses = {s.id: s.status for s in scheduler.syncs()}
        assert {
            "app:00": cs.SyncStatus.ACTIVE,
            "app:01": cs.SyncStatus.ACTIVE,
            "app:02": cs.SyncStatus.ACTIVE,
            "app:03": cs.SyncStatus.DELETED,
            "app:04": cs.SyncStatus.DELETED,
            "app:05": cs.SyncStatus.DELETED,
            "app-other": cs.SyncStatus.ACTIVE,
            "app": cs.SyncStatus.ACTIVE,
            "ap": cs.SyncStatus.ACTIVE,
            "billing:1": cs.SyncStatus.ACTIVE,
            "zzz": cs.SyncStatus.ACTIVE,
        } == statuses
        assert () == scheduler.apply_syncs(kept, prefix="app:", prune=True).deleted

    def test_the_deletion_policy_is_followed(self, storage: Storage) -> None:
        """A pruned sync with on_delete=remove_delivered removes what it delivered."""
        clock = FakeClock(T0)
        scheduler = _scheduler(storage, clock)
        crm = scheduler.destination("crm")
        assert isinstance(crm, RecordingDestination)
        removing = cs.SyncPolicy.daily(on_delete="remove_delivered")
        scheduler.apply_syncs(
            [
                cs.SyncSpec("c", "crm", removing, sync_id="app:remove"),
                cs.SyncSpec("d", "crm", cs.SyncPolicy.daily(), sync_id="app:leave"),
            ]
        )
        scheduler.run_due()
        assert ({"u1", "u2"}, {"u3"}) == (crm.audience("app:remove"), crm.audience("app:leave"))

        result = scheduler.apply_syncs([], prefix="app:", prune=True)

        assert ("app:leave", "app:remove") == result.deleted
        scheduler.run_due()  # the removal run of app:remove
        assert (set(), {"u3"}) == (crm.audience("app:remove"), crm.audience("app:leave"))
        assert [cs.SyncStatus.DELETED] * 2 == [s.status for s in scheduler.syncs()]

    def test_needs_a_prefix(self, storage: Storage) -> None:
        """prune=True without prefix is refused before anything is written."""
        scheduler = _scheduler(storage)

        with pytest.raises(ConfigurationError, match="needs prefix"):
            scheduler.apply_syncs(declaration(), prune=True)

        assert [] == scheduler.syncs()

    def test_nothing_is_pruned_when_a_spec_is_refused(self, storage: Storage) -> None:
        """A declaration with a refused spec prunes nothing (it may be incomplete)."""
        scheduler = self._store(storage)
        bad = cs.SyncSpec("no-such-cohort", "crm", cs.SyncPolicy.daily(), sync_id="app:bad")

        with pytest.raises(BulkSyncError):
            scheduler.apply_syncs([bad], prefix="app:", prune=True)

        assert all(s.status is cs.SyncStatus.ACTIVE for s in scheduler.syncs())


class TestDryRun:
    def test_says_what_it_would_do_and_writes_nothing(self, storage: Storage) -> None:
        """The plan lists creates, updates, unchanged and refusals; the store is as it was."""
        scheduler = _scheduler(storage)
        specs = declaration()
        scheduler.apply_syncs(specs[:4])
        scheduler.create_sync("c", "crm", cs.SyncPolicy.daily(), sync_id="app:old")
        planned = [
            attrs.evolve(specs[0], policy=cs.SyncPolicy.hourly()),
            *specs[1:],
            cs.SyncSpec("nope", "crm", cs.SyncPolicy.daily(), sync_id="app:bad"),
        ]
        before = _state(storage)

        plan = scheduler.apply_syncs(planned, prefix="app:", dry_run=True)

        assert before == _state(storage)
        assert (("app:04", "app:05"), ("app:00",), ("app:01", "app:02", "app:03")) == (
            plan.created,
            plan.updated,
            plan.unchanged,
        )
        assert [6] == [f.position for f in plan.refused]
        assert plan.dry_run

    def test_lists_what_prune_would_delete(self, storage: Storage) -> None:
        """With prune, the plan names the syncs a real call deletes, and deletes none."""
        scheduler = _scheduler(storage)
        scheduler.apply_syncs(declaration())

        plan = scheduler.apply_syncs(declaration()[:4], prefix="app:", prune=True, dry_run=True)

        assert ("app:04", "app:05") == plan.deleted
        assert all(s.status is cs.SyncStatus.ACTIVE for s in scheduler.syncs())
        real = scheduler.apply_syncs(declaration()[:4], prefix="app:", prune=True)
        assert plan.deleted == real.deleted


class TestPrunable:
    @given(
        ids=st.sets(st.text(alphabet="ab:-", min_size=1, max_size=5), max_size=30),
        prefix=st.text(alphabet="ab:-", min_size=1, max_size=3),
        data=st.data(),
    )
    def test_exactly_the_live_undeclared_ids_under_the_prefix(
        self, ids: set[str], prefix: str, data: st.DataObject
    ) -> None:
        """Walking the store in id order (from any start before the prefix) finds exactly them."""
        declared = data.draw(st.sets(st.sampled_from(sorted(ids)))) if ids else set()
        gone = data.draw(st.sets(st.sampled_from(sorted(ids)))) if ids else set()
        records = [
            sync_record(i, sync=attrs.evolve(sync_record(i).sync, status=cs.SyncStatus.DELETED))
            if i in gone
            else sync_record(i)
            for i in sorted(ids)
        ]

        walked = list(prunable(records, prefix, declared))

        expected = [i for i in sorted(ids) if i.startswith(prefix)]
        assert [i for i in expected if i not in declared and i not in gone] == walked


# -- several processes at once ----------------------------------------------------------


def apply_worker(
    store: tuple[str, str, str | None], rounds: list[list[cs.SyncSpec]], barrier: Any, out: Any
) -> None:
    """
    One host process: build the scheduler, then apply each round's declaration
    when every process is ready to, as start-ups racing each other do. Every
    outcome, an error included, goes to *out*; a process stuck for 90 s
    prints where it is stuck and exits.
    """
    faulthandler.dump_traceback_later(90, exit=True)
    answers: list[object] = []
    try:
        storage = _open(store)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        barrier.abort()
        out.put([f"opening the store: {exc!r}"])
        return
    try:
        scheduler = _scheduler(storage)
        for specs in rounds:
            barrier.wait(timeout=60)
            try:
                result = scheduler.apply_syncs(specs, prefix="app:", prune=True)
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                answers.append(repr(exc))
            else:
                answers.append((result.created, result.updated, result.unchanged, result.deleted))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        answers.append(repr(exc))
    finally:
        storage.close()
        out.put(answers)


def run_appliers(
    store: tuple[str, str, str | None], rounds: list[list[cs.SyncSpec]], processes: int
) -> list[list[object]]:
    """Start *processes* spawned appliers at once; each one's answers per round."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=apply_worker, args=(store, rounds, barrier, out))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        answers = [out.get(timeout=150) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        out.close()
        out.join_thread()
    return answers


def _postgres_store() -> Iterator[tuple[str, str, str | None]]:
    dsn = os.environ.get(DSN_VARIABLE)
    if not dsn:
        if os.environ.get("CI"):
            pytest.fail(f"{DSN_VARIABLE} is not set, and CI must run the PostgreSQL tests")
        pytest.skip(f"no PostgreSQL server to test against ({DSN_VARIABLE})")
    psycopg = pytest.importorskip("psycopg")
    from psycopg import sql

    schema = f"cs_test_{secrets.token_hex(6)}"
    try:
        yield ("postgres", dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str, str | None]]:
    """A store several processes open: one SQLite file, or one PostgreSQL schema."""
    if request.param == "sqlite":
        yield ("sqlite", os.fspath(tmp_path / "shared.db"), None)
    else:
        yield from _postgres_store()


def _open(store: tuple[str, str, str | None]) -> Storage:
    kind, where, schema = store
    if kind == "sqlite":
        return SQLiteStorage(where)
    from cohortsync.storage import PostgresStorage

    assert schema is not None  # every PostgreSQL test works in a schema of its own
    return PostgresStorage(where, schema=schema)


@pytest.mark.reliability
class TestConcurrentApply:
    """
    Three processes start at once and apply the same declaration, then the
    same changed one (a deploy): no error, each sync created once, each
    change one generation.
    """

    def test_three_processes_one_declaration(
        self, shared_store: tuple[str, str, str | None]
    ) -> None:
        """Each sync is created by exactly one process; a change bumps its generation once."""
        first = declaration(count=40)
        changed = [
            attrs.evolve(s, policy=cs.SyncPolicy.weekly("mon")) if i % 4 == 0 else s
            for i, s in enumerate(first[:36])  # the last four are pruned
        ]
        started = time.perf_counter()

        answers = run_appliers(shared_store, [first, changed, changed], processes=3)

        elapsed = time.perf_counter() - started
        assert all(isinstance(a, tuple) for rounds in answers for a in rounds), answers
        created = [i for rounds in answers for i in rounds[0][0]]  # type: ignore[index]
        updated = [i for rounds in answers for i in rounds[1][1]]  # type: ignore[index]
        deleted = [i for rounds in answers for r in rounds[1:] for i in r[3]]  # type: ignore[index]
        third_round_updates = [i for rounds in answers for i in rounds[2][1]]  # type: ignore[index]
        assert sorted(s.sync_id for s in first) == sorted(created)  # type: ignore[type-var]
        assert sorted(f"app:{i:02d}" for i in range(0, 36, 4)) == sorted(updated)
        assert [] == third_round_updates
        assert {f"app:{i:02d}" for i in range(36, 40)} == set(deleted)
        storage = _open(shared_store)
        try:
            records = {r.id: r for r in storage.list_syncs()}
        finally:
            storage.close()
        generations = {i: r.sync.generation for i, r in records.items()}
        assert {s.sync_id: (2 if s.sync_id in updated else 1) for s in first} == generations
        assert {
            i: cs.SyncStatus.DELETED if i in deleted else cs.SyncStatus.ACTIVE for i in records
        } == {i: r.sync.status for i, r in records.items()}
        print(f"\n3 processes, 3 rounds of 40 specs: {elapsed:.1f} s")
