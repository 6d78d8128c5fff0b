"""
What the SQL stores share: how records become rows and back, the statements
both dialects agree on, and how a schema is recognised, versioned and migrated.

SQLite and PostgreSQL differ in how they store instants (integer
microseconds; ``timestamptz``), how they name tables (a file of its own; a
schema) and how they bind parameters (``?``/``:name``; ``%s``/``%(name)s``).
Everything else about a row is defined here once:

- codecs: :func:`sync_params` and :func:`decode_sync` for sync rows (the
  definition, its schedule state and its lease), :func:`update_params` for a
  partial update such as :func:`~cohortsync.storage.apply_completion`'s,
  :func:`run_params`/:func:`decode_run`, ledger, progress, identifier and
  pending-batch rows, each given the dialect's :class:`Instants`;
- statements, written once in PostgreSQL's style with ``{s}`` for the schema;
  :func:`sqlite_text` renders one for SQLite;
- the schema's ownership and version check (:func:`schema_version`) and the
  migration runner (:func:`migrate`) over a store's list of migrations.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any

import attrs

from cohortsync import _schedule
from cohortsync._clock import require_aware
from cohortsync._converter import dump_run, dump_sync, load_sync, loads
from cohortsync._destination import Identifier, IdentifierKind, Member, Operation
from cohortsync._sync import Sync, SyncRun, Trigger
from cohortsync.exceptions import CorruptStoreError, SchemaVersionError
from cohortsync.storage._protocol import (
    Claim,
    Completion,
    Lease,
    LedgerEntry,
    PendingBatch,
    Progress,
    SyncRecord,
    Tally,
)
from cohortsync.storage._rules import (
    completion_changes,
    identity_keys,
    is_identity,
    slot_bucket_of,
)

__all__ = [
    "APPLICATION",
    "DEFINITION_COLUMNS",
    "MICROSECONDS",
    "TIMESTAMPTZ",
    "Instants",
    "claim_run_columns",
    "completion_assignments",
    "completion_update",
    "decode_claim_runs",
    "decode_claims",
    "decode_identifier",
    "decode_lease",
    "decode_ledger",
    "decode_pending",
    "decode_progress",
    "decode_run",
    "decode_sync",
    "encode_members",
    "identifier_columns",
    "limit_history",
    "migrate",
    "progress_params",
    "run_params",
    "schema_version",
    "sqlite_text",
    "sync_params",
    "update_params",
]

log = logging.getLogger("cohortsync.storage")

APPLICATION = "cohortsync"
"""What the ``meta`` table's ``application`` row holds in a schema cohortsync owns."""

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)


# -- instants ---------------------------------------------------------------------


@attrs.frozen
class Instants:
    """
    How a dialect stores an aware UTC instant, and reads it back.

    ``decode`` raises :class:`~cohortsync.exceptions.CorruptStoreError` for a
    value the store could not have written.
    """

    encode: Callable[[datetime], Any]
    decode: Callable[[Any], datetime]

    def encode_optional(self, value: datetime | None) -> Any:
        return None if value is None else self.encode(value)

    def decode_optional(self, value: Any) -> datetime | None:
        return None if value is None else self.decode(value)


def _to_microseconds(value: datetime) -> int:
    return (require_aware(value) - _EPOCH) // _ONE_US


def _from_microseconds(value: Any) -> datetime:
    # Any integer is an instant (before 1970 is negative); nothing else is (a
    # bool is not: its type is bool).
    if type(value) is not int:
        raise CorruptStoreError(f"stored time {value!r} is not a usable timestamp")
    try:
        # A multiplication costs half the keyword constructor (hot: a claim
        # decodes several instants per run).
        return _EPOCH + _ONE_US * value
    except OverflowError as exc:
        raise CorruptStoreError(f"stored time {value!r} is not a usable timestamp") from exc


def _from_timestamptz(value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise CorruptStoreError(f"stored time {value!r} is not a timestamp")
    return value


MICROSECONDS = Instants(encode=_to_microseconds, decode=_from_microseconds)
"""SQLite's: integer microseconds since the Unix epoch (they index and compare fast)."""

TIMESTAMPTZ = Instants(encode=require_aware, decode=_from_timestamptz)
"""PostgreSQL's: ``timestamptz``, adapted by the driver."""


# -- statements both dialects agree on -------------------------------------------

CLEAR_LEASE = (
    "lease_owner = NULL, lease_token = NULL, lease_expires = NULL,"
    " lease_slot = NULL, lease_generation = NULL, lease_trigger = NULL, lease_revision = NULL"
)
"""The assignments that release a lease."""

SYNC_COLUMNS = (
    "id, definition, generation, status, next_due, next_trigger, slot_offset, slot_bucket,"
    " anchor, attempts, full_resync, feed_cursor, last_full_sync_at, last_slot, scheduled_from,"
    " revision, lease_owner, lease_token, lease_expires, lease_slot, lease_generation,"
    " lease_trigger, lease_revision"
)
"""The columns :func:`decode_sync` reads, in its order."""

SELECT_SYNCS = f"SELECT {SYNC_COLUMNS} FROM {{s}}.syncs"  # noqa: S608 - constant columns


def claim_run_columns(delivered: str = "delivered_count, delivered_version") -> str:
    """
    The columns of :data:`CLAIM_RUN_COLUMNS`, with *delivered* the dialect's
    expressions of the delivered count and version (a store keeping them
    elsewhere than on the sync row names them there).
    """
    return (
        f"{SYNC_COLUMNS}, {delivered},"  # noqa: S608 - constant columns
        " EXISTS (SELECT 1 FROM {s}.pending AS p WHERE p.sync_id = syncs.id),"
        " EXISTS (SELECT 1 FROM {s}.ledger AS l WHERE l.sync_id = syncs.id),"
        " EXISTS (SELECT 1 FROM {s}.progress AS g WHERE g.sync_id = syncs.id)"
    )


CLAIM_RUN_COLUMNS = claim_run_columns()
"""What a claim returns for :func:`decode_claim_runs`: the row and the facts of a
:class:`~cohortsync.storage.Claim`, read in the claim's own transaction (the
sync row is ``syncs``)."""
_SYNC_WIDTH = SYNC_COLUMNS.count(",") + 1
DEFINITION_COLUMNS = (
    "definition",
    "generation",
    "status",
    "next_due",
    "next_trigger",
    "slot_offset",
    "slot_bucket",
    "anchor",
    "attempts",
    "full_resync",
    "feed_cursor",
    "last_full_sync_at",
    "scheduled_from",
    "slot_period",
)
INSERT_SYNC = (
    f"INSERT INTO {{s}}.syncs (id, {', '.join(DEFINITION_COLUMNS)})"  # noqa: S608 - constant
    f" VALUES (%(id)s, {', '.join(f'%({c})s' for c in DEFINITION_COLUMNS)})"
    " ON CONFLICT (id) DO NOTHING"
)
"""Create a sync from :func:`sync_params`; no row changes when the id is taken."""
UPDATE_SYNC = (
    "UPDATE {s}.syncs SET"  # noqa: S608 - constant columns
    f" {', '.join(f'{c} = %({c})s' for c in DEFINITION_COLUMNS)}, revision = revision + 1"
    " WHERE id = %(id)s"
)
"""A host's save: the definition and schedule from :func:`sync_params`, a new revision."""
UPDATE_SYNC_AT = f"{UPDATE_SYNC} AND revision = %(expected_revision)s"
"""A host's save compare-and-set on the revision it read (``save_sync_at``)."""
SLOT_OF_SYNC = "SELECT generation, slot_period, slot_bucket FROM {s}.syncs WHERE id = %s"
REVISION_OF_SYNC = "SELECT revision, slot_period, slot_bucket FROM {s}.syncs WHERE id = %s"
DELETE_SYNC = "DELETE FROM {s}.syncs WHERE id = %s RETURNING slot_period, slot_bucket"
SYNC_STATE_TABLES = ("delivered", "ledger", "pending", "progress")
"""Tables whose rows of a sync go with it (history stays until purged)."""
SCHEDULED_AFTER = (
    f"{SELECT_SYNCS} WHERE status = 'active' AND scheduled_from > %s AND lease_token IS NULL"
)
EXTEND_LEASE = "UPDATE {s}.syncs SET lease_expires = %s WHERE id = %s AND lease_token = %s"
UNSCHEDULE = f"UPDATE {{s}}.syncs SET next_due = NULL, {CLEAR_LEASE} WHERE id = %s"  # noqa: S608 - constant
"""Take a sync whose schedule columns are damaged off the schedule."""
RELEASE_LEASE = f"UPDATE {{s}}.syncs SET {CLEAR_LEASE} WHERE id = %s AND lease_token = %s"  # noqa: S608 - constant
HELD = (
    "SELECT generation, revision, next_due, last_slot FROM {s}.syncs"
    " WHERE id = %s AND lease_token = %s"
)
"""What :func:`~cohortsync.storage._rules.completion_changes` reads, if the lease is held."""
IS_HELD = "SELECT 1 FROM {s}.syncs WHERE id = %s AND lease_token = %s"
DELETE_PENDING = "DELETE FROM {s}.pending WHERE sync_id = %s AND idempotency_key = %s"
DELETE_PROGRESS = "DELETE FROM {s}.progress WHERE sync_id = %s"
SELECT_PROGRESS = (
    "SELECT slot, added, removed, rejected, batches, collisions FROM {s}.progress"
    " WHERE sync_id = %s"
)
ADD_PROGRESS = (
    "INSERT INTO {s}.progress AS p"
    " (sync_id, slot, added, removed, rejected, batches, collisions)"
    " VALUES (%(sync_id)s, %(slot)s, %(added)s, %(removed)s, %(rejected)s, %(batches)s,"
    " %(collisions)s)"
    " ON CONFLICT (sync_id) DO UPDATE SET"
    " added = p.added + excluded.added,"
    " removed = p.removed + excluded.removed,"
    " rejected = p.rejected + excluded.rejected,"
    " batches = p.batches + excluded.batches,"
    " collisions = p.collisions + excluded.collisions,"
    " slot = excluded.slot"
)
"""Add a batch's tally to the sync's progress, moved to the batch's slot."""
INSERT_BATCH = (
    "INSERT INTO {s}.batches (run_id, sequence, operation, idempotency_key, at)"
    " VALUES (%s, %s, %s, %s, %s)"
)
HAS_LEDGER = "SELECT 1 FROM {s}.ledger WHERE sync_id = %s LIMIT 1"
SELECT_LEDGER = (
    "SELECT key, reason, attempts, dead, first_seen, last_seen FROM {s}.ledger"
    " WHERE sync_id = %s ORDER BY key"
)
DEAD_LETTERS = "SELECT key FROM {s}.ledger WHERE sync_id = %s AND dead"
READ_META = "SELECT key, value FROM {s}.meta WHERE key IN ('application', 'schema_version')"
_SET_VERSION = (
    "INSERT INTO {s}.meta (key, value) VALUES ('application', %s), ('schema_version', %s)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

_NAMED = re.compile(r"%\((\w+)\)s")


@functools.lru_cache(maxsize=256)
def sqlite_text(template: str) -> str:
    """
    *template* as SQLite runs it: tables unqualified (the file is the
    schema), ``?`` and ``:name`` parameters.
    """
    return _NAMED.sub(r":\1", template.replace("{s}.", "")).replace("%s", "?")


# -- sync rows --------------------------------------------------------------------


_PLAIN, _INSTANT, _OPTIONAL_INSTANT, _ENUM, _BOOL = range(5)

_FIELDS: dict[str, tuple[str, int]] = {
    "next_due": ("next_due", _OPTIONAL_INSTANT),
    "next_trigger": ("next_trigger", _ENUM),
    "offset": ("slot_offset", _PLAIN),
    "slot_bucket": ("slot_bucket", _PLAIN),
    "anchor": ("anchor", _INSTANT),
    "attempts": ("attempts", _PLAIN),
    "full_resync": ("full_resync", _BOOL),
    "feed_cursor": ("feed_cursor", _PLAIN),
    "last_full_sync_at": ("last_full_sync_at", _OPTIONAL_INSTANT),
    "scheduled_from": ("scheduled_from", _OPTIONAL_INSTANT),
    "last_slot": ("last_slot", _OPTIONAL_INSTANT),
    "revision": ("revision", _PLAIN),
}
"""The column of each stored :class:`SyncRecord` field but ``sync``, and how it is encoded."""

_SAVED = ("sync", *(f for f in _FIELDS if f not in ("last_slot", "revision")))
"""The fields a create or save writes (never the lease, ``last_slot`` or the revision)."""


def _put(params: dict[str, Any], field: str, value: Any, instants: Instants) -> None:
    """
    Add the columns of one :class:`SyncRecord` field to *params*.
    """
    if field == "sync":
        # generation and status have columns of their own: claims read them from the index.
        params["definition"] = dump_sync(value)
        params["generation"] = value.generation
        params["status"] = value.status.value
        return
    column, kind = _FIELDS[field]
    if kind == _PLAIN:
        params[column] = value
    elif kind == _ENUM:
        params[column] = value.value
    elif kind == _BOOL:
        params[column] = bool(value)
    elif value is None:  # an optional instant
        params[column] = None
    else:
        params[column] = instants.encode(value)


def sync_params(record: SyncRecord, instants: Instants) -> dict[str, Any]:
    """
    The parameters of :data:`INSERT_SYNC` and :data:`UPDATE_SYNC`: the record's
    definition and schedule, and the slot period it is counted in.
    """
    params: dict[str, Any] = {"id": record.id}
    for field in _SAVED:
        _put(params, field, getattr(record, field), instants)
    slot = slot_bucket_of(record)
    params["slot_period"] = None if slot is None else slot[0]
    return params


def update_params(changes: Mapping[str, Any], instants: Instants) -> tuple[str, dict[str, Any]]:
    """
    An ``UPDATE`` of one sync (``WHERE id = %(id)s``, the caller adds ``id``)
    setting the :class:`SyncRecord` fields in *changes*, such as those of
    :func:`~cohortsync.storage._rules.completion_changes`, and its parameters.
    ``lease`` may only be released (``None``).
    """
    params: dict[str, Any] = {}
    release = False
    for field, value in changes.items():
        if field == "lease":
            if value is not None:
                raise ValueError("an update can release a lease, not take one")
            release = True
        else:
            _put(params, field, value, instants)
    return _update_statement(release, tuple(params)), params


@functools.lru_cache(maxsize=64)
def _update_statement(release: bool, columns: tuple[str, ...]) -> str:
    # A handful of column sets recur (every completion writes one of them):
    # build each statement once, so the drivers' statement caches see one text.
    assignments = [CLEAR_LEASE] if release else []
    assignments.extend(f"{column} = %({column})s" for column in columns)
    return f"UPDATE {{s}}.syncs SET {', '.join(assignments)} WHERE id = %(id)s"  # noqa: S608 - known columns


def completion_update(
    held: Sequence[Any], lease: Lease, completion: Completion, instants: Instants
) -> tuple[str, dict[str, Any]]:
    """
    The ``UPDATE`` that :meth:`~cohortsync.storage.Storage.complete_run` writes
    to the sync's row, and its parameters: the rule of
    :func:`~cohortsync.storage._rules.completion_changes` applied to the
    :data:`HELD` row read in the same transaction.
    """
    generation, revision, next_due, last_slot = held
    changes = completion_changes(
        lease,
        completion,
        generation=generation,
        revision=revision,
        next_due=instants.decode_optional(next_due),
        last_slot=instants.decode_optional(last_slot),
    )
    statement, params = update_params(changes, instants)
    params["id"] = lease.sync_id
    return statement, params


_KEEP = object()
"""A column an outcome of the completion rule leaves as stored."""


def completion_assignments(
    lease: Lease, completion: Completion, instants: Instants
) -> tuple[str, dict[str, Any]]:
    """
    The ``SET`` list of an ``UPDATE`` of the sync's row that writes the
    completion rule's changes as decided from the row *as the update finds
    it*, and its parameters (named ``c_...``): what :func:`completion_update`
    writes after a read, in the update alone (no read before it).

    :func:`~cohortsync.storage._rules.completion_changes` reads the stored
    row through two conditions only (generation and revision still the
    lease's; ``next_due`` still its slot) and ``last_slot``, which it moves
    forward, never back. The SQL evaluates those; what each of the three
    outcomes writes is what ``completion_changes`` answers for that outcome,
    so the rule's decisions stay written once, in Python. The storage
    contract and tests/test_storage_rules.py check the SQL against the rule.
    """
    params: dict[str, Any] = {
        "c_generation": lease.generation,
        "c_revision": lease.revision,
        "c_slot": instants.encode(lease.slot),
        "c_last_slot": instants.encode(completion.run.slot),
    }
    assignments = [
        CLEAR_LEASE,
        "revision = revision + 1",
        # NULL compares as unknown: a first run's slot is written.
        (
            "last_slot = CASE WHEN last_slot >= %(c_last_slot)s THEN last_slot"
            " ELSE %(c_last_slot)s END"
        ),
    ]
    for column, values in _completion_outcomes(lease, completion, instants).items():
        assignments.append(_decided(column, values, params))
    return ", ".join(assignments), params


_ADVANCE = "generation = %(c_generation)s AND revision = %(c_revision)s AND next_due = %(c_slot)s"
_UNCHANGED = "generation = %(c_generation)s AND revision = %(c_revision)s"


def _completion_outcomes(
    lease: Lease, completion: Completion, instants: Instants
) -> dict[str, list[Any]]:
    """
    Each column the completion rule may write, with its value in each outcome
    (the schedule advances; the sync is unchanged but its schedule moved; the
    sync changed), :data:`_KEEP` where that outcome leaves it.
    """
    same = {"generation": lease.generation, "revision": lease.revision}
    outcomes = (
        completion_changes(lease, completion, **same, next_due=lease.slot, last_slot=None),
        completion_changes(lease, completion, **same, next_due=None, last_slot=None),
        completion_changes(
            lease,
            completion,
            generation=lease.generation,
            revision=lease.revision + 1,
            next_due=lease.slot,
            last_slot=None,
        ),
    )
    columns: dict[str, list[Any]] = {}
    for i, changes in enumerate(outcomes):
        written = dict(changes)
        # Written in every outcome, by completion_assignments itself.
        if "lease" not in written or written.pop("lease") is not None:
            raise AssertionError("the completion rule always releases the lease")
        if written.pop("last_slot", None) != completion.run.slot:
            raise AssertionError("the completion rule moves last_slot to the run's slot")
        # Bumped in every outcome from the stored value: also written by
        # completion_assignments itself.
        written.pop("revision")
        row: dict[str, Any] = {}
        for field, value in written.items():
            _put(row, field, value, instants)
        for column, value in row.items():
            columns.setdefault(column, [_KEEP, _KEEP, _KEEP])[i] = value
    return columns


def _decided(column: str, values: list[Any], params: dict[str, Any]) -> str:
    """
    The assignment of *column* to its value in the outcome the row is in.
    """

    def value(i: int) -> str:
        if values[i] is _KEEP:
            return column
        params[f"c_{column}_{i}"] = values[i]
        return f"%(c_{column}_{i})s"

    if values[0] == values[1] == values[2]:
        return f"{column} = {value(0)}"
    if values[1] == values[2]:
        return f"{column} = CASE WHEN {_ADVANCE} THEN {value(0)} ELSE {value(1)} END"
    return (
        f"{column} = CASE WHEN {_ADVANCE} THEN {value(0)}"
        f" WHEN {_UNCHANGED} THEN {value(1)} ELSE {value(2)} END"
    )


def decode_sync(row: Sequence[Any], instants: Instants) -> SyncRecord:
    """
    The record in a row of :data:`SYNC_COLUMNS`.

    Raises:
        CorruptStoreError: The row cannot be read, or its indexed columns
            (status, generation, slot offset) disagree with its definition: a
            sync would show as due and never run, or run off a stale schedule.
    """
    (
        sync_id,
        definition,
        generation,
        status,
        next_due,
        next_trigger,
        offset,
        bucket,
        anchor,
        attempts,
        full_resync,
        feed_cursor,
        last_full_sync_at,
        last_slot,
        scheduled_from,
        revision,
        lease_owner,
        lease_token,
        lease_expires,
        lease_slot,
        lease_generation,
        lease_trigger,
        lease_revision,
    ) = row
    try:
        sync: Sync = load_sync(definition)
        lease = None
        if lease_token is not None:
            lease = decode_lease(
                (
                    sync_id,
                    lease_generation,
                    lease_slot,
                    lease_trigger,
                    lease_token,
                    lease_revision or 0,
                ),
                lease_owner,
                instants.decode(lease_expires),
                instants,
            )
        record = SyncRecord(
            sync=sync,
            next_due=instants.decode_optional(next_due),
            next_trigger=Trigger(next_trigger),
            offset=offset,
            slot_bucket=bucket,
            anchor=instants.decode(anchor),
            attempts=attempts,
            full_resync=bool(full_resync),
            feed_cursor=feed_cursor,
            last_full_sync_at=instants.decode_optional(last_full_sync_at),
            lease=lease,
            last_slot=instants.decode_optional(last_slot),
            scheduled_from=instants.decode_optional(scheduled_from),
            revision=revision,
        )
    except Exception as exc:
        raise CorruptStoreError(
            f"the stored row of sync {sync_id!r} cannot be read "
            f"({type(exc).__name__}: {exc}); fix or delete it"
        ) from exc
    if record.id != sync_id:
        raise CorruptStoreError(
            f"the stored row of sync {sync_id!r} holds the definition of {record.id!r}"
        )
    if (status, generation) != (sync.status.value, sync.generation):
        raise CorruptStoreError(
            f"sync {sync_id!r}: status/generation columns {status!r}/{generation!r} disagree "
            f"with its definition ({sync.status.value!r}/{sync.generation})"
        )
    period = _schedule.spread_period(sync.policy) or _schedule.period_seconds(sync.policy.cadence)
    if period is not None and not 0 <= record.offset < period:
        raise CorruptStoreError(
            f"sync {sync_id!r}: slot offset {record.offset} is outside its {period}-second period"
        )
    return record


def decode_lease(row: Sequence[Any], owner: str, expires_at: datetime, instants: Instants) -> Lease:
    """
    The lease in a row of (id, generation, slot, trigger, token, revision):
    a claim's returned row, or the lease columns of a sync row.

    Raises:
        CorruptStoreError: A damaged schedule column; the claim takes the sync
            off the schedule rather than lease it to nobody.
    """
    sync_id, generation, slot, trigger, token, revision = row
    # Generations start at 1; a damaged one must not be leased as if valid.
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise CorruptStoreError(
            f"sync {sync_id!r} has a damaged schedule row: generation {generation!r}"
        )
    try:
        return Lease(
            sync_id=sync_id,
            generation=generation,
            slot=instants.decode(slot),
            trigger=Trigger(trigger),
            owner=owner,
            token=token,
            expires_at=expires_at,
            revision=revision,
        )
    except (CorruptStoreError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"sync {sync_id!r} has a damaged schedule row: {exc}") from exc


def decode_claims(
    rows: Iterable[Sequence[Any]],
    owner: str,
    expires_at: datetime,
    instants: Instants,
    unschedule: Callable[[str], object],
) -> list[Lease]:
    """
    The leases in a claim's returned rows (see :func:`decode_lease`), earliest
    slot first. Call it inside the claim's transaction where there is one.

    A damaged row is taken off the schedule with *unschedule* (its id; run
    :data:`UNSCHEDULE`) and reported, instead of being leased to nobody or
    blocking every healthy sync behind it.
    """
    leases = [
        lease
        for row in rows
        if (lease := _claimed(row, owner, expires_at, instants, unschedule)) is not None
    ]
    leases.sort(key=lambda lease: (lease.slot, lease.sync_id))
    return leases


def _claimed(
    row: Sequence[Any],
    owner: str,
    expires_at: datetime,
    instants: Instants,
    unschedule: Callable[[str], object],
) -> Lease | None:
    """
    The lease of one claimed row (see :func:`decode_lease`), or ``None`` for a
    damaged one, which is taken off the schedule with *unschedule* (its id).
    """
    try:
        return decode_lease(row, owner, expires_at, instants)
    except CorruptStoreError as exc:
        log.error("unscheduling sync %r: %s", row[0], exc)  # noqa: TRY400 - typed, no trace needed
        unschedule(row[0])
        return None


def decode_claim_runs(
    rows: Iterable[Sequence[Any]],
    owner: str,
    expires_at: datetime,
    instants: Instants,
    unschedule: Callable[[str], object],
) -> list[Claim]:
    """
    The claims in rows of :data:`CLAIM_RUN_COLUMNS`, earliest slot first.

    A row whose schedule columns are damaged is taken off the schedule (as in
    :func:`decode_claims`); a row whose definition cannot be decoded is
    claimed with ``record=None``, so its run reports the damage on its own.
    """
    width = _SYNC_WIDTH
    claims = []
    for row in rows:
        sync_row = row[:width]
        (
            sync_id,
            *_,
            lease_token,
            _expires,
            lease_slot,
            lease_generation,
            lease_trigger,
            lease_revision,
        ) = sync_row
        delivered, version, pending, ledger, progress = row[width:]
        lease = _claimed(
            (sync_id, lease_generation, lease_slot, lease_trigger, lease_token, lease_revision),
            owner,
            expires_at,
            instants,
            unschedule,
        )
        if lease is None:
            continue
        record: SyncRecord | None
        try:
            record = decode_sync(sync_row, instants)
        except CorruptStoreError:
            record = None
        claims.append(
            Claim(
                lease=lease,
                record=record,
                delivered=delivered,
                version=version,
                pending=bool(pending),
                ledger=bool(ledger),
                progress=bool(progress),
            )
        )
    claims.sort(key=lambda claim: (claim.lease.slot, claim.lease.sync_id))
    return claims


# -- runs, ledger, progress -------------------------------------------------------


def run_params(run: SyncRun, instants: Instants) -> dict[str, Any]:
    """
    A run's row: the indexed columns and the whole record as JSON (``record``).
    """
    return {
        "id": run.id,
        "sync_id": run.sync_id,
        "generation": run.generation,
        "trigger": run.trigger.value,
        "status": run.status.value,
        "slot": instants.encode(run.slot),
        "started_at": instants.encode(run.started_at),
        "finished_at": instants.encode(run.finished_at),
        "record": dump_run(run),
    }


def limit_history(runs: list[SyncRun], limit: int | None) -> list[SyncRun]:
    """
    :meth:`~cohortsync.storage.HistoryStore.history`'s *limit* as the reference
    store applies it, a list slice: a negative limit leaves out the oldest runs.
    A store reads every run for one, and at most *limit* otherwise.
    """
    return runs if limit is None else runs[:limit]


def decode_run(run_id: str, record: str) -> SyncRun:
    """
    Raises:
        CorruptStoreError: The stored run cannot be read.
    """
    try:
        return loads(record, SyncRun)
    except Exception as exc:
        raise CorruptStoreError(
            f"the stored run {run_id!r} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


def decode_ledger(
    sync_id: str, rows: Iterable[Sequence[Any]], instants: Instants
) -> list[LedgerEntry]:
    """
    Ledger entries from rows of :data:`SELECT_LEDGER`.

    Raises:
        CorruptStoreError: A row cannot be read.
    """
    try:
        return [
            LedgerEntry(
                sync_id=sync_id,
                key=key,
                reason=reason,
                attempts=attempts,
                dead=bool(dead),
                first_seen=instants.decode(first_seen),
                last_seen=instants.decode(last_seen),
            )
            for key, reason, attempts, dead, first_seen, last_seen in rows
        ]
    except (TypeError, ValueError) as exc:
        raise CorruptStoreError(f"a ledger row of sync {sync_id!r}: {exc}") from exc


def progress_params(
    sync_id: str, slot: datetime, tally: Tally, instants: Instants
) -> dict[str, Any]:
    """
    The parameters of :data:`ADD_PROGRESS`.
    """
    return {
        "sync_id": sync_id,
        "slot": instants.encode(slot),
        **attrs.asdict(tally),
    }


def decode_progress(sync_id: str, row: Sequence[Any] | None, instants: Instants) -> Progress | None:
    """
    The progress in a row of :data:`SELECT_PROGRESS`, if any.

    Raises:
        CorruptStoreError: The row cannot be read.
    """
    if row is None:
        return None
    slot, added, removed, rejected, batches, collisions = row
    try:
        return Progress(
            slot=instants.decode(slot),
            tally=Tally(
                added=added,
                removed=removed,
                rejected=rejected,
                batches=batches,
                collisions=collisions,
            ),
        )
    except (TypeError, ValueError) as exc:
        raise CorruptStoreError(f"the progress row of sync {sync_id!r}: {exc}") from exc


# -- delivered identifiers and pending batches -----------------------------------


def identifier_columns(member: Member) -> tuple[str | None, str | None]:
    """
    ``(id_kind, id_value)`` of a delivered member: both ``NULL`` for the
    identity mapping, which keeps the common row small.
    """
    if is_identity(member):
        return None, None
    return member.identifier.kind.value, member.identifier.value


def decode_identifier(sync_id: str, key: str, kind: str | None, value: str | None) -> Identifier:
    """
    The identifier a delivered member was sent with, from its columns.

    Raises:
        CorruptStoreError: The columns hold no identifier cohortsync writes.
    """
    if kind is None:
        return Identifier(IdentifierKind.USER_ID, key)
    try:
        return Identifier(IdentifierKind(kind), value or "")  # "" is refused: corrupt
    except (ValueError, TypeError) as exc:
        raise CorruptStoreError(
            f"the delivered identifier of member {key!r} of sync {sync_id!r} cannot be read ({exc})"
        ) from exc


def encode_members(members: Iterable[Member]) -> str:
    """
    Members as compact JSON: ``[key]`` for the identity mapping (the common
    case), ``[key, kind, value]`` otherwise.
    """
    members = members if isinstance(members, (list, tuple)) else list(members)
    keys = identity_keys(members)
    if keys is not None:
        # What json.dumps writes for [[key], ...], at C speed: a first sync
        # records a million members in flight this way.
        if not keys:
            return "[]"
        return "[[" + "],[".join(map(_json_string, keys)) + "]]"
    return json.dumps(
        [
            [m.key] if is_identity(m) else [m.key, m.identifier.kind.value, m.identifier.value]
            for m in members
        ],
        separators=(",", ":"),
    )


def decode_pending(sync_id: str, rows: Iterable[Sequence[Any]]) -> list[PendingBatch]:
    """
    Rebuild pending batches from rows of (key, run id, operation, members JSON).

    Raises:
        CorruptStoreError: A row cannot be read back.
    """
    key = None
    try:
        out = []
        for key, run_id, operation, members in rows:
            parsed = [
                Member(m[0], Identifier(IdentifierKind.USER_ID, m[0]))
                if len(m) == 1
                else Member(m[0], Identifier(IdentifierKind(m[1]), m[2]))
                for m in json.loads(members)
            ]
            out.append(
                PendingBatch(
                    run_id=run_id,
                    idempotency_key=key,
                    operation=Operation(operation),
                    members=tuple(parsed),
                )
            )
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise CorruptStoreError(f"pending batch {key!r} of sync {sync_id!r}: {exc}") from exc
    return out


# -- schema ownership, version and migrations -------------------------------------


def schema_version(
    tables: Collection[str],
    read_meta: Callable[[], Mapping[str, str] | None],
    supported: int,
    *,
    foreign: str,
    where: str,
) -> int:
    """
    The version of a schema (an SQLite file, a PostgreSQL schema) from its
    *tables* and its ``meta`` rows: 0 when it has no tables.

    cohortsync only ever writes to an empty schema or one it created, so that
    it never modifies someone else's data: a schema with tables but without
    cohortsync's ``meta`` rows is refused before anything is written.

    Args:
        tables: The names of the schema's tables.
        read_meta: Reads :data:`READ_META` as a mapping, or ``None`` when the
            ``meta`` table cannot be read that way (someone else's).
        supported: The newest version this release understands.
        foreign: The message for a schema that is not cohortsync's.
        where: Names the schema in other messages.

    Raises:
        CorruptStoreError: The schema is someone else's, or its version unreadable.
        SchemaVersionError: The version is newer than *supported*.
    """
    if not tables:
        return 0
    meta = read_meta() if "meta" in tables else None
    if meta is None or meta.get("application") != APPLICATION:
        raise CorruptStoreError(foreign)
    try:
        version = int(meta["schema_version"])
    except (KeyError, TypeError, ValueError):
        raise CorruptStoreError(
            f"{where}: schema_version is missing or invalid ({meta.get('schema_version')!r})"
        ) from None
    if version > supported:
        raise SchemaVersionError(version, supported)
    return version


def migrate(
    execute: Callable[[str, Sequence[object]], object],
    migrations: Sequence[Sequence[str]],
    found: int,
) -> None:
    """
    Apply *migrations* ``found + 1`` to the last, statement by statement, then
    record the schema as cohortsync's at that version. The version is the
    number of migrations: a released one is never edited, only appended to.

    Run it inside one transaction that holds the schema's lock, after reading
    *found* under that lock (another process may have migrated meanwhile), so
    a failed step leaves nothing half-done.

    Args:
        execute: Runs a statement (``{s}`` is the schema) with parameters.
        migrations: The store's steps, each a sequence of statements.
        found: The version read under the lock.
    """
    for step in migrations[found:]:
        for statement in step:
            execute(statement, ())
    execute(_SET_VERSION, (APPLICATION, str(len(migrations))))
