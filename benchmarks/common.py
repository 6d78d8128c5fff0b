"""
What the benchmark scenarios share: the result row, the no-op destination,
member keys, a scheduler with one big sync, child processes for memory figures.

Each scenario returns a list of :class:`Row`: one line of the results table.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from measure import Sample

import cohortsync as cs
from cohortsync.storage import Storage
from cohortsync.testing import FakeClock

START = datetime(2030, 1, 1, tzinfo=timezone.utc)
HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    """
    One result: what we measured, the baseline measured in the same run, and
    whether the goal is met.
    """

    scenario: str
    ours: float
    baseline: float | None
    unit: str
    ratio: float | None
    goal: str
    met: bool | None
    note: str = ""
    ours_range: tuple[float, float] | None = None
    baseline_range: tuple[float, float] | None = None
    ratio_range: tuple[float, float] | None = None
    repeats: int = 1

    @classmethod
    def measured(
        cls,
        scenario: str,
        ours: Sample,
        baseline: Sample | None,
        *,
        unit: str,
        goal: str,
        met: Callable[[float, float | None, float | None], bool] | None,
        note: str = "",
        inverse: bool = False,
    ) -> Row:
        """
        A row from interleaved samples: medians, spreads, and the ratio
        ``ours / baseline`` (``baseline / ours`` with *inverse*, for rates
        where the baseline is the ceiling). *met* gets the median of ours, of
        the baseline and the ratio.
        """
        ratio = ratio_range = None
        if baseline is not None:
            r, lo, hi = baseline.ratio(ours) if inverse else ours.ratio(baseline)
            ratio, ratio_range = r, (lo, hi)
        base = None if baseline is None else baseline.median
        return cls(
            scenario=scenario,
            ours=ours.median,
            baseline=base,
            unit=unit,
            ratio=ratio,
            goal=goal,
            met=None if met is None else met(ours.median, base, ratio),
            note=note,
            ours_range=(ours.low, ours.high),
            baseline_range=None if baseline is None else (baseline.low, baseline.high),
            ratio_range=ratio_range,
            repeats=len(ours.values),
        )


class Noop(cs.Destination):
    """
    A destination that accepts everything and does nothing: measures the library.
    """

    capabilities = cs.Capabilities(name="no-op", max_batch_size=10_000)

    def __init__(self) -> None:
        self.calls = 0
        self.members = 0

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.calls += 1
        self.members += len(batch)
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.calls += 1
        self.members += len(batch)
        return cs.DeliveryResult.ok()


def keys(n: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}-{i:010d}" for i in range(n)]


def churned(base: list[str], share: float, generation: int) -> list[str]:
    """
    *base* with *share* of it replaced by new members (half leave, half join).
    """
    k = int(len(base) * share / 2)
    return base[k:] + [f"join{generation}-{i:010d}" for i in range(k)]


def peak_rss_mb() -> float:
    """
    This process's peak resident memory. VmHWM, not ru_maxrss: the latter
    survives fork+exec, so a child would report its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _scheduler(
    storage: Storage, members: Callable[[], Iterable[str]], sorted_keys: bool = False
) -> tuple[cs.Scheduler, FakeClock, Noop]:
    clock = FakeClock(START)
    scheduler = cs.Scheduler(storage, clock=clock, seed=0)
    destination = Noop()
    scheduler.add_destination("noop", destination)
    source = cs.CallableSource(members, sorted_keys=sorted_keys)
    scheduler.add_cohort(cs.Cohort(id="big", name="Big cohort", source=source))
    if not any(s.id == "big" for s in scheduler.syncs()):
        policy = cs.SyncPolicy.daily(guard=cs.MassRemovalGuard.disabled())
        scheduler.create_sync("big", "noop", policy, sync_id="big")
    return scheduler, clock, destination


def _run_once(scheduler: cs.Scheduler, clock: FakeClock) -> cs.SyncRun:
    clock.advance(1)
    scheduler.sync_now("big")
    runs = scheduler.run_due()
    assert len(runs) == 1, runs
    assert runs[0].status is cs.RunStatus.SUCCEEDED, runs[0]
    clock.advance(1)
    return runs[0]


def child(
    target: str, args: tuple[object, ...], *, env: dict[str, str] | None = None
) -> dict[str, float]:
    """
    Run ``target(*args)`` (``"module.function"``) in a fresh interpreter and
    return its JSON result, so peak RSS belongs to that scenario alone.
    *env* adds to the child's environment.
    """
    module, name = target.rsplit(".", 1)
    code = (
        "import importlib, json, sys; sys.path.insert(0, sys.argv[1]); "
        f"m = importlib.import_module({module!r}); "
        f"print(json.dumps(m.{name}(*json.loads(sys.argv[2]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(HERE), json.dumps(list(args))],
        check=True,
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import platform

    return {
        "cpu": cpu,
        "cores": multiprocessing.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
    }


def as_dicts(rows: list[Row]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]
