"""
The sample host's tests: its adapter, its store and its syncs, checked with
nothing but cohortsync's public API and ``cohortsync.testing``.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta

import pytest

import cohortsync as cs
from cohortsync.exceptions import (
    AuthenticationError,
    BadDataError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from cohortsync.storage import Storage
from cohortsync.testing import (
    ErrorCase,
    FakeClock,
    Fault,
    FaultyDestination,
    MemoryStorage,
    RecordingDestination,
    check_destination,
    check_storage,
    simulate,
)
from host_project.adapters import PushAudience
from host_project.fakes import POWER_USERS, FakePushClient
from host_project.storage import AuditedStorage, DictStorage


def make_push() -> PushAudience:
    return PushAudience(FakePushClient())


def client(dest: PushAudience) -> FakePushClient:
    assert isinstance(dest.client, FakePushClient)
    return dest.client


def failing(status: int) -> ErrorCase[PushAudience]:
    return ErrorCase(_error_for(status), lambda dest: client(dest).fail_next(status))


def _error_for(status: int) -> type[cs.exceptions.DeliveryError]:
    return {
        429: RateLimitedError,
        503: TransientError,
        401: AuthenticationError,
        422: BadDataError,
        404: PermanentError,
    }[status]


def refuse(dest: PushAudience, users: Collection[str]) -> None:
    client(dest).refuse(users)


class TestPushAudienceContract:
    def test_keeps_the_destination_contract(self) -> None:
        """The adapter passes every check of the destination contract."""
        report = check_destination(
            make_push,
            observe=lambda dest: [len(users) for _, users in client(dest).requests],
            remote_members=lambda dest, ctx: client(dest).segments.get(
                f"cohort-{ctx.cohort_id}", set()
            ),
            errors={
                **{f"HTTP {s}": failing(s) for s in (429, 503, 401, 422, 404)},
                "timeout": ErrorCase(TransientError, lambda d: client(d).time_out_next()),
            },
            reject=refuse,
        )

        assert {} == dict(report.skipped)


class TestAuditedStorageContract:
    def test_keeps_the_storage_contract(self) -> None:
        """The audited wrapper behaves exactly like the store it wraps, queries included."""
        report = check_storage(lambda: AuditedStorage(MemoryStorage(), tenant="acme"))

        assert () == report.derived


class TestDictStorage:
    """
    A store written on StorageBase with the required parts only keeps the contract and runs syncs.
    """

    def test_keeps_the_storage_contract(self) -> None:
        """Every check passes, with every optional query derived."""
        report = check_storage(DictStorage)

        assert {"native"} == {
            report.parts[p] for p in ("ScheduleStore", "DeliveryStore", "HistoryStore")
        }
        assert 16 == len(report.derived)  # 7 queries, 2 batched runs, 2 paged reads, 5 bulk writes

    def test_a_week_of_hourly_syncs(
        self, cohortsync_clock: FakeClock, push_client: FakePushClient
    ) -> None:
        """The scheduler runs on it, using the queries StorageBase derives."""
        scheduler = cs.Scheduler(DictStorage(), clock=cohortsync_clock, seed=0)
        scheduler.add_destination("push", PushAudience(push_client))
        scheduler.add_cohort(cs.Cohort(id="power-users", name="P", source=lambda: POWER_USERS))
        sync = scheduler.create_sync("power-users", "push", cs.SyncPolicy.hourly())

        runs = simulate(scheduler, span=timedelta(days=7))

        assert 1 + 7 * 24 == len(runs)
        assert set(POWER_USERS) == push_client.segments["cohort-power-users"]
        assert len(POWER_USERS) == scheduler.storage.count_delivered(sync.id)


class TestPowerUsersSync:
    def test_a_week_of_hourly_syncs(
        self, cohortsync_scheduler: cs.Scheduler, push: PushAudience, push_client: FakePushClient
    ) -> None:
        """An hourly sync runs once at creation and once an hour, and the segment matches."""
        sync = cohortsync_scheduler.create_sync("power-users", "push", cs.SyncPolicy.hourly())

        runs = simulate(cohortsync_scheduler, span=timedelta(days=7))

        assert 1 + 7 * 24 == len(runs)
        assert [len(POWER_USERS)] + [0] * (len(runs) - 1) == [r.added for r in runs]
        assert set(POWER_USERS) == push_client.segments["cohort-power-users"]
        assert runs[0].id == cohortsync_scheduler.history(sync.id)[-1].id

    def test_uses_the_kit_fixtures(
        self,
        cohortsync_clock: FakeClock,
        cohortsync_storage: Storage,
        cohortsync_scheduler: cs.Scheduler,
        cohortsync_recording_destination: RecordingDestination,
    ) -> None:
        """The kit's fixtures are wired together: one clock, one store."""
        assert cohortsync_scheduler.clock is cohortsync_clock
        assert cohortsync_scheduler.storage is cohortsync_storage
        cohortsync_scheduler.add_destination("recording", cohortsync_recording_destination)
        cohortsync_scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: {"a"}))
        cohortsync_scheduler.create_sync("c", "recording", cs.SyncPolicy.daily())

        assert 1 + 3 == len(simulate(cohortsync_scheduler, span=timedelta(days=3)))
        assert {"a"} == cohortsync_recording_destination.members

    def test_audit_trail_of_a_day(
        self, cohortsync_clock: FakeClock, push_client: FakePushClient
    ) -> None:
        """On the host's own store, every run leaves claim and completion in the audit."""
        storage = AuditedStorage(MemoryStorage(), tenant="acme")
        scheduler = cs.Scheduler(storage, clock=cohortsync_clock, seed=0)
        scheduler.add_destination("push", PushAudience(push_client))
        scheduler.add_cohort(cs.Cohort(id="power-users", name="P", source=lambda: POWER_USERS))
        scheduler.create_sync("power-users", "push", cs.SyncPolicy.daily(), sync_id="daily")

        runs = simulate(scheduler, span=timedelta(days=1))

        completions = [e for e in storage.audit if e[0] == "complete_run"]
        assert [("complete_run", "acme/daily")] * len(runs) == completions
        assert 2 == len(runs)


class TestWhenThePushProviderMisbehaves:
    @pytest.fixture
    def faulty(self, cohortsync_scheduler: cs.Scheduler) -> FaultyDestination:
        cohortsync_scheduler.add_cohort(
            cs.Cohort(id="power-users", name="P", source=lambda: POWER_USERS)
        )
        return FaultyDestination(PushAudience.capabilities)

    def test_timeouts_are_retried(
        self, cohortsync_scheduler: cs.Scheduler, faulty: FaultyDestination
    ) -> None:
        """Two timeouts in a row cost two retries, not the run."""
        faulty.script.update({0: Fault.timeout(), 1: Fault.timeout()})
        cohortsync_scheduler.add_destination("push", faulty)
        cohortsync_scheduler.create_sync(
            "power-users", "push", cs.SyncPolicy.one_time(), sync_id="once"
        )

        (run,) = simulate(cohortsync_scheduler, span=timedelta(hours=1))

        assert (cs.RunStatus.SUCCEEDED, 2) == (run.status, run.retries)
        assert set(POWER_USERS) == faulty.audience("once")

    def test_revoked_credentials_pause_the_sync(
        self, cohortsync_scheduler: cs.Scheduler, faulty: FaultyDestination
    ) -> None:
        """A 401 pauses the sync instead of retrying all week."""
        faulty.always = Fault.auth()
        cohortsync_scheduler.add_destination("push", faulty)
        cohortsync_scheduler.create_sync(
            "power-users", "push", cs.SyncPolicy.hourly(), sync_id="hourly"
        )

        runs = simulate(cohortsync_scheduler, span=timedelta(days=7))

        assert [cs.RunStatus.FAILED] == [r.status for r in runs]
        assert cs.SyncStatus.PAUSED == cohortsync_scheduler.get_sync("hourly").status

    def test_refused_devices_are_ledgered(
        self, cohortsync_scheduler: cs.Scheduler, faulty: FaultyDestination
    ) -> None:
        """Members the provider refuses end up in the ledger, the rest are delivered."""
        faulty.script[0] = Fault.reject(identifiers=["u2"], reason="unknown device")
        cohortsync_scheduler.add_destination("push", faulty)
        cohortsync_scheduler.create_sync(
            "power-users", "push", cs.SyncPolicy.one_time(), sync_id="once"
        )

        (run,) = simulate(cohortsync_scheduler, span=timedelta(minutes=5))

        assert (cs.RunStatus.PARTIAL, 3, 1) == (run.status, run.added, run.rejected)
        assert ["u2"] == [entry.key for entry in cohortsync_scheduler.ledger("once")]
        assert set(POWER_USERS) - {"u2"} == faulty.audience("once")
