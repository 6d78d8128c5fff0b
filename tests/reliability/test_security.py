"""
Secrets and hostile identifiers.

A secret is planted where hosts keep credentials (a webhook's Authorization
header and URL query, a host adapter's attribute, a PostgreSQL DSN), then
everything cohortsync emits over runs with failures is searched for it:
reprs, log records at DEBUG, exceptions (message, repr and traceback), events,
history, exports and the ledger. Hostile ids and member keys go through both
SQL stores and come back byte for byte, with every table intact.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import traceback
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from reliability_harness import (
    DSN_VARIABLE,
    T0,
    AudienceServer,
    Figures,
    Plan,
    open_store,
    serving,
)

import cohortsync as cs
from cohortsync._converter import unstructure
from cohortsync.destinations import WebhookDestination
from cohortsync.exceptions import CohortSyncError, StorageError
from cohortsync.testing import FakeClock, MemoryStorage, RecordingDestination

SECRET = "PLANTED-SECRET-123"  # noqa: S105 - a fake secret the tests hunt for
QUERY_SECRET = "PLANTED-QUERY-456"  # noqa: S105 - same
KEY_MARK = "KEYMARK"
HOSTILE = [
    "x'); DROP TABLE syncs; --",
    "c'; DROP TABLE delivered; --",
    'd"; DROP TABLE runs; --',
    "Robert'); DROP TABLE ledger;--",
    "%s %(x)s ? :name $1 \\ ' \"",
    "' OR '1'='1",
]


class HostAdapter(cs.Destination):
    """
    A host-written destination holding its API key in an attribute.
    """

    capabilities = cs.Capabilities(name="host adapter", max_batch_size=10)

    def __init__(self) -> None:
        self.api_key = SECRET
        self.received: set[str] = set()

    def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.received.update(batch.identifiers)
        return cs.DeliveryResult.ok()

    def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        self.received.difference_update(batch.identifiers)
        return cs.DeliveryResult.ok()


def text_of(error: BaseException) -> str:
    return "".join([str(error), repr(error), *traceback.format_exception(error)])


def everything(value: object) -> str:
    """
    A value's repr and, for attrs values, its fields as the converter would
    give them: what a host would log or store.
    """
    shown = repr(value)
    if attrs.has(type(value)):
        shown += json.dumps(unstructure(value), default=str)
    return shown


@pytest.fixture
def plan() -> Plan:
    return Plan()


@pytest.fixture
def server(plan: Plan) -> Iterator[AudienceServer]:
    with serving(plan, slow_for=1.0) as srv:
        yield srv


class TestPlantedSecrets:
    """
    A planted credential never appears in reprs, logs, exceptions, events, history or exports.
    """

    def test_over_runs_with_failures(
        self,
        plan: Plan,
        server: AudienceServer,
        caplog: pytest.LogCaptureFixture,
        figures: Figures,
    ) -> None:
        """Faults of every kind, a 401 that echoes the credentials, DEBUG logging."""
        caplog.set_level(logging.DEBUG)
        # 0 ok, 1 503, 2 429, 3 reject, 4 slow (timeout), 5 401 echoing the header.
        plan.script = {1: "503", 2: "429", 3: "reject", 4: "slow", 5: "401"}
        clock = FakeClock(T0)
        events: list[object] = []
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock, listeners=[events.append])
        webhook = WebhookDestination(
            f"{server.url}?token={QUERY_SECRET}",
            headers={"Authorization": f"Bearer {SECRET}"},
            timeout=0.5,
            batch_size=10,
        )
        host = HostAdapter()
        scheduler.add_destination("hook", webhook)
        scheduler.add_destination("host", host)
        members = [f"user-{i:03d}" for i in range(40)]
        scheduler.add_cohort(cs.Cohort(id="c1", name="Cohort", source=lambda: members))
        scheduler.create_sync("c1", "hook", cs.SyncPolicy.hourly(), sync_id="hooked")
        scheduler.create_sync("c1", "host", cs.SyncPolicy.hourly(), sync_id="hosted")
        runs = scheduler.run_due()
        scheduler.resume_sync("hooked")
        clock.advance(timedelta(minutes=1))
        runs += scheduler.run_due()
        refused = [
            error_of(lambda: WebhookDestination(f"http://user:{SECRET}@example.com/hook")),
            error_of(
                lambda: WebhookDestination(
                    server.url, headers={"Authorization": f"{SECRET}\r\nX: y"}
                )
            ),
            error_of(
                lambda: WebhookDestination(server.url, headers={"Authorization": f"{SECRET}\u20ac"})
            ),
        ]
        plan.always = "401"
        plan.script = {}
        errors = [e for e in [*refused, error_of(lambda: webhook.add(make_batch()))] if e]

        assert "AuthenticationError" in {r.error_type for r in runs}
        assert 4 == len(errors)
        # The receiver did get the credentials: the hunt below is not vacuous.
        assert any(SECRET in h.get("Authorization", "") for h in server.headers_seen)
        emitted = [
            repr(scheduler),
            repr(webhook),
            repr(host),
            *(everything(e) for e in events),
            *(everything(r) for r in runs),
            *(everything(r) for s in ("hooked", "hosted") for r in scheduler.history(s)),
            *(json.dumps(scheduler.export_history(s), default=str) for s in ("hooked", "hosted")),
            *(everything(e) for s in ("hooked", "hosted") for e in scheduler.ledger(s)),
            repr(scheduler.get_sync("hooked")),
            *(text_of(e) for e in errors),
            *(r.getMessage() + (r.exc_text or "") for r in caplog.records),
            caplog.text,
        ]
        leaks = [text for text in emitted if SECRET in text or QUERY_SECRET in text]
        # The 401 body echoed the header back, and what was shown had it blanked out.
        assert any("invalid credentials: ***" in text for text in emitted)
        figures.record(
            "security/planted-secret",
            trials=len(emitted),
            faults=5,
            duplicates=0,
            losses=len(leaks),
        )
        assert [] == leaks

    def test_postgres_dsn_password(self, postgres_dsn: str) -> None:
        """A refused connection names the server, never the DSN's password."""
        dsn = f"postgresql://cohortsync:{SECRET}@127.0.0.1:1/nowhere?connect_timeout=2"
        from cohortsync.storage import PostgresStorage

        with pytest.raises(StorageError) as caught:
            PostgresStorage(dsn, schema="cs_nowhere")

        assert SECRET not in text_of(caught.value)


def error_of(call: Callable[[], object]) -> CohortSyncError | None:
    try:
        call()
    except CohortSyncError as e:
        return e
    return None


def make_batch() -> cs.Batch:
    context = cs.RunContext(
        run_id="r1",
        sync_id="s1",
        generation=1,
        cohort_id="c1",
        cohort_name="Cohort",
        computed_at=T0,
        full_sync=False,
    )
    member = cs.Member("u1", cs.Identifier(cs.IdentifierKind.USER_ID, "u1"))
    return cs.Batch(
        context=context,
        operation=cs.Operation.ADD,
        members=(member,),
        sequence=1,
        idempotency_key="k1",
    )


class Rejecting(RecordingDestination):
    """
    Rejects every member whose key contains a quote, so the ledger holds hostile keys too.
    """

    def _handle(self, batch: cs.Batch) -> cs.DeliveryResult:
        refused = [i for i in batch.identifiers if "'" in i]
        self._apply(batch, [i for i in batch.identifiers if i not in refused])
        self._record(batch, "partial")
        return cs.DeliveryResult.partial(cs.Rejection(i, f"refused {i}") for i in refused)


def tables(store_spec: str) -> set[str]:
    kind, _, where = store_spec.partition(":")
    if kind == "sqlite":
        with closing(sqlite3.connect(where)) as conn:
            return {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    import psycopg

    with psycopg.connect(os.environ[DSN_VARIABLE]) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (where,),
        ).fetchall()
    return {n for (n,) in rows}


class TestHostileIdentifiers:
    """
    SQL-looking ids and member keys are stored and read back verbatim; every table survives.
    """

    def test_hostile_ids_and_keys(self, store_spec: str, figures: Figures) -> None:
        """Sync, cohort and destination ids and member keys that look like SQL injections."""
        store = open_store(store_spec)
        try:
            before = tables(store_spec)
            clock = FakeClock(T0)
            scheduler = cs.Scheduler(store, clock=clock)
            destination = Rejecting()
            scheduler.add_destination(HOSTILE[2], destination)
            keys = [*HOSTILE, *(f"{h}-{i}" for h in HOSTILE for i in range(3))]
            for n, sync_id in enumerate(HOSTILE):
                cohort_id = f"{HOSTILE[(n + 1) % len(HOSTILE)]}#{n}"
                scheduler.add_cohort(cs.Cohort(id=cohort_id, name=sync_id, source=lambda: keys))
                scheduler.create_sync(
                    cohort_id, HOSTILE[2], cs.SyncPolicy.hourly(), sync_id=sync_id
                )
            runs = scheduler.run_due()
            clock.advance(timedelta(hours=2))
            runs += scheduler.run_due()
            accepted = {k for k in keys if "'" not in k}
            delivered = {s: set(store.iter_delivered(s)) for s in HOSTILE}
            ledgers = {s: {e.key for e in scheduler.ledger(s)} for s in HOSTILE}
            exported = scheduler.export_history(HOSTILE[0])
            scheduler.delete_sync(HOSTILE[3])
            after = tables(store_spec)
            ids = {s.id for s in scheduler.syncs()}
        finally:
            store.close()

        figures.record(
            f"security/hostile-sql-{store_spec.partition(':')[0]}",
            trials=len(HOSTILE) * len(keys),
            faults=0,
            duplicates=0,
            losses=sum(len(accepted ^ d) for d in delivered.values()),
        )
        assert before == after
        assert set(HOSTILE) == ids
        assert dict.fromkeys(HOSTILE, accepted) == delivered
        assert {s: set(keys) - accepted for s in HOSTILE} == ledgers
        assert {r.sync_id for r in runs} == set(HOSTILE)
        assert all(r.status is cs.RunStatus.PARTIAL for r in runs)
        assert {m["key"] for row in exported for m in row["members"]} >= set(keys) - accepted  # type: ignore[attr-defined]

    def test_hostile_postgres_schema_names_are_refused(self, postgres_dsn: str) -> None:
        """The one identifier PostgreSQL cannot parameterise is validated instead."""
        from cohortsync.storage import PostgresStorage

        with pytest.raises(cs.exceptions.ConfigurationError):
            PostgresStorage(postgres_dsn, schema="x; DROP SCHEMA public CASCADE; --")


class TestMemberKeysAtInfo:
    """
    Member keys never reach log records at INFO or above, whatever a run goes through.
    """

    def test_no_member_key_at_info(
        self, plan: Plan, server: AudienceServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Rejections, retries, a rate limit, invalid keys and a tripped guard: no key logged."""
        caplog.set_level(logging.INFO)
        plan.script = {0: "reject", 1: "503", 2: "429", 4: "slow"}
        clock = FakeClock(T0)
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        members: list[object] = [f"{KEY_MARK}-{i:04d}" for i in range(1_200)]
        members += [f"{KEY_MARK}-huge-" + "x" * 2_000, "", None]
        source: dict[str, Any] = {"keys": members}
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: source["keys"]))
        scheduler.add_destination(
            "hook", WebhookDestination(server.url, timeout=0.5, batch_size=500)
        )
        scheduler.create_sync("c1", "hook", cs.SyncPolicy.hourly(), sync_id="s1")
        runs = scheduler.run_due()
        source["keys"] = []  # an empty read trips the mass-removal guard
        clock.advance(timedelta(hours=1))
        runs += scheduler.run_due()

        assert [cs.RunStatus.PARTIAL, cs.RunStatus.GUARDED] == [r.status for r in runs]
        assert caplog.records, "nothing was logged at all: the check would be vacuous"
        logged = [
            r.getMessage() + (r.exc_text or "") for r in caplog.records if r.levelno >= logging.INFO
        ]
        assert [] == [line for line in logged if KEY_MARK in line]


class TestNothingOnDisk:
    """
    The store holds ids and state, never a destination object or its credentials.
    """

    def test_the_store_file_holds_no_credential(self, tmp_path: Path) -> None:
        """After a run, no file the SQLite store wrote contains the adapter's API key."""
        path = tmp_path / "cohortsync.db"
        store = open_store(f"sqlite:{path}")
        scheduler = cs.Scheduler(store, clock=FakeClock(T0))
        scheduler.add_destination("host", HostAdapter())
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: ["u1"]))
        scheduler.create_sync("c1", "host", cs.SyncPolicy.hourly(), sync_id="s1")
        scheduler.run_due()
        store.close()

        assert all(SECRET.encode() not in p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
