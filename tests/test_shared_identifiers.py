"""
Members sharing one destination identifier: one request per identifier,
collisions counted, and an identifier kept while any member still maps to
it, through crashes and identifier changes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import cohortsync as cs
from cohortsync.storage import MemoryStorage, SQLiteStorage, Storage
from cohortsync.testing import FakeClock, RecordingDestination
from single_sync import Members, build, run_next

START = datetime(2030, 1, 7, 10, 0, tzinfo=timezone.utc)
EMAIL = cs.IdentifierKind.EMAIL
TEARDOWN = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)


class Crash(BaseException):
    """The worker process dies here: nothing in the engine catches it."""


def drain(scheduler: cs.Scheduler, clock: FakeClock, sync_id: str = "s1") -> list[cs.SyncRun]:
    """Run whatever the sync has due until nothing is scheduled."""
    runs: list[cs.SyncRun] = []
    for _ in range(10):
        due = scheduler.next_run(sync_id)
        if due is None:
            return runs
        clock.set(max(due, clock.now()))
        runs += scheduler.run_due()
    raise AssertionError(f"still scheduled after {runs}")


SHARED = {"u0": "u0@example.com", "u0-dup": "u0@example.com", "u2": "u2@example.com"}


def emailing(
    storage: Storage, clock: FakeClock, dest: cs.Destination, members: set[str]
) -> cs.Scheduler:
    """A worker syncing *members* by email, where u0 and u0-dup share one address."""
    s = cs.Scheduler(storage, clock=clock, seed=1)
    s.add_cohort(cs.Cohort(id="c", name="C", source=lambda: set(members)))
    s.add_destination("d", dest)
    s.add_mapping("email", cs.IdentifierMapping([(cs.IdentifierKind.EMAIL, SHARED.get)]))
    return s


ALIASES = {"u0": "u0", "u9": "u4"}


def aliasing(
    storage: Storage, clock: FakeClock, dest: cs.Destination, members: set[str]
) -> cs.Scheduler:
    """A worker syncing *members*, with an "alias" mapping that sends u9 as u4."""
    s = cs.Scheduler(storage, clock=clock, seed=1)
    s.add_cohort(cs.Cohort(id="c", name="C", source=lambda: set(members)))
    s.add_destination("d", dest)
    s.add_mapping("alias", cs.IdentifierMapping([(cs.IdentifierKind.USER_ID, ALIASES.get)]))
    return s


def a_store(kind: str, tmp_path: Path) -> Storage:
    return MemoryStorage() if kind == "memory" else SQLiteStorage(tmp_path / "s.db")


class TestSharedIdentifiers:
    """
    The delivered state is tracked per identifier: an identifier leaves the
    destination only when no member maps to it any more (defect 12.1).
    """

    @pytest.fixture
    def shared(self, clock: FakeClock) -> tuple[cs.Scheduler, Members, RecordingDestination]:
        emails = {"u1": "ann@example.com", "u2": "ANN@example.com", "u3": "bob@example.com"}
        source = Members(["u1", "u2", "u3"])
        dest = RecordingDestination(cs.Capabilities(max_batch_size=10))
        mapping = cs.IdentifierMapping([(EMAIL, emails.get)])
        return build(clock, source, destination=dest, mapping=mapping), source, dest

    def test_one_request_per_identifier_and_collisions_counted(
        self, clock: FakeClock, shared: tuple[cs.Scheduler, Members, RecordingDestination]
    ) -> None:
        """Two members with one email: the batch holds it once; the run counts the collision."""
        scheduler, _, dest = shared

        run = run_next(scheduler, clock)

        (batch,) = dest.calls(cs.Operation.ADD)
        assert sorted(set(batch.identifiers)) == sorted(batch.identifiers)
        assert ["ann@example.com", "bob@example.com"] == sorted(batch.identifiers)
        assert (2, 1, cs.RunStatus.SUCCEEDED) == (run.added, run.collisions, run.status)

    def test_identifier_stays_while_another_member_needs_it(
        self, clock: FakeClock, shared: tuple[cs.Scheduler, Members, RecordingDestination]
    ) -> None:
        """One of two members sharing an email leaves: nothing is removed; the last one does."""
        scheduler, source, dest = shared
        run_next(scheduler, clock)
        source.keys = ["u2", "u3"]

        left_one = run_next(scheduler, clock)

        assert [] == dest.calls(cs.Operation.REMOVE)
        assert {"ann@example.com", "bob@example.com"} == dest.audience()
        assert (0, 0, 1) == (left_one.added, left_one.removed, left_one.collisions)
        assert (0, 0) == (scheduler.preview("s1").adds, scheduler.preview("s1").removes)
        source.keys = ["u3"]

        left_both = run_next(scheduler, clock)

        assert {"bob@example.com"} == dest.audience()
        assert 1 == left_both.removed

    def test_a_leaver_and_a_joiner_with_one_identifier_send_nothing(
        self, clock: FakeClock, shared: tuple[cs.Scheduler, Members, RecordingDestination]
    ) -> None:
        """u1 leaves while u2 (same email) joins: the identifier stays, no remove, no re-add."""
        scheduler, source, dest = shared
        source.keys = ["u1", "u3"]
        run_next(scheduler, clock)
        source.keys = ["u2", "u3"]

        run = run_next(scheduler, clock)

        assert 1 == len(dest.batches)
        assert {"ann@example.com", "bob@example.com"} == dest.audience()
        assert (0, 0) == (run.added, run.removed)
        source.keys = ["u3"]
        run_next(scheduler, clock)
        assert {"bob@example.com"} == dest.audience()

    def test_realtime_change_feed_keeps_a_shared_identifier(self, clock: FakeClock) -> None:
        """A change feed reporting one of two sharers leaving removes nothing."""

        class Feed:
            def __init__(self) -> None:
                self.keys = {"u1", "u2"}
                self.log: list[tuple[int, set[str], set[str]]] = []

            def members(self) -> Iterable[str]:
                return sorted(self.keys)

            def cursor(self) -> str:
                return str(len(self.log))

            def changes_since(self, cursor: str) -> cs.Changes:
                added: set[str] = set()
                removed: set[str] = set()
                for _, a, r in self.log[int(cursor) :]:
                    added = (added - r) | a
                    removed = (removed - a) | r
                return cs.Changes(added=added, removed=removed, cursor=self.cursor())

            def leave(self, key: str) -> None:
                self.keys.discard(key)
                self.log.append((len(self.log), set(), {key}))

        feed = Feed()
        dest = RecordingDestination(cs.Capabilities(max_batch_size=10))
        emails = {"u1": "ann@example.com", "u2": "ann@example.com"}
        scheduler = build(
            clock,
            feed,
            destination=dest,
            policy=cs.SyncPolicy.realtime(),
            mapping=cs.IdentifierMapping([(EMAIL, emails.get)]),
        )
        run_next(scheduler, clock)
        clock.advance(90)
        feed.leave("u1")

        run = run_next(scheduler, clock)

        assert {"ann@example.com"} == dest.audience()
        assert (0, 1) == (run.removed, run.collisions)

    def test_batches_never_hold_an_identifier_twice_across_chunks(self, clock: FakeClock) -> None:
        """Sharers in different batches (and existing members re-sent in full) are sent once."""
        emails = {f"u{i:02d}": f"person{i % 3}@example.com" for i in range(12)}
        dest = RecordingDestination(cs.Capabilities(max_batch_size=2))
        scheduler = build(
            clock,
            Members(sorted(emails)),
            destination=dest,
            mapping=cs.IdentifierMapping([(EMAIL, emails.get)]),
        )

        first = run_next(scheduler, clock)
        scheduler.request_full_resync("s1")
        full = run_next(scheduler, clock)

        sent = [i for b in dest.calls(cs.Operation.ADD) for i in b.identifiers]
        assert 6 == len(sent)  # three identifiers, each sent once per run
        assert (3, 9) == (first.added, first.collisions)
        assert 3 == full.added

    @pytest.mark.parametrize("store", ["memory", "sqlite"])
    def test_identity_mapping_still_sees_an_identifier_another_member_holds(
        self, clock: FakeClock, store: str, tmp_path: Path
    ) -> None:
        """
        After a switch to the identity mapping, a joiner whose key another
        member holds as its identifier is not sent again, and that member
        leaving removes nothing while the joiner holds it (a steady run under
        the identity mapping asks the store, it does not assume).
        """
        storage = a_store(store, tmp_path)
        source = Members(["a", "x"])
        dest = RecordingDestination(cs.Capabilities(max_batch_size=10))
        alias = cs.IdentifierMapping([(cs.IdentifierKind.USER_ID, {"a": "b", "x": "x"}.get)])
        scheduler = build(clock, source, destination=dest, mapping=alias, storage=storage)
        run_next(scheduler, clock)
        scheduler.update_sync("s1", mapping_id=None)
        run_next(scheduler, clock)  # the update's run: nothing changed
        source.keys = ["a", "b", "x", "y"]

        joined = run_next(scheduler, clock)

        assert [["b", "x"], ["y"]] == [sorted(b.identifiers) for b in dest.calls(cs.Operation.ADD)]
        assert (1, 1) == (joined.added, joined.collisions)
        source.keys = ["b", "x"]

        left = run_next(scheduler, clock)

        assert [["y"]] == [list(b.identifiers) for b in dest.calls(cs.Operation.REMOVE)]
        assert {"b", "x"} == dest.audience()
        assert 1 == left.removed

    def test_a_steady_identity_run_asks_one_question_of_the_store(self, clock: FakeClock) -> None:
        """
        Under the identity mapping, with no member holding another identifier,
        a run that adds and removes members asks the store one question
        (has_mapped_identifiers), not one per member; with a mapped member
        delivered it asks about each.
        """

        class Counting(MemoryStorage):
            holders_asked = 0

            def identifier_holders(
                self, sync_id: str, identifiers: Iterable[cs.Identifier]
            ) -> dict[cs.Identifier, list[str]]:
                self.holders_asked += 1
                return super().identifier_holders(sync_id, identifiers)

        storage = Counting()
        source = Members(["a", "b", "c"])
        dest = RecordingDestination(cs.Capabilities(max_batch_size=10))
        alias = cs.IdentifierMapping([(cs.IdentifierKind.USER_ID, {"m": "a"}.get)])
        scheduler = build(clock, source, destination=dest, storage=storage)
        scheduler.add_mapping("alias", alias)
        run_next(scheduler, clock)
        source.keys = ["b", "c", "d"]

        steady = run_next(scheduler, clock)

        assert (1, 1, 0) == (steady.added, steady.removed, storage.holders_asked)
        scheduler.update_sync("s1", mapping_id="alias")
        source.keys = ["b", "c", "d", "m"]
        run_next(scheduler, clock)  # m delivered as USER_ID(a): a mapped identifier
        scheduler.update_sync("s1", mapping_id=None)
        run_next(scheduler, clock)
        source.keys = ["c", "d", "e", "m"]

        mixed = run_next(scheduler, clock)

        assert (1, 1) == (mixed.added, mixed.removed)
        assert storage.holders_asked > 0
        assert {"a", "c", "d", "e"} == dest.audience()


class TestSharedIdentifiersThroughCrashes:
    """A crash mid-handover neither leaks nor loses an identifier members share (model test)."""

    def test_a_handover_cut_short_leaks_nothing(self) -> None:
        """
        u0 leaves while u0-dup (same email) joins, and the run fails between
        the removals and the adds: u0 used to be dropped already, so when
        u0-dup left too nobody removed the address.
        """

        class FailsOnce(RecordingDestination):
            fail = False

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                if self.fail:
                    self.fail = False
                    raise cs.exceptions.PermanentError("HTTP 404 (once)")
                return super().remove(batch)

        clock = FakeClock(START)
        members = {"u0", "u2"}
        dest = FailsOnce()
        s = emailing(MemoryStorage(), clock, dest, members)
        s.create_sync("c", "d", TEARDOWN, sync_id="s1", mapping_id="email")
        s.run_due()
        members.clear()
        members.update({"u0-dup"})
        dest.fail = True  # removing u2 fails before u0-dup is handled
        s.sync_now("s1")
        assert cs.RunStatus.FAILED == s.run_due()[0].status
        assert "u0" in set(s.storage.iter_delivered("s1"))  # it still holds the address

        members.discard("u0-dup")
        members.add("u2")
        s.sync_now("s1")
        s.run_due()
        assert {"u2@example.com"} == dest.audience("s1")
        s.delete_sync("s1")
        drain(s, clock)
        assert set() == dest.audience("s1")

    def test_a_joiner_sharing_a_recovered_address_is_sent(self) -> None:
        """
        A crash leaves "add u0" pending (never applied); u0 leaves, u0-dup
        joins: the address must be sent (it used to be recorded as held).
        """

        class DiesFirst(RecordingDestination):
            armed = True

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                if self.armed:
                    self.armed = False
                    raise Crash
                return super().add(batch)

        clock = FakeClock(START)
        storage = MemoryStorage()
        members = {"u0"}
        dest = DiesFirst()
        emailing(storage, clock, dest, members).create_sync(
            "c", "d", cs.SyncPolicy.hourly(), sync_id="s1", mapping_id="email"
        )
        with pytest.raises(Crash):
            emailing(storage, clock, dest, members).run_due()
        members.clear()
        members.add("u0-dup")
        clock.advance(timedelta(minutes=6))
        emailing(storage, clock, dest, members).run_due()

        assert {"u0@example.com"} == dest.audience("s1")
        assert ["u0-dup"] == list(storage.iter_delivered("s1"))

    @pytest.mark.parametrize("switch_to", ["identity", "alias"])
    @pytest.mark.parametrize("store", ["memory", "sqlite"])
    def test_an_add_lost_in_a_crash_then_a_mapping_switch_leaves_nothing_behind(
        self, store: str, switch_to: str, tmp_path: Path
    ) -> None:
        """
        The vendor applies "add u9" under one mapping and the worker dies
        before the answer; the sync then switches mappings, and the takeover
        adds u9 under its new identifier. The one it was sent with is
        removed first: it used to stay at the destination for good, through
        full resyncs and teardown (outsider attack, 2026-12-02).
        """

        class AppliesThenDies(RecordingDestination):
            armed = False

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                result = super().add(batch)
                if self.armed:
                    self.armed = False
                    raise Crash  # applied at the vendor, never acknowledged
                return result

        clock = FakeClock(START)
        storage = a_store(store, tmp_path)
        members = {"u0"}
        dest = AppliesThenDies()

        start, then = ("alias", None) if switch_to == "identity" else (None, "alias")
        worker = functools.partial(aliasing, storage, clock, dest, members)
        worker().create_sync("c", "d", TEARDOWN, sync_id="s1", mapping_id=start)
        worker().run_due()
        members.add("u9")
        dest.armed = True
        clock.advance(timedelta(hours=1))
        with pytest.raises(Crash):
            worker().run_due()
        sent = "u4" if switch_to == "identity" else "u9"
        assert {"u0", sent} == dest.audience("s1")

        worker().update_sync("s1", mapping_id=then)
        clock.advance(timedelta(minutes=10))  # the crashed lease expires
        runs = worker().run_due()

        now = "u9" if switch_to == "identity" else "u4"
        assert {"u0", now} == dest.audience("s1")
        assert [(1, 1, cs.RunStatus.SUCCEEDED)] == [(r.added, r.removed, r.status) for r in runs]
        scheduler = worker()
        scheduler.request_full_resync("s1")
        clock.advance(timedelta(seconds=1))
        scheduler.run_due()
        assert {"u0", now} == dest.audience("s1")
        scheduler.delete_sync("s1")
        drain(scheduler, clock)
        assert set() == dest.audience("s1")

    @pytest.mark.parametrize("arrived", [True, False])
    @pytest.mark.parametrize("store", ["memory", "sqlite"])
    def test_a_removal_lost_in_a_crash_then_a_mapping_switch_keeps_the_identifier_held(
        self, store: str, arrived: bool, tmp_path: Path
    ) -> None:
        """
        "Remove u9" (sent as u4) may or may not arrive before the worker
        dies; the sync switches to the identity mapping and u9 comes back
        before the takeover. The takeover adds u9 again with the identifier
        the delivered state holds (u4), as ordinary runs keep a staying
        member's identifier: re-resolving it left u4 behind for good.
        """

        class RemovesThenDies(RecordingDestination):
            armed = False

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                if not self.armed:
                    return super().remove(batch)
                self.armed = False
                if arrived:
                    super().remove(batch)
                raise Crash

        clock = FakeClock(START)
        storage = a_store(store, tmp_path)
        members = {"u0", "u9"}
        dest = RemovesThenDies()

        worker = functools.partial(aliasing, storage, clock, dest, members)
        worker().create_sync("c", "d", TEARDOWN, sync_id="s1", mapping_id="alias")
        worker().run_due()
        members.discard("u9")
        dest.armed = True
        clock.advance(timedelta(hours=1))
        with pytest.raises(Crash):
            worker().run_due()
        worker().update_sync("s1", mapping_id=None)
        members.add("u9")
        clock.advance(timedelta(minutes=10))  # the crashed lease expires

        (run,) = worker().run_due()

        assert {"u0", "u4"} == dest.audience("s1")
        assert (1, 0) == (run.added, run.removed)
        scheduler = worker()
        scheduler.delete_sync("s1")
        drain(scheduler, clock)
        assert set() == dest.audience("s1")

    def test_a_joiner_sharing_an_address_whose_removal_was_in_flight_is_sent(self) -> None:
        """
        The vendor applies "remove u0" and the worker dies before the answer:
        u0 is still delivered as far as the store knows. u0-dup (same email)
        joins before the takeover: the address may be gone, so it must be
        sent again (it used to be handed over to u0-dup as held; found by the
        long model test, SQLite, seed 2738...).
        """

        class DiesAfterRemoving(RecordingDestination):
            armed = True

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                result = super().remove(batch)
                if self.armed:
                    self.armed = False
                    raise Crash  # applied, the answer never arrives
                return result

        clock = FakeClock(START)
        storage = MemoryStorage()
        members = {"u0", "u2"}
        dest = DiesAfterRemoving()
        emailing(storage, clock, dest, members).create_sync(
            "c", "d", cs.SyncPolicy.hourly(), sync_id="s1", mapping_id="email"
        )
        emailing(storage, clock, dest, members).run_due()
        members.discard("u0")
        worker = emailing(storage, clock, dest, members)
        worker.sync_now("s1")
        with pytest.raises(Crash):
            worker.run_due()
        assert {"u2@example.com"} == dest.audience("s1")
        assert "u0" in set(storage.iter_delivered("s1"))

        members.add("u0-dup")
        clock.advance(timedelta(minutes=6))
        emailing(storage, clock, dest, members).run_due()

        assert {"u0@example.com", "u2@example.com"} == dest.audience("s1")
        assert ["u0-dup", "u2"] == sorted(storage.iter_delivered("s1"))

    def test_a_full_resend_does_not_repeat_a_joiners_request(self) -> None:
        """
        A full resync fails in an outage, leaving "add u0" pending; u0-dup
        (same email) joins. The next run sends the address once: the full
        resend of u0 is settled by the joiner's answer (it used to re-send the
        same request, same key, which the long model test saw recorded twice).
        """

        class Outage(RecordingDestination):
            down = False

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                if self.down:
                    raise cs.exceptions.TransientError("HTTP 503")
                return super().add(batch)

        clock = FakeClock(START)
        members = {"u0"}
        dest = Outage()
        s = emailing(MemoryStorage(), clock, dest, members)
        s.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s1", mapping_id="email")
        s.run_due()
        dest.down = True
        s.request_full_resync("s1")
        assert cs.RunStatus.FAILED == s.run_due()[0].status
        dest.down = False
        members.add("u0-dup")
        clock.advance(timedelta(hours=2))

        (run,) = s.run_due()

        keys = [b.idempotency_key for b in dest.batches if b.operation is cs.Operation.ADD]
        assert len(keys) == len(set(keys)), keys
        assert {"u0@example.com"} == dest.audience("s1")
        assert 1 == run.batches

    def test_a_refused_shared_address_is_sent_once(self) -> None:
        """Two joiners share an address the vendor refuses, in two batches: one request."""

        class Refuses(RecordingDestination):
            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                super().add(batch)
                return cs.DeliveryResult.partial(
                    cs.Rejection(i, "unknown user") for i in batch.identifiers
                )

        clock = FakeClock(START)
        dest = Refuses(cs.Capabilities(max_batch_size=1))
        s = emailing(MemoryStorage(), clock, dest, {"u0", "u0-dup"})
        s.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s1", mapping_id="email")

        (run,) = s.run_due()

        assert 1 == len(dest.batches)
        assert (1, 1) == (run.rejected, run.collisions)
        assert {"u0", "u0-dup"} == {e.key for e in s.ledger("s1")}

    def test_a_member_back_after_two_takeovers_is_not_deduplicated_away(self) -> None:
        """
        add u3 applied, worker killed; u3 leaves, the takeover removes it and
        is killed; u3 comes back: its add used to reuse the first add's key,
        which a de-duplicating vendor ignored.
        """

        class Dedup(cs.Destination):
            capabilities = cs.Capabilities(max_batch_size=1)

            def __init__(self) -> None:
                self.audience: set[str] = set()
                self.seen: set[str] = set()
                self.die_after: str | None = None
                self.die_before: str | None = None

            def _do(self, batch: cs.Batch, *, add: bool) -> cs.DeliveryResult:
                if self.die_before in batch.identifiers:
                    self.die_before = None
                    raise Crash
                if batch.idempotency_key not in self.seen:
                    self.seen.add(batch.idempotency_key)
                    change = self.audience.update if add else self.audience.difference_update
                    change(batch.identifiers)
                if self.die_after in batch.identifiers:
                    self.die_after = None
                    raise Crash
                return cs.DeliveryResult.ok()

            def add(self, batch: cs.Batch) -> cs.DeliveryResult:
                return self._do(batch, add=True)

            def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
                return self._do(batch, add=False)

        clock = FakeClock(START)
        storage = MemoryStorage()
        vendor = Dedup()
        members = {"u1"}

        def run() -> None:
            s = cs.Scheduler(storage, clock=clock, seed=1)
            s.add_cohort(cs.Cohort(id="c", name="C", source=lambda: set(members)))
            s.add_destination("d", vendor)
            try:
                s.run_due()
            except Crash:
                clock.advance(timedelta(minutes=6))

        first = cs.Scheduler(storage, clock=clock, seed=1)
        first.add_cohort(cs.Cohort(id="c", name="C", source=lambda: set(members)))
        first.add_destination("d", vendor)
        first.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s1")
        run()
        members.add("u3")
        vendor.die_after = "u3"
        first.sync_now("s1")
        run()
        members.discard("u3")
        members.add("u4")
        vendor.die_before = "u4"
        run()
        members.add("u3")
        run()
        clock.advance(timedelta(hours=2))
        run()

        assert members == vendor.audience


class TestIdentifierChanges:
    """A member whose identifier changes is moved at the destination by a full resync."""

    def test_an_email_change_is_sent_by_a_full_resync_and_torn_down(self) -> None:
        """
        k1 stays in the cohort but its email changes: a full resync removes the
        old address and adds the new one (it used to add the new one and
        forget the old, which then survived even a REMOVE_DELIVERED teardown).
        """
        emails = {"k1": "old@x.io", "k2": "k2@x.io"}
        clock = FakeClock(START)
        destination = RecordingDestination()
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock, seed=1)
        scheduler.add_destination("d", destination)
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["k1", "k2"]))
        scheduler.add_mapping(
            "email", cs.IdentifierMapping([(cs.IdentifierKind.EMAIL, emails.get)])
        )
        policy = cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)
        scheduler.create_sync("c", "d", policy, sync_id="s1", mapping_id="email")
        scheduler.run_due()
        emails["k1"] = "new@x.io"

        clock.advance(timedelta(hours=1))
        (ordinary,) = scheduler.run_due()
        assert (0, 0) == (ordinary.added, ordinary.removed)  # documented: full sends only
        scheduler.request_full_resync("s1")
        (full,) = scheduler.run_due()

        assert {"new@x.io", "k2@x.io"} == destination.audience("s1")
        assert "identifier_changed" in full.notes
        scheduler.delete_sync("s1")
        scheduler.run_due()
        assert set() == destination.audience("s1")
