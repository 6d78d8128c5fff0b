"""usage: perf_query.py KIND WHERE"""
import sys, time, statistics; sys.path.insert(0, "/tmp/outsider19")
from datetime import datetime, timezone, timedelta
import host, cohortsync as cs
from cohortsync.testing import FakeClock
kind, where = sys.argv[1], sys.argv[2]
st = host.make_storage(kind, where)
s = host.build(st, FakeClock(datetime.now(timezone.utc)))
now = s._clock.now() if hasattr(s, "_clock") else datetime.now(timezone.utc)
def tm(f, k=3):
    xs = []
    for _ in range(k):
        t = time.perf_counter(); r = f(); xs.append(time.perf_counter() - t)
    return statistics.median(xs), r
for label, f in [
    ("upcoming(+1min)", lambda: len(s.upcoming(now + timedelta(minutes=1)))),
    ("upcoming(+1h)", lambda: len(s.upcoming(now + timedelta(hours=1)))),
    ("upcoming(+6h)", lambda: len(s.upcoming(now + timedelta(hours=6)))),
    ("upcoming(+24h, limit=10)", lambda: len(s.upcoming(now + timedelta(hours=24), limit=10))),
    ("syncs(limit=10)", lambda: len(s.syncs(limit=10))),
    ("syncs(after='p-0099990', limit=10)", lambda: len(s.syncs(after="p-0099990", limit=10))),
    ("first 10 of iter_syncs()", lambda: sum(1 for _, x in zip(range(10), s.iter_syncs()))),
    ("syncs() all", lambda: len(s.syncs())),
    ("next_run one", lambda: s.next_run("p-0000005")),
]:
    el, r = tm(f, 1 if "all" in label else 3)
    print(f"{kind} {where}: {label:40s} -> {r!s:>8} in {el*1000:8.1f} ms")
