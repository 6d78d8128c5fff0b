"""
MemoryStorage's indexes (the claim heap, the due and rebase indexes, patched
when read) answer exactly what the records themselves say, after any mix of
writes, and claims take the earliest due first; and the random tokens the
engine hands out never repeat, across a fork too.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cohortsync as cs
from cohortsync import _tokens
from cohortsync._sync import SyncRun, SyncStatus
from cohortsync.storage import Completion, Lease, MemoryStorage
from cohortsync.storage._base import derive_due_between
from cohortsync.storage._rules import earliest_claimable, record_claimable_at, scheduled_later
from records import T0, sync_record

FAR = T0 + timedelta(days=400)
IDS = [f"s{i}" for i in range(6)]
MINUTE = timedelta(minutes=1)

minutes = st.integers(min_value=-30, max_value=180).map(lambda m: T0 + timedelta(minutes=m))
steps = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.sampled_from(IDS), minutes, minutes),
        st.tuples(st.just("claim"), minutes, st.integers(min_value=1, max_value=4)),
        st.tuples(st.just("complete"), st.integers(0, 5), minutes, minutes),
        st.tuples(st.just("release"), st.integers(0, 5)),
        st.tuples(st.just("save"), st.sampled_from(IDS), st.booleans(), st.none() | minutes),
        st.tuples(st.just("delete"), st.sampled_from(IDS)),
        st.tuples(st.just("check"), minutes),
    ),
    max_size=40,
)


def _run_of(lease: Lease, at: datetime) -> SyncRun:
    return SyncRun(
        id=f"run-{lease.token[:8]}",
        sync_id=lease.sync_id,
        generation=lease.generation,
        trigger=lease.trigger,
        slot=lease.slot,
        started_at=at,
        finished_at=at,
        status=cs.RunStatus.SUCCEEDED,
        cadence=cs.Cadence.HOURLY,
    )


def _check(store: MemoryStorage, now: datetime) -> None:
    records = store.list_syncs()
    assert [r.id for r in derive_due_between(records, None, FAR, 100)] == [
        r.id for r in store.due_between(None, FAR, 100)
    ]
    assert sorted(r.id for r in scheduled_later(records, now)) == [
        r.id for r in store.scheduled_after(now)
    ]
    active = [r for r in records if record_claimable_at(r) is not None]
    expected = min((record_claimable_at(r) for r in active), default=None)  # type: ignore[type-var]
    assert expected == store.next_due()
    assert (
        earliest_claimable(
            (r.next_due, None if r.lease is None else r.lease.expires_at)  # type: ignore[misc]
            for r in sorted(active, key=lambda r: (r.next_due, r.id))
        )
        == store.next_due()
    )


def _apply(store: MemoryStorage, leases: list[Lease], step: tuple[object, ...]) -> None:
    """One write of a script (or a check of every index)."""
    kind = step[0]
    if kind == "create":
        _, sync_id, due, scheduled_from = step
        if sync_id not in {r.id for r in store.list_syncs()}:
            store.create_sync(sync_record(sync_id, next_due=due, scheduled_from=scheduled_from))  # type: ignore[arg-type]
    elif kind == "claim":
        _, now, limit = step
        claimable = [
            r
            for r in store.list_syncs()
            if (at := record_claimable_at(r)) is not None and at <= now  # type: ignore[operator]
        ]
        expected = [r.id for r in sorted(claimable, key=lambda r: (r.next_due, r.id))][:limit]  # type: ignore[index]
        claimed = store.claim_due(now, "w", timedelta(minutes=5), limit)  # type: ignore[arg-type]
        assert expected == [lease.sync_id for lease in claimed]  # earliest due first
        leases += claimed
    elif kind in ("complete", "release"):
        if leases:
            _end(store, leases.pop(step[1] % len(leases)), step)  # type: ignore[operator]
    elif kind == "save":  # paused or active, maybe due at another time
        _, sync_id, paused, due = step
        if sync_id in {r.id for r in store.list_syncs()}:
            record = store.get_sync(sync_id)
            status = SyncStatus.PAUSED if paused else SyncStatus.ACTIVE
            store.save_sync(
                attrs.evolve(
                    record,
                    sync=attrs.evolve(record.sync, status=status),
                    next_due=record.next_due if due is None else due,  # type: ignore[arg-type]
                ),
                expected_generation=record.sync.generation,
            )
    elif kind == "delete":
        store.delete_sync(step[1])  # type: ignore[arg-type]
    else:
        _check(store, step[1])  # type: ignore[arg-type]


def _end(store: MemoryStorage, lease: Lease, step: tuple[object, ...]) -> None:
    """Release or complete *lease* (it may have been taken over meanwhile)."""
    try:
        if step[0] == "release":
            store.release_lease(lease)
        else:
            _, _, due, at = step
            run = _run_of(lease, at)  # type: ignore[arg-type]
            completion = Completion(run=run, next_due=due, scheduled_from=at)  # type: ignore[arg-type]
            store.complete_run(lease, completion)
    except (cs.exceptions.LeaseLostError, cs.exceptions.DuplicateRunError):
        pass  # taken over after it expired, or the slot ran already


class TestMemoryIndexes:
    """MemoryStorage's indexes agree with its records after any writes."""

    @settings(max_examples=300, deadline=None)
    @given(steps)
    @example(  # a rescheduled sync leaves an earlier, stale hint behind it in the heap
        [
            ("create", "s0", T0 + MINUTE, T0),
            ("create", "s1", T0 + 3 * MINUTE, T0),
            ("save", "s0", False, T0 + 5 * MINUTE),
            ("claim", T0 + 10 * MINUTE, 4),
        ]
    )
    def test_indexes_match_the_records(self, script: list[tuple[object, ...]]) -> None:
        """due_between, scheduled_after and next_due equal the answers derived from every record."""
        store = MemoryStorage()
        leases: list[Lease] = []
        for step in script:
            _apply(store, leases, step)
        _check(store, T0)


class TestTokens:
    """The engine's random tokens: hex of the size asked, never repeated."""

    def test_sizes_and_no_repeats(self) -> None:
        """Thousands of tokens across buffer refills are distinct and of the right length."""
        tokens = [_tokens.token_hex(16) for _ in range(1_000)]
        tokens += [_tokens.token_hex(8) for _ in range(1_000)]
        assert 2_000 == len(set(tokens))
        assert {32, 16} == {len(t) for t in tokens}
        assert 5_000 * 2 == len(_tokens.token_hex(5_000))  # more than a buffer at once

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    def test_a_forked_child_does_not_repeat_its_parent(self) -> None:
        """A child forked with bytes left in the buffer draws fresh ones, not the parent's next."""
        _tokens.token_hex(8)  # the buffer holds unused bytes now
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.write(write, _tokens.token_hex(16).encode())
            os._exit(0)
        os.close(write)
        child = os.read(read, 64).decode()
        os.close(read)
        os.waitpid(pid, 0)
        assert 32 == len(child)
        assert child != _tokens.token_hex(16)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
