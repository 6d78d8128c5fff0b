"""
Run the benchmarks and print one table: scenario, ours, baseline, ratio, goal, met?

    python benchmarks/run.py               # every scenario at full size
    python benchmarks/run.py spread diff   # some of them

The table is also written as JSON to benchmarks/results/latest.json, with the
machine it ran on. A benchmark is not a test: the test suite runs each
scenario small (tests/test_benchmarks_smoke.py) for correctness only.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenarios
from measure import REPEATS, load_average

RESULTS = Path(__file__).resolve().parent / "results"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("calls/s", "runs/s"):
        # A rate of a few per second (delivery to a slow server) needs decimals.
        return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.2f} {unit}"
    if unit == "x":
        return f"{value:.3f}x"
    return f"{value:,.3f} {unit}"


def _spread(span: tuple[float, float] | None, unit: str) -> str:
    if span is None:
        return ""
    lo, hi = (_fmt(v, unit).split(" ")[0] for v in span)
    return f" ({lo}-{hi})"


def table(rows: list[scenarios.Row]) -> str:
    """
    The results as a Markdown table: medians, with the spread of the repeats
    in brackets and the number of repeats.
    """
    lines = [
        "| scenario | ours | baseline | ratio | goal | met? | n | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        if r.ratio_range is not None:
            ratio += f" ({r.ratio_range[0]:.2f}-{r.ratio_range[1]:.2f})"
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        ours = _fmt(r.ours, r.unit) + _spread(r.ours_range, r.unit)
        base = _fmt(r.baseline, r.unit) + _spread(r.baseline_range, r.unit)
        lines.append(
            f"| {r.scenario} | {ours} | {base} | {ratio} | {r.goal} | {met} | {r.repeats} "
            f"| {r.note} |"
        )
    return "\n".join(lines)


def main(names: list[str]) -> int:
    chosen = names or list(scenarios.SCENARIOS)
    unknown = [n for n in chosen if n not in scenarios.SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(scenarios.SCENARIOS)}")
        return 2
    rows: list[scenarios.Row] = []
    loads: dict[str, object] = {}
    started = time.perf_counter()
    for name in chosen:
        t = time.perf_counter()
        before = load_average()
        print(f"running {name} (load average {before[0]:.2f}) ...", flush=True)
        rows += scenarios.SCENARIOS[name]()
        after = load_average()
        loads[name] = {"before": before, "after": after}
        print(
            f"  {name} took {time.perf_counter() - t:.1f} s (load average {after[0]:.2f})",
            flush=True,
        )
    info = scenarios.machine()
    text = table(rows)
    print()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, "
        f"Python {info['python']}, SQLite {info['sqlite']}; {REPEATS} interleaved repeats "
        "per side, medians with (lowest-highest)"
    )
    print(
        "load average (1 min) per scenario, before -> after: "
        + ", ".join(
            f"{name} {v['before'][0]:.2f} -> {v['after'][0]:.2f}"  # type: ignore[index]
            for name, v in loads.items()
        )
    )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "seconds": round(time.perf_counter() - started, 1),
        "repeats": REPEATS,
        "load_average": loads,
        "rows": scenarios.as_dicts(rows),
        "table": text,
    }
    name = "latest.json" if not names else f"partial-{'-'.join(chosen)}.json"
    (RESULTS / name).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
