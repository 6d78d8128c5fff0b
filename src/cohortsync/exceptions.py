"""
Every error cohortsync raises, rooted at :class:`CohortSyncError`.

Each leaf also subclasses the builtin that fits, so ``except ValueError``
in host code keeps working, and carries structured attributes so callers
never parse messages::

    CohortSyncError
    ├── ConfigurationError (ValueError)       bad value given to the public API
    │   └── CronExpressionError               .expression, .cron_field, .field_text
    ├── NotFoundError (LookupError)
    │   ├── SyncNotFoundError                 .sync_id
    │   ├── CohortNotFoundError               .cohort_id
    │   └── DestinationNotFoundError          .destination_id
    ├── IneligibleSyncError (ValueError)      .reasons
    ├── BulkSyncError (ValueError)            .failures, .created, .updated
    ├── InvalidMemberError (ValueError)       .member, .reason
    ├── SourceError (RuntimeError)            .cohort_id  (the membership source failed)
    ├── LeaseError (RuntimeError)
    │   └── LeaseLostError                    .sync_id, .owner, .token
    ├── DuplicateRunError (RuntimeError)      .sync_id, .slot
    ├── ConflictError (RuntimeError)          .sync_id, .expected, .found, .counter, .attempts
    ├── StorageError (RuntimeError)
    │   ├── StorageClosedError                .store  (used after close())
    │   ├── SchemaVersionError                .found, .supported
    │   └── CorruptStoreError                 .detail
    └── DeliveryError (RuntimeError)          raised by Destination adapters
        ├── TransientError                    retried with backoff
        │   └── RateLimitedError              .retry_after; does not use the retry budget
        ├── PermanentError                    fails the run, state not advanced
        │   └── BadDataError                  the batch is bisected to find bad members
        └── AuthenticationError               pauses the sync
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cohortsync._bulk import BulkFailure
    from cohortsync.eligibility import Reason

__all__ = [
    "AuthenticationError",
    "BadDataError",
    "BulkSyncError",
    "CohortNotFoundError",
    "CohortSyncError",
    "ConfigurationError",
    "ConflictError",
    "CorruptStoreError",
    "CronExpressionError",
    "DeliveryError",
    "DestinationNotFoundError",
    "DuplicateRunError",
    "IneligibleSyncError",
    "InvalidMemberError",
    "LeaseError",
    "LeaseLostError",
    "NotFoundError",
    "PermanentError",
    "RateLimitedError",
    "SchemaVersionError",
    "SourceError",
    "StorageClosedError",
    "StorageError",
    "SyncNotFoundError",
    "TransientError",
]


class CohortSyncError(Exception):
    """
    Root of every error raised by cohortsync.
    """


class ConfigurationError(CohortSyncError, ValueError):
    """
    A value given to the public API is invalid.

    Attributes:
        field: The name of the offending field or argument.
        value: The offending value.
    """

    def __init__(self, field: str, value: object, message: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}={value!r}: {message}")


class CronExpressionError(ConfigurationError):
    """
    A cron expression that does not parse, or never runs.

    Attributes:
        expression: The expression as given.
        cron_field: The name of the bad cron field (``"minute"``, ``"hour"``,
            ``"day-of-month"``, ``"month"``, ``"day-of-week"``), or ``None``
            when the expression as a whole is wrong (the number of fields).
        field_text: The text of that field, or ``None``.
    """

    def __init__(
        self, expression: str, cron_field: str | None, field_text: str | None, message: str
    ) -> None:
        self.expression = expression
        self.cron_field = cron_field
        self.field_text = field_text
        where = f"{cron_field} field {field_text!r}: " if cron_field is not None else ""
        super().__init__("cron", expression, where + message)


class NotFoundError(CohortSyncError, LookupError):
    """
    Something was looked up by id and does not exist.
    """


class SyncNotFoundError(NotFoundError):
    """
    No sync with this id is in the store (``sync_id`` says which): deleted
    syncs stay in the store, so this means it never existed there.
    """

    def __init__(self, sync_id: str) -> None:
        self.sync_id = sync_id
        super().__init__(f"no sync with id {sync_id!r}")


class CohortNotFoundError(NotFoundError):
    """
    No cohort is registered under this id (``cohort_id``) in this scheduler.
    The store keeps only ids, so every worker must register the same cohorts;
    a run that meets this fails and says so in its history.
    """

    def __init__(self, cohort_id: str) -> None:
        self.cohort_id = cohort_id
        super().__init__(
            f"no cohort registered with id {cohort_id!r}; call Scheduler.add_cohort() first"
        )


class DestinationNotFoundError(NotFoundError):
    """
    No destination is registered under this id (``destination_id``) in this
    scheduler, or no catalog preset has this key. Like cohorts, destinations
    must be registered by every worker under the same ids.
    """

    def __init__(self, destination_id: str) -> None:
        self.destination_id = destination_id
        super().__init__(
            f"no destination registered with id {destination_id!r}; "
            "call Scheduler.add_destination() first"
        )


class IneligibleSyncError(CohortSyncError, ValueError):
    """
    A sync was created or updated although eligibility found blocking reasons.

    Attributes:
        reasons: Every reason found, blocking and warnings alike.
    """

    def __init__(self, reasons: Sequence[Reason]) -> None:
        self.reasons = tuple(reasons)
        blocking = "; ".join(f"{r.code}: {r.message}" for r in self.reasons if r.blocking)
        super().__init__(f"sync is not eligible: {blocking}")


class BulkSyncError(CohortSyncError, ValueError):
    """
    :meth:`cohortsync.Scheduler.create_syncs` refused some specs. Every other
    spec was written: the refused ones are all listed, nothing of them stored.

    Attributes:
        failures: Every refused spec (a :class:`cohortsync.BulkFailure`: its
            index, its id and the error), in input order.
        created: Ids of the syncs created by the call.
        updated: Ids of the syncs updated by the call (upserts).
        unchanged: Ids of the existing syncs an upsert left as they were.
    """

    def __init__(
        self,
        failures: Sequence[BulkFailure],
        created: Sequence[str] = (),
        updated: Sequence[str] = (),
        unchanged: Sequence[str] = (),
    ) -> None:
        self.failures = tuple(failures)
        self.created = tuple(created)
        self.updated = tuple(updated)
        self.unchanged = tuple(unchanged)
        shown = "; ".join(f"#{f.position} ({f.sync_id}): {f.error}" for f in self.failures[:3])
        more = f"; and {len(self.failures) - 3} more" if len(self.failures) > 3 else ""
        super().__init__(
            f"{len(self.failures)} sync spec(s) refused, {len(self.created)} created, "
            f"{len(self.updated)} updated: {shown}{more}"
        )


class InvalidMemberError(CohortSyncError, ValueError):
    """
    A membership source yielded something that is not a usable member key.
    """

    def __init__(self, member: object, reason: str) -> None:
        self.member = member
        self.reason = reason
        shown = repr(member)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid member key {shown}: {reason}")


class SourceError(CohortSyncError, RuntimeError):
    """
    A cohort's membership source raised while being read; nothing was delivered
    from the partial read.
    """

    def __init__(self, cohort_id: str, message: str) -> None:
        self.cohort_id = cohort_id
        super().__init__(f"membership source of cohort {cohort_id!r} failed: {message}")


class LeaseError(CohortSyncError, RuntimeError):
    """
    Base for lease problems.
    """


class LeaseLostError(LeaseError):
    """
    The caller no longer holds the lease it tried to use (it expired and was
    claimed by someone else, or it was already released).
    """

    run_id: str | None = None
    """The run that lost it, when a run did (set by the engine as it gives up)."""

    def __init__(self, sync_id: str, owner: str, token: str) -> None:
        self.sync_id = sync_id
        self.owner = owner
        self.token = token
        super().__init__(
            f"lease on sync {sync_id!r} held by {owner!r} (token {token[:8]}...) is no longer valid"
        )


class DuplicateRunError(CohortSyncError, RuntimeError):
    """
    A run record for this (sync, scheduled slot) already exists.
    """

    def __init__(self, sync_id: str, slot: datetime) -> None:
        self.sync_id = sync_id
        self.slot = slot
        super().__init__(f"sync {sync_id!r} already has a run for slot {slot.isoformat()}")


class ConflictError(CohortSyncError, RuntimeError):
    """
    A sync changed between reading and writing it: its generation (a
    store's ``save_sync``) or its revision (``save_sync_at``, which every
    host call of :class:`cohortsync.Scheduler` writes with) moved.

    A :class:`~cohortsync.Scheduler` call reads the sync again and re-applies
    its change when that happens; it raises this only when another writer
    won every one of its attempts.

    Attributes:
        sync_id: The sync.
        expected: The generation or revision the writer read.
        found: The one stored.
        counter: ``"generation"`` or ``"revision"``: what the write compared.
        attempts: Reads and writes tried before giving up (1 for a store's
            own refusal).
    """

    def __init__(
        self,
        sync_id: str,
        expected: int,
        found: int,
        *,
        counter: Literal["generation", "revision"] = "generation",
        attempts: int = 1,
    ) -> None:
        self.sync_id = sync_id
        self.expected = expected
        self.found = found
        self.counter = counter
        self.attempts = attempts
        if attempts > 1:
            message = (
                f"sync {sync_id!r} was changed by another writer during each of {attempts} "
                f"attempts to write it (last: {counter} {found}, not {expected}); "
                "nothing was written: try again"
            )
        else:
            message = (
                f"sync {sync_id!r} is at {counter} {found}, not {expected}: "
                "it was changed concurrently; read it again"
            )
        super().__init__(message)


class StorageError(CohortSyncError, RuntimeError):
    """
    The store failed or holds something cohortsync cannot use.
    """


class StorageClosedError(StorageError):
    """
    A store was used after it was closed (by its own ``close()``, by
    :meth:`cohortsync.Scheduler.close` or at the end of a ``with`` block).
    A closed store never reopens behind the caller's back: a run that
    carried on would hold leases nobody could complete. A call that was
    running when the store closed raises it too; its write may or may not
    have been committed.

    Attributes:
        store: The closed store as its ``repr`` shows it (never a password).
    """

    def __init__(self, store: str) -> None:
        self.store = store
        super().__init__(
            f"{store} is closed: open a new store (and a new Scheduler on it) to carry on; "
            "Scheduler.close() and the end of a `with Scheduler(...)` block close its store"
        )


class SchemaVersionError(StorageError):
    """
    The store was written by a newer cohortsync (schema ``found``, this
    version reads up to ``supported``). Refused rather than read: an older
    version could misread or damage what it does not know.
    """

    def __init__(self, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            f"store schema version {found} is newer than this cohortsync supports "
            f"({supported}); upgrade cohortsync instead of downgrading the store"
        )


class CorruptStoreError(StorageError):
    """
    The store holds something cohortsync cannot decode, or is not a
    cohortsync store at all (``detail`` says what). A damaged sync row fails
    that sync's run alone; the other syncs keep running.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"the store is corrupt or not a cohortsync store: {detail}")


class DeliveryError(CohortSyncError, RuntimeError):
    """
    Raised by :class:`cohortsync.Destination` adapters to say how a call failed,
    so the engine never has to guess from a message.
    """


class TransientError(DeliveryError):
    """
    Try again later (timeouts, 5xx). Retried with exponential backoff and jitter.

    Attributes:
        retry_after: Seconds the destination asked to wait, if it said.
    """

    def __init__(
        self, message: str = "transient failure", *, retry_after: float | None = None
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class RateLimitedError(TransientError):
    """
    The destination said "too many requests". Waiting for it does not use up the
    retry budget.
    """

    def __init__(self, message: str = "rate limited", *, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)


class PermanentError(DeliveryError):
    """
    Retrying will not help: the run fails and the delivered state does not advance.
    """


class BadDataError(PermanentError):
    """
    An all-or-nothing batch was refused because of some of its members; the engine
    bisects the batch to isolate them.
    """


class AuthenticationError(DeliveryError):
    """
    Credentials were refused. The sync is paused until the host fixes and resumes it.
    """
