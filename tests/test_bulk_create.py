"""
Scheduler.create_syncs: many syncs per transaction, the spread of one-by-one
creates, every refused spec reported and nothing of it written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import datetime, time, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cohortsync as cs
from cohortsync.exceptions import (
    BulkSyncError,
    CohortNotFoundError,
    ConfigurationError,
    DestinationNotFoundError,
    IneligibleSyncError,
)
from cohortsync.storage import MemoryStorage, SQLiteStorage, Storage
from cohortsync.testing import FakeClock
from host_project.storage import AuditedStorage

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


class Noop(cs.Destination):
    capabilities = cs.Capabilities(supports_realtime=True)

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return cs.DeliveryResult.ok()


class BatchOnly(Noop):
    capabilities = cs.Capabilities(supports_realtime=False)


def _scheduler(storage: Storage) -> cs.Scheduler:
    scheduler = cs.Scheduler(storage, clock=FakeClock(T0), seed=0)
    scheduler.add_destination("noop", Noop())
    scheduler.add_destination("batch-only", BatchOnly())
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ()))
    scheduler.add_cohort(cs.Cohort(id="d", name="D", source=lambda: ()))
    return scheduler


@pytest.fixture(params=["memory", "sqlite", "plain"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Storage]]:
    """Memory, SQLite, and a store on the plain protocol (no bulk part: the fallback)."""
    opened: list[Storage] = []

    def make() -> Storage:
        store: Storage
        if request.param == "memory":
            store = MemoryStorage()
        elif request.param == "sqlite":
            store = SQLiteStorage(os.fspath(tmp_path / f"s{len(opened)}.db"))
        else:
            store = AuditedStorage(MemoryStorage(), tenant="t")  # type: ignore[assignment]
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def _buckets(storage: Storage) -> dict[str, tuple[int, int | None]]:
    return {r.id: (r.offset, r.slot_bucket) for r in storage.list_syncs()}


class TestCreateSyncs:
    def test_creates_like_create_sync(self, make_store: Callable[[], Storage]) -> None:
        """Bulk and one-by-one creates give the same records, slots included."""
        policies = [cs.SyncPolicy.daily(), cs.SyncPolicy.hourly(), cs.SyncPolicy.one_time()]
        specs = [cs.SyncSpec("c", "noop", policies[i % 3], sync_id=f"s{i}") for i in range(200)]
        bulk, single = _scheduler(make_store()), _scheduler(make_store())

        result = bulk.create_syncs(iter(specs), chunk=64)
        for spec in specs:
            single.create_sync(
                spec.cohort_id, spec.destination_id, spec.policy, sync_id=spec.sync_id
            )

        assert tuple(s.sync_id for s in specs) == result.created
        assert () == result.updated
        assert _buckets(single.storage) == _buckets(bulk.storage)
        assert [r.next_due for r in single.storage.list_syncs()] == [
            r.next_due for r in bulk.storage.list_syncs()
        ]

    def test_the_new_schedules_like_create_sync(self, make_store: Callable[[], Storage]) -> None:
        """
        Chosen times, intervals, weeks, cron and first_run="next_slot" are placed
        and scheduled as create_sync does (issue 17 met issue 19 in one merge:
        the bulk path used to make every first run due now and move chosen times).
        """
        policies = [
            cs.SyncPolicy.daily(first_run="next_slot"),
            cs.SyncPolicy.daily("America/New_York", at=time(6, 0)),
            cs.SyncPolicy.every(timedelta(minutes=15)),
            cs.SyncPolicy.weekly("mon", at=time(9, 30), first_run="next_slot"),
            cs.SyncPolicy.cron("0 6 * * 1-5", timezone="Europe/Berlin"),
            cs.SyncPolicy.realtime(first_run="next_slot"),
            cs.SyncPolicy.hourly(first_run="next_slot"),
        ]
        specs = [
            cs.SyncSpec("c", "noop", policies[i % len(policies)], sync_id=f"s{i:03d}")
            for i in range(140)
        ]
        bulk, single = _scheduler(make_store()), _scheduler(make_store())

        bulk.create_syncs(specs, chunk=50)
        for spec in specs:
            single.create_sync("c", "noop", spec.policy, sync_id=spec.sync_id)

        def schedule(store: Storage) -> list[tuple[object, ...]]:
            return [
                (r.id, r.offset, r.slot_bucket, r.next_due, r.next_trigger)
                for r in store.list_syncs()
            ]

        assert schedule(single.storage) == schedule(bulk.storage)
        chosen = [r for r in bulk.storage.list_syncs() if r.sync.policy.at == time(6, 0)]
        assert {6 * 3600} == {r.offset for r in chosen}  # a chosen time is never moved
        waiting = [r for r in bulk.storage.list_syncs() if r.sync.policy.first_run.value != "now"]
        # The first slot, which is now only if now is a slot (T0 is a minute boundary).
        firsts = [r.next_due for r in waiting if r.sync.policy.cadence is not cs.Cadence.REALTIME]
        assert all(due is not None and due > T0 for due in firsts)

    def test_made_up_ids(self, make_store: Callable[[], Storage]) -> None:
        """Specs without an id get one each, returned in input order."""
        scheduler = _scheduler(make_store())

        result = scheduler.create_syncs([cs.SyncSpec("c", "noop", cs.SyncPolicy.daily())] * 3)

        assert 3 == len(set(result.created))
        assert sorted(result.created) == [r.id for r in scheduler.storage.list_syncs()]

    def test_every_refusal_reported_nothing_lost(self, make_store: Callable[[], Storage]) -> None:
        """Each bad spec gets its typed error; every good one, even in its chunk, is created."""
        scheduler = _scheduler(make_store())
        scheduler.create_sync("c", "noop", cs.SyncPolicy.hourly(), sync_id="exists")
        daily = cs.SyncPolicy.daily()
        specs: list[object] = [
            cs.SyncSpec("c", "noop", daily, sync_id="ok-1"),
            cs.SyncSpec("c", "noop", daily, sync_id="ok-1"),
            cs.SyncSpec("nope", "noop", daily, sync_id="bad-cohort"),
            cs.SyncSpec("c", "nowhere", daily, sync_id="bad-destination"),
            cs.SyncSpec("c", "batch-only", cs.SyncPolicy.realtime(), sync_id="ineligible"),
            cs.SyncSpec("c", "noop", daily, sync_id="exists"),
            cs.SyncSpec("c", "noop", daily, sync_id=" "),
            "not a spec",
            cs.SyncSpec("c", "noop", daily, sync_id="ok-2"),
        ]

        with pytest.raises(BulkSyncError) as caught:
            scheduler.create_syncs(specs, chunk=4)  # type: ignore[arg-type]

        failures = caught.value.failures
        assert [1, 2, 3, 4, 5, 6, 7] == [f.position for f in failures]
        assert [
            ConfigurationError,
            CohortNotFoundError,
            DestinationNotFoundError,
            IneligibleSyncError,
            ConfigurationError,
            ConfigurationError,
            ConfigurationError,
        ] == [type(f.error) for f in failures]
        assert "first at index 0" in str(failures[0].error)
        assert ("ok-1", "ok-2") == caught.value.created
        assert ["exists", "ok-1", "ok-2"] == [r.id for r in scheduler.storage.list_syncs()]
        assert 1 == scheduler.get_sync("exists").generation

    def test_upsert_updates_like_update_sync(self, make_store: Callable[[], Storage]) -> None:
        """An existing id is updated: a new generation, a new slot, a run due now."""
        scheduler = _scheduler(make_store())
        scheduler.create_sync("c", "noop", cs.SyncPolicy.hourly(), sync_id="a")
        scheduler.create_sync("d", "noop", cs.SyncPolicy.hourly(), sync_id="b")
        before = scheduler.storage.get_sync("a")

        with pytest.raises(BulkSyncError) as caught:
            scheduler.create_syncs(
                [
                    cs.SyncSpec("c", "noop", cs.SyncPolicy.daily(), sync_id="a"),
                    cs.SyncSpec("c", "noop", cs.SyncPolicy.daily(), sync_id="b"),
                    cs.SyncSpec("c", "noop", cs.SyncPolicy.daily(), sync_id="new"),
                ],
                upsert=True,
            )

        assert ("new",) == caught.value.created
        assert ("a",) == caught.value.updated
        assert [(1, "b")] == [(f.position, f.sync_id) for f in caught.value.failures]
        after = scheduler.storage.get_sync("a")
        assert (2, cs.Cadence.DAILY) == (after.sync.generation, after.sync.policy.cadence)
        assert before.slot_bucket is not None
        assert after.slot_bucket is not None
        assert T0 == after.next_due
        assert cs.Cadence.HOURLY == scheduler.get_sync("b").policy.cadence

    def test_upserting_the_same_specs_changes_nothing(
        self, make_store: Callable[[], Storage]
    ) -> None:
        """
        Re-applying a deployment's specs keeps every slot, generation and next
        run (an outside test found each re-apply re-slotting every sync and
        making all of them due at once).
        """
        scheduler = _scheduler(make_store())
        specs = [
            cs.SyncSpec("c", "noop", cs.SyncPolicy.daily(), sync_id=f"s{i}") for i in range(30)
        ]
        scheduler.create_syncs(specs)
        scheduler.run_due()
        before = {
            r.id: (r.offset, r.sync.generation, r.next_due) for r in scheduler.storage.list_syncs()
        }
        changed = [*specs[:29], cs.SyncSpec("c", "noop", cs.SyncPolicy.hourly(), sync_id="s29")]

        result = scheduler.create_syncs(changed, upsert=True)

        assert tuple(f"s{i}" for i in range(29)) == result.unchanged
        assert ("s29",) == result.updated
        after = {
            r.id: (r.offset, r.sync.generation, r.next_due) for r in scheduler.storage.list_syncs()
        }
        assert {k: v for k, v in before.items() if k != "s29"} == {
            k: v for k, v in after.items() if k != "s29"
        }
        assert 2 == after["s29"][1]

    def test_a_deleted_id_is_refused_with_why(self, make_store: Callable[[], Storage]) -> None:
        """Ids of deleted syncs are not reused; the refusal says so (upsert or not)."""
        scheduler = _scheduler(make_store())
        scheduler.create_sync("c", "noop", cs.SyncPolicy.daily(), sync_id="gone")
        scheduler.delete_sync("gone")
        scheduler.run_due()

        for upsert in (False, True):
            with pytest.raises(BulkSyncError) as caught:
                scheduler.create_syncs(
                    [cs.SyncSpec("c", "noop", cs.SyncPolicy.daily(), sync_id="gone")],
                    upsert=upsert,
                )
            assert "deleted sync: ids are never reused" in str(caught.value.failures[0].error)

    def test_bad_chunk(self) -> None:
        """chunk must be a positive int."""
        with pytest.raises(ConfigurationError):
            _scheduler(MemoryStorage()).create_syncs([], chunk=0)


class TestNoFirstSlot:
    """
    first_run="next_slot" when no slot is left (the end of time) is a typed
    refusal of that sync alone (outsider finding: a bare ValueError lost the batch).
    """

    def test_one_call_and_bulk(self, make_store: Callable[[], Storage]) -> None:
        """create_sync and update_sync raise ConfigurationError; create_syncs writes the others."""
        scheduler = _scheduler(make_store())
        clock = scheduler.clock
        assert isinstance(clock, FakeClock)
        clock.set(datetime(9999, 12, 31, 22, 30, tzinfo=timezone.utc))
        late = cs.SyncPolicy.daily(first_run="next_slot")
        with pytest.raises(ConfigurationError, match="no first slot"):
            scheduler.create_sync("c", "noop", late, sync_id="alone")
        specs = [
            cs.SyncSpec("c", "noop", cs.SyncPolicy.hourly(), sync_id="ok1"),
            cs.SyncSpec("c", "noop", late, sync_id="bad"),
            cs.SyncSpec("c", "noop", cs.SyncPolicy.hourly(), sync_id="ok2"),
        ]
        with pytest.raises(BulkSyncError) as raised:
            scheduler.create_syncs(specs)
        assert [(1, "bad")] == [(f.position, f.sync_id) for f in raised.value.failures]
        assert isinstance(raised.value.failures[0].error, ConfigurationError)
        assert ["ok1", "ok2"] == [s.id for s in scheduler.syncs()]
        with pytest.raises(ConfigurationError, match="no first slot"):
            scheduler.update_sync("ok1", late)
        assert 1 == scheduler.get_sync("ok1").generation


class TestSpread:
    def test_a_declaration_that_overlaps_what_exists_picks_no_slot_for_it(
        self, make_store: Callable[[], Storage]
    ) -> None:
        """
        A replica declares syncs another replica has partly created: the
        ones that exist take no pick, so the new ones fill the least loaded
        buckets and the hour stays within one sync per bucket. When every
        declared spec took a pick, this chunk of 70 existing and 60 new
        ended 2 apart (an outside test found 3 with four replicas).
        """
        scheduler = _scheduler(make_store())
        hourly = cs.SyncPolicy.hourly()

        def specs(first: int, last: int) -> list[cs.SyncSpec]:
            return [
                cs.SyncSpec("c", "noop", hourly, sync_id=f"s{i:04}") for i in range(first, last)
            ]

        scheduler.apply_syncs(specs(0, 70), prefix="s")
        scheduler.apply_syncs(specs(0, 130), prefix="s", chunk=130)

        counts = [0] * 60
        for record in scheduler.storage.list_syncs():
            assert record.slot_bucket is not None
            counts[record.slot_bucket] += 1
        assert 130 == sum(counts)
        assert max(counts) - min(counts) <= 1, counts

    @settings(max_examples=25, deadline=None)
    @given(
        n=st.integers(1, 400),
        chunk=st.integers(1, 500),
        hourly=st.lists(st.booleans(), min_size=1, max_size=7),
        existing=st.integers(0, 90),
    )
    def test_bulk_counts_equal_one_by_one(
        self, n: int, chunk: int, hourly: list[bool], existing: int
    ) -> None:
        """Whatever the chunking, bulk creation picks the buckets one-by-one creates pick."""
        bulk, single = _scheduler(MemoryStorage()), _scheduler(MemoryStorage())
        policies = [cs.SyncPolicy.hourly() if h else cs.SyncPolicy.daily() for h in hourly]
        for scheduler in (bulk, single):
            for i in range(existing):
                scheduler.create_sync("c", "noop", policies[i % len(policies)], sync_id=f"e{i}")
        specs = [
            cs.SyncSpec("c", "noop", policies[i % len(policies)], sync_id=f"s{i}") for i in range(n)
        ]

        bulk.create_syncs(specs, chunk=chunk)
        for spec in specs:
            single.create_sync("c", "noop", spec.policy, sync_id=spec.sync_id)

        assert _buckets(single.storage) == _buckets(bulk.storage)
        records = bulk.storage.list_syncs()
        for cadence, period, buckets in (
            (cs.Cadence.HOURLY, 3600, 60),
            (cs.Cadence.DAILY, 86_400, 1440),
        ):
            expected = [0] * buckets
            for r in records:
                if r.sync.policy.cadence is cadence and r.slot_bucket is not None:
                    expected[r.slot_bucket] += 1
            counts = bulk.storage.slot_counts(period, buckets)
            assert expected == counts
            assert max(counts) - min(counts) <= 1
