"""
How every ratio in the benchmarks is measured (SPEC section 9, "How to measure").

- Both sides run interleaved, A B, B A, A B, ..., so that a drift in the
  machine's speed (another process, thermal limits, the page cache) falls on
  both sides alike; at least three repeats.
- Before each repeat of each side, ``prepare`` runs: it clears caches and
  collects garbage, so that no repeat is a cache hit of the one before.
- Each side reports its median and its spread (lowest, highest); a ratio is
  the ratio of the medians, with the spread of the per-repeat ratios.
- The machine's load average is read before and after, so a noisy run shows.
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

REPEATS = max(3, int(os.environ.get("COHORTSYNC_BENCH_REPEATS", "3")))
"""Repeats per side; ``COHORTSYNC_BENCH_REPEATS`` raises it (never below 3)."""


@dataclass(frozen=True)
class Sample:
    """
    The repeats of one side: their median and spread.
    """

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def ratio(self, other: Sample) -> tuple[float, float, float]:
        """
        ``self / other``: the ratio of the medians, then the lowest and highest
        ratio of the repeats taken in the same round.
        """
        pairs = [a / b for a, b in zip(self.values, other.values, strict=True)]
        return self.median / other.median, min(pairs), max(pairs)


def load_average() -> tuple[float, float, float]:
    """
    The 1, 5 and 15 minute load averages (zeros where the OS does not say).
    """
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)
    return (one, five, fifteen)


def collect() -> None:
    """
    The default preparation: a full garbage collection.
    """
    gc.collect()


def interleaved(
    sides: dict[str, Callable[[], float]],
    *,
    repeats: int = REPEATS,
    prepare: Callable[[], None] = collect,
) -> dict[str, Sample]:
    """
    Run each side *repeats* times, interleaved, alternating which goes first.

    Each side is a function that does one repeat and returns what it measured
    (seconds, a rate, megabytes): it may time itself, or run a child process
    and return the child's figure.

    Args:
        sides: Name to one-repeat function; the order is the first round's.
        repeats: Rounds; at least 3.
        prepare: Called before every repeat of every side.

    Returns:
        Each side's repeats, in round order.
    """
    if repeats < 3:
        raise ValueError("at least 3 repeats")
    names = list(sides)
    values: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            prepare()
            values[name].append(float(sides[name]()))
    return {name: Sample(tuple(v)) for name, v in values.items()}
