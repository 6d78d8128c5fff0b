"""
Claim+complete throughput (SPEC section 9): the library's ``claim_due`` /
``complete_run`` loop on PostgreSQL against a raw psycopg loop doing the same
state changes on the library's own schema, and on SQLite (reported alone).

The library runs three ways: ``claim_due(limit=1)`` and ``claim_due(limit=16)``
with a ``complete_run`` per run (the 0.1 protocol), and ``claim_runs(limit=16)``
with one ``complete_runs`` per claimed batch (``pg-runs``: what
``Scheduler.run_due`` does since 0.2).

Each repeat builds a fresh schema (or SQLite file) of due hourly syncs with the
store itself (a schema then analyzed, as a deployed one is: see
:func:`analyze`), starts worker processes, lets each open its connection, then
releases them together (a barrier) and times from there to the last
completion, so process start-up is not measured. Every due sync must run
exactly once in every repeat.

The raw loop (``pg-raw``), per batch:

- one ``UPDATE ... FROM (SELECT ... ORDER BY next_due, id LIMIT 16 FOR UPDATE
  SKIP LOCKED)`` leasing up to 16 due syncs: the same columns the library's
  claim sets (owner, token, expiry, slot, generation, trigger, revision and
  ``next_due`` moved to the slot), with the library's slot rule;
- then, in one ``conn.pipeline()``, for each lease its own transaction:
  ``BEGIN``; the compare-and-set ``UPDATE`` of the sync row on its token that
  releases the lease, moves ``last_slot`` and, if nobody changed the sync
  meanwhile, advances the schedule (the library's completion rule, in SQL);
  the ``INSERT`` of the run row (its JSON record from the library's codec,
  encoded once per generation/trigger/slot with placeholder ids); the
  ``DELETE`` of the sync's progress row; ``COMMIT``. The update counts are
  checked after the pipeline.

So the baseline writes what the library writes, with as many commits; it
saves the library's round trips (``BEGIN``, the locking read, each statement
waited for) and its Python work (records, leases, codecs).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import sqlite3
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from common import START, Row
from measure import REPEATS, Sample, collect, interleaved

import cohortsync as cs
from cohortsync.storage import (
    BatchedRuns,
    Completion,
    Lease,
    SQLiteStorage,
    Storage,
    SyncRecord,
)
from cohortsync.storage import _sql as q

NOW = START + timedelta(minutes=1)
"""The workers' clock: every sync is due (at START)."""
LEASE_FOR = timedelta(minutes=5)
NEXT_DUE = NOW + timedelta(hours=1)
"""Where each completion moves the schedule."""
BATCH = 16
"""Syncs per claim in the raw loop and in the library's batched side."""

SIDES = {
    "pg-1": "library, claim_due(limit=1)",
    "pg-16": f"library, claim_due(limit={BATCH})",
    "pg-runs": f"library, claim_runs(limit={BATCH}) + complete_runs per batch",
    "pg-raw": f"raw psycopg, claim {BATCH}, pipelined completes",
    "sqlite": "library on SQLite, claim_due(limit=1)",
}

_SKIPPED = "PostgreSQL skipped: set COHORTSYNC_TEST_POSTGRES_DSN (source .ci/postgres.sh start)"

# -- the library's loop ----------------------------------------------------------


def _open_store(kind: str, where: str) -> Storage:
    if kind == "sqlite":
        return SQLiteStorage(where)
    from cohortsync.storage import PostgresStorage

    dsn, schema = where.split("#")
    return PostgresStorage(dsn, schema=schema)


def _library_loop(store: Storage, owner: str, limit: int) -> int:
    """
    Claim *limit* at a time and complete each run, until nothing is due.
    """
    done = 0
    while True:
        leases = store.claim_due(NOW, owner, LEASE_FOR, limit)
        if not leases:
            return done
        for lease in leases:
            store.complete_run(lease, Completion(run=_run_of(lease), next_due=NEXT_DUE))
            done += 1


def _batched_loop(store: Storage, owner: str) -> int:
    """
    What the scheduler does: claim 16 at a time with their records
    (``claim_runs``), then store the batch's completions together
    (``complete_runs``), until nothing is due.
    """
    assert isinstance(store, BatchedRuns)  # every shipped store has the optional part
    done = 0
    while True:
        claims = store.claim_runs(NOW, owner, LEASE_FOR, BATCH)
        if not claims:
            return done
        completions = [
            (c.lease, Completion(run=_run_of(c.lease), next_due=NEXT_DUE)) for c in claims
        ]
        refused = [a for a in store.complete_runs(completions) if a is not None]
        if refused:
            raise AssertionError(f"complete_runs refused {refused}")
        done += len(claims)


def _run_of(lease: Lease) -> cs.SyncRun:
    return cs.SyncRun(
        id=f"r-{lease.sync_id}",
        sync_id=lease.sync_id,
        generation=lease.generation,
        trigger=lease.trigger,
        slot=lease.slot,
        started_at=NOW,
        finished_at=NOW,
        status=cs.RunStatus.SUCCEEDED,
        cadence=cs.Cadence.HOURLY,
    )


# -- the raw loop ----------------------------------------------------------------

# The library's slot rule (SET reads the old row): the due instant, or one
# microsecond after the last recorded slot if a run is recorded at or after it.
_RAW_SLOT = (
    "CASE WHEN s.last_slot IS NOT NULL AND s.next_due <= s.last_slot"
    " THEN s.last_slot + interval '1 microsecond' ELSE s.next_due END"
)
_RAW_CLAIM = (
    "WITH due AS ("
    " SELECT id FROM {s}.syncs"
    " WHERE status = 'active' AND next_due <= %(now)s"
    " AND (lease_token IS NULL OR lease_expires < %(now)s)"
    " ORDER BY next_due, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " UPDATE {s}.syncs AS s SET lease_owner = %(owner)s,"
    " lease_token = gen_random_uuid()::text, lease_expires = %(expires)s,"
    " next_due = {slot}, lease_slot = {slot}, lease_generation = s.generation,"
    " lease_trigger = s.next_trigger, lease_revision = s.revision"
    " FROM due WHERE s.id = due.id"
    " RETURNING s.id, s.lease_token, s.lease_slot, s.generation, s.lease_trigger"
).replace("{slot}", _RAW_SLOT)
# The completion rule: the lease is released and last_slot moves forward; the
# schedule advances only if generation, revision and next_due are what the
# claim saw (an update or "sync now" during the run wins).
_UNCHANGED = "generation = lease_generation AND revision = lease_revision AND next_due = lease_slot"
_RAW_RELEASE = (
    "UPDATE {s}.syncs SET lease_owner = NULL, lease_token = NULL, lease_expires = NULL,"
    " lease_slot = NULL, lease_generation = NULL, lease_trigger = NULL, lease_revision = NULL,"
    " revision = revision + 1,"  # a completion bumps it, as the library's does
    " last_slot = GREATEST(last_slot, %(slot)s),"
    " next_due = CASE WHEN {u} THEN %(next_due)s ELSE next_due END,"
    " next_trigger = CASE WHEN {u} THEN %(next_trigger)s ELSE next_trigger END,"
    " attempts = CASE WHEN {u} THEN %(attempts)s ELSE attempts END,"
    " scheduled_from = CASE WHEN {u} THEN %(scheduled_from)s::timestamptz"
    " ELSE scheduled_from END"
    " WHERE id = %(id)s AND lease_token = %(token)s"
).replace("{u}", _UNCHANGED)
_RAW_INSERT_RUN = (
    "INSERT INTO {s}.runs (sync_id, slot, id, generation, trigger, status, started_at,"
    " finished_at, record) VALUES (%(sync_id)s, %(slot)s, %(id)s, %(generation)s,"
    " %(trigger)s, 'succeeded', %(at)s, %(at)s, %(record)s)"
)
_RAW_DELETE_PROGRESS = "DELETE FROM {s}.progress WHERE sync_id = %s"

_RUN_ID = "@run-id@"
_SYNC_ID = "@sync-id@"


def _record_template(generation: int, trigger: str, slot: datetime) -> str:
    """
    A run record as the library stores it, with placeholder ids: encoded once
    by the library's codec, then filled in per run.
    """
    run = cs.SyncRun(
        id=_RUN_ID,
        sync_id=_SYNC_ID,
        generation=generation,
        trigger=trigger,
        slot=slot,
        started_at=NOW,
        finished_at=NOW,
        status=cs.RunStatus.SUCCEEDED,
        cadence=cs.Cadence.HOURLY,
    )
    record: str = q.run_params(run, q.TIMESTAMPTZ)["record"]
    return record


def _raw_loop(conn: Any, schema: str, owner: str) -> int:
    """
    Claim up to 16 due syncs in one statement, complete them in one pipeline
    (a transaction each), until nothing is due.
    """
    from psycopg import sql

    def render(template: str) -> str:
        text: str = sql.SQL(template).format(s=sql.Identifier(schema)).as_string(conn)
        return text

    claim, release = render(_RAW_CLAIM), render(_RAW_RELEASE)
    insert, delete_progress = render(_RAW_INSERT_RUN), render(_RAW_DELETE_PROGRESS)
    templates: dict[tuple[int, str, datetime], str] = {}
    claim_params = {
        "now": NOW,
        "limit": BATCH,
        "owner": owner,
        "expires": NOW + LEASE_FOR,
    }
    done = 0
    while True:
        rows = conn.execute(claim, claim_params).fetchall()
        if not rows:
            return done
        updates = []
        with conn.pipeline():
            for sync_id, token, slot, generation, trigger in rows:
                template = templates.get((generation, trigger, slot))
                if template is None:
                    template = _record_template(generation, trigger, slot)
                    templates[generation, trigger, slot] = template
                run_id = f"r-{sync_id}"
                record = template.replace(f'"{_RUN_ID}"', json.dumps(run_id)).replace(
                    f'"{_SYNC_ID}"', json.dumps(sync_id)
                )
                conn.execute("BEGIN")
                updates.append(
                    conn.execute(
                        release,
                        {
                            "id": sync_id,
                            "token": token,
                            "slot": slot,
                            "next_due": NEXT_DUE,
                            "next_trigger": "scheduled",
                            "attempts": 0,
                            "scheduled_from": None,
                        },
                    )
                )
                conn.execute(
                    insert,
                    {
                        "sync_id": sync_id,
                        "slot": slot,
                        "id": run_id,
                        "generation": generation,
                        "trigger": trigger,
                        "at": NOW,
                        "record": record,
                    },
                )
                conn.execute(delete_progress, (sync_id,))
                conn.execute("COMMIT")
        lost = [row[0] for row, cur in zip(rows, updates, strict=True) if cur.rowcount != 1]
        if lost:
            raise AssertionError(f"raw loop lost leases of {lost}")
        done += len(rows)


# -- worker processes ------------------------------------------------------------


def claim_worker(side: str, where: str, owner: str, ready: Any, results: Any) -> None:
    """
    Open the store (or connection), wait at *ready* for the others, then claim
    and complete until nothing is due; report how many and when it finished.
    """
    try:
        if side == "pg-raw":
            import psycopg

            dsn, schema = where.split("#")
            conn = psycopg.connect(dsn, autocommit=True)
            ready.wait(timeout=300)
            done = _raw_loop(conn, schema, owner)
            end = time.monotonic()
            conn.close()
        else:
            store = _open_store("sqlite" if side == "sqlite" else "postgres", where)
            ready.wait(timeout=300)
            if side == "pg-runs":
                done = _batched_loop(store, owner)
            else:
                done = _library_loop(store, owner, BATCH if side == "pg-16" else 1)
            end = time.monotonic()
            store.close()
        results.put((done, end, ""))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        ready.abort()
        results.put((0, 0.0, traceback.format_exc()))


def create_syncs(kind: str, where: str, syncs: int) -> None:
    """
    A fresh store holding *syncs* hourly syncs, all due at START.
    """
    store = _open_store(kind, where)
    policy = cs.SyncPolicy.hourly()
    for i in range(syncs):
        sync = cs.Sync(
            id=f"c{i:06d}", cohort_id="c", destination_id="d", policy=policy,
            created_at=START, updated_at=START,
        )  # fmt: skip
        store.create_sync(SyncRecord(sync=sync, next_due=START, anchor=START))
    store.close()


def _claims(side: str, where: str, syncs: int, workers: int) -> float:
    """
    One repeat on a store *create_syncs* filled: *workers* processes released
    together; runs per second from the release to the last completion.
    """
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    ready = ctx.Barrier(workers + 1)
    procs = [
        ctx.Process(target=claim_worker, args=(side, where, f"w{k}", ready, results))
        for k in range(workers)
    ]
    for proc in procs:
        proc.start()
    start = None
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: it says why
        ready.wait(timeout=300)
        start = time.monotonic()
    # Every worker reports, ready or not (a broken barrier reports too).
    reports = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    errors = [error for _, _, error in reports if error]
    if errors:
        raise RuntimeError(f"a {side} worker failed:\n{errors[0]}")
    assert start is not None
    total = sum(done for done, _, _ in reports)
    assert total == syncs, (side, total, syncs)  # every due sync ran exactly once
    check_ran_once("sqlite" if side == "sqlite" else "postgres", where, syncs)
    finish: float = max(end for _, end, _ in reports)
    return syncs / (finish - start)


# -- checks and state ------------------------------------------------------------


def _query(kind: str, where: str, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
    if kind == "sqlite":
        con = sqlite3.connect(where)
        try:
            return con.execute(q.sqlite_text(statement), params).fetchall()
        finally:
            con.close()
    import psycopg
    from psycopg import sql

    dsn, schema = where.split("#")
    with psycopg.connect(dsn, autocommit=True) as conn:
        rendered = sql.SQL(statement).format(s=sql.Identifier(schema))
        return conn.execute(rendered, params).fetchall()


def check_ran_once(kind: str, where: str, syncs: int) -> None:
    """
    The store itself agrees: one run per sync, every sync released and
    scheduled an hour on.
    """
    instants = q.MICROSECONDS if kind == "sqlite" else q.TIMESTAMPTZ
    runs = _query(kind, where, "SELECT count(*), count(DISTINCT sync_id) FROM {s}.runs")
    moved = _query(
        kind,
        where,
        "SELECT count(*) FROM {s}.syncs WHERE lease_token IS NULL AND next_due = %s"
        " AND last_slot = %s",
        (instants.encode(NEXT_DUE), instants.encode(START)),
    )
    assert runs == [(syncs, syncs)], (where, runs, syncs)
    assert moved == [(syncs,)], (where, moved, syncs)


def table_state(where: str) -> dict[str, list[tuple[Any, ...]]]:
    """
    What a PostgreSQL side left (``dsn#schema``): the runs, the sync rows'
    schedule and lease columns, and the progress and pending rows.
    """
    return {
        "runs": _query(
            "postgres",
            where,
            "SELECT sync_id, slot, id, generation, trigger, status, started_at, finished_at,"
            " record FROM {s}.runs ORDER BY sync_id, slot",
        ),
        "syncs": _query(
            "postgres",
            where,
            "SELECT id, definition, generation, status, next_due, next_trigger, slot_offset,"
            " slot_bucket, anchor, attempts, full_resync, feed_cursor, last_full_sync_at,"
            " last_slot, scheduled_from, slot_period, revision, lease_owner, lease_token,"
            " lease_expires, lease_slot, lease_generation, lease_trigger, lease_revision"
            " FROM {s}.syncs ORDER BY id",
        ),
        "progress": _query("postgres", where, "SELECT * FROM {s}.progress"),
        "pending": _query("postgres", where, "SELECT * FROM {s}.pending"),
    }


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def analyze(dsn: str, schema: str) -> None:
    """
    Give the new tables the statistics a running deployment has. Without them
    the claim plan is a bitmap scan and sort of every due row, until
    autoanalyze happens to run (its naptime is a minute): at a random point of
    some timed runs and not others, which flips the plan mid-series.
    """
    import psycopg
    from psycopg import sql

    tables = [sql.Identifier(schema, t) for t in ("syncs", "runs", "progress", "pending")]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.SQL(", ").join(tables)))


_schemas = itertools.count()


def new_schema() -> str:
    """
    A schema name no other repeat or process uses.
    """
    return f"bench_claims_{os.getpid()}_{next(_schemas)}"


def one_repeat(
    side: str,
    dsn: str | None,
    syncs: int,
    workers: int,
    *,
    inspect: Callable[[str], object] | None = None,
) -> float:
    """
    One repeat of one side on a fresh schema (or SQLite file), dropped after;
    *inspect* gets the store's place (``dsn#schema`` or the file) before that.
    """
    if side == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            where = os.path.join(d, "claims.db")
            create_syncs("sqlite", where, syncs)
            rate = _claims(side, where, syncs, workers)
            if inspect is not None:
                inspect(where)
            return rate
    assert dsn is not None
    schema = new_schema()
    where = f"{dsn}#{schema}"
    try:
        create_syncs("postgres", where, syncs)
        analyze(dsn, schema)
        rate = _claims(side, where, syncs, workers)
        if inspect is not None:
            inspect(where)
        return rate
    finally:
        _drop_schema(dsn, schema)


# -- the scenario ----------------------------------------------------------------


_LIBRARY = ("pg-1", "pg-16", "pg-runs")
"""The library's sides, in the order of the table."""


def _side(side: str, dsn: str | None, syncs: int, workers: int) -> Callable[[], float]:
    return lambda: one_repeat(side, dsn, syncs, workers)


def _at_least_half(_ours: float, _raw: float | None, ratio: float | None) -> bool:
    return ratio is not None and ratio >= 0.5


def _rising(_two: float, _one: float | None, ratio: float | None) -> bool:
    return ratio is not None and ratio > 1.0


def scenario_claims(
    syncs: int = 8_000, workers: tuple[int, ...] = (1, 2, 4), repeats: int = REPEATS
) -> list[Row]:
    """
    Claim+complete on PostgreSQL, ours (claiming 1 and 16) against the raw
    loop, for each worker count, and on SQLite; every side of every worker
    count interleaved in one series, so the scaling ratio is paired too.

    8,000 syncs keep the fastest side (the raw loop, 3,000-4,500 runs/s on a
    2-core box) timed for about 2 s; 3,000 left it under a second.
    """
    dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
    kinds = ["pg-1", "pg-raw", "pg-16", "pg-runs", "sqlite"] if dsn else ["sqlite"]
    # Each repeat builds its own schema or file: nothing carries over but
    # garbage in this process, which collect() clears.
    samples = interleaved(
        {f"{kind} x{k}": _side(kind, dsn, syncs, k) for k in workers for kind in kinds},
        repeats=repeats,
        prepare=collect,
    )

    def of(kind: str, k: int) -> Sample:
        return samples[f"{kind} x{k}"]

    what = f"{syncs:,} due syncs, each run exactly once per repeat; timed from a start barrier"
    rows: list[Row] = []
    for k in workers:
        procs = f"{k} worker process{'es' if k > 1 else ''}"
        if dsn:
            rows.extend(
                Row.measured(
                    f"PostgreSQL claim+complete, {procs}: {SIDES[kind]} vs {SIDES['pg-raw']}",
                    of(kind, k),
                    of("pg-raw", k),
                    unit="runs/s",
                    goal=">= 50 % of raw" if k == 1 else "report",
                    met=_at_least_half if k == 1 else None,
                    note=f"{what}; ratio = ours / raw",
                )
                for kind in _LIBRARY
            )
        rows.append(
            Row.measured(
                f"SQLite claim+complete, {procs}: {SIDES['sqlite']}",
                of("sqlite", k),
                None,
                unit="runs/s",
                goal="report",
                met=None,
                note=what if dsn else f"{what}; {_SKIPPED}",
            )
        )
    if dsn and 1 in workers and 2 in workers:
        raw_scaling = of("pg-raw", 2).ratio(of("pg-raw", 1))[0]
        rows.extend(
            Row.measured(
                f"PostgreSQL claim+complete, 1 -> 2 workers, {SIDES[kind]}",
                of(kind, 2),
                of(kind, 1),
                unit="runs/s",
                goal="rising",
                met=_rising,
                note=f"ours = 2 workers, baseline = 1 worker, ratio = 2 / 1 "
                f"(raw loop: {raw_scaling:.2f}); {what}",
            )
            for kind in _LIBRARY
        )
    return rows


# -- one create_sync at a time (issue 19: PostgreSQL <= 1.5x SQLite) ---------------


def _create_one_side(kind: str, dsn: str | None, n: int) -> Callable[[], float]:
    """
    A side of :func:`scenario_create_one`: each call creates *n* default daily
    syncs (first run now: the store picks the bucket in the write) one
    ``create_sync`` at a time into a fresh store, and returns us per create.
    """
    from cohortsync.storage import PostgresStorage
    from cohortsync.testing import FakeClock, RecordingDestination

    def side() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            schema = new_schema()
            store: Storage = (
                PostgresStorage(dsn, schema=schema)
                if kind == "postgres" and dsn
                else SQLiteStorage(Path(tmp) / "create.db")
            )
            try:
                scheduler = cs.Scheduler(store, clock=FakeClock(START), seed=0)
                scheduler.add_cohort(cs.Cohort(id="c", name="c", source=cs.StaticSource(["a"])))
                scheduler.add_destination("d", RecordingDestination())
                policy = cs.SyncPolicy.daily()
                scheduler.create_sync("c", "d", policy, sync_id="warm")  # caches, connection
                t = time.perf_counter()
                for i in range(n):
                    scheduler.create_sync("c", "d", policy, sync_id=f"s{i:06d}")
                seconds = time.perf_counter() - t
                counted = sum(store.slot_counts(86_400, 1_440))  # type: ignore[attr-defined]
                assert n + 1 == counted, (n, counted)
            finally:
                store.close()
                if kind == "postgres" and dsn:
                    _drop_schema(dsn, schema)
        return seconds / n * 1e6

    return side


def scenario_create_one(n: int = 2_000, *, repeats: int = REPEATS) -> list[Row]:
    """
    One ``create_sync`` at a time, PostgreSQL against SQLite, interleaved, a
    fresh store per repeat: *n* default daily syncs (the store picks the
    least loaded bucket inside the write).
    """
    dsn = os.environ.get("COHORTSYNC_TEST_POSTGRES_DSN")
    kinds = ["postgres", "sqlite"] if dsn else ["sqlite"]
    samples = interleaved(
        {kind: _create_one_side(kind, dsn, n) for kind in kinds}, repeats=repeats, prepare=collect
    )
    what = f"{n:,} default daily syncs into a fresh store per repeat, each counted in its bucket"
    if not dsn:
        return [
            Row.measured(
                "create_sync one at a time, SQLite",
                samples["sqlite"],
                None,
                unit="us/create",
                goal="report",
                met=None,
                note=f"{what}; {_SKIPPED}",
            )
        ]
    return [
        Row.measured(
            "create_sync one at a time, PostgreSQL vs SQLite",
            samples["postgres"],
            samples["sqlite"],
            unit="us/create",
            goal="<= 1.5x SQLite",
            met=lambda _o, _b, r: r is not None and r <= 1.5,
            note=f"{what}; ratio = PostgreSQL / SQLite",
        )
    ]
