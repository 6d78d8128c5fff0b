"""
The :class:`Scheduler`: the object a host builds in every worker process.
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import logging
import os
import random
import secrets
import socket
import threading
from collections.abc import Callable, Container, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from itertools import islice
from pathlib import PurePath
from types import TracebackType
from typing import Any, Literal, TypeVar, cast, get_args, overload

import attrs
from typing_extensions import Self

from cohortsync import _schedule
from cohortsync._aio import LoopThread, RunCancelled
from cohortsync._bulk import (
    ApplyResult,
    BulkFailure,
    BulkResult,
    SlotAllocator,
    SyncSpec,
    chunks,
    is_gone,
    prunable,
)
from cohortsync._cache import DeliveredCache
from cohortsync._clock import Clock, SystemClock, UtcClock, add_saturating, require_aware
from cohortsync._cohort import Cohort, has_change_feed
from cohortsync._converter import unstructure
from cohortsync._delivery import PROCESS_RATE_LIMITS, RateLimiter, RateLimits
from cohortsync._destination import (
    AnyDestination,
    AsyncDestination,
    Capabilities,
    Destination,
    check_destination_kind,
)
from cohortsync._diff import diff_changes, diff_snapshot, head, with_keys
from cohortsync._events import E1, E2, E3, Event, Listener, check_listener, subscribe
from cohortsync._keep import KEEP, Keep
from cohortsync._logs import log_failure
from cohortsync._plan import (
    ReadFacts,
    in_flight_members,
    plan_guard,
    plan_isolation,
    plan_read,
    plan_recheck,
    plan_recovery,
)
from cohortsync._policy import Cadence, FirstRun, OnDelete, SyncPolicy
from cohortsync._run import Completing, RunEnvironment, prepare
from cohortsync._sync import Sync, SyncRun, SyncStatus, Trigger
from cohortsync._validators import check_bool, check_count, check_id, check_number
from cohortsync.advice import Recommendation, recommend
from cohortsync.eligibility import DEFAULT_RULES, Eligibility, Ruleset, check_eligibility
from cohortsync.exceptions import (
    BulkSyncError,
    CohortNotFoundError,
    CohortSyncError,
    ConfigurationError,
    ConflictError,
    CorruptStoreError,
    DestinationNotFoundError,
    IneligibleSyncError,
    LeaseLostError,
    SourceError,
    StorageError,
    SyncNotFoundError,
)
from cohortsync.identifiers import IdentifierMapping
from cohortsync.storage._base import (
    derive_claim_runs,
    derive_complete_runs,
    derive_create_syncs,
    derive_save_sync_at,
    iter_due,
    iter_sync_records,
)
from cohortsync.storage._memory import MemoryStorage
from cohortsync.storage._protocol import (
    SLOT_BUCKET_SECONDS,
    Claim,
    Completion,
    Lease,
    LedgerEntry,
    SlotCounts,
    Storage,
    SyncRecord,
)

__all__ = ["Preview", "Scheduler", "Upcoming"]

D = TypeVar("D", bound="Destination | AsyncDestination")

log = logging.getLogger("cohortsync.scheduler")


_SlotAllocation = Literal["balanced", "hash"]

MAX_UPCOMING_PER_SYNC = 10_000


@attrs.frozen
class Upcoming:
    """
    One future run, from :meth:`Scheduler.upcoming`.
    """

    at: datetime
    sync_id: str
    trigger: Trigger


@attrs.frozen(kw_only=True)
class Preview:
    """
    What a run would do now, from :meth:`Scheduler.preview` (nothing is sent).

    Sample lists hold at most ``sample_size`` member keys: previews are for
    people, and member keys are personal data.
    """

    sync_id: str
    size: int | None
    """Members the cohort has now (``None`` when read from a change feed)."""
    delivered: int
    """Members the destination holds as far as cohortsync knows."""
    adds: int
    """Members a run would add (members left in flight by a crashed run included)."""
    removes: int
    """Members a run would remove, before the guard and the policy's removal setting."""
    invalid: int
    """Keys the source yielded that a run would skip as invalid."""
    guarded: bool
    """The mass-removal guard would hold the removals."""
    full_sync: bool
    """A run would be a full send (a full-resync request or a TTL refresh), as its
    ``SyncRun.full_sync`` records; a full-sync-only destination gets the whole
    audience every run without that flag (see ``resent``)."""
    eligibility: Eligibility
    """Eligibility at the measured size, for the policy's cadence."""
    sample_adds: tuple[str, ...] = attrs.field(repr=False)
    sample_removes: tuple[str, ...] = attrs.field(repr=False)
    resent: int = 0
    """Staying members a full send would send again."""
    from_feed: bool = False
    """A run would read the change feed rather than the full snapshot."""
    proceed: bool = True
    """A run would deliver (False: it would be skipped and the sync paused)."""
    notes: tuple[str, ...] = ()
    """The notes a run would record for its decisions (as in its history)."""


def _upcoming(due: Iterator[SyncRecord], until: datetime, now: datetime) -> Iterator[Upcoming]:
    """
    The runs of the syncs *due* (active, due by *until*, in ``(next_due, id)``
    order), merged in ``(at, sync id)`` order. A run is handed out only once
    every sync due at or before it has been read: each sync's first run is its
    ``next_due`` and its later runs come after it, so no sync read later can
    have an earlier one. The heap holds one entry per sync read.

    A sync is listed from its first read only: one that a worker runs while
    the stream is read moves to a later ``next_due`` and comes up again
    further on in the store's order, and listing it then too would show its
    runs twice. So the stream keeps the ids it has read.

    An overdue sync (``next_due`` before *now*) is listed once at its due
    time, as the catch-up it will be if it missed a whole period, and then
    from the first slot after *now*: the slots it missed are coalesced into
    that one run, never listed.
    """
    # (at, sync id, runs listed so far, trigger, (sync, anchor, offset)): one
    # entry per sync read, holding only what its later slots need.
    heap: list[tuple[datetime, str, int, Trigger, tuple[Sync, datetime, int]]] = []
    read: set[str] = set()
    last: tuple[datetime, str] | None = None  # (next_due, id) of the last sync read
    pending = True  # syncs are left to read
    while True:
        while pending and (not heap or last is None or heap[0][:2] > last):
            record = next(due, None)
            if record is None:
                pending = False
                break
            assert record.next_due is not None  # noqa: S101 - iter_due's promise
            last = (record.next_due, record.id)
            if record.id in read:
                continue
            read.add(record.id)
            slots = (record.sync, record.anchor, record.offset)
            heapq.heappush(heap, (record.next_due, record.id, 0, record.next_trigger, slots))
        if not heap:
            return
        at, sync_id, count, trigger, slots = heapq.heappop(heap)
        sync, anchor, offset = slots
        recurring = sync.policy.cadence is not Cadence.ONE_TIME and trigger is not Trigger.TEARDOWN
        if recurring:
            # The trigger the run will record. A slot already passed starts
            # now, and its missed slots coalesce into it.
            following = None
            if at < now and _schedule.uneven_grid(sync):
                following = _schedule.next_slot_after(sync, anchor, offset, at)
            trigger = _schedule.effective_trigger(
                trigger, sync.cadence, at, max(at, now), next_slot=following
            )
        yield Upcoming(at, sync_id, trigger)
        count += 1
        if count >= MAX_UPCOMING_PER_SYNC or not recurring:
            continue
        later = _schedule.next_slot_after(sync, anchor, offset, max(at, now))
        if later is not None and later <= until:
            heapq.heappush(heap, (later, sync_id, count, Trigger.SCHEDULED, slots))


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _sqlite(path: str | os.PathLike[str]) -> Storage:
    from cohortsync.storage._sqlite import SQLiteStorage  # noqa: PLC0415 - only when a path is given

    return SQLiteStorage(path)


def _to_storage(value: object) -> Storage:
    if value is None:
        # No file appears behind the host's back (an SQLite file in whatever
        # the working directory happens to be). Memory is right for trying it
        # out and for tests, wrong in production, where syncs and delivered
        # state must outlive the process and be shared by every worker: say so
        # where operators look. Passing MemoryStorage() says it on purpose.
        log.warning(
            "Scheduler: no storage given, so syncs, delivered state and history "
            "live in this process's memory only and are lost when it ends; pass "
            "SQLiteStorage(path) or PostgresStorage(dsn) to keep them, or "
            "MemoryStorage() to say memory is what you want"
        )
        return MemoryStorage()
    if isinstance(value, (str, PurePath)):
        # A path is the embedded default's file: an easy mistake to make
        # (Scheduler("cohortsync.db")), so accept it rather than fail later.
        return _sqlite(value)
    if isinstance(value, type):
        # The class passes the protocol check (it has the methods, unbound):
        # Scheduler(MemoryStorage) would only fail at its first call.
        raise ConfigurationError(
            "storage",
            value.__name__,
            f"is a class; pass an instance: {value.__name__}(...)",
        )
    if isinstance(value, Storage):
        return value
    raise ConfigurationError(
        "storage",
        type(value).__name__,
        "must be a cohortsync.storage.Storage (MemoryStorage(), SQLiteStorage(path), "
        "PostgresStorage(dsn)) or the path of an SQLite file",
    )


def _to_clock(value: object) -> Clock:
    if value is None:
        return SystemClock()
    if isinstance(value, type):
        raise ConfigurationError(
            "clock", value.__name__, f"is a class; pass an instance: {value.__name__}(...)"
        )
    if not callable(getattr(value, "now", None)) or not callable(getattr(value, "sleep", None)):
        raise ConfigurationError(
            "clock",
            type(value).__name__,
            "must be a cohortsync.Clock: an object with now() returning an aware UTC "
            "datetime and sleep(seconds)",
        )
    return value  # type: ignore[return-value]


@attrs.define
class _BulkCall:
    """What one :meth:`Scheduler.create_syncs` call has done so far."""

    created: list[str] = attrs.Factory(list)
    updated: list[str] = attrs.Factory(list)
    unchanged: list[str] = attrs.Factory(list)
    failures: list[BulkFailure] = attrs.Factory(list)
    first_seen: dict[str, int] = attrs.Factory(dict)
    """The index of each explicit id, to refuse a second spec naming it."""
    declaring: bool = False
    """:meth:`Scheduler.apply_syncs`: every spec names its id, and an update
    leaves a paused sync paused."""
    prefix: str | None = None
    """:meth:`Scheduler.apply_syncs`: the prefix every declared id starts with."""
    dry_run: bool = False
    """Read and decide, write nothing."""


class Scheduler:
    """
    Registers syncs, decides when they run, runs them and records history.

    Every worker process builds the same scheduler: same storage, and the
    same cohorts, destinations and identifier mappings registered under the
    same ids. The store holds only ids and state, so any worker can run any
    sync. Nothing runs in the background: call :meth:`run_due` from your own
    loop, cron job or task queue, or :meth:`run_forever` to block.

    Args:
        storage: Where everything persists: a
            :class:`~cohortsync.storage.Storage`, or the path of an SQLite
            file (``SQLiteStorage(path)``, the embedded default for
            production). Without one the scheduler keeps everything in memory
            (``MemoryStorage()``), creates no file, and logs a warning: syncs,
            delivered state and history are then lost when the process ends
            and shared by no other worker. Pass ``MemoryStorage()`` yourself
            to say that is what you want (tests, trying it out). The
            scheduler owns its store, given or opened: :meth:`close` and the
            end of a ``with`` block close it.
        clock: Where time comes from (``FakeClock`` in tests).
        owner: This worker's name on leases (default: host, pid, random):
            a non-blank string of at most 200 characters without control
            characters, as ids are.
        lease_for: How long a claimed run is reserved before another worker
            may take it over; extended while the run makes progress.
        rules: Eligibility rules (default: the product rules).
        retention: How long run history is kept.
        slot_allocation: ``"balanced"`` (default) reads slot occupancy from
            the store so each minute of the period holds as many syncs as any
            other; ``"hash"`` derives the slot from the sync id alone.
        listeners: Callables receiving every event (``RunStarted``,
            ``RunPlanned``, ``BatchDelivered``, ``RunFinished``,
            ``SyncFailed``, ``EligibilityChanged``, ``GuardTripped``); wrap
            one in :func:`cohortsync.events.subscribe` to give it only some.
        pause_after_failures: A sync whose runs fail this many times in a row
            with the same error (other than a transient destination or store
            outage) is paused with that error as its reason, instead of
            failing every period forever. ``0`` never pauses.
        seed: Seed for backoff jitter (tests); ``None`` is random.
        rate_limits: Where destinations' rate limiters come from (see
            :class:`cohortsync.destinations.RateLimits`). The default,
            :data:`~cohortsync.destinations.PROCESS_RATE_LIMITS`, is shared by
            every scheduler in the process, so a destination's limit holds
            across all of them; pass a ``RateLimits()`` of your own to keep
            a group of schedulers apart (tests, or a tenant with its own quota).
        state_cache_keys: Most member keys this worker keeps in memory as
            copies of recently delivered states, so a steady-state run of a
            large cohort diffs in memory instead of re-reading every delivered
            row. Each copy is validated against the store's version token
            before use. ``0`` turns it off; sorted sources never use it.
    """

    def __init__(
        self,
        storage: Storage | str | os.PathLike[str] | None = None,
        *,
        clock: Clock | None = None,
        owner: str | None = None,
        lease_for: timedelta = timedelta(minutes=5),
        rules: Ruleset = DEFAULT_RULES,
        retention: timedelta = timedelta(days=14),
        slot_allocation: _SlotAllocation = "balanced",
        listeners: Iterable[Listener] = (),
        seed: int | None = None,
        state_cache_keys: int = 5_000_000,
        pause_after_failures: int = 5,
        rate_limits: RateLimits = PROCESS_RATE_LIMITS,
    ) -> None:
        if slot_allocation not in get_args(_SlotAllocation):
            raise ConfigurationError(
                "slot_allocation", slot_allocation, "must be 'balanced' or 'hash'"
            )
        if not isinstance(lease_for, timedelta) or lease_for <= timedelta(0):
            raise ConfigurationError("lease_for", lease_for, "must be a positive timedelta")
        if not isinstance(retention, timedelta) or retention <= timedelta(0):
            raise ConfigurationError("retention", retention, "must be a positive timedelta")
        check_count("pause_after_failures", pause_after_failures)
        if owner is not None:
            # Stored on every lease it takes: an empty name fell back to the
            # default unseen, and a NUL made every claim fail on PostgreSQL.
            check_id("owner", owner)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigurationError("seed", seed, "must be an int or None")
        if not isinstance(rate_limits, RateLimits):
            raise ConfigurationError(
                "rate_limits", rate_limits, "must be a cohortsync.destinations.RateLimits"
            )
        self.rate_limits = rate_limits
        self.clock: Clock = _to_clock(clock)
        self.storage: Storage = _to_storage(storage)
        self.pause_after_failures = pause_after_failures
        self.owner = owner or _default_owner()
        self.lease_for = lease_for
        self.rules = rules
        self.retention = retention
        self.slot_allocation: _SlotAllocation = slot_allocation
        self._listeners: list[Listener] = list(listeners)
        for listener in self._listeners:
            check_listener("listeners", listener)
        self._cohorts: dict[str, Cohort] = {}
        self._destinations: dict[str, AnyDestination] = {}
        self._mappings: dict[str, IdentifierMapping] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._limiters_lock = threading.Lock()
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not secrets
        check_count("state_cache_keys", state_cache_keys)
        self._cache = DeliveredCache(state_cache_keys) if state_cache_keys else None
        self._last_purge: datetime | None = None
        self._loop = LoopThread()
        """The event loop of asynchronous destinations, started when first needed."""
        self._run_seconds: float | None = None
        """Recent average run duration on this scheduler's clock (sizes claim batches)."""

    def __repr__(self) -> str:
        return (
            f"Scheduler(storage={self.storage!r}, clock={self.clock!r}, owner={self.owner!r}, "
            f"cohorts={len(self._cohorts)}, destinations={len(self._destinations)})"
        )

    # -- registration --------------------------------------------------------

    @staticmethod
    def _check_new(what: str, key: str, registry: dict[str, object], *, replace: bool) -> None:
        check_bool("replace", replace)
        if key in registry and not replace:
            raise ConfigurationError(
                what,
                key,
                "is already registered; pass replace=True to replace it on purpose",
            )

    def add_cohort(self, cohort: Cohort, *, replace: bool = False) -> Cohort:
        """
        Register a cohort and its membership source under ``cohort.id``.

        Raises:
            ConfigurationError: The id is registered already (and *replace* is false).
        """
        if not isinstance(cohort, Cohort):
            raise ConfigurationError("cohort", cohort, "must be a cohortsync.Cohort")
        self._check_new("cohort_id", cohort.id, self._cohorts, replace=replace)  # type: ignore[arg-type]
        self._cohorts[cohort.id] = cohort
        return cohort

    def add_destination(self, destination_id: str, destination: D, *, replace: bool = False) -> D:
        """
        Register a destination adapter under *destination_id*: a
        :class:`Destination` or an :class:`AsyncDestination` (whose requests
        run on an event loop: the host's under an
        :class:`~cohortsync.AsyncScheduler`, else one this scheduler starts
        in a thread of its own when a run first needs it).

        Raises:
            ConfigurationError: Neither kind of adapter; a
                :class:`Destination` whose ``add``/``remove``/``open``/``close``
                is a coroutine function, or an :class:`AsyncDestination`
                whose methods are not (a mix-up the scheduler would only
                discover mid-run); or the id is registered already (and
                *replace* is false).
        """
        check_id("destination_id", destination_id)
        check_destination_kind(destination)
        self._check_new("destination_id", destination_id, self._destinations, replace=replace)  # type: ignore[arg-type]
        self._destinations[destination_id] = destination
        return destination

    def add_mapping(
        self, mapping_id: str, mapping: IdentifierMapping, *, replace: bool = False
    ) -> IdentifierMapping:
        """
        Register an identifier mapping that syncs can name with ``mapping_id=``.

        Raises:
            ConfigurationError: The id is registered already (and *replace* is false).
        """
        check_id("mapping_id", mapping_id)
        if not isinstance(mapping, IdentifierMapping):
            raise ConfigurationError("mapping", mapping, "must be a cohortsync.IdentifierMapping")
        self._check_new("mapping_id", mapping_id, self._mappings, replace=replace)  # type: ignore[arg-type]
        self._mappings[mapping_id] = mapping
        return mapping

    @overload
    def add_listener(self, listener: Listener, *, events: None = None) -> None: ...
    @overload
    def add_listener(self, listener: Callable[[E1], None], *, events: tuple[type[E1]]) -> None: ...
    @overload
    def add_listener(
        self, listener: Callable[[E1 | E2], None], *, events: tuple[type[E1], type[E2]]
    ) -> None: ...
    @overload
    def add_listener(
        self,
        listener: Callable[[E1 | E2 | E3], None],
        *,
        events: tuple[type[E1], type[E2], type[E3]],
    ) -> None: ...
    @overload
    def add_listener(self, listener: Listener, *, events: Iterable[type[Event]]) -> None: ...
    def add_listener(
        self, listener: Callable[[Any], None], *, events: Iterable[type[Any]] | None = None
    ) -> None:
        """
        Receive the events this scheduler emits: every event, or only those
        of the classes in *events* (as APScheduler's listener masks do), so a
        listener for failures is not called for every batch.

        Args:
            listener: Called inline with each event; what it raises is logged.
            events: The event classes to receive, e.g.
                ``(RunFinished, GuardTripped)``; ``None`` for all.

        Raises:
            ConfigurationError: *listener* is not callable, or *events* is
                empty or names something other than a class of
                :mod:`cohortsync.events`.
        """
        if events is not None:
            listener = subscribe(listener, events)  # checks the listener
        else:
            check_listener("listener", listener)
        self._listeners.append(listener)

    # The lookups validate the id only when it is not registered: a
    # registered id was validated by add_*, and a run looks them up each time.
    def cohort(self, cohort_id: str) -> Cohort:
        """
        The cohort registered under *cohort_id* in this scheduler.

        Raises:
            CohortNotFoundError: Not registered here: the store holds only the
                id, so each worker must register the same cohorts.
        """
        try:
            return self._cohorts[cohort_id]
        except (KeyError, TypeError):
            check_id("cohort_id", cohort_id)
            raise CohortNotFoundError(cohort_id) from None

    def destination(self, destination_id: str) -> AnyDestination:
        """
        The destination adapter registered under *destination_id*.

        Raises:
            DestinationNotFoundError: Not registered here: each worker must
                register the same destinations under the same ids.
        """
        try:
            return self._destinations[destination_id]
        except (KeyError, TypeError):
            check_id("destination_id", destination_id)
            raise DestinationNotFoundError(destination_id) from None

    def mapping(self, mapping_id: str | None) -> IdentifierMapping:
        """
        The identifier mapping registered under *mapping_id*; ``None`` is the
        identity mapping (the member key sent as a ``user_id``), which a sync
        without a mapping uses.

        Raises:
            ConfigurationError: No mapping is registered under that id.
        """
        if mapping_id is None:
            return _IDENTITY
        try:
            return self._mappings[mapping_id]
        except (KeyError, TypeError):
            check_id("mapping_id", mapping_id)
            raise ConfigurationError(
                "mapping_id", mapping_id, "no identifier mapping registered with this id"
            ) from None

    def _limiter(self, destination_id: str, caps: Capabilities) -> RateLimiter | None:
        if caps.rate_limit is None:
            return None
        limiter = self.rate_limits.limiter(destination_id, caps.rate_limit, self.clock)
        with self._limiters_lock:
            # Hold it: the registry keeps limiters only while some scheduler uses them.
            self._limiters[destination_id] = limiter
        return limiter

    # -- eligibility ---------------------------------------------------------

    def check(
        self,
        cohort_id: str,
        destination_id: str,
        policy: SyncPolicy,
        *,
        mapping_id: str | None = None,
    ) -> Eligibility:
        """
        Every eligibility reason for syncing a registered cohort to a registered
        destination under *policy*.
        """
        return check_eligibility(
            self.cohort(cohort_id),
            self.destination(destination_id),
            policy,
            identifier_kinds=self.mapping(mapping_id).kinds,
            rules=self.rules,
        )

    def _require_eligible(
        self, cohort_id: str, destination_id: str, policy: SyncPolicy, mapping_id: str | None
    ) -> None:
        result = self.check(cohort_id, destination_id, policy, mapping_id=mapping_id)
        if not result.eligible:
            raise IneligibleSyncError(result.reasons)

    # -- sync life cycle -----------------------------------------------------

    def _record(self, sync_id: str) -> SyncRecord:
        """
        The stored sync, after checking the id is one a store can hold (a
        lone surrogate or a control character is a ConfigurationError here,
        never a raw encoding error from the database).
        """
        return self.storage.get_sync(check_id("sync_id", sync_id))

    def _require_known(self, sync_id: str) -> None:
        """
        Raise SyncNotFoundError for an unknown sync. A stored row too damaged
        to decode still exists: its history and ledger stay readable.
        """
        with contextlib.suppress(CorruptStoreError):
            self._record(sync_id)

    def _now(self) -> datetime:
        return require_aware(self.clock.now(), "clock.now()")

    def _place(self, sync_id: str, generation: int, policy: SyncPolicy) -> tuple[int, int | None]:
        """
        The offset and allocator bucket of a sync: a chosen time stays where
        it is (counted in its bucket, so the syncs placed by the allocator
        spread around it); the others go to :meth:`_slot`.
        """
        fixed = _schedule.fixed_offset(policy)
        if fixed is None:
            return self._slot(sync_id, generation, policy)
        if self.slot_allocation == "hash" or _schedule.spread_period(policy) is None:
            return fixed, None
        return fixed, fixed // SLOT_BUCKET_SECONDS

    def _first_due(
        self, policy: SyncPolicy, offset: int, now: datetime
    ) -> tuple[datetime, Trigger]:
        """
        When a created or updated sync first runs: now, or with
        ``first_run="next_slot"`` at its first slot (now, if now is one).
        """
        if policy.first_run is FirstRun.NEXT_SLOT:
            try:
                due = _schedule.next_due(policy, now, offset, now - _TICK)
            except (OverflowError, ValueError) as error:
                # The clock is at the end (or the very beginning) of time.
                raise ConfigurationError(
                    "first_run", "next_slot", f"no first slot exists at {now.isoformat()}"
                ) from error
            if due is not None:
                realtime = policy.cadence is Cadence.REALTIME
                return due, Trigger.REALTIME if realtime else Trigger.SCHEDULED
        return now, self._first_trigger(policy)

    @staticmethod
    def _preferred(sync_id: str, generation: int, policy: SyncPolicy) -> tuple[int, int] | None:
        """
        ``(period seconds, stable offset)`` of a sync the allocator places, or ``None``.
        """
        period = _schedule.spread_period(policy)
        if period is None:
            return None
        return period, _schedule.stable_offset(f"{sync_id}:{generation}", period)

    def _slot(self, sync_id: str, generation: int, policy: SyncPolicy) -> tuple[int, int | None]:
        grid = self._preferred(sync_id, generation, policy)
        if grid is None:
            return 0, None
        period, preferred = grid
        if self.slot_allocation == "hash":
            return preferred, None
        buckets = period // SLOT_BUCKET_SECONDS
        # A read: the store counts the sync in its bucket with the sync write
        # itself, so a failed create or update never leaks a slot.
        bucket = self.storage.least_loaded_slot(period, buckets, preferred // SLOT_BUCKET_SECONDS)
        return bucket * SLOT_BUCKET_SECONDS + preferred % SLOT_BUCKET_SECONDS, bucket

    @staticmethod
    def _first_trigger(policy: SyncPolicy) -> Trigger:
        if policy.cadence is Cadence.ONE_TIME:
            return Trigger.ONE_TIME
        if policy.cadence is Cadence.REALTIME:
            return Trigger.REALTIME
        return Trigger.SCHEDULED

    def create_sync(
        self,
        cohort_id: str,
        destination_id: str,
        policy: SyncPolicy,
        *,
        sync_id: str | None = None,
        mapping_id: str | None = None,
    ) -> Sync:
        """
        Create a sync; its first run is due immediately.

        Raises:
            CohortNotFoundError: The cohort is not registered.
            DestinationNotFoundError: The destination is not registered.
            IneligibleSyncError: Eligibility found blocking reasons (all of them
                are on the error).
            ConfigurationError: Bad arguments, or the id is taken.
        """
        if not isinstance(policy, SyncPolicy):
            raise ConfigurationError("policy", policy, "must be a cohortsync.SyncPolicy")
        self._require_eligible(cohort_id, destination_id, policy, mapping_id)
        now = self._now()
        sync_id = (
            check_id("sync_id", sync_id) if sync_id is not None else f"sync-{secrets.token_hex(6)}"
        )
        sync = Sync(
            id=sync_id,
            cohort_id=cohort_id,
            destination_id=destination_id,
            policy=policy,
            mapping_id=mapping_id,
            created_at=now,
            updated_at=now,
        )
        create_placed = getattr(self.storage, "create_sync_least_loaded", None)
        grid = self._preferred(sync.id, sync.generation, policy)
        placed_by_store = (
            grid is not None
            and self.slot_allocation == "balanced"
            and _schedule.fixed_offset(policy) is None
        )
        place_many = getattr(self.storage, "create_syncs_placed", None)
        if placed_by_store and policy.first_run is FirstRun.NEXT_SLOT and callable(place_many):
            assert grid is not None  # noqa: S101 - placed_by_store says so
            self._create_at_next_slot(sync, grid, now, place_many)
            return sync
        buckets = 0  # > 0: the store places the sync, among this many buckets
        if placed_by_store and callable(create_placed) and policy.first_run is FirstRun.NOW:
            assert grid is not None  # noqa: S101 - placed_by_store says so
            # Due now whatever its slot: the store moves it from its preferred
            # bucket to the least loaded one inside the write (one round trip
            # on PostgreSQL instead of a read, then the write).
            period, offset = grid
            bucket: int | None = offset // SLOT_BUCKET_SECONDS
            buckets = period // SLOT_BUCKET_SECONDS
        else:
            offset, bucket = self._place(sync.id, sync.generation, policy)
        record = self._new_record(sync, (offset, bucket), now)
        if buckets and create_placed is not None:
            create_placed(record, buckets)
        else:
            self.storage.create_sync(record)
        return sync

    def _create_at_next_slot(
        self,
        sync: Sync,
        grid: tuple[int, int],
        now: datetime,
        create_placed: Callable[..., tuple[list[SyncRecord], list[str]]],
    ) -> None:
        """
        Create a sync whose first run is at its slot: the slot decides when it
        is due, so the store cannot move it after the pick; it is picked under
        the store's slot lock instead (``create_syncs_placed``), from counts
        that include every concurrent creator's syncs.
        """

        def place(counts: SlotCounts, taken: Container[str]) -> list[SyncRecord]:
            if sync.id in taken:
                return []
            return [self._new_record(sync, SlotAllocator(counts).pick(*grid), now)]

        if create_placed([sync.id], place)[1]:
            raise ConfigurationError("id", sync.id, "a sync with this id already exists")

    def create_syncs(
        self, specs: Iterable[SyncSpec], *, chunk: int = 10_000, upsert: bool = False
    ) -> BulkResult:
        """
        Create many syncs, a chunk at a time: each chunk is checked spec by
        spec, its slots allocated in memory from one read of the store's
        counts (the spread of one-by-one creates), and written in one
        transaction. Each first run is due as with :meth:`create_sync`
        (immediately, or at the first slot with ``first_run="next_slot"``).

        **Per-spec result:** every valid spec is written, no refused one is,
        and the call ends with :class:`~cohortsync.exceptions.BulkSyncError`
        listing every refused spec (its index, id and the error
        :meth:`create_sync` would raise) and what was written. A
        :class:`StorageError` ends the call with earlier chunks kept; on a
        store with the bulk part (every shipped one) the failing chunk is
        not written at all, on one without it each sync is its own
        transaction.

        Args:
            specs: The syncs, read lazily (a generator of millions is fine).
            chunk: Specs per transaction.
            upsert: A spec whose ``sync_id`` exists updates that sync as
                :meth:`update_sync` does (a new generation, a new slot, a run
                due now), one sync at a time; its cohort and destination must
                be the stored ones. A sync another writer changes meanwhile
                is read and compared again, so concurrent upserts of one
                spec bump its generation once. Without it, an existing id is
                refused.

        Returns:
            The ids created and updated.

        Raises:
            BulkSyncError: Some specs were refused (not an id twice in one
                call, an unknown cohort or destination, an ineligible policy,
                an id taken without *upsert*, ...); all the others were written.
            ConfigurationError: *chunk* is not a positive int.
            StorageError: The store failed; chunks before this one are written.
        """
        check_count("chunk", chunk, minimum=1)
        check_bool("upsert", upsert)
        call = _BulkCall()
        self._write_specs(specs, chunk, upsert=upsert, call=call)
        if call.failures:
            call.failures.sort(key=lambda f: f.position)
            raise BulkSyncError(call.failures, call.created, call.updated, call.unchanged)
        return BulkResult(
            created=tuple(call.created),
            updated=tuple(call.updated),
            unchanged=tuple(call.unchanged),
        )

    def apply_syncs(
        self,
        specs: Iterable[SyncSpec],
        *,
        prefix: str | None = None,
        prune: bool = False,
        dry_run: bool = False,
        chunk: int = 10_000,
    ) -> ApplyResult:
        """
        Make the store hold the declared syncs: the idempotent call for
        application start-up, safe in every process at once.

        A declared id that does not exist is created (as :meth:`create_syncs`
        does); one whose policy or mapping differs is updated (a new
        generation and slot, a run due now, as :meth:`update_sync`); one the
        spec already describes is left exactly as it is: its slot,
        generation and next run, and its status. A declaration never resumes
        a sync: a paused sync stays paused, even when its definition
        changes (resume it with :meth:`resume_sync`), so an operator's pause
        survives every restart. A completed one-time sync is not run again
        unless its definition changes (a completed or failed sync whose
        definition changes is active again, as with :meth:`update_sync`). A
        sync's cohort and destination cannot change under its id: declare a
        new id (and prune the old).

        Prune from one place (the release step), not from every process:
        during a rolling deploy an old process would prune what the new
        version declares, and deleted ids are never reused.

        Several processes may apply the same declaration at the same time:
        each sync is created once (the others find it taken and equal), and
        a changed definition bumps the generation once (a process whose
        compare-and-set loses reads the sync again and finds it equal).

        Args:
            specs: The declared syncs, read lazily; every one needs a
                ``sync_id``.
            prefix: The id prefix this declaration owns (for example
                ``"billing:"``): every declared id must start with it, and
                pruning only ever looks at syncs whose id does.
            prune: Delete the syncs under *prefix* that are not declared
                (and not deleted already), each as its policy's
                ``on_delete`` says. Needs *prefix*. Nothing is pruned when
                some spec is refused.
            dry_run: Decide everything and write nothing: the result says
                what a real call would do, refused specs included.
            chunk: Specs per transaction.

        Returns:
            What was (or would be) created, updated, left unchanged and
            deleted.

        Raises:
            BulkSyncError: Some specs were refused (no id, an id outside
                *prefix*, an id twice, an unknown cohort, destination or
                mapping, an ineligible policy, a moved cohort or destination,
                a deleted id); every other spec was applied, nothing pruned.
                Never with *dry_run*.
            ConfigurationError: *prune* without *prefix*, a bad *prefix* or
                *chunk*.
            StorageError: The store failed; chunks before this one are written.
        """
        check_count("chunk", chunk, minimum=1)
        check_bool("prune", prune)
        check_bool("dry_run", dry_run)
        if prefix is not None:
            check_id("prefix", prefix)
        elif prune:
            raise ConfigurationError(
                "prune",
                prune,
                "needs prefix=: pruning deletes only the undeclared syncs whose id starts "
                "with it, never the other syncs of the store",
            )
        call = _BulkCall(declaring=True, prefix=prefix, dry_run=bool(dry_run))
        self._write_specs(specs, chunk, upsert=True, call=call)
        call.failures.sort(key=lambda f: f.position)
        if call.failures and not call.dry_run:
            raise BulkSyncError(call.failures, call.created, call.updated, call.unchanged)
        deleted: tuple[str, ...] = ()
        if prune and prefix is not None and not call.failures:
            deleted = self._prune(prefix, call.first_seen, dry_run=call.dry_run)
        return ApplyResult(
            created=tuple(call.created),
            updated=tuple(call.updated),
            unchanged=tuple(call.unchanged),
            deleted=deleted,
            refused=tuple(call.failures),
            dry_run=call.dry_run,
        )

    def _prune(self, prefix: str, declared: Container[str], *, dry_run: bool) -> tuple[str, ...]:
        """
        Delete (or with *dry_run* list) the live syncs under *prefix* not in
        *declared*. The walk starts just before the prefix and stops after it.
        """
        doomed = list(
            prunable(iter_sync_records(self.storage, prefix[:-1] or None), prefix, declared)
        )
        if dry_run:
            return tuple(doomed)
        deleted: list[str] = []
        for sync_id in doomed:
            # delete_sync re-reads and retries a conflicting write itself.
            try:
                self.delete_sync(sync_id)
            except SyncNotFoundError:
                continue  # gone already
            deleted.append(sync_id)
        return tuple(deleted)

    def _write_specs(
        self, specs: Iterable[SyncSpec], chunk: int, *, upsert: bool, call: _BulkCall
    ) -> None:
        """
        The bulk path of :meth:`create_syncs` and :meth:`apply_syncs`, a
        chunk at a time: check, write, then settle each spec whose id was
        taken. With ``call.dry_run`` the chunk is read, not written: an id
        that exists counts as taken.
        """
        for part in chunks(specs, chunk):
            now = self._now()
            checked = self._check_specs(part, call, now)
            if call.dry_run:
                ids = {index: sync.id for index, sync in checked}
                taken = {sync_id for sync_id in ids.values() if self._exists(sync_id)}
            else:
                records, taken = self._write_chunk(checked, now, call)
                ids = {index: record.id for index, record in records.items()}
            for index, spec in part:
                sync_id = ids.get(index)
                if sync_id is not None:
                    self._settle(index, spec, sync_id, taken, upsert=upsert, call=call)

    def _exists(self, sync_id: str) -> bool:
        """Whether the store holds *sync_id* (a row too damaged to read counts)."""
        try:
            self._record(sync_id)
        except SyncNotFoundError:
            return False
        except CorruptStoreError:
            return True
        return True

    def _bulk_record(
        self, index: int, sync: Sync, slot: tuple[int, int | None], now: datetime, call: _BulkCall
    ) -> SyncRecord | None:
        """
        The record of a sync created in bulk in *slot* ``(offset, bucket)``,
        or ``None`` with the refusal in *call* (no first run before the end
        of time).
        """
        try:
            return self._new_record(sync, slot, now)
        except ConfigurationError as exc:
            call.failures.append(BulkFailure(index, sync.id, exc))
            return None

    def _new_record(self, sync: Sync, slot: tuple[int, int | None], now: datetime) -> SyncRecord:
        """
        The record of a sync created at *now* in *slot* ``(offset, bucket)``,
        first due as :meth:`_first_due` says.

        Raises:
            ConfigurationError: No first run exists (``first_run="next_slot"``
                at the end of time).
        """
        first_due, first_trigger = self._first_due(sync.policy, slot[0], now)
        return SyncRecord(
            sync=sync,
            next_due=first_due,
            next_trigger=first_trigger,
            offset=slot[0],
            slot_bucket=slot[1],
            anchor=now,
            scheduled_from=now,
        )

    def _write_chunk(
        self, checked: list[tuple[int, Sync]], now: datetime, call: _BulkCall
    ) -> tuple[dict[int, SyncRecord], set[str]]:
        """
        Slot and store the checked syncs of one chunk: the records by input
        index, and the ids found taken (nothing of those written). A sync
        with no first run (``first_run="next_slot"`` at the end of time) is
        refused in *call*.
        """

        records: dict[int, SyncRecord] = {}
        balanced = self.slot_allocation == "balanced"

        def place(counts: SlotCounts, taken: Container[str] = ()) -> list[SyncRecord]:
            # With create_syncs_placed, inside the store's write under its
            # slot lock: the picks count what concurrent creators wrote
            # before them. A sync that exists (declared by another replica
            # too) takes no pick: its record only carries its id, unwritten.
            allocator = SlotAllocator(counts) if balanced else None
            for i, sync in checked:
                slot = (0, None) if sync.id in taken else self._bulk_slot(sync, allocator)
                one = self._bulk_record(i, sync, slot, now, call)
                if one is not None:
                    records[i] = one
            return list(records.values())

        create_placed = getattr(self.storage, "create_syncs_placed", None)
        if callable(create_placed):
            return records, set(create_placed([sync.id for _, sync in checked], place)[1])
        create_many = getattr(self.storage, "create_syncs", None)
        slot_counts = getattr(self.storage, "slot_counts", None)
        if callable(create_many) and callable(slot_counts):
            return records, set(create_many(place(slot_counts)))
        # A store written against the plain protocol: pick and create one by
        # one, so each pick sees the counts of the syncs created before it.
        taken: set[str] = set()
        for i, sync in checked:
            slot = self._place(sync.id, sync.generation, sync.policy)
            one = self._bulk_record(i, sync, slot, now, call)
            if one is not None:
                records[i] = one
                taken.update(derive_create_syncs(self.storage, [one]))
        return records, taken

    def _settle(
        self,
        index: int,
        spec: SyncSpec,
        sync_id: str,
        taken: set[str],
        *,
        upsert: bool,
        call: _BulkCall,
    ) -> None:
        """
        Count a written spec; update the sync of a taken id (*upsert*) or refuse it.
        """
        if sync_id not in taken:
            call.created.append(sync_id)
            return
        try:
            try:
                record: SyncRecord | None = self._record(sync_id)
            except CorruptStoreError:
                record = None  # taken, by a row too damaged to read: refused below
            if record is not None and is_gone(record):
                raise ConfigurationError(
                    "sync_id",
                    sync_id,
                    "belongs to a deleted sync: ids are never reused (its history and "
                    "delivered state keep it); choose another id",
                )
            if not upsert:
                raise ConfigurationError(
                    "sync_id", sync_id, "a sync with this id already exists (upsert=False)"
                )
            # A damaged row raises its CorruptStoreError here, as update_sync would.
            changed = self._upsert(spec, record or self._record(sync_id), call)
        except (StorageError, CorruptStoreError):
            raise
        except CohortSyncError as exc:
            call.failures.append(BulkFailure(index, spec.sync_id, exc))
        else:
            (call.updated if changed else call.unchanged).append(sync_id)

    def _check_specs(
        self, part: list[tuple[int, SyncSpec]], call: _BulkCall, now: datetime
    ) -> list[tuple[int, Sync]]:
        """
        The syncs of the valid specs of one chunk; each refused one goes to
        *failures* with the error :meth:`create_sync` would raise.
        Eligibility is checked once per distinct (cohort, destination,
        policy, mapping) of the chunk.
        """
        verdicts: dict[object, CohortSyncError | None] = {}
        out = []
        for index, spec in part:
            sync_id = getattr(spec, "sync_id", None)
            try:
                if not isinstance(spec, SyncSpec):
                    raise ConfigurationError(
                        "specs", spec, "each spec must be a cohortsync.SyncSpec"
                    )
                if not isinstance(spec.policy, SyncPolicy):
                    raise ConfigurationError(
                        "policy", spec.policy, "must be a cohortsync.SyncPolicy"
                    )
                sync_id = self._spec_id(sync_id, index, call)
                refused = self._verdict(spec, verdicts)
                if refused is not None:
                    call.failures.append(BulkFailure(index, spec.sync_id, refused))
                    continue
                sync = Sync(
                    id=sync_id,
                    cohort_id=spec.cohort_id,
                    destination_id=spec.destination_id,
                    policy=spec.policy,
                    mapping_id=spec.mapping_id,
                    created_at=now,
                    updated_at=now,
                )
            except (StorageError, CorruptStoreError):
                raise
            except CohortSyncError as exc:
                call.failures.append(BulkFailure(index, getattr(spec, "sync_id", None), exc))
            else:
                out.append((index, sync))
        return out

    @staticmethod
    def _spec_id(sync_id: str | None, index: int, call: _BulkCall) -> str:
        """
        The id of the spec at *index*: checked, or made up when it has none
        (:meth:`create_syncs` only).
        """
        if sync_id is None:
            if call.declaring:
                raise ConfigurationError(
                    "sync_id",
                    None,
                    "apply_syncs needs every spec's sync_id: a declaration names "
                    "its syncs, so that applying it again finds them",
                )
            return f"sync-{secrets.token_hex(6)}"
        check_id("sync_id", sync_id)
        if call.prefix is not None and not sync_id.startswith(call.prefix):
            raise ConfigurationError(
                "sync_id",
                sync_id,
                f"does not start with the declaration's prefix {call.prefix!r}",
            )
        first = call.first_seen.setdefault(sync_id, index)
        if first != index:
            raise ConfigurationError(
                "sync_id", sync_id, f"given twice in this call (first at index {first})"
            )
        return sync_id

    def _verdict(
        self, spec: SyncSpec, verdicts: dict[object, CohortSyncError | None]
    ) -> CohortSyncError | None:
        """
        The error :meth:`create_sync` raises for *spec*'s cohort, destination,
        policy and mapping, or ``None``; the same one for every spec sharing them.
        """
        key: object = (spec.cohort_id, spec.destination_id, spec.policy, spec.mapping_id)
        try:
            return verdicts[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable value: checked on its own
            key = None
        try:
            self._require_eligible(
                spec.cohort_id, spec.destination_id, spec.policy, spec.mapping_id
            )
        except (StorageError, CorruptStoreError):
            raise
        except CohortSyncError as exc:
            verdict: CohortSyncError | None = exc
        else:
            verdict = None
        if key is not None:
            verdicts[key] = verdict
        return verdict

    def _bulk_slot(self, sync: Sync, allocator: SlotAllocator | None) -> tuple[int, int | None]:
        """:meth:`_place` for a sync of a bulk chunk, its pick counted in *allocator*."""
        if allocator is None:  # hash allocation
            return self._place(sync.id, sync.generation, sync.policy)
        period = _schedule.spread_period(sync.policy)
        fixed = _schedule.fixed_offset(sync.policy)
        if fixed is not None:
            # A chosen time is never moved; counted, so the automatic ones spread around it.
            if period is None:
                return fixed, None
            allocator.count(period, fixed // SLOT_BUCKET_SECONDS)
            return fixed, fixed // SLOT_BUCKET_SECONDS
        grid = self._preferred(sync.id, sync.generation, sync.policy)
        if grid is None:
            return 0, None
        return allocator.pick(*grid)

    def _upsert(self, spec: SyncSpec, record: SyncRecord, call: _BulkCall) -> bool:
        """
        Update the existing sync of *record* to *spec*, as :meth:`update_sync`;
        whether it changed (a spec that describes the sync as it is changes
        nothing: re-applying the same specs keeps every slot and next run).

        The write is compare-and-set on the revision compared. When another
        writer wins (another process applying the same specs, or a host
        call), the sync is read and compared again: equal now, it is
        unchanged, so concurrent appliers bump the generation once and none
        fails.
        """

        def differs(current: SyncRecord) -> bool:
            old = current.sync
            if (old.cohort_id, old.destination_id) != (spec.cohort_id, spec.destination_id):
                raise ConfigurationError(
                    "sync_id",
                    old.id,
                    f"exists for cohort {old.cohort_id!r} and destination "
                    f"{old.destination_id!r}; an upsert cannot move a sync to another cohort "
                    "or destination (declare a new id)",
                )
            return (old.policy, old.mapping_id) != (spec.policy, spec.mapping_id)

        if call.dry_run:
            return differs(record)

        def upsert(current: SyncRecord) -> SyncRecord | None:
            if not differs(current):
                return None
            return self._updated(current, spec.policy, spec.mapping_id, keep_paused=call.declaring)

        return self._rewrite(record.id, upsert, record=record)[1]

    def get_sync(self, sync_id: str) -> Sync:
        """
        Raises:
            SyncNotFoundError: No such sync.
        """
        return self._record(sync_id).sync

    def syncs(self, *, after: str | None = None, limit: int | None = None) -> list[Sync]:
        """
        The syncs in the store, ordered by id: every one by default, or a page.

        Args:
            after: Start after this sync id (the last one of the previous page).
            limit: Return at most this many.
        """
        if after is not None:
            check_id("after", after)
        if limit is None:
            return [r.sync for r in iter_sync_records(self.storage, after)]
        check_count("limit", limit)
        records = iter_sync_records(self.storage, after, first=limit)
        return [r.sync for r in islice(records, limit)]

    def iter_syncs(self, *, after: str | None = None) -> Iterator[Sync]:
        """
        The syncs in the store, ordered by id (after the id *after*), read a
        page at a time as the iteration goes (from a store that answers
        :meth:`~cohortsync.storage.PagedReads.page_syncs`; a store written for
        0.1 is read whole, once).
        """
        if after is not None:
            check_id("after", after)
        return (r.sync for r in iter_sync_records(self.storage, after))

    def update_sync(
        self,
        sync_id: str,
        policy: SyncPolicy | None = None,
        *,
        mapping_id: str | Keep | None = KEEP,
    ) -> Sync:
        """
        Change a sync's policy (and mapping): a new generation, a new slot, and
        a run due immediately. A paused or failed sync becomes active: a new
        definition starts afresh (:meth:`apply_syncs` keeps a pause instead).

        Args:
            sync_id: The sync.
            policy: The new policy, or ``None`` to keep the current one.
            mapping_id: A registered identifier mapping, ``None`` for the
                identity mapping, or leave it out to keep the current one.

        Raises:
            IneligibleSyncError: The new definition is not eligible (nothing changes).
            ConflictError: Other writers changed the sync during every one of
                the scheduler's attempts to write it (nothing changes; a
                change made meanwhile is read again and updated, not lost).
        """

        if policy is not None and not isinstance(policy, SyncPolicy):
            raise ConfigurationError("policy", policy, "must be a cohortsync.SyncPolicy or None")

        def update(record: SyncRecord) -> SyncRecord:
            old = record.sync
            return self._updated(
                record, policy or old.policy, old.mapping_id if mapping_id is KEEP else mapping_id
            )

        return self._rewrite(sync_id, update)[0]

    def _updated(
        self,
        record: SyncRecord,
        policy: SyncPolicy,
        mapping_id: str | None,
        *,
        keep_paused: bool = False,
    ) -> SyncRecord:
        """
        The record :meth:`update_sync` makes of *record*: a new generation, a
        new slot, a run due now. With *keep_paused*, a paused sync stays paused.
        """
        old = record.sync
        if is_gone(record):
            raise ConfigurationError("sync_id", old.id, "a deleted sync cannot be updated")
        self._require_eligible(old.cohort_id, old.destination_id, policy, mapping_id)
        now = self._now()
        paused = keep_paused and old.status is SyncStatus.PAUSED
        sync = attrs.evolve(
            old,
            policy=policy,
            mapping_id=mapping_id,
            generation=old.generation + 1,
            status=SyncStatus.PAUSED if paused else SyncStatus.ACTIVE,
            status_reason=old.status_reason if paused else None,
            effective_cadence=None,
            updated_at=now,
        )
        offset, bucket = self._place(sync.id, sync.generation, policy)
        first_due, first_trigger = self._first_due(policy, offset, now)
        return attrs.evolve(
            record,
            sync=sync,
            next_due=first_due,
            next_trigger=first_trigger,
            offset=offset,
            slot_bucket=bucket,
            anchor=now,
            attempts=0,
            scheduled_from=now,
        )

    def _rewrite(
        self,
        sync_id: str,
        decide: Callable[[SyncRecord], SyncRecord | None],
        *,
        record: SyncRecord | None = None,
    ) -> tuple[Sync, bool]:
        """
        Read the sync, let *decide* make the record to store of it (``None``:
        nothing to write) and store that compare-and-set on the revision
        read. A host call never overwrites a write made between its read and
        its write (another request, a CLI, another process): refused, it
        reads the sync again and decides again, so its change applies to
        what is stored now.

        Args:
            sync_id: The sync.
            decide: Makes the new record from the stored one; what it raises
                refuses the call (nothing written). Called once per attempt.
            record: The sync as the caller has just read it (the first
                attempt uses it instead of reading again).

        Returns:
            The sync as stored by the call (or as read, when nothing was
            written), and whether it wrote.

        Raises:
            ConflictError: Another writer won each of ``_CAS_ATTEMPTS`` attempts.
        """
        sync_id = check_id("sync_id", sync_id)
        conflict: ConflictError | None = None
        for _ in range(_CAS_ATTEMPTS):
            current = record if record is not None else self._record(sync_id)
            record = None
            new = decide(current)
            if new is None:
                return current.sync, False
            try:
                _save_sync_at(self.storage, new, current.revision)
            except ConflictError as exc:
                conflict = exc
                continue
            return new.sync, True
        assert conflict is not None  # noqa: S101 - the loop ran and every attempt conflicted
        raise ConflictError(
            sync_id,
            conflict.expected,
            conflict.found,
            counter=conflict.counter,
            attempts=_CAS_ATTEMPTS,
        ) from conflict

    def _change(
        self, sync_id: str, changes_of: Callable[[SyncRecord], dict[str, object] | None]
    ) -> Sync:
        """
        Apply the field changes *changes_of* decides from the stored record
        (``None``: none), through :meth:`_rewrite`.
        """

        def decide(record: SyncRecord) -> SyncRecord | None:
            changes = changes_of(record)
            if changes is None:
                return None
            sync_changes = {k: v for k, v in changes.items() if k in _SYNC_FIELDS}
            record_changes = {k: v for k, v in changes.items() if k not in _SYNC_FIELDS}
            sync = attrs.evolve(record.sync, updated_at=self._now(), **sync_changes)  # type: ignore[arg-type]
            return attrs.evolve(record, sync=sync, **record_changes)  # type: ignore[arg-type]

        return self._rewrite(sync_id, decide)[0]

    def _due_now(self) -> dict[str, object]:
        """
        The schedule fields of a run the host asks for: due now. One rule for
        every host call; if a run is already recorded at this very instant
        (a clock that has not moved), the store's claim gives the new run the
        next free slot (see :func:`cohortsync.storage.claim_slot`).
        """
        now = self._now()
        return {"next_due": now, "scheduled_from": now}

    @staticmethod
    def _host_trigger(record: SyncRecord) -> Trigger:
        """
        The trigger of a run the host asks for. A sync being deleted stays on
        its removal run: a normal run would deliver the members again.
        """
        return Trigger.TEARDOWN if record.next_trigger is Trigger.TEARDOWN else Trigger.MANUAL

    def pause_sync(self, sync_id: str, reason: str | None = None) -> Sync:
        """
        Stop scheduling a sync until :meth:`resume_sync`. Pausing a sync
        that is being deleted parks its removal run, and says so in the reason.

        Raises:
            ConfigurationError: *reason* is neither a str nor ``None``, or the
                sync was deleted.
        """
        if reason is not None and not isinstance(reason, str):
            raise ConfigurationError("reason", reason, "must be a str or None")

        def pause(record: SyncRecord) -> dict[str, object]:
            if record.sync.status is SyncStatus.DELETED:
                # Paused, it could be resumed: a deleted sync must stay deleted.
                raise ConfigurationError("sync_id", sync_id, "a deleted sync cannot be paused")
            text = reason or "paused"
            if record.next_trigger is Trigger.TEARDOWN:
                text = f"{text} (deleting: the removal run waits for resume_sync)"
            return {"status": SyncStatus.PAUSED, "status_reason": text}

        return self._change(sync_id, pause)

    def resume_sync(self, sync_id: str) -> Sync:
        """
        Resume a paused (or failed) sync; it runs immediately, then on its slots.
        """

        def resume(record: SyncRecord) -> dict[str, object]:
            if record.sync.status is SyncStatus.DELETED:
                raise ConfigurationError("sync_id", sync_id, "a deleted sync cannot be resumed")
            return {
                "status": SyncStatus.ACTIVE,
                "status_reason": None,
                "next_trigger": self._host_trigger(record),
                "attempts": 0,
                **self._due_now(),
            }

        return self._change(sync_id, resume)

    def sync_now(self, sync_id: str, *, full: bool = False) -> Sync:
        """
        Make a sync due now ("sync now"). With *full*, the run re-sends the
        whole membership (a full resync) instead of the diff.

        Raises:
            ConfigurationError: The sync is deleted, or paused (resume it; a
                full resync requested while paused is kept for the first run
                after :meth:`resume_sync`).
        """

        check_bool("full", full)

        def run_now(record: SyncRecord) -> dict[str, object]:
            if record.sync.status is SyncStatus.DELETED:
                raise ConfigurationError("sync_id", sync_id, "a deleted sync cannot run")
            if record.sync.status is SyncStatus.PAUSED:
                if not full:
                    raise ConfigurationError(
                        "sync_id", sync_id, "a paused sync does not run: resume_sync() first"
                    )
                # Kept for when it is resumed: the first run after it is full.
                return {"full_resync": True}
            changes: dict[str, object] = {
                "next_trigger": self._host_trigger(record),
                "full_resync": full or record.full_resync,
                **self._due_now(),
            }
            if record.sync.status in (SyncStatus.COMPLETED, SyncStatus.FAILED):
                changes.update(status=SyncStatus.ACTIVE, status_reason=None, attempts=0)
            return changes

        return self._change(sync_id, run_now)

    def request_full_resync(self, sync_id: str) -> Sync:
        """
        Re-send the whole membership on the next run (now).
        """
        return self.sync_now(sync_id, full=True)

    def confirm_removals(self, sync_id: str) -> Sync:
        """
        Let the next run send the removals the mass-removal guard held back;
        the run happens now.
        """

        def release(record: SyncRecord) -> dict[str, object]:
            if record.sync.status is SyncStatus.DELETED:
                raise ConfigurationError(
                    "sync_id", sync_id, "a deleted sync has nothing to confirm"
                )
            return {
                "guard_released": True,
                "next_trigger": self._host_trigger(record),
                **self._due_now(),
            }

        return self._change(sync_id, release)

    def delete_sync(self, sync_id: str) -> Sync:
        """
        Delete a sync. With ``OnDelete.LEAVE`` (default) the destination keeps
        what it has; with ``OnDelete.REMOVE_DELIVERED`` a final run removes
        exactly what this sync delivered, then the sync is ``deleted``.
        """

        def delete(record: SyncRecord) -> dict[str, object] | None:
            if record.sync.status is SyncStatus.DELETED:
                return None
            if record.next_trigger is Trigger.TEARDOWN and record.sync.status in (
                SyncStatus.ACTIVE,
                SyncStatus.PAUSED,
            ):
                # Already being deleted: deleting twice is one teardown, and a
                # parked (paused) teardown stays parked until resume_sync.
                return None
            if record.sync.policy.on_delete is OnDelete.REMOVE_DELIVERED:
                # Always a removal run, never a decision from the delivered count
                # now: a run holding the lease may be delivering (its first batch
                # not applied yet), and its in-flight batches count too. The
                # write is compare-and-set on the sync's revision, so that run's
                # completion cannot undo it; the teardown runs after it and
                # removes the delivered state plus every pending add.
                return {
                    "status": SyncStatus.ACTIVE,
                    "status_reason": "deleting: removing delivered members",
                    "next_trigger": Trigger.TEARDOWN,
                    "slot_bucket": None,
                    "attempts": 0,
                    **self._due_now(),
                }
            return {
                "status": SyncStatus.DELETED,
                "status_reason": "deleted",
                "next_due": None,
                "slot_bucket": None,
            }

        return self._change(sync_id, delete)

    # -- when ------------------------------------------------------------------

    def next_run(self, sync_id: str) -> datetime | None:
        """
        When the sync is next due, or ``None`` if nothing is scheduled.
        """
        record = self._record(sync_id)
        return record.next_due if record.sync.status is SyncStatus.ACTIVE else None

    def iter_upcoming(self, until: datetime) -> Iterator[Upcoming]:
        """
        Every run due up to *until* (inclusive), earliest first (ties by sync
        id), assuming each run starts on time; at most
        ``MAX_UPCOMING_PER_SYNC`` (10,000) runs of one sync.

        A stream: it reads only the syncs due before *until*, a page at a time
        and only as far as the runs taken need (from a store that answers
        :meth:`~cohortsync.storage.PagedReads.due_between`; a store written
        for 0.1 is read whole, once). Stop iterating when you have enough.
        A sync changed while the stream is read shows as it was when the
        stream read it, once (a sync a worker runs meanwhile is not listed
        again at its new time); one moved earlier than the stream has reached
        is not listed. Memory: an entry (about 0.9 KB) per sync read that has
        more runs before *until*.
        """
        until = require_aware(until, "until")
        return _upcoming(iter_due(self.storage, until), until, self._now())

    def upcoming(self, until: datetime, *, limit: int | None = None) -> list[Upcoming]:
        """
        :meth:`iter_upcoming` as a list: every run due up to *until*
        (inclusive), earliest first, or the first *limit* of them.
        """
        until = require_aware(until, "until")
        if limit is None:
            return list(self.iter_upcoming(until))
        check_count("limit", limit)
        # Each sync read yields its first run: a page of *limit* syncs is enough.
        stream = _upcoming(iter_due(self.storage, until, first=limit), until, self._now())
        return list(islice(stream, limit))

    # -- what ------------------------------------------------------------------

    def preview(self, sync_id: str, *, sample_size: int = 10) -> Preview:
        """
        What a run would do now, without sending anything.

        The preview asks the same planner as a run: it reads the change feed
        when a run would, includes members an interrupted run left in
        flight, counts what a full send (a resync request, a TTL refresh, a
        full-sync-only destination) would send again, and applies the
        eligibility re-check and the mass-removal guard at the measured size.
        Nothing is written and nothing is sent.

        Raises:
            SourceError: The membership source failed.
        """
        check_count("sample_size", sample_size)
        record = self._record(sync_id)
        sync = record.sync
        cohort = self.cohort(sync.cohort_id)
        caps = self.destination(sync.destination_id).capabilities
        source = cohort.source
        if source is None:
            raise SourceError(cohort.id, "the cohort has no membership source registered")
        storage = self.storage
        now = self._now()
        delivered = storage.count_delivered(sync_id)
        pending = storage.pending_batches(sync_id)
        due = record.next_due
        plan = plan_read(
            ReadFacts(
                sync=sync,
                slot=due if due is not None and due <= now else now,
                last_slot=record.last_slot,
                now=now,
                full_resync=record.full_resync,
                last_full_sync_at=record.last_full_sync_at,
                capabilities=caps,
                delivered=delivered,
                pending=bool(pending),
                resumed=False,
                has_feed=has_change_feed(source),
                feed_cursor=record.feed_cursor,
            )
        )
        notes: list[str] = [] if plan.reason is None else [plan.reason]
        dead = storage.dead_letters(sync_id)
        feed: object = source
        if plan.from_feed and has_change_feed(feed) and record.feed_cursor is not None:
            diff = diff_changes(
                feed,
                cohort.id,
                record.feed_cursor,
                lambda keys: storage.filter_delivered(sync_id, keys),
                delivered,
                exclude=dead,
            )
        else:
            diff = diff_snapshot(
                source,
                cohort.id,
                storage.iter_delivered(sync_id),
                delivered,
                keep_existing=plan.keep_existing,
                exclude=dead,
            )
        try:
            if pending:
                unknown = in_flight_members(pending)
                recovery = plan_recovery(
                    unknown,
                    storage.filter_delivered(sync_id, unknown),
                    adds=diff.adds,
                    removes=diff.removes,
                    existing=diff.existing or (),
                )
                diff.adds = with_keys(diff.adds, recovery.adds)
                diff.removes = with_keys(diff.removes, recovery.removes)
                if recovery.note is not None:
                    notes.append(recovery.note)
            size = (
                diff.size
                if diff.size is not None
                else delivered + len(diff.adds) - len(diff.removes)
            )
            recheck = plan_recheck(
                sync,
                cohort,
                caps,
                identifier_kinds=self.mapping(sync.mapping_id).kinds,
                rules=self.rules,
                at=now,
                size=size,
            )
            notes.extend(recheck.notes)
            guard = plan_guard(
                sync,
                caps,
                delivered=diff.delivered,
                removing=len(diff.removes),
                source_empty=diff.source_empty,
                run_id="preview",
                at=now,
            )
            if guard.note is not None:
                notes.append(guard.note)
            return Preview(
                sync_id=sync_id,
                size=diff.size,
                delivered=delivered,
                adds=len(diff.adds),
                removes=len(diff.removes),
                invalid=len(diff.invalid),
                guarded=guard.guarded,
                full_sync=plan.full,
                eligibility=recheck.eligibility,
                sample_adds=tuple(head(diff.adds, sample_size)),
                sample_removes=tuple(head(diff.removes, sample_size)),
                resent=len(diff.existing or ()),
                from_feed=plan.from_feed,
                proceed=recheck.proceed,
                notes=tuple(notes),
            )
        finally:
            diff.close()

    # -- running ---------------------------------------------------------------

    def _environment(self) -> RunEnvironment:
        return RunEnvironment(
            storage=self.storage,
            # The engine reads the host's clock through one check: events and
            # batch contexts get UTC instants like the run records do.
            clock=UtcClock(self.clock),
            owner=self.owner,
            lease_for=self.lease_for,
            rules=self.rules,
            listeners=tuple(self._listeners),
            cohort=self.cohort,
            destination=self.destination,
            mapping=self.mapping,
            limiter=self._limiter,
            rng=self._rng,
            cache=self._cache,
            pause_after_failures=self.pause_after_failures,
            portal=self._loop.portal,
        )

    def run_due(self, *, limit: int | None = None, claim_batch: int | None = None) -> list[SyncRun]:
        """
        Claim and run every sync due now, one at a time; return the runs.

        Safe to call from several processes on one store: each due slot runs
        exactly once. A sync is run at most once per call. One sync that
        cannot be run or recorded (a damaged row, a store error on its
        record) never stops the others: it gets a failed run record with the
        error when one can be written, is logged, and the call goes on.

        Due syncs are claimed in batches, and the runs of one batch are
        recorded together (one transaction on SQLite, one round trip on
        PostgreSQL): a crash loses at most the records of the batch's
        unrecorded runs, whose slots run again when their leases expire,
        re-sending nothing that was acknowledged (see :doc:`/reliability`).

        Args:
            limit: Run at most this many.
            claim_batch: Claim this many due syncs per store round trip. By
                default it is sized from the lease: as many as this worker's
                recent runs take a quarter of ``lease_for`` to run (1 to
                64), so short runs share their store round trips while long
                ones leave the rest to other workers.
        """
        if claim_batch is not None:
            check_count("claim_batch", claim_batch, minimum=1)
            if claim_batch > MAX_CLAIM_BATCH:
                raise ConfigurationError(
                    "claim_batch", claim_batch, f"must be at most {MAX_CLAIM_BATCH:,}"
                )
        if limit is not None:
            check_count("limit", limit)
        return self._run_due(limit, claim_batch, None)

    def _run_due(
        self, limit: int | None, claim_batch: int | None, stop: threading.Event | None
    ) -> list[SyncRun]:
        """
        :meth:`run_due`, which :meth:`run_forever` also asks to stop after
        the run in progress once *stop* is set: the claims not started yet
        are given back at once, for other workers, not run first.
        """
        env = self._environment()
        runs: list[SyncRun] = []
        seen: set[str] = set()
        self._purge_if_due()
        self._rebase_if_clock_went_back()
        while (limit is None or len(runs) < limit) and not (stop is not None and stop.is_set()):
            size = self._claim_size() if claim_batch is None else claim_batch
            want = size if limit is None else min(size, limit - len(runs))
            claims = self._claim_runs(self._now(), want)
            if not claims or _Batch(self, env, claims, seen, runs, stop=stop).run():
                break
        return runs

    def _claim_runs(self, now: datetime, limit: int) -> list[Claim]:
        claim_runs = getattr(self.storage, "claim_runs", None)
        if claim_runs is None:  # a store written for 0.1
            return derive_claim_runs(self.storage, now, self.owner, self.lease_for, limit)
        claims: list[Claim] = claim_runs(now, self.owner, self.lease_for, limit)
        return claims

    def _complete_runs(self, completions: list[tuple[Lease, Completion]]) -> list[Exception | None]:
        complete_runs = getattr(self.storage, "complete_runs", None)
        if complete_runs is None:  # a store written for 0.1
            return derive_complete_runs(self.storage, completions)
        answers: list[Exception | None] = complete_runs(completions)
        return answers

    def _claim_size(self) -> int:
        """
        How many syncs to claim at once: 1 until a run has been timed, then as
        many as take a quarter of the lease by the recent average (1 to 64).
        """
        per_run = self._run_seconds
        if per_run is None:
            return 1
        quarter = self.lease_for.total_seconds() / 4
        if per_run * _MAX_CLAIM_BATCH <= quarter:
            return _MAX_CLAIM_BATCH
        return max(1, int(quarter / per_run))

    def _timed(self, started: datetime, finished: datetime) -> None:
        """Fold one run's duration (on this scheduler's clock) into the average."""
        seconds = max((finished - started).total_seconds(), 0.0)
        old = self._run_seconds
        self._run_seconds = seconds if old is None else old + (seconds - old) / 8

    def _store_runs(self, env: RunEnvironment, done: list[Completing], runs: list[SyncRun]) -> None:
        """
        Store the completions of finished runs together, then report each one
        written; *done* is emptied. A completion refused on its own (lease
        lost, slot already recorded, a store error on that record) is handled
        as a lone one would be; if the store fails as a whole, each is stored
        alone so one bad record cannot take the others with it.
        """
        if not done:
            return
        batch = list(done)
        done.clear()
        try:
            answers = self._complete_runs([(c.lease, c.completion) for c in batch])
        except Exception:  # noqa: BLE001 - nothing was written: store them one by one
            if len(batch) > 1:
                log.warning(
                    "storing %d run records together failed; storing them one by one", len(batch)
                )
            answers = [self._complete_alone(c) for c in batch]
        for completing, error in zip(batch, answers, strict=True):
            if error is None:
                runs.append(completing.report(env))
            elif isinstance(error, LeaseLostError):
                _lease_lost(completing.lease, completing.run.id, completing.destination_id)
            else:
                isolated = self._isolate(completing.lease, error)
                if isolated is not None:
                    runs.append(isolated)

    def _complete_alone(self, completing: Completing) -> Exception | None:
        try:
            self.storage.complete_run(completing.lease, completing.completion)
        except Exception as exc:  # noqa: BLE001 - answered like complete_runs does
            return exc
        return None

    def _isolate(self, lease: Lease, error: BaseException) -> SyncRun | None:
        """
        Record a run that could not be run or recorded normally as failed,
        with its error, and take it off the schedule until its next slot.
        The other due syncs go on. Returns the failed run if it was recorded.
        """
        run_id = secrets.token_hex(8)
        slot = lease.slot.isoformat()
        about = {"sync_id": lease.sync_id, "run_id": run_id, "slot": slot}

        def failed(what: str, failure: BaseException) -> None:
            log_failure(
                log, "sync %s run %s slot %s: " + what, *about.values(), error=failure, extra=about
            )

        failed("could not be completed; isolated so the other syncs run", error)
        now = self._now()
        try:
            record = self.storage.get_sync(lease.sync_id)
            earlier = self.storage.history(lease.sync_id, limit=self.pause_after_failures)
        except CohortSyncError:
            # Not even readable: its lease expires and it is tried again then
            # (every lease period, not in a loop), while get_sync/next_run
            # report the damage to the host.
            return None
        sync = record.sync
        completion = plan_isolation(
            sync,
            anchor=record.anchor,
            offset=record.offset,
            attempts=record.attempts,
            run_id=run_id,
            slot=lease.slot,
            generation=lease.generation,
            trigger=lease.trigger,
            error_type=type(error).__name__,
            message=str(error)[:2_000],
            earlier=earlier,
            pause_after=self.pause_after_failures,
            now=now,
            retry_in=self.lease_for,
        )
        try:
            self.storage.complete_run(lease, completion)
        except CohortSyncError as e:
            failed("could not record the isolated run either", e)
            return None
        return completion.run

    def _rebase_if_clock_went_back(self) -> None:
        """
        Recompute the schedule of syncs whose next run was computed on a clock
        that read later than this one (a clock pushed forward and corrected,
        or moved back): a wrong clock must not silence a sync until it is
        wrong again. Indexed and usually empty.
        """
        now = self._now()
        moved = 0
        latest: datetime | None = None
        for record in self.storage.scheduled_after(add_saturating(now, _NO_PERIOD_TOLERANCE)):
            sync = record.sync
            # Workers read a shared clock at slightly different moments: only
            # a due time more than one period ahead means the clock went back.
            period = (
                sync.policy.period if sync.effective_cadence is None else sync.cadence.period
            ) or _NO_PERIOD_TOLERANCE
            if record.next_due is None or add_saturating(record.next_due, -period) <= now:
                continue
            due: datetime | None = now
            if record.next_trigger in (Trigger.SCHEDULED, Trigger.REALTIME) and (
                sync.cadence is not Cadence.ONE_TIME
            ):
                try:
                    due = _schedule.next_slot_after(sync, record.anchor, record.offset, now)
                except (OverflowError, ValueError):
                    due = now
            if record.next_due is not None and due is not None and due >= record.next_due:
                due = record.next_due  # already sooner: only forget the future instant
            # One line per sync at DEBUG, one WARNING per round (below): a clock
            # corrected under 100,000 syncs must not write 100,000 warnings.
            log.debug(
                "sync %s: schedule computed at %s, after the clock's now (%s); next run %s -> %s",
                sync.id,
                record.scheduled_from.isoformat() if record.scheduled_from else None,
                now.isoformat(),
                record.next_due.isoformat() if record.next_due else None,
                due.isoformat() if due else None,
            )
            try:
                # At the revision read: a host call made since (a pause, a
                # "sync now") is not undone; the sync is looked at next round.
                _save_sync_at(
                    self.storage,
                    attrs.evolve(record, next_due=due, scheduled_from=now),
                    record.revision,
                )
            except (ConflictError, StorageError):
                log.warning("sync %s: rescheduling after the clock jump failed; retried", sync.id)
                continue
            if due != record.next_due:
                moved += 1
            if record.scheduled_from is not None and (
                latest is None or record.scheduled_from > latest
            ):
                latest = record.scheduled_from
        if latest is not None:
            log.warning(
                "the clock went back: schedules were computed up to %s, the clock reads %s; "
                "%d sync(s) rescheduled from now (details at DEBUG)",
                latest.isoformat(),
                now.isoformat(),
                moved,
            )

    def _purge_if_due(self) -> None:
        now = self._now()
        if self._last_purge is None or abs(now - self._last_purge) >= timedelta(hours=1):
            self._last_purge = now
            if now - datetime.min.replace(tzinfo=timezone.utc) > self.retention:
                self.storage.purge_history(now - self.retention)

    def run_forever(
        self,
        stop: threading.Event | None = None,
        *,
        idle: float = 30.0,
    ) -> None:
        """
        Run due syncs until *stop* is set; then it returns once the run in
        progress ends, giving back at once the syncs it had claimed but not
        started (another worker runs them). Between rounds it sleeps on the
        clock until the earliest of: the next due run, the expiry of a lease
        another worker holds (a crashed worker's sync becomes claimable
        then), and *idle* seconds (so syncs created by other processes are
        picked up). It never spins.
        """
        idle = check_number("idle", idle, minimum=0.0, inclusive=False)
        check_stop(stop)
        stop = stop or threading.Event()
        while not stop.is_set():
            self._run_due(None, None, stop)
            now = self._now()
            delay = poll_delay(self.storage.next_due(), now, idle)
            while delay > 0 and not stop.is_set():
                step = min(delay, 1.0)
                self.clock.sleep(step)
                delay -= step

    # -- history ---------------------------------------------------------------

    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        """
        The sync's runs, newest first.

        Raises:
            SyncNotFoundError: No such sync (like :meth:`next_run`).
            ConfigurationError: *limit* is not a whole number >= 0.
        """
        if limit is not None:
            check_count("limit", limit)
        self._require_known(sync_id)
        return self.storage.history(sync_id, limit)

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        """
        Members the destination rejected, with reasons; ``dead`` ones are no
        longer retried.

        Raises:
            SyncNotFoundError: No such sync.
        """
        self._require_known(sync_id)
        return self.storage.ledger(sync_id)

    def export_history(self, sync_id: str, *, members: bool = True) -> list[dict[str, object]]:
        """
        The history as plain dicts (JSON-ready), newest first. With *members*,
        each run of a scheduled sync lists its skipped and rejected members
        with reasons.
        """
        check_bool("members", members)
        out: list[dict[str, object]] = []
        for run in self.history(sync_id):
            # An attrs value unstructures to a dict (see _converter.unstructure).
            row = cast("dict[str, object]", unstructure(run))
            if members and run.cadence is not Cadence.REALTIME:
                row["members"] = [
                    {"key": i.key, "kind": i.kind.value, "reason": i.reason}
                    for i in self.storage.run_issues(run.id)
                ]
            out.append(row)
        return out

    def recommend(self, sync_id: str) -> Recommendation | None:
        """
        Advice for a sync from its recent history (see :func:`cohortsync.advice.recommend`).
        """
        return recommend(self.get_sync(sync_id), self.history(sync_id, limit=200))

    def close(self) -> None:
        """
        Close the store, whether the scheduler opened it (from a path, or the
        memory default) or was given it: the scheduler owns its store, as an
        ``httpx.Client`` owns the transport it is given, so the usual
        ``Scheduler(SQLiteStorage(path))`` releases its file here. Closing
        twice is harmless.

        The scheduler is unusable afterwards: its store's calls raise
        :class:`~cohortsync.exceptions.StorageClosedError`. Schedulers that
        share one store object close with it: close the store once, when the
        last of them is done.

        The event loop this scheduler started for
        :class:`~cohortsync.AsyncDestination` adapters, if any, is stopped
        first (its thread joined).
        """
        self._loop.stop()
        self.storage.close()

    def __enter__(self) -> Self:
        """
        ``with Scheduler(...) as scheduler:`` closes the store at the end of
        the block, as :meth:`close` does (a store passed in included).
        """
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _save_sync_at(store: Storage, record: SyncRecord, expected_revision: int) -> None:
    """
    The store's :meth:`~cohortsync.storage.BulkSyncWrites.save_sync_at`, or
    its derivation for a store without it (a read and ``save_sync``: not
    atomic, the race of 0.1 on such a store).
    """
    native = getattr(store, "save_sync_at", None)
    if callable(native):
        native(record, expected_revision=expected_revision)
    else:
        derive_save_sync_at(store, record, expected_revision=expected_revision)


_TICK = timedelta(microseconds=1)
_CAS_ATTEMPTS = 5
"""Reads and compare-and-set writes of one sync before a conflict is reported."""
_NO_PERIOD_TOLERANCE = timedelta(minutes=1)
"""How far ahead of the clock a due time without a period may be before it is recomputed."""
_MAX_CLAIM_BATCH = 64
"""Most syncs claimed (and recorded) in one store round trip when sized from the lease."""
MAX_CLAIM_BATCH = 10_000
"""The largest ``claim_batch`` a caller may ask for."""


class _Batch:
    """
    One claimed batch run by :meth:`Scheduler.run_due`: the runs one after
    another, their records stored together.

    Leases are claimed together, so they age together: a run slow enough to
    extend its lease (half of it gone) first stores the records waiting
    behind it and gives back the claims not started yet, for other workers
    (or the next claim) to take, before their leases can run short.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        env: RunEnvironment,
        claims: list[Claim],
        seen: set[str],
        runs: list[SyncRun],
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.env = attrs.evolve(env, on_slow=self.slow)
        self.stop = stop
        self.stopped = False
        """Whether *stop* ended the batch before its last claim."""
        self.claims = claims
        self.seen = seen
        self.runs = runs
        self.done: list[Completing] = []
        self.next = 0
        """Index of the first claim not started yet."""

    def run(self) -> bool:
        """Run the batch; return whether run_due stops (a sync came due again, or a stop)."""
        try:
            return self._run()
        finally:
            # The environment calls back into this batch: drop it, so the
            # batch leaves no reference cycle for the garbage collector.
            self.env = self.scheduler._environment()  # noqa: SLF001

    def _run(self) -> bool:
        scheduler = self.scheduler
        repeat = False
        since: datetime | None = None
        half_lease = scheduler.lease_for / 2
        quarter_lease = scheduler.lease_for / 4
        while self._more():
            claim = self.claims[self.next]
            self.next += 1
            lease = claim.lease
            if lease.sync_id in self.seen:
                # Due again already (the clock does not move): leave it for the next call.
                _release(scheduler.storage, lease)
                repeat = True
                continue
            started = scheduler._now()  # noqa: SLF001 - the scheduler's own helper
            if self.next > 1 and started >= lease.expires_at - half_lease:
                # Waited too long behind the others: give it and the rest back.
                self.next -= 1
                self.slow()
                break
            self.seen.add(lease.sync_id)
            finished: datetime | None = None
            try:
                completing = prepare(self.env, claim, started=started)
                self.done.append(completing)
                # The run read the clock as it finished: no need to read it again.
                finished = completing.completion.run.finished_at
            except RunCancelled:
                # The run gave its own lease back: store what finished before
                # it, give back the claims not started, and stop.
                self.slow()
                raise
            except LeaseLostError as lost:
                record = claim.record
                _lease_lost(
                    lease, lost.run_id, None if record is None else record.sync.destination_id
                )
            except Exception as exc:  # noqa: BLE001 - isolated, recorded, logged
                self.store()
                isolated = scheduler._isolate(lease, exc)  # noqa: SLF001
                if isolated is not None:
                    self.runs.append(isolated)
            if finished is None:
                finished = scheduler._now()  # noqa: SLF001
            scheduler._timed(started, finished)  # noqa: SLF001
            since = since or started
            if self.done and finished - since >= quarter_lease:
                # Runs are taking long: record these before their leases run short.
                self.store()
                since = None
        self.store()
        return repeat or self.stopped

    def _more(self) -> bool:
        """Whether a claim is left to run; none once *stop* is set."""
        if self.next >= len(self.claims):
            return False
        if self.stop is not None and self.stop.is_set():
            # Give back what has not started, now, rather than run it first:
            # a worker told to stop may be killed soon after, and these
            # would then wait for their leases to expire.
            self.give_back()
            self.stopped = True
            return False
        return True

    def store(self) -> None:
        self.scheduler._store_runs(self.env, self.done, self.runs)  # noqa: SLF001

    def slow(self) -> None:
        """
        The run in progress is extending its lease: store the records waiting
        behind it and give back the claims not started yet.
        """
        # The first claim always runs (it has not waited), so a batch never
        # gives everything back and run_due always makes progress.
        self.next = max(self.next, 1)
        self.give_back()

    def give_back(self) -> None:
        """Store the records waiting, and give back the claims not started yet."""
        self.store()
        storage = self.scheduler.storage
        for claim in self.claims[self.next :]:
            if claim.lease.sync_id not in self.seen:
                _release(storage, claim.lease)
        del self.claims[self.next :]


def check_stop(stop: object, *, awaitable: bool = False) -> None:
    """
    Refuse a ``run_forever`` *stop* that is not an event (a typo would
    otherwise fail at its first use, deep in the loop). The asynchronous
    scheduler awaits its ``wait()``: a ``threading.Event`` there would block
    the event loop.
    """
    if stop is None:
        return
    if not callable(getattr(stop, "is_set", None)):
        kind = "an asyncio.Event" if awaitable else "an event with is_set()"
        raise ConfigurationError("stop", stop, f"must be {kind}, not {type(stop).__name__}")
    if awaitable and not inspect.iscoroutinefunction(getattr(stop, "wait", None)):
        raise ConfigurationError(
            "stop",
            stop,
            f"must be an asyncio.Event (its wait() awaited), not {type(stop).__name__}",
        )


def poll_delay(due: datetime | None, now: datetime, idle: float) -> float:
    """
    How long a ``run_forever`` waits before its next round: until *due* (the
    store's next due instant or lease expiry), at most *idle* seconds.
    """
    if due is None:
        return idle
    delay = min(idle, (due - now).total_seconds())
    # Claimable already (a slot fell due while a run ran, a lease was
    # released): go round after a short pause, never a spin.
    return delay if delay > 0 else _MIN_SLEEP


def _lease_lost(lease: Lease, run_id: str | None, destination_id: str | None = None) -> None:
    """Log a run given up because another worker took its lease over."""
    fields = {"sync_id": lease.sync_id, "run_id": run_id, "slot": lease.slot.isoformat()}
    if destination_id is not None:
        fields["destination_id"] = destination_id
    log.warning(
        "sync %s run %s slot %s: lost the lease mid-run; another worker has it",
        lease.sync_id,
        run_id,
        lease.slot.isoformat(),
        extra=fields,
    )


def _release(storage: Storage, lease: Lease) -> None:
    with contextlib.suppress(LeaseLostError):
        storage.release_lease(lease)


_MIN_SLEEP = 0.05
"""Shortest sleep of run_forever when a due sync cannot be claimed yet."""
_SYNC_FIELDS = frozenset({"status", "status_reason", "guard_released", "effective_cadence"})
_IDENTITY = IdentifierMapping.identity()
