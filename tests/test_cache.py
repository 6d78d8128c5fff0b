"""
The in-memory copy of delivered states: used only while provably current.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cohortsync as cs
from cohortsync._cache import DeliveredCache
from cohortsync.storage import AppliedBatch, Lease
from cohortsync.testing import FakeClock, MemoryStorage, RecordingDestination
from threads import race


class CountingStorage(MemoryStorage):
    """
    Counts full reads of the delivered state.
    """

    reads: int = 0
    fail_next_apply: bool = False

    def iter_delivered(self, sync_id: str) -> Iterator[str]:
        self.reads += 1
        return super().iter_delivered(sync_id)

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        if self.fail_next_apply:
            self.fail_next_apply = False
            raise cs.exceptions.StorageError("the database went away")
        return super().apply_batch(lease, batch)


def worker(
    storage: MemoryStorage,
    clock: FakeClock,
    members: dict[str, set[str]],
    destination: RecordingDestination,
    **options: int,
) -> cs.Scheduler:
    scheduler = cs.Scheduler(storage, clock=clock, seed=0, **options)  # type: ignore[arg-type]
    scheduler.add_destination("dest", destination)
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: set(members["now"])))
    return scheduler


def run(scheduler: cs.Scheduler, clock: FakeClock) -> cs.SyncRun:
    clock.advance(timedelta(seconds=1))
    scheduler.sync_now("s")
    (result,) = scheduler.run_due()
    return result


@pytest.fixture
def setup(clock: FakeClock) -> tuple[CountingStorage, dict[str, set[str]], RecordingDestination]:
    storage = CountingStorage()
    members = {"now": {f"u{i}" for i in range(50)}}
    destination = RecordingDestination(cs.Capabilities(max_batch_size=7))
    return storage, members, destination


class TestCachedRuns:
    def test_steady_runs_do_not_reread_the_store(
        self,
        clock: FakeClock,
        setup: tuple[CountingStorage, dict[str, set[str]], RecordingDestination],
    ) -> None:
        """After the first run, runs of the same worker diff in memory."""
        storage, members, destination = setup
        scheduler = worker(storage, clock, members, destination)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s")
        for i in range(5):
            members["now"] = (members["now"] - {f"u{i}"}) | {f"n{i}"}
            run(scheduler, clock)

        assert 0 == storage.reads
        assert members["now"] == destination.audience("s")
        assert members["now"] == set(storage.iter_delivered("s"))

    def test_a_new_worker_reads_once(
        self,
        clock: FakeClock,
        setup: tuple[CountingStorage, dict[str, set[str]], RecordingDestination],
    ) -> None:
        """A worker without a copy reads the store once, then works from memory."""
        storage, members, destination = setup
        first = worker(storage, clock, members, destination)
        first.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s")
        run(first, clock)
        second = worker(storage, clock, members, destination)
        for i in range(3):
            members["now"] = members["now"] | {f"n{i}"}
            run(second, clock)

        assert 1 == storage.reads
        assert members["now"] == destination.audience("s")

    def test_another_workers_run_invalidates_the_copy(
        self,
        clock: FakeClock,
        setup: tuple[CountingStorage, dict[str, set[str]], RecordingDestination],
    ) -> None:
        """When another worker moved the state, the stale copy is not used."""
        storage, members, destination = setup
        a = worker(storage, clock, members, destination)
        b = worker(storage, clock, members, destination)
        a.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s")
        run(a, clock)
        members["now"] = members["now"] - {"u1", "u2"}
        run(b, clock)  # b reads the store (its first run): 1 read
        members["now"] = members["now"] | {"u1"}
        result = run(a, clock)  # a's copy predates b's removals: must re-read

        assert 2 == storage.reads
        assert (1, 0) == (result.added, result.removed)
        assert members["now"] == destination.audience("s")

    def test_a_failed_store_write_forgets_the_copy(
        self,
        clock: FakeClock,
        setup: tuple[CountingStorage, dict[str, set[str]], RecordingDestination],
    ) -> None:
        """If applying a batch fails, the copy is dropped and the next run reads the store."""
        storage, members, destination = setup
        scheduler = worker(storage, clock, members, destination)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s")
        run(scheduler, clock)
        members["now"] = members["now"] | {"x1", "x2"}
        storage.fail_next_apply = True
        failed = run(scheduler, clock)
        healed = run(scheduler, clock)

        assert cs.RunStatus.FAILED == failed.status
        assert 1 == storage.reads
        assert 2 == healed.added
        assert members["now"] == destination.audience("s")

    def test_disabled_cache_reads_every_run(
        self,
        clock: FakeClock,
        setup: tuple[CountingStorage, dict[str, set[str]], RecordingDestination],
    ) -> None:
        """With state_cache_keys=0 every run streams the delivered state."""
        storage, members, destination = setup
        scheduler = worker(storage, clock, members, destination, state_cache_keys=0)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s")
        for _ in range(3):
            run(scheduler, clock)

        assert 3 == storage.reads

    @settings(max_examples=40)
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 2),  # which worker runs
                st.frozensets(st.integers(0, 40), max_size=30),  # the cohort then
                st.booleans(),  # does a store write fail mid-run
            ),
            min_size=1,
            max_size=12,
        )
    )
    def test_any_interleaving_converges(
        self, steps: list[tuple[int, frozenset[int], bool]]
    ) -> None:
        """Three workers taking turns, with failing store writes, converge on the cohort."""
        clock = FakeClock()
        storage = CountingStorage()
        members: dict[str, set[str]] = {"now": set()}
        destination = RecordingDestination(cs.Capabilities(max_batch_size=4))
        workers = [worker(storage, clock, members, destination) for _ in range(3)]
        policy = cs.SyncPolicy.hourly(guard=cs.MassRemovalGuard.disabled())
        workers[0].create_sync("c", "dest", policy, sync_id="s")
        for index, cohort, fail in steps:
            members["now"] = {f"m{i}" for i in cohort}
            storage.fail_next_apply = fail
            run(workers[index], clock)
        storage.fail_next_apply = False
        run(workers[steps[-1][0]], clock)

        assert members["now"] == destination.audience("s")
        assert members["now"] == set(storage.iter_delivered("s"))


class TestLostAcknowledgements:
    def test_a_member_who_left_after_a_lost_ack_is_removed(
        self,
        clock: FakeClock,
        setup: tuple[CountingStorage, dict[str, set[str]], RecordingDestination],
    ) -> None:
        """An add the destination took but the store never recorded is undone if the member left."""
        storage, members, destination = setup
        scheduler = worker(storage, clock, members, destination)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s")
        run(scheduler, clock)
        members["now"] = members["now"] | {"ghost"}
        storage.fail_next_apply = True  # the destination has "ghost"; the store does not know
        run(scheduler, clock)
        assert "ghost" in destination.audience("s")
        members["now"] = members["now"] - {"ghost"}

        healed = run(scheduler, clock)

        assert "ghost" not in destination.audience("s")
        assert members["now"] == destination.audience("s")
        assert 1 == healed.removed
        assert [] == storage.pending_batches("s")

    def test_a_member_back_after_a_lost_removal_is_added_again(
        self,
        clock: FakeClock,
        setup: tuple[CountingStorage, dict[str, set[str]], RecordingDestination],
    ) -> None:
        """A removal the store never recorded is undone if the member came back."""
        storage, members, destination = setup
        scheduler = worker(storage, clock, members, destination)
        scheduler.create_sync("c", "dest", cs.SyncPolicy.hourly(), sync_id="s")
        run(scheduler, clock)
        members["now"] = members["now"] - {"u7"}
        storage.fail_next_apply = True
        run(scheduler, clock)
        assert "u7" not in destination.audience("s")
        members["now"] = members["now"] | {"u7"}

        healed = run(scheduler, clock)

        assert members["now"] == destination.audience("s")
        assert 1 == healed.added


class TestDeliveredCache:
    def test_take_hands_the_set_over(self) -> None:
        """take() returns the entry once, only at the same version."""
        cache = DeliveredCache(100)
        cache.put("s", "v1", {"a"})

        assert cache.take("s", "v0") is None
        cache.put("s", "v1", {"a"})
        assert {"a"} == cache.take("s", "v1")
        assert cache.take("s", "v1") is None

    def test_evicts_least_recently_stored_by_keys(self) -> None:
        """The budget counts keys; the oldest entries leave first."""
        cache = DeliveredCache(5)
        cache.put("a", "1", {"1", "2"})
        cache.put("b", "1", {"3", "4"})
        cache.put("c", "1", {"5", "6"})

        assert cache.take("a", "1") is None
        assert {"3", "4"} == cache.take("b", "1")
        assert {"5", "6"} == cache.take("c", "1")

    def test_oversized_states_are_not_kept(self) -> None:
        """A state larger than the whole budget is never cached."""
        cache = DeliveredCache(2)
        cache.put("a", "1", {"1", "2", "3"})

        assert cache.take("a", "1") is None

    def test_runs_in_threads_share_it_safely(self) -> None:
        """
        Runs in threads (an AsyncScheduler's, host threads on one Scheduler)
        take and put at once: no eviction fails and the key count stays the
        sum of what is held, which steers every later eviction.
        """
        cache = DeliveredCache(50)

        def run(thread: int) -> None:
            for i in range(3_000):
                sync_id = f"s{(thread * 7 + i) % 40}"
                cache.take(sync_id, "v")
                cache.put(sync_id, "v", {f"{sync_id}-{k}" for k in range(i % 5)})
                if i % 11 == 0:
                    cache.drop(f"s{i % 40}")

        assert [] == race(run)
        held = sum(len(keys) for _, keys in cache._entries.values())
        assert held == cache._size <= cache.max_keys
