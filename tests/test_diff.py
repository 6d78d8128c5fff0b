"""
Tests for the diff strategies in cohortsync._diff: set diff, streaming merge
diff for sorted sources, and change-feed diff.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cohortsync as cs
from cohortsync import CallableSource, Changes, _diff
from cohortsync._diff import (
    MAX_KEY_LENGTH,
    Diff,
    chunks,
    diff_changes,
    diff_snapshot,
    diff_with_state,
)
from cohortsync.exceptions import SourceError
from strategies import member_keys


def snapshot(
    members: Iterable[object],
    delivered: Iterable[str],
    *,
    sorted_keys: bool,
    keep_existing: bool = False,
    exclude: frozenset[str] = frozenset(),
) -> Diff:
    keys = list(members)
    held = sorted(set(delivered))
    source = CallableSource(lambda: cast("list[str]", keys), sorted_keys=sorted_keys)
    return diff_snapshot(
        source, "c", iter(held), len(held), keep_existing=keep_existing, exclude=exclude
    )


def outcome(diff: Diff) -> tuple[object, ...]:
    return (
        diff.adds,
        diff.removes,
        diff.existing,
        diff.size,
        diff.delivered,
        # Distinct invalid keys: the set diff sees a repeated invalid key
        # once, a streaming read each time it is yielded.
        sorted(set(diff.invalid)),
    )


class _Feed:
    def __init__(self, changes: Changes) -> None:
        self.changes = changes

    def cursor(self) -> str:
        return "now"

    def changes_since(self, cursor: str) -> Changes:
        return self.changes


class TestSnapshotDiff:
    """
    The set diff and the merge diff of a sorted source agree on everything.
    """

    @given(
        current=st.frozensets(member_keys()),
        delivered=st.frozensets(member_keys()),
        keep_existing=st.booleans(),
        exclude=st.frozensets(member_keys(), max_size=3),
        junk=st.lists(st.sampled_from([None, 7, "", "x" * (MAX_KEY_LENGTH + 1)]), max_size=3),
        data=st.data(),
    )
    def test_merge_diff_equals_set_diff(
        self,
        *,
        current: frozenset[str],
        delivered: frozenset[str],
        keep_existing: bool,
        exclude: frozenset[str],
        junk: list[object],
        data: st.DataObject,
    ) -> None:
        """Any cohort, any delivered state, invalid keys anywhere: both diffs say the same."""
        ascending: list[object] = [*sorted(current)]
        for key in junk:
            ascending.insert(data.draw(st.integers(0, len(ascending))), key)
        shuffled = data.draw(st.permutations(ascending))

        merged = snapshot(
            ascending, delivered, sorted_keys=True, keep_existing=keep_existing, exclude=exclude
        )
        hashed = snapshot(
            shuffled, delivered, sorted_keys=False, keep_existing=keep_existing, exclude=exclude
        )

        assert outcome(hashed) == outcome(merged)
        assert sorted(current - delivered - exclude) == merged.adds
        assert sorted(delivered - current) == merged.removes
        assert (sorted(current & delivered) if keep_existing else None) == merged.existing
        assert len(current) == merged.size

    def test_duplicates_count_once(self) -> None:
        """A key yielded twice is one member, in both strategies."""
        for sorted_keys in (True, False):
            diff = snapshot(["a", "a", "b", "b", "b"], [], sorted_keys=sorted_keys)
            assert (["a", "b"], 2, []) == (list(diff.adds), diff.size, diff.invalid)

    def test_invalid_keys_are_reported_with_reasons(self) -> None:
        """None, ints, '' and over-long keys are skipped with a reason each."""
        diff = snapshot(["ok", None, 3, "", "y" * 2_000], [], sorted_keys=False)

        assert ["ok"] == list(diff.adds)
        assert [
            ("", "invalid_key: empty"),
            ("3", "invalid_key: not a str (int)"),
            ("None", "invalid_key: not a str (NoneType)"),
            ("y" * 97 + "...", f"invalid_key: longer than {MAX_KEY_LENGTH} characters"),
        ] == sorted(diff.invalid)

    @pytest.mark.parametrize("sorted_keys", [True, False])
    def test_str_subclass_keys_are_valid_whatever_else_the_source_yields(
        self, sorted_keys: bool
    ) -> None:
        """A key of a str subclass is a member, with or without invalid keys beside it."""

        class Key(str):
            __slots__ = ()

        clean = snapshot([Key("a"), "b"], [], sorted_keys=sorted_keys)
        mixed = snapshot([Key("a"), "b", None], [], sorted_keys=sorted_keys)

        assert (["a", "b"], []) == (list(clean.adds), clean.invalid)
        assert (["a", "b"], [("None", "invalid_key: not a str (NoneType)")]) == (
            list(mixed.adds),
            mixed.invalid,
        )

    @given(
        st.lists(
            st.one_of(
                member_keys(),
                st.sampled_from(
                    ["", "\x00", "a\x00b", "\ud800", "x\udfff", "y" * 1_025, "z" * 1_024]
                ),
                st.integers(),
                st.none(),
            ),
            max_size=40,
        ),
        st.integers(1, 5),
    )
    def test_keys_checked_a_chunk_at_a_time_as_one_by_one(
        self, keys: list[object], chunk: int
    ) -> None:
        """A chunk that fails the bulk check is checked key by key: the same valid
        keys and the same reasons as checking each key alone, whatever the chunks."""
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_diff, "_CHECK_CHUNK", chunk)
            valid, invalid = _diff._partition(keys)

        assert sorted(k for k in keys if _diff._valid(k)) == valid  # type: ignore[type-var]
        assert sorted(
            (_diff.shown_key(k), _diff._invalid_reason(k)) for k in keys if not _diff._valid(k)
        ) == sorted(invalid)

    def test_an_empty_source_is_flagged(self) -> None:
        """Zero valid members is what the mass-removal guard looks for."""
        assert snapshot([None], ["a"], sorted_keys=False).source_empty
        assert not snapshot(["a"], ["a"], sorted_keys=True).source_empty

    def test_a_sorted_source_out_of_order_raises(self) -> None:
        """Breaking the sorted promise is a SourceError, not a wrong diff."""
        with pytest.raises(SourceError, match="out of order"):
            snapshot(["a", "c", "b"], [], sorted_keys=True)

    @pytest.mark.parametrize("sorted_keys", [True, False])
    def test_a_source_raising_midway_is_a_source_error(self, sorted_keys: bool) -> None:
        """An exception from the host's iterator becomes a SourceError naming it."""

        def members() -> Iterator[str]:
            yield "a"
            raise ConnectionError("gone")

        source = CallableSource(members, sorted_keys=sorted_keys)

        with pytest.raises(SourceError, match="ConnectionError: gone") as info:
            diff_snapshot(source, "c", iter([]), 0, keep_existing=False)
        assert "c" == info.value.cohort_id


class TestChangeDiff:
    """
    A change feed is checked against the delivered state, key by key.
    """

    def test_only_undelivered_adds_and_delivered_removes_are_sent(self) -> None:
        """Re-reading a window re-sends nothing already delivered."""
        feed = _Feed(Changes(("a", "b", "dead"), ("c", "d"), "next"))
        delivered = {"b", "c"}

        diff = diff_changes(
            feed, "c", "prev", lambda keys: set(keys) & delivered, 2, exclude={"dead"}
        )

        assert (["a"], ["c"], "next", None) == (
            list(diff.adds),
            list(diff.removes),
            diff.feed_cursor,
            diff.size,
        )

    def test_a_key_both_entered_and_left_is_an_error(self) -> None:
        """Feeds must report net changes."""
        feed = _Feed(Changes(("a",), ("a",), "next"))

        with pytest.raises(SourceError, match="both entered and left"):
            diff_changes(feed, "c", "prev", set, 0)

    def test_invalid_changed_keys_are_reported(self) -> None:
        """Invalid keys in a feed are skipped with a reason, like in a snapshot."""
        feed = _Feed(Changes(("a", ""), (), "next"))

        diff = diff_changes(feed, "c", "prev", lambda keys: set(), 0)

        assert (["a"], [("", "invalid_key: empty")]) == (list(diff.adds), diff.invalid)


class TestChunks:
    """
    Batches are consecutive slices of at most the batch size.
    """

    @given(items=st.lists(member_keys()), size=st.integers(1, 10))
    def test_chunks_partition_in_order(self, items: list[str], size: int) -> None:
        """Concatenated, the chunks are the input; all but the last are full."""
        parts = list(chunks(items, size))

        assert items == [k for part in parts for k in part]
        assert all(len(part) == size for part in parts[:-1])
        assert all(0 < len(part) <= size for part in parts)


class TestKeyList:
    @given(st.lists(st.text(min_size=1, max_size=20)), st.integers(1, 7))
    def test_round_trips_through_disk(self, keys: list[str], spill_after: int) -> None:
        """Keys come back in order, newlines and backslashes included, however often read."""
        from cohortsync._diff import KeyList

        kept = KeyList(spill_after=spill_after)
        kept.extend(keys)
        try:
            assert keys == list(kept)
            assert keys == list(kept)
            assert len(keys) == len(kept)
            assert all(k in kept for k in keys[:5])
        finally:
            kept.close()

    def test_a_large_sorted_sync_spills_and_delivers_everything(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A sorted source bigger than the in-memory limit still delivers every member."""
        from cohortsync import _diff
        from cohortsync.testing import FakeClock, MemoryStorage, RecordingDestination

        monkeypatch.setattr(_diff, "SPILL_AFTER", 100)
        members = [f"k{i:05d}" for i in range(2_500)]
        scheduler = cs.Scheduler(MemoryStorage(), clock=FakeClock(), seed=0)
        destination = scheduler.add_destination("d", RecordingDestination())
        source = cs.CallableSource(lambda: iter(members), sorted_keys=True)
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=source))
        scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s")

        (run,) = scheduler.run_due()

        assert 2_500 == run.added
        assert set(members) == destination.audience("s")  # type: ignore[attr-defined]


class TestWithState:
    """
    A worker that keeps the delivered state diffs against it: the same diff,
    and the same state, as streaming the state from the store.
    """

    @given(
        st.lists(
            st.one_of(member_keys(3), st.sampled_from(["", None, 7, ("t",)]), st.just(["x"])),
            max_size=30,
        ),
        st.sets(member_keys(3), max_size=20),
        st.sampled_from(["list", "tuple", "set", "generator"]),
        st.booleans(),
    )
    def test_diff_against_the_kept_state_is_the_streamed_diff(
        self, members: list[object], delivered: set[str], kind: str, keep_existing: bool
    ) -> None:
        """Adds, removes, existing, size, the invalid keys and the state agree."""
        hashable = [k for k in members if not isinstance(k, list)]
        if kind in ("set", "tuple") and len(hashable) < len(members):
            members = hashable  # a set cannot hold the unhashable ones to begin with

        def source() -> CallableSource:
            if kind == "set":
                return CallableSource(lambda: cast("set[str]", set(members)))
            if kind == "tuple":
                return CallableSource(lambda: cast("tuple[str, ...]", tuple(members)))
            if kind == "generator":
                return CallableSource(lambda: cast("Iterator[str]", iter(members)))
            return CallableSource(lambda: cast("list[str]", list(members)))

        held = sorted(delivered)
        warm, warm_state = diff_with_state(
            source(),
            "c",
            set(delivered),
            lambda: iter(held),
            len(held),
            keep_existing=keep_existing,
        )
        cold, cold_state = diff_with_state(
            source(), "c", None, lambda: iter(held), len(held), keep_existing=keep_existing
        )
        plain = diff_snapshot(source(), "c", iter(held), len(held), keep_existing=keep_existing)

        assert outcome(plain) == outcome(cold) == outcome(warm)
        assert sorted(cold.invalid) == sorted(warm.invalid)
        assert delivered == cold_state == warm_state


class TestBadKeys:
    @pytest.mark.parametrize("known", [None, {"a"}], ids=["streamed", "kept"])
    def test_a_key_whose_hash_raises_is_a_source_error(self, known: set[str] | None) -> None:
        """A host object that cannot be hashed for a reason of its own fails the read."""

        class Broken:
            def __hash__(self) -> int:
                raise ValueError("no hash today")

        source = CallableSource(lambda: cast("list[str]", ["a", Broken()]))

        with pytest.raises(SourceError, match="ValueError: no hash today"):
            diff_with_state(source, "c", known, lambda: iter(["a"]), 1, keep_existing=False)


class TestOneRead:
    def test_an_unhashable_key_does_not_make_the_source_read_twice(self) -> None:
        """The snapshot is read once even with unhashable keys; the rest is still diffed."""

        class OnceSource:
            reads = 0

            def members(self) -> Iterator[object]:
                self.reads += 1
                if self.reads > 1:
                    return iter(())  # a one-shot feed: a second read sees nothing
                return iter(["a", ["not", "hashable"], "b", {"x": 1}, "c"])

        source = OnceSource()
        diff = diff_snapshot(cast("CallableSource", source), "c1", iter([]), 0, keep_existing=False)

        assert 1 == source.reads
        assert ["a", "b", "c"] == list(diff.adds)
        assert [
            ("<list>", "invalid_key: not a str (list)"),
            ("<dict>", "invalid_key: not a str (dict)"),
        ] == diff.invalid
