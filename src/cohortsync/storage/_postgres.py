"""
:class:`PostgresStorage`: the :class:`~cohortsync.storage.Storage` for several workers on
several hosts, on one PostgreSQL database (psycopg 3).

Install it with the extra: ``pip install "cohortsync[postgres]"``. The core
package never imports this module, so hosts without PostgreSQL need no driver.

How it keeps several workers honest:

- claims are one ``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)``
  statement: two workers never lease the same slot, and neither waits for the
  other's locked rows;
- every lease operation is a compare-and-set on the lease token
  (``WHERE lease_token = %s``), checked by its row count;
- the run record is unique on (sync, slot), so a slot can be recorded once;
- a run's completion is one statement (the compare-and-set, the run record
  and the completion rule together), and the completions of a claim batch
  are sent together in pipeline mode: one round trip, one commit;
- each acknowledged batch moves the delivered state (and its count) in the
  same transaction that records it, with array parameters (``unnest``) so a
  snapshot of a million members is a few statements, not a million round trips.

Every instant is passed in by the caller (its clock); the store never reads the
server's ``now()``. Everything lives in one PostgreSQL schema (``cohortsync`` by
default) that is created and migrated on first use, under an advisory lock so
workers starting together do not race.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.pq import TransactionStatus
    from psycopg.rows import tuple_row
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "cohortsync.storage.PostgresStorage needs psycopg 3, which is not installed: "
        'pip install "cohortsync[postgres]"'
    ) from exc

import attrs

from cohortsync._clock import add_saturating, require_aware
from cohortsync._destination import Identifier, IdentifierKind
from cohortsync.exceptions import (
    CohortSyncError,
    ConfigurationError,
    ConflictError,
    CorruptStoreError,
    DuplicateRunError,
    LeaseLostError,
    StorageClosedError,
    StorageError,
    SyncNotFoundError,
)
from cohortsync.storage import _sql as q
from cohortsync.storage._base import (
    StorageBase,
    placed,
    placement_of,
    require_distinct_ids,
    written,
)
from cohortsync.storage._dsn import mask_dsn
from cohortsync.storage._protocol import SLOT_BUCKET_SECONDS, IssueKind, MemberIssue
from cohortsync.storage._rules import (
    collect_holders,
    earliest_claimable,
    require_buckets,
    slot_bucket_of,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from datetime import datetime, timedelta

    from typing_extensions import Self

    from cohortsync._sync import SyncRun
    from cohortsync.storage._protocol import (
        AppliedBatch,
        Claim,
        Completion,
        Lease,
        LedgerEntry,
        PendingBatch,
        Placement,
        Progress,
        SyncRecord,
    )

__all__ = ["SCHEMA_VERSION", "ConnectionPoolLike", "PostgresStorage", "mask_dsn"]

_T = TypeVar("_T")

_Connection = psycopg.Connection[Any]
_Cursor = psycopg.Cursor[tuple[Any, ...]]

_TZ = q.TIMESTAMPTZ
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names silently.

_CHUNK = 50_000
"""Rows per array-parameter statement: big enough to amortise round trips,
small enough to keep one statement's parameters to a few megabytes. Key arrays
travel as binary parameters (``%b``), cheaper to build than text array literals
whose every element needs quoting."""

_PAGE = 10_000
"""Keys per page when streaming the delivered state."""

_MIGRATE = "migrating the schema"

_TABLES = (
    "meta",
    "syncs",
    "slot_buckets",
    "delivered",
    "delivered_versions",
    "pending",
    "progress",
    "ledger",
    "runs",
    "batches",
    "issues",
)

# Each migration is a list of statements; ``{s}`` is the schema identifier.
# Migrations are append-only: a released one is never edited.
_MIGRATIONS: list[tuple[str, ...]] = [
    (
        "CREATE TABLE {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
        """
        CREATE TABLE {s}.syncs (
            id text COLLATE "C" PRIMARY KEY,
            definition text NOT NULL,
            generation bigint NOT NULL,
            status text NOT NULL,
            next_due timestamptz,
            next_trigger text NOT NULL,
            slot_offset integer NOT NULL,
            slot_bucket integer,
            anchor timestamptz NOT NULL,
            attempts integer NOT NULL,
            full_resync boolean NOT NULL,
            feed_cursor text,
            last_full_sync_at timestamptz,
            lease_owner text,
            lease_token text,
            lease_expires timestamptz,
            lease_slot timestamptz,
            lease_generation bigint,
            lease_trigger text,
            CONSTRAINT syncs_lease_complete CHECK (
                (lease_token IS NULL) = (lease_expires IS NULL)
                AND (lease_token IS NULL) = (lease_slot IS NULL)
            )
        )
        """,
        # The claim query's access path: active syncs by due time.
        "CREATE INDEX syncs_due ON {s}.syncs (next_due, id) WHERE status = 'active'",
        """
        CREATE TABLE {s}.slot_buckets (
            period integer NOT NULL,
            bucket integer NOT NULL,
            syncs integer NOT NULL DEFAULT 0 CHECK (syncs >= 0),
            PRIMARY KEY (period, bucket)
        )
        """,
        # Byte-wise ("C") collation: keys stream in the order Python's sorted()
        # gives, whatever the database's default collation is.
        """
        CREATE TABLE {s}.delivered (
            sync_id text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            id_kind text,
            id_value text,
            PRIMARY KEY (sync_id, key),
            CONSTRAINT delivered_identifier CHECK ((id_kind IS NULL) = (id_value IS NULL))
        )
        """,
        """
        CREATE TABLE {s}.ledger (
            sync_id text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            reason text NOT NULL,
            attempts integer NOT NULL,
            dead boolean NOT NULL,
            first_seen timestamptz NOT NULL,
            last_seen timestamptz NOT NULL,
            PRIMARY KEY (sync_id, key)
        )
        """,
        """
        CREATE TABLE {s}.runs (
            sync_id text COLLATE "C" NOT NULL,
            slot timestamptz NOT NULL,
            id text NOT NULL,
            generation bigint NOT NULL,
            trigger text NOT NULL,
            status text NOT NULL,
            started_at timestamptz NOT NULL,
            finished_at timestamptz NOT NULL,
            record text NOT NULL,
            CONSTRAINT runs_sync_slot PRIMARY KEY (sync_id, slot)
        )
        """,
        "CREATE INDEX runs_id ON {s}.runs (id)",
        "CREATE INDEX runs_history ON {s}.runs (sync_id, started_at DESC, slot DESC)",
        "CREATE INDEX runs_finished ON {s}.runs (finished_at)",
        """
        CREATE TABLE {s}.batches (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_id text NOT NULL,
            sequence integer NOT NULL,
            operation text NOT NULL,
            idempotency_key text NOT NULL,
            at timestamptz NOT NULL
        )
        """,
        "CREATE INDEX batches_run ON {s}.batches (run_id)",
        """
        CREATE TABLE {s}.issues (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_id text NOT NULL,
            key text COLLATE "C" NOT NULL,
            kind text COLLATE "C" NOT NULL,
            reason text NOT NULL
        )
        """,
        "CREATE INDEX issues_run ON {s}.issues (run_id, kind, key)",
    ),
    # 2: a version token of each sync's delivered state, so workers can keep a
    # copy in memory and know when it is stale. Its own table, not a syncs
    # column: apply_batch holds the syncs row FOR SHARE, and two such holders
    # both updating that row would deadlock.
    (
        """
        CREATE TABLE {s}.delivered_versions (
            sync_id text COLLATE "C" PRIMARY KEY,
            version text NOT NULL
        )
        """,
        # The write-ahead record of batches in flight, so a crash between send
        # and apply loses nothing.
        """
        CREATE TABLE {s}.pending (
            seq bigserial PRIMARY KEY,
            sync_id text COLLATE "C" NOT NULL,
            idempotency_key text COLLATE "C" NOT NULL,
            run_id text NOT NULL,
            operation text NOT NULL,
            members jsonb NOT NULL,
            UNIQUE (sync_id, idempotency_key)
        )
        """,
    ),
    # 3: run records unique per slot by construction (the last recorded slot),
    # clock-jump detection (the instant the schedule was computed from), the
    # slot period a sync is counted in (counts move with the sync write), the
    # progress of attempts that have not completed, the delivered state
    # indexed by identifier (members sharing one), and a checked status.
    (
        (
            "ALTER TABLE {s}.syncs ADD COLUMN last_slot timestamptz,"
            " ADD COLUMN scheduled_from timestamptz, ADD COLUMN slot_period integer,"
            " ADD COLUMN revision bigint NOT NULL DEFAULT 0, ADD COLUMN lease_revision bigint"
        ),
        (
            "UPDATE {s}.syncs AS s SET last_slot ="
            " (SELECT max(r.slot) FROM {s}.runs AS r WHERE r.sync_id = s.id)"
        ),
        (
            "UPDATE {s}.syncs SET slot_period = CASE definition::jsonb -> 'policy' ->> 'cadence'"
            " WHEN 'hourly' THEN 3600 WHEN 'daily' THEN 86400 END WHERE slot_bucket IS NOT NULL"
        ),
        "CREATE INDEX syncs_rebase ON {s}.syncs (scheduled_from) WHERE status = 'active'",
        (
            "CREATE INDEX delivered_by_identifier ON {s}.delivered (sync_id, id_value)"
            " WHERE id_value IS NOT NULL"
        ),
        """
        CREATE TABLE {s}.progress (
            sync_id text COLLATE "C" PRIMARY KEY,
            slot timestamptz NOT NULL,
            added bigint NOT NULL,
            removed bigint NOT NULL,
            rejected bigint NOT NULL,
            batches bigint NOT NULL,
            collisions bigint NOT NULL
        )
        """,
        (
            "ALTER TABLE {s}.syncs ADD CONSTRAINT syncs_status CHECK"
            " (status IN ('active', 'paused', 'completed', 'failed', 'deleted')) NOT VALID"
        ),
    ),
    # 4: the size of each sync's delivered state, kept exact by the transaction
    # that changes the state, so a claim hands a run its count without counting
    # (see Claim). It sits beside the version token, not on the syncs row, for
    # the reason given at 2. Syncs delivered to before 2 have no version row
    # yet: they get one with the version delivered_version answers for them ("").
    (
        "ALTER TABLE {s}.delivered_versions ADD COLUMN delivered_count bigint NOT NULL DEFAULT 0",
        (
            "INSERT INTO {s}.delivered_versions AS v (sync_id, version, delivered_count)"
            " SELECT sync_id, '', count(*) FROM {s}.delivered GROUP BY sync_id"
            " ON CONFLICT (sync_id) DO UPDATE SET delivered_count = EXCLUDED.delivered_count"
        ),
    ),
    # 5: the least loaded slot bucket is the first entry of this index (every
    # bucket of a period gets a row on first use, see least_loaded_slot), so a
    # create reads one index entry, not every bucket of the period.
    # Each count change leaves a dead entry in that index: vacuum the small
    # table after every 1,000 dead rows rather than at 20 % of it.
    (
        "CREATE INDEX slot_buckets_load ON {s}.slot_buckets (period, syncs, bucket)",
        (
            "ALTER TABLE {s}.slot_buckets SET"
            " (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)"
        ),
    ),
]

SCHEMA_VERSION = len(_MIGRATIONS)
"""The schema version this release creates and understands (5)."""

_COUNT_SLOT = (
    "INSERT INTO {s}.slot_buckets (period, bucket, syncs) VALUES (%s, %s, 1)"
    " ON CONFLICT (period, bucket) DO UPDATE SET syncs = {s}.slot_buckets.syncs + 1"
)
_UNCOUNT_SLOT = (
    "UPDATE {s}.slot_buckets SET syncs = syncs - 1 WHERE period = %s AND bucket = %s AND syncs > 0"
)
_FILL_SLOTS = (
    "INSERT INTO {s}.slot_buckets (period, bucket, syncs)"
    " SELECT %s, b, 0 FROM generate_series(0, %s - 1) AS b ON CONFLICT (period, bucket) DO NOTHING"
)
# The least loaded bucket from the (period, syncs, bucket) index: the lowest
# count, then the first bucket at or after the preferred one holding it, else
# the first one before it. Each branch reads one index entry; the second runs
# only when the first finds nothing.
_LEAST_LOADED = (
    "least AS ("
    "  SELECT syncs FROM {s}.slot_buckets WHERE period = %(period)s AND bucket < %(buckets)s"
    "  ORDER BY syncs LIMIT 1"
    ")"
)
_LEAST_AT_OR_AFTER = (
    "SELECT bucket FROM {s}.slot_buckets WHERE period = %(period)s"
    "  AND syncs = (SELECT syncs FROM least) AND bucket >= %(preferred)s AND bucket < %(buckets)s"
    "  ORDER BY bucket LIMIT 1"
)
_LEAST_BEFORE = (
    "SELECT bucket FROM {s}.slot_buckets WHERE period = %(period)s"
    "  AND syncs = (SELECT syncs FROM least) AND bucket < %(preferred)s"
    "  ORDER BY bucket LIMIT 1"
)
_PICK_BUCKET = f" ({_LEAST_AT_OR_AFTER}) UNION ALL ({_LEAST_BEFORE}) LIMIT 1"
_PICK_SLOT = f"WITH {_LEAST_LOADED}{_PICK_BUCKET}"
# A create in one statement (one round trip, atomic without an explicit
# transaction): the sync, and its count in its bucket only if it was inserted.
_CREATE_SYNC = (
    "WITH created AS ("  # noqa: S608 - constant columns, values are parameters
    f"  {q.INSERT_SYNC} RETURNING slot_period, slot_bucket"
    "), counted AS ("
    "  INSERT INTO {s}.slot_buckets (period, bucket, syncs)"
    "  SELECT slot_period, slot_bucket, 1 FROM created"
    "  WHERE slot_period IS NOT NULL AND slot_bucket IS NOT NULL"
    "  ON CONFLICT (period, bucket) DO UPDATE SET syncs = {s}.slot_buckets.syncs + 1"
    ")"
    " SELECT count(*) FROM created"
)
# create_sync_least_loaded's pick locks the bucket row it takes, so that two
# creators at once never take a bucket from one snapshot. A row it locks is
# checked again on its latest version (PostgreSQL does so under READ
# COMMITTED), so a row whose count rose since the statement's snapshot no
# longer holds the least count and is passed over: the row taken holds the
# least count when it is locked, and keeps it until the create commits.
# Every pick passes over rows others hold (SKIP LOCKED) and never waits for a
# bucket row: a pick that waited could hold a row it passed over (a lock taken
# stays taken) while waiting for one another writer holds, and that writer
# could be waiting for it (a deadlock an outside tester hit in 4 of 6 runs of
# eight creators over two buckets). So the picks come in turn (see
# _PICKS_IN_TURN): the least count; after short pauses, the same again; then
# the least loaded row nobody holds; and when others hold every row (a bulk
# chunk), pauses until one is free.
_PICK_LEAST_FREE = (
    f"{_LEAST_LOADED}, high AS ({_LEAST_AT_OR_AFTER} FOR UPDATE SKIP LOCKED),"  # noqa: S608 - constant SQL
    f" low AS ({_LEAST_BEFORE} FOR UPDATE SKIP LOCKED),"
    " pick AS (SELECT bucket FROM high UNION ALL SELECT bucket FROM low LIMIT 1)"
)
_PICK_ANY_FREE = (
    "pick AS ("
    "  SELECT bucket FROM {s}.slot_buckets WHERE period = %(period)s AND bucket < %(buckets)s"
    "  ORDER BY syncs, bucket LIMIT 1 FOR UPDATE SKIP LOCKED"
    ")"
)
_PICKS_IN_TURN = (
    (_PICK_LEAST_FREE, 0.0),
    (_PICK_LEAST_FREE, 0.001),
    (_PICK_LEAST_FREE, 0.004),
    (_PICK_ANY_FREE, 0.0),
)
"""Each pick, and the pause before it: the least loaded bucket is worth a
few milliseconds' wait for its holder to commit; a bucket one sync fuller
is taken then rather than wait longer."""
_PICK_PATIENCE = 60.0
"""Seconds create_sync_least_loaded waits for a free bucket row while other
writers hold every one, before it fails."""
# One pick, the sync in the picked bucket and its count, in one statement (one
# round trip): the bucket and offset are worked out in SQL. The answer is the
# bucket picked (no row: nothing picked) and the offset stored (NULL: the id
# is taken).
_PLACED_COLUMNS = {
    "slot_bucket": "pick.bucket",
    "slot_offset": "pick.bucket * %(bucket_seconds)s + %(within)s",
}
_CREATE_PICKED = (
    ", created AS ("  # noqa: S608 - constant columns
    f"  INSERT INTO {{s}}.syncs (id, {', '.join(q.DEFINITION_COLUMNS)})"
    "  SELECT %(id)s, "
    + ", ".join(_PLACED_COLUMNS.get(c, f"%({c})s") for c in q.DEFINITION_COLUMNS)
    + "  FROM pick ON CONFLICT (id) DO NOTHING RETURNING slot_period, slot_bucket, slot_offset"
    "), counted AS ("
    "  INSERT INTO {s}.slot_buckets (period, bucket, syncs)"
    "  SELECT slot_period, slot_bucket, 1 FROM created"
    "  ON CONFLICT (period, bucket) DO UPDATE SET syncs = {s}.slot_buckets.syncs + 1"
    ")"
    " SELECT pick.bucket, created.slot_offset FROM pick LEFT JOIN created ON true"
)
_CREATE_SYNC_LEAST_LOADED = tuple(
    (f"WITH {pick}{_CREATE_PICKED}", pause) for pick, pause in _PICKS_IN_TURN
)
_SYNC_ARRAYS = (
    ("id", "text"),
    ("definition", "text"),
    ("generation", "bigint"),
    ("status", "text"),
    ("next_due", "timestamptz"),
    ("next_trigger", "text"),
    ("slot_offset", "integer"),
    ("slot_bucket", "integer"),
    ("anchor", "timestamptz"),
    ("attempts", "integer"),
    ("full_resync", "boolean"),
    ("feed_cursor", "text"),
    ("last_full_sync_at", "timestamptz"),
    ("scheduled_from", "timestamptz"),
    ("slot_period", "integer"),
)
"""The columns a create writes (those of :data:`_sql.INSERT_SYNC`) and their types."""
# Many creates in one statement: one array parameter per column. Counts are
# added per bucket in (period, bucket) order, so two bulk creators lock the
# bucket rows in the same order and never deadlock.
_CREATE_SYNCS = (
    "WITH created AS ("  # noqa: S608 - constant columns, values are parameters
    f"  INSERT INTO {{s}}.syncs ({', '.join(c for c, _ in _SYNC_ARRAYS)})"
    f"  SELECT * FROM unnest({', '.join(f'%({c})s::{t}[]' for c, t in _SYNC_ARRAYS)})"
    "  ON CONFLICT (id) DO NOTHING RETURNING id, slot_period, slot_bucket"
    "), counted AS ("
    "  INSERT INTO {s}.slot_buckets (period, bucket, syncs)"
    "  SELECT slot_period, slot_bucket, count(*) FROM created"
    "  WHERE slot_period IS NOT NULL AND slot_bucket IS NOT NULL"
    "  GROUP BY slot_period, slot_bucket ORDER BY slot_period, slot_bucket"
    "  ON CONFLICT (period, bucket) DO UPDATE SET syncs = {s}.slot_buckets.syncs + EXCLUDED.syncs"
    ")"
    " SELECT id FROM created"
)
# The slot rule of cohortsync.storage._rules.claim_slot (SET sees the old row).
_CLAIMED_SLOT = (
    "CASE WHEN s.last_slot IS NOT NULL AND s.next_due <= s.last_slot"
    " THEN s.last_slot + interval '1 microsecond' ELSE s.next_due END"
)
_CLAIM_CANDIDATES = (
    "WITH locked AS ("
    "  SELECT id, next_due FROM {s}.syncs"
    "  WHERE status = 'active' AND next_due <= %(now)s"
    "    AND (lease_token IS NULL OR lease_expires < %(now)s)"
    "  ORDER BY next_due, id LIMIT %(limit)s"
    "  FOR UPDATE SKIP LOCKED"
    "), numbered AS ("
    "  SELECT id, row_number() OVER (ORDER BY next_due, id) AS n FROM locked"
    ")"
)
_CLAIM_LEASES = (
    " UPDATE {s}.syncs AS s SET lease_owner = %(owner)s,"
    "  lease_token = (%(tokens)s::text[])[numbered.n],"
    "  lease_expires = %(expires)s, next_due = {claimed},"
    "  lease_slot = {claimed},"
    "  lease_generation = s.generation, lease_trigger = s.next_trigger,"
    "  lease_revision = s.revision"
    " FROM numbered WHERE s.id = numbered.id"
).replace("{claimed}", _CLAIMED_SLOT)
_CLAIM = (
    f"{_CLAIM_CANDIDATES}{_CLAIM_LEASES}"
    " RETURNING s.id, s.generation, s.next_due, s.next_trigger, s.lease_token, s.revision"
)
_CLAIMED = "cohortsync.claimed"
"""A transaction-local setting: the ids claim_runs' claim leased, for its read."""
_CLAIM_RUNS = (
    f"{_CLAIM_CANDIDATES}, claimed AS ({_CLAIM_LEASES} RETURNING s.id)"  # noqa: S608 - constant
    f" SELECT set_config('{_CLAIMED}', coalesce(array_agg(id), ARRAY[]::text[])::text, true)"
    " FROM claimed"
)
_READ_CLAIMED = (
    "SELECT "  # noqa: S608 - constant columns
    + q.claim_run_columns("coalesce(v.delivered_count, 0), coalesce(v.version, '')")
    + " FROM {s}.syncs LEFT JOIN {s}.delivered_versions AS v ON v.sync_id = syncs.id"
    f" WHERE syncs.id = ANY(current_setting('{_CLAIMED}')::text[])"
)
"""What claim_runs hands each run: the claimed rows and their delivered-state
facts, read after the claim in its transaction (see claim_runs)."""

_SELECT_SYNC = f"{q.SELECT_SYNCS} WHERE id = %s"
_LIST_SYNCS = f"{q.SELECT_SYNCS} ORDER BY id"
_DUE_BETWEEN = (
    f"{q.SELECT_SYNCS} WHERE status = 'active' AND next_due <= %s ORDER BY next_due, id LIMIT %s"
)
_DUE_BETWEEN_AFTER = (
    f"{q.SELECT_SYNCS} WHERE status = 'active' AND next_due <= %s"
    " AND (next_due, id) > (%s, %s) ORDER BY next_due, id LIMIT %s"
)
_PAGE_SYNCS = f"{q.SELECT_SYNCS} ORDER BY id LIMIT %s"
_PAGE_SYNCS_AFTER = f"{q.SELECT_SYNCS} WHERE id > %s ORDER BY id LIMIT %s"
_LOCK_SLOT_OF_SYNC = f"{q.SLOT_OF_SYNC} FOR UPDATE"
# save_sync_at in one statement. The subquery locks the row and reads its
# stored bucket (the latest version, after waiting for a concurrent writer);
# the update applies only at the expected revision (re-checked on that
# version); the count moves as one upsert in (period, bucket) order, so two
# saves moving syncs between the same two buckets never deadlock. A bucket's
# delta is -1 or +1 (an unmoved sync's cancel out and are left out); the
# CHECK (syncs >= 0) applies to the row an upsert proposes, so the -1 is
# proposed as 0 (a bucket row that was missing is made at 0) and the update
# reads that 0 as -1.
_SAVE_SYNC_AT = (
    "WITH saved AS ("  # noqa: S608 - constant columns, values are parameters
    "  UPDATE {s}.syncs AS s SET "
    + ", ".join(f"{c} = %({c})s" for c in q.DEFINITION_COLUMNS)
    + ", revision = s.revision + 1"
    "  FROM (SELECT id AS old_id, slot_period AS old_period, slot_bucket AS old_bucket"
    "   FROM {s}.syncs WHERE id = %(id)s FOR UPDATE) AS old"
    "  WHERE s.id = old.old_id AND s.revision = %(expected_revision)s"
    "  RETURNING old.old_period, old.old_bucket, s.slot_period, s.slot_bucket"
    "), moves AS ("
    "  SELECT old_period AS period, old_bucket AS bucket, -1 AS delta FROM saved"
    "  WHERE old_period IS NOT NULL AND old_bucket IS NOT NULL"
    "  UNION ALL"
    "  SELECT slot_period, slot_bucket, 1 FROM saved"
    "  WHERE slot_period IS NOT NULL AND slot_bucket IS NOT NULL"
    "), counted AS ("
    "  INSERT INTO {s}.slot_buckets AS b (period, bucket, syncs)"
    "  SELECT period, bucket, greatest(sum(delta), 0) FROM moves GROUP BY period, bucket"
    "  HAVING sum(delta) <> 0 ORDER BY period, bucket"
    "  ON CONFLICT (period, bucket) DO UPDATE"
    "  SET syncs = greatest(b.syncs + CASE WHEN EXCLUDED.syncs > 0 THEN 1 ELSE -1 END, 0)"
    ")"
    " SELECT count(*) FROM saved"
)
_DELETE_SYNC_STATE = tuple(
    f"DELETE FROM {{s}}.{table} WHERE sync_id = %s"  # noqa: S608 - constant table names
    for table in (*q.SYNC_STATE_TABLES, "delivered_versions")
)
_SHARE_HELD = f"{q.IS_HELD} FOR SHARE"
"""Parallel batches of one run may apply together, but no claimant can take the
lease over until the transaction ends."""
# Inserted and updated apart, so the rows inserted are counted (an upsert's
# row count cannot tell the two apart) and delivered_count stays exact. The
# update writes only identifiers that changed (the rows just inserted have
# theirs).
_DELIVERED_ROWS = "unnest(%(keys)b::text[], %(kinds)b::text[], %(values)b::text[]) AS t(k, ik, iv)"
_INSERT_DELIVERED = (
    "INSERT INTO {s}.delivered (sync_id, key, id_kind, id_value)"  # noqa: S608 - constant
    f" SELECT %(sync)s, k, ik, iv FROM {_DELIVERED_ROWS}"
    " ON CONFLICT (sync_id, key) DO NOTHING"
)
_UPDATE_DELIVERED = (
    "UPDATE {s}.delivered AS d SET id_kind = t.ik, id_value = t.iv"  # noqa: S608 - constant
    f" FROM {_DELIVERED_ROWS} WHERE d.sync_id = %(sync)s AND d.key = t.k"
    " AND (d.id_kind, d.id_value) IS DISTINCT FROM (t.ik, t.iv)"
)
_MOVE_DELIVERED = (
    "INSERT INTO {s}.delivered_versions AS v (sync_id, version, delivered_count)"
    " VALUES (%s, %s, %s) ON CONFLICT (sync_id) DO UPDATE SET version = EXCLUDED.version,"
    " delivered_count = v.delivered_count + EXCLUDED.delivered_count"
)
"""A new version token, and the count moved by the batch's change."""
_COMPLETE = (
    # The compare-and-set: the row is locked (no claimant can take the lease
    # over until this commits) only if the token is still the lease's.
    "WITH held AS ("
    "  SELECT id FROM {s}.syncs WHERE id = %(sync_id)s AND lease_token = %(token)s FOR UPDATE"
    # The run, once per (sync, slot); everything after it needs it recorded.
    "), recorded AS ("
    "  INSERT INTO {s}.runs (sync_id, slot, id, generation, trigger, status, started_at,"
    "   finished_at, record)"
    "  SELECT held.id, %(slot)s, %(id)s, %(generation)s, %(trigger)s, %(status)s,"
    "   %(started_at)s, %(finished_at)s, %(record)s FROM held"
    "  ON CONFLICT ON CONSTRAINT runs_sync_slot DO NOTHING RETURNING sync_id"
    # The completion rule, decided from the row as the update finds it.
    "), completed AS ("
    "  UPDATE {s}.syncs SET {assignments} FROM recorded WHERE syncs.id = recorded.sync_id"
    "), cleared AS ("
    "  DELETE FROM {s}.progress WHERE sync_id IN (SELECT sync_id FROM recorded)"
    "), resolved AS ("
    "  DELETE FROM {s}.pending WHERE sync_id IN (SELECT sync_id FROM recorded)"
    "   AND idempotency_key = ANY(%(resolved)s::text[])"
    ")"
    " SELECT EXISTS (SELECT FROM held), EXISTS (SELECT FROM recorded)"
)
"""complete_run in one statement: nothing of it is written unless the lease is
held and the run is recorded; it answers (held, recorded)."""


class ConnectionPoolLike(Protocol):
    """
    What :meth:`PostgresStorage.from_pool` needs from a pool: a ``connection()``
    context manager lending a psycopg connection, as ``psycopg_pool.ConnectionPool``
    has. The pool stays the host's: the store never closes it.
    """

    def connection(self) -> AbstractContextManager[_Connection]: ...


# -- secrets -------------------------------------------------------------------


def _scrub(message: str, secret: str | None) -> str:
    if secret:
        message = message.replace(secret, "***")
    return message


def _lock_key(*parts: object) -> int:
    """
    A stable signed 64-bit advisory-lock key (``hash()`` differs per process).
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- connections -----------------------------------------------------------------


class _Connections(Protocol):
    closed: bool

    def session(self) -> AbstractContextManager[_Connection]: ...

    def close(self) -> None: ...


class _PerThread:
    """
    One connection per thread, opened lazily from a factory, in autocommit mode
    (multi-statement operations open explicit transactions). A connection found
    broken is dropped, so the next call reconnects; connections of threads that
    have ended are closed when another one is opened.
    """

    def __init__(self, factory: Callable[[], _Connection]) -> None:
        self._factory = factory
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[threading.Thread, _Connection]] = []
        self.closed = False

    @contextmanager
    def session(self) -> Iterator[_Connection]:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                self._discard(conn)
            conn = self._connect()
        try:
            yield conn
        finally:
            # Interrupted mid-statement or mid-transaction: never reuse it.
            if conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
                self._discard(conn)

    def _connect(self) -> _Connection:
        with self._lock:
            if self.closed:
                raise StorageClosedError("PostgresStorage")
            ended = [c for t, c in self._open if not t.is_alive()]
            self._open = [(t, c) for t, c in self._open if t.is_alive()]
        for old in ended:
            old.close()
        conn = self._factory()
        conn.autocommit = True
        with self._lock:
            self._open.append((threading.current_thread(), conn))
        self._local.conn = conn
        return conn

    def _discard(self, conn: _Connection) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._open = [(t, c) for t, c in self._open if c is not conn]
        conn.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            conns, self._open = self._open, []
        for _, conn in conns:
            conn.close()


class _Pooled:
    """
    Borrow a connection from the host's pool for each operation.
    """

    def __init__(self, pool: ConnectionPoolLike) -> None:
        self._pool = pool
        self.closed = False

    def session(self) -> AbstractContextManager[_Connection]:
        if self.closed:
            raise StorageClosedError("PostgresStorage")
        return self._pool.connection()

    def close(self) -> None:
        self.closed = True


# -- the store -------------------------------------------------------------------


class PostgresStorage(StorageBase):
    """
    Everything cohortsync persists, in one PostgreSQL schema shared by any
    number of worker processes on any number of hosts.

    Args:
        dsn: A libpq connection string or URL
            (``postgresql://user:password@host:5432/db``). Each thread gets its
            own connection, opened on first use and reopened after it breaks.
        schema: The PostgreSQL schema holding cohortsync's tables; created and
            migrated on construction when missing or older.
        connect: Instead of *dsn*, a callable returning a new
            ``psycopg.Connection`` (per thread, like *dsn*); the store owns and
            closes what it returns.

    Use :meth:`from_pool` to borrow connections from a pool the host owns.
    Behind PgBouncer in transaction mode, pass ``connect=`` returning
    connections made with ``prepare_threshold=None``: psycopg otherwise
    prepares statements it sees repeatedly, which transaction pooling breaks.
    The store's advisory locks are transaction-scoped, so they work there.

    Raises:
        StorageError: The server is unreachable, the credentials are refused,
            the role may not create or use the schema, or the database is not
            UTF-8. The message never contains the password.
        SchemaVersionError: The schema was created by a newer cohortsync.
        ConfigurationError: Neither or both of *dsn* and *connect*, or an
            invalid schema name.
    """

    __slots__ = ("_connections", "_filled", "_secret", "_shown", "_sql")

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "cohortsync",
        connect: Callable[[], _Connection] | None = None,
    ) -> None:
        if (dsn is None) == (connect is None):
            shown_dsn = mask_dsn(dsn) if isinstance(dsn, str) else dsn
            raise ConfigurationError("dsn", shown_dsn, "give exactly one of dsn and connect=")
        if dsn is not None:
            factory, shown, secret = _dsn_factory(dsn)
        else:
            assert connect is not None  # noqa: S101 - narrowed by the check above
            factory, shown, secret = connect, f"connect={connect!r}", None
        self._setup(_PerThread(factory), schema, shown=shown, secret=secret)

    @classmethod
    def from_pool(cls, pool: ConnectionPoolLike, *, schema: str = "cohortsync") -> Self:
        """
        Build a store that borrows a connection from *pool* for each operation
        (``psycopg_pool.ConnectionPool`` or anything with a ``connection()``
        context manager). Closing the store leaves the pool open.

        Raises:
            StorageError: As for the constructor.
            SchemaVersionError: As for the constructor.
        """
        store = cls.__new__(cls)
        store._setup(_Pooled(pool), schema, shown=f"pool={pool!r}", secret=None)  # noqa: SLF001
        return store

    def _setup(
        self, connections: _Connections, schema: str, *, shown: str, secret: str | None
    ) -> None:
        _check_schema(schema)
        self._connections = connections
        self._filled: set[tuple[int, int]] = set()
        self._shown = shown
        self._secret = secret
        self._sql = _Queries(schema)
        try:
            self._migrate()
        except BaseException:
            connections.close()
            raise

    @property
    def schema(self) -> str:
        """
        The PostgreSQL schema holding the tables.
        """
        return self._sql.schema

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._shown}, schema={self.schema!r})"

    def close(self) -> None:
        """
        Close the connections this store opened (a host's pool stays open).
        """
        self._connections.close()

    # -- plumbing ----------------------------------------------------------------

    @contextmanager
    def _cursor(self, operation: str, *, transaction: bool = False) -> Iterator[_Cursor]:
        """
        A cursor on this thread's (or a borrowed) connection, inside a
        transaction when asked; driver errors become :class:`StorageError`.
        """
        if self._connections.closed:
            raise StorageClosedError(repr(self))
        try:
            with self._connections.session() as conn:
                if transaction:
                    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
                        yield cur
                else:
                    with conn.cursor(row_factory=tuple_row) as cur:
                        yield cur
        except psycopg.Error as exc:
            raise self._translate(operation, exc) from exc

    @contextmanager
    def _connection(self, operation: str) -> Iterator[_Connection]:
        """
        This thread's (or a borrowed) connection, for statements sent together
        in pipeline mode (``conn.pipeline()``); driver errors become
        :class:`StorageError`.

        See :func:`_together` for how statements are sent together.
        """
        if self._connections.closed:
            raise StorageClosedError(repr(self))
        try:
            with self._connections.session() as conn:
                yield conn
        except psycopg.Error as exc:
            raise self._translate(operation, exc) from exc

    def _translate(self, operation: str, exc: psycopg.Error) -> StorageError:
        detail = _scrub(str(exc).strip() or type(exc).__name__, self._secret)
        if isinstance(exc, pg_errors.InsufficientPrivilege) and operation == _MIGRATE:
            return StorageError(
                f"cannot create or migrate schema {self.schema!r} at {self._shown} ({detail}): "
                "run cohortsync once as a role that may CREATE in the database (or as the "
                "schema's owner), then grant this role USAGE on the schema and SELECT, "
                "INSERT, UPDATE, DELETE on its tables"
            )
        if isinstance(exc, pg_errors.InsufficientPrivilege):
            return StorageError(
                f"{operation}: the PostgreSQL role lacks a privilege on schema "
                f"{self.schema!r} ({detail}); grant USAGE on the schema and SELECT, INSERT, "
                "UPDATE, DELETE on its tables, or connect as its owner"
            )
        if self._connections.closed:
            # The store was closed while this call ran (its connection with it).
            return StorageClosedError(repr(self))
        if (exc.sqlstate or "").startswith("40"):
            # Class 40, transaction rollback: a deadlock, a serialisation failure.
            return StorageError(
                f"{operation}: PostgreSQL rolled the call's transaction back [{exc.sqlstate}] "
                f"({detail}); nothing of it was committed, and the call can be retried"
            )
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return StorageError(
                f"{operation}: lost or failed connection to PostgreSQL ({detail}); a write "
                "in flight when the connection went may or may not have been committed "
                "(read before retrying a create), and the store reconnects on the next call"
            )
        state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        return StorageError(f"{operation}: PostgreSQL error{state}: {detail}")

    def _migrate(self) -> None:
        render = self._sql
        with self._cursor(f"opening the store at {self._shown}") as cur:
            cur.execute("SELECT current_setting('server_encoding')")
            encoding = _one(cur)[0]
            found = self._schema_version(cur)
        if encoding != "UTF8":
            raise StorageError(
                f"the database at {self._shown} uses encoding {encoding}; cohortsync needs UTF8"
            )
        if found != SCHEMA_VERSION:
            with self._cursor(_MIGRATE, transaction=True) as cur:
                cur.execute(
                    "SELECT pg_advisory_xact_lock(%s)", (_lock_key("migrate", self.schema),)
                )
                # CREATE SCHEMA needs CREATE on the database even with IF NOT EXISTS:
                # a role given an existing schema must not need it.
                cur.execute(
                    "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (self.schema,)
                )
                if cur.fetchone() is None:
                    cur.execute(render("CREATE SCHEMA {s}"))
                # Another worker may have migrated while this one waited for the lock.
                q.migrate(
                    lambda statement, params: cur.execute(render(statement), params),
                    _MIGRATIONS,
                    self._schema_version(cur),
                )
        self._check_privileges()

    def _schema_version(self, cur: _Cursor) -> int:
        """
        The schema's version: 0 when it is missing or empty (see :func:`_sql.schema_version`).
        """
        cur.execute(
            "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = %s ORDER BY tablename",
            (self.schema,),
        )
        tables = [row[0] for row in cur.fetchall()]

        def read_meta() -> dict[str, str]:
            cur.execute(self._sql(q.READ_META))
            return dict(cur.fetchall())

        return q.schema_version(
            tables,
            read_meta,
            SCHEMA_VERSION,
            foreign=(
                f"schema {self.schema!r} holds tables that are not cohortsync's "
                f"({', '.join(tables[:10])}); cohortsync only uses an empty or missing schema "
                "or its own, so it never modifies someone else's data"
            ),
            where=f"{self.schema}.meta",
        )

    def _check_privileges(self) -> None:
        with self._cursor(f"opening the store at {self._shown}") as cur:
            cur.execute("SELECT has_schema_privilege(%s, 'USAGE')", (self.schema,))
            if not _one(cur)[0]:
                raise StorageError(
                    f"the PostgreSQL role at {self._shown} may not use schema {self.schema!r}: "
                    "grant USAGE on it"
                )
            cur.execute(
                "SELECT t FROM unnest(%s::text[]) AS t"
                " WHERE NOT has_table_privilege(quote_ident(%s) || '.' || t,"
                " 'SELECT, INSERT, UPDATE, DELETE')",
                (list(_TABLES), self.schema),
            )
            missing = [row[0] for row in cur.fetchall()]
        if missing:
            raise StorageError(
                f"the PostgreSQL role at {self._shown} lacks SELECT, INSERT, UPDATE or DELETE "
                f"on {', '.join(f'{self.schema}.{t}' for t in missing)}"
            )

    def _hold(self, cur: _Cursor, lease: Lease, statement: str) -> tuple[Any, ...]:
        """
        Run *statement* (the held sync's row by id and token, locked) and
        return its row, or raise :class:`LeaseLostError` if the lease is gone.
        """
        cur.execute(self._sql(statement), (lease.sync_id, lease.token))
        row = cur.fetchone()
        if row is None:
            raise LeaseLostError(lease.sync_id, lease.owner, lease.token)
        return row

    # -- sync definitions and schedule state -------------------------------------

    def create_sync(self, record: SyncRecord) -> None:
        with self._cursor("create_sync") as cur:
            cur.execute(self._sql(_CREATE_SYNC), q.sync_params(record, _TZ))
            created = _one(cur)[0] == 1
        if not created:
            raise ConfigurationError("id", record.id, "a sync with this id already exists")

    def create_sync_least_loaded(self, record: SyncRecord, buckets: int) -> SyncRecord:
        """
        One statement: the pick of :meth:`least_loaded_slot`, the sync in
        the picked bucket and its count (the period's bucket rows are made
        once per store object, as for the pick). The pick locks the bucket
        row it takes while it holds the least count, so concurrent creators
        are placed as if they came one after another; it never waits for a
        bucket row, so it cannot deadlock (see ``_PICKS_IN_TURN``).
        """
        period, preferred = placement_of(record, buckets)
        params = q.sync_params(record, _TZ)
        params.update(
            period=period,
            buckets=buckets,
            preferred=preferred,
            bucket_seconds=SLOT_BUCKET_SECONDS,
            within=record.offset % SLOT_BUCKET_SECONDS,
        )
        row = None
        deadline = time.monotonic() + _PICK_PATIENCE
        wait = 0.001
        with self._cursor("create_sync_least_loaded") as cur:
            self._fill(cur, period, buckets)
            while row is None:
                for statement, pause in _CREATE_SYNC_LEAST_LOADED:
                    if pause:
                        time.sleep(pause)
                    cur.execute(self._sql(statement), params)
                    row = cur.fetchone()
                    if row is not None:
                        break
                else:
                    # Other writers hold every bucket row of the period.
                    if time.monotonic() >= deadline:
                        raise StorageError(
                            f"create_sync_least_loaded: other writers held every slot bucket "
                            f"of period {period} for {_PICK_PATIENCE:g} s; nothing was written"
                        )
                    time.sleep(wait)
                    wait = min(wait * 2, 0.05)
        if row[1] is None:
            raise ConfigurationError("id", record.id, "a sync with this id already exists")
        return placed(record, row[0])

    def get_sync(self, sync_id: str) -> SyncRecord:
        with self._cursor("get_sync") as cur:
            cur.execute(self._sql(_SELECT_SYNC), (sync_id,))
            row = cur.fetchone()
        if row is None:
            raise SyncNotFoundError(sync_id)
        return q.decode_sync(row, _TZ)

    def list_syncs(self) -> list[SyncRecord]:
        with self._cursor("list_syncs") as cur:
            cur.execute(self._sql(_LIST_SYNCS))
            rows = cur.fetchall()
        return [q.decode_sync(row, _TZ) for row in rows]

    def save_sync(self, record: SyncRecord, *, expected_generation: int) -> None:
        params = q.sync_params(record, _TZ)
        slot = slot_bucket_of(record)
        with self._cursor("save_sync", transaction=True) as cur:
            cur.execute(self._sql(_LOCK_SLOT_OF_SYNC), (record.id,))
            row = cur.fetchone()
            if row is None:
                raise SyncNotFoundError(record.id)
            if row[0] != expected_generation:
                raise ConflictError(record.id, expected_generation, row[0])
            cur.execute(self._sql(q.UPDATE_SYNC), params)
            old = None if row[1] is None or row[2] is None else (row[1], row[2])
            if old != slot:
                # Bucket rows locked in (period, bucket) order: two saves moving
                # syncs between the same two buckets never deadlock.
                moves = [(old, _UNCOUNT_SLOT), (slot, _COUNT_SLOT)]
                for bucket, statement in sorted(m for m in moves if m[0] is not None):
                    cur.execute(self._sql(statement), bucket)

    def save_sync_at(self, record: SyncRecord, *, expected_revision: int) -> None:
        """
        One statement: the update at the expected revision and the move of
        its count (a refused save reads the row once more, to say why).
        """
        params = q.sync_params(record, _TZ)
        params["expected_revision"] = expected_revision
        with self._cursor("save_sync_at") as cur:
            cur.execute(self._sql(_SAVE_SYNC_AT), params)
            row = cur.fetchone()
            if row is not None and row[0] == 1:
                return
            cur.execute(self._sql(q.REVISION_OF_SYNC), (record.id,))
            found = cur.fetchone()
        if found is None:
            raise SyncNotFoundError(record.id)
        raise ConflictError(record.id, expected_revision, found[0], counter="revision")

    def next_due(self) -> datetime | None:
        """
        Walk active syncs in due order (the claim index), a page of 64 at a
        time, until the rule of :func:`~cohortsync.storage._rules.earliest_claimable`
        has its answer (a page or two: leased syncs are the few runs in flight).
        """
        return earliest_claimable(self._due_order())

    def _due_order(self) -> Iterator[tuple[datetime, datetime | None]]:
        after: tuple[datetime, str] | None = None
        while True:
            with self._cursor("next_due") as cur:
                if after is None:
                    cur.execute(
                        self._sql(
                            "SELECT next_due, id, lease_expires FROM {s}.syncs"
                            " WHERE status = 'active' AND next_due IS NOT NULL"
                            " ORDER BY next_due, id LIMIT 64"
                        )
                    )
                else:
                    cur.execute(
                        self._sql(
                            "SELECT next_due, id, lease_expires FROM {s}.syncs"
                            " WHERE status = 'active' AND next_due IS NOT NULL"
                            " AND (next_due, id) > (%s, %s)"
                            " ORDER BY next_due, id LIMIT 64"
                        ),
                        after,
                    )
                rows = cur.fetchall()
            for due, sync_id, expires in rows:
                yield due, expires
                after = (due, sync_id)
            if len(rows) < 64:
                return

    def scheduled_after(self, now: datetime) -> list[SyncRecord]:
        with self._cursor("scheduled_after") as cur:
            cur.execute(self._sql(q.SCHEDULED_AFTER), (require_aware(now, "now"),))
            rows = cur.fetchall()
        return [q.decode_sync(row, _TZ) for row in rows]

    def due_between(
        self, after: tuple[datetime, str] | None, until: datetime, limit: int
    ) -> list[SyncRecord]:
        """
        A range of the claim's index (``syncs_due``), from the key *after*.
        """
        until = require_aware(until, "until")
        with self._cursor("due_between") as cur:
            if after is None:
                cur.execute(self._sql(_DUE_BETWEEN), (until, max(limit, 0)))
            else:
                cur.execute(
                    self._sql(_DUE_BETWEEN_AFTER),
                    (until, require_aware(after[0], "after"), after[1], max(limit, 0)),
                )
            rows = cur.fetchall()
        return [q.decode_sync(row, _TZ) for row in rows]

    def page_syncs(self, after: str | None, limit: int) -> list[SyncRecord]:
        with self._cursor("page_syncs") as cur:
            if after is None:
                cur.execute(self._sql(_PAGE_SYNCS), (max(limit, 0),))
            else:
                cur.execute(self._sql(_PAGE_SYNCS_AFTER), (after, max(limit, 0)))
            rows = cur.fetchall()
        return [q.decode_sync(row, _TZ) for row in rows]

    def delete_sync(self, sync_id: str) -> None:
        with self._cursor("delete_sync", transaction=True) as cur:
            for statement in _DELETE_SYNC_STATE:
                cur.execute(self._sql(statement), (sync_id,))
            cur.execute(self._sql(q.DELETE_SYNC), (sync_id,))
            row = cur.fetchone()
            if row is not None and row[0] is not None and row[1] is not None:
                cur.execute(self._sql(_UNCOUNT_SLOT), row)

    # -- slot allocation -----------------------------------------------------------

    def least_loaded_slot(self, period: int, buckets: int, preferred: int) -> int:
        """
        One indexed read, no lock: the first entry of the (period, count,
        bucket) index. Two creators may pick the same bucket at once; each
        counts its own sync in the write that stores it, so the counts stay
        exact and the next pick sees both.
        """
        params = {"period": period, "buckets": buckets, "preferred": preferred % max(buckets, 1)}
        with self._cursor("least_loaded_slot") as cur:
            self._fill(cur, period, buckets)
            cur.execute(self._sql(_PICK_SLOT), params)
            bucket: int = _one(cur)[0]
        return bucket

    def _fill(self, cur: _Cursor, period: int, buckets: int) -> None:
        """
        Give every bucket of the period a row (once per store object and
        period), so the least loaded one is always in the index.
        """
        require_buckets(buckets)
        if (period, buckets) not in self._filled:
            cur.execute(self._sql(_FILL_SLOTS), (period, buckets))
            self._filled.add((period, buckets))

    def slot_counts(self, period: int, buckets: int) -> list[int]:
        with self._cursor("slot_counts") as cur:
            return self._slot_counts(cur, period, buckets)

    def _slot_counts(self, cur: _Cursor, period: int, buckets: int) -> list[int]:
        counts = [0] * buckets
        self._fill(cur, period, buckets)
        cur.execute(
            self._sql(
                "SELECT bucket, syncs FROM {s}.slot_buckets"
                " WHERE period = %s AND bucket >= 0 AND bucket < %s"
            ),
            (period, buckets),
        )
        for bucket, count in cur.fetchall():
            counts[bucket] = count
        return counts

    def create_syncs(self, records: Sequence[SyncRecord]) -> list[str]:
        """
        One statement per 50,000 records, all in one transaction: the rows
        as one array parameter per column, and the counts added per bucket.
        """
        require_distinct_ids(records)
        if not records:
            return []
        with self._cursor("create_syncs", transaction=True) as cur:
            return self._insert_syncs(cur, records)

    def _insert_syncs(self, cur: _Cursor, records: Sequence[SyncRecord]) -> list[str]:
        created: set[str] = set()
        for chunk in _chunks(records):
            rows = [q.sync_params(record, _TZ) for record in chunk]
            cur.execute(
                self._sql(_CREATE_SYNCS), {c: [r[c] for r in rows] for c, _ in _SYNC_ARRAYS}
            )
            created.update(row[0] for row in cur.fetchall())
        return [r.id for r in records if r.id not in created]

    def create_syncs_placed(
        self, ids: Sequence[str], place: Placement
    ) -> tuple[list[SyncRecord], list[str]]:
        """
        One transaction holding a transaction-scoped advisory lock of this
        schema's slots: *place* reads the counts inside it, so bulk creators
        in other sessions pick in turn (one-by-one creates do not take the
        lock: each picks and counts in one statement).
        """
        filled = set(self._filled)
        try:
            with self._cursor("create_syncs", transaction=True) as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("slots", self.schema),))
                cur.execute(self._sql("SELECT id FROM {s}.syncs WHERE id = ANY(%s)"), (list(ids),))
                taken = {row[0] for row in cur.fetchall()}
                records = list(
                    place(lambda period, buckets: self._slot_counts(cur, period, buckets), taken)
                )
                require_distinct_ids(records)
                return written(records, self._insert_syncs(cur, records) if records else [])
        except BaseException:
            # The bucket rows this transaction made are rolled back with it:
            # forget them, so the next pick makes them again (it is idempotent).
            self._filled.intersection_update(filled)
            raise

    # -- claims and leases ---------------------------------------------------------

    def claim_due(self, now: datetime, owner: str, lease_for: timedelta, limit: int) -> list[Lease]:
        now = require_aware(now, "now")
        if limit <= 0:
            return []
        expires = add_saturating(now, lease_for)
        tokens = [secrets.token_hex(16) for _ in range(limit)]
        with self._cursor("claim_due") as cur:
            # One statement: the locked candidates are leased before any other
            # claimant can see them, and rows another claimant holds are skipped.
            cur.execute(
                self._sql(_CLAIM),
                {
                    "now": now,
                    "limit": limit,
                    "owner": owner,
                    "tokens": tokens,
                    "expires": expires,
                },
            )
            rows = cur.fetchall()
            # The leases are taken (one statement, committed): a damaged row
            # is taken off the schedule again, not leased to nobody.
            return q.decode_claims(
                rows,
                owner,
                expires,
                _TZ,
                lambda sync_id: cur.execute(self._sql(q.UNSCHEDULE), (sync_id,)),
            )

    def extend_lease(self, lease: Lease, now: datetime, lease_for: timedelta) -> Lease:
        now = require_aware(now, "now")
        expires = add_saturating(now, lease_for)
        with self._cursor("extend_lease") as cur:
            cur.execute(self._sql(q.EXTEND_LEASE), (expires, lease.sync_id, lease.token))
            held = cur.rowcount == 1
        if not held:
            raise LeaseLostError(lease.sync_id, lease.owner, lease.token)
        return attrs.evolve(lease, expires_at=expires)

    def release_lease(self, lease: Lease) -> None:
        with self._cursor("release_lease") as cur:
            cur.execute(self._sql(q.RELEASE_LEASE), (lease.sync_id, lease.token))
            held = cur.rowcount == 1
        if not held:
            raise LeaseLostError(lease.sync_id, lease.owner, lease.token)

    def claim_runs(
        self, now: datetime, owner: str, lease_for: timedelta, limit: int
    ) -> list[Claim]:
        """
        :meth:`claim_due` with each claimed sync's record and delivered-state
        facts, in one round trip: the claim, then the read of the rows it
        claimed, two statements of one transaction sent together (see
        :func:`_together`).

        Not one statement: every part of a statement reads the snapshot taken
        when it began, before the claim locks its rows, so a batch the lease's
        expired holder applied in between would be missing from the facts. The
        read after the claim sees everything committed before the claim locked
        the rows, and nobody else can write them until the lease is released.
        """
        now = require_aware(now, "now")
        if limit <= 0:
            return []
        expires = add_saturating(now, lease_for)
        params = {
            "now": now,
            "limit": limit,
            "owner": owner,
            "tokens": [secrets.token_hex(16) for _ in range(limit)],
            "expires": expires,
        }
        with (
            self._connection("claim_runs") as conn,
            conn.cursor(row_factory=tuple_row) as claim,
            conn.cursor(row_factory=tuple_row) as read,
        ):
            with _together(conn):
                claim.execute(self._sql(_CLAIM_RUNS), params)
                read.execute(self._sql(_READ_CLAIMED))
            rows = read.fetchall()
            # The leases are taken (committed): a damaged row is taken off the
            # schedule again, not leased to nobody.
            return q.decode_claim_runs(
                rows,
                owner,
                expires,
                _TZ,
                lambda sync_id: read.execute(self._sql(q.UNSCHEDULE), (sync_id,)),
            )

    def complete_run(self, lease: Lease, completion: Completion) -> None:
        """
        One statement (one round trip): lock the held sync's row if the token
        is still the lease's, insert the run, write the completion rule's
        changes decided from the row (see
        :func:`~cohortsync.storage._sql.completion_assignments`), and delete
        the resolved pending batches and the progress; nothing of it unless
        the lease is held and the slot not recorded yet.
        """
        with self._cursor("complete_run") as cur:
            cur.execute(*self._completion(lease, completion))
            error = _refused(lease, completion, _one(cur))
        if error is not None:
            raise error

    def complete_runs(
        self, completions: Sequence[tuple[Lease, Completion]]
    ) -> list[Exception | None]:
        """
        Every completion's statement (see :meth:`complete_run`) in one
        transaction, sent together in pipeline mode (see :func:`_together`):
        one round trip, one commit. A refused completion writes nothing (its statement writes
        only once the lease is held and the run recorded), so it fails
        alone without a savepoint; any other failure rolls back all of them.
        """
        out: list[Exception | None] = []
        if not completions:
            return out
        with self._connection("complete_runs") as conn:
            cursors = [conn.cursor(row_factory=tuple_row) for _ in completions]
            try:
                with _together(conn):
                    for cur, (lease, completion) in zip(cursors, completions, strict=True):
                        cur.execute(*self._completion(lease, completion))
                for cur, (lease, completion) in zip(cursors, completions, strict=True):
                    out.append(_refused(lease, completion, _one(cur)))
            finally:
                for cur in cursors:
                    cur.close()
        return out

    def _completion(self, lease: Lease, completion: Completion) -> tuple[sql.Composed, Any]:
        assignments, params = q.completion_assignments(lease, completion, _TZ)
        params.update(q.run_params(completion.run, _TZ))
        params["token"] = lease.token
        params["resolved"] = list(completion.resolved)
        return self._sql(_COMPLETE.replace("{assignments}", assignments)), params

    def begin_batch(
        self, lease: Lease, batch: PendingBatch, *, replaces: str | None = None
    ) -> None:
        members = q.encode_members(batch.members)
        with self._cursor("begin_batch", transaction=True) as cur:
            self._hold(cur, lease, _SHARE_HELD)
            if replaces is not None:
                cur.execute(self._sql(q.DELETE_PENDING), (lease.sync_id, replaces))
            # Delete then insert: a re-begun batch gets a new seq, the newest.
            cur.execute(self._sql(q.DELETE_PENDING), (lease.sync_id, batch.idempotency_key))
            cur.execute(
                self._sql(
                    "INSERT INTO {s}.pending (sync_id, idempotency_key, run_id, operation, members)"
                    " VALUES (%s, %s, %s, %s, %s::jsonb)"
                ),
                (
                    lease.sync_id,
                    batch.idempotency_key,
                    batch.run_id,
                    batch.operation.value,
                    members,
                ),
            )

    def pending_batches(self, sync_id: str) -> list[PendingBatch]:
        with self._cursor("pending_batches") as cur:
            cur.execute(
                self._sql(
                    "SELECT idempotency_key, run_id, operation, members::text FROM {s}.pending"
                    " WHERE sync_id = %s ORDER BY seq"
                ),
                (sync_id,),
            )
            rows = cur.fetchall()
        return q.decode_pending(sync_id, rows)

    def progress(self, sync_id: str) -> Progress | None:
        with self._cursor("progress") as cur:
            cur.execute(self._sql(q.SELECT_PROGRESS), (sync_id,))
            row = cur.fetchone()
        return q.decode_progress(sync_id, row, _TZ)

    # -- delivered state -----------------------------------------------------------

    def iter_delivered(self, sync_id: str) -> Iterator[str]:
        """
        Stream the delivered keys in ascending (byte-wise) order, a page of
        10,000 at a time, so a million-member state never sits in memory.

        The first page is read at call time; later pages are read as the
        iterator advances (keyset pagination, no transaction held open), so a
        change committed meanwhile beyond the current page may be seen.
        """
        first = self._delivered_page(sync_id, None)
        return self._pages(sync_id, first)

    def _pages(self, sync_id: str, page: list[str]) -> Iterator[str]:
        while page:
            yield from page
            if len(page) < _PAGE:
                return
            page = self._delivered_page(sync_id, page[-1])

    def _delivered_page(self, sync_id: str, after: str | None) -> list[str]:
        with self._cursor("iter_delivered") as cur:
            if after is None:
                cur.execute(
                    self._sql(
                        "SELECT key FROM {s}.delivered WHERE sync_id = %s ORDER BY key LIMIT %s"
                    ),
                    (sync_id, _PAGE),
                )
            else:
                cur.execute(
                    self._sql(
                        "SELECT key FROM {s}.delivered WHERE sync_id = %s AND key > %s"
                        " ORDER BY key LIMIT %s"
                    ),
                    (sync_id, after, _PAGE),
                )
            return [row[0] for row in cur.fetchall()]

    def count_delivered(self, sync_id: str) -> int:
        """
        The count apply_batch keeps (see migration 4), not a count of the rows.
        """
        with self._cursor("count_delivered") as cur:
            cur.execute(
                self._sql("SELECT delivered_count FROM {s}.delivered_versions WHERE sync_id = %s"),
                (sync_id,),
            )
            row = cur.fetchone()
        return 0 if row is None else int(row[0])

    def filter_delivered(self, sync_id: str, keys: Iterable[str]) -> set[str]:
        wanted = list(keys)
        found: set[str] = set()
        if not wanted:
            return found
        with self._cursor("filter_delivered") as cur:
            for chunk in _chunks(wanted):
                cur.execute(
                    self._sql(
                        "SELECT key FROM {s}.delivered WHERE sync_id = %s AND key = ANY(%b::text[])"
                    ),
                    (sync_id, list(chunk)),
                )
                found.update(row[0] for row in cur.fetchall())
        return found

    def delivered_identifiers(self, sync_id: str, keys: Sequence[str]) -> dict[str, Identifier]:
        stored: dict[str, tuple[str | None, str | None]] = {}
        if keys:
            with self._cursor("delivered_identifiers") as cur:
                for chunk in _chunks(keys):
                    cur.execute(
                        self._sql(
                            "SELECT key, id_kind, id_value FROM {s}.delivered"
                            " WHERE sync_id = %s AND key = ANY(%b::text[])"
                        ),
                        (sync_id, list(chunk)),
                    )
                    stored.update((key, (kind, value)) for key, kind, value in cur.fetchall())
        # Answer in the order asked, like the reference store.
        return {
            key: q.decode_identifier(sync_id, key, *stored[key]) for key in keys if key in stored
        }

    def has_mapped_identifiers(self, sync_id: str) -> bool:
        """As :meth:`~cohortsync.storage.MemoryStorage.has_mapped_identifiers`, by one probe."""
        with self._cursor("has_mapped_identifiers") as cur:
            cur.execute(
                self._sql(
                    "SELECT 1 FROM {s}.delivered WHERE sync_id = %s"
                    " AND id_value IS NOT NULL LIMIT 1"
                ),
                (sync_id,),
            )
            return cur.fetchone() is not None

    def identifier_holders(
        self, sync_id: str, identifiers: Iterable[Identifier]
    ) -> dict[Identifier, list[str]]:
        wanted = set(identifiers)
        by_value = sorted({i.value for i in wanted})
        own = sorted({i.value for i in wanted if i.kind is IdentifierKind.USER_ID})
        rows: list[tuple[str, Identifier]] = []
        keys: list[str] = []
        with self._cursor("identifier_holders") as cur:
            for chunk in _chunks(by_value):
                cur.execute(
                    self._sql(
                        "SELECT key, id_kind, id_value FROM {s}.delivered WHERE sync_id = %s"
                        " AND id_value IS NOT NULL AND id_value = ANY(%b::text[])"
                    ),
                    (sync_id, list(chunk)),
                )
                rows.extend(
                    (key, q.decode_identifier(sync_id, key, kind, value))
                    for key, kind, value in cur.fetchall()
                )
            for chunk in _chunks(own):
                cur.execute(
                    self._sql(
                        "SELECT key FROM {s}.delivered WHERE sync_id = %s"
                        " AND id_kind IS NULL AND key = ANY(%b::text[])"
                    ),
                    (sync_id, list(chunk)),
                )
                keys.extend(key for (key,) in cur.fetchall())
        return collect_holders(wanted, rows, keys)

    def apply_batch(self, lease: Lease, batch: AppliedBatch) -> str:
        sync_id = lease.sync_id
        # Last identifier wins for a key added twice; an identity mapping
        # (user_id equal to the key) is stored as NULL to keep rows small.
        added = {member.key: q.identifier_columns(member) for member in batch.added}
        removed = list(dict.fromkeys(batch.removed))
        with self._cursor("apply_batch", transaction=True) as cur:
            # FOR SHARE: parallel batches of one run may apply together, but no
            # claimant can take the lease over until this transaction ends.
            self._hold(cur, lease, _SHARE_HELD)
            keys = list(added)
            # How many keys the batch adds to the state, and takes out: counted
            # by the statements that do it, so delivered_count stays exact
            # (parallel batches of the run included: each counts only the rows
            # it inserted or deleted itself).
            change = 0
            for chunk in _chunks(keys):
                columns = {
                    "sync": sync_id,
                    "keys": list(chunk),
                    "kinds": [added[k][0] for k in chunk],
                    "values": [added[k][1] for k in chunk],
                }
                cur.execute(self._sql(_INSERT_DELIVERED), columns)
                change += cur.rowcount
                if cur.rowcount != len(chunk):
                    # Some were delivered already: give them the identifier sent now.
                    cur.execute(self._sql(_UPDATE_DELIVERED), columns)
            for chunk in _chunks(removed):
                cur.execute(
                    self._sql(
                        "DELETE FROM {s}.delivered WHERE sync_id = %s AND key = ANY(%b::text[])"
                    ),
                    (sync_id, list(chunk)),
                )
                change -= cur.rowcount
            if keys or removed:
                cur.execute(self._sql(q.HAS_LEDGER), (sync_id,))
                if cur.fetchone() is not None:
                    for chunk in _chunks([*keys, *removed]):
                        cur.execute(
                            self._sql(
                                "DELETE FROM {s}.ledger"
                                " WHERE sync_id = %s AND key = ANY(%b::text[])"
                            ),
                            (sync_id, list(chunk)),
                        )
            if batch.rejected:
                self._reject(cur, sync_id, batch)
            cur.execute(
                self._sql(q.INSERT_BATCH),
                (
                    batch.run_id,
                    batch.sequence,
                    batch.operation.value,
                    batch.idempotency_key,
                    batch.at,
                ),
            )
            cur.execute(self._sql(q.DELETE_PENDING), (sync_id, batch.idempotency_key))
            if batch.slot is not None and batch.tally:
                cur.execute(
                    self._sql(q.ADD_PROGRESS),
                    q.progress_params(sync_id, batch.slot, batch.tally, _TZ),
                )
            version = secrets.token_hex(8)
            cur.execute(self._sql(_MOVE_DELIVERED), (sync_id, version, change))
        return version

    def delivered_version(self, sync_id: str) -> str:
        with self._cursor("delivered_version") as cur:
            cur.execute(
                self._sql("SELECT version FROM {s}.delivered_versions WHERE sync_id = %s"),
                (sync_id,),
            )
            row = cur.fetchone()
        return "" if row is None else str(row[0])

    def _reject(self, cur: _Cursor, sync_id: str, batch: AppliedBatch) -> None:
        # A key rejected n times in one batch counts n attempts, the last reason wins.
        tally: dict[str, list[Any]] = {}
        for key, reason in batch.rejected:
            entry = tally.setdefault(key, [reason, 0])
            entry[0] = reason
            entry[1] += 1
        keys = sorted(tally)  # one lock order for concurrent writers
        cur.execute(
            self._sql(
                "INSERT INTO {s}.ledger AS l"
                " (sync_id, key, reason, attempts, dead, first_seen, last_seen)"
                " SELECT %(sync)s, k, r, n, n >= %(max)s, %(at)s, %(at)s"
                " FROM unnest(%(keys)s::text[], %(reasons)s::text[], %(counts)s::int[])"
                " AS t(k, r, n)"
                " ON CONFLICT (sync_id, key) DO UPDATE SET reason = EXCLUDED.reason,"
                " attempts = l.attempts + EXCLUDED.attempts,"
                " dead = l.attempts + EXCLUDED.attempts >= %(max)s,"
                " last_seen = EXCLUDED.last_seen"
            ),
            {
                "sync": sync_id,
                "max": batch.max_rejection_attempts,
                "at": batch.at,
                "keys": keys,
                "reasons": [tally[k][0] for k in keys],
                "counts": [tally[k][1] for k in keys],
            },
        )
        self._insert_issues(
            cur,
            [
                (batch.run_id, key, IssueKind.REJECTED.value, reason)
                for key, reason in batch.rejected
            ],
        )

    def _insert_issues(self, cur: _Cursor, issues: Sequence[tuple[str, str, str, str]]) -> None:
        for chunk in _chunks(issues):
            cur.execute(
                self._sql(
                    "INSERT INTO {s}.issues (run_id, key, kind, reason)"
                    " SELECT run_id, key, kind, reason"
                    " FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[])"
                    " WITH ORDINALITY AS t(run_id, key, kind, reason, n) ORDER BY n"
                ),
                [list(column) for column in zip(*chunk, strict=True)],
            )

    def record_issues(self, lease: Lease, issues: Sequence[MemberIssue]) -> None:
        with self._cursor("record_issues", transaction=True) as cur:
            self._hold(cur, lease, _SHARE_HELD)
            self._insert_issues(cur, [(i.run_id, i.key, i.kind.value, i.reason) for i in issues])

    # -- ledger and history --------------------------------------------------------

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        with self._cursor("ledger") as cur:
            cur.execute(self._sql(q.SELECT_LEDGER), (sync_id,))
            rows = cur.fetchall()
        return q.decode_ledger(sync_id, rows, _TZ)

    def dead_letters(self, sync_id: str) -> set[str]:
        with self._cursor("dead_letters") as cur:
            cur.execute(self._sql(q.DEAD_LETTERS), (sync_id,))
            return {row[0] for row in cur.fetchall()}

    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        with self._cursor("history") as cur:
            cur.execute(
                self._sql(
                    "SELECT id, record FROM {s}.runs WHERE sync_id = %s"
                    " ORDER BY started_at DESC, slot DESC LIMIT %s"
                ),
                (sync_id, None if limit is None or limit < 0 else limit),  # NULL: no limit
            )
            rows = cur.fetchall()
        return q.limit_history([q.decode_run(run_id, record) for run_id, record in rows], limit)

    def run_issues(self, run_id: str) -> list[MemberIssue]:
        with self._cursor("run_issues") as cur:
            cur.execute(
                self._sql(
                    "SELECT key, kind, reason FROM {s}.issues WHERE run_id = %s"
                    " ORDER BY kind, key, id"
                ),
                (run_id,),
            )
            rows = cur.fetchall()
        return [
            MemberIssue(run_id=run_id, key=key, kind=kind, reason=reason)
            for key, kind, reason in rows
        ]

    def purge_history(self, before: datetime) -> int:
        before = require_aware(before, "before")
        with self._cursor("purge_history") as cur:
            cur.execute(
                self._sql(
                    "WITH gone AS (DELETE FROM {s}.runs WHERE finished_at < %s RETURNING id),"
                    " b AS (DELETE FROM {s}.batches WHERE run_id IN (SELECT id FROM gone)),"
                    " i AS (DELETE FROM {s}.issues WHERE run_id IN (SELECT id FROM gone)),"
                    # Batches of runs that never completed (a crashed worker)
                    # have no run to go with: they age out on their own time.
                    " o AS (DELETE FROM {s}.batches WHERE at < %s)"
                    " SELECT count(*) FROM gone"
                ),
                (before, before),
            )
            purged: int = _one(cur)[0]
        return purged


class _Queries:
    """
    Renders SQL templates: ``{s}`` is the schema as a quoted identifier.

    Each template is rendered once, to a single literal part: psycopg turns
    a query into bytes at every ``execute``, and a template formatted with
    an :class:`~psycopg.sql.Identifier` pays a libpq escaping call and a join
    of all its parts each time (9 us for a ``create_sync``'s statement in a
    hot loop, 1.4 us as one part; about 20 us of a create's client CPU when
    the server's work has cooled the caches in between). The schema is
    checked to be a plain lower-case name (:func:`_check_schema`), so its
    quoted form is the same on every connection; the text is still encoded
    per connection.
    """

    __slots__ = ("_cache", "_schema", "schema")

    def __init__(self, schema: str) -> None:
        _check_schema(schema)
        self.schema = schema
        self._schema = sql.SQL(f'"{schema}"')
        self._cache: dict[str, sql.Composed] = {}

    def __call__(self, template: str) -> sql.Composed:
        composed = self._cache.get(template)
        if composed is None:
            text = sql.SQL(template).format(s=self._schema).as_string(None)
            composed = sql.Composed([sql.SQL(text)])
            self._cache[template] = composed
        return composed


_PIPELINE = psycopg.Pipeline.is_supported()
"""Whether the libpq psycopg uses has pipeline mode (libpq 14 and later)."""


def _together(conn: _Connection) -> AbstractContextManager[Any]:
    """
    Run the statements executed in the block as one transaction, sent together.

    In pipeline mode (``conn.pipeline()``) they are one round trip: on the
    store's own (autocommit) connections the server runs everything up to the
    pipeline's single ``Sync`` as one implicit transaction, committed at the
    ``Sync`` and rolled back whole if a statement fails; a host's pooled
    connection wraps them in its own transaction. (Not ``conn.transaction()``
    around the pipeline: psycopg waits for its ``BEGIN`` and ``COMMIT``, two
    more round trips.) Read the cursors' results after the block.

    With a libpq older than 14 (no pipeline mode) they are an explicit
    transaction, a round trip each.
    """
    return conn.pipeline() if _PIPELINE else conn.transaction()


def _refused(
    lease: Lease, completion: Completion, answer: tuple[Any, ...]
) -> CohortSyncError | None:
    """
    The error of a completion :data:`_COMPLETE` answered (held, recorded) for.
    """
    held, recorded = answer
    if not held:
        return LeaseLostError(lease.sync_id, lease.owner, lease.token)
    if not recorded:
        return DuplicateRunError(completion.run.sync_id, completion.run.slot)
    return None


def _one(cur: _Cursor) -> tuple[Any, ...]:
    row = cur.fetchone()
    if row is None:  # pragma: no cover - aggregate queries always return a row
        raise CorruptStoreError("a query that always returns a row returned none")
    return row


def _check_schema(schema: object) -> None:
    if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
        raise ConfigurationError(
            "schema", schema, "must match ^[a-z_][a-z0-9_]*$ (an unquoted PostgreSQL name)"
        )
    if len(schema) > _MAX_IDENTIFIER:
        raise ConfigurationError("schema", schema, f"must be at most {_MAX_IDENTIFIER} bytes")


def store_exists(dsn: str, schema: str = "cohortsync") -> bool:
    """
    Whether *schema* at *dsn* holds a cohortsync store, read without creating
    anything: constructing a :class:`PostgresStorage` creates a missing
    schema, which a command that only reads (``cohortsync syncs``) must not.

    Raises:
        ConfigurationError: An invalid schema name.
        StorageError: The DSN does not parse, or the server cannot be reached
            or read (the message never contains the password).
    """
    _check_schema(schema)
    factory, shown, secret = _dsn_factory(dsn)
    conn = factory()
    try:
        with conn.cursor(row_factory=tuple_row) as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".meta',))
            return bool(_one(cur)[0])
    except psycopg.Error as exc:
        detail = _scrub(str(exc).strip() or type(exc).__name__, secret)
        raise StorageError(f"reading schema {schema!r} at {shown}: {detail}") from None
    finally:
        conn.close()


def _dsn_factory(dsn: str) -> tuple[Callable[[], _Connection], str, str | None]:
    """
    Parse *dsn* and return a connection factory, the DSN as shown in messages,
    and the password to scrub from driver messages.
    """
    if not isinstance(dsn, str):
        raise ConfigurationError("dsn", type(dsn).__name__, "must be a str")
    shown = repr(mask_dsn(dsn))
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        # Neither the driver's message (it quotes the DSN) nor the DSN itself is
        # shown: unparsed, its password cannot be told apart from the rest.
        raise StorageError(
            "invalid PostgreSQL DSN (not shown, it may hold a password): expected a libpq "
            "connection string (host=... dbname=...) or a URL "
            "(postgresql://user:password@host:port/db)"
        ) from None
    secret = params.get("password")
    extra: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in params:
        extra["connect_timeout"] = 10
    if "application_name" not in params:
        extra["application_name"] = "cohortsync"

    def factory() -> _Connection:
        try:
            return psycopg.connect(dsn, **extra)
        except psycopg.Error as exc:
            detail = _scrub(str(exc).strip(), str(secret) if secret else None)
            raise StorageError(f"cannot connect to PostgreSQL at {shown}: {detail}") from None

    return factory, shown, str(secret) if secret else None
