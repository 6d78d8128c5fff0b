"""
What reaches a store: text no store can hold is escaped or refused at the
boundary, and a closed store refuses work.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import cohortsync as cs
from cohortsync.exceptions import (
    ConfigurationError,
    StorageClosedError,
    StorageError,
)
from cohortsync.storage import MemoryStorage, SQLiteStorage, Storage
from cohortsync.testing import FakeClock, RecordingDestination
from single_sync import Members, build, run_next


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage()
    elif request.param == "sqlite":
        store = SQLiteStorage(tmp_path / "s.db")
        yield store
        store.close()
    else:
        dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
        if not dsn:
            pytest.skip("PostgreSQL tests need COHORTSYNC_TEST_POSTGRES_DSN (CI sets it)")
        from cohortsync.storage import PostgresStorage

        store = PostgresStorage(dsn, schema=f"t_{os.urandom(5).hex()}")
        yield store
        store.close()


class TestUnstorableText:
    """Every string that reaches a store is validated or sanitised at the boundary (12.6)."""

    @pytest.mark.parametrize("junk", ["bad\x00reason", "bad\udc80reason"])
    def test_rejection_reasons_with_nul_or_surrogates_are_recorded(
        self, clock: FakeClock, any_store: Storage, junk: str
    ) -> None:
        """A vendor answering 200 with NUL or a lone surrogate in a reason: recorded, not wedged."""

        class Junky(RecordingDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                super().add(batch)
                return cs.DeliveryResult.partial([cs.Rejection(batch.identifiers[0], junk)])

        scheduler = build(clock, Members(["a", "b"]), destination=Junky(), storage=any_store)

        first = run_next(scheduler, clock)
        second = run_next(scheduler, clock)

        assert (cs.RunStatus.PARTIAL, 1) == (first.status, first.rejected)
        assert second.error_type is None
        (entry,) = scheduler.ledger("s1")
        assert entry.reason.startswith("bad\\")
        entry.reason.encode("utf-8")

    @pytest.mark.parametrize("bad_id", ["x\udc80", "a\x00b"])
    def test_ids_no_store_can_hold_are_configuration_errors(
        self, clock: FakeClock, any_store: Storage, bad_id: str
    ) -> None:
        """A sync id with a lone surrogate is a typed error in every call, never UnicodeError."""
        scheduler = build(clock, Members(["a"]), storage=any_store)
        for call in (
            lambda: scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id=bad_id),
            lambda: scheduler.get_sync(bad_id),
            lambda: scheduler.history(bad_id),
            lambda: scheduler.next_run(bad_id),
            lambda: scheduler.sync_now(bad_id),
        ):
            with pytest.raises(ConfigurationError):
                call()


class TestClosedStores:
    """A closed store refuses work instead of carrying on."""

    def test_a_closed_memory_store_refuses_work(self) -> None:
        """MemoryStorage.close() makes the store unusable, like every other store."""
        store = MemoryStorage()
        store.close()
        with pytest.raises(StorageError):
            store.list_syncs()

    def test_run_due_after_close_is_a_typed_error(
        self, any_store: Storage, clock: FakeClock
    ) -> None:
        """run_due() after Scheduler.close() raises StorageClosedError on every store."""
        scheduler = cs.Scheduler(any_store, clock=clock)
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u"]))
        scheduler.add_destination("d", RecordingDestination())
        scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")
        scheduler.close()

        with pytest.raises(StorageClosedError, match="is closed: open a new store") as info:
            scheduler.run_due()

        assert isinstance(info.value, StorageError)
        assert repr(any_store) == info.value.store
