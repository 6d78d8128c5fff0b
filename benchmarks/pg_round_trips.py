"""
Round trips per run on PostgreSQL, counted rather than timed: every store
connection is traced (libpq's ``PQtrace``) and each ``ReadyForQuery`` the
server sends is one round trip (one wait of the client for the server).

    COHORTSYNC_TEST_POSTGRES_DSN=... python benchmarks/pg_round_trips.py [syncs]

Paths counted, per claimed run (the claim's share included):

- ``claim_due(1)`` / ``claim_due(16)`` + ``complete_run`` per run (the 0.1 loop);
- ``claim_runs(16)`` + one ``complete_runs`` per batch (what the scheduler calls);
- ``Scheduler.run_due()`` over hourly syncs of an unchanged three-member
  cohort: the first pass (each sync's first delivery) and the second, an
  hour later, when nothing changed (an ordinary run).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from common import START, Noop
from psycopg import pq, sql

import cohortsync as cs
from cohortsync.storage import Completion, Lease, PostgresStorage, SyncRecord
from cohortsync.testing import FakeClock

LEASE_FOR = timedelta(minutes=5)


class Traced:
    """
    Connections whose protocol traffic goes to one file; :meth:`count` reads
    how many round trips they made since the last call.
    """

    def __init__(self, dsn: str, path: Path) -> None:
        self._dsn = dsn
        self._path = path
        self._file = path.open("w")
        self._seen = 0

    def connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._dsn, autocommit=True)
        conn.pgconn.trace(self._file.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        return conn

    def count(self) -> int:
        self._file.flush()
        total = sum("\tReadyForQuery\t" in line for line in self._path.open())
        counted, self._seen = total - self._seen, total
        return counted


def _run_of(lease: Lease) -> cs.SyncRun:
    return cs.SyncRun(
        id=f"r-{lease.sync_id}-{lease.slot.isoformat()}",
        sync_id=lease.sync_id,
        generation=lease.generation,
        trigger=lease.trigger,
        slot=lease.slot,
        started_at=lease.slot,
        finished_at=lease.slot,
        status=cs.RunStatus.SUCCEEDED,
        cadence=cs.Cadence.HOURLY,
    )


def _create(store: PostgresStorage, syncs: int) -> None:
    policy = cs.SyncPolicy.hourly()
    for i in range(syncs):
        sync = cs.Sync(
            id=f"s{i:05d}", cohort_id="c", destination_id="d", policy=policy,
            created_at=START, updated_at=START,
        )  # fmt: skip
        store.create_sync(SyncRecord(sync=sync, next_due=START, anchor=START))


def _protocol_loop(store: PostgresStorage, limit: int) -> int:
    done = 0
    while leases := store.claim_due(START, "w", LEASE_FOR, limit):
        for lease in leases:
            store.complete_run(lease, Completion(run=_run_of(lease), next_due=START + LEASE_FOR))
            done += 1
    return done


def _batched_loop(store: PostgresStorage, limit: int) -> int:
    done = 0
    while claims := store.claim_runs(START, "w", LEASE_FOR, limit):
        completions = [
            (c.lease, Completion(run=_run_of(c.lease), next_due=START + LEASE_FOR)) for c in claims
        ]
        assert all(a is None for a in store.complete_runs(completions))
        done += len(claims)
    return done


def _scheduler_passes(store: PostgresStorage, traced: Traced, syncs: int) -> list[float]:
    clock = FakeClock(START)
    scheduler = cs.Scheduler(store, clock=clock, seed=0)
    scheduler.add_destination("noop", Noop())
    source = cs.CallableSource(lambda: ["a", "b", "c"])
    scheduler.add_cohort(cs.Cohort(id="c", name="c", source=source))
    for i in range(syncs):
        scheduler.create_sync("c", "noop", cs.SyncPolicy.hourly(), sync_id=f"h{i:05d}")
    per_run = []
    for _ in range(2):
        clock.advance(3 * 3600)
        traced.count()
        runs = scheduler.run_due()
        assert len(runs) == syncs, runs
        assert all(r.status is cs.RunStatus.SUCCEEDED for r in runs), runs
        per_run.append(traced.count() / syncs)
    return per_run


def main(syncs: int) -> None:
    dsn = os.environ["COHORTSYNC_TEST_POSTGRES_DSN"]
    paths: dict[str, Callable[[PostgresStorage], int]] = {
        "claim_due(1) + complete_run": lambda s: _protocol_loop(s, 1),
        "claim_due(16) + complete_run": lambda s: _protocol_loop(s, 16),
        "claim_runs(16) + complete_runs": lambda s: _batched_loop(s, 16),
    }
    with tempfile.TemporaryDirectory() as tmp, psycopg.connect(dsn, autocommit=True) as admin:
        traced = Traced(dsn, Path(tmp) / "trace")
        for n, (name, loop) in enumerate([*paths.items(), ("scheduler", None)]):
            schema = f"round_trips_{os.getpid()}_{n}"
            try:
                store = PostgresStorage(connect=traced.connect, schema=schema)
                if loop is None:
                    first, second = _scheduler_passes(store, traced, syncs)
                    print(f"Scheduler.run_due, first delivery: {first:.2f} round trips per run")
                    print(f"Scheduler.run_due, nothing changed: {second:.2f} round trips per run")
                else:
                    _create(store, syncs)
                    traced.count()
                    done = loop(store)
                    assert done == syncs
                    print(f"{name}: {traced.count() / syncs:.2f} round trips per run")
                store.close()
            finally:
                admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(schema)))  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
