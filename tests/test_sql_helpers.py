"""
What the SQL stores share (``cohortsync.storage._sql``): statement rendering,
row codecs and the schema check, tested without a database.
"""

from __future__ import annotations

import json
from datetime import timedelta

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohortsync._destination import Identifier, IdentifierKind, Member
from cohortsync._sync import SyncStatus
from cohortsync.exceptions import CorruptStoreError, SchemaVersionError
from cohortsync.storage import SyncRecord
from cohortsync.storage import _sql as q
from cohortsync.storage._rules import identity_keys, is_identity
from cohortsync.storage._sqlite import _MIGRATIONS
from records import T0, sync_record
from strategies import member_keys


def row_of(record: SyncRecord, instants: q.Instants, **columns: object) -> tuple[object, ...]:
    """
    The row SELECT_SYNCS would read for *record* (no lease, never run), with *columns* changed.
    """
    values = {
        **q.sync_params(record, instants),
        "last_slot": None,
        "revision": record.revision,
        "lease_owner": None,
        "lease_token": None,
        "lease_expires": None,
        "lease_slot": None,
        "lease_generation": None,
        "lease_trigger": None,
        "lease_revision": None,
    } | columns
    return tuple(values[c.strip()] for c in q.SYNC_COLUMNS.split(","))


class TestStatements:
    """
    One statement text serves both dialects.
    """

    def test_sqlite_rendering(self) -> None:
        """The schema prefix goes, parameters become SQLite's."""
        assert "UPDATE syncs SET a = :a, b = '%' WHERE id = ?" == q.sqlite_text(
            "UPDATE {s}.syncs SET a = %(a)s, b = '%' WHERE id = %s"
        )

    def test_released_sqlite_migrations_run_as_written(self) -> None:
        """Rendering leaves every released SQLite migration statement unchanged."""
        statements = [statement for step in _MIGRATIONS for statement in step]

        assert statements == [q.sqlite_text(statement) for statement in statements]

    def test_an_update_cannot_take_a_lease(self) -> None:
        """update_params writes a lease release only: taking one is a claim's job."""
        with pytest.raises(ValueError, match="release"):
            q.update_params({"lease": object()}, q.TIMESTAMPTZ)

    def test_an_update_sets_only_the_changed_columns(self) -> None:
        """Each changed field becomes its columns, the definition three of them."""
        paused = attrs.evolve(sync_record().sync, status=SyncStatus.PAUSED)

        statement, params = q.update_params(
            {"lease": None, "sync": paused, "next_due": None}, q.MICROSECONDS
        )

        assert {"definition", "generation", "status", "next_due"} == set(params)
        assert ("paused", 1, None) == (params["status"], params["generation"], params["next_due"])
        assert statement.startswith(f"UPDATE {{s}}.syncs SET {q.CLEAR_LEASE}, definition = ")  # noqa: S608 - not a query
        assert statement.endswith(" WHERE id = %(id)s")


class TestCodecs:
    """
    Records round-trip through rows; damaged rows are CorruptStoreError.
    """

    @pytest.mark.parametrize("instants", [q.MICROSECONDS, q.TIMESTAMPTZ], ids=["sqlite", "pg"])
    def test_sync_round_trip(self, instants: q.Instants) -> None:
        """A record written with sync_params reads back equal."""
        record = sync_record(
            slot_bucket=3, attempts=2, full_resync=True, scheduled_from=T0 - timedelta(hours=1)
        )

        assert record == q.decode_sync(row_of(record, instants), instants)

    @pytest.mark.parametrize(
        ("column", "value", "message"),
        [
            ("status", "paused", "disagree"),
            ("generation", 2, "disagree"),
            ("slot_offset", 3600, "outside"),
            ("next_trigger", "whenever", "cannot be read"),
        ],
    )
    def test_indexed_columns_must_agree(self, column: str, value: object, message: str) -> None:
        """Columns claims read that disagree with the definition are refused on read."""
        record = sync_record()

        with pytest.raises(CorruptStoreError, match=message):
            q.decode_sync(row_of(record, q.TIMESTAMPTZ, **{column: value}), q.TIMESTAMPTZ)

    @pytest.mark.parametrize("value", [3.5, "2030", True, 10**30])
    def test_microseconds_are_integers(self, value: object) -> None:
        """An SQLite instant is an integer in range; anything else was not written by us."""
        with pytest.raises(CorruptStoreError, match="timestamp"):
            q.MICROSECONDS.decode(value)

    def test_timestamptz_is_a_datetime(self) -> None:
        """A PostgreSQL instant comes from the driver as a datetime."""
        with pytest.raises(CorruptStoreError, match="timestamp"):
            q.TIMESTAMPTZ.decode("2030-01-01")

    def test_damaged_claim_rows_are_unscheduled(self) -> None:
        """A claimed row that does not decode is handed to unschedule, the rest are leases."""
        unscheduled: list[str] = []
        rows = [
            ("bad", 0, T0, "scheduled", "t1", 0),
            ("good", 1, T0, "scheduled", "t2", 0),
            ("worse", 1, T0, "whenever", "t3", 0),
        ]

        leases = q.decode_claims(rows, "w", T0, q.TIMESTAMPTZ, unscheduled.append)

        assert (["good"], ["bad", "worse"]) == ([x.sync_id for x in leases], unscheduled)

    @given(
        st.lists(st.tuples(member_keys(8), st.sampled_from([None, *IdentifierKind])), max_size=12)
    )
    def test_pending_members_encode_as_json_dumps_would(
        self, rows: list[tuple[str, IdentifierKind | None]]
    ) -> None:
        """Members in flight are written exactly as json.dumps writes them (the
        identity mapping's fast path included) and read back equal."""
        members = [
            Member(key, Identifier(IdentifierKind.USER_ID if kind is None else kind, key))
            for key, kind in rows
        ]
        reference = json.dumps(
            [
                [m.key] if is_identity(m) else [m.key, m.identifier.kind.value, m.identifier.value]
                for m in members
            ],
            separators=(",", ":"),
        )

        encoded = q.encode_members(members)

        assert reference == encoded
        (pending,) = q.decode_pending("s", [("k", "r", "add", encoded)])
        assert tuple(members) == pending.members

    @given(st.lists(member_keys(8), max_size=12), st.data())
    def test_identity_keys_only_when_every_member_is_sent_as_its_key(
        self, keys: list[str], data: st.DataObject
    ) -> None:
        """identity_keys answers what is_identity says of every member."""
        members = [Member(k, Identifier(IdentifierKind.USER_ID, k)) for k in keys]
        if keys and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(keys) - 1))
            other = data.draw(
                st.sampled_from(
                    [
                        Identifier(IdentifierKind.EMAIL, keys[i]),
                        Identifier(IdentifierKind.USER_ID, keys[i] + "x"),
                    ]
                )
            )
            members[i] = Member(keys[i], other)

        expected = keys if all(map(is_identity, members)) else None
        assert expected == identity_keys(members)
        assert expected == identity_keys(tuple(members))
        assert expected == identity_keys(iter(members))


class TestSchemaVersion:
    """
    A schema is cohortsync's own, at a version this release understands, or refused.
    """

    def check(self, tables: list[str], meta: dict[str, str] | None) -> int:
        return q.schema_version(tables, lambda: meta, 3, foreign="foreign", where="here")

    def test_empty_is_version_zero(self) -> None:
        """No tables: nothing to check, everything to create."""
        assert 0 == self.check([], None)

    @pytest.mark.parametrize(
        ("tables", "meta"),
        [
            (["users"], None),
            (["meta"], None),
            (["meta"], {"application": "someone else", "schema_version": "1"}),
        ],
    )
    def test_someone_elses_tables_are_refused(
        self, tables: list[str], meta: dict[str, str] | None
    ) -> None:
        """Tables without cohortsync's meta rows are someone else's."""
        with pytest.raises(CorruptStoreError, match="foreign"):
            self.check(tables, meta)

    def test_newer_is_refused(self) -> None:
        """A version above the supported one names both."""
        with pytest.raises(SchemaVersionError) as caught:
            self.check(["meta"], {"application": "cohortsync", "schema_version": "4"})

        assert (4, 3) == (caught.value.found, caught.value.supported)

    def test_migrate_runs_the_missing_steps_then_records_the_version(self) -> None:
        """Steps after the version found run in order, then meta records the new one."""
        ran: list[tuple[str, tuple[object, ...]]] = []

        q.migrate(lambda s, p: ran.append((s, tuple(p))), [("a",), ("b", "c"), ("d",)], 1)

        assert ["b", "c", "d"] == [s for s, _ in ran[:-1]]
        assert ("cohortsync", "3") == ran[-1][1]
