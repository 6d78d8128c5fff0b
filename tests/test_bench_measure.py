"""
The benchmark harness measures by SPEC section 9's rules: interleaved sides,
at least three repeats, medians with spreads, a preparation before each repeat.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from measure import Sample, interleaved


class TestInterleaved:
    def test_sides_alternate_which_goes_first(self) -> None:
        """A B, B A, A B: a drift in the machine's speed falls on both sides."""
        order: list[str] = []

        def side(name: str) -> float:
            order.append(name)
            return 1.0

        interleaved({"a": lambda: side("a"), "b": lambda: side("b")}, repeats=4)
        assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]

    def test_prepare_runs_before_every_repeat_of_every_side(self) -> None:
        """Caches are cleared before each repeat, so no repeat is a hit of the last."""
        events: list[str] = []
        interleaved(
            {"a": lambda: events.append("a") or 1.0, "b": lambda: events.append("b") or 1.0},
            prepare=lambda: events.append("prepare"),
        )
        rounds = [["a", "b"], ["b", "a"], ["a", "b"]]
        assert events == [e for names in rounds for name in names for e in ("prepare", name)]

    def test_fewer_than_three_repeats_are_refused(self) -> None:
        with pytest.raises(ValueError, match="at least 3"):
            interleaved({"a": lambda: 1.0}, repeats=2)


class TestSample:
    def test_median_and_spread(self) -> None:
        sample = Sample((3.0, 1.0, 2.0))
        assert (sample.median, sample.low, sample.high) == (2.0, 1.0, 3.0)

    def test_ratio_is_of_medians_with_the_spread_of_rounds(self) -> None:
        """Each round's ratio pairs the repeats taken together."""
        ours = Sample((2.0, 4.0, 3.0))
        base = Sample((1.0, 1.0, 2.0))
        ratio, low, high = ours.ratio(base)
        assert ratio == 3.0
        assert (low, high) == (1.5, 4.0)
