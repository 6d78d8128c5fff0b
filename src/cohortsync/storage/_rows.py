"""
Row encodings shared by the SQL stores, so SQLite and PostgreSQL read and
write pending batches the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from cohortsync._destination import Identifier, IdentifierKind, Member, Operation
from cohortsync.exceptions import CorruptStoreError
from cohortsync.storage._protocol import PendingBatch

__all__ = ["decode_pending", "encode_members"]


def encode_members(members: Iterable[Member]) -> str:
    """
    Members as compact JSON: ``[key]`` for the identity mapping (the common
    case), ``[key, kind, value]`` otherwise.
    """
    return json.dumps(
        [
            [m.key]
            if m.identifier.kind is IdentifierKind.USER_ID and m.identifier.value == m.key
            else [m.key, m.identifier.kind.value, m.identifier.value]
            for m in members
        ],
        separators=(",", ":"),
    )


def decode_pending(sync_id: str, rows: Sequence[tuple[Any, ...]]) -> list[PendingBatch]:
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
