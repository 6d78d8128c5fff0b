"""
The calls a host makes at any moment: registering, updating, pausing,
resuming, deleting and requesting a full resync, during a run or not.
"""

from __future__ import annotations

import functools
import logging
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import cohortsync as cs
from cohortsync import events as ev
from cohortsync.exceptions import (
    ConfigurationError,
    StorageClosedError,
    SyncNotFoundError,
)
from cohortsync.storage import MemoryStorage, SQLiteStorage
from cohortsync.testing import FakeClock, RecordingDestination
from single_sync import Members, build, run_next

START = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)
EMAIL = cs.IdentifierKind.EMAIL


class TestRegistration:
    """Ids register once unless replaced; adapters and stores are checked when given."""

    def test_registering_an_id_twice_is_an_error(self, clock: FakeClock) -> None:
        """The same cohort, destination or mapping id twice raises unless replace=True."""
        scheduler = build(clock, Members(["a"]))
        cohort = cs.Cohort(id="c", name="Other", source=lambda: ["x"])
        with pytest.raises(ConfigurationError, match="already registered"):
            scheduler.add_cohort(cohort)
        with pytest.raises(ConfigurationError, match="already registered"):
            scheduler.add_destination("dest", RecordingDestination())
        scheduler.add_mapping("m2", cs.IdentifierMapping.identity())
        with pytest.raises(ConfigurationError, match="already registered"):
            scheduler.add_mapping("m2", cs.IdentifierMapping.identity())
        assert cohort is scheduler.add_cohort(cohort, replace=True)
        assert "Other" == scheduler.cohort("c").name

    def test_an_async_adapter_is_refused_when_registered(self) -> None:
        """`async def add` fails at add_destination with what to do, not at run time."""

        class Async(cs.Destination):
            async def add(self, batch: cs.Batch) -> cs.DeliveryResult:  # type: ignore[override]
                return cs.DeliveryResult.ok()

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        scheduler = cs.Scheduler(MemoryStorage())
        with pytest.raises(ConfigurationError, match="async def add"):
            scheduler.add_destination("a", Async())

    @pytest.mark.parametrize("method", ["add", "remove"])
    def test_an_async_method_on_a_destination_points_to_async_destination(
        self, method: str
    ) -> None:
        """The refusal names the method and the base class to subclass instead."""

        class Sync(cs.Destination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return cs.DeliveryResult.ok()

        async def coroutine(self: object, batch: cs.Batch) -> cs.DeliveryResult:
            return cs.DeliveryResult.ok()

        async_adapter = type("Async", (Sync,), {method: coroutine})
        scheduler = cs.Scheduler(MemoryStorage())

        with pytest.raises(ConfigurationError) as info:
            scheduler.add_destination("a", async_adapter())

        message = str(info.value)
        assert f"async def {method}" in message
        assert "subclass cohortsync.AsyncDestination" in message
        assert "a" not in scheduler._destinations

    def test_a_path_is_accepted_as_storage(self, tmp_path: Path) -> None:
        """Scheduler("file.db") opens an SQLite store; other junk is refused at once."""
        with cs.Scheduler(str(tmp_path / "file.db")) as scheduler:
            assert isinstance(scheduler.storage, SQLiteStorage)
        with pytest.raises(ConfigurationError, match="storage"):
            cs.Scheduler(42)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="clock"):
            cs.Scheduler(MemoryStorage(), clock=datetime.now)  # type: ignore[arg-type]

    def test_listeners_must_be_callable(self) -> None:
        """A listener that cannot be called is refused at construction, not logged at each event."""
        with pytest.raises(ConfigurationError, match="listeners"):
            cs.Scheduler(MemoryStorage(), listeners=[print, "not callable"])  # type: ignore[list-item]

    def test_a_class_is_not_an_instance(self) -> None:
        """Scheduler(MemoryStorage) and clock=FakeClock are refused at once, saying what to pass."""
        with pytest.raises(ConfigurationError, match=r"pass an instance: MemoryStorage\(\.\.\.\)"):
            cs.Scheduler(MemoryStorage)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"pass an instance: FakeClock\(\.\.\.\)"):
            cs.Scheduler(MemoryStorage(), clock=FakeClock)  # type: ignore[arg-type]


class TestClosing:
    """A scheduler owns its store: close() and `with` close it, whoever opened it."""

    @pytest.mark.parametrize("given", ["path", "store", "nothing"])
    def test_with_closes_the_store(self, tmp_path: Path, given: str) -> None:
        """
        The end of a `with` block closes the store the scheduler opened (from a
        path, or the memory default) and the one it was given.
        """
        storage = {
            "path": tmp_path / "s.db",
            "store": SQLiteStorage(tmp_path / "s.db"),
            "nothing": None,
        }[given]

        with cs.Scheduler(storage) as scheduler:
            assert [] == scheduler.syncs()

        with pytest.raises(StorageClosedError):
            scheduler.storage.list_syncs()
        with pytest.raises(StorageClosedError):
            scheduler.run_due()

    def test_closing_twice_is_harmless(self) -> None:
        """close() after the `with` block (or twice) does nothing more."""
        with cs.Scheduler(MemoryStorage()) as scheduler:
            pass

        scheduler.close()
        scheduler.close()

    def test_the_store_closes_even_when_the_block_raises(self) -> None:
        """An error inside the block still closes the store, then propagates."""
        store = MemoryStorage()
        with pytest.raises(KeyError), cs.Scheduler(store):
            raise KeyError("boom")

        with pytest.raises(StorageClosedError):
            store.list_syncs()


class TestUnknownSyncs:
    """Every call naming an unknown sync raises SyncNotFoundError."""

    def test_history_of_an_unknown_sync_raises(self, clock: FakeClock) -> None:
        """history() of an unknown sync raises like next_run() does."""
        scheduler = build(clock, Members(["a"]))
        with pytest.raises(SyncNotFoundError):
            scheduler.history("nope")
        with pytest.raises(SyncNotFoundError):
            scheduler.ledger("nope")


class TestUpdates:
    """update_sync changes what it is given and keeps the rest."""

    def test_update_can_switch_back_to_the_identity_mapping(self, clock: FakeClock) -> None:
        """mapping_id=None means the identity mapping; leaving it out keeps the current one."""
        emails = {"a": "a@example.com"}
        scheduler = build(
            clock, Members(["a"]), mapping=cs.IdentifierMapping([(EMAIL, emails.get)])
        )
        kept = scheduler.update_sync("s1", cs.SyncPolicy.hourly(rejection_attempts=4))
        identity = scheduler.update_sync("s1", mapping_id=None)
        assert ("m", None) == (kept.mapping_id, identity.mapping_id)


class TestFlagsDuringARun:
    """Flags a host sets during a run are never lost, whatever run it is (12.13)."""

    @pytest.mark.parametrize("first_run", [True, False])
    def test_full_resync_requested_during_a_run(self, clock: FakeClock, first_run: bool) -> None:
        """request_full_resync during the first (or a later) run: the next run is full."""
        holder: dict[str, cs.Scheduler] = {}

        class Asks(RecordingDestination):
            ask = first_run

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                if self.ask:
                    self.ask = False
                    holder["s"].request_full_resync("s1")
                return super().add(batch)

        source = Members(["a", "b"])
        dest = Asks()
        scheduler = build(clock, source, destination=dest)
        holder["s"] = scheduler
        run_next(scheduler, clock)
        if not first_run:
            dest.ask = True
            source.keys = ["a", "b", "c"]
            run_next(scheduler, clock)

        following = run_next(scheduler, clock)

        assert following.full_sync
        assert "full_resync" in following.notes


class TestDeletedSyncs:
    """A deleted sync stays deleted: no host call brings it back (outsider finding)."""

    @pytest.mark.parametrize("make_storage", [MemoryStorage, "sqlite"])
    def test_no_host_call_revives_a_deleted_sync(
        self, tmp_path: Path, make_storage: object
    ) -> None:
        """pause, resume, sync_now, full resync and confirm are refused; it never runs again."""
        clock = FakeClock(START)
        storage = SQLiteStorage(tmp_path / "s.db") if make_storage == "sqlite" else MemoryStorage()
        destination = RecordingDestination()
        scheduler = build(clock, Members(["u1"]), destination=destination, storage=storage)
        scheduler.run_due()
        scheduler.delete_sync("s1")
        calls = (
            scheduler.pause_sync,
            scheduler.resume_sync,
            scheduler.sync_now,
            scheduler.request_full_resync,
            scheduler.confirm_removals,
        )
        for call in calls:
            with pytest.raises(ConfigurationError, match="deleted"):
                call("s1")
        clock.advance(timedelta(days=2))
        assert [] == scheduler.run_due()
        assert cs.SyncStatus.DELETED == scheduler.get_sync("s1").status
        assert [("s1", cs.SyncStatus.DELETED)] == [(s.id, s.status) for s in scheduler.syncs()]
        assert 1 == len(scheduler.history("s1"))


class TestPausedSyncs:
    """A paused sync stays visibly paused, deletions included, until resumed."""

    def test_pausing_a_deletion_keeps_it_visible_and_resume_finishes_it(self) -> None:
        """A paused deletion says so and waits; resume finishes the teardown."""
        clock = FakeClock(START)
        destination = RecordingDestination()
        policy = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)
        scheduler = build(clock, Members(["u1", "u2"]), destination=destination, policy=policy)
        scheduler.run_due()
        scheduler.delete_sync("s1")

        paused = scheduler.pause_sync("s1")
        clock.advance(timedelta(days=2))
        assert [] == scheduler.run_due()
        assert "deleting" in (paused.status_reason or "")
        assert {"u1", "u2"} == destination.audience("s1")

        scheduler.resume_sync("s1")
        (teardown,) = scheduler.run_due()
        assert cs.Trigger.TEARDOWN == teardown.trigger
        assert set() == destination.audience("s1")
        assert cs.SyncStatus.DELETED == scheduler.get_sync("s1").status

    def test_sync_now_on_a_paused_sync_is_refused(self) -> None:
        """sync_now on a paused sync raises and names resume_sync (it did nothing)."""
        clock = FakeClock(START)
        scheduler = build(clock, Members(["u1"]), destination=RecordingDestination())
        scheduler.pause_sync("s1")

        with pytest.raises(ConfigurationError, match="resume_sync"):
            scheduler.sync_now("s1")

    def test_a_full_resync_requested_while_paused_happens_after_resume(self) -> None:
        """A full resync requested while paused is the first run after resume."""
        clock = FakeClock(START)
        destination = RecordingDestination()
        scheduler = build(clock, Members(["u1"]), destination=destination)
        scheduler.run_due()
        scheduler.pause_sync("s1")

        scheduler.request_full_resync("s1")
        scheduler.resume_sync("s1")
        (run,) = scheduler.run_due()

        assert run.full_sync
        assert 2 == len(destination.batches)  # u1 sent again

    def test_deleting_again_keeps_a_parked_teardown_parked(self) -> None:
        """Deleting a paused deletion again does not start the teardown behind the pause."""
        clock = FakeClock(START)
        destination = RecordingDestination()
        policy = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)
        scheduler = build(clock, Members(["u1"]), destination=destination, policy=policy)
        scheduler.run_due()
        scheduler.delete_sync("s1")
        scheduler.pause_sync("s1")

        again = scheduler.delete_sync("s1")
        clock.advance(timedelta(hours=3))

        assert cs.SyncStatus.PAUSED == again.status
        assert [] == scheduler.run_due()
        assert {"u1"} == destination.audience("s1")


class TestBadInputToHostCalls:
    """Wrong types get a typed error before anything changes (outsider findings)."""

    def test_sync_now_full_must_be_a_bool(self) -> None:
        """full='no' is refused, not taken as a request for a full resync."""
        clock = FakeClock(START)
        scheduler = build(clock, Members(["u1"]))
        scheduler.run_due()
        with pytest.raises(ConfigurationError, match="full"):
            scheduler.sync_now("s1", full="no")  # type: ignore[arg-type]
        assert not scheduler.storage.get_sync("s1").full_resync

    @pytest.mark.parametrize(
        ("field", "call"),
        [
            ("prune", lambda s: s.apply_syncs([], prefix="s", prune="false")),
            ("dry_run", lambda s: s.apply_syncs([], prefix="s", prune=True, dry_run="false")),
            (
                "upsert",
                lambda s: s.create_syncs(
                    [cs.SyncSpec("c", "dest", cs.SyncPolicy.daily(), sync_id="s1")], upsert="no"
                ),
            ),
            ("members", lambda s: s.export_history("s1", members="no")),
            ("replace", lambda s: s.add_cohort(cs.Cohort(id="c", name="C2"), replace="yes")),
            ("replace", lambda s: s.add_destination("dest", RecordingDestination(), replace=1)),
        ],
        ids=["prune", "dry_run", "upsert", "members", "replace-cohort", "replace-destination"],
    )
    def test_flags_must_be_bools(self, field: str, call: Any) -> None:
        """
        A string flag is refused before anything changes: prune="false" pruned
        (deleted s1), dry_run="false" did a dry run, upsert="no" overwrote s1's
        policy, members="no" exported member rows (outsider findings).
        """
        clock = FakeClock(START)
        scheduler = build(clock, Members(["u1"]))
        scheduler.run_due()
        before = scheduler.storage.get_sync("s1")
        cohort = scheduler.cohort("c")

        with pytest.raises(ConfigurationError, match=field):
            call(scheduler)

        assert before == scheduler.storage.get_sync("s1")
        assert [before.sync.id] == [r.sync.id for r in scheduler.storage.list_syncs()]
        assert cohort is scheduler.cohort("c")

    def test_the_same_flags_are_refused_by_the_async_scheduler(self) -> None:
        """Its awaitable twins run the same checks: upsert="no" changes nothing."""
        import asyncio

        async def main() -> None:
            async with cs.AsyncScheduler(MemoryStorage(), clock=FakeClock(START)) as scheduler:
                scheduler.add_destination("dest", RecordingDestination())
                scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1"]))
                await scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s1")
                spec = cs.SyncSpec("c", "dest", cs.SyncPolicy.daily(), sync_id="s1")
                with pytest.raises(ConfigurationError, match="upsert"):
                    await scheduler.create_syncs([spec], upsert="no")  # type: ignore[arg-type]
                with pytest.raises(ConfigurationError, match="prune"):
                    await scheduler.apply_syncs([spec], prefix="s", prune="false")  # type: ignore[arg-type]
                assert cs.Cadence.HOURLY == (await scheduler.get_sync("s1")).policy.cadence

        asyncio.run(main())

    @pytest.mark.parametrize("size", [-1, True, 2.5, "3"])
    def test_preview_sample_size_must_be_a_count(self, size: object) -> None:
        clock = FakeClock(START)
        scheduler = build(clock, Members(["u1"]))
        with pytest.raises(ConfigurationError, match="sample_size"):
            scheduler.preview("s1", sample_size=size)  # type: ignore[arg-type]
        assert 1 == len(scheduler.preview("s1", sample_size=0).sample_adds) + 1

    def test_pause_reason_must_be_a_str(self) -> None:
        """reason=5 was stored as '5'; now it is refused and the sync stays active."""
        clock = FakeClock(START)
        scheduler = build(clock, Members(["u1"]))
        with pytest.raises(ConfigurationError, match="reason"):
            scheduler.pause_sync("s1", reason=5)  # type: ignore[arg-type]
        assert cs.SyncStatus.ACTIVE == scheduler.get_sync("s1").status
        assert "maintenance" == scheduler.pause_sync("s1", reason="maintenance").status_reason

    @pytest.mark.parametrize(
        ("field", "options"),
        [
            ("seed", {"seed": "x"}),
            ("seed", {"seed": True}),
            ("owner", {"owner": 5}),
            # An empty name fell back to the default owner unseen; a NUL made
            # every claim fail on PostgreSQL, at run time.
            ("owner", {"owner": ""}),
            ("owner", {"owner": "   "}),
            ("owner", {"owner": "worker\x00one"}),
            ("owner", {"owner": "w" * 201}),
        ],
    )
    def test_scheduler_seed_and_owner_are_typed(self, field: str, options: dict[str, Any]) -> None:
        with pytest.raises(ConfigurationError, match=field):
            cs.Scheduler(MemoryStorage(), **options)
        with pytest.raises(ConfigurationError, match=field):
            cs.AsyncScheduler(MemoryStorage(), **options)

    def test_an_owner_names_the_leases(self) -> None:
        """A valid owner is kept as given, and the default is used only without one."""
        assert "worker one:7" == cs.Scheduler(MemoryStorage(), owner="worker one:7").owner
        assert cs.Scheduler(MemoryStorage()).owner

    def test_an_async_listener_is_refused(self) -> None:
        """
        An async def listener was accepted and never ran (a coroutine nobody
        awaited): it is refused wherever a listener is given (outsider finding).
        """

        async def on_event(event: ev.Event) -> None:
            raise AssertionError("never called")

        class AsyncCallable:
            async def __call__(self, event: ev.Event) -> None:
                raise AssertionError("never called")

        async def streaming(event: ev.Event) -> Any:
            yield event

        scheduler = cs.Scheduler(MemoryStorage(), clock=FakeClock(START))
        # The second outsider's shapes too: an async generator function, and
        # a partial of an object whose __call__ is async (or of a partial).
        for listener in (
            on_event,
            AsyncCallable(),
            streaming,
            functools.partial(AsyncCallable()),
            functools.partial(functools.partial(on_event)),
        ):
            with pytest.raises(ConfigurationError, match="async def listener would never run"):
                scheduler.add_listener(listener)  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError, match="listener"):
                scheduler.add_listener(listener, events=(ev.RunFinished,))  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError, match="listeners"):
                cs.Scheduler(MemoryStorage(), listeners=[listener])  # type: ignore[list-item]
            with pytest.raises(ConfigurationError, match="listener"):
                ev.subscribe(listener, (ev.RunFinished,))  # type: ignore[arg-type]
        scheduler.add_listener(lambda event: None)  # a plain callable is still fine

    def test_the_guard_refuses_a_non_bool_source_empty(self) -> None:
        """trips(source_empty="false") tripped the guard; it is refused now."""
        guard = cs.MassRemovalGuard()
        with pytest.raises(ConfigurationError, match="source_empty"):
            guard.trips(100, 1, source_empty="false")  # type: ignore[arg-type]
        assert not guard.trips(100, 1, source_empty=False)

    def test_run_forever_stop_must_be_an_event(self) -> None:
        """A stop that is not an event is refused at the call, sync and async alike."""
        import asyncio

        clock = FakeClock(START)
        scheduler = build(clock, Members(["u1"]))
        with pytest.raises(ConfigurationError, match="stop"):
            scheduler.run_forever("x")  # type: ignore[arg-type]

        class OnlyIsSet:
            def is_set(self) -> bool:
                return False

        # A threading.Event would block the event loop in its wait().
        for stop in ("x", threading.Event(), OnlyIsSet()):

            async def main(stop: object = stop) -> None:
                async with cs.AsyncScheduler(MemoryStorage(), clock=clock) as asynchronous:
                    await asynchronous.run_forever(stop)  # type: ignore[arg-type]

            with pytest.raises(ConfigurationError, match=r"asyncio\.Event"):
                asyncio.run(main())


class TestLostLeaseLog:
    """The WARNING of a run that lost its lease names that run (outsider finding)."""

    def test_the_warning_names_the_run(self, caplog: pytest.LogCaptureFixture) -> None:
        """A worker whose request outlasts its lease logs its own run id, not None."""
        clock = FakeClock(START)
        storage = MemoryStorage()
        lease_for = timedelta(minutes=5)
        runs: list[str] = []

        class Stalling(RecordingDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                runs.append(batch.context.run_id)
                if len(runs) == 1:  # the lease is gone and another worker takes the slot
                    clock.advance(lease_for + timedelta(minutes=1))
                    other.run_due()
                return super().add(batch)

        first = build(clock, Members(["u1"]), destination=Stalling(), storage=storage,
                      lease_for=lease_for, owner="first")  # fmt: skip
        other = cs.Scheduler(storage, clock=clock, owner="other", lease_for=lease_for)
        other.add_destination("dest", RecordingDestination())
        other.add_cohort(cs.Cohort(id="c", name="C", source=Members(["u1"])))
        with caplog.at_level(logging.WARNING, logger="cohortsync"):
            first.run_due()
        (lost,) = [r for r in caplog.records if "lost the lease" in r.getMessage()]
        assert runs[0] == lost.run_id  # type: ignore[attr-defined]
        assert "dest" == lost.destination_id  # type: ignore[attr-defined]
        assert f" run {runs[0]} " in lost.getMessage()
