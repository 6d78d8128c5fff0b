"""
The rules every store applies: :func:`cohortsync.storage.apply_claim` (what a
claim writes) and :func:`cohortsync.storage.apply_completion` (what a completed
run writes), checked as pure functions, and the completion rule against each
shipped store on random runs.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta

import attrs
import pytest
from hypothesis import given, settings

from cohortsync._destination import Operation
from cohortsync._policy import Cadence
from cohortsync._sync import RunStatus, SyncRun, SyncStatus, Trigger
from cohortsync._validators import evolve_trusted
from cohortsync.exceptions import LeaseLostError
from cohortsync.storage import (
    BatchedRuns,
    Completion,
    Lease,
    MemoryStorage,
    PendingBatch,
    SQLiteStorage,
    Storage,
    SyncRecord,
    apply_claim,
    apply_completion,
)
from cohortsync.storage._rules import completion_changes
from records import T0, sync_record
from strategies import CompletionScenario, completion_scenarios

LEASE = timedelta(minutes=10)
US = timedelta(microseconds=1)


def lease_of(start: SyncRecord, **changes: object) -> Lease:
    assert start.next_due is not None
    fields: dict[str, object] = {
        "sync_id": start.id,
        "generation": start.sync.generation,
        "slot": start.next_due,
        "trigger": start.next_trigger,
        "owner": "w",
        "token": "t" * 32,
        "expires_at": start.next_due + LEASE,
        "revision": start.revision,
    }
    return Lease(**(fields | changes))  # type: ignore[arg-type]


def run_of(lease: Lease, *, started_at: datetime | None = None, run_id: str = "run") -> SyncRun:
    started = started_at or lease.slot
    return SyncRun(
        id=run_id,
        sync_id=lease.sync_id,
        generation=lease.generation,
        trigger=lease.trigger,
        slot=lease.slot,
        started_at=started,
        finished_at=started + timedelta(seconds=1),
        status=RunStatus.SUCCEEDED,
        cadence=Cadence.HOURLY,
    )


def everything(lease: Lease, sync: SyncRecord) -> Completion:
    """
    A completion that changes every field the rule can change.
    """
    return Completion(
        run=run_of(lease, started_at=lease.slot + timedelta(seconds=3)),
        next_due=lease.slot + timedelta(hours=1),
        next_trigger=Trigger.CATCH_UP,
        sync=attrs.evolve(sync.sync, status=SyncStatus.PAUSED, status_reason="by the run"),
        attempts=4,
        feed_cursor="cursor-2",
        full_sync_done=True,
        scheduled_from=lease.slot + timedelta(minutes=1),
    )


class TestTheClaimRule:
    """
    apply_claim leases the next free slot and moves next_due there.
    """

    def test_a_claim_runs_next_due(self) -> None:
        """A sync never run is claimed for its next_due, with the record's fields on the lease."""
        start = sync_record(next_trigger=Trigger.MANUAL, revision=3)

        claimed, lease = apply_claim(start, owner="w", token="t" * 32, expires_at=T0 + LEASE)

        assert lease_of(start, revision=3) == lease
        assert attrs.evolve(start, lease=lease) == claimed

    def test_a_claim_at_the_last_recorded_slot_moves_on(self) -> None:
        """Due at or before the last recorded run's slot: one microsecond after it."""
        start = sync_record(next_due=T0 - timedelta(hours=1), last_slot=T0)

        claimed, lease = apply_claim(start, owner="w", token="t" * 32, expires_at=T0 + LEASE)

        assert (T0 + US, T0 + US) == (lease.slot, claimed.next_due)

    def test_an_unscheduled_sync_cannot_be_claimed(self) -> None:
        """No next_due: nothing to claim."""
        with pytest.raises(ValueError, match="not scheduled"):
            apply_claim(sync_record(next_due=None), owner="w", token="t" * 32, expires_at=T0)


class TestTheCompletionRule:
    """
    apply_completion advances the schedule only when nobody changed the sync during the run.
    """

    @given(scenario=completion_scenarios())
    def test_the_run_releases_its_lease(self, scenario: CompletionScenario) -> None:
        """Whatever the completion, the lease is released."""
        lease = lease_of(scenario.start)
        held = attrs.evolve(scenario.start, lease=lease)

        assert None is apply_completion(held, lease, everything(lease, held)).lease

    def test_an_unchanged_sync_takes_everything(self) -> None:
        """Same generation, revision and next_due: schedule, definition and flags apply."""
        start = sync_record(full_resync=True, feed_cursor="cursor-1")
        lease = lease_of(start)
        completion = everything(lease, start)
        assert completion.sync is not None

        after = apply_completion(start, lease, completion)

        assert (
            attrs.evolve(
                start,
                next_due=completion.next_due,
                next_trigger=Trigger.CATCH_UP,
                sync=completion.sync,
                attempts=4,
                feed_cursor="cursor-2",
                full_resync=False,
                last_full_sync_at=completion.run.started_at,
                scheduled_from=completion.scheduled_from,
                last_slot=lease.slot,
                revision=start.revision + 1,
            )
            == after
        )

    @pytest.mark.parametrize(
        "change",
        [
            {"revision": 1},
            {"next_due": T0 + timedelta(minutes=5)},
        ],
        ids=["saved by the host", "moved by the host"],
    )
    def test_a_changed_sync_keeps_the_change(self, change: dict[str, object]) -> None:
        """A host's save or "sync now" during the run wins; the run's own facts stand."""
        start = sync_record(full_resync=True, feed_cursor="cursor-1", next_due=T0)
        lease = lease_of(start)
        changed = attrs.evolve(start, **change)  # type: ignore[arg-type]
        completion = everything(lease, start)
        assert completion.sync is not None

        after = apply_completion(changed, lease, completion)

        same_revision = "revision" not in change
        assert (
            attrs.evolve(
                changed,
                sync=completion.sync if same_revision else changed.sync,
                feed_cursor="cursor-2",
                last_full_sync_at=completion.run.started_at,
                last_slot=lease.slot,
                revision=changed.revision + 1,
            )
            == after
        )

    def test_a_completion_bumps_the_revision(self) -> None:
        """A completion moves the revision on, so a host write computed before it conflicts."""
        start = sync_record(next_due=T0, revision=7)
        lease = lease_of(start)

        after = apply_completion(start, lease, Completion(run=run_of(lease), next_due=None))

        assert 8 == after.revision

    def test_a_new_generation_drops_the_runs_definition(self) -> None:
        """A definition replaced during the run is kept: the run's replacement is dropped."""
        start = sync_record(next_due=T0)
        lease = lease_of(start)
        updated = attrs.evolve(start, sync=attrs.evolve(start.sync, generation=2))

        after = apply_completion(updated, lease, everything(lease, start))

        assert (updated.sync, updated.next_due, updated.attempts) == (
            after.sync,
            after.next_due,
            after.attempts,
        )

    def test_last_slot_never_moves_back(self) -> None:
        """A run of an earlier slot than the last recorded one leaves last_slot alone."""
        start = sync_record(next_due=T0, last_slot=T0 + timedelta(hours=1))
        lease = lease_of(start)

        after = apply_completion(start, lease, Completion(run=run_of(lease), next_due=None))

        assert T0 + timedelta(hours=1) == after.last_slot

    def test_no_cursor_keeps_the_stored_one(self) -> None:
        """A completion without a feed cursor keeps the stored cursor."""
        start = sync_record(feed_cursor="kept")
        lease = lease_of(start)

        after = apply_completion(start, lease, Completion(run=run_of(lease), next_due=None))

        assert "kept" == after.feed_cursor


# -- every store writes what the rule says ---------------------------------------------

_ids = itertools.count()


@pytest.fixture(scope="module", params=["memory", "sqlite", "postgres"])
def shared_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Storage]:
    """
    One store per kind for all examples (each example uses a sync of its own
    and deletes it): creating a database per example would dominate the test.
    """
    if request.param == "memory":
        yield MemoryStorage()
        return
    if request.param == "sqlite":
        with SQLiteStorage(tmp_path_factory.mktemp("rule") / "store.db") as store:
            yield store
        return
    dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
    if not dsn:
        pytest.skip("PostgreSQL tests need COHORTSYNC_TEST_POSTGRES_DSN (CI sets it)")
    import psycopg

    from cohortsync.storage import PostgresStorage

    schema = f"cs_rule_{secrets.token_hex(5)}"
    try:
        with PostgresStorage(dsn, schema=schema) as store:
            yield store
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def play(
    store: Storage, scenario: CompletionScenario, sync_id: str, *, batched: bool = False
) -> None:
    """
    Live *scenario* on *store* and check its completion against the rule;
    *batched* completes it with complete_runs, between two refused completions.
    """
    start = attrs.evolve(scenario.start, sync=attrs.evolve(scenario.start.sync, id=sync_id))
    due = start.next_due
    assert due is not None
    store.create_sync(start)
    if scenario.ran_before:
        (first,) = store.claim_due(due, "w", LEASE, 1)
        store.complete_run(
            first, Completion(run=run_of(first, run_id=f"{sync_id}-0"), next_due=due)
        )
    (lease,) = store.claim_due(due, "w", LEASE, 1)
    claimed = store.get_sync(sync_id)
    keys = [f"k{i}" for i in range(scenario.pending)]
    for key in keys:
        store.begin_batch(
            lease,
            PendingBatch(run_id=sync_id, idempotency_key=key, operation=Operation.ADD, members=()),
        )
    if scenario.host is not None:
        generation = claimed.sync.generation + (scenario.host == "update")
        store.save_sync(
            attrs.evolve(
                claimed,
                sync=attrs.evolve(claimed.sync, generation=generation),
                next_due=claimed.next_due
                if scenario.host_next_due is None
                else due + scenario.host_next_due,
                full_resync=scenario.host_full_resync,
            ),
            expected_generation=claimed.sync.generation,
        )
    completion = Completion(
        run=run_of(lease, started_at=lease.slot + scenario.started_after, run_id=sync_id),
        next_due=None if scenario.next_due is None else due + scenario.next_due,
        next_trigger=scenario.next_trigger,
        sync=None
        if scenario.status is None
        else attrs.evolve(claimed.sync, status=scenario.status, status_reason="by the run"),
        attempts=scenario.attempts,
        feed_cursor=scenario.feed_cursor,
        full_sync_done=scenario.full_sync_done,
        resolved=tuple(f"k{i}" for i in sorted(scenario.resolved)),
        scheduled_from=None if scenario.scheduled_from is None else due + scenario.scheduled_from,
    )
    before = store.get_sync(sync_id)

    if batched:
        assert isinstance(store, BatchedRuns)
        stale = attrs.evolve(lease, token=secrets.token_hex(16))
        answers = store.complete_runs(
            [(stale, completion), (lease, completion), (lease, completion)]
        )
        assert [LeaseLostError, None, LeaseLostError] == [
            a if a is None else type(a) for a in answers
        ]
    else:
        store.complete_run(lease, completion)

    assert apply_completion(before, lease, completion) == store.get_sync(sync_id)
    assert [k for i, k in enumerate(keys) if i not in scenario.resolved] == [
        p.idempotency_key for p in store.pending_batches(sync_id)
    ]
    assert None is store.progress(sync_id)
    assert completion.run == store.history(sync_id)[0]


class TestTrustedCopies:
    """
    The rules copy records without re-running converters and validators
    (the hot path); the copy must be what ``attrs.evolve`` would build.
    """

    @given(scenario=completion_scenarios())
    def test_the_completion_rule_equals_a_validated_evolve(
        self, scenario: CompletionScenario
    ) -> None:
        lease = lease_of(scenario.start)
        held = attrs.evolve(scenario.start, lease=lease)
        completion = everything(lease, held)
        changes = completion_changes(
            lease,
            completion,
            generation=held.sync.generation,
            revision=held.revision,
            next_due=held.next_due,
            last_slot=held.last_slot,
        )
        assert apply_completion(held, lease, completion) == attrs.evolve(held, **changes)

    def test_the_claim_rule_equals_a_validated_evolve(self) -> None:
        record = sync_record()
        claimed, lease = apply_claim(record, owner="w", token=secrets.token_hex(16), expires_at=T0)
        assert claimed == attrs.evolve(record, lease=lease, next_due=lease.slot)

    def test_an_unknown_field_is_refused(self) -> None:
        with pytest.raises(TypeError, match="no field"):
            evolve_trusted(sync_record(), nxt_due=T0)


class TestStoresWriteTheRule:
    """
    Every shipped store's complete_run leaves the record apply_completion gives.
    """

    @settings(max_examples=60)
    @given(scenario=completion_scenarios())
    def test_complete_run(self, shared_store: Storage, scenario: CompletionScenario) -> None:
        """Random runs, host changes and completions: the stored record is the rule's."""
        sync_id = f"rule-{next(_ids)}"
        try:
            play(shared_store, scenario, sync_id)
        finally:
            shared_store.delete_sync(sync_id)

    @settings(max_examples=40)
    @given(scenario=completion_scenarios())
    def test_complete_runs(self, shared_store: Storage, scenario: CompletionScenario) -> None:
        """The same through complete_runs, the completion between two refused ones."""
        sync_id = f"rule-{next(_ids)}"
        try:
            play(shared_store, scenario, sync_id, batched=True)
        finally:
            shared_store.delete_sync(sync_id)
