"""
The storage contract suite, run on every store cohortsync ships, and shown to
catch broken stores.
"""

from __future__ import annotations

import itertools
import secrets
import time
from datetime import datetime, timedelta
from pathlib import Path

import attrs
import pytest

from cohortsync._sync import SyncStatus
from cohortsync.storage import SQLiteStorage
from cohortsync.storage._memory import MemoryStorage
from cohortsync.storage._protocol import Completion, Lease, SyncRecord
from cohortsync.testing._storage_contract import (
    STORAGE_CHECKS,
    StorageFactory,
    check_complete_run_stale_holder,
    check_concurrent_claims_are_exclusive,
    check_storage,
)


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
