"""
A sync (one cohort to one destination under one policy) and its run history records.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime

import attrs

from cohortsync import _validators as v
from cohortsync._policy import Cadence, SyncPolicy

__all__ = ["RunStatus", "Sync", "SyncRun", "SyncStatus", "Trigger"]


class SyncStatus(enum.Enum):
    """
    Where a sync stands. Only ``active`` syncs are scheduled.
    """

    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    DELETED = "deleted"


class Trigger(enum.Enum):
    """
    Why a run happened.
    """

    SCHEDULED = "scheduled"
    REALTIME = "realtime"
    ONE_TIME = "one_time"
    MANUAL = "manual"
    CATCH_UP = "catch_up"
    TEARDOWN = "teardown"
    """Removing what a deleted sync delivered (``OnDelete.REMOVE_DELIVERED``)."""


class RunStatus(enum.Enum):
    """
    How a run ended. ``partial`` means some members were rejected or some
    batches failed: it is never reported as ``succeeded``.
    """

    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    SKIPPED = "skipped"
    GUARDED = "guarded"


def _to_status(value: object) -> SyncStatus:
    return v.to_enum(SyncStatus, "status")(value)


def _to_optional_cadence(value: object) -> Cadence | None:
    return None if value is None else v.to_enum(Cadence, "effective_cadence")(value)


def _to_cadence(value: object) -> Cadence:
    return v.to_enum(Cadence, "cadence")(value)


def _to_trigger(value: object) -> Trigger:
    return v.to_enum(Trigger, "trigger")(value)


def _to_run_status(value: object) -> RunStatus:
    return v.to_enum(RunStatus, "status")(value)


def _to_notes(value: Iterable[str]) -> tuple[str, ...]:
    # Not a generic converter: mypy's attrs plugin cannot bind its type variable.
    # Notes may quote remote text: made storable like every other stored string.
    return v.to_storable_tuple(value)


@attrs.frozen(kw_only=True)
class Sync:
    """
    One cohort synced to one destination under one policy.

    Args:
        id: The sync's id.
        cohort_id: The registered cohort it reads.
        destination_id: The registered destination it delivers to.
        policy: Cadence and behaviour.
        mapping_id: The registered identifier mapping, or ``None`` for the
            identity mapping (the member key is a ``user_id``).
        generation: Bumped on every update; batches and idempotency keys carry it.
        status: Where the sync stands.
        status_reason: Why it is paused or failed, for people.
        effective_cadence: The cadence it runs at now: differs from the policy's
            when a real-time sync fell back to hourly after becoming ineligible.
        created_at: When it was created.
        updated_at: When its definition or status last changed.
        guard_released: The host confirmed removals the mass-removal guard
            held back; the next run sends them, then this resets.
    """

    id: str = attrs.field(validator=v.identifier)
    cohort_id: str = attrs.field(validator=v.identifier)
    destination_id: str = attrs.field(validator=v.identifier)
    policy: SyncPolicy = attrs.field(validator=v.instance_of(SyncPolicy))
    mapping_id: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(v.identifier)
    )
    generation: int = attrs.field(default=1, validator=v.count(1))
    status: SyncStatus = attrs.field(default=SyncStatus.ACTIVE, converter=_to_status)
    status_reason: str | None = attrs.field(default=None, converter=v.to_optional_storable)
    effective_cadence: Cadence | None = attrs.field(
        default=None,
        converter=_to_optional_cadence,
    )
    created_at: datetime = attrs.field(converter=v.utc_if_aware, validator=v.aware_instant)
    updated_at: datetime = attrs.field(converter=v.utc_if_aware, validator=v.aware_instant)
    guard_released: bool = False
    """The host confirmed held-back removals: the next run sends them despite the guard."""

    @property
    def cadence(self) -> Cadence:
        """
        The cadence the sync runs at now.
        """
        return self.effective_cadence or self.policy.cadence


@attrs.frozen(kw_only=True)
class SyncRun:
    """
    One run in a sync's history.

    Counts: ``added``/``removed`` are identifiers the destination acknowledged;
    ``skipped`` are members that could not be sent (an invalid key, or no
    identifier the destination accepts); ``rejected`` are identifiers the
    destination refused (see the ledger); ``collisions`` are members that
    shared an identifier with another member.
    """

    id: str
    sync_id: str
    generation: int
    trigger: Trigger = attrs.field(converter=_to_trigger)
    slot: datetime = attrs.field(converter=v.utc_if_aware, validator=v.aware_instant)
    started_at: datetime = attrs.field(converter=v.utc_if_aware, validator=v.aware_instant)
    finished_at: datetime = attrs.field(converter=v.utc_if_aware, validator=v.aware_instant)
    status: RunStatus = attrs.field(converter=_to_run_status)
    cadence: Cadence = attrs.field(converter=_to_cadence)
    added: int = attrs.field(default=0, validator=v.count(0))
    removed: int = attrs.field(default=0, validator=v.count(0))
    skipped: int = attrs.field(default=0, validator=v.count(0))
    rejected: int = attrs.field(default=0, validator=v.count(0))
    batches: int = attrs.field(default=0, validator=v.count(0))
    retries: int = attrs.field(default=0, validator=v.count(0))
    full_sync: bool = False
    error_type: str | None = attrs.field(default=None, converter=v.to_optional_storable)
    error_message: str | None = attrs.field(default=None, converter=v.to_optional_storable)
    notes: tuple[str, ...] = attrs.field(default=(), converter=_to_notes)
    """Reason codes recorded on the run (e.g. ``realtime_size_limit``, ``below_min_audience``)."""
    collisions: int = attrs.field(default=0, validator=v.count(0))
    """Members that shared a destination identifier with another member, so
    were added or removed together with it (or kept because it stays)."""
    coalesced: int = attrs.field(default=0, validator=v.count(0))
    """Grid slots this run covered besides its own (missed while every worker
    was down, or passed while it ran): every slot is run or counted here."""

    @property
    def updated(self) -> int:
        """
        Members changed at the destination by this run.
        """
        return self.added + self.removed

    @property
    def duration(self) -> float:
        """
        Seconds from start to finish on the scheduler's clock: what one run of
        this sync costs, for sizing leases and workers.
        """
        return (self.finished_at - self.started_at).total_seconds()
