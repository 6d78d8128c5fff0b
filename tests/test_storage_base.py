"""
The storage protocol's parts and :class:`cohortsync.storage.StorageBase`, which
derives the optional queries from the required parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohortsync._destination import Identifier, IdentifierKind, Member, Operation
from cohortsync._sync import SyncStatus
from cohortsync.exceptions import ConfigurationError, StorageError
from cohortsync.storage import (
    AppliedBatch,
    DeliveryStore,
    HistoryStore,
    MemoryStorage,
    OptionalQueries,
    ScheduleStore,
    Storage,
    StorageBase,
)
from host_project.storage import AuditedStorage, DictStorage
from records import OPTIONAL_QUERIES, T0, sync_record

LEASE = timedelta(minutes=10)


class TestParts:
    """
    Storage is the composition of three required parts and the optional queries.
    """

    @pytest.mark.parametrize(
        "part", [ScheduleStore, DeliveryStore, HistoryStore, OptionalQueries, Storage]
    )
    def test_shipped_and_host_stores_have_every_part(self, part: type) -> None:
        """A shipped store, a structural host store and a StorageBase one all match each part."""
        stores = [MemoryStorage(), AuditedStorage(MemoryStorage(), tenant="t"), DictStorage()]

        assert [True, True, True] == [isinstance(store, part) for store in stores]

    def test_optional_queries_are_the_only_non_abstract_methods(self) -> None:
        """StorageBase implements exactly the optional queries; the rest stays abstract."""
        assert set(OPTIONAL_QUERIES) == {
            name
            for name in vars(OptionalQueries)
            if not name.startswith("_") and callable(getattr(OptionalQueries, name))
        }
        assert set(OPTIONAL_QUERIES).isdisjoint(StorageBase.__abstractmethods__)
        assert {"create_sync", "iter_delivered", "history", "close"} <= set(
            StorageBase.__abstractmethods__
        )

    def test_a_store_missing_a_required_method_cannot_be_built(self) -> None:
        """Leaving out a required method is a TypeError naming it, at construction."""
        methods = {
            name: getattr(DictStorage, name)
            for name in StorageBase.__abstractmethods__
            if name != "apply_batch"
        }
        incomplete = type(
            "Incomplete", (StorageBase,), {**methods, "__init__": DictStorage.__init__}
        )

        with pytest.raises(TypeError, match="apply_batch"):
            incomplete()

    def test_a_store_is_a_context_manager_that_closes_it(self) -> None:
        """Leaving the with block closes the store."""
        with DictStorage() as store:
            store.create_sync(sync_record("s1"))

        with pytest.raises(StorageError):
            store.list_syncs()


# -- the derived queries answer like the native ones -------------------------------------


@pytest.fixture
def memory() -> Iterator[MemoryStorage]:
    with MemoryStorage() as store:
        yield store


def derived(store: StorageBase, name: str) -> object:
    """
    StorageBase's derivation of the query *name*, bound to *store*.
    """
    return getattr(StorageBase, name).__get__(store)


_KEYS = st.sampled_from([f"m{i}" for i in range(8)])
_IDENTIFIERS = st.sampled_from(
    [
        *(Identifier(IdentifierKind.EMAIL, f"e{i}@x") for i in range(3)),
        *(Identifier(IdentifierKind.USER_ID, f"m{i}") for i in range(3)),
    ]
)
_BATCHES = st.lists(
    st.tuples(
        st.lists(st.tuples(_KEYS, _IDENTIFIERS | st.none()), max_size=5),
        st.lists(_KEYS, max_size=3),
    ),
    max_size=6,
)


class TestDerivedQueries:
    """
    Each query StorageBase derives answers exactly what the reference store's own does.
    """

    @given(batches=_BATCHES, asked=st.lists(_IDENTIFIERS, max_size=6), keys=st.lists(_KEYS))
    def test_delivery_queries(
        self,
        batches: list[tuple[list[tuple[str, Identifier | None]], list[str]]],
        asked: list[Identifier],
        keys: list[str],
    ) -> None:
        """Delivered counts, lookups and identifier holders (shared identifiers included)."""
        with MemoryStorage() as store:
            store.create_sync(sync_record("s1"))
            (lease,) = store.claim_due(T0, "w", LEASE, 1)
            for i, (added, removed) in enumerate(batches):
                store.apply_batch(
                    lease,
                    AppliedBatch(
                        run_id="r",
                        sequence=i,
                        operation=Operation.ADD,
                        idempotency_key=f"k{i}",
                        added=tuple(
                            Member(k, ident or Identifier(IdentifierKind.USER_ID, k))
                            for k, ident in added
                        ),
                        removed=tuple(removed),
                        at=T0,
                    ),
                )
            queries = [
                ("count_delivered", ("s1",)),
                ("filter_delivered", ("s1", keys)),
                ("identifier_holders", ("s1", asked)),
            ]

            for name, args in queries:
                native = getattr(store, name)(*args)
                assert native == derived(store, name)(*args), name  # type: ignore[operator]

    @given(
        syncs=st.lists(
            st.tuples(
                st.sampled_from(SyncStatus),
                st.none() | st.integers(-90, 90),
                st.none() | st.integers(0, 59),
                st.none() | st.integers(-90, 90),
                st.booleans(),
            ),
            max_size=8,
        ),
        now=st.integers(-90, 90),
        preferred=st.integers(0, 59),
    )
    def test_schedule_queries(
        self,
        syncs: list[tuple[SyncStatus, int | None, int | None, int | None, bool]],
        now: int,
        preferred: int,
    ) -> None:
        """The next claimable instant, rescheduling after a clock jump and the least loaded slot."""
        minute = timedelta(minutes=1)
        with MemoryStorage() as store:
            for i, (status, due, bucket, scheduled_from, claimed) in enumerate(syncs):
                record = sync_record(
                    f"s{i}",
                    next_due=None if due is None else T0 + due * minute,
                    slot_bucket=bucket,
                    scheduled_from=None if scheduled_from is None else T0 + scheduled_from * minute,
                )
                store.create_sync(
                    attrs.evolve(record, sync=attrs.evolve(record.sync, status=status))
                )
                if claimed and due is not None and status is SyncStatus.ACTIVE:
                    store.claim_due(T0 + due * minute, "w", LEASE, 1)
            at = T0 + now * minute
            queries = [
                ("next_due", ()),
                ("scheduled_after", (at,)),
                ("least_loaded_slot", (3600, 60, preferred)),
            ]

            for name, args in queries:
                native = getattr(store, name)(*args)
                answer = derived(store, name)(*args)  # type: ignore[operator]
                if name == "scheduled_after":
                    native, answer = sorted(r.id for r in native), sorted(r.id for r in answer)
                assert native == answer, name

    def test_derived_slot_pick_refuses_no_buckets(self, memory: MemoryStorage) -> None:
        """Zero buckets is a ConfigurationError, as from every store."""
        with pytest.raises(ConfigurationError, match="buckets"):
            derived(memory, "least_loaded_slot")(3600, 0, 0)  # type: ignore[operator]

    def test_derived_rescheduling_refuses_naive_datetimes(self, memory: MemoryStorage) -> None:
        """A naive now is a TypeError even with nothing stored."""
        with pytest.raises(TypeError):
            derived(memory, "scheduled_after")(datetime(2030, 1, 1))  # type: ignore[operator]  # noqa: DTZ001 - the point
