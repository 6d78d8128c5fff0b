"""
The storage contract suite, run on every store cohortsync ships, and shown to
catch broken stores.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest

from cohortsync._sync import SyncRun, SyncStatus
from cohortsync.exceptions import ConflictError, LeaseLostError, StorageError
from cohortsync.storage import SQLiteStorage
from cohortsync.storage._base import placed, placement_of
from cohortsync.storage._memory import MemoryStorage
from cohortsync.storage._protocol import Claim, Completion, Lease, Placement, SyncRecord
from cohortsync.testing._storage_contract import (
    _QUERY_CHECKS,
    STORAGE_CHECKS,
    StorageFactory,
    _DerivedQueries,
    check_claim_runs,
    check_closed_store_is_unusable,
    check_complete_run_stale_holder,
    check_complete_runs,
    check_concurrent_claims_are_exclusive,
    check_create_sync_least_loaded_takes_turns,
    check_create_syncs,
    check_create_syncs_placed_takes_turns,
    check_expired_lease_still_held,
    check_extend_lease,
    check_history_round_trip_and_order,
    check_next_due_and_scheduled_after,
    check_paged_reads,
    check_save_sync_at,
    check_save_sync_at_is_atomic,
    check_save_sync_is_atomic,
    check_storage,
)
from host_project.storage import AuditedStorage, DictStorage
from records import OPTIONAL_QUERIES

QUERY_CHECKS = [c for c in STORAGE_CHECKS if any(c in checks for checks in _QUERY_CHECKS.values())]
"""The checks that exercise an optional query, in suite order."""


@pytest.fixture(params=["memory", "sqlite"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> StorageFactory:
    """
    A factory of fresh, empty stores of each shipped kind.
    """
    if request.param == "memory":
        return MemoryStorage
    counter = itertools.count()
    return lambda: SQLiteStorage(tmp_path / f"store-{next(counter)}.db")


class SelectThenUpdateClaims(MemoryStorage):
    """
    A broken store: it reads the due syncs, lets other threads run, then writes
    the leases, without holding its lock across both steps.
    """

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        with self._lock:
            due = sorted(
                (
                    r
                    for r in self._syncs.values()
                    if r.sync.status is SyncStatus.ACTIVE
                    and r.next_due is not None
                    and r.next_due <= now
                    and (r.lease is None or r.lease.expires_at < now)
                ),
                key=lambda r: (r.next_due, r.id),
            )[:limit]
        time.sleep(0)  # the race window: another thread reads the same rows
        leases = []
        with self._lock:
            for r in due:
                assert r.next_due is not None
                lease = Lease(
                    sync_id=r.id,
                    generation=r.sync.generation,
                    slot=r.next_due,
                    trigger=r.next_trigger,
                    owner=owner,
                    token=secrets.token_hex(16),
                    expires_at=now + lease_for,
                )
                self._syncs[r.id] = attrs.evolve(self._syncs[r.id], lease=lease)
                leases.append(lease)
        return leases


class LeasedSyncsUnlisted(MemoryStorage):
    """
    A broken store: list_syncs leaves out the syncs that hold a lease (as a
    store keeping leased rows apart might). Its own next_due is right, so
    only the derived one shows it.
    """

    def list_syncs(self) -> list[SyncRecord]:
        return [r for r in super().list_syncs() if r.lease is None]


class ReadThenSaveAt(MemoryStorage):
    """
    A broken store: save_sync_at compares the revision, lets other threads
    run, then writes, without holding its lock across both steps.
    """

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        current = self.get_sync(record.id)
        if current.revision != expected_revision:
            raise ConflictError(record.id, expected_revision, current.revision, counter="revision")
        time.sleep(0)  # the race window: another thread reads the same revision
        self.save_sync(record, expected_generation=current.sync.generation)


class ClaimRunsSelectThenLease(MemoryStorage):
    """
    A broken store (a third outsider's mutant): claim_runs picks the due
    syncs in one read and leases them in another, taking over leases that
    other claimants got meanwhile; claim_due itself is right.
    """

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        picked = [
            r.id
            for r in self.due_between(None, now, limit)
            if r.lease is None or r.lease.expires_at < now
        ]
        time.sleep(0.001)  # the race window: another claimant leases these now
        for sync_id in picked:
            lease = self.get_sync(sync_id).lease
            if lease is not None and lease.expires_at >= now:  # taken meanwhile: take it over
                with contextlib.suppress(LeaseLostError):
                    super().release_lease(lease)
        return super().claim_runs(now, owner, lease_for, limit)


class SaveSyncCheckThenWrite(MemoryStorage):
    """
    A broken store (a third outsider's mutant): save_sync compares the
    generation, lets other threads run, then writes.
    """

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        current = self.get_sync(record.id)
        if current.sync.generation != expected_generation:
            raise ConflictError(record.id, expected_generation, current.sync.generation)
        time.sleep(0)  # the race window: another thread reads the same generation
        fresh = self.get_sync(record.id)
        super().save_sync(record, expected_generation=fresh.sync.generation)


class ScheduledAfterListsLeased(MemoryStorage):
    """A broken store: scheduled_after lists leased syncs too (outsider's mutant)."""

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        if now.tzinfo is None:
            raise TypeError("naive")
        return [
            r
            for r in self.list_syncs()
            if r.scheduled_from is not None
            and r.scheduled_from > now
            and r.sync.status is SyncStatus.ACTIVE
        ]


class NaiveClaimRuns(MemoryStorage):
    """A broken store: claim_runs reads a naive now as UTC (outsider's mutant)."""

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        return super().claim_runs(now.replace(tzinfo=timezone.utc), owner, lease_for, limit)


class HistoryByFinish(MemoryStorage):
    """A broken store: history newest first by finish, not start (outsider's mutant)."""

    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        runs = sorted(super().history(sync_id), key=lambda r: r.finished_at, reverse=True)
        return runs if limit is None else runs[:limit]


class HistoryAfterClose(MemoryStorage):
    """A broken store: history answers [] once closed (outsider's mutant)."""

    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        try:
            return super().history(sync_id, limit)
        except StorageError:
            return []


class PlacedOutsideItsLock(MemoryStorage):
    """
    A broken store: create_syncs_placed reads the counts, then writes, each
    under its own hold of the lock, as bulk creation did before 0.2 (an
    outsider's mutant passed every other check and lost the spread with
    four creators).
    """

    def create_syncs_placed(
        self, ids: Sequence[str], place: Placement
    ) -> tuple[list[SyncRecord], list[str]]:
        taken = {sync_id for sync_id in ids if sync_id in self._syncs}
        records = list(place(self.slot_counts, taken))
        taken_now = self.create_syncs(records)
        return [r for r in records if r.id not in taken_now], taken_now


class PickThenCreate(MemoryStorage):
    """
    A broken store (an outsider's mutant): create_sync_least_loaded picks
    the bucket, lets other threads run, then creates the sync there; two
    creators at once take the same bucket.
    """

    def create_sync_least_loaded(self, record: SyncRecord, buckets: int) -> SyncRecord:
        period, preferred = placement_of(record, buckets)
        bucket = self.least_loaded_slot(period, buckets, preferred)
        time.sleep(0)  # the race window: another creator picks the same bucket
        stored = placed(record, bucket)
        self.create_sync(stored)
        return stored


class CompleteRunsRaises(MemoryStorage):
    """A broken store (an outsider's mutant): complete_runs raises the first refusal."""

    def complete_runs(
        self, completions: Sequence[tuple[Lease, Completion]]
    ) -> list[Exception | None]:
        answers = super().complete_runs(completions)
        for answer in answers:
            if answer is not None:
                raise answer
        return answers


class ClaimByTheWallClock(MemoryStorage):
    """A broken store (an outsider's mutant): claim_due decides as of the wall clock."""

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        return super().claim_due(datetime.now(timezone.utc), owner, lease_for, limit)


class PageSyncsHidesLeased(MemoryStorage):
    """A broken store (an outsider's mutant): page_syncs leaves leased syncs out."""

    def page_syncs(self, after: str | None, limit: int) -> list[SyncRecord]:
        return [r for r in super().page_syncs(after, limit) if r.lease is None]


class SplitLockSaveAt(MemoryStorage):
    """
    A broken store: save_sync_at compares the revision and writes under two
    holds of its lock, with no pause between them (an outsider's mutant
    that the suite passed before it made threads switch often).
    """

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        with self._lock:
            current = self.get_sync(record.id)
            if current.revision != expected_revision:
                raise ConflictError(
                    record.id, expected_revision, current.revision, counter="revision"
                )
        with self._lock:
            self._save(self.get_sync(record.id), record)


class ExpiryIsLoss(MemoryStorage):
    """
    A broken store: extend_lease refuses a lease past its expiry even when
    nobody claimed the sync since (an outsider's mutant the suite passed).
    """

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        if now > lease.expires_at:
            raise LeaseLostError(lease.sync_id, lease.owner, lease.token)
        return super().extend_lease(lease, now, lease_for)


class NaiveTolerantExtend(MemoryStorage):
    """A broken store: extend_lease takes a naive now as UTC (an outsider's mutant)."""

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        return super().extend_lease(lease, now, lease_for)


class RevisionBlindSave(MemoryStorage):
    """A broken store: save_sync_at saves whatever the stored revision."""

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        self.save_sync(record, expected_generation=self.get_sync(record.id).sync.generation)


class TokenBlindCompletion(MemoryStorage):
    """
    A broken store: complete_run accepts any lease on the sync, stale or not.
    """

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        with self._lock:
            current = self._syncs[lease.sync_id].lease
            super().complete_run(current or lease, completion)


class TestContract:
    """
    Every shipped store passes every check of the contract suite.
    """

    @pytest.mark.parametrize("check", STORAGE_CHECKS, ids=lambda c: c.__name__)
    def test_check(self, check: object, make_storage: StorageFactory) -> None:
        """
        The store behaves like the reference on this check.
        """
        assert callable(check)
        check(make_storage)

    def test_check_storage_runs_everything(self) -> None:
        """
        check_storage runs the whole suite and passes on the reference store.
        """
        calls = 0

        def counting() -> MemoryStorage:
            nonlocal calls
            calls += 1
            return MemoryStorage()

        check_storage(counting)

        assert calls >= len(STORAGE_CHECKS)

    @pytest.mark.parametrize("check", QUERY_CHECKS, ids=lambda c: c.__name__)
    def test_check_on_derived_queries(self, check: object, make_storage: StorageFactory) -> None:
        """
        The store's required parts are enough for StorageBase to answer its optional queries.
        """
        assert callable(check)
        check(lambda: _DerivedQueries(make_storage()))


class TestReport:
    """
    check_storage reports how a store implements each part, and checks native queries twice.
    """

    def test_the_reference_store(self) -> None:
        """MemoryStorage answers every query but dead_letters itself; those checks run twice."""
        report = check_storage(MemoryStorage)

        assert ("dead_letters",) == report.derived
        assert {"native"} == {report.parts[p] for p in ("ScheduleStore", "DeliveryStore")}
        assert [
            "check_not_found",
            "check_delete_sync",
            "check_slot_counts_follow_sync_writes",
            "check_slot_counts_match_model",
            "check_identifier_holders",
            "check_next_due_and_scheduled_after",
            "check_delivered_state",
            "check_large_batch",
            "check_paged_reads",
            "check_create_syncs",
            "check_bulk_counts_match_one_by_one",
            "check_create_syncs_placed",
            "check_create_sync_least_loaded",
            "check_save_sync_at",
        ] == [
            name.removesuffix(" (derived queries)") for name in report.passed[len(STORAGE_CHECKS) :]
        ]
        assert tuple(c.__name__ for c in STORAGE_CHECKS) == report.passed[: len(STORAGE_CHECKS)]

    def test_a_store_on_the_base_class(self) -> None:
        """A store with the required parts only has every query derived, each checked once."""
        report = check_storage(DictStorage)

        assert (
            *OPTIONAL_QUERIES,
            "claim_runs",
            "complete_runs",
            "due_between",
            "page_syncs",
            "slot_counts",
            "create_syncs",
            "create_syncs_placed",
            "create_sync_least_loaded",
            "save_sync_at",
        ) == report.derived
        native_only = (
            check_create_syncs_placed_takes_turns,
            check_create_sync_least_loaded_takes_turns,
            check_save_sync_at_is_atomic,
        )
        assert tuple(c.__name__ for c in STORAGE_CHECKS if c not in native_only) == report.passed
        # The derived versions (a read, then a write) make no promise about races.
        why = {
            check_create_syncs_placed_takes_turns: (
                "create_syncs_placed is derived (a read, then a write): creators not taken in turn"
            ),
            check_create_sync_least_loaded_takes_turns: (
                "create_sync_least_loaded is derived (a pick, then a create): not taken in turn"
            ),
            check_save_sync_at_is_atomic: (
                "save_sync_at is derived (a read, then save_sync): not atomic"
            ),
        }
        assert tuple(f"{c.__name__}: {w}" for c, w in why.items()) == report.not_applicable
        assert str(report).endswith(report.not_applicable[-1])
        # Called on their own (a host's parametrized suite), the checks pass it by, as before.
        for check in native_only:
            check(DictStorage)

    def test_a_structural_store(self) -> None:
        """
        A store written for 0.1, without the base class, has nothing derived,
        and the parts added since are absent (the scheduler derives them).
        """
        report = check_storage(lambda: AuditedStorage(MemoryStorage(), tenant="t"))

        assert () == report.derived
        assert {
            "claim_runs",
            "complete_runs",
            "due_between",
            "page_syncs",
            "slot_counts",
            "create_syncs",
            "create_syncs_placed",
            "create_sync_least_loaded",
            "save_sync_at",
        } == {name for name, how in report.parts.items() if how == "absent"}
        # check_paged_reads runs once (the store has no paged reads of its own), and so
        # do the bulk checks (on the scheduler's derivation, not again on StorageBase's).
        # ... and the three race checks of parts it lacks do not apply.
        assert len(STORAGE_CHECKS) + len(QUERY_CHECKS) - 9 == len(report.passed)
        assert 3 == len(report.not_applicable)

    def test_the_report_reads_as_a_table(self) -> None:
        """str() lists each part, required or optional, native or derived."""
        lines = str(check_storage(MemoryStorage)).splitlines()

        assert lines[0].endswith(f"{len(STORAGE_CHECKS) + len(QUERY_CHECKS) - 1} checks passed")
        assert ["ScheduleStore", "required", "native"] == lines[1].split()
        assert ["dead_letters", "optional", "derived"] == lines[-10].split()
        assert ["complete_runs", "optional", "native"] == lines[-8].split()
        assert ["page_syncs", "optional", "native"] == lines[-6].split()
        assert ["create_syncs", "optional", "native"] == lines[-4].split()
        assert ["create_syncs_placed", "optional", "native"] == lines[-3].split()
        assert ["create_sync_least_loaded", "optional", "native"] == lines[-2].split()
        assert ["save_sync_at", "optional", "native"] == lines[-1].split()

    def test_a_missing_query_names_the_base_class(self) -> None:
        """A structural store without an optional query is told to add it or use StorageBase."""

        class NoHolders(AuditedStorage):
            identifier_holders = None  # type: ignore[assignment]

        with pytest.raises(
            AssertionError, match=r"lacks the optional query identifier_holders.*StorageBase"
        ):
            check_storage(lambda: NoHolders(MemoryStorage(), tenant="t"))  # type: ignore[arg-type, return-value]

    def test_a_missing_required_method_names_its_part(self) -> None:
        """A store without a required method is told which part it belongs to."""

        class NoBatches(AuditedStorage):
            apply_batch = None  # type: ignore[assignment]

        with pytest.raises(AssertionError, match="lacks DeliveryStore methods: apply_batch"):
            check_storage(lambda: NoBatches(MemoryStorage(), tenant="t"))  # type: ignore[arg-type, return-value]

    def test_derived_queries_catch_what_native_ones_hide(self) -> None:
        """Required parts that cannot carry the derivation fail the derived run, by name."""
        for check in STORAGE_CHECKS:
            check(LeasedSyncsUnlisted)  # every native check passes

        with pytest.raises(
            AssertionError, match=r"^check_next_due_and_scheduled_after \(derived queries\): "
        ):
            check_storage(LeasedSyncsUnlisted)


def caught(check: Any, store: type[MemoryStorage], method: str, times: int) -> int:
    """How many of *times* runs of a race *check* find *store*'s *method* not atomic."""
    return sum(_finds(check, store, f"{method} is not atomic") for _ in range(times))


def _finds(check: Any, store: type[MemoryStorage], message: str) -> bool:
    try:
        check(store)
    except AssertionError as exc:
        return message in str(exc)
    return False


class TestContractCatchesBrokenStores:
    """
    The suite fails stores that break the protocol's guarantees.
    """

    def test_select_then_update_claims_fail(self) -> None:
        """
        Claims that read then write without holding the lock across both are caught.
        """
        with pytest.raises(AssertionError, match="claimed more than once"):
            check_concurrent_claims_are_exclusive(SelectThenUpdateClaims)

    def test_a_save_blind_to_the_revision_fails(self) -> None:
        """A save_sync_at that does not compare the revision is caught."""
        with pytest.raises(AssertionError, match="save_sync_at with a stale expected_revision"):
            check_save_sync_at(RevisionBlindSave)

    def test_a_save_that_reads_then_writes_fails_every_time(self) -> None:
        """A save_sync_at whose check and write are apart loses increments, caught every time."""

        assert 10 == caught(check_save_sync_at_is_atomic, ReadThenSaveAt, "save_sync_at", 10)

    def test_a_claim_runs_that_reads_then_leases_fails(self) -> None:
        """claim_runs is raced as claim_due is (a third outsider's mutant passed before)."""
        with pytest.raises(AssertionError, match=r"\(claim_runs\).*claims are not atomic"):
            check_concurrent_claims_are_exclusive(ClaimRunsSelectThenLease)

    def test_a_save_sync_that_checks_then_writes_fails_every_time(self) -> None:
        """A save_sync whose generation check and write are apart is caught."""

        assert 5 == caught(check_save_sync_is_atomic, SaveSyncCheckThenWrite, "save_sync", 5)

    @pytest.mark.parametrize(
        ("store", "check", "message"),
        [
            (ScheduledAfterListsLeased, check_next_due_and_scheduled_after, "no leased sync"),
            (NaiveClaimRuns, check_claim_runs, "claim_runs with a naive now"),
            (HistoryByFinish, check_history_round_trip_and_order, "history newest first"),
            (HistoryAfterClose, check_closed_store_is_unusable, "history on a closed store"),
        ],
    )
    def test_more_outsider_mutants_fail(
        self, store: type[MemoryStorage], check: Any, message: str
    ) -> None:
        """Stores breaking a documented promise that check_storage passed before."""
        with pytest.raises(AssertionError, match=message):
            check(store)

    def test_a_placement_outside_its_lock_fails(self) -> None:
        """A create_syncs_placed that reads its counts and writes apart is caught."""
        with pytest.raises(AssertionError, match="must read the counts and write under one lock"):
            check_create_syncs_placed_takes_turns(PlacedOutsideItsLock)

    def test_a_pick_before_the_create_fails_every_time(self) -> None:
        """
        A create_sync_least_loaded that picks, then creates, piles concurrent
        creators into one bucket (the shipped PostgreSQL store did, 3 runs in 3).
        """
        message = "two creators picked the same bucket"
        assert 5 == sum(
            _finds(check_create_sync_least_loaded_takes_turns, PickThenCreate, message)
            for _ in range(5)
        )

    def test_failures_say_what_the_store_must_do(self) -> None:
        """
        An outsider found messages that named a symptom, not the rule: a
        complete_runs that raises, and a claim that reads the wall clock.
        """
        with pytest.raises(AssertionError, match="must answer a refused completion as that item"):
            check_complete_runs(CompleteRunsRaises)
        with pytest.raises(AssertionError, match="never the wall clock or the database's clock"):
            check_storage(ClaimByTheWallClock)

    def test_a_failure_about_long_lists_reads_in_a_line(self) -> None:
        """
        Lists of records are shown by their ids and first difference: the
        outsider's page_syncs mutant printed 23 KB of records.
        """
        with pytest.raises(AssertionError) as caught:
            check_paged_reads(PageSyncsHidesLeased)
        message = str(caught.value)
        assert len(message) < 1_500, message
        assert "first difference at item" in message
        assert "(ids " in message

    def test_the_report_names_the_class_under_test(self) -> None:
        """str(report) of a subclass starts with the subclass's name, not MemoryStorage's."""

        class Mine(MemoryStorage):
            pass

        assert str(check_storage(Mine)).startswith("Mine(syncs=0, runs=0):")

    def test_a_save_split_across_two_locks_fails(self) -> None:
        """Even with no pause between its check and its write, a split save is caught."""

        assert 5 == caught(check_save_sync_at_is_atomic, SplitLockSaveAt, "save_sync_at", 5)

    def test_an_expired_but_unclaimed_lease_must_stay_held(self) -> None:
        """A store that treats expiry alone as loss of the lease is caught."""
        with pytest.raises(AssertionError, match="nobody claimed since"):
            check_expired_lease_still_held(ExpiryIsLoss)

    def test_a_naive_now_taken_as_utc_fails(self) -> None:
        """A store that quietly reads a naive time as UTC is caught."""
        with pytest.raises(AssertionError, match="extend_lease with a naive now"):
            check_extend_lease(NaiveTolerantExtend)

    def test_token_blind_completion_fails(self) -> None:
        """
        A complete_run that ignores the lease token is caught.
        """
        with pytest.raises(AssertionError, match="complete_run by a stale holder"):
            check_complete_run_stale_holder(TokenBlindCompletion)

    def test_check_storage_names_the_failing_check(self) -> None:
        """
        check_storage's error names the check that failed.
        """
        with pytest.raises(AssertionError, match=r"^check_complete_run_stale_holder: "):
            check_storage(TokenBlindCompletion)

    def test_unexpected_errors_name_the_check(self) -> None:
        """
        A store raising something unexpected is reported as a failure of that check.
        """

        class Exploding(MemoryStorage):
            def list_syncs(self) -> list[SyncRecord]:
                raise OSError("disk on fire")

        with pytest.raises(AssertionError, match=r"check_create_get_round_trip raised OSError"):
            check_storage(Exploding)

    def test_broken_claims_are_caught_every_time(self) -> None:
        """
        The concurrency check fails the racy store reliably, not by luck.
        """

        def caught() -> bool:
            try:
                check_concurrent_claims_are_exclusive(SelectThenUpdateClaims)
            except AssertionError:
                return True
            return False

        assert [True] * 10 == [caught() for _ in range(10)]


class PagesIgnoreAfter(MemoryStorage):
    """due_between that always answers the first page (an outside test's mutant)."""

    def due_between(
        self, after: tuple[datetime, str] | None, until: datetime, limit: int
    ) -> list[SyncRecord]:
        return super().due_between(None, until, limit)


class TakenSorted(MemoryStorage):
    """create_syncs answering the taken ids sorted, not in input order."""

    def create_syncs(self, records: Sequence[SyncRecord]) -> list[str]:
        return sorted(super().create_syncs(records))


class CountsEveryPeriod(MemoryStorage):
    """slot_counts that adds the other periods' syncs into the one asked for."""

    def slot_counts(self, period: int, buckets: int) -> list[int]:
        counts = super().slot_counts(period, buckets)
        other = super().slot_counts(86_400 if period == 3600 else 3600, buckets)
        return [a + b for a, b in zip(counts, other, strict=True)]


class TestContractCatchesBrokenNewParts:
    """The checks of the parts added in 0.2 fail the stores outside testers wrote to break them."""

    def test_a_page_walk_that_never_ends_fails(self) -> None:
        """It used to loop forever (864 MB after ten minutes); now it fails, by name."""
        with pytest.raises(AssertionError, match="due_between after"):
            check_paged_reads(PagesIgnoreAfter)

    def test_taken_ids_out_of_order_fail(self) -> None:
        with pytest.raises(AssertionError, match="in input order"):
            check_create_syncs(TakenSorted)

    def test_counts_of_another_period_fail(self) -> None:
        with pytest.raises(AssertionError, match="counts"):
            check_create_syncs(CountsEveryPeriod)
