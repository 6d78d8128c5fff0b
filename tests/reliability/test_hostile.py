"""
Hostile input: junk through the public API, hand-damaged store rows, and
membership sources that misbehave. Each gets a typed error (a
``cohortsync.exceptions`` error, or ``TypeError`` for a naive or non-datetime
instant) or a recorded skip, and the delivered state keeps matching what the
destination acknowledged.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reliability_harness import T0, Figures, open_store

import cohortsync as cs
from cohortsync.exceptions import CohortSyncError, SourceError, StorageError
from cohortsync.storage import SQLiteStorage
from cohortsync.testing import FakeClock, MemoryStorage, RecordingDestination

UTC = timezone.utc

# -- junk ----------------------------------------------------------------------------------

EARLIEST = datetime.min + timedelta(days=1)  # noqa: DTZ901 - naive on purpose: hostile input
LATEST = datetime.max - timedelta(days=1)  # noqa: DTZ901 - same
naive_datetimes = st.datetimes(min_value=EARLIEST, max_value=LATEST)
aware_datetimes = st.datetimes(
    min_value=EARLIEST,
    max_value=LATEST,
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-11)), timezone(timedelta(hours=14))]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(math.nan),
    st.text(max_size=20),
    st.text(min_size=1, max_size=3).map(lambda s: s * 2_000),
    st.binary(max_size=10),
    naive_datetimes,
    aware_datetimes,
    st.timedeltas(),
)
junk = st.one_of(
    scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=3), scalars)
)
hashable_junk = st.one_of(scalars, st.tuples(scalars))
enum_junk = st.one_of(
    st.sampled_from(["hourly", "daily", "weekly", "HOURLY", "", "realtime "]), junk
)


def typed(call: Callable[[], object], *, instants: bool = False) -> None:
    """
    Run *call*; it may succeed, or fail with a cohortsync error (or, when it
    takes instants, a ``TypeError`` about the datetime). Anything else fails.
    """
    try:
        call()
    except CohortSyncError:
        pass
    except TypeError as e:
        if not instants or "datetime" not in str(e):
            raise


class TestPublicApiFuzz:
    """
    Junk given to constructors and scheduler methods raises typed errors, never anything else.
    """

    @given(
        fields=st.fixed_dictionaries(
            {
                "id": st.one_of(st.just("c1"), junk),
                "name": st.one_of(st.just("Cohort"), junk),
                "type": st.one_of(st.sampled_from(list(cs.CohortType)), enum_junk),
                "size": st.one_of(st.none(), st.integers(min_value=0), junk),
                "source": st.one_of(st.none(), st.just(lambda: ["u1"]), junk),
            }
        )
    )
    def test_cohort(self, fields: dict[str, Any]) -> None:
        """Cohort ids, names, types, sizes and sources."""
        typed(lambda: cs.Cohort(**fields))

    @given(
        fields=st.fixed_dictionaries(
            {
                "cadence": st.one_of(st.sampled_from(list(cs.Cadence)), enum_junk),
                "timezone": st.one_of(
                    st.none(), st.sampled_from(["Europe/Berlin", "Mars/Base", "../../etc"]), junk
                ),
                "send_removals": st.one_of(st.booleans(), junk),
                "on_ineligible": st.one_of(st.sampled_from(list(cs.OnIneligible)), enum_junk),
                "on_delete": st.one_of(st.sampled_from(list(cs.OnDelete)), enum_junk),
                "one_time_attempts": st.one_of(st.integers(min_value=1, max_value=10), junk),
                "rejection_attempts": st.one_of(st.integers(min_value=1, max_value=10), junk),
            }
        ),
        guard=st.fixed_dictionaries(
            {
                "max_share": st.one_of(st.floats(min_value=0, max_value=1), junk),
                "min_audience": st.one_of(st.integers(min_value=0), junk),
                "enabled": st.one_of(st.booleans(), junk),
            }
        ),
        retry=st.fixed_dictionaries(
            {
                "max_retries": st.one_of(st.integers(min_value=0, max_value=10), junk),
                "initial": st.one_of(st.floats(min_value=0, max_value=10), junk),
                "multiplier": st.one_of(st.floats(min_value=1, max_value=10), junk),
                "jitter": st.one_of(st.floats(min_value=0, max_value=1), junk),
            }
        ),
    )
    def test_sync_policy(
        self, fields: dict[str, Any], guard: dict[str, Any], retry: dict[str, Any]
    ) -> None:
        """Cadences, time zones, guards, retry policies and attempt counts."""

        def build() -> object:
            return cs.SyncPolicy(
                guard=cs.MassRemovalGuard(**guard), retry=cs.RetryPolicy(**retry), **fields
            )

        typed(build)

    @given(
        fields=st.fixed_dictionaries(
            {
                "max_batch_size": st.one_of(st.integers(min_value=1, max_value=10_000), junk),
                "max_parallel": st.one_of(st.integers(min_value=1, max_value=8), junk),
                "accepted_identifiers": st.one_of(
                    st.none(),
                    st.lists(
                        st.one_of(st.sampled_from(list(cs.IdentifierKind)), enum_junk), max_size=3
                    ),
                    st.text(max_size=10),
                ),
                "membership_ttl": st.one_of(st.none(), st.timedeltas(), junk),
                "min_audience_size": st.one_of(st.none(), st.integers(min_value=0), junk),
                "supports_realtime": st.one_of(st.booleans(), junk),
                "full_sync_only": st.one_of(st.booleans(), junk),
            }
        ),
        requests=st.one_of(st.integers(min_value=1), junk),
        per=st.one_of(st.floats(min_value=0.1, max_value=60), junk),
    )
    def test_capabilities(self, fields: dict[str, Any], requests: object, per: object) -> None:
        """Batch sizes, parallelism, rate limits, identifier kinds (scalars: see the xfail)."""

        def build() -> object:
            rate = cs.RateLimit(requests, per)  # type: ignore[arg-type]
            return cs.Capabilities(rate_limit=rate, **fields)

        typed(build)

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        ids=st.tuples(
            st.one_of(st.just("c1"), hashable_junk),
            st.one_of(st.just("d1"), hashable_junk),
        ),
        policy=st.one_of(st.just(cs.SyncPolicy.hourly()), junk),
        options=st.fixed_dictionaries(
            {
                "sync_id": st.one_of(
                    st.none(), st.just("x'); DROP TABLE syncs; --"), hashable_junk
                ),
                "mapping_id": st.one_of(st.none(), hashable_junk),
            }
        ),
    )
    def test_create_sync(
        self, clock: FakeClock, ids: tuple[Any, Any], policy: Any, options: dict[str, Any]
    ) -> None:
        """Every argument of Scheduler.create_sync (unhashable ids: see the xfail below)."""
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: ["u1"]))
        scheduler.add_destination("d1", RecordingDestination())

        typed(lambda: scheduler.create_sync(*ids, policy, **options))

    @given(instant=st.one_of(naive_datetimes, aware_datetimes, junk))
    def test_instants(self, instant: object) -> None:
        """Clocks, upcoming() and sync timestamps refuse naive and non-datetime instants."""
        scheduler = cs.Scheduler(MemoryStorage(), clock=FakeClock(T0))
        typed(lambda: FakeClock(instant), instants=True)  # type: ignore[arg-type]
        typed(lambda: scheduler.upcoming(instant), instants=True)  # type: ignore[arg-type]
        typed(
            lambda: cs.Sync(
                id="s",
                cohort_id="c",
                destination_id="d",
                policy=cs.SyncPolicy.hourly(),
                created_at=instant,  # type: ignore[arg-type]
                updated_at=instant,  # type: ignore[arg-type]
            ),
            instants=True,
        )

    def test_naive_instants_are_type_errors(self) -> None:
        """A naive datetime is a TypeError everywhere it is accepted."""
        naive = datetime(2030, 1, 1)  # noqa: DTZ001 - the point of the test
        scheduler = cs.Scheduler(MemoryStorage(), clock=FakeClock(T0))

        with pytest.raises(TypeError, match="timezone-aware"):
            FakeClock(naive)
        with pytest.raises(TypeError, match="timezone-aware"):
            scheduler.upcoming(naive)


class TestKnownHostileInputBugs:
    """
    Junk that escapes as an untyped error today (each an xfail naming the bug).
    """

    @pytest.mark.parametrize("argument", ["cohort_id", "destination_id", "mapping_id"])
    def test_unhashable_ids(self, clock: FakeClock, argument: str) -> None:
        """An unhashable id given to create_sync is a typed error."""
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: ["u1"]))
        scheduler.add_destination("d1", RecordingDestination())
        args: dict[str, Any] = {"cohort_id": "c1", "destination_id": "d1", "mapping_id": None}
        args[argument] = ["not", "hashable"]

        with pytest.raises(CohortSyncError):
            scheduler.create_sync(
                args["cohort_id"],
                args["destination_id"],
                cs.SyncPolicy.hourly(),
                mapping_id=args["mapping_id"],
            )

    def test_non_iterable_identifier_kinds(self) -> None:
        """A scalar for accepted_identifiers is a ConfigurationError."""
        with pytest.raises(CohortSyncError):
            cs.Capabilities(accepted_identifiers=5)  # type: ignore[arg-type]

    def test_clock_at_the_end_of_time(self) -> None:
        """A run near datetime.max is recorded (or refused with a typed error)."""
        clock = FakeClock(datetime(9999, 12, 31, 23, 30, tzinfo=UTC))
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: ["u1"]))
        scheduler.add_destination("d1", RecordingDestination())
        scheduler.create_sync("c1", "d1", cs.SyncPolicy.hourly(), sync_id="s1")

        with contextlib.suppress(CohortSyncError):
            scheduler.run_due()
        assert None is scheduler.storage.get_sync("s1").lease
        assert 1 == len(scheduler.history("s1"))

    def test_clock_at_the_start_of_time(self) -> None:
        """A clock at datetime.min runs (or is refused with a typed error)."""
        clock = FakeClock(datetime(1, 1, 1, tzinfo=UTC))
        scheduler = cs.Scheduler(MemoryStorage(), clock=clock)
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: ["u1"]))
        scheduler.add_destination("d1", RecordingDestination())
        scheduler.create_sync("c1", "d1", cs.SyncPolicy.hourly(), sync_id="s1")

        typed(scheduler.run_due)


# -- member keys ------------------------------------------------------------------------------

valid_keys = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1,
    max_size=12,
)
invalid_keys = st.one_of(
    st.none(),
    st.just(""),
    st.just("nul-\x00-inside"),
    st.just("lone-\udc80-surrogate"),
    st.integers(),
    st.floats(allow_nan=True),
    st.binary(max_size=5),
    st.text(min_size=1, max_size=2).map(lambda s: s * 1_025),
    st.tuples(st.integers()),
)


class TestHostileMemberKeys:
    """
    None, empty, non-string, huge and duplicate keys are skipped and recorded, never delivered.
    """

    @settings(max_examples=60)
    @given(
        good=st.lists(valid_keys, max_size=30),
        bad=st.lists(invalid_keys, max_size=10),
        copies=st.integers(min_value=1, max_value=3),
    )
    def test_junk_keys_are_skipped(self, good: list[str], bad: list[object], copies: int) -> None:
        """The valid keys are delivered once; the rest are skipped with a reason."""
        keys = [*good, *bad] * copies
        scheduler = cs.Scheduler(MemoryStorage(), clock=FakeClock(T0))
        destination = scheduler.add_destination(
            "d1", RecordingDestination(cs.Capabilities(max_batch_size=7))
        )
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: iter(keys)))
        scheduler.create_sync("c1", "d1", cs.SyncPolicy.hourly(), sync_id="s1")
        valid = {k for k in good if len(k) <= 1_024}
        invalid = [
            k
            for k in bad
            if not (isinstance(k, str) and 0 < len(k) <= 1_024)
            or k in {"nul-\x00-inside", "lone-\udc80-surrogate"}
        ]

        (run,) = scheduler.run_due()

        assert isinstance(destination, RecordingDestination)
        assert valid == set(scheduler.storage.iter_delivered("s1"))
        assert valid == destination.audience("s1")
        assert len(valid) == sum(len(b.keys) for b in destination.batches)
        # Skipping members is never plain success; skipping every one fails.
        if invalid and not valid:
            assert cs.RunStatus.FAILED == run.status
        elif invalid:
            assert cs.RunStatus.PARTIAL == run.status
        else:
            assert cs.RunStatus.SUCCEEDED == run.status
        assert bool(invalid) == (run.skipped > 0)
        assert bool(invalid) == ("invalid_keys" in run.notes)
        (row,) = scheduler.export_history("s1")
        reasons = {m["reason"] for m in row["members"]}  # type: ignore[attr-defined]
        assert all(str(r).startswith("invalid_key") for r in reasons)

    @pytest.mark.parametrize(
        ("backend", "key"),
        [
            pytest.param("sqlite", "ok-\udc80-lone-surrogate", id="sqlite-surrogate"),
            pytest.param(
                "postgres",
                "ok-\udc80-lone-surrogate",
                id="postgres-surrogate",
                marks=pytest.mark.postgres,
            ),
            pytest.param(
                "postgres", "nul-\x00-char", id="postgres-nul", marks=pytest.mark.postgres
            ),
        ],
    )
    def test_a_key_the_store_cannot_hold_does_not_block_the_sync(
        self, tmp_path: Path, request: pytest.FixtureRequest, backend: str, key: str
    ) -> None:
        """The unstorable key is skipped; its batch-mates are delivered and recorded."""
        if backend == "sqlite":
            spec = f"sqlite:{tmp_path / 'cohortsync.db'}"
        else:
            spec = f"postgres:{request.getfixturevalue('new_schema')()}"
        clock = FakeClock(T0)
        store = open_store(spec)
        scheduler = cs.Scheduler(store, clock=clock)
        members = ["a", "b", "c", "d", "e", key]
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=lambda: members))
        scheduler.add_destination("d1", RecordingDestination(cs.Capabilities(max_batch_size=3)))
        scheduler.create_sync("c1", "d1", cs.SyncPolicy.hourly(), sync_id="s1")
        try:
            runs = scheduler.run_due()
            clock.advance(timedelta(hours=1))
            runs += scheduler.run_due()
            delivered = set(store.iter_delivered("s1"))
        finally:
            store.close()

        assert {"a", "b", "c", "d", "e"} == delivered
        # Each run skips the key again, and says so.
        assert [cs.RunStatus.PARTIAL] * 2 == [r.status for r in runs]
        assert all(r.skipped == 1 for r in runs)


# -- membership sources --------------------------------------------------------------------------


class Raising:
    """
    A source that yields some keys and then fails, until fixed.
    """

    def __init__(self, keys: list[str], fail_after: int) -> None:
        self.keys = keys
        self.fail_after: int | None = fail_after

    def members(self) -> Iterator[str]:
        for n, key in enumerate(self.keys):
            if n == self.fail_after:
                raise ConnectionResetError("warehouse went away mid-read")
            yield key


@pytest.fixture
def sqlite_scheduler(tmp_path: Path, clock: FakeClock) -> Iterator[cs.Scheduler]:
    scheduler = cs.Scheduler(SQLiteStorage(tmp_path / "cohortsync.db"), clock=clock)
    yield scheduler
    scheduler.close()


class TestHostileSources:
    """
    A source that raises midway, or repeats keys millions of times, cannot corrupt the state.
    """

    def test_a_source_that_raises_midway(
        self, sqlite_scheduler: cs.Scheduler, clock: FakeClock, figures: Figures
    ) -> None:
        """The run fails with SourceError, sends nothing, keeps the state; a later run converges."""
        scheduler = sqlite_scheduler
        first = [f"u{i:04d}" for i in range(1_000)]
        source = Raising(first, fail_after=len(first) + 1)
        scheduler.add_cohort(cs.Cohort(id="c1", name="C", source=source))
        destination = RecordingDestination(cs.Capabilities(max_batch_size=100))
        scheduler.add_destination("d1", destination)
        scheduler.create_sync("c1", "d1", cs.SyncPolicy.hourly(), sync_id="s1")
        scheduler.run_due()
        calls = len(destination.batches)
        source.keys = [f"u{i:04d}" for i in range(500, 2_000)]
        source.fail_after = 700
        clock.advance(timedelta(hours=1))

        (failed,) = scheduler.run_due()

        assert cs.RunStatus.FAILED == failed.status
        assert SourceError.__name__ == failed.error_type
        assert "warehouse went away" in (failed.error_message or "")
        assert calls == len(destination.batches), "something was sent from a partial read"
        assert (
            set(first) == set(scheduler.storage.iter_delivered("s1")) == destination.audience("s1")
        )

        source.fail_after = None
        clock.advance(timedelta(hours=1))
        (fixed,) = scheduler.run_due()

        assert (cs.RunStatus.SUCCEEDED, 1_000, 500) == (fixed.status, fixed.added, fixed.removed)
        assert set(source.keys) == set(scheduler.storage.iter_delivered("s1"))
        assert set(source.keys) == destination.audience("s1")
        figures.record("hostile/source-raises", trials=1, faults=1, duplicates=0, losses=0)

    def test_millions_of_duplicates(self, sqlite_scheduler: cs.Scheduler, figures: Figures) -> None:
        """3,000,000 copies of 1,000 keys deliver each key exactly once."""
        keys = [f"dup-{i:04d}" for i in range(1_000)]
        scheduler = sqlite_scheduler
        scheduler.add_cohort(
            cs.Cohort(
                id="c1",
                name="C",
                source=lambda: itertools.chain.from_iterable(itertools.repeat(keys, 3_000)),
            )
        )
        destination = RecordingDestination(cs.Capabilities(max_batch_size=500))
        scheduler.add_destination("d1", destination)
        scheduler.create_sync("c1", "d1", cs.SyncPolicy.hourly(), sync_id="s1")

        (run,) = scheduler.run_due()

        sent = [i for b in destination.batches for i in b.identifiers]
        assert (cs.RunStatus.SUCCEEDED, 1_000) == (run.status, run.added)
        assert sorted(keys) == sorted(sent)
        assert set(keys) == set(scheduler.storage.iter_delivered("s1"))
        figures.record(
            "hostile/3M-duplicates",
            trials=1,
            faults=0,
            duplicates=len(sent) - len(set(sent)),
            losses=len(set(keys) - set(sent)),
        )


# -- damaged store rows --------------------------------------------------------------------------

VICTIM_MEMBERS = ["a", "b", "rejected-one"]
BYSTANDER_MEMBERS = ["p", "q", "r"]


class Rejecting(RecordingDestination):
    """
    Rejects one member, so the store has a ledger row to damage.
    """

    def _handle(self, batch: cs.Batch) -> cs.DeliveryResult:
        kept = [i for i in batch.identifiers if i != "rejected-one"]
        self._apply(batch, kept)
        self._record(batch, "partial")
        if len(kept) == len(batch.identifiers):
            return cs.DeliveryResult.ok()
        return cs.DeliveryResult.partial([cs.Rejection("rejected-one", "refused")])


def build(path: Path, clock: FakeClock, destination: RecordingDestination) -> cs.Scheduler:
    scheduler = cs.Scheduler(SQLiteStorage(path), clock=clock)
    scheduler.add_destination("d1", destination)
    scheduler.add_cohort(cs.Cohort(id="victim", name="V", source=lambda: VICTIM_MEMBERS))
    scheduler.add_cohort(cs.Cohort(id="bystander", name="B", source=lambda: BYSTANDER_MEMBERS))
    return scheduler


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A store with a victim sync and a bystander sync, each run once, both due again.
    """
    path = tmp_path_factory.mktemp("template") / "template.db"
    clock = FakeClock(T0)
    scheduler = build(path, clock, Rejecting())
    scheduler.create_sync("victim", "d1", cs.SyncPolicy.hourly(), sync_id="x")
    scheduler.create_sync("bystander", "d1", cs.SyncPolicy.hourly(), sync_id="y")
    scheduler.run_due()
    scheduler.close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def raw(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(path, isolation_level=None))


COLUMNS = (
    [
        ("syncs", c)
        for c in [
            "definition",
            "next_due",
            "next_trigger",
            "slot_offset",
            "slot_bucket",
            "anchor",
            "attempts",
            "full_resync",
            "feed_cursor",
            "last_full_sync_at",
            "lease_owner",
            "lease_token",
            "lease_expires",
            "lease_slot",
            "lease_generation",
            "lease_trigger",
            "generation",
            "status",
        ]
    ]
    + [
        ("runs", c)
        for c in ["data", "status", "trigger", "slot", "started_at", "finished_at", "generation"]
    ]
    + [("delivered", c) for c in ("id_kind", "id_value")]
    + [("ledger", c) for c in ["reason", "attempts", "dead", "first_seen", "last_seen"]]
)


def known_bug(column: tuple[str, str], value: object) -> bool:
    """
    Damage that TestKnownDamagedRowBugs covers with an xfail each; the fuzzer
    skips it so that it keeps looking for new failures.
    """
    del value
    return column == ("syncs", "status")


JUNK_VALUES = [None, "garbage", -1, 2**62, 3.5, b"\x00\xff", "{}", "[]", "", '{"id": "x"}']


def damage(path: Path, table: str, column: str, value: object, victim: str = "x") -> bool:
    key = "id" if table == "syncs" else "sync_id"
    with raw(path) as conn:
        try:
            conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (value, victim))  # noqa: S608 - names from COLUMNS
        except sqlite3.IntegrityError:
            return False
    return True


class TestDamagedRows:
    """
    Hand-damaged SQLite rows give StorageError on read; runs of other syncs go on unharmed.
    """

    @settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        column=st.sampled_from(COLUMNS),
        value=st.one_of(
            st.sampled_from(JUNK_VALUES),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.floats(),
            st.text(max_size=20),
            st.binary(max_size=8),
        ),
    )
    def test_damaged_column(
        self, template: Path, tmp_path: Path, column: tuple[str, str], value: object
    ) -> None:
        """Reads raise StorageError or succeed; the bystander sync still converges."""
        assume(not known_bug(column, value))
        path = tmp_path / f"damaged-{column[0]}-{column[1]}.db"
        path.unlink(missing_ok=True)
        shutil.copy(template, path)
        assume(damage(path, *column, value))
        destination = RecordingDestination()
        scheduler = build(path, FakeClock(T0 + timedelta(hours=2)), destination)
        store = scheduler.storage
        try:
            for read in (
                lambda: store.get_sync("x"),
                store.list_syncs,
                lambda: store.history("x"),
                lambda: store.ledger("x"),
                lambda: store.dead_letters("x"),
                lambda: list(store.iter_delivered("x")),
                lambda: scheduler.export_history("x"),
            ):
                storage_error_or_ok(read)
            runs: list[cs.SyncRun] = []
            for _ in range(3):
                runs += storage_error_or_ok(scheduler.run_due) or []
            bystander = set(store.iter_delivered("y"))
        finally:
            scheduler.close()

        assert {None, "CorruptStoreError", "StorageError"} >= {r.error_type for r in runs}
        assert set(BYSTANDER_MEMBERS) == bystander
        assert "y" in {r.sync_id for r in runs}

    @pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
    def test_truncated_file(self, template: Path, tmp_path: Path, cut: float) -> None:
        """A file cut short is refused with StorageError, on open or on the first read."""
        path = tmp_path / "truncated.db"
        data = template.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])

        with pytest.raises(StorageError):
            read_everything(path)

    def test_negative_slot_offset(self, template: Path, tmp_path: Path) -> None:
        """A negative slot offset is a CorruptStoreError on read and on run."""
        path = tmp_path / "offset.db"
        shutil.copy(template, path)
        damage(path, "syncs", "slot_offset", -5)
        scheduler = build(path, FakeClock(T0 + timedelta(hours=2)), RecordingDestination())
        try:
            with pytest.raises(cs.exceptions.CorruptStoreError):
                scheduler.storage.get_sync("x")
        finally:
            scheduler.close()


def read_everything(path: Path) -> None:
    store = SQLiteStorage(path)
    try:
        for sync_id in ("x", "y"):
            store.get_sync(sync_id)
            list(store.iter_delivered(sync_id))
            store.history(sync_id)
            store.ledger(sync_id)
    finally:
        store.close()


def outcome_of(call: Callable[[], list[cs.SyncRun]]) -> object:
    """
    The runs *call* returned, or the exception it raised.
    """
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - collected to assert on
        return e


def storage_error_or_ok(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except StorageError:
        return None


class TestKnownDamagedRowBugs:
    """
    Damage that once escaped as an untyped error or a silent stall: each is now typed or refused.
    """

    def run_victim(
        self, template: Path, tmp_path: Path, column: str, value: object
    ) -> tuple[cs.Scheduler, list[object]]:
        path = tmp_path / "damaged.db"
        shutil.copy(template, path)
        assert damage(path, "syncs", column, value)
        scheduler = build(path, FakeClock(T0 + timedelta(hours=2)), RecordingDestination())
        outcomes: list[object] = []
        for outcome in (outcome_of(scheduler.run_due) for _ in range(2)):
            outcomes.extend(outcome if isinstance(outcome, list) else [outcome])
        return scheduler, outcomes

    @pytest.mark.parametrize(
        ("column", "value"),
        [
            ("next_trigger", "bogus"),
            ("generation", "zz"),
            ("generation", b"\xff"),
            ("next_due", 3.5),
        ],
    )
    def test_claim_trusts_damaged_columns(
        self, template: Path, tmp_path: Path, column: str, value: object
    ) -> None:
        """Damaged schedule columns are CorruptStoreError at claim time, and leak no lease."""
        scheduler, outcomes = self.run_victim(template, tmp_path, column, value)
        try:
            assert all(
                not isinstance(o, Exception) or isinstance(o, StorageError) for o in outcomes
            )
            scheduler.history("x")
            with raw(Path(scheduler.storage.path)) as conn:  # type: ignore[attr-defined]
                (token,) = conn.execute("SELECT lease_token FROM syncs WHERE id = 'x'").fetchone()
            assert None is token
        finally:
            scheduler.close()

    @pytest.mark.parametrize("value", ["bogus", "", "ACTIVE", 1])
    def test_status_column_cannot_disagree_with_the_definition(
        self, template: Path, tmp_path: Path, value: object
    ) -> None:
        """
        The store refuses a status column no definition can have (it used to
        accept it: claim_due read the column, get_sync the definition, and the
        sync was reported active and due but never ran); the sync still runs.
        """
        path = tmp_path / "damaged.db"
        shutil.copy(template, path)
        assert not damage(path, "syncs", "status", value)
        scheduler = build(path, FakeClock(T0 + timedelta(hours=2)), RecordingDestination())
        try:
            assert "x" in {run.sync_id for run in scheduler.run_due()}
        finally:
            scheduler.close()

    def test_slot_offset_beyond_the_period(self, template: Path, tmp_path: Path) -> None:
        """An offset beyond the period is a CorruptStoreError before anything is sent."""
        scheduler, outcomes = self.run_victim(template, tmp_path, "slot_offset", 99_999_999)
        try:
            assert all(
                not isinstance(o, Exception) or isinstance(o, StorageError) for o in outcomes
            )
        finally:
            scheduler.close()

    @pytest.mark.parametrize("column", ["first_seen", "last_seen"])
    def test_damaged_ledger_timestamps(self, template: Path, tmp_path: Path, column: str) -> None:
        """A damaged ledger row is a CorruptStoreError, in ledger() and in the run record."""
        path = tmp_path / "ledger.db"
        shutil.copy(template, path)
        assert damage(path, "ledger", column, "garbage")
        scheduler = build(path, FakeClock(T0 + timedelta(hours=2)), RecordingDestination())
        try:
            storage_error_or_ok(lambda: scheduler.storage.ledger("x"))
            runs = scheduler.run_due()
        finally:
            scheduler.close()
        assert {None, "CorruptStoreError", "StorageError"} >= {r.error_type for r in runs}
