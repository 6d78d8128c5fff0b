"""
The :class:`Scheduler`: the object a host builds in every worker process.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

import attrs

from cohortsync import _schedule
from cohortsync._advice import Recommendation, recommend
from cohortsync._cache import DeliveredCache
from cohortsync._clock import Clock, SystemClock, require_aware
from cohortsync._cohort import Cohort
from cohortsync._converter import unstructure
from cohortsync._delivery import RateLimiter, shared_limiter
from cohortsync._destination import Capabilities, Destination
from cohortsync._diff import diff_snapshot, head
from cohortsync._eligibility import DEFAULT_RULES, Eligibility, Ruleset, check_eligibility
from cohortsync._events import Listener
from cohortsync._identifiers import IdentifierMapping
from cohortsync._policy import Cadence, OnDelete, SyncPolicy
from cohortsync._run import RunEnvironment, execute, next_due_after
from cohortsync._storage import LedgerEntry, Storage, SyncRecord
from cohortsync._sync import Sync, SyncRun, SyncStatus, Trigger
from cohortsync._validators import check_count, check_id
from cohortsync.exceptions import (
    CohortNotFoundError,
    ConfigurationError,
    DestinationNotFoundError,
    IneligibleSyncError,
    LeaseLostError,
    SourceError,
)

__all__ = ["Preview", "Scheduler", "Upcoming"]

log = logging.getLogger("cohortsync")

SLOT_BUCKET_SECONDS = 60
"""The load-aware allocator balances syncs per minute of the period."""

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
    delivered: int
    adds: int
    removes: int
    invalid: int
    guarded: bool
    full_sync: bool
    eligibility: Eligibility
    sample_adds: tuple[str, ...] = attrs.field(repr=False)
    sample_removes: tuple[str, ...] = attrs.field(repr=False)


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _default_storage() -> Storage:
    from cohortsync.sqlite import SQLiteStorage  # noqa: PLC0415 - only when no store is given

    return SQLiteStorage("cohortsync.db")


class Scheduler:
    """
    Registers syncs, decides when they run, runs them and records history.

    Every worker process builds the same scheduler: same storage, and the
    same cohorts, destinations and identifier mappings registered under the
    same ids. The store holds only ids and state, so any worker can run any
    sync. Nothing runs in the background: call :meth:`run_due` from your own
    loop, cron job or task queue, or :meth:`run_forever` to block.

    Args:
        storage: Where everything persists. Defaults to
            ``SQLiteStorage("cohortsync.db")`` in the working directory.
        clock: Where time comes from (``FakeClock`` in tests).
        owner: This worker's name on leases (default: host, pid, random).
        lease_for: How long a claimed run is reserved before another worker
            may take it over; extended while the run makes progress.
        rules: Eligibility rules (default: the product rules).
        retention: How long run history is kept.
        slot_allocation: ``"balanced"`` (default) reads slot occupancy from
            the store so each minute of the period holds as many syncs as any
            other; ``"hash"`` derives the slot from the sync id alone.
        listeners: Callables receiving every event (``RunStarted``,
            ``BatchDelivered``, ``RunFinished``, ``SyncFailed``,
            ``EligibilityChanged``, ``GuardTripped``).
        seed: Seed for backoff jitter (tests); ``None`` is random.
        state_cache_keys: Most member keys this worker keeps in memory as
            copies of recently delivered states, so a steady-state run of a
            large cohort diffs in memory instead of re-reading every delivered
            row. Each copy is validated against the store's version token
            before use. ``0`` turns it off; sorted sources never use it.
    """

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        clock: Clock | None = None,
        owner: str | None = None,
        lease_for: timedelta = timedelta(minutes=5),
        rules: Ruleset = DEFAULT_RULES,
        retention: timedelta = timedelta(days=14),
        slot_allocation: str = "balanced",
        listeners: Iterable[Listener] = (),
        seed: int | None = None,
        state_cache_keys: int = 5_000_000,
    ) -> None:
        if slot_allocation not in ("balanced", "hash"):
            raise ConfigurationError(
                "slot_allocation", slot_allocation, "must be 'balanced' or 'hash'"
            )
        if not isinstance(lease_for, timedelta) or lease_for <= timedelta(0):
            raise ConfigurationError("lease_for", lease_for, "must be a positive timedelta")
        if not isinstance(retention, timedelta) or retention <= timedelta(0):
            raise ConfigurationError("retention", retention, "must be a positive timedelta")
        self.storage: Storage = storage if storage is not None else _default_storage()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.owner = owner or _default_owner()
        self.lease_for = lease_for
        self.rules = rules
        self.retention = retention
        self.slot_allocation = slot_allocation
        self._listeners: list[Listener] = list(listeners)
        self._cohorts: dict[str, Cohort] = {}
        self._destinations: dict[str, Destination] = {}
        self._mappings: dict[str, IdentifierMapping] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._limiters_lock = threading.Lock()
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not secrets
        check_count("state_cache_keys", state_cache_keys)
        self._cache = DeliveredCache(state_cache_keys) if state_cache_keys else None
        self._last_purge: datetime | None = None

    def __repr__(self) -> str:
        return (
            f"Scheduler(storage={self.storage!r}, clock={self.clock!r}, owner={self.owner!r}, "
            f"cohorts={len(self._cohorts)}, destinations={len(self._destinations)})"
        )

    # -- registration --------------------------------------------------------

    def add_cohort(self, cohort: Cohort) -> Cohort:
        """
        Register (or replace) a cohort and its membership source under ``cohort.id``.
        """
        if not isinstance(cohort, Cohort):
            raise ConfigurationError("cohort", cohort, "must be a cohortsync.Cohort")
        self._cohorts[cohort.id] = cohort
        return cohort

    def add_destination(self, destination_id: str, destination: Destination) -> Destination:
        """
        Register (or replace) a destination adapter under *destination_id*.
        """
        check_id("destination_id", destination_id)
        if not isinstance(destination, Destination):
            raise ConfigurationError(
                "destination",
                destination,
                "must be an instance of a cohortsync.Destination subclass",
            )
        self._destinations[destination_id] = destination
        return destination

    def add_mapping(self, mapping_id: str, mapping: IdentifierMapping) -> IdentifierMapping:
        """
        Register an identifier mapping that syncs can name with ``mapping_id=``.
        """
        check_id("mapping_id", mapping_id)
        if not isinstance(mapping, IdentifierMapping):
            raise ConfigurationError("mapping", mapping, "must be a cohortsync.IdentifierMapping")
        self._mappings[mapping_id] = mapping
        return mapping

    def add_listener(self, listener: Listener) -> None:
        """
        Receive every event this scheduler emits.
        """
        self._listeners.append(listener)

    def cohort(self, cohort_id: str) -> Cohort:
        check_id("cohort_id", cohort_id)
        try:
            return self._cohorts[cohort_id]
        except KeyError:
            raise CohortNotFoundError(cohort_id) from None

    def destination(self, destination_id: str) -> Destination:
        check_id("destination_id", destination_id)
        try:
            return self._destinations[destination_id]
        except KeyError:
            raise DestinationNotFoundError(destination_id) from None

    def mapping(self, mapping_id: str | None) -> IdentifierMapping:
        if mapping_id is None:
            return _IDENTITY
        check_id("mapping_id", mapping_id)
        try:
            return self._mappings[mapping_id]
        except KeyError:
            raise ConfigurationError(
                "mapping_id", mapping_id, "no identifier mapping registered with this id"
            ) from None

    def _limiter(self, destination_id: str, caps: Capabilities) -> RateLimiter | None:
        if caps.rate_limit is None:
            return None
        limiter = shared_limiter(destination_id, caps.rate_limit, self.clock)
        with self._limiters_lock:
            # Hold it: the process-wide registry keeps limiters only while used.
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

    def _now(self) -> datetime:
        return require_aware(self.clock.now(), "clock.now()")

    def _slot(self, sync_id: str, generation: int, policy: SyncPolicy) -> tuple[int, int | None]:
        period = _schedule.period_seconds(policy.cadence)
        if policy.cadence not in (Cadence.HOURLY, Cadence.DAILY) or period is None:
            return 0, None
        preferred = _schedule.stable_offset(f"{sync_id}:{generation}", period)
        if self.slot_allocation == "hash":
            return preferred, None
        buckets = period // SLOT_BUCKET_SECONDS
        bucket = self.storage.allocate_slot(period, buckets, preferred // SLOT_BUCKET_SECONDS)
        return bucket * SLOT_BUCKET_SECONDS + preferred % SLOT_BUCKET_SECONDS, bucket

    def _release_slot(self, record: SyncRecord) -> None:
        period = _schedule.period_seconds(record.sync.policy.cadence)
        if record.slot_bucket is not None and period is not None:
            self.storage.release_slot(period, record.slot_bucket)

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
        offset, bucket = self._slot(sync.id, sync.generation, policy)
        record = SyncRecord(
            sync=sync,
            next_due=now,
            next_trigger=self._first_trigger(policy),
            offset=offset,
            slot_bucket=bucket,
            anchor=now,
        )
        try:
            self.storage.create_sync(record)
        except Exception:
            if bucket is not None:
                self._release_slot(record)
            raise
        return sync

    def get_sync(self, sync_id: str) -> Sync:
        """
        Raises:
            SyncNotFoundError: No such sync.
        """
        return self.storage.get_sync(sync_id).sync

    def syncs(self) -> list[Sync]:
        """
        Every sync in the store, ordered by id.
        """
        return [r.sync for r in self.storage.list_syncs()]

    def update_sync(
        self,
        sync_id: str,
        policy: SyncPolicy | None = None,
        *,
        mapping_id: str | None = None,
    ) -> Sync:
        """
        Change a sync's policy (and mapping): a new generation, a new slot, and
        a run due immediately.

        Raises:
            IneligibleSyncError: The new definition is not eligible (nothing changes).
            ConflictError: Someone else changed the sync at the same time.
        """
        record = self.storage.get_sync(sync_id)
        old = record.sync
        policy = policy or old.policy
        mapping_id = mapping_id if mapping_id is not None else old.mapping_id
        self._require_eligible(old.cohort_id, old.destination_id, policy, mapping_id)
        now = self._now()
        sync = attrs.evolve(
            old,
            policy=policy,
            mapping_id=mapping_id,
            generation=old.generation + 1,
            status=SyncStatus.ACTIVE,
            status_reason=None,
            effective_cadence=None,
            updated_at=now,
        )
        offset, bucket = self._slot(sync.id, sync.generation, policy)
        new = attrs.evolve(
            record,
            sync=sync,
            next_due=now,
            next_trigger=self._first_trigger(policy),
            offset=offset,
            slot_bucket=bucket,
            anchor=now,
            attempts=0,
        )
        self.storage.save_sync(new, expected_generation=old.generation)
        self._release_slot(record)
        return sync

    def _change(self, sync_id: str, **changes: object) -> Sync:
        record = self.storage.get_sync(sync_id)
        sync_changes = {k: v for k, v in changes.items() if k in _SYNC_FIELDS}
        record_changes = {k: v for k, v in changes.items() if k not in _SYNC_FIELDS}
        sync = attrs.evolve(record.sync, updated_at=self._now(), **sync_changes)  # type: ignore[arg-type]
        self.storage.save_sync(
            attrs.evolve(record, sync=sync, **record_changes),  # type: ignore[arg-type]
            expected_generation=record.sync.generation,
        )
        return sync

    def _due_now(self, record: SyncRecord) -> datetime:
        """
        When a run the host asks for is due: now, unless the sync already has a
        run at this very instant (a fake clock that has not moved, a coarse
        system clock). A run record is unique on (sync, slot), so that run is
        due one tick later instead of colliding with the earlier one forever.
        """
        now = self._now()
        taken = [run.slot for run in self.storage.history(record.id, limit=1)]
        if record.lease is not None:
            taken.append(record.lease.slot)
        latest = max(taken, default=None)
        return now if latest is None or latest < now else latest + _TICK

    @staticmethod
    def _host_trigger(record: SyncRecord) -> Trigger:
        """
        The trigger of a run the host asks for. A sync being deleted stays on
        its removal run: a normal run would deliver the members again.
        """
        return Trigger.TEARDOWN if record.next_trigger is Trigger.TEARDOWN else Trigger.MANUAL

    def pause_sync(self, sync_id: str, reason: str | None = None) -> Sync:
        """
        Stop scheduling a sync until :meth:`resume_sync`.
        """
        return self._change(sync_id, status=SyncStatus.PAUSED, status_reason=reason or "paused")

    def resume_sync(self, sync_id: str) -> Sync:
        """
        Resume a paused (or failed) sync; it runs immediately, then on its slots.
        """
        record = self.storage.get_sync(sync_id)
        if record.sync.status is SyncStatus.DELETED:
            raise ConfigurationError("sync_id", sync_id, "a deleted sync cannot be resumed")
        return self._change(
            sync_id,
            status=SyncStatus.ACTIVE,
            status_reason=None,
            next_due=self._due_now(record),
            next_trigger=self._host_trigger(record),
            attempts=0,
        )

    def sync_now(self, sync_id: str, *, full: bool = False) -> Sync:
        """
        Make a sync due now ("sync now"). With *full*, the run re-sends the
        whole membership (a full resync) instead of the diff.
        """
        record = self.storage.get_sync(sync_id)
        if record.sync.status is SyncStatus.DELETED:
            raise ConfigurationError("sync_id", sync_id, "a deleted sync cannot run")
        changes: dict[str, object] = {
            "next_due": self._due_now(record),
            "next_trigger": self._host_trigger(record),
            "full_resync": full or record.full_resync,
        }
        if record.sync.status in (SyncStatus.COMPLETED, SyncStatus.FAILED):
            changes.update(status=SyncStatus.ACTIVE, status_reason=None, attempts=0)
        return self._change(sync_id, **changes)

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
        record = self.storage.get_sync(sync_id)
        return self._change(
            sync_id,
            guard_released=True,
            next_due=self._due_now(record),
            next_trigger=self._host_trigger(record),
        )

    def delete_sync(self, sync_id: str) -> Sync:
        """
        Delete a sync. With ``OnDelete.LEAVE`` (default) the destination keeps
        what it has; with ``OnDelete.REMOVE_DELIVERED`` a final run removes
        exactly what this sync delivered, then the sync is ``deleted``.
        """
        record = self.storage.get_sync(sync_id)
        self._release_slot(record)
        remove = (
            record.sync.policy.on_delete is OnDelete.REMOVE_DELIVERED
            and self.storage.count_delivered(sync_id) > 0
        )
        if remove:
            return self._change(
                sync_id,
                status=SyncStatus.ACTIVE,
                status_reason="deleting: removing delivered members",
                next_due=self._due_now(record),
                next_trigger=Trigger.TEARDOWN,
                slot_bucket=None,
            )
        return self._change(
            sync_id,
            status=SyncStatus.DELETED,
            status_reason="deleted",
            next_due=None,
            slot_bucket=None,
        )

    # -- when ------------------------------------------------------------------

    def next_run(self, sync_id: str) -> datetime | None:
        """
        When the sync is next due, or ``None`` if nothing is scheduled.
        """
        record = self.storage.get_sync(sync_id)
        return record.next_due if record.sync.status is SyncStatus.ACTIVE else None

    def upcoming(self, until: datetime) -> list[Upcoming]:
        """
        Every run due up to *until* (inclusive), earliest first, assuming each
        run starts on time.
        """
        until = require_aware(until, "until")
        out: list[Upcoming] = []
        for record in self.storage.list_syncs():
            if record.sync.status is not SyncStatus.ACTIVE or record.next_due is None:
                continue
            at: datetime | None = record.next_due
            trigger = record.next_trigger
            for _ in range(MAX_UPCOMING_PER_SYNC):
                if at is None or at > until:
                    break
                out.append(Upcoming(at, record.id, trigger))
                if record.sync.policy.cadence is Cadence.ONE_TIME or trigger is Trigger.TEARDOWN:
                    break
                at = next_due_after(record, record.sync, at)
                trigger = Trigger.SCHEDULED
        out.sort(key=lambda u: (u.at, u.sync_id))
        return out

    # -- what ------------------------------------------------------------------

    def preview(self, sync_id: str, *, sample_size: int = 10) -> Preview:
        """
        What a run would add and remove now, without sending anything.

        Raises:
            SourceError: The membership source failed.
        """
        record = self.storage.get_sync(sync_id)
        sync = record.sync
        cohort = self.cohort(sync.cohort_id)
        caps = self.destination(sync.destination_id).capabilities
        if cohort.source is None:
            raise SourceError(cohort.id, "the cohort has no membership source registered")
        delivered = self.storage.count_delivered(sync_id)
        diff = diff_snapshot(
            cohort.source,
            cohort.id,
            self.storage.iter_delivered(sync_id),
            delivered,
            keep_existing=False,
            exclude=self.storage.dead_letters(sync_id),
        )
        removing = len(diff.removes) if sync.policy.send_removals and caps.supports_removals else 0
        guarded = not sync.guard_released and sync.policy.guard.trips(
            delivered, removing, diff.source_empty
        )
        eligibility = check_eligibility(
            cohort.with_size(diff.size),
            caps,
            sync.policy,
            identifier_kinds=self.mapping(sync.mapping_id).kinds,
            rules=self.rules,
        )
        return Preview(
            sync_id=sync_id,
            size=diff.size,
            delivered=delivered,
            adds=len(diff.adds),
            removes=len(diff.removes),
            invalid=len(diff.invalid),
            guarded=guarded,
            full_sync=record.full_resync or caps.full_sync_only,
            eligibility=eligibility,
            sample_adds=tuple(head(diff.adds, sample_size)),
            sample_removes=tuple(head(diff.removes, sample_size)),
        )

    # -- running ---------------------------------------------------------------

    def _environment(self) -> RunEnvironment:
        return RunEnvironment(
            storage=self.storage,
            clock=self.clock,
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
        )

    def run_due(self, *, limit: int | None = None, claim_batch: int = 1) -> list[SyncRun]:
        """
        Claim and run every sync due now, one at a time; return the runs.

        Safe to call from several processes on one store: each due slot runs
        exactly once. A sync is run at most once per call.

        Args:
            limit: Run at most this many.
            claim_batch: Claim this many due syncs per store round trip (a
                throughput knob for many short runs; keep 1 for long runs so
                other workers can take the rest).
        """
        env = self._environment()
        runs: list[SyncRun] = []
        seen: set[str] = set()
        self._purge_if_due()
        while limit is None or len(runs) < limit:
            want = claim_batch if limit is None else min(claim_batch, limit - len(runs))
            leases = self.storage.claim_due(self._now(), self.owner, self.lease_for, want)
            if not leases:
                break
            repeat = False
            for lease in leases:
                if lease.sync_id in seen:
                    # Due again already (the clock does not move): leave it for the next call.
                    self.storage.release_lease(lease)
                    repeat = True
                    continue
                seen.add(lease.sync_id)
                try:
                    runs.append(execute(env, lease))
                except LeaseLostError:
                    log.warning(
                        "lost the lease on sync %s mid-run; another worker has it", lease.sync_id
                    )
            if repeat:
                break
        return runs

    def _purge_if_due(self) -> None:
        now = self._now()
        if self._last_purge is None or now - self._last_purge >= timedelta(hours=1):
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
        Run due syncs until *stop* is set, sleeping on the clock until the next
        due time (at most *idle* seconds, so syncs created by other processes
        are picked up).
        """
        stop = stop or threading.Event()
        while not stop.is_set():
            self.run_due()
            now = self._now()
            due = [
                r.next_due
                for r in self.storage.list_syncs()
                if r.sync.status is SyncStatus.ACTIVE and r.next_due is not None
            ]
            delay = idle
            if due:
                delay = min(idle, max(0.0, (min(due) - now).total_seconds()))
            while delay > 0 and not stop.is_set():
                step = min(delay, 1.0)
                self.clock.sleep(step)
                delay -= step

    # -- history ---------------------------------------------------------------

    def history(self, sync_id: str, limit: int | None = None) -> list[SyncRun]:
        """
        The sync's runs, newest first.
        """
        return self.storage.history(sync_id, limit)

    def ledger(self, sync_id: str) -> list[LedgerEntry]:
        """
        Members the destination rejected, with reasons; ``dead`` ones are no
        longer retried.
        """
        return self.storage.ledger(sync_id)

    def export_history(self, sync_id: str, *, members: bool = True) -> list[dict[str, object]]:
        """
        The history as plain dicts (JSON-ready), newest first. With *members*,
        each run of a scheduled sync lists its skipped and rejected members
        with reasons.
        """
        out: list[dict[str, object]] = []
        for run in self.history(sync_id):
            row: dict[str, object] = unstructure(run)
            if members and run.cadence is not Cadence.REALTIME:
                row["members"] = [
                    {"key": i.key, "kind": i.kind, "reason": i.reason}
                    for i in self.storage.run_issues(run.id)
                ]
            out.append(row)
        return out

    def recommend(self, sync_id: str) -> Recommendation | None:
        """
        Advice for a sync from its recent history (see :func:`cohortsync.recommend`).
        """
        return recommend(self.get_sync(sync_id), self.history(sync_id, limit=200))

    def close(self) -> None:
        self.storage.close()


_TICK = timedelta(microseconds=1)
_SYNC_FIELDS = frozenset({"status", "status_reason", "guard_released", "effective_cadence"})
_IDENTITY = IdentifierMapping.identity()
