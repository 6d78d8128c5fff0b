"""
The storage contract suite: :func:`check_storage` verifies any :class:`~cohortsync.storage.Storage`.

A host that writes its own store calls ``check_storage(make_storage)`` from its
own tests; cohortsync runs the same checks on ``MemoryStorage``,
``SQLiteStorage`` and ``PostgresStorage``. The suite imports no test framework:
a failed check raises :class:`AssertionError` naming the check and what
differed, so it works under pytest, unittest or a plain script.

The returned :class:`StorageReport` says which parts the store implements:
the three required ones, and for each optional query whether the store
answers it natively or leaves it to :class:`~cohortsync.storage.StorageBase`.
A native query is checked twice: as the store answers it, and as
``StorageBase`` derives it from the store's required parts (so the store
could drop it, and the two answers agree).

``MemoryStorage`` is the reference: every expectation below is what it does.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, TypeVar

import attrs

from cohortsync._destination import Identifier, IdentifierKind, Member, Operation
from cohortsync._policy import Cadence, SyncPolicy
from cohortsync._sync import RunStatus, Sync, SyncRun, SyncStatus, Trigger
from cohortsync.exceptions import (
    ConfigurationError,
    ConflictError,
    DuplicateRunError,
    LeaseLostError,
    StorageError,
    SyncNotFoundError,
)
from cohortsync.storage._base import (
    StorageBase,
    derive_claim_runs,
    derive_complete_runs,
    derive_create_sync_least_loaded,
    derive_create_syncs,
    derive_create_syncs_placed,
    derive_due_between,
    derive_page_syncs,
    derive_save_sync_at,
    derive_slot_counts,
    due_key,
)
from cohortsync.storage._protocol import (
    SLOT_BUCKET_SECONDS,
    AppliedBatch,
    BatchedRuns,
    BulkSyncWrites,
    Claim,
    Completion,
    DeliveryStore,
    HistoryStore,
    IssueKind,
    Lease,
    LedgerEntry,
    MemberIssue,
    OptionalQueries,
    PagedReads,
    PendingBatch,
    Placement,
    Progress,
    ScheduleStore,
    SlotCounts,
    Storage,
    SyncRecord,
    Tally,
)

__all__ = ["STORAGE_CHECKS", "StorageFactory", "StorageReport", "check_storage"]

StorageFactory = Callable[[], Storage]
"""Returns a new, empty store each time it is called."""

E = TypeVar("E", bound=BaseException)

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
US = timedelta(microseconds=1)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
LEASE = timedelta(seconds=60)


# -- helpers -------------------------------------------------------------------


def _expect(expected: object, actual: object, what: str) -> None:
    if expected != actual:
        raise AssertionError(f"{what}: {_difference(expected, actual)}")


_SHOWN = 1_000
"""Characters of a value a failure shows whole; longer lists are shown by their ids."""


def _difference(expected: object, actual: object) -> str:
    """
    Both values as they are when short; for long lists (of records, runs,
    batches) their lengths, ids in order and the first item that differs,
    so a failure reads in a line instead of pages.
    """
    shown = f"expected {expected!r}, got {actual!r}"
    if len(shown) <= _SHOWN:
        return shown
    if not (isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple))):
        return f"expected {_cut(expected)}, got {_cut(actual)}"
    first = next(
        (i for i, (e, a) in enumerate(zip(expected, actual, strict=False)) if e != a),
        min(len(expected), len(actual)),
    )
    wanted = _cut(expected[first]) if first < len(expected) else "no item"
    got = _cut(actual[first]) if first < len(actual) else "no item"
    return (
        f"expected {len(expected)} items{_ids(expected)}, got {len(actual)}{_ids(actual)}; "
        f"first difference at item {first}: expected {wanted}, got {got}"
    )


def _ids(items: Sequence[object]) -> str:
    ids = [getattr(item, "id", getattr(item, "sync_id", None)) for item in items[:20]]
    if not ids or any(i is None for i in ids):
        return ""
    more = f", ... {len(items) - 20} more" if len(items) > 20 else ""
    return f" (ids {', '.join(map(repr, ids))}{more})"


def _cut(value: object) -> str:
    text = repr(value)
    half = _SHOWN // 2
    return text if len(text) <= half else f"{text[:half]}... ({len(text):,} characters)"


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


@contextmanager
def _raises(exc_type: type[E], what: str) -> Iterator[list[E]]:
    """
    Like ``pytest.raises``, without pytest: the body must raise *exc_type*.
    """
    caught: list[E] = []
    try:
        yield caught
    except exc_type as exc:
        caught.append(exc)
    except Exception as exc:
        raise AssertionError(
            f"{what}: expected {exc_type.__name__}, got {type(exc).__name__}: {exc}"
        ) from exc
    else:
        raise AssertionError(f"{what}: expected {exc_type.__name__}, nothing was raised")


@contextmanager
def _open(make_storage: StorageFactory) -> Iterator[Storage]:
    store = make_storage()
    try:
        yield store
    finally:
        store.close()


def _sync(
    sync_id: str = "s1",
    *,
    generation: int = 1,
    status: SyncStatus = SyncStatus.ACTIVE,
    **changes: Any,
) -> Sync:
    return Sync(
        id=sync_id,
        cohort_id="cohort",
        destination_id="destination",
        policy=SyncPolicy.hourly(),
        generation=generation,
        status=status,
        created_at=T0,
        updated_at=T0,
        **changes,
    )


def _record(
    sync_id: str = "s1",
    *,
    next_due: datetime | None = T0,
    generation: int = 1,
    status: SyncStatus = SyncStatus.ACTIVE,
    **changes: Any,
) -> SyncRecord:
    return SyncRecord(
        sync=_sync(sync_id, generation=generation, status=status),
        next_due=next_due,
        anchor=T0,
        **changes,
    )


def _run(
    lease: Lease,
    *,
    run_id: str | None = None,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    **changes: Any,
) -> SyncRun:
    started = started_at or lease.slot
    fields: dict[str, Any] = {
        "id": run_id or f"run-{lease.sync_id}-{lease.slot.isoformat()}",
        "sync_id": lease.sync_id,
        "generation": lease.generation,
        "trigger": lease.trigger,
        "slot": lease.slot,
        "started_at": started,
        "finished_at": finished_at or started + timedelta(seconds=5),
        "status": RunStatus.SUCCEEDED,
        "cadence": Cadence.HOURLY,
    }
    return SyncRun(**(fields | changes))


def _completion(lease: Lease, next_due: datetime | None, **changes: Any) -> Completion:
    run = changes.pop("run", None) or _run(lease)
    return Completion(run=run, next_due=next_due, **changes)


def _member(
    key: str, kind: IdentifierKind = IdentifierKind.USER_ID, value: str | None = None
) -> Member:
    return Member(key=key, identifier=Identifier(kind, key if value is None else value))


def _batch(
    run_id: str = "run-1",
    *,
    added: tuple[Member, ...] = (),
    removed: tuple[str, ...] = (),
    rejected: tuple[tuple[str, str], ...] = (),
    at: datetime = T0,
    sequence: int = 0,
    max_rejection_attempts: int = 3,
) -> AppliedBatch:
    return AppliedBatch(
        run_id=run_id,
        sequence=sequence,
        operation=Operation.REMOVE if removed and not added else Operation.ADD,
        idempotency_key=f"{run_id}-{sequence}",
        added=added,
        removed=removed,
        rejected=rejected,
        at=at,
        max_rejection_attempts=max_rejection_attempts,
    )


def _claim_one(store: Storage, now: datetime, owner: str = "worker") -> Lease:
    leases = store.claim_due(now, owner, LEASE, 1)
    _expect(
        1,
        len(leases),
        f"number of leases claimed at {now.isoformat()} (due and expiry compare with the "
        "now passed in, never the wall clock or the database's clock)",
    )
    return leases[0]


def _delivered(store: Storage, sync_id: str = "s1") -> list[str]:
    return list(store.iter_delivered(sync_id))


def _stale(lease: Lease) -> Lease:
    return attrs.evolve(lease, token=f"stale-{lease.token}")


# -- sync definitions ----------------------------------------------------------------


def check_create_get_round_trip(make_storage: StorageFactory) -> None:
    """
    Every field of a record comes back as it was stored; a lease passed in is ignored.
    """
    sync = attrs.evolve(
        _sync("round-trip"),
        policy=SyncPolicy.daily("Europe/Paris", rejection_attempts=5),
        mapping_id="email-mapping",
        status=SyncStatus.PAUSED,
        status_reason="paused by a person: 'why' \"quoted\"",
        effective_cadence=Cadence.HOURLY,
        generation=7,
        created_at=T0 - timedelta(days=3, microseconds=17),
        updated_at=T0 + timedelta(microseconds=123_456),
    )
    full = SyncRecord(
        sync=sync,
        next_due=T0 + timedelta(hours=2, microseconds=1),
        next_trigger=Trigger.MANUAL,
        offset=1234,
        slot_bucket=20,
        anchor=T0 - timedelta(days=3),
        attempts=2,
        full_resync=True,
        feed_cursor="cursor-42",
        last_full_sync_at=T0 - timedelta(days=1, microseconds=9),
    )
    bogus_lease = Lease(
        sync_id="round-trip",
        generation=7,
        slot=T0,
        trigger=Trigger.SCHEDULED,
        owner="nobody",
        token="0" * 32,
        expires_at=T0 + HOUR,
    )
    minimal = _record("minimal", next_due=None)
    with _open(make_storage) as store:
        store.create_sync(attrs.evolve(full, lease=bogus_lease))
        store.create_sync(minimal)
        _expect(full, store.get_sync("round-trip"), "get_sync of a fully populated record")
        _expect(minimal, store.get_sync("minimal"), "get_sync of a minimal record")
        _expect(
            [minimal, full],
            store.list_syncs(),
            "list_syncs (ordered by id: 'minimal' < 'round-trip')",
        )


def check_create_duplicate_refused(make_storage: StorageFactory) -> None:
    """
    Creating a sync whose id exists raises ConfigurationError and keeps the original.
    """
    with _open(make_storage) as store:
        original = _record("dup")
        store.create_sync(original)
        with _raises(ConfigurationError, "create_sync with an existing id"):
            store.create_sync(_record("dup", next_due=T0 + HOUR, generation=3))
        _expect(original, store.get_sync("dup"), "the original record after a refused create")


def check_not_found(make_storage: StorageFactory) -> None:
    """
    Reading or saving an unknown sync raises SyncNotFoundError; deleting one is a no-op.
    """
    with _open(make_storage) as store:
        with _raises(SyncNotFoundError, "get_sync of an unknown id") as caught:
            store.get_sync("missing")
        _expect("missing", caught[0].sync_id, "SyncNotFoundError.sync_id")
        with _raises(SyncNotFoundError, "save_sync of an unknown id"):
            store.save_sync(_record("missing"), expected_generation=1)
        store.delete_sync("missing")
        _expect([], store.list_syncs(), "list_syncs of an empty store")
        _expect([], _delivered(store, "missing"), "iter_delivered of an unknown sync")
        _expect(0, store.count_delivered("missing"), "count_delivered of an unknown sync")
        _expect([], store.history("missing"), "history of an unknown sync")
        _expect([], store.ledger("missing"), "ledger of an unknown sync")
        _expect(set(), store.dead_letters("missing"), "dead_letters of an unknown sync")
        _expect([], store.run_issues("missing"), "run_issues of an unknown run")


def check_list_syncs_ordered_by_id(make_storage: StorageFactory) -> None:
    """
    list_syncs returns every sync ordered by id, whatever the insertion order.
    """
    ids = ["b", "a", "C", "10", "9", "a-1"]
    with _open(make_storage) as store:
        for sync_id in ids:
            store.create_sync(_record(sync_id))
        _expect(sorted(ids), [r.id for r in store.list_syncs()], "ids from list_syncs")


def check_save_sync_compare_and_set(make_storage: StorageFactory) -> None:
    """
    save_sync replaces the record only when the stored generation is the expected one.
    """
    with _open(make_storage) as store:
        original = _record("cas")
        store.create_sync(original)
        updated = attrs.evolve(
            original,
            sync=attrs.evolve(original.sync, generation=2, status_reason="updated"),
            next_due=T0 + 5 * MINUTE,
            next_trigger=Trigger.MANUAL,
            offset=99,
            slot_bucket=3,
            attempts=1,
            full_resync=True,
            feed_cursor="c",
            last_full_sync_at=T0,
        )
        with _raises(ConflictError, "save_sync with a stale expected_generation") as caught:
            store.save_sync(updated, expected_generation=2)
        _expect((2, 1), (caught[0].expected, caught[0].found), "ConflictError (expected, found)")
        _expect(original, store.get_sync("cas"), "record after a refused save")
        store.save_sync(updated, expected_generation=1)
        saved = store.get_sync("cas")
        _require(saved.revision > original.revision, "a save bumps the revision")
        _expect(updated, attrs.evolve(saved, revision=0), "record after a save")
        with _raises(ConflictError, "save_sync expecting the generation that was replaced"):
            store.save_sync(original, expected_generation=1)
        _expect(saved, store.get_sync("cas"), "record after a second refused save")


def check_save_sync_keeps_lease(make_storage: StorageFactory) -> None:
    """
    save_sync never changes the lease: neither clears it nor takes one from the record.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("leased"))
        lease = _claim_one(store, T0)
        moved = _record("leased", next_due=T0 + HOUR)
        store.save_sync(moved, expected_generation=1)
        _expect(lease, store.get_sync("leased").lease, "lease after save_sync without a lease")
        foreign = attrs.evolve(lease, owner="impostor", token="0" * 32)
        store.save_sync(attrs.evolve(moved, lease=foreign), expected_generation=1)
        _expect(lease, store.get_sync("leased").lease, "lease after save_sync carrying another")
        _expect(T0 + HOUR, store.get_sync("leased").next_due, "next_due after save_sync")
        store.extend_lease(lease, T0, LEASE)  # still held: does not raise


def check_delete_sync(make_storage: StorageFactory) -> None:
    """
    delete_sync removes the record, its delivered state and its ledger; history stays.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("gone"))
        store.create_sync(_record("kept"))
        leases = {lease.sync_id: lease for lease in store.claim_due(T0, "w", LEASE, 10)}
        for sync_id, lease in leases.items():
            run_id = f"run-{sync_id}"
            store.apply_batch(
                lease,
                _batch(run_id, added=(_member("m1"), _member("m2")), rejected=(("bad", "no"),)),
            )
            store.record_issues(
                lease, [MemberIssue(run_id=run_id, key="m3", kind=IssueKind.SKIPPED, reason="x")]
            )
            store.complete_run(lease, _completion(lease, T0 + HOUR, run=_run(lease, run_id=run_id)))
        run = store.history("gone")
        store.delete_sync("gone")
        with _raises(SyncNotFoundError, "get_sync after delete_sync"):
            store.get_sync("gone")
        _expect(["kept"], [r.id for r in store.list_syncs()], "list_syncs after delete_sync")
        _expect([], _delivered(store, "gone"), "delivered state of a deleted sync")
        _expect(0, store.count_delivered("gone"), "count_delivered of a deleted sync")
        _expect(set(), store.filter_delivered("gone", ["m1"]), "filter_delivered of a deleted sync")
        _expect([], store.ledger("gone"), "ledger of a deleted sync")
        _expect(run, store.history("gone"), "history of a deleted sync (kept until purged)")
        _expect(2, len(store.run_issues("run-gone")), "issues of a deleted sync's run")
        _expect(["m1", "m2"], _delivered(store, "kept"), "delivered state of another sync")
        _expect(1, len(store.ledger("kept")), "ledger of another sync")
        store.delete_sync("gone")  # a second delete is a no-op
        store.create_sync(_record("gone", next_due=T0 + 2 * HOUR))
        _expect([], _delivered(store, "gone"), "delivered state of a re-created sync")


# -- slot allocation ------------------------------------------------------------------


def _slotted(sync_id: str, bucket: int | None, *, generation: int = 1) -> SyncRecord:
    return _record(sync_id, generation=generation, slot_bucket=bucket)


def check_slot_counts_follow_sync_writes(make_storage: StorageFactory) -> None:
    """
    least_loaded_slot picks the least occupied bucket, ties going to the first at or
    after preferred (cyclically); a sync counts in its bucket from the write that
    stores it, moves with an update and leaves with its deletion; failed writes
    change nothing.
    """
    period, buckets = 3600, 60
    with _open(make_storage) as store:
        _expect(7, store.least_loaded_slot(period, buckets, 7), "pick in an empty period")
        _expect(7, store.least_loaded_slot(period, buckets, 7), "a pick alone counts nothing")
        store.create_sync(_slotted("a", 7))
        _expect(8, store.least_loaded_slot(period, buckets, 7), "bucket 7 taken by the create")
        with _raises(ConfigurationError, "create with a taken id"):
            store.create_sync(_slotted("a", 8))
        _expect(8, store.least_loaded_slot(period, buckets, 8), "a failed create counts nothing")
        store.save_sync(_slotted("a", 9), expected_generation=1)
        _expect(7, store.least_loaded_slot(period, buckets, 7), "the update left bucket 7")
        _expect(10, store.least_loaded_slot(period, buckets, 9), "and took bucket 9")
        with _raises(ConflictError, "a stale save"):
            store.save_sync(_slotted("a", 20), expected_generation=5)
        _expect(20, store.least_loaded_slot(period, buckets, 20), "a failed save counts nothing")
        _expect(10, store.least_loaded_slot(period, buckets, 9), "bucket 9 still taken")
        store.save_sync(_slotted("a", None), expected_generation=1)
        _expect(9, store.least_loaded_slot(period, buckets, 9), "a save without a bucket frees it")
        store.save_sync(_slotted("a", 59), expected_generation=1)
        store.delete_sync("a")
        _expect(59, store.least_loaded_slot(period, buckets, 59), "the deletion freed bucket 59")
        for i in range(buckets):
            store.create_sync(_slotted(f"full-{i}", i))
        store.create_sync(_slotted("extra", 3))
        _expect(4, store.least_loaded_slot(period, buckets, 3), "tie after an even fill")
        _expect(0, store.least_loaded_slot(period, buckets, 59 + 1), "preferred wraps around")


def check_slot_counts_match_model(make_storage: StorageFactory) -> None:
    """
    Over hundreds of random creates, updates, deletes and failed writes, every pick is
    the one the least-loaded rule gives from the syncs stored, so load stays flat.
    """
    rng = random.Random(20_300_101)  # noqa: S311 - test data, not cryptography
    period, buckets = 3600, 60
    with _open(make_storage) as store:
        stored: dict[str, int | None] = {}
        for i in range(400):
            op = rng.random()
            if op < 0.5 or not stored:
                sync_id = f"s{i}"
                picked = store.least_loaded_slot(period, buckets, rng.randrange(buckets))
                store.create_sync(_slotted(sync_id, picked))
                stored[sync_id] = picked
            elif op < 0.7:
                sync_id = rng.choice(sorted(stored))
                moved = rng.choice([None, rng.randrange(buckets)])
                store.save_sync(_slotted(sync_id, moved), expected_generation=1)
                stored[sync_id] = moved
            elif op < 0.85:
                sync_id = rng.choice(sorted(stored))
                store.delete_sync(sync_id)
                del stored[sync_id]
            else:
                sync_id = rng.choice(sorted(stored))
                with _raises(ConfigurationError, "create with a taken id"):
                    store.create_sync(_slotted(sync_id, rng.randrange(buckets)))
            counts = [0] * buckets
            for taken in stored.values():
                if taken is not None:
                    counts[taken] += 1
            preferred = rng.randrange(buckets)
            expected = min(range(buckets), key=lambda b: (counts[b], (b - preferred) % buckets))
            _expect(
                expected,
                store.least_loaded_slot(period, buckets, preferred),
                f"pick after step {i} with preferred={preferred}",
            )


# -- claims ---------------------------------------------------------------------------


def check_claim_only_active_and_due(make_storage: StorageFactory) -> None:
    """
    Only active syncs whose next_due is at or before now are claimed, with a complete lease.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("due-early", next_due=T0 - HOUR))
        store.create_sync(_record("due-now", next_due=T0, next_trigger=Trigger.MANUAL))
        store.create_sync(_record("future", next_due=T0 + US))
        store.create_sync(_record("unscheduled", next_due=None))
        for status in (
            SyncStatus.PAUSED,
            SyncStatus.COMPLETED,
            SyncStatus.FAILED,
            SyncStatus.DELETED,
        ):
            store.create_sync(_record(status.value, next_due=T0 - HOUR, status=status))
        store.create_sync(_record("gen-3", next_due=T0 - MINUTE, generation=3))
        leases = store.claim_due(T0, "worker-1", LEASE, 10)
        _expect(
            ["due-early", "gen-3", "due-now"],
            [lease.sync_id for lease in leases],
            "syncs claimed (earliest due first)",
        )
        early, gen3, now = leases
        _expect(
            Lease(
                sync_id="due-early",
                generation=1,
                slot=T0 - HOUR,
                trigger=Trigger.SCHEDULED,
                owner="worker-1",
                token=early.token,
                expires_at=T0 + LEASE,
            ),
            early,
            "lease fields",
        )
        _expect(3, gen3.generation, "lease generation")
        _expect(Trigger.MANUAL, now.trigger, "lease trigger (the record's next_trigger)")
        _expect(T0, now.slot, "lease slot (next_due == now is due)")
        _require(
            len({lease.token for lease in leases}) == 3 and all(len(x.token) >= 16 for x in leases),
            f"lease tokens must be distinct and long: {[x.token for x in leases]}",
        )
        for lease in leases:
            _expect(lease, store.get_sync(lease.sync_id).lease, f"stored lease of {lease.sync_id}")
        _expect([], store.claim_due(T0, "worker-2", LEASE, 10), "second claim while leases held")
        with _raises(TypeError, "claim_due with a naive datetime"):
            store.claim_due(datetime(2030, 1, 1), "worker", LEASE, 1)  # noqa: DTZ001 - the point


def check_claim_order_and_limit(make_storage: StorageFactory) -> None:
    """
    Claims honour limit and go earliest due first, ties by id.
    """
    with _open(make_storage) as store:
        for sync_id, due in (("c", -1), ("a", -2), ("b", -2), ("d", -3), ("e", 1)):
            store.create_sync(_record(sync_id, next_due=T0 + due * timedelta(seconds=1)))
        first = store.claim_due(T0, "w", LEASE, 2)
        second = store.claim_due(T0, "w", LEASE, 2)
        third = store.claim_due(T0, "w", LEASE, 2)
        _expect(["d", "a"], [x.sync_id for x in first], "first claim with limit=2")
        _expect(["b", "c"], [x.sync_id for x in second], "second claim with limit=2")
        _expect([], [x.sync_id for x in third], "third claim (only a future sync left)")
        _expect([], store.claim_due(T0, "w", LEASE, 0), "claim with limit=0")


def check_claim_order_with_expired_leases(make_storage: StorageFactory) -> None:
    """
    A sync whose lease expired is ordered by its due time, not by when its lease
    expired: earliest due first still holds when limit cuts the list.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("crashed", next_due=T0 - 2 * HOUR))
        stale = store.claim_due(T0 - 2 * HOUR, "crashed-worker", timedelta(minutes=110), 1)
        _expect(["crashed"], [x.sync_id for x in stale], "claim of the soon-crashed worker")
        store.create_sync(_record("fresh", next_due=T0 - 30 * MINUTE))
        first = store.claim_due(T0, "w", LEASE, 1)
        _expect(["crashed"], [x.sync_id for x in first], "claim with limit=1 (earliest due)")
        _expect(T0 - 2 * HOUR, first[0].slot, "slot of the re-claimed sync")
        second = store.claim_due(T0, "w", LEASE, 1)
        _expect(["fresh"], [x.sync_id for x in second], "next claim")


def check_claim_order_after_a_reschedule(make_storage: StorageFactory) -> None:
    """
    A sync whose due time was moved later is claimed at its new turn: a store
    that remembers where it used to be due must not hand it out ahead of a
    sync due before its new time.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("moved", next_due=T0 - 3 * HOUR))
        store.create_sync(_record("early", next_due=T0 - 2 * HOUR))
        moved = store.get_sync("moved")
        store.save_sync(
            attrs.evolve(moved, next_due=T0 - MINUTE), expected_generation=moved.sync.generation
        )
        first = store.claim_due(T0, "w", LEASE, 1)
        _expect(["early"], [x.sync_id for x in first], "claim with limit=1 (earliest due now)")
        second = store.claim_due(T0, "w", LEASE, 1)
        _expect(["moved"], [x.sync_id for x in second], "next claim")


def check_lease_expiry_boundary(make_storage: StorageFactory) -> None:
    """
    At expires_at a lease still holds; one microsecond later the slot is claimable
    again with a new token, and the old holder has lost it.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1", next_due=T0))
        old = _claim_one(store, T0, "old")
        _expect(T0 + LEASE, old.expires_at, "expires_at")
        _expect([], store.claim_due(old.expires_at, "new", LEASE, 1), "claim AT expires_at")
        new = _claim_one(store, old.expires_at + US, "new")
        _expect(old.slot, new.slot, "slot of the re-claimed lease")
        _expect("new", new.owner, "owner of the re-claimed lease")
        _expect(old.expires_at + US + LEASE, new.expires_at, "expiry of the re-claimed lease")
        _require(new.token != old.token, "a re-claimed lease must get a new token")
        with _raises(LeaseLostError, "extend_lease by the expired holder"):
            store.extend_lease(old, old.expires_at + US, LEASE)
        with _raises(LeaseLostError, "apply_batch by the expired holder"):
            store.apply_batch(old, _batch(added=(_member("m"),)))
        with _raises(LeaseLostError, "record_issues by the expired holder"):
            store.record_issues(old, [MemberIssue(run_id="r", key="k", kind="skipped", reason="")])
        with _raises(LeaseLostError, "release_lease by the expired holder") as caught:
            store.release_lease(old)
        _expect(("s1", "old"), (caught[0].sync_id, caught[0].owner), "LeaseLostError fields")
        _expect(new, store.get_sync("s1").lease, "the new holder keeps its lease")


def check_expired_lease_still_held(make_storage: StorageFactory) -> None:
    """
    A lease past its expiry that nobody claimed since is still held: its
    holder may extend it, apply batches and complete the run (a slow but
    live worker is not cut off for nothing); once extended, nobody else may
    claim the sync.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1", next_due=T0))
        lease = _claim_one(store, T0, "slow")
        late = lease.expires_at + timedelta(minutes=1)
        try:
            extended = store.extend_lease(lease, late, LEASE)
        except LeaseLostError:
            raise AssertionError(
                "extend_lease refused a lease past its expiry that nobody claimed since: "
                "it is still held (only a new claim ends it)"
            ) from None
        _expect(late + LEASE, extended.expires_at, "expiry of the extended lease")
        _expect([], store.claim_due(late + US, "other", LEASE, 1), "claim of an extended lease")
        store.apply_batch(extended, _batch(added=(_member("m"),)))
        _expect(["m"], list(store.iter_delivered("s1")), "delivered by the extended lease")
        store.complete_run(extended, _completion(extended, T0 + timedelta(hours=1)))
        _expect(None, store.get_sync("s1").lease, "lease after a late completion")
        _expect(1, len(store.history("s1")), "runs recorded by a late completion")


def check_concurrent_claims_are_exclusive(make_storage: StorageFactory) -> None:
    """
    Eight threads claiming at once on one shared store never receive the same sync
    twice while its lease is valid, and together claim every due sync.

    The store from ``make_storage()`` is shared by all threads, as the workers of
    a web server share one: it must be safe to call from several threads.
    """
    threads, syncs, rounds = 8, 240, 3
    with _open(make_storage) as store:
        for i in range(syncs):
            store.create_sync(_record(f"sync-{i:04d}", next_due=T0 + (i % 7) * US))
        now = T0 + timedelta(seconds=1)
        # claim_runs too: the scheduler claims through it, and a store whose
        # claim_runs reads and then leases passed when only claim_due raced.
        methods = ["claim_due"]
        if callable(getattr(store, "claim_runs", None)):  # absent from a store written for 0.1
            methods.append("claim_runs")
        for round_no in range(rounds * len(methods)):
            method = methods[round_no % len(methods)]
            claimed = _claim_concurrently(store, now, threads, method)
            seen: dict[str, int] = {}
            for lease in claimed:
                seen[lease.sync_id] = seen.get(lease.sync_id, 0) + 1
            twice = sorted(k for k, n in seen.items() if n > 1)
            _require(
                not twice,
                f"round {round_no} ({method}): {len(twice)} syncs were claimed more than once "
                f"while their lease was valid (e.g. {twice[:5]}); claims are not atomic",
            )
            _expect(syncs, len(seen), f"round {round_no}: number of distinct syncs claimed")
            for lease in claimed:
                stored = store.get_sync(lease.sync_id).lease
                _require(
                    stored is not None and stored.token == lease.token,
                    f"round {round_no}: the stored lease of {lease.sync_id} is not the one "
                    "its claimant received",
                )
            now = now + LEASE + US  # every lease has expired: the next round re-claims


def _claim_concurrently(store: Storage, now: datetime, threads: int, method: str) -> list[Lease]:
    barrier = threading.Barrier(threads)
    results: list[list[Lease]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    claim = getattr(store, method)

    def work(i: int) -> None:
        try:
            barrier.wait()
            while got := claim(now, f"thread-{i}", LEASE, 3):
                results[i].extend(x if isinstance(x, Lease) else x.lease for x in got)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise AssertionError(f"{method} raised in a thread: {errors[0]!r}") from errors[0]
    return [lease for leases in results for lease in leases]


def check_extend_lease(make_storage: StorageFactory) -> None:
    """
    extend_lease moves the expiry (keeping the token) only for the current
    holder, and refuses a naive ``now`` as every time argument is refused.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        lease = _claim_one(store, T0)
        extended = store.extend_lease(lease, T0 + 30 * timedelta(seconds=1), 2 * LEASE)
        _expect(attrs.evolve(lease, expires_at=T0 + timedelta(seconds=150)), extended, "extended")
        _expect(extended, store.get_sync("s1").lease, "stored lease after extend")
        _expect([], store.claim_due(T0 + LEASE + US, "w2", LEASE, 1), "claim after old expiry")
        _expect([], store.claim_due(extended.expires_at, "w2", LEASE, 1), "claim at new expiry")
        with _raises(LeaseLostError, "extend_lease with a wrong token"):
            store.extend_lease(_stale(lease), T0, LEASE)
        with _raises(LeaseLostError, "extend_lease of an unknown sync"):
            store.extend_lease(attrs.evolve(lease, sync_id="missing"), T0, LEASE)
        with _raises(TypeError, "extend_lease with a naive now"):
            store.extend_lease(extended, T0.replace(tzinfo=None), LEASE)
        _expect(extended, store.get_sync("s1").lease, "lease after refused extends")
        store.release_lease(extended)
        with _raises(LeaseLostError, "extend_lease after release"):
            store.extend_lease(extended, T0, LEASE)


def check_release_lease(make_storage: StorageFactory) -> None:
    """
    release_lease makes the slot claimable at once; releasing twice raises LeaseLostError
    and does not touch the next holder's lease.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        lease = _claim_one(store, T0)
        store.release_lease(lease)
        _expect(None, store.get_sync("s1").lease, "lease after release")
        _expect(T0, store.get_sync("s1").next_due, "next_due after release (still due)")
        again = _claim_one(store, T0, "second")
        _expect(lease.slot, again.slot, "slot claimed after release")
        with _raises(LeaseLostError, "double release_lease"):
            store.release_lease(lease)
        _expect(again, store.get_sync("s1").lease, "the next holder's lease after a double release")
        _expect([], store.history("s1"), "history after releases (no run recorded)")


# -- complete_run ------------------------------------------------------------------------


def check_complete_run_records_and_advances(make_storage: StorageFactory) -> None:
    """
    complete_run records the run, advances next_due/next_trigger/attempts, releases
    the lease and bumps the revision in one step.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        before = store.get_sync("s1").revision
        lease = _claim_one(store, T0)
        completion = _completion(lease, T0 + HOUR, next_trigger=Trigger.CATCH_UP, attempts=2)
        store.complete_run(lease, completion)
        record = store.get_sync("s1")
        _expect(
            (T0 + HOUR, Trigger.CATCH_UP, 2, None),
            (record.next_due, record.next_trigger, record.attempts, record.lease),
            "(next_due, next_trigger, attempts, lease) after complete_run",
        )
        # A host's write computed from a read before the completion must
        # conflict (save_sync_at), not put back what the run replaced.
        _expect(before + 1, record.revision, "revision after complete_run (bumped by one)")
        _expect([completion.run], store.history("s1"), "history after complete_run")
        with _raises(LeaseLostError, "complete_run twice with the same lease"):
            store.complete_run(lease, _completion(lease, T0 + 2 * HOUR))
        _expect([], store.claim_due(T0 + HOUR - US, "w", LEASE, 1), "claim before next_due")
        following = _claim_one(store, T0 + HOUR)
        _expect((T0 + HOUR, Trigger.CATCH_UP), (following.slot, following.trigger), "next lease")
        store.complete_run(following, _completion(following, None))
        _expect(None, store.get_sync("s1").next_due, "next_due=None unschedules the sync")
        _expect([], store.claim_due(T0 + 100 * HOUR, "w", LEASE, 1), "claim of an unscheduled sync")


def check_complete_run_stale_holder(make_storage: StorageFactory) -> None:
    """
    A holder whose lease expired and was re-claimed cannot complete: nothing is written
    and the new holder's lease stands.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1", attempts=1))
        old = _claim_one(store, T0, "old")
        new = _claim_one(store, old.expires_at + US, "new")
        with _raises(LeaseLostError, "complete_run by a stale holder"):
            store.complete_run(
                old,
                _completion(old, T0 + HOUR, attempts=0, feed_cursor="x", full_sync_done=True),
            )
        after = store.get_sync("s1")
        _expect([], store.history("s1"), "history after a stale completion")
        _expect(
            (T0, 1, new, None, None),
            (
                after.next_due,
                after.attempts,
                after.lease,
                after.feed_cursor,
                after.last_full_sync_at,
            ),
            "(next_due, attempts, lease, feed_cursor, last_full_sync_at) after a stale completion",
        )
        run = _run(new, run_id="by-new")
        store.complete_run(new, _completion(new, T0 + HOUR, run=run))
        _expect([run], store.history("s1"), "history after the new holder completed")


def check_complete_run_duplicate_slot(make_storage: StorageFactory) -> None:
    """
    A second run record for the same (sync, slot) raises DuplicateRunError: nothing is
    written and the lease is not released. (Claims never hand out a recorded slot; this
    is the store's last line of defence.)
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        store.create_sync(_record("s2"))
        first = _claim_one(store, T0)
        first_run = _run(first, run_id="first")
        store.complete_run(first, _completion(first, T0 + HOUR, run=first_run))
        # Someone moves the schedule back onto the slot that already ran.
        store.save_sync(_record("s1", next_due=T0, attempts=4), expected_generation=1)
        again = _claim_one(store, T0)
        _expect(T0 + US, again.slot, "slot claimed after the recorded one")
        # A run record naming the slot that already ran (a buggy caller).
        forged = attrs.evolve(_run(again, run_id="second"), slot=T0)
        with _raises(DuplicateRunError, "complete_run of a slot that has a run") as caught:
            store.complete_run(
                again,
                _completion(
                    again,
                    T0 + HOUR,
                    run=forged,
                    attempts=0,
                    feed_cursor="x",
                    full_sync_done=True,
                ),
            )
        _expect(("s1", T0), (caught[0].sync_id, caught[0].slot), "DuplicateRunError fields")
        _expect([first_run], store.history("s1"), "history after a duplicate run")
        after = store.get_sync("s1")
        _expect(
            (T0 + US, 4, again, None, None),
            (
                after.next_due,
                after.attempts,
                after.lease,
                after.feed_cursor,
                after.last_full_sync_at,
            ),
            "(next_due, attempts, lease, feed_cursor, last_full_sync_at) after a duplicate",
        )
        store.release_lease(again)  # still held: does not raise
        others = {x.sync_id: x for x in store.claim_due(T0 + US, "w", LEASE, 5)}
        _expect({"s1", "s2"}, set(others), "syncs due after the release")
        store.complete_run(others["s2"], _completion(others["s2"], T0 + HOUR))
        _expect(1, len(store.history("s2")), "runs of another sync at the same slot")


def check_complete_run_schedule_changes_win(make_storage: StorageFactory) -> None:
    """
    A next_due or generation changed while the run was going wins over the run's own
    advance; the replacement definition applies only for the same generation.
    """
    with _open(make_storage) as store:
        # "Sync now" during the run: the new next_due stays.
        store.create_sync(_record("moved"))
        lease = _claim_one(store, T0)
        store.save_sync(
            _record("moved", next_due=T0 + 5 * MINUTE, next_trigger=Trigger.MANUAL),
            expected_generation=1,
        )
        store.complete_run(lease, _completion(lease, T0 + HOUR, attempts=3))
        after = store.get_sync("moved")
        _expect(
            (T0 + 5 * MINUTE, Trigger.MANUAL, 0, None),
            (after.next_due, after.next_trigger, after.attempts, after.lease),
            "(next_due, next_trigger, attempts, lease) when next_due moved during the run",
        )
        _expect(1, len(store.history("moved")), "the run is still recorded")

        # An update during the run (new generation, same next_due): no advance, and
        # the run's replacement definition is dropped.
        store.create_sync(_record("updated", next_due=T0 - HOUR))
        lease = _claim_one(store, T0)
        new_gen = _record("updated", next_due=T0 - HOUR, generation=2)
        store.save_sync(new_gen, expected_generation=1)
        stale_definition = _sync("updated", status=SyncStatus.COMPLETED)
        store.complete_run(lease, _completion(lease, T0 + HOUR, attempts=2, sync=stale_definition))
        after = store.get_sync("updated")
        _expect(new_gen.sync, after.sync, "definition after a run of an older generation")
        _expect((T0 - HOUR, 0), (after.next_due, after.attempts), "schedule of the new generation")
        _expect(None, after.lease, "lease after a run of an older generation")
        _expect(2, _claim_one(store, T0).generation, "the new generation is claimable")

        # Same generation: the replacement definition applies.
        store.create_sync(_record("finished"))
        lease = _claim_one(store, T0)
        done = _sync("finished", status=SyncStatus.COMPLETED, status_reason="one-time done")
        store.complete_run(lease, _completion(lease, None, sync=done))
        _expect(done, store.get_sync("finished").sync, "definition replaced by the completion")
        store.save_sync(_record("finished", status=SyncStatus.COMPLETED), expected_generation=1)
        claimed = [x.sync_id for x in store.claim_due(T0 + HOUR, "w", LEASE, 5)]
        _require("finished" not in claimed, f"a completed sync was claimed: {claimed}")


def check_complete_run_cursor_and_full_sync(make_storage: StorageFactory) -> None:
    """
    feed_cursor=None keeps the stored cursor; full_sync_done clears full_resync and
    stamps last_full_sync_at with the run's start.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("rt", feed_cursor="c1", full_resync=True))
        lease = _claim_one(store, T0)
        store.complete_run(lease, _completion(lease, T0 + MINUTE))
        after = store.get_sync("rt")
        _expect(
            ("c1", True, None),
            (after.feed_cursor, after.full_resync, after.last_full_sync_at),
            "(feed_cursor, full_resync, last_full_sync_at) after a plain run",
        )
        lease = _claim_one(store, T0 + MINUTE)
        started = T0 + MINUTE + timedelta(seconds=2, microseconds=5)
        run = _run(lease, started_at=started, full_sync=True)
        store.complete_run(
            lease,
            _completion(lease, T0 + 2 * MINUTE, run=run, feed_cursor="c2", full_sync_done=True),
        )
        after = store.get_sync("rt")
        _expect(
            ("c2", False, started),
            (after.feed_cursor, after.full_resync, after.last_full_sync_at),
            "(feed_cursor, full_resync, last_full_sync_at) after a full sync",
        )


# -- delivered state -----------------------------------------------------------------


def check_delivered_state(make_storage: StorageFactory) -> None:
    """
    apply_batch adds and removes per batch; keys iterate in code-point order; identifiers
    round-trip, identity ones included.
    """
    first = (
        _member("b"),
        _member("a"),
        _member("C", IdentifierKind.EMAIL, "c@example.com"),
        _member("\u00e9t\u00e9", IdentifierKind.USER_ID, "other-user-id"),
        _member("d", IdentifierKind.EMAIL),  # value == key but not a user_id
        _member("10"),
        _member("9", IdentifierKind.PHONE_SHA256, "ab" * 32),
        _member("x'; DROP TABLE delivered; --"),
    )
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        store.create_sync(_record("s2"))
        lease = {x.sync_id: x for x in store.claim_due(T0, "w", LEASE, 2)}["s1"]
        store.apply_batch(lease, _batch(added=first))
        keys = sorted(m.key for m in first)
        _expect(keys, _delivered(store), "iter_delivered (ascending by code point)")
        _expect(8, store.count_delivered("s1"), "count_delivered")
        _expect([], _delivered(store, "s2"), "another sync's delivered state")
        _expect(
            {"a", "C", "10"},
            store.filter_delivered("s1", (k for k in ["a", "zz", "C", "a", "10", ""])),
            "filter_delivered (from a generator, with unknown and repeated keys)",
        )
        _expect(set(), store.filter_delivered("s2", keys), "filter_delivered of another sync")
        _expect(
            {m.key: m.identifier for m in first},
            store.delivered_identifiers("s1", [*keys, "missing"]),
            "delivered_identifiers",
        )
        _expect({}, store.delivered_identifiers("s1", []), "delivered_identifiers of no keys")
        store.apply_batch(
            lease,
            _batch(
                sequence=1,
                added=(_member("a", IdentifierKind.EMAIL, "a@example.com"), _member("0")),
                removed=("b", "never-delivered"),
            ),
        )
        _expect(
            sorted([*(k for k in keys if k != "b"), "0"]),
            _delivered(store),
            "iter_delivered after adds and removes",
        )
        _expect(
            {
                "a": Identifier(IdentifierKind.EMAIL, "a@example.com"),
                "0": Identifier(IdentifierKind.USER_ID, "0"),
            },
            store.delivered_identifiers("s1", ["a", "0", "b"]),
            "identifiers after re-adding a member with a new identifier",
        )
        store.apply_batch(lease, _batch(sequence=2, removed=tuple(_delivered(store))))
        _expect(0, store.count_delivered("s1"), "count after removing everything")


def check_apply_batch_needs_lease(make_storage: StorageFactory) -> None:
    """
    apply_batch with a lease that is no longer held raises LeaseLostError and changes
    nothing: delivered state, ledger and issues stay as they were.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        old = _claim_one(store, T0, "old")
        store.apply_batch(
            old, _batch("r", added=(_member("a"), _member("b")), rejected=(("z", "no"),))
        )

        def snapshot() -> tuple[object, ...]:
            return (
                _delivered(store),
                store.delivered_identifiers("s1", ["a", "b", "c"]),
                store.ledger("s1"),
                store.run_issues("r"),
            )

        before = snapshot()
        new = _claim_one(store, old.expires_at + US, "new")
        hostile = _batch(
            "r",
            sequence=1,
            added=(_member("c"), _member("a", IdentifierKind.EMAIL, "a@x")),
            removed=("b",),
            rejected=(("z", "again"), ("y", "no")),
        )
        with _raises(LeaseLostError, "apply_batch by a stale holder"):
            store.apply_batch(old, hostile)
        _expect(before, snapshot(), "state after a refused apply_batch")
        store.release_lease(new)
        with _raises(LeaseLostError, "apply_batch after the lease was released"):
            store.apply_batch(new, hostile)
        _expect(before, snapshot(), "state after apply_batch on a released lease")
        done = _claim_one(store, new.expires_at + US)
        store.complete_run(done, _completion(done, T0 + HOUR))
        with _raises(LeaseLostError, "apply_batch after complete_run"):
            store.apply_batch(done, hostile)
        _expect(before, snapshot(), "state after apply_batch on a completed lease")


def check_delivered_version(make_storage: StorageFactory) -> None:
    """
    delivered_version is "" before any batch, returned anew by every apply_batch
    (never repeating), per sync, untouched by a refused apply_batch, and gone
    with a deleted sync: a worker's in-memory copy is only ever used unchanged.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        store.create_sync(_record("s2"))
        _expect("", store.delivered_version("s1"), "version before any batch")
        _expect("", store.delivered_version("nope"), "version of an unknown sync")
        lease = _claim_one(store, T0)
        seen = {""}
        for i, batch in enumerate(
            (
                _batch(added=(_member("a"),)),
                _batch(sequence=1, removed=("a",)),
                _batch(sequence=2),  # no change still moves the version
            )
        ):
            version = store.apply_batch(lease, batch)
            _require(isinstance(version, str), f"apply_batch #{i} returns the new version (a str)")
            _require(version not in seen, f"apply_batch #{i} gives a version never seen before")
            _expect(version, store.delivered_version(lease.sync_id), f"version after batch #{i}")
            seen.add(version)
        other = store.delivered_version("s2")
        _expect("", other, "another sync's version is its own")
        current = store.delivered_version("s1")
        with _raises(LeaseLostError, "apply_batch by a stale holder"):
            store.apply_batch(_stale(lease), _batch(sequence=3, added=(_member("b"),)))
        _expect(current, store.delivered_version("s1"), "version after a refused apply_batch")
        store.complete_run(lease, _completion(lease, T0 + HOUR))
        store.delete_sync("s1")
        store.create_sync(_record("s1"))
        _require(
            store.delivered_version("s1") != current,
            "a re-created sync does not inherit the deleted one's version",
        )


def check_pending_batches(make_storage: StorageFactory) -> None:
    """
    begin_batch records in-flight batches (oldest first; re-beginning a key makes
    it the newest), needs the lease, round-trips members and identifiers; the
    matching apply_batch deletes one, complete_run deletes exactly the resolved
    keys, delete_sync deletes them all.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        lease = _claim_one(store, T0)
        _expect([], store.pending_batches("s1"), "pending batches of a fresh sync")

        def pending(key: str, *members: Member, op: Operation = Operation.ADD) -> PendingBatch:
            return PendingBatch(run_id="r", idempotency_key=key, operation=op, members=members)

        a = pending("k-a", _member("a"), _member("b", IdentifierKind.EMAIL, "b@x"))
        b = pending("k-b", _member("c"), op=Operation.REMOVE)
        c = pending("k-c", _member("d"))
        for batch in (a, b, c):
            store.begin_batch(lease, batch)
        _expect([a, b, c], store.pending_batches("s1"), "pending batches in begin order")
        store.begin_batch(lease, a)
        _expect([b, c, a], store.pending_batches("s1"), "a re-begun batch is the newest")
        with _raises(LeaseLostError, "begin_batch by a stale holder"):
            store.begin_batch(_stale(lease), pending("k-x", _member("x")))
        _expect([b, c, a], store.pending_batches("s1"), "pending after a refused begin_batch")

        applied = AppliedBatch(
            run_id="r",
            sequence=0,
            operation=Operation.ADD,
            idempotency_key="k-c",
            added=(_member("d"),),
            at=T0,
        )
        store.apply_batch(lease, applied)
        _expect([b, a], store.pending_batches("s1"), "apply_batch deletes its pending record")
        store.complete_run(lease, _completion(lease, T0 + HOUR, resolved=("k-b", "k-zz")))
        _expect([a], store.pending_batches("s1"), "complete_run deletes the resolved keys only")
        store.delete_sync("s1")
        _expect([], store.pending_batches("s1"), "pending batches of a deleted sync")


def check_ledger_and_dead_letters(make_storage: StorageFactory) -> None:
    """
    Rejections count attempts per member until max_rejection_attempts makes a dead letter;
    adding or removing the member later clears its entry; each rejection is a run issue.
    """
    t1, t2, t3 = T0 + US, T0 + MINUTE, T0 + HOUR
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        store.create_sync(_record("s2"))
        leases = {x.sync_id: x for x in store.claim_due(T0, "w", LEASE, 2)}
        lease = leases["s1"]
        store.apply_batch(
            lease,
            _batch("r1", rejected=(("z-key", "bad email"), ("a-key", "too long")), at=t1),
        )
        store.apply_batch(leases["s2"], _batch("r2", rejected=(("z-key", "other"),), at=t1))
        _expect(
            [
                LedgerEntry(
                    sync_id="s1",
                    key="a-key",
                    reason="too long",
                    attempts=1,
                    dead=False,
                    first_seen=t1,
                    last_seen=t1,
                ),
                LedgerEntry(
                    sync_id="s1",
                    key="z-key",
                    reason="bad email",
                    attempts=1,
                    dead=False,
                    first_seen=t1,
                    last_seen=t1,
                ),
            ],
            store.ledger("s1"),
            "ledger after one rejection each (ordered by key)",
        )
        store.apply_batch(
            lease, _batch("r1", sequence=1, rejected=(("z-key", "still bad"),), at=t2)
        )
        entry = store.ledger("s1")[1]
        _expect(
            ("still bad", 2, False, t1, t2),
            (entry.reason, entry.attempts, entry.dead, entry.first_seen, entry.last_seen),
            "(reason, attempts, dead, first_seen, last_seen) after a second rejection",
        )
        _expect(set(), store.dead_letters("s1"), "dead letters before the bound")
        store.apply_batch(lease, _batch("r1", sequence=2, rejected=(("z-key", "final"),), at=t3))
        entry = store.ledger("s1")[1]
        _expect((3, True, t3), (entry.attempts, entry.dead, entry.last_seen), "third rejection")
        _expect({"z-key"}, store.dead_letters("s1"), "dead letters at the bound")
        _expect(1, len(store.ledger("s2")), "another sync's ledger is separate")
        _expect(set(), store.dead_letters("s2"), "another sync's dead letters")
        store.apply_batch(
            lease, _batch("r1", sequence=3, rejected=(("once", "no"),), max_rejection_attempts=1)
        )
        _expect({"z-key", "once"}, store.dead_letters("s1"), "max_rejection_attempts=1")
        _expect(
            [
                MemberIssue(run_id="r1", key="a-key", kind=IssueKind.REJECTED, reason="too long"),
                MemberIssue(run_id="r1", key="once", kind=IssueKind.REJECTED, reason="no"),
                MemberIssue(run_id="r1", key="z-key", kind=IssueKind.REJECTED, reason="bad email"),
                MemberIssue(run_id="r1", key="z-key", kind=IssueKind.REJECTED, reason="still bad"),
                MemberIssue(run_id="r1", key="z-key", kind=IssueKind.REJECTED, reason="final"),
            ],
            store.run_issues("r1"),
            "rejected members recorded as run issues (by kind, key, then as recorded)",
        )
        _expect([], _delivered(store), "rejected members are not delivered")
        store.apply_batch(lease, _batch("r1", sequence=4, added=(_member("a-key"),)))
        store.apply_batch(lease, _batch("r1", sequence=5, removed=("z-key",)))
        _expect(["once"], [e.key for e in store.ledger("s1")], "ledger after add and remove")
        _expect({"once"}, store.dead_letters("s1"), "dead letters after the member was removed")


def check_record_issues(make_storage: StorageFactory) -> None:
    """
    record_issues stores issues per run, listed by kind then key, only for the lease holder.
    """
    issues = [
        MemberIssue(run_id="r1", key="m2", kind=IssueKind.SKIPPED, reason="no email"),
        MemberIssue(run_id="r1", key="m1", kind=IssueKind.SKIPPED, reason="no email"),
        MemberIssue(run_id="r1", key="m3", kind=IssueKind.REJECTED, reason="recorded"),
        MemberIssue(run_id="r2", key="m0", kind=IssueKind.SKIPPED, reason="other run"),
    ]
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        lease = _claim_one(store, T0)
        store.record_issues(lease, issues)
        store.apply_batch(lease, _batch("r1", rejected=(("m9", "refused"),)))
        _expect(
            [
                issues[2],
                MemberIssue(run_id="r1", key="m9", kind=IssueKind.REJECTED, reason="refused"),
                issues[1],
                issues[0],
            ],
            store.run_issues("r1"),
            "run_issues ordered by kind then key",
        )
        _expect([issues[3]], store.run_issues("r2"), "issues of another run")
        store.record_issues(lease, [])
        with _raises(LeaseLostError, "record_issues with a stale token"):
            store.record_issues(_stale(lease), [issues[0]])
        _expect(4, len(store.run_issues("r1")), "issues after a refused record_issues")


def check_large_batch(make_storage: StorageFactory) -> None:
    """
    One batch of 50,000 adds applies and iterates back sorted; one batch removes them.
    """
    rng = random.Random(50_000)  # noqa: S311 - test data, not cryptography
    keys = [f"m{i}" for i in range(50_000)]  # numeric order differs from string order
    rng.shuffle(keys)
    members = tuple(
        _member(k) if i % 3 else _member(k, IdentifierKind.EMAIL, f"{k}@example.com")
        for i, k in enumerate(keys)
    )
    with _open(make_storage) as store:
        store.create_sync(_record("big"))
        lease = _claim_one(store, T0)
        store.apply_batch(lease, _batch(added=members))
        _expect(50_000, store.count_delivered("big"), "count after 50,000 adds")
        got = list(store.iter_delivered("big"))
        if got != sorted(keys):
            bad = next(i for i, (a, b) in enumerate(zip(got, sorted(keys), strict=False)) if a != b)
            raise AssertionError(
                f"iter_delivered is not the sorted keys (first difference at {bad})"
            )
        sample = keys[:2000]
        _expect(set(sample), store.filter_delivered("big", [*sample, "nope"]), "filter_delivered")
        _expect(
            {m.key: m.identifier for m in members[:2000]},
            store.delivered_identifiers("big", sample),
            "delivered_identifiers of 2,000 members",
        )
        store.apply_batch(lease, _batch(sequence=1, removed=tuple(keys)))
        _expect(0, store.count_delivered("big"), "count after removing 50,000")


# -- history ---------------------------------------------------------------------------


def check_history_round_trip_and_order(make_storage: StorageFactory) -> None:
    """
    Runs come back equal field for field, newest first by start time, limited on request.
    """
    plus5 = timezone(timedelta(hours=5))
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        store.create_sync(_record("s2", next_due=T0 + 10 * HOUR))
        runs = []
        starts = [T0 + 3 * HOUR, T0 + HOUR + US, T0 + 2 * HOUR]
        for i, started in enumerate(starts):
            lease = _claim_one(store, T0 + i * HOUR)
            run = _run(
                lease,
                run_id=f"run-{i}",
                started_at=started.astimezone(plus5),
                # The run started second-newest finishes last: newest first is
                # by start, and a store ordering by finish shows it.
                finished_at=started
                + (3 * HOUR if i == 1 else timedelta(seconds=7, microseconds=654_321)),
                status=RunStatus.PARTIAL,
                trigger=Trigger.MANUAL,
                cadence=Cadence.DAILY,
                added=i + 1,
                removed=2,
                skipped=3,
                rejected=4,
                batches=5,
                retries=6,
                full_sync=True,
                error_type="TransientError",
                error_message="timed out: 'quote' \"double\"; -- not SQL",
                notes=["realtime_size_limit", "below_min_audience"],
            )
            next_due = T0 + (i + 1) * HOUR if i < 2 else None
            store.complete_run(lease, _completion(lease, next_due, run=run))
            runs.append(run)
        other = _claim_one(store, T0 + 10 * HOUR)
        store.complete_run(other, _completion(other, None))
        _expect([runs[0], runs[2], runs[1]], store.history("s1"), "history newest first")
        _expect([runs[0], runs[2]], store.history("s1", limit=2), "history with limit=2")
        _expect([], store.history("s1", limit=0), "history with limit=0")
        got = store.history("s1")[0]
        _expect(timezone.utc, got.started_at.tzinfo, "history datetimes are UTC")
        _expect(("realtime_size_limit", "below_min_audience"), got.notes, "notes (a tuple)")
        _expect(1, len(store.history("s2")), "another sync's history")


def check_purge_history(make_storage: StorageFactory) -> None:
    """
    purge_history deletes runs finished strictly before the cut-off with their issues;
    a run finished exactly at the cut-off stays.
    """
    cut = T0 + 10 * HOUR
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        finished = {"old": cut - US, "edge": cut, "new": cut + US}
        for i, (name, at) in enumerate(finished.items()):
            lease = _claim_one(store, T0 + i * HOUR)
            store.record_issues(
                lease, [MemberIssue(run_id=name, key="k", kind=IssueKind.SKIPPED, reason="r")]
            )
            store.apply_batch(lease, _batch(name, rejected=(("bad", "no"),)))
            run = _run(lease, run_id=name, started_at=T0 + i * HOUR, finished_at=at)
            store.complete_run(lease, _completion(lease, T0 + (i + 1) * HOUR, run=run))
        _expect(1, store.purge_history(cut), "runs deleted by purge_history")
        _expect(["new", "edge"], [r.id for r in store.history("s1")], "runs kept")
        _expect([], store.run_issues("old"), "issues of a purged run")
        _expect(2, len(store.run_issues("edge")), "issues of a kept run")
        _expect(1, len(store.ledger("s1")), "the ledger is not history")
        _expect(0, store.purge_history(cut), "purging again")
        _expect(2, store.purge_history(cut + timedelta(days=365)), "purging the rest")
        with _raises(TypeError, "purge_history with a naive datetime"):
            store.purge_history(datetime(2030, 1, 1))  # noqa: DTZ001 - the point


# -- time ------------------------------------------------------------------------------


def check_times_come_from_arguments(make_storage: StorageFactory) -> None:
    """
    Due and lease decisions follow the instants passed in, never the wall clock or the
    database's clock (1999 and 2150 behave like any other time).
    """
    past = datetime(1999, 1, 1, tzinfo=timezone.utc)
    future = datetime(2150, 1, 1, tzinfo=timezone.utc)
    with _open(make_storage) as store:
        store.create_sync(_record("past", next_due=past))
        store.create_sync(_record("future", next_due=future))
        _expect([], store.claim_due(past - US, "w", LEASE, 5), "claim just before 1999")
        lease = _claim_one(store, past + timedelta(seconds=30))
        _expect("past", lease.sync_id, "sync claimed in 1999")
        # The lease expires in 1999: long ago for the wall clock, not for the caller.
        _expect(
            [], store.claim_due(past + LEASE, "w", LEASE, 5), "claim while the 1999 lease holds"
        )
        store.extend_lease(lease, past + LEASE, LEASE)
        store.complete_run(
            lease,
            _completion(lease, future + HOUR, run=_run(lease, finished_at=past + MINUTE)),
        )
        _expect([], store.claim_due(future - US, "w", LEASE, 5), "claim just before 2150")
        lease = _claim_one(store, future)
        _expect("future", lease.sync_id, "sync claimed in 2150")
        _expect(future + LEASE, lease.expires_at, "lease expiry in 2150")
        run = _run(lease, finished_at=future + MINUTE)
        store.complete_run(lease, _completion(lease, future + HOUR, run=run))
        _expect(1, store.purge_history(future), "purge at 2150 deletes only the 1999 run")
        _expect([run], store.history("future"), "the 2150 run is kept")
        leases = store.claim_due(future + HOUR, "w", LEASE, 5)
        _expect(["future", "past"], [x.sync_id for x in leases], "both due at 2150 + 1h, by id")


def check_claim_slot_after_a_recorded_run(make_storage: StorageFactory) -> None:
    """
    A sync due at (or before) the slot of its last recorded run is claimed for the
    next free slot (one microsecond after it), with next_due moved there: run records
    stay unique per slot whatever the host or the clock does.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1", next_due=T0))
        lease = _claim_one(store, T0)
        _expect(T0, lease.slot, "first claim runs next_due itself")
        _expect(None, store.get_sync("s1").last_slot, "no run recorded yet")
        store.complete_run(lease, _completion(lease, T0 + HOUR))
        _expect(T0, store.get_sync("s1").last_slot, "last_slot after the run")
        # The host asks for a run "now" at the very instant of the last one.
        store.save_sync(
            _record("s1", next_due=T0, next_trigger=Trigger.MANUAL), expected_generation=1
        )
        lease = _claim_one(store, T0)
        _expect(T0 + US, lease.slot, "slot of a claim at the last recorded slot")
        _expect(T0 + US, store.get_sync("s1").next_due, "next_due moved with the claim")
        store.complete_run(lease, _completion(lease, T0 + HOUR))
        _expect(2, len(store.history("s1")), "both runs recorded")
        # A clock that went back: due long before the last recorded slot.
        store.save_sync(_record("s1", next_due=T0 - HOUR), expected_generation=1)
        lease = _claim_one(store, T0 - HOUR)
        _expect(T0 + 2 * US, lease.slot, "slot after a clock that went back")
        # A crashed attempt's slot is claimed again unchanged: nothing was recorded.
        store.create_sync(_record("crash", next_due=T0))
        first = _claim_one(store, T0)
        again = _claim_one(store, T0 + 2 * LEASE)
        _expect((first.slot, "crash"), (again.slot, again.sync_id), "takeover of an expired lease")


def check_complete_run_host_changes_win(make_storage: StorageFactory) -> None:
    """
    A host change saved during a run (a new revision) wins over the run's schedule,
    definition and flag changes; what the run itself did (record, last slot, full-sync
    stamp, lease release) is kept.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1", next_due=T0))
        before = store.get_sync("s1").revision
        lease = _claim_one(store, T0)
        store.save_sync(
            _record("s1", next_due=T0, next_trigger=Trigger.MANUAL, full_resync=True),
            expected_generation=1,
        )
        _require(store.get_sync("s1").revision > before, "save_sync must bump the revision")
        paused = _sync("s1", status=SyncStatus.PAUSED, status_reason="by the run")
        store.complete_run(
            lease,
            _completion(lease, T0 + HOUR, sync=paused, full_sync_done=True, attempts=2),
        )
        after = store.get_sync("s1")
        _expect(
            (T0, Trigger.MANUAL, True, SyncStatus.ACTIVE, 0),
            (
                after.next_due,
                after.next_trigger,
                after.full_resync,
                after.sync.status,
                after.attempts,
            ),
            "(next_due, trigger, full_resync, status, attempts) after a host change mid-run",
        )
        _expect(
            (T0, T0, None),
            (after.last_full_sync_at, after.last_slot, after.lease),
            "(last_full_sync_at, last_slot, lease): the run's own facts",
        )
        # Without a host change, the completion clears the flag it honoured.
        lease = _claim_one(store, T0)
        store.complete_run(lease, _completion(lease, T0 + HOUR, full_sync_done=True))
        _require(not store.get_sync("s1").full_resync, "flag cleared by the run that honoured it")


def check_progress(make_storage: StorageFactory) -> None:
    """
    apply_batch adds its tally to the sync's progress (a batch of another slot carries
    the total over to its slot: an attempt that never completed is never dropped);
    complete_run and delete_sync clear it.
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1", next_due=T0))
        _expect(None, store.progress("s1"), "progress of a sync that never ran")
        lease = _claim_one(store, T0)

        def tallied(sequence: int, slot: datetime | None, tally: Tally, *keys: str) -> AppliedBatch:
            return attrs.evolve(
                _batch(sequence=sequence, added=tuple(_member(k) for k in keys)),
                slot=slot,
                tally=tally,
            )

        store.apply_batch(lease, tallied(1, T0, Tally(added=2, batches=1), "a", "b"))
        store.apply_batch(lease, tallied(2, T0, Tally(rejected=1, batches=1, collisions=3)))
        store.apply_batch(lease, tallied(3, None, Tally(added=9)))
        _expect(
            Progress(slot=T0, tally=Tally(added=2, rejected=1, batches=2, collisions=3)),
            store.progress("s1"),
            "progress after two batches of one slot (a batch without a slot counts nothing)",
        )
        store.apply_batch(lease, tallied(4, T0 + HOUR, Tally(removed=1, batches=1)))
        _expect(
            Progress(
                slot=T0 + HOUR,
                tally=Tally(added=2, removed=1, rejected=1, batches=3, collisions=3),
            ),
            store.progress("s1"),
            "progress carried over to another slot",
        )
        store.complete_run(lease, _completion(lease, T0 + HOUR))
        _expect(None, store.progress("s1"), "progress after the run completed")
        lease = _claim_one(store, T0 + HOUR)
        store.apply_batch(lease, tallied(5, lease.slot, Tally(added=1, batches=1), "c"))
        store.delete_sync("s1")
        _expect(None, store.progress("s1"), "progress of a deleted sync")


def check_identifier_holders(make_storage: StorageFactory) -> None:
    """
    identifier_holders lists, per identifier, the delivered keys behind it: members
    sharing an email, and a member under the identity mapping holding USER_ID(key).
    A store with the optional ``has_mapped_identifiers`` says whether any member
    holds another identifier than USER_ID(its key).
    """
    email = IdentifierKind.EMAIL_SHA256
    shared = Identifier(email, "e" * 64)
    with _open(make_storage) as store:
        mapped = getattr(store, "has_mapped_identifiers", None)

        def expect_mapped(sync_id: str, what: str, *, expected: bool) -> None:
            if mapped is not None:
                _expect(expected, mapped(sync_id), f"has_mapped_identifiers {what}")

        store.create_sync(_record("s1"))
        store.create_sync(_record("other", next_due=T0 + HOUR))
        lease = _claim_one(store, T0)
        expect_mapped("s1", "before anything was delivered", expected=False)
        store.apply_batch(lease, _batch(added=(_member("c"),), sequence=10))
        expect_mapped("s1", "with only identity members delivered", expected=False)
        members = (
            _member("b", email, "e" * 64),
            _member("a", email, "e" * 64),
            _member("c"),
            _member("d", IdentifierKind.USER_ID, "c"),
            _member("f", email, "f" * 64),
        )
        store.apply_batch(lease, _batch(added=members))
        _expect(
            {
                shared: ["a", "b"],
                Identifier(IdentifierKind.USER_ID, "c"): ["c", "d"],
            },
            store.identifier_holders(
                "s1",
                [shared, Identifier(IdentifierKind.USER_ID, "c"), Identifier(email, "0" * 64)],
            ),
            "holders of a shared email, an identity identifier and an unknown one",
        )
        _expect({}, store.identifier_holders("other", [shared]), "another sync holds nothing")
        expect_mapped("s1", "with members holding emails", expected=True)
        expect_mapped("other", "of another sync", expected=False)
        store.apply_batch(lease, _batch(removed=("a", "c"), sequence=1))
        _expect(
            {shared: ["b"], Identifier(IdentifierKind.USER_ID, "c"): ["d"]},
            store.identifier_holders("s1", [shared, Identifier(IdentifierKind.USER_ID, "c")]),
            "holders after two of them were removed",
        )
        # Re-delivering a member under another identifier moves it.
        store.apply_batch(lease, _batch(added=(_member("b", email, "f" * 64),), sequence=2))
        _expect(
            {Identifier(email, "f" * 64): ["b", "f"]},
            store.identifier_holders("s1", [shared, Identifier(email, "f" * 64)]),
            "holders after a member moved to another identifier",
        )
        store.apply_batch(lease, _batch(removed=("d", "f"), sequence=3))
        expect_mapped("s1", "while one member still holds an email", expected=True)
        store.apply_batch(lease, _batch(added=(_member("b"),), sequence=4))
        expect_mapped("s1", "once every member holds USER_ID(its key)", expected=False)


def check_begin_batch_replaces(make_storage: StorageFactory) -> None:
    """
    begin_batch(..., replaces=key) records the new batch and deletes the replaced one
    in one step (a split batch's halves replace their parent).
    """
    with _open(make_storage) as store:
        store.create_sync(_record("s1"))
        lease = _claim_one(store, T0)

        def pending(key: str, *keys: str) -> PendingBatch:
            return PendingBatch(
                run_id="r",
                idempotency_key=key,
                operation=Operation.ADD,
                members=tuple(_member(k) for k in keys),
            )

        store.begin_batch(lease, pending("parent", "a", "b", "c", "d"))
        store.begin_batch(lease, pending("left", "a", "b"), replaces="parent")
        store.begin_batch(lease, pending("right", "c", "d"))
        _expect(
            ["left", "right"],
            [p.idempotency_key for p in store.pending_batches("s1")],
            "pending records after a split",
        )
        with _raises(LeaseLostError, "begin_batch with a stale lease"):
            store.begin_batch(_stale(lease), pending("x", "e"), replaces="left")
        _expect(2, len(store.pending_batches("s1")), "a refused replace changes nothing")


def check_next_due_and_scheduled_after(make_storage: StorageFactory) -> None:
    """
    next_due() is the earliest instant some active sync becomes claimable (a leased
    one at its lease expiry); scheduled_after(now) lists unleased active syncs whose
    schedule was computed after now.
    """
    with _open(make_storage) as store:
        _expect(None, store.next_due(), "next_due of an empty store")
        store.create_sync(_record("paused", next_due=T0 - HOUR, status=SyncStatus.PAUSED))
        store.create_sync(_record("unscheduled", next_due=None))
        _expect(None, store.next_due(), "next_due with nothing scheduled")
        store.create_sync(_record("later", next_due=T0 + HOUR))
        store.create_sync(_record("soon", next_due=T0))
        _expect(T0, store.next_due(), "the earliest due")
        lease = _claim_one(store, T0)
        _expect(lease.expires_at + US, store.next_due(), "a leased sync counts from its expiry")
        store.extend_lease(lease, T0, 2 * HOUR)
        _expect(T0 + HOUR, store.next_due(), "another sync comes first then")
        store.complete_run(lease, _completion(lease, T0 + 30 * MINUTE, scheduled_from=T0 + HOUR))
        _expect(T0 + 30 * MINUTE, store.next_due(), "after the run")
        _expect(
            T0 + HOUR,
            store.get_sync("soon").scheduled_from,
            "scheduled_from stored with the advance",
        )
        _expect(
            ["soon"],
            [r.id for r in store.scheduled_after(T0)],
            "syncs scheduled from a later clock",
        )
        _expect([], store.scheduled_after(T0 + HOUR), "none once the clock caught up")
        leased = _claim_one(store, T0 + 30 * MINUTE)
        _expect(
            [],
            [r.id for r in store.scheduled_after(T0)],
            "scheduled_after lists no leased sync (its run will reschedule it)",
        )
        store.release_lease(leased)
        with _raises(TypeError, "scheduled_after with a naive datetime"):
            store.scheduled_after(datetime(2030, 1, 1))  # noqa: DTZ001 - the point


def _claim_runs(store: Storage, now: datetime, owner: str, limit: int) -> list[Claim]:
    native = getattr(store, "claim_runs", None)
    if native is None:
        return derive_claim_runs(store, now, owner, LEASE, limit)
    claims: list[Claim] = native(now, owner, LEASE, limit)
    return claims


def _complete_runs(
    store: Storage, completions: list[tuple[Lease, Completion]]
) -> list[Exception | None]:
    native = getattr(store, "complete_runs", None)
    if native is None:
        return derive_complete_runs(store, completions)
    try:
        answers: list[Exception | None] = native(completions)
    except (LeaseLostError, DuplicateRunError) as exc:
        raise AssertionError(
            f"complete_runs raised {type(exc).__name__}: {exc}; it must answer a refused "
            "completion as that item's error in its list, and write the others"
        ) from exc
    return answers


def check_claim_runs(make_storage: StorageFactory) -> None:
    """
    claim_runs leases like claim_due and tells each run its record, delivered
    count, version and whether it has pending batches, ledger entries or progress.
    """
    with _open(make_storage) as store:
        for sync_id in ("plain", "busy", "later"):
            store.create_sync(_record(sync_id, next_due=T0 + (HOUR if sync_id == "later" else US)))
        with _raises(TypeError, "claim_runs with a naive now"):
            _claim_runs(store, datetime(2030, 1, 1), "w", 1)  # noqa: DTZ001 - the point
        busy = _claim_one(store, T0 + US)
        _expect("busy", busy.sync_id, "first claim")
        store.apply_batch(
            busy,
            attrs.evolve(
                _batch("run-b", added=(_member("m1"), _member("m2")), rejected=(("bad", "no"),)),
                slot=busy.slot,
                tally=Tally(added=2, rejected=1, batches=1),
            ),
        )
        store.begin_batch(
            busy,
            PendingBatch(
                run_id="run-b",
                idempotency_key="k-pending",
                operation=Operation.ADD,
                members=(_member("m3"),),
            ),
        )
        store.release_lease(busy)
        _expect([], _claim_runs(store, T0, "w", 0), "claim_runs with limit=0")
        claims = _claim_runs(store, T0 + 2 * US, "w", 10)
        _expect(["busy", "plain"], [c.lease.sync_id for c in claims], "claim_runs order")
        for claim in claims:
            sync_id = claim.lease.sync_id
            what = f"claim_runs of {sync_id!r}"
            _expect(store.get_sync(sync_id), claim.record, f"{what}: record (lease included)")
            _expect(claim.lease, store.get_sync(sync_id).lease, f"{what}: the lease is held")
            _expect(store.count_delivered(sync_id), claim.delivered, f"{what}: delivered")
            _expect(store.delivered_version(sync_id), claim.version, f"{what}: version")
            _expect(bool(store.pending_batches(sync_id)), claim.pending, f"{what}: pending")
            _expect(bool(store.ledger(sync_id)), claim.ledger, f"{what}: ledger")
            _expect(store.progress(sync_id) is not None, claim.progress, f"{what}: progress")
        _expect(
            (2, True, True, True),
            (claims[0].delivered, claims[0].pending, claims[0].ledger, claims[0].progress),
            "claim_runs facts of a busy sync",
        )
        _expect(
            (0, "", False, False, False),
            (
                claims[1].delivered,
                claims[1].version,
                claims[1].pending,
                claims[1].ledger,
                claims[1].progress,
            ),
            "claim_runs facts of a new sync",
        )
        _expect([], _claim_runs(store, T0 + 2 * US, "w2", 10), "claim_runs while leases held")


def check_complete_runs(make_storage: StorageFactory) -> None:
    """
    complete_runs writes each completion as complete_run would, and one that
    fails its lease or slot check fails alone.
    """
    with _open(make_storage) as store:
        for sync_id in ("a", "b", "c", "d"):
            store.create_sync(_record(sync_id))
        leases = {c.lease.sync_id: c.lease for c in _claim_runs(store, T0, "w", 10)}
        _expect({"a", "b", "c", "d"}, set(leases), "claimed")
        # c's slot was recorded already (by a run of it that outlived its lease).
        store.complete_run(leases["c"], _completion(leases["c"], None))
        store.create_sync(_record("c2"))
        answers = _complete_runs(
            store,
            [
                (leases["a"], _completion(leases["a"], T0 + HOUR)),
                (_stale(leases["b"]), _completion(leases["b"], T0 + HOUR)),
                (leases["d"], _completion(leases["d"], T0 + 2 * HOUR)),
            ],
        )
        _expect(
            [None, LeaseLostError, None],
            [a if a is None else type(a) for a in answers],
            "complete_runs answers",
        )
        _expect(T0 + HOUR, store.get_sync("a").next_due, "a advanced")
        _expect(None, store.get_sync("a").lease, "a released")
        _expect(T0 + 2 * HOUR, store.get_sync("d").next_due, "d advanced")
        _expect(leases["b"], store.get_sync("b").lease, "b untouched: still leased")
        _expect([], store.history("b"), "b: nothing recorded")
        _expect(1, len(store.history("a")), "a recorded")
        _expect([], _complete_runs(store, []), "complete_runs of nothing")
        dup = _claim_runs(store, T0 + HOUR, "w", 10)
        again = [c.lease for c in dup if c.lease.sync_id == "a"]
        _expect(1, len(again), "a claimed again")
        run = _run(again[0], run_id="run-a-dup")
        old = store.history("a")[0]
        answers = _complete_runs(
            store,
            [
                (
                    again[0],
                    _completion(again[0], T0 + 2 * HOUR, run=attrs.evolve(run, slot=old.slot)),
                )
            ],
        )
        _expect(
            [DuplicateRunError], [type(a) for a in answers], "a duplicate slot in complete_runs"
        )
        _expect(again[0], store.get_sync("a").lease, "a still leased after the refused completion")


def _due_between(
    store: Storage, after: tuple[datetime, str] | None, until: datetime, limit: int
) -> list[SyncRecord]:
    native = getattr(store, "due_between", None)
    if native is None:  # a store written for 0.1: what the scheduler reads instead
        return derive_due_between(store.list_syncs(), after, until, limit)
    records: list[SyncRecord] = native(after, until, limit)
    return records


def _page_syncs(store: Storage, after: str | None, limit: int) -> list[SyncRecord]:
    native = getattr(store, "page_syncs", None)
    if native is None:
        return derive_page_syncs(store.list_syncs(), after, limit)
    records: list[SyncRecord] = native(after, limit)
    return records


def check_paged_reads(make_storage: StorageFactory) -> None:
    """
    due_between pages through the active syncs due by an instant in (next_due,
    id) order, leased ones included; page_syncs pages through every sync by id.
    Each page starts after the key of the previous one's last record.
    """
    due = {
        "b": T0,
        "a": T0,
        "Z": T0,
        "\u00e9t\u00e9": T0,
        "a-1": T0 + MINUTE,
        "10": T0 + MINUTE,
        "9": T0 + HOUR,
        "later": T0 + HOUR + US,
    }
    with _open(make_storage) as store:
        _expect([], _due_between(store, None, T0 + HOUR, 10), "due_between of an empty store")
        _expect([], _page_syncs(store, None, 10), "page_syncs of an empty store")
        for sync_id, at in due.items():
            store.create_sync(_record(sync_id, next_due=at))
        store.create_sync(_record("paused", next_due=T0 - HOUR, status=SyncStatus.PAUSED))
        store.create_sync(_record("unscheduled", next_due=None))
        leased = _claim_one(store, T0)
        _expect("Z", leased.sync_id, "claimed first (code point order: 'Z' < 'a')")
        expected = sorted(
            (store.get_sync(i) for i, at in due.items() if at <= T0 + HOUR), key=due_key
        )
        _expect(
            [r.id for r in expected],
            [r.id for r in _due_between(store, None, T0 + HOUR, 100)],
            "due_between ids, in (next_due, id) order",
        )
        _expect(expected, _due_between(store, None, T0 + HOUR, 100), "due_between records")
        for size in (1, 2, 3, 7):
            pages, after = [], None
            # Bounded: a store that ignores `after` would repeat its pages forever.
            for _ in range(len(expected) // size + 2):
                page = _due_between(store, after, T0 + HOUR, size)
                _require(len(page) <= size, f"due_between page longer than {size}")
                pages.extend(page)
                if len(page) < size:
                    break
                _require(
                    after is None or due_key(page[0]) > after,
                    f"due_between after {after} returned {page[0].id!r}, not after it",
                )
                after = due_key(page[-1])
            else:
                raise AssertionError(f"due_between in pages of {size} never reached a short page")
            _expect(
                [r.id for r in expected], [r.id for r in pages], f"due_between in pages of {size}"
            )
        _expect([], _due_between(store, None, T0 + HOUR, 0), "due_between with limit=0")
        with _raises(TypeError, "due_between with a naive until"):
            _due_between(store, None, datetime(2030, 1, 1), 10)  # noqa: DTZ001 - the point
        _expect([], _due_between(store, None, T0 - US, 10), "due_between before anything is due")
        _expect(
            ["a-1"],
            [r.id for r in _due_between(store, (T0 + MINUTE, "10"), T0 + MINUTE, 10)],
            "due_between after a key, until inclusive",
        )
        _expect(
            [], _due_between(store, (T0 + HOUR, "9"), T0 + HOUR, 10), "due_between after the last"
        )
        _expect(
            ["later"],
            [r.id for r in _due_between(store, (T0 + HOUR, "9"), T0 + 2 * HOUR, 10)],
            "due_between after a key, with a later until",
        )
        everything = [store.get_sync(i) for i in sorted([*due, "paused", "unscheduled"])]
        _expect(everything, _page_syncs(store, None, 100), "page_syncs records")
        for size in (1, 3, 4):
            pages, cursor = [], None
            for _ in range(len(everything) // size + 2):
                chunk = _page_syncs(store, cursor, size)
                _require(len(chunk) <= size, f"page_syncs page longer than {size}")
                pages.extend(chunk)
                if len(chunk) < size:
                    break
                _require(
                    cursor is None or chunk[0].id > cursor,
                    f"page_syncs after {cursor!r} returned {chunk[0].id!r}, not after it",
                )
                cursor = chunk[-1].id
            else:
                raise AssertionError(f"page_syncs in pages of {size} never reached a short page")
            _expect(
                [r.id for r in everything], [r.id for r in pages], f"page_syncs in pages of {size}"
            )
        _expect(
            [r.id for r in everything if r.id > "a"],
            [r.id for r in _page_syncs(store, "a", 100)],
            "page_syncs after an id",
        )
        _expect([], _page_syncs(store, "\U0010ffff", 10), "page_syncs after the last id")
        _expect([], _page_syncs(store, None, 0), "page_syncs with limit=0")


def _create_syncs(store: Storage, records: list[SyncRecord]) -> list[str]:
    native = getattr(store, "create_syncs", None)
    if native is None:
        return derive_create_syncs(store, records)
    taken: list[str] = native(records)
    return taken


def _slot_counts(store: Storage, period: int, buckets: int) -> list[int]:
    native = getattr(store, "slot_counts", None)
    if native is None:
        return derive_slot_counts(store, period, buckets)
    counts: list[int] = native(period, buckets)
    return counts


def _create_least_loaded(store: Storage, record: SyncRecord, buckets: int) -> SyncRecord:
    native = getattr(store, "create_sync_least_loaded", None)
    if native is None:
        return derive_create_sync_least_loaded(store, record, buckets)
    stored: SyncRecord = native(record, buckets)
    return stored


def _in_bucket(sync_id: str, bucket: int, second: int) -> SyncRecord:
    """An hourly sync preferring *bucket*, *second* seconds into it."""
    return _record(sync_id, slot_bucket=bucket, offset=bucket * SLOT_BUCKET_SECONDS + second)


def check_create_sync_least_loaded(make_storage: StorageFactory) -> None:
    """
    create_sync_least_loaded stores the record in the bucket least_loaded_slot
    would pick (its own bucket preferred), keeping its second within the
    bucket, counts it there, and answers the record as stored; a taken id is
    refused with nothing written or counted; a record without a bucket is
    refused.
    """
    period, buckets = 3600, 60
    with _open(make_storage) as store:
        first = _create_least_loaded(store, _in_bucket("a", 7, 13), buckets)
        _expect(7, first.slot_bucket, "an empty period: the preferred bucket")
        _expect(7 * 60 + 13, first.offset, "the offset kept")
        _expect(first, store.get_sync("a"), "the answer is the stored record")
        second = _create_least_loaded(store, _in_bucket("b", 7, 59), buckets)
        _expect(8, second.slot_bucket, "bucket 7 taken: the next one")
        _expect(8 * 60 + 59, second.offset, "moved with its second in the bucket")
        _expect(second, store.get_sync("b"), "the moved record as stored")
        _expect(9, store.least_loaded_slot(period, buckets, 7), "both counted")
        with _raises(ConfigurationError, "a taken id"):
            _create_least_loaded(store, _in_bucket("a", 30, 0), buckets)
        _expect(first, store.get_sync("a"), "the taken id's record is kept")
        _expect(30, store.least_loaded_slot(period, buckets, 30), "a refused create counts nothing")
        wrapped = _create_least_loaded(store, _in_bucket("c", 59, 0), buckets)
        _expect(59, wrapped.slot_bucket, "the last bucket")
        for i in range(buckets):
            if i not in (7, 8, 59):
                store.create_sync(_slotted(f"fill-{i}", i))
        tie = _create_least_loaded(store, _in_bucket("d", 59, 1), buckets)
        _expect(59, tie.slot_bucket, "every bucket holds one: a tie keeps the preferred one")
        wraps = _create_least_loaded(store, _in_bucket("g", 59, 2), buckets)
        _expect(0, wraps.slot_bucket, "the preferred bucket fuller: the pick wraps to the start")
        _expect(0 * 60 + 2, wraps.offset, "its second kept in bucket 0")
        with _raises(ConfigurationError, "a record without a bucket"):
            _create_least_loaded(store, _record("e", next_due=T0), buckets)
        with _raises(SyncNotFoundError, "nothing of it written"):
            store.get_sync("e")
        with _raises(ConfigurationError, "no buckets"):
            _create_least_loaded(store, _in_bucket("f", 0, 0), 0)


def check_create_sync_least_loaded_takes_turns(make_storage: StorageFactory) -> None:
    """
    create_sync_least_loaded picks inside its write: eight threads creating
    30 syncs each into 60 buckets at once leave every bucket within one sync
    of every other (a store that picks, then writes, puts two creators'
    syncs in one bucket and passes every other check). Eight threads
    creating into two buckets while deleting some of their syncs all finish
    without an error, and the counts match the syncs (a pick that waits for
    bucket rows deadlocked so).

    Checked on a store with its own create_sync_least_loaded only, like
    :func:`check_create_syncs_placed_takes_turns`.
    """
    with _open(make_storage) as store, _switching_often():
        if not _native(store, "create_sync_least_loaded"):
            return  # check_storage reports it as not applicable
        counts = _create_at_once(store, buckets=60, each=30, delete_every=0)
        _require(
            max(counts) - min(counts) <= 1,
            f"8 threads creating 240 syncs at once left buckets holding {min(counts)} to "
            f"{max(counts)}, where 4 each was due: two creators picked the same bucket "
            "(create_sync_least_loaded must pick inside its write)",
        )
    with _open(make_storage) as store, _switching_often():
        counts = _create_at_once(store, buckets=2, each=40, delete_every=4)
        _expect(counts, _slot_counts(store, 120, 2), "slot counts after creates and deletes")


_EVERY_TWO_MINUTES = SyncPolicy.every(timedelta(minutes=2))
"""A policy whose period holds two slot buckets: creators at once contend for them."""


def _create_at_once(store: Storage, *, buckets: int, each: int, delete_every: int) -> list[int]:
    """
    Eight threads each creating *each* syncs into the *buckets* of their
    period (hourly for 60, every two minutes for 2) at once, every creator
    preferring the same buckets in the same order (the hardest case for a
    pick that is not taken in turn), and deleting its previous sync after
    every *delete_every*-th create; the syncs each bucket holds.
    """
    threads = 8
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def create(thread: int) -> None:
        try:
            barrier.wait()
            for i in range(each):
                record = _in_bucket(f"t{thread}-{i:02d}", 0, i)
                if buckets == 2:
                    # Half the creators prefer each bucket: picks that waited
                    # for rows, taken in opposite orders, deadlocked so.
                    record = attrs.evolve(
                        record,
                        sync=attrs.evolve(record.sync, policy=_EVERY_TWO_MINUTES),
                        slot_bucket=(thread + i) % 2,
                        offset=(thread + i) % 2 * SLOT_BUCKET_SECONDS + i,
                    )
                _create_least_loaded(store, record, buckets)
                if delete_every and i % delete_every == delete_every - 1:
                    store.delete_sync(f"t{thread}-{i - 1:02d}")
        except BaseException as exc:  # noqa: BLE001 - reported by the check
            errors.append(exc)

    workers = [threading.Thread(target=create, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    _require(not any(w.is_alive() for w in workers), "every creator finished within 60 s")
    _expect([], errors, f"{threads} creators at once into {buckets} buckets raised nothing")
    counts = [0] * buckets
    for record in store.list_syncs():
        if record.slot_bucket is not None:
            counts[record.slot_bucket] += 1
    deleted = each // delete_every if delete_every else 0
    _expect(threads * (each - deleted), sum(counts), "syncs created in a bucket")
    return counts


def _create_placed(
    store: Storage, ids: Sequence[str], place: Placement
) -> tuple[list[SyncRecord], list[str]]:
    native = getattr(store, "create_syncs_placed", None)
    if native is None:
        return derive_create_syncs_placed(store, ids, place)
    answer: tuple[list[SyncRecord], list[str]] = native(ids, place)
    return answer


def check_create_syncs_placed(make_storage: StorageFactory) -> None:
    """
    create_syncs_placed calls *place* once, with counts that include the
    syncs already stored and the given ids the store holds; writes and
    counts what it returns except taken ids; answers (written, taken). What
    *place* raises, and a repeated id in its records, write nothing.
    """
    period, buckets = 3600, 60
    with _open(make_storage) as store:
        store.create_sync(_in_bucket("old", 3, 0))
        seen: list[tuple[list[int], set[str]]] = []

        def place(counts: SlotCounts, taken: set[str]) -> list[SyncRecord]:
            seen.append((counts(period, buckets), set(taken)))
            return [_in_bucket("a", 3, 1), _in_bucket("old", 4, 0), _in_bucket("b", 5, 2)]

        written, taken = _create_placed(store, ["a", "old", "b", "nobody"], place)
        _expect(1, len(seen), "place is called once")
        _expect(1, seen[0][0][3], "the counts place reads include the stored syncs")
        _expect({"old"}, seen[0][1], "place is told which of the ids the store holds")
        _expect(["a", "b"], [r.id for r in written], "the records written, in order")
        _expect(["old"], taken, "the taken id answered")
        _expect(3, store.get_sync("old").slot_bucket, "the taken id's record is kept")
        counts = _slot_counts(store, period, buckets)
        _expect((2, 0, 1), (counts[3], counts[4], counts[5]), "the written records counted")

        def failing(counts: SlotCounts, _taken: set[str]) -> list[SyncRecord]:
            counts(period, buckets)
            raise KeyError("the host's mistake")

        with _raises(KeyError, "what place raises"):
            _create_placed(store, ["c"], failing)
        twice = [_in_bucket("c", 9, 0), _in_bucket("c", 10, 0)]
        with _raises(ConfigurationError, "an id twice"):
            _create_placed(store, ["c"], lambda _counts, _taken: twice)
        with _raises(SyncNotFoundError, "nothing written by a failed call"):
            store.get_sync("c")
        _expect(counts, _slot_counts(store, period, buckets), "nothing counted by a failed call")
        _expect(([], []), _create_placed(store, [], lambda _c, _t: []), "nothing to place")


def check_create_syncs_placed_takes_turns(make_storage: StorageFactory) -> None:
    """
    create_syncs_placed holds its lock from the counts it reads to its
    write: a second creator that starts while the first is placing sees the
    first one's sync counted (a store that reads the counts in one
    transaction and writes in another passes every other check, and loses
    the spread with several creators).

    Checked on a store with its own create_syncs_placed only: the one
    StorageBase derives reads the counts, then writes, and
    :func:`check_storage` reports this check as not applicable to such a
    store.
    """
    period, buckets = 3600, 60
    with _open(make_storage) as store:
        if not _native(store, "create_syncs_placed"):
            return  # check_storage reports it as not applicable
        seen: list[int] = []
        errors: list[BaseException] = []

        def second_place(counts: SlotCounts, _taken: set[str]) -> list[SyncRecord]:
            seen.append(counts(period, buckets)[20])
            return [_in_bucket("second", 20, 1)]

        def second() -> None:
            try:
                _create_placed(store, ["second"], second_place)
            except BaseException as exc:  # noqa: BLE001 - reported by the check
                errors.append(exc)

        worker = threading.Thread(target=second)

        def first_place(counts: SlotCounts, _taken: set[str]) -> list[SyncRecord]:
            counts(period, buckets)
            worker.start()
            time.sleep(0.3)  # the second creator must wait for this write
            return [_in_bucket("first", 20, 0)]

        _create_placed(store, ["first"], first_place)
        worker.join(timeout=30)
        _require(not worker.is_alive(), "the second placement finished")
        _expect([], errors, "the second placement raised nothing")
        _expect(
            [1],
            seen,
            "a placement that started while another was placing saw its sync counted "
            "(create_syncs_placed must read the counts and write under one lock)",
        )


def _save_sync_at(store: Storage, record: SyncRecord, expected_revision: int) -> None:
    native = getattr(store, "save_sync_at", None)
    if native is None:
        derive_save_sync_at(store, record, expected_revision=expected_revision)
    else:
        native(record, expected_revision=expected_revision)


def _native(store: Storage, name: str) -> bool:
    """
    Whether *store* has its own *name*: neither absent nor StorageBase's
    derivation (a wrapper delegating to a store counts as that store).
    """
    method = getattr(store, name, None)
    return callable(method) and getattr(method, "__func__", None) is not getattr(StorageBase, name)


def check_save_sync_at(make_storage: StorageFactory) -> None:
    """
    save_sync_at replaces the record only when the stored revision is the
    expected one, whatever the generation, and bumps the revision; like
    save_sync it keeps the lease and last_slot and moves the slot count. A
    stale revision is refused with nothing written or counted; an unknown
    sync is not found.
    """
    period, buckets = 3600, 60
    with _open(make_storage) as store:
        store.create_sync(_slotted("rev", 7))
        first = _claim_one(store, T0)
        store.complete_run(first, _completion(first, T0 + HOUR))
        lease = _claim_one(store, T0 + HOUR)
        current = store.get_sync("rev")
        updated = attrs.evolve(
            current,
            sync=attrs.evolve(current.sync, status_reason="changed by a host"),
            next_due=T0 + 2 * HOUR,
            next_trigger=Trigger.MANUAL,
            slot_bucket=9,
            attempts=2,
            full_resync=True,
            feed_cursor="c",
            lease=None,
            last_slot=None,
        )
        with _raises(ConflictError, "save_sync_at with a stale expected_revision") as caught:
            _save_sync_at(store, updated, current.revision + 1)
        _expect(
            ("revision", current.revision + 1, current.revision),
            (caught[0].counter, caught[0].expected, caught[0].found),
            "ConflictError (counter, expected, found)",
        )
        _expect(current, store.get_sync("rev"), "record after a refused save_sync_at")
        _expect(8, store.least_loaded_slot(period, buckets, 7), "a refused save moves no count")
        _save_sync_at(store, updated, current.revision)
        saved = store.get_sync("rev")
        _require(saved.revision > current.revision, "save_sync_at bumps the revision")
        _expect(
            attrs.evolve(
                updated, lease=current.lease, last_slot=current.last_slot, revision=saved.revision
            ),
            saved,
            "record after save_sync_at (its lease and last_slot kept)",
        )
        _expect(lease, saved.lease, "the lease held across save_sync_at")
        store.extend_lease(lease, T0 + HOUR, LEASE)  # still held: does not raise
        _expect(7, store.least_loaded_slot(period, buckets, 7), "the save left bucket 7")
        _expect(10, store.least_loaded_slot(period, buckets, 9), "and took bucket 9")
        with _raises(ConflictError, "save_sync_at at the revision it replaced") as caught:
            _save_sync_at(store, updated, current.revision)
        _expect(saved.revision, caught[0].found, "ConflictError.found: the stored revision")
        _expect(saved, store.get_sync("rev"), "record after a second refused save_sync_at")
        regenerated = attrs.evolve(saved, sync=attrs.evolve(saved.sync, generation=5))
        _save_sync_at(store, regenerated, saved.revision)
        _expect(5, store.get_sync("rev").sync.generation, "the generation is not compared")
        with _raises(SyncNotFoundError, "save_sync_at of an unknown sync"):
            _save_sync_at(store, _record("missing"), 0)
        with _raises(SyncNotFoundError, "nothing of it written"):
            store.get_sync("missing")


@contextmanager
def _switching_often() -> Iterator[None]:
    """
    Threads switch every few microseconds instead of every 5 ms, so a
    store that checks and writes in two steps is caught between them (with
    the default interval such a store passed a stress of hundreds of saves).
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def check_save_sync_at_is_atomic(make_storage: StorageFactory) -> None:
    """
    Eight threads incrementing one field of one sync through save_sync_at,
    each reading the sync and retrying on ConflictError, lose no increment:
    of two writers that read the same revision, exactly one succeeds. Five
    rounds, each on a sync of its own.

    Checked on a store with its own save_sync_at only: the one StorageBase
    derives (a read, then save_sync) is not atomic, and :func:`check_storage`
    reports this check as not applicable to such a store.
    """
    with _open(make_storage) as store, _switching_often():
        if not _native(store, "save_sync_at"):
            return  # check_storage reports it as not applicable
        # A store that compares and writes under two holds of its lock loses
        # an increment only when a thread switch falls between them. One
        # round of 800 increments missed such a store 2 and 4 times in 40
        # with both cores busy; five rounds of 320 missed it 0 times in 80.
        for round_ in range(_ATOMIC_ROUNDS):
            _save_concurrently(
                store,
                f"counter-{round_}",
                _add_attempt,
                lambda r: r.attempts,
                "increments kept (fewer: two saves at one revision both succeeded, the later "
                "overwrote the other; save_sync_at is not atomic)",
            )


def check_save_sync_is_atomic(make_storage: StorageFactory) -> None:
    """
    Eight threads each raising a sync's generation by one through save_sync,
    each reading the sync and retrying on ConflictError, lose no raise: of
    two writers that read the same generation, exactly one succeeds. Five
    rounds, each on a sync of its own.
    """

    def raise_generation(store: Storage, current: SyncRecord) -> None:
        generation = current.sync.generation
        raised = attrs.evolve(current.sync, generation=generation + 1)
        store.save_sync(attrs.evolve(current, sync=raised), expected_generation=generation)

    with _open(make_storage) as store, _switching_often():
        for round_ in range(_ATOMIC_ROUNDS):
            _save_concurrently(
                store,
                f"generation-{round_}",
                raise_generation,
                lambda r: r.sync.generation - 1,
                "generation raises kept (fewer: two saves at one generation both "
                "succeeded, the later overwrote the other; save_sync is not atomic)",
            )


_ATOMIC_ROUNDS = 5
"""Rounds of the atomicity checks (each 10 to 50 ms on a correct store)."""
_THREADS, _INCREMENTS = 8, 40
"""Threads of one round, and the saves each makes."""


def _add_attempt(store: Storage, current: SyncRecord) -> None:
    _save_sync_at(store, attrs.evolve(current, attempts=current.attempts + 1), current.revision)


def _save_concurrently(
    store: Storage,
    sync_id: str,
    save: Callable[[Storage, SyncRecord], None],
    saves_kept: Callable[[SyncRecord], int],
    lost: str,
) -> None:
    """
    One round of an atomicity check, on a sync of its own: every thread
    reads the sync and *save*s it changed by one, again after each
    ConflictError, until it made its saves; the stored record must count
    every one (*saves_kept*), else *lost* says why.
    """
    store.create_sync(_record(sync_id))
    barrier = threading.Barrier(_THREADS)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            done = 0
            while done < _INCREMENTS:
                try:
                    save(store, store.get_sync(sync_id))
                except ConflictError:
                    continue
                done += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(_THREADS)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise AssertionError(f"a save raised in a thread: {errors[0]!r}") from errors[0]
    _expect(_THREADS * _INCREMENTS, saves_kept(store.get_sync(sync_id)), lost)


def _counted(records: Sequence[SyncRecord], buckets: int) -> list[int]:
    """The counts of hourly *records* per bucket, as a store must keep them."""
    counts = [0] * buckets
    for record in records:
        if record.slot_bucket is not None and record.sync.policy.cadence is Cadence.HOURLY:
            counts[record.slot_bucket] += 1
    return counts


def check_create_syncs(make_storage: StorageFactory) -> None:
    """
    create_syncs stores each record as create_sync would and counts it in its
    bucket; taken ids are answered with nothing of them written; an id given
    twice is refused with nothing written.
    """
    period, buckets = 3600, 60
    with _open(make_storage) as store:
        _expect([0] * buckets, _slot_counts(store, period, buckets), "counts of an empty store")
        _expect([], _create_syncs(store, []), "create_syncs of nothing")
        store.create_sync(_slotted("old", 5))
        store.create_sync(_slotted("a-taken", 7))
        batch = [_slotted(f"b{i:03d}", i % buckets) for i in range(130)]
        batch.insert(40, _slotted("old", 6, generation=9))
        batch.insert(90, _slotted("a-taken", 8, generation=9))
        batch.append(_record("unslotted", next_due=None))
        # A daily sync counts in the daily period only, never in the hourly one.
        daily = SyncRecord(
            sync=attrs.evolve(_sync("daily"), policy=SyncPolicy.daily()),
            next_due=T0,
            anchor=T0,
            slot_bucket=5,
        )
        batch.append(daily)
        _expect(["old", "a-taken"], _create_syncs(store, batch), "the taken ids, in input order")
        _expect(_slotted("old", 5), store.get_sync("old"), "the taken id's record is kept")
        stored = store.list_syncs()
        _expect(134, len(stored), "every new record stored")
        for record in batch:
            if record.id not in ("old", "a-taken"):
                _expect(record, store.get_sync(record.id), f"{record.id} as created")
        expected = _counted(stored, buckets)
        _expect(expected, _slot_counts(store, period, buckets), "counts follow the bulk write")
        _expect(4, expected[5], "bucket 5: old and b005, b065, b125 (not the daily sync)")
        daily_counts = [0] * 1440
        daily_counts[5] = 1
        _expect(daily_counts, _slot_counts(store, 86_400, 1440), "the daily period's counts")
        least = min(range(buckets), key=lambda b: (expected[b], (b - 17) % buckets))
        _expect(least, store.least_loaded_slot(period, buckets, 17), "least_loaded_slot agrees")
        with _raises(ConfigurationError, "an id twice in one create_syncs"):
            _create_syncs(store, [_slotted("twice", 1), _slotted("new", 2), _slotted("twice", 3)])
        with _raises(SyncNotFoundError, "nothing of a refused bulk write"):
            store.get_sync("new")
        _expect(expected, _slot_counts(store, period, buckets), "counts after a refused write")


def check_bulk_counts_match_one_by_one(make_storage: StorageFactory) -> None:
    """
    Counts after bulk creates, deletes and updates are those of the syncs stored,
    and slot_counts agrees with least_loaded_slot pick after pick.
    """
    rng = random.Random(20_300_119)  # noqa: S311 - test data, not cryptography
    period, buckets = 3600, 60
    with _open(make_storage) as store:
        for round_ in range(4):
            batch = [
                _slotted(f"r{round_}-{i}", rng.choice([None, rng.randrange(buckets)]))
                for i in range(rng.randrange(1, 90))
            ]
            _expect([], _create_syncs(store, batch), f"round {round_}: nothing taken")
            for record in rng.sample(store.list_syncs(), 10):
                if rng.random() < 0.5:
                    store.delete_sync(record.id)
                else:
                    moved = _slotted(record.id, rng.randrange(buckets))
                    store.save_sync(moved, expected_generation=record.sync.generation)
            counts = _counted(store.list_syncs(), buckets)
            _expect(counts, _slot_counts(store, period, buckets), f"round {round_}: counts")
            preferred = rng.randrange(buckets)
            _expect(
                min(range(buckets), key=lambda b: (counts[b], (b - preferred) % buckets)),
                store.least_loaded_slot(period, buckets, preferred),
                f"round {round_}: the pick from those counts",
            )


def check_closed_store_is_unusable(make_storage: StorageFactory) -> None:
    """
    After close(), operations raise StorageError instead of working on silently.
    """
    store = make_storage()
    store.create_sync(_record("s1"))
    store.close()
    with _raises(StorageError, "get_sync on a closed store"):
        store.get_sync("s1")
    with _raises(StorageError, "claim_due on a closed store"):
        store.claim_due(T0, "w", LEASE, 1)
    # Reads too: a closed store that still answers them hides a host bug
    # (a scheduler kept past its close shows an empty history, not an error).
    with _raises(StorageError, "list_syncs on a closed store"):
        store.list_syncs()
    with _raises(StorageError, "history on a closed store"):
        store.history("s1")


STORAGE_CHECKS: tuple[Callable[[StorageFactory], None], ...] = (
    check_create_get_round_trip,
    check_create_duplicate_refused,
    check_not_found,
    check_list_syncs_ordered_by_id,
    check_save_sync_compare_and_set,
    check_save_sync_keeps_lease,
    check_delete_sync,
    check_slot_counts_follow_sync_writes,
    check_slot_counts_match_model,
    check_claim_only_active_and_due,
    check_claim_order_and_limit,
    check_claim_order_with_expired_leases,
    check_claim_order_after_a_reschedule,
    check_lease_expiry_boundary,
    check_expired_lease_still_held,
    check_concurrent_claims_are_exclusive,
    check_extend_lease,
    check_release_lease,
    check_complete_run_records_and_advances,
    check_complete_run_stale_holder,
    check_complete_run_duplicate_slot,
    check_complete_run_schedule_changes_win,
    check_complete_run_cursor_and_full_sync,
    check_claim_slot_after_a_recorded_run,
    check_complete_run_host_changes_win,
    check_progress,
    check_identifier_holders,
    check_begin_batch_replaces,
    check_next_due_and_scheduled_after,
    check_delivered_state,
    check_apply_batch_needs_lease,
    check_delivered_version,
    check_pending_batches,
    check_ledger_and_dead_letters,
    check_record_issues,
    check_large_batch,
    check_history_round_trip_and_order,
    check_purge_history,
    check_times_come_from_arguments,
    check_claim_runs,
    check_complete_runs,
    check_paged_reads,
    check_create_syncs,
    check_bulk_counts_match_one_by_one,
    check_create_syncs_placed,
    check_create_syncs_placed_takes_turns,
    check_create_sync_least_loaded,
    check_create_sync_least_loaded_takes_turns,
    check_save_sync_at,
    check_save_sync_at_is_atomic,
    check_save_sync_is_atomic,
    check_closed_store_is_unusable,
)
"""Every check, in order; each takes the factory and uses fresh stores from it."""


_QUERY_CHECKS: Mapping[str, tuple[Callable[[StorageFactory], None], ...]] = {
    "next_due": (check_next_due_and_scheduled_after,),
    "scheduled_after": (check_next_due_and_scheduled_after,),
    "least_loaded_slot": (check_slot_counts_follow_sync_writes, check_slot_counts_match_model),
    "count_delivered": (
        check_not_found,
        check_delete_sync,
        check_delivered_state,
        check_large_batch,
    ),
    "filter_delivered": (check_delete_sync, check_delivered_state, check_large_batch),
    "identifier_holders": (check_identifier_holders,),
    "dead_letters": (check_not_found, check_ledger_and_dead_letters),
    "due_between": (check_paged_reads,),
    "page_syncs": (check_paged_reads,),
    "slot_counts": (check_create_syncs, check_bulk_counts_match_one_by_one),
    "create_syncs": (check_create_syncs, check_bulk_counts_match_one_by_one),
    "create_syncs_placed": (check_create_syncs_placed,),
    "create_sync_least_loaded": (check_create_sync_least_loaded,),
    "save_sync_at": (check_save_sync_at,),
}
"""The checks that exercise each optional query."""

_NATIVE_ONLY: Mapping[Callable[[StorageFactory], None], tuple[str, str]] = {
    check_create_syncs_placed_takes_turns: (
        "create_syncs_placed",
        "create_syncs_placed is derived (a read, then a write): creators not taken in turn",
    ),
    check_create_sync_least_loaded_takes_turns: (
        "create_sync_least_loaded",
        "create_sync_least_loaded is derived (a pick, then a create): not taken in turn",
    ),
    check_save_sync_at_is_atomic: (
        "save_sync_at",
        "save_sync_at is derived (a read, then save_sync): not atomic",
    ),
}
"""Checks of a promise only a store's own part makes: the part, and why not otherwise."""

_REQUIRED = (ScheduleStore, DeliveryStore, HistoryStore)
_DERIVED = " (derived queries)"
"""Marks a check run again with every optional query derived by StorageBase."""


def _read_only(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


def _methods(part: type) -> list[str]:
    return [name for name in vars(part) if not name.startswith("_") and callable(vars(part)[name])]


@attrs.frozen(kw_only=True)
class StorageReport:
    """
    What :func:`check_storage` verified, part by part.

    Attributes:
        storage: ``repr`` of one store the factory built.
        parts: How the store implements each part: the required
            ``ScheduleStore``, ``DeliveryStore`` and ``HistoryStore`` are
            ``"native"``; each optional query (``next_due``,
            ``identifier_holders``, ...) is ``"native"`` or ``"derived"``
            (left to :class:`~cohortsync.storage.StorageBase`); the parts
            added in 0.2 (``claim_runs``, ``due_between``, ...) may also be
            ``"absent"`` (a store written for 0.1: the scheduler derives them).
        passed: The checks that passed, in order; a check run again on the
            derived queries of a store that has native ones ends in
            ``" (derived queries)"``.
        not_applicable: The checks of a promise the store does not make,
            each with why: ``check_save_sync_at_is_atomic`` when
            ``save_sync_at`` is left to ``StorageBase``, whose read-then-save
            is not atomic (a host call can then lose a concurrent change).
    """

    storage: str
    parts: Mapping[str, str] = attrs.field(converter=_read_only, repr=lambda m: repr(dict(m)))
    passed: tuple[str, ...]
    not_applicable: tuple[str, ...] = ()

    @property
    def derived(self) -> tuple[str, ...]:
        """
        The optional queries the store leaves to ``StorageBase``.
        """
        return tuple(name for name, how in self.parts.items() if how == "derived")

    def __str__(self) -> str:
        required = {part.__name__ for part in _REQUIRED}
        lines = [f"{self.storage}: {len(self.passed)} checks passed"]
        lines.extend(
            f"  {name:<24} {'required' if name in required else 'optional':<9} {how}"
            for name, how in self.parts.items()
        )
        lines.extend(f"  not applicable: {why}" for why in self.not_applicable)
        return "\n".join(lines)


def _parts(store: object) -> dict[str, str]:
    """
    How *store* implements each part of the protocol.

    Raises:
        AssertionError: A method is missing, naming it and where it belongs.
    """
    kind = type(store).__name__
    parts: dict[str, str] = {}
    for part in _REQUIRED:
        missing = [name for name in _methods(part) if not callable(getattr(store, name, None))]
        if missing:
            raise AssertionError(f"{kind} lacks {part.__name__} methods: {', '.join(missing)}")
        parts[part.__name__] = "native"
    if not callable(getattr(store, "close", None)):
        raise AssertionError(f"{kind} lacks close()")  # noqa: TRY004 - a contract failure
    for name in _methods(OptionalQueries):
        if not callable(getattr(store, name, None)):
            raise AssertionError(  # noqa: TRY004 - a contract failure, not a caller's type error
                f"{kind} lacks the optional query {name}: implement it, or subclass "
                "cohortsync.storage.StorageBase, which derives it from the required parts"
            )
        derived = getattr(type(store), name, None) is getattr(StorageBase, name)
        parts[name] = "derived" if derived else "native"
    # The parts added since 0.1 are not in Storage: a store without one (written
    # for 0.1) is "absent", and the scheduler derives it (or reads list_syncs).
    for name in (*_methods(BatchedRuns), *_methods(PagedReads), *_methods(BulkSyncWrites)):
        if not callable(getattr(store, name, None)):
            parts[name] = "absent"
            continue
        derived = getattr(type(store), name, None) is getattr(StorageBase, name)
        parts[name] = "derived" if derived else "native"
    return parts


def check_storage(make_storage: StorageFactory) -> StorageReport:
    """
    Verify that a :class:`~cohortsync.storage.Storage` implementation behaves like the
    reference ``MemoryStorage``, and report which parts it implements.

    Each check calls *make_storage* for a store of its own and closes it, so
    one failure does not cascade into the next. Some checks share a single
    store between threads (eight claiming through ``claim_due`` and
    ``claim_runs``, eight saving through ``save_sync_at`` and through
    ``save_sync``): stores must be thread-safe, as the protocol requires of
    every atomic operation. A check of a promise the store does not make
    (the atomicity of a ``save_sync_at`` left to ``StorageBase``) is
    reported as not applicable, not as passed.

    The checks that exercise an optional query the store implements run a
    second time on the store with every optional query derived by
    :class:`~cohortsync.storage.StorageBase` from its required parts: the
    native and the derived answers must both be right.

    Args:
        make_storage: Returns a new, **empty** store each time it is called
            (for a database-backed store: a fresh database or schema).

    Returns:
        How the store implements each part, the checks that passed, and
        those that did not apply.

    Raises:
        AssertionError: A part is missing or a check failed; the message names
            the method or the check and what differed.
    """
    with _open(make_storage) as store:
        parts = _parts(store)
        shown = repr(store)
    passed: list[str] = []
    skipped: list[str] = []
    for check in STORAGE_CHECKS:
        needs = _NATIVE_ONLY.get(check)
        if needs is not None and parts.get(needs[0]) != "native":
            skipped.append(f"{check.__name__}: {needs[1]}")
            continue
        _run_check(check, make_storage, passed)
    native = {
        check
        for name, how in parts.items()
        if how == "native"
        for check in _QUERY_CHECKS.get(name, ())
    }
    for check in (c for c in STORAGE_CHECKS if c in native):
        _run_check(check, lambda: _DerivedQueries(make_storage()), passed, suffix=_DERIVED)
    return StorageReport(
        storage=shown, parts=parts, passed=tuple(passed), not_applicable=tuple(skipped)
    )


def _run_check(
    check: Callable[[StorageFactory], None],
    make_storage: StorageFactory,
    passed: list[str],
    *,
    suffix: str = "",
) -> None:
    name = check.__name__ + suffix
    try:
        check(make_storage)
    except AssertionError as exc:
        raise AssertionError(f"{name}: {exc}") from exc
    except Exception as exc:
        raise AssertionError(f"{name} raised {type(exc).__name__}: {exc}") from exc
    passed.append(name)


class _DerivedQueries(StorageBase):
    """
    *store* with every optional query answered by :class:`StorageBase` from its
    required parts, which are *store*'s own: what the store would answer if it
    left all of them out.
    """

    __slots__ = ("_store",)

    def __init__(self, store: Storage) -> None:
        self._store = store

    def __repr__(self) -> str:
        return f"_DerivedQueries({self._store!r})"

    def create_sync(self, record: SyncRecord) -> None:
        self._store.create_sync(record)

    def get_sync(self, sync_id: str) -> SyncRecord:
        return self._store.get_sync(sync_id)

    def list_syncs(self) -> list[SyncRecord]:
        return self._store.list_syncs()

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        self._store.save_sync(record, expected_generation=expected_generation)

    def delete_sync(self, sync_id: str) -> None:
        self._store.delete_sync(sync_id)

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        return self._store.claim_due(now, owner, lease_for, limit)

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        return self._store.extend_lease(lease, now, lease_for)

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        self._store.complete_run(lease, completion)

    def release_lease(self, lease: Lease) -> None:
        self._store.release_lease(lease)

    def iter_delivered(self, sync_id: str) -> Iterator[str]:
        return self._store.iter_delivered(sync_id)

    def delivered_identifiers(self, sync_id: str, keys: Sequence[str]) -> dict[str, Identifier]:
        return self._store.delivered_identifiers(sync_id, keys)

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        return self._store.apply_batch(lease, batch)

    def delivered_version(self, sync_id: str) -> str:
        return self._store.delivered_version(sync_id)

    def begin_batch(
        self, lease: Lease, batch: PendingBatch, *, replaces: str | None = None
    ) -> None:
        self._store.begin_batch(lease, batch, replaces=replaces)

    def pending_batches(self, sync_id: str) -> list[PendingBatch]:
        return self._store.pending_batches(sync_id)

    def progress(self, sync_id: str) -> Progress | None:
        return self._store.progress(sync_id)

    def record_issues(self, lease: Lease, issues: Sequence[MemberIssue]) -> None:
        self._store.record_issues(lease, issues)

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        return self._store.ledger(sync_id)

    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        return self._store.history(sync_id, limit)

    def run_issues(self, run_id: str) -> list[MemberIssue]:
        return self._store.run_issues(run_id)

    def purge_history(self, before: datetime) -> int:
        return self._store.purge_history(before)

    def close(self) -> None:
        self._store.close()
