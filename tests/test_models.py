"""
The domain model: every validator refuses a bad value with a typed error naming
the field and the value, good values behave, and reprs help without leaking.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import AsyncIterator
from datetime import datetime, time, timedelta, timezone
from typing import Any, get_args
from zoneinfo import ZoneInfo

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cohortsync
from cohortsync import (
    Batch,
    Cadence,
    CallableSource,
    Capabilities,
    Changes,
    Cohort,
    CohortType,
    FirstRun,
    Identifier,
    IdentifierKind,
    MassRemovalGuard,
    Member,
    OnDelete,
    OnIneligible,
    Operation,
    RateLimit,
    Rejection,
    RetryPolicy,
    RunContext,
    RunStatus,
    StaticSource,
    Sync,
    SyncPolicy,
    SyncRun,
    SyncStatus,
    Trigger,
    Weekday,
    _cohort,
    _destination,
    _policy,
)
from cohortsync.exceptions import CohortSyncError, ConfigurationError
from cohortsync.storage import IssueKind, MemberIssue

UTC = timezone.utc
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
NAIVE = datetime(2030, 1, 1, 12, 0)  # noqa: DTZ001 - the point of these tests

#: Valid keyword arguments for each validated class; each bad-value case
#: replaces one of them.
VALID: dict[type, dict[str, Any]] = {
    Cohort: {"id": "power-users", "name": "Power users"},
    Capabilities: {},
    RateLimit: {"requests": 10, "per_seconds": 1.0},
    MassRemovalGuard: {},
    RetryPolicy: {},
    SyncPolicy: {"cadence": "hourly"},
    Sync: {
        "id": "s1",
        "cohort_id": "power-users",
        "destination_id": "push",
        "policy": SyncPolicy.hourly(),
        "created_at": NOW,
        "updated_at": NOW,
    },
    SyncRun: {
        "id": "r1",
        "sync_id": "s1",
        "generation": 1,
        "trigger": "scheduled",
        "slot": NOW,
        "started_at": NOW,
        "finished_at": NOW,
        "status": "succeeded",
        "cadence": "hourly",
    },
    Identifier: {"kind": "email", "value": "ada@example.com"},
    Changes: {"added": (), "removed": (), "cursor": "0"},
    StaticSource: {"keys": ()},
}

NAN = float("nan")
INF = float("inf")

BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("\t", id="tab-only"),
    pytest.param("a" * 201, id="too-long"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\x1bb", id="escape"),
    pytest.param("a\x7fb", id="del"),
    pytest.param("a\x85b", id="c1-next-line"),
    pytest.param(7, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"bytes", id="bytes"),
]
ID_FIELDS = [
    (Cohort, "id"),
    (Sync, "id"),
    (Sync, "cohort_id"),
    (Sync, "destination_id"),
    (Sync, "mapping_id"),
]
ID_CASES = [
    pytest.param(cls, field, bad.values[0], id=f"{cls.__name__}.{field}-{bad.id}")
    for cls, field in ID_FIELDS
    for bad in BAD_IDS
    # None is a valid mapping id: "no mapping", the identity.
    if not (field == "mapping_id" and bad.values[0] is None)
]

BAD_COUNTS = [
    pytest.param(-1, id="negative"),
    pytest.param(NAN, id="nan"),
    pytest.param(True, id="bool"),
    pytest.param(False, id="false"),
    pytest.param(1.5, id="float"),
    pytest.param(3.0, id="integral-float"),
    pytest.param("3", id="str"),
    pytest.param(INF, id="inf"),
]
COUNT_FIELDS = [
    (Cohort, "size"),
    (Capabilities, "min_audience_size"),
    (Capabilities, "max_batch_size"),
    (Capabilities, "max_parallel"),
    (RateLimit, "requests"),
    (MassRemovalGuard, "min_audience"),
    (RetryPolicy, "max_retries"),
    (SyncPolicy, "one_time_attempts"),
    (SyncPolicy, "rejection_attempts"),
    (Sync, "generation"),
    (SyncRun, "added"),
    (SyncRun, "removed"),
    (SyncRun, "skipped"),
    (SyncRun, "rejected"),
    (SyncRun, "batches"),
    (SyncRun, "retries"),
]

#: (class, field, bad value, field the error names, value the error holds).
BAD_VALUES = [
    # Unknown enum values name the allowed ones.
    (Cohort, "type", "lifecycle", "type", "lifecycle"),
    (Cohort, "type", 3, "type", 3),
    (SyncPolicy, "cadence", "fortnightly", "cadence", "fortnightly"),
    (SyncPolicy, "cadence", "HOURLY", "cadence", "HOURLY"),
    (SyncPolicy, "on_ineligible", "explode", "on_ineligible", "explode"),
    (SyncPolicy, "on_delete", "wipe", "on_delete", "wipe"),
    (Sync, "status", "zombie", "status", "zombie"),
    (Sync, "effective_cadence", "fortnightly", "effective_cadence", "fortnightly"),
    (SyncRun, "trigger", "cron", "trigger", "cron"),
    (SyncRun, "status", "ok", "status", "ok"),
    (SyncRun, "cadence", "fortnightly", "cadence", "fortnightly"),
    (Identifier, "kind", "fax", "kind", "fax"),
    (Capabilities, "accepted_identifiers", ["email", "fax"], "accepted_identifiers", "fax"),
    # Batch size and parallelism need at least one.
    (Capabilities, "max_batch_size", 0, "max_batch_size", 0),
    (Capabilities, "max_parallel", 0, "max_parallel", 0),
    # Rate limits.
    (RateLimit, "requests", 0, "requests", 0),
    (RateLimit, "per_seconds", 0, "per_seconds", 0),
    (RateLimit, "per_seconds", 0.0, "per_seconds", 0.0),
    (RateLimit, "per_seconds", -1.0, "per_seconds", -1.0),
    (RateLimit, "per_seconds", NAN, "per_seconds", NAN),
    (RateLimit, "per_seconds", INF, "per_seconds", INF),
    (RateLimit, "per_seconds", "1", "per_seconds", "1"),
    (RateLimit, "per_seconds", True, "per_seconds", True),
    # Membership TTL.
    (Capabilities, "membership_ttl", timedelta(0), "membership_ttl", timedelta(0)),
    (Capabilities, "membership_ttl", timedelta(days=-1), "membership_ttl", timedelta(days=-1)),
    (Capabilities, "membership_ttl", 30, "membership_ttl", 30),
    # Mass-removal guard share.
    (MassRemovalGuard, "max_share", 1.5, "max_share", 1.5),
    (MassRemovalGuard, "max_share", -0.1, "max_share", -0.1),
    (MassRemovalGuard, "max_share", NAN, "max_share", NAN),
    (MassRemovalGuard, "max_share", INF, "max_share", INF),
    (MassRemovalGuard, "max_share", "0.5", "max_share", "0.5"),
    # Retry policy.
    (RetryPolicy, "initial", -1.0, "initial", -1.0),
    (RetryPolicy, "multiplier", 0.5, "multiplier", 0.5),
    (RetryPolicy, "max_delay", NAN, "max_delay", NAN),
    (RetryPolicy, "jitter", 1.5, "jitter", 1.5),
    (RetryPolicy, "jitter", -0.1, "jitter", -0.1),
    # Time zones: daily only, and real IANA names only.
    (SyncPolicy, "timezone", "Europe/Berlin", "timezone", "Europe/Berlin"),
    (SyncPolicy, "timezone", "UTC", "timezone", "UTC"),
    # Wrong types are ConfigurationErrors too, never attrs' bare TypeError.
    (Cohort, "name", None, "name", None),
    (Cohort, "source", 3, "source", 3),
    (Capabilities, "name", 3, "name", 3),
    (Capabilities, "supports_realtime", 1, "supports_realtime", 1),
    (Capabilities, "supports_removals", "yes", "supports_removals", "yes"),
    (Capabilities, "full_sync_only", None, "full_sync_only", None),
    (Capabilities, "rate_limit", (100, 10.0), "rate_limit", (100, 10.0)),
    (MassRemovalGuard, "enabled", "no", "enabled", "no"),
    (SyncPolicy, "send_removals", 1, "send_removals", 1),
    (SyncPolicy, "guard", 0.5, "guard", 0.5),
    (SyncPolicy, "retry", 8, "retry", 8),
    (Sync, "policy", "hourly", "policy", "hourly"),
    (Changes, "cursor", 5, "cursor", 5),
    (Changes, "added", "alice", "added", "alice"),
    (Changes, "removed", "bob", "removed", "bob"),
    (StaticSource, "keys", "alice", "keys", "alice"),
    # Identifiers need a value.
    (Identifier, "value", "", "value", ""),
    (Identifier, "value", None, "value", None),
]


def _same(expected: object, actual: object) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return expected == actual


def _build(cls: type, **changes: object) -> object:
    return cls(**{**VALID[cls], **changes})


def _assert_refused(
    cls: type, field: str, value: object, error_field: str, error_value: object
) -> None:
    with pytest.raises(ConfigurationError) as info:
        _build(cls, **{field: value})

    assert error_field == info.value.field
    assert _same(error_value, info.value.value)
    assert str(info.value).startswith(f"{error_field}=")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, CohortSyncError)


class TestValidators:
    """Every validator refuses a bad value with a ConfigurationError naming field and value."""

    @pytest.mark.parametrize(("cls", "field", "value"), ID_CASES)
    def test_bad_ids(self, cls: type, field: str, value: object) -> None:
        """Ids must be non-blank str of at most 200 characters without control characters."""
        _assert_refused(cls, field, value, field, value)

    @given(text=st.text(min_size=1, max_size=40))
    def test_control_characters_are_exactly_c0_del_and_c1(self, text: str) -> None:
        """
        The id check refuses a text exactly when it holds a C0 control, DEL or
        a C1 control (U+0000-U+001F, U+007F-U+009F), wherever it is.
        """
        from cohortsync._validators import check_id

        if not text.strip():
            return  # refused as blank before any other check
        has_control = any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)
        valid_otherwise = not any("\ud800" <= c <= "\udfff" for c in text)
        if has_control:
            with pytest.raises(ConfigurationError, match="control characters"):
                check_id("id", text)
        elif valid_otherwise:
            assert check_id("id", text) == text

    @pytest.mark.parametrize("value", BAD_COUNTS)
    @pytest.mark.parametrize(
        ("cls", "field"), COUNT_FIELDS, ids=lambda x: getattr(x, "__name__", x)
    )
    def test_bad_counts(self, cls: type, field: str, value: object) -> None:
        """Sizes and counts must be ints (not bools, floats or NaN) within range."""
        _assert_refused(cls, field, value, field, value)

    @pytest.mark.parametrize(
        ("cls", "field", "value", "error_field", "error_value"),
        BAD_VALUES,
        ids=[f"{c.__name__}.{f}={v!r}" for c, f, v, _, _ in BAD_VALUES],
    )
    def test_bad_values(
        self, cls: type, field: str, value: object, error_field: str, error_value: object
    ) -> None:
        """Unknown enum values, out-of-range numbers and wrong types are refused."""
        _assert_refused(cls, field, value, error_field, error_value)

    @pytest.mark.parametrize("zone", ["Mars/Olympus", "", "../../etc/passwd", "utc+2", 2])
    def test_unknown_timezone(self, zone: object) -> None:
        """A daily policy's time zone must be a real IANA name."""
        with pytest.raises(ConfigurationError) as info:
            SyncPolicy.daily(zone)  # type: ignore[arg-type]

        assert "timezone" == info.value.field
        assert zone == info.value.value

    @pytest.mark.parametrize("cadence", [Cadence.HOURLY, Cadence.REALTIME, Cadence.ONE_TIME])
    def test_timezone_only_on_daily(self, cadence: Cadence) -> None:
        """Only daily, weekly and cron syncs follow a wall clock; others refuse a time zone."""
        with pytest.raises(ConfigurationError, match="only daily, weekly and cron") as info:
            SyncPolicy(cadence=cadence, timezone="Europe/Berlin")

        assert "timezone" == info.value.field

    def test_unknown_cadence_message_lists_choices(self) -> None:
        """The error for an unknown cadence says which ones exist."""
        with pytest.raises(ConfigurationError) as info:
            SyncPolicy(cadence="fortnightly")

        for cadence in Cadence:
            assert repr(cadence.value) in str(info.value)

    def test_evolve_validates(self) -> None:
        """Capabilities.evolve runs the validators on the new values."""
        with pytest.raises(ConfigurationError) as info:
            cohortsync.destinations.catalog.BRAZE.evolve(max_batch_size=0)

        assert "max_batch_size" == info.value.field

    def test_evolve_unknown_field(self) -> None:
        """evolve() with a field that does not exist is a TypeError, as attrs.evolve's."""
        with pytest.raises(TypeError):
            cohortsync.destinations.catalog.BRAZE.evolve(batch=5)


class TestNaiveDatetimes:
    """A naive datetime anywhere in a value is a TypeError naming the field."""

    @pytest.mark.parametrize(
        ("cls", "field"),
        [
            (Sync, "created_at"),
            (Sync, "updated_at"),
            (SyncRun, "slot"),
            (SyncRun, "started_at"),
            (SyncRun, "finished_at"),
        ],
    )
    def test_naive(self, cls: type, field: str) -> None:
        """The error names the field and shows the naive value."""
        with pytest.raises(TypeError, match=f"^{field} must be timezone-aware") as info:
            _build(cls, **{field: NAIVE})

        assert NAIVE.isoformat() in str(info.value)

    @pytest.mark.parametrize("value", [None, "2030-01-01T00:00:00+00:00", 0])
    def test_not_a_datetime(self, value: object) -> None:
        """Strings and numbers are not instants (the converter parses strings, not Sync)."""
        with pytest.raises(TypeError, match=r"^created_at must be a datetime"):
            _build(Sync, created_at=value)

    def test_aware_becomes_utc(self) -> None:
        """An aware instant in any zone is stored as the same instant in UTC."""
        berlin = datetime(2030, 7, 1, 14, 0, tzinfo=ZoneInfo("Europe/Berlin"))

        sync = _build(Sync, created_at=berlin)

        assert isinstance(sync, Sync)
        assert berlin == sync.created_at
        assert UTC is sync.created_at.tzinfo
        assert 12 == sync.created_at.hour


class TestGoodValues:
    """Valid values are accepted, converted where documented, and behave."""

    @pytest.mark.parametrize("value", ["a", "a" * 200, "power-users", "Ünïcode id", "a b"])
    def test_valid_ids(self, value: str) -> None:
        """Ids up to 200 characters, any printable text, are accepted."""
        assert value == Cohort(id=value, name="x").id

    @pytest.mark.parametrize("size", [None, 0, 1, 10**12])
    def test_valid_sizes(self, size: int | None) -> None:
        """Unknown (None), zero and huge sizes are fine."""
        assert size == Cohort(id="c", name="x", size=size).size

    def test_enum_values_are_converted(self) -> None:
        """Enum fields accept the member or its value."""
        cohort = Cohort(id="c", name="x", type="funnel")
        policy = SyncPolicy(cadence="realtime", on_ineligible="pause", on_delete="remove_delivered")

        assert CohortType.FUNNEL is cohort.type
        assert Cadence.REALTIME is policy.cadence
        assert OnIneligible.PAUSE is policy.on_ineligible
        assert OnDelete.REMOVE_DELIVERED is policy.on_delete
        assert IdentifierKind.EMAIL is Identifier("email", "a@example.com").kind

    def test_all_cohort_types(self) -> None:
        """The ten cohort types of the product exist."""
        assert {
            "behavioral",
            "static",
            "predictive",
            "computed",
            "funnel",
            "retention",
            "stickiness",
            "nth_time_event",
            "event_within",
            "distinct_interval",
        } == {t.value for t in CohortType}

    @pytest.mark.parametrize("share", [0.0, 0.5, 1.0, 0, 1])
    def test_guard_share_bounds(self, share: float) -> None:
        """A share of exactly 0 or 1 is valid."""
        assert share == MassRemovalGuard(max_share=share).max_share

    def test_smallest_values(self) -> None:
        """One-member batches, one request per tiny period and a 1 µs TTL are valid."""
        caps = Capabilities(
            max_batch_size=1,
            max_parallel=1,
            rate_limit=RateLimit(1, 1e-6),
            membership_ttl=timedelta(microseconds=1),
            min_audience_size=0,
        )

        assert 1 == caps.max_batch_size
        assert timedelta(microseconds=1) == caps.membership_ttl

    def test_rate_limit_interval(self) -> None:
        """A rate limit knows the spacing of requests at its sustained rate."""
        assert 0.2 == RateLimit(requests=100, per_seconds=20.0).interval

    def test_daily_in_a_time_zone(self) -> None:
        """SyncPolicy.daily("Europe/Berlin") is a daily policy following Berlin days."""
        policy = SyncPolicy.daily("Europe/Berlin")

        assert Cadence.DAILY is policy.cadence
        assert "Europe/Berlin" == policy.timezone
        assert timedelta(days=1) == policy.period

    def test_named_constructors(self) -> None:
        """Each named constructor sets its cadence and passes options through."""
        guard = MassRemovalGuard(max_share=0.2)

        assert Cadence.ONE_TIME is SyncPolicy.one_time().cadence
        assert Cadence.HOURLY is SyncPolicy.hourly().cadence
        assert Cadence.DAILY is SyncPolicy.daily().cadence
        assert None is SyncPolicy.daily().timezone
        assert Cadence.REALTIME is SyncPolicy.realtime().cadence
        assert guard == SyncPolicy.hourly(guard=guard).guard
        assert False is SyncPolicy.realtime(send_removals=False).send_removals

    def test_policy_defaults(self) -> None:
        """Defaults: removals sent, guard on, fall back to hourly, leave the destination."""
        policy = SyncPolicy.realtime()

        assert policy.send_removals
        assert MassRemovalGuard() == policy.guard
        assert policy.guard.enabled
        assert OnIneligible.FALLBACK_HOURLY is policy.on_ineligible
        assert OnDelete.LEAVE is policy.on_delete
        assert RetryPolicy() == policy.retry

    def test_periods(self) -> None:
        """Each cadence has its period; one-time has none."""
        assert None is Cadence.ONE_TIME.period
        assert timedelta(hours=1) == Cadence.HOURLY.period
        assert timedelta(days=1) == Cadence.DAILY.period
        assert timedelta(minutes=1) == Cadence.REALTIME.period

    def test_values_are_frozen(self) -> None:
        """Values cannot be changed in place."""
        policy = SyncPolicy.hourly()

        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            policy.cadence = Cadence.DAILY  # type: ignore[misc]

    def test_capabilities_evolve(self) -> None:
        """evolve() copies a preset with changes and leaves the preset alone."""
        preset = cohortsync.destinations.catalog.BRAZE

        custom = preset.evolve(max_batch_size=500, name="Braze (EU)")

        assert 500 == custom.max_batch_size
        assert "Braze (EU)" == custom.name
        assert preset.supports_realtime == custom.supports_realtime
        assert 1_000 == preset.max_batch_size
        assert "Braze" == preset.name

    def test_capabilities_accepts(self) -> None:
        """No declared identifier kinds means any kind is accepted."""
        assert Capabilities().accepts(IdentifierKind.USER_ID)
        assert cohortsync.destinations.catalog.FACEBOOK_ADS.accepts(IdentifierKind.EMAIL_SHA256)
        assert not cohortsync.destinations.catalog.FACEBOOK_ADS.accepts(IdentifierKind.USER_ID)

    def test_cohort_with_size(self) -> None:
        """with_size() returns a copy with the new size and the same source."""
        source = StaticSource(["a", "b"])
        cohort = Cohort(id="c", name="x", source=source)

        bigger = cohort.with_size(2)

        assert 2 == bigger.size
        assert None is cohort.size
        assert source is bigger.source

    def test_callable_source(self) -> None:
        """A plain callable becomes a CallableSource."""
        cohort = Cohort(id="c", name="x", source=lambda: ["b", "a"])

        assert isinstance(cohort.source, CallableSource)
        assert ["b", "a"] == list(cohort.source.members())
        assert isinstance(cohort.source, cohortsync.MembershipSource)

    def test_static_source_is_sorted(self) -> None:
        """A static source yields its keys once each, in ascending order."""
        source = StaticSource(["b", "a", "b"])

        assert ["a", "b"] == list(source.members())
        assert source.sorted_keys

    def test_cohort_equality_ignores_source(self) -> None:
        """Two cohorts with the same fields are equal whatever their sources."""
        assert Cohort(id="c", name="x", source=list) == Cohort(id="c", name="x")

    def test_changes_take_iterables(self) -> None:
        """A change feed may return any iterable of keys; they are stored as tuples."""
        changes = Changes(added=iter(["a"]), removed=["b"], cursor="7")

        assert ("a",) == changes.added
        assert ("b",) == changes.removed

    def test_sync_cadence(self) -> None:
        """A sync runs at its effective cadence when it fell back, else its policy's."""
        realtime = _build(Sync, policy=SyncPolicy.realtime())
        fallen_back = _build(Sync, policy=SyncPolicy.realtime(), effective_cadence="hourly")

        assert isinstance(realtime, Sync)
        assert isinstance(fallen_back, Sync)
        assert Cadence.REALTIME is realtime.cadence
        assert Cadence.HOURLY is fallen_back.cadence
        assert SyncStatus.ACTIVE is realtime.status
        assert 1 == realtime.generation

    def test_sync_run_derived(self) -> None:
        """A run knows how many members it changed and how long it took."""
        run = _build(
            SyncRun,
            added=3,
            removed=2,
            finished_at=NOW + timedelta(seconds=90),
            notes=["below_min_audience"],
        )

        assert isinstance(run, SyncRun)
        assert 5 == run.updated
        assert 90.0 == run.duration
        assert ("below_min_audience",) == run.notes
        assert Trigger.SCHEDULED is run.trigger
        assert RunStatus.SUCCEEDED is run.status

    def test_delivery_result(self) -> None:
        """ok() rejects nobody; partial() keeps the rejections."""
        rejection = Rejection("hash", "unknown user")

        assert () == cohortsync.DeliveryResult.ok().rejected
        assert (rejection,) == cohortsync.DeliveryResult.partial([rejection]).rejected

    def test_system_clock(self) -> None:
        """The system clock is a Clock and tells aware UTC time."""
        clock = cohortsync.SystemClock()

        assert isinstance(clock, cohortsync.Clock)
        assert UTC is clock.now().tzinfo
        assert "SystemClock()" == repr(clock)


class TestReprs:
    """Reprs say what a value is without showing member keys, identifiers or sources."""

    def test_cohort_hides_source(self) -> None:
        """A cohort's repr shows its fields but not its membership source."""
        cohort = Cohort(
            id="power-users",
            name="Power users",
            type=CohortType.STATIC,
            size=2,
            source=StaticSource(["alice@example.com", "bob@example.com"]),
        )

        text = repr(cohort)

        assert "'power-users'" in text
        assert "'Power users'" in text
        assert "STATIC" in text
        assert "size=2" in text
        assert "source" not in text
        assert "alice" not in text

    def test_batch_never_shows_members(self) -> None:
        """A batch's repr shows its size and key prefix, never member keys or identifiers."""
        context = RunContext(
            run_id="r1",
            sync_id="s1",
            generation=1,
            cohort_id="c",
            cohort_name="C",
            computed_at=NOW,
            full_sync=False,
        )
        batch = Batch(
            context=context,
            operation=Operation.ADD,
            members=(
                Member("user-alice", Identifier(IdentifierKind.EMAIL, "alice@example.com")),
                Member("user-bob", Identifier(IdentifierKind.EMAIL, "bob@example.com")),
            ),
            sequence=3,
            idempotency_key="0123456789abcdef0123",
        )

        text = repr(batch)

        assert "size=2" in text
        assert "'s1'" in text
        assert "'add'" in text
        assert "'0123456789ab'" in text
        for secret in ("alice", "bob", "example.com", "0123456789abcdef"):
            assert secret not in text
        assert ["alice@example.com", "bob@example.com"] == batch.identifiers
        assert ["user-alice", "user-bob"] == batch.keys
        assert 2 == len(batch)

    def test_identifier_and_rejection_hide_values(self) -> None:
        """Identifier values and rejected identifiers are personal data: not in reprs."""
        identifier = Identifier(IdentifierKind.EMAIL, "alice@example.com")
        rejection = Rejection("alice@example.com", "invalid email")

        assert "alice" not in repr(identifier)
        assert "EMAIL" in repr(identifier)
        assert "alice" not in repr(rejection)
        assert "invalid email" in repr(rejection)

    def test_policy_and_capabilities(self) -> None:
        """Policies and capabilities show their settings."""
        assert "DAILY" in repr(SyncPolicy.daily("Europe/Berlin"))
        assert "'Europe/Berlin'" in repr(SyncPolicy.daily("Europe/Berlin"))
        assert "'Marketo'" in repr(cohortsync.destinations.catalog.MARKETO)
        assert "max_batch_size=300" in repr(cohortsync.destinations.catalog.MARKETO)

    def test_destination(self) -> None:
        """A destination's repr names its class and its capabilities."""

        class Push(cohortsync.Destination):
            capabilities = cohortsync.destinations.catalog.BRAZE

            def add(self, batch: Batch) -> cohortsync.DeliveryResult:
                return cohortsync.DeliveryResult.ok()

            def remove(self, batch: Batch) -> cohortsync.DeliveryResult:
                return cohortsync.DeliveryResult.ok()

        assert "<Push 'Braze'>" == repr(Push())

    def test_configuration_error(self) -> None:
        """The error message starts with field=value."""
        err = ConfigurationError("size", -1, "must be >= 0")

        assert "size=-1: must be >= 0" == str(err)


#: Each named constructor, the cadence it sets, and the options it takes
#: beyond the ones every cadence takes.
CONSTRUCTORS: list[tuple[Any, Cadence, set[str], dict[str, object]]] = [
    (SyncPolicy.one_time, Cadence.ONE_TIME, set(), {}),
    (SyncPolicy.hourly, Cadence.HOURLY, {"first_run"}, {}),
    (SyncPolicy.daily, Cadence.DAILY, {"timezone", "at", "first_run"}, {}),
    (
        functools.partial(SyncPolicy.weekly, "mon"),
        Cadence.WEEKLY,
        {"timezone", "at", "first_run"},
        {"on": "mon"},
    ),
    (
        functools.partial(SyncPolicy.every, timedelta(minutes=15)),
        Cadence.EVERY,
        {"on_ineligible", "first_run"},
        {"interval": timedelta(minutes=15)},
    ),
    (
        functools.partial(SyncPolicy.cron, "0 6 * * *"),
        Cadence.CRON,
        {"timezone", "on_ineligible", "first_run"},
        {"expression": "0 6 * * *"},
    ),
    (SyncPolicy.realtime, Cadence.REALTIME, {"on_ineligible", "first_run"}, {}),
]
CONSTRUCTOR_IDS = [c.value for _, c, _, _ in CONSTRUCTORS]
EVERY_CADENCE = {
    "send_removals",
    "guard",
    "on_delete",
    "retry",
    "one_time_attempts",
    "rejection_attempts",
}
#: Options only some cadences take.
SOME_CADENCES = {"timezone", "on_ineligible", "at", "first_run"}
#: A value other than the default for every option.
NOT_DEFAULT: dict[str, object] = {
    "timezone": "Europe/Berlin",
    "at": time(6, 30),
    "first_run": FirstRun.NEXT_SLOT,
    "send_removals": False,
    "guard": MassRemovalGuard.disabled(),
    "on_ineligible": OnIneligible.PAUSE,
    "on_delete": OnDelete.REMOVE_DELIVERED,
    "retry": RetryPolicy(max_retries=0),
    "one_time_attempts": 2,
    "rejection_attempts": 7,
}
OPTIONS = [
    (make, option) for make, _, extra, _ in CONSTRUCTORS for option in sorted(EVERY_CADENCE | extra)
]


def _name(make: Any) -> str:
    return str(getattr(make, "__name__", None) or make.func.__name__)


class TestNamedConstructors:
    """SyncPolicy's named constructors take exactly their cadence's options, as keywords."""

    @pytest.mark.parametrize(
        ("make", "cadence", "extra", "needs"), CONSTRUCTORS, ids=CONSTRUCTOR_IDS
    )
    def test_defaults_are_the_class_defaults(
        self, make: Any, cadence: Cadence, extra: set[str], needs: dict[str, object]
    ) -> None:
        """Without options, a constructor builds the policy the class builds for its cadence."""
        assert SyncPolicy(cadence=cadence, **needs) == make()  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("make", "option"), OPTIONS, ids=[f"{_name(m)}-{o}" for m, o in OPTIONS]
    )
    def test_every_option_is_passed_on(self, make: Any, option: str) -> None:
        """Each option a constructor takes reaches the policy."""
        assert NOT_DEFAULT[option] == getattr(make(**{option: NOT_DEFAULT[option]}), option)

    @pytest.mark.parametrize(
        ("make", "cadence", "extra", "needs"), CONSTRUCTORS, ids=CONSTRUCTOR_IDS
    )
    def test_options_of_other_cadences_refused(
        self, make: Any, cadence: Cadence, extra: set[str], needs: dict[str, object]
    ) -> None:
        """An option of other cadences (a time zone on hourly, say) is a TypeError."""
        for option in SOME_CADENCES - extra:
            with pytest.raises(TypeError, match=f"unexpected keyword argument '{option}'"):
                make(**{option: NOT_DEFAULT[option]})

    @pytest.mark.parametrize(
        ("make", "cadence", "extra", "needs"), CONSTRUCTORS, ids=CONSTRUCTOR_IDS
    )
    def test_misspelled_option_refused(
        self, make: Any, cadence: Cadence, extra: set[str], needs: dict[str, object]
    ) -> None:
        """A misspelled option is a TypeError naming it, as before the options were spelled out."""
        with pytest.raises(TypeError, match="unexpected keyword argument 'send_removal'"):
            make(send_removal=False)

    @pytest.mark.parametrize(
        ("make", "cadence", "extra", "needs"), CONSTRUCTORS, ids=CONSTRUCTOR_IDS
    )
    def test_options_are_keywords(
        self, make: Any, cadence: Cadence, extra: set[str], needs: dict[str, object]
    ) -> None:
        """
        Options cannot be passed by position (daily's time zone is the one
        exception; weekly, every and cron take their schedule first).
        """
        args = ("UTC", False) if cadence is Cadence.DAILY else (False,)

        with pytest.raises(TypeError, match="positional argument"):
            make(*args)

    def test_enum_options_take_their_values(self) -> None:
        """on_delete and on_ineligible also take their string values."""
        policy = SyncPolicy.realtime(on_ineligible="pause", on_delete="remove_delivered")

        assert OnIneligible.PAUSE is policy.on_ineligible
        assert OnDelete.REMOVE_DELIVERED is policy.on_delete

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("rejection_attempts", 0),
            ("one_time_attempts", "5"),
            ("send_removals", "no"),
            ("on_delete", "remove"),
            ("on_ineligible", "later"),
        ],
    )
    def test_bad_values_are_configuration_errors(self, option: str, value: object) -> None:
        """A bad value passed to a named constructor is the class's ConfigurationError."""
        with pytest.raises(ConfigurationError) as info:
            SyncPolicy.realtime(**{option: value})

        assert (option, value) == (info.value.field, info.value.value)

    @pytest.mark.parametrize(
        ("literal", "enum_type"),
        [
            (_policy._CadenceValue, Cadence),
            (_policy._OnDeleteValue, OnDelete),
            (_policy._OnIneligibleValue, OnIneligible),
            (_policy._FirstRunValue, FirstRun),
            (_policy._WeekdayValue, Weekday),
            (_cohort._CohortTypeValue, CohortType),
            (_destination._IdentifierKindValue, IdentifierKind),
        ],
    )
    def test_literals_spell_every_enum_value(self, literal: Any, enum_type: type[Any]) -> None:
        """The Literal types of string spellings list exactly the enum's values."""
        assert {m.value for m in enum_type} == set(get_args(literal))


#: A value other than the default for every Capabilities field.
CAPABILITY_CHANGES: dict[str, object] = {
    "name": "Custom (EU)",
    "supports_realtime": False,
    "supports_removals": False,
    "full_sync_only": True,
    "max_batch_size": 7,
    "max_parallel": 3,
    "rate_limit": RateLimit(requests=5, per_seconds=1.0),
    "min_audience_size": 100,
    "accepted_identifiers": frozenset({IdentifierKind.EMAIL}),
    "membership_ttl": timedelta(days=30),
}


class TestCapabilitiesEvolve:
    """Capabilities.evolve takes every field by name and changes only those given."""

    @pytest.mark.parametrize("field", [f.name for f in attrs.fields(Capabilities)])
    def test_every_field(self, field: str) -> None:
        """Each field can be changed, and the others keep their value."""
        changed = Capabilities().evolve(**{field: CAPABILITY_CHANGES[field]})

        assert attrs.evolve(Capabilities(), **{field: CAPABILITY_CHANGES[field]}) == changed

    def test_nothing_given_keeps_everything(self) -> None:
        """evolve() without arguments is an equal copy."""
        preset = cohortsync.destinations.catalog.FACEBOOK_ADS

        assert preset == preset.evolve()

    def test_none_is_a_value(self) -> None:
        """Passing None clears an optional field; leaving it out keeps it."""
        preset = cohortsync.destinations.catalog.FACEBOOK_ADS

        assert None is preset.evolve(rate_limit=None).rate_limit
        assert preset.rate_limit == preset.evolve(max_parallel=2).rate_limit

    def test_identifier_kinds_by_value(self) -> None:
        """accepted_identifiers takes kinds or their values, as the class does."""
        changed = Capabilities().evolve(accepted_identifiers=["email", IdentifierKind.PHONE])

        assert frozenset({IdentifierKind.EMAIL, IdentifierKind.PHONE}) == (
            changed.accepted_identifiers
        )

    def test_keep_shows_as_keep(self) -> None:
        """The default of evolve's arguments reads KEEP in signatures and docs."""
        assert "KEEP" == repr(inspect.signature(Capabilities.evolve).parameters["name"].default)


class TestMassRemovalGuard:
    """The guard holds back removals that look like an accident, and only those."""

    @pytest.mark.parametrize(
        ("delivered", "removing", "source_empty", "trips"),
        [
            # Nothing to remove: never guarded.
            (0, 0, False, False),
            (0, 0, True, False),
            (5_000, 0, True, False),
            # An empty source that would remove anything is held back, whatever the size.
            (1, 1, True, True),
            (5, 5, True, True),
            (999, 999, True, True),
            (1_000_000, 1_000_000, True, True),
            # Exactly 50 % is not "more than 50 %".
            (1_000, 500, False, False),
            (1_000, 501, False, True),
            (2_000, 1_000, False, False),
            (2_000, 1_001, False, True),
            # Audiences below 1,000 are not guarded by share.
            (999, 999, False, False),
            (999, 600, False, False),
            (1_000, 1_000, False, True),
            # Small shares of big audiences are normal churn.
            (1_000_000, 10_000, False, False),
        ],
    )
    def test_defaults(self, delivered: int, removing: int, source_empty: bool, trips: bool) -> None:
        """Default guard: 50 % of an audience of at least 1,000, or an empty source."""
        assert trips == MassRemovalGuard().trips(delivered, removing, source_empty=source_empty)

    @pytest.mark.parametrize("source_empty", [True, False])
    def test_disabled(self, source_empty: bool) -> None:
        """A disabled guard never trips."""
        assert not MassRemovalGuard.disabled().trips(10_000, 10_000, source_empty=source_empty)

    def test_configured(self) -> None:
        """A stricter guard trips on smaller shares and audiences."""
        guard = MassRemovalGuard(max_share=0.1, min_audience=10)

        assert not guard.trips(10, 1, source_empty=False)
        assert guard.trips(10, 2, source_empty=False)
        assert not guard.trips(9, 9, source_empty=False)

    def test_share_zero_trips_on_any_removal(self) -> None:
        """max_share=0 holds back every removal from a big enough audience."""
        assert MassRemovalGuard(max_share=0.0).trips(1_000, 1, source_empty=False)

    def test_share_one_never_trips_on_share(self) -> None:
        """max_share=1 holds back only empty-source removals."""
        guard = MassRemovalGuard(max_share=1.0)

        assert not guard.trips(1_000, 1_000, source_empty=False)
        assert guard.trips(1_000, 1_000, source_empty=True)

    def test_exact_boundary_is_not_float_noise(self) -> None:
        """29 % of 3,000 is 870: removing exactly 870 must not trip (0.29 * 3000 < 870)."""
        guard = MassRemovalGuard(max_share=0.29)

        assert not guard.trips(3_000, 870, source_empty=False)
        assert guard.trips(3_000, 871, source_empty=False)

    @given(
        percent=st.integers(0, 100),
        delivered=st.integers(1_000, 10**7),
        data=st.data(),
    )
    def test_more_than_share(self, percent: int, delivered: int, data: st.DataObject) -> None:
        """For a share of N %, removing r of d trips exactly when 100 r > N d."""
        removing = data.draw(st.integers(1, delivered))
        guard = MassRemovalGuard(max_share=percent / 100)

        assert (100 * removing > percent * delivered) == guard.trips(
            delivered, removing, source_empty=False
        )


class TestRetryPolicy:
    """Backoff: 8 retries from 1 s growing past two minutes, with at most 10 % jitter."""

    def test_defaults(self) -> None:
        """The documented defaults."""
        retry = RetryPolicy()

        assert 8 == retry.max_retries
        assert 1.0 == retry.initial
        assert 0.1 == retry.jitter

    @pytest.mark.parametrize("random", [0.0, 0.5, 0.999999])
    def test_first_and_last_waits(self, random: float) -> None:
        """The first wait is about 1 s; the 8th (last) is past two minutes, whatever the jitter."""
        retry = RetryPolicy()

        assert 0.9 <= retry.delay(0, random) <= 1.1
        assert 120.0 <= retry.delay(retry.max_retries - 1, random) <= 300.0

    def test_without_jitter(self) -> None:
        """Without jitter the waits double from 1 s: 1, 2, 4 ... 128."""
        retry = RetryPolicy(jitter=0.0)

        assert [1, 2, 4, 8, 16, 32, 64, 128] == [retry.delay(a, 0.5) for a in range(8)]

    @given(attempt=st.integers(0, 30), random=st.floats(0.0, 1.0, exclude_max=True))
    def test_jitter_within_ten_percent(self, attempt: int, random: float) -> None:
        """Each wait is within 10 % of the nominal exponential wait, and never above max_delay."""
        retry = RetryPolicy()
        nominal = min(retry.max_delay, 2.0**attempt)

        delay = retry.delay(attempt, random)

        assert abs(delay - nominal) <= 0.1 * nominal + 1e-9
        assert delay <= retry.max_delay

    @given(attempt=st.integers(0, 30), random=st.floats(0.0, 1.0, exclude_max=True))
    def test_waits_grow(self, attempt: int, random: float) -> None:
        """For the same draw, a later retry never waits less than an earlier one."""
        retry = RetryPolicy()

        assert retry.delay(attempt, random) <= retry.delay(attempt + 1, random)

    def test_huge_attempt(self) -> None:
        """A huge attempt number waits max_delay instead of overflowing."""
        assert 300.0 == RetryPolicy().delay(10_000, 0.5)
        assert 300.0 == RetryPolicy(multiplier=10).delay(10_000, 0.5)


class TestIssueKind:
    """Issue kinds are a closed str enum whose values are the stored text."""

    def test_values_are_the_stored_text(self) -> None:
        """The members' values are the strings stores have always written."""
        assert {"skipped": IssueKind.SKIPPED, "rejected": IssueKind.REJECTED} == {
            k.value: k for k in IssueKind
        }

    def test_equal_to_and_shown_as_text(self) -> None:
        """A kind equals its value, and str() and f-strings show the value."""
        assert "rejected" == IssueKind.REJECTED
        assert "skipped" == str(IssueKind.SKIPPED)
        assert "skipped" == f"{IssueKind.SKIPPED}"

    def test_member_issue_converts_stored_text(self) -> None:
        """A MemberIssue built from a store's text holds the IssueKind member."""
        issue = MemberIssue(run_id="r1", key="m1", kind="rejected", reason="no")

        assert IssueKind.REJECTED is issue.kind

    def test_member_issue_refuses_unknown_kind(self) -> None:
        """An unknown kind is a ConfigurationError naming the field and the value."""
        with pytest.raises(ConfigurationError) as info:
            MemberIssue(run_id="r1", key="m1", kind="lost", reason="no")

        assert ("kind", "lost") == (info.value.field, info.value.value)


class TestAsyncSources:
    """An async source is refused when the cohort is built, not mid-run."""

    def test_async_callable_and_async_members(self) -> None:
        """async def sources, async generators and async members() are ConfigurationErrors."""

        async def fetch() -> list[str]:
            return ["a"]

        async def stream() -> AsyncIterator[str]:
            yield "a"

        class AsyncMembers:
            async def members(self) -> list[str]:
                return ["a"]

        for source in (fetch, stream, AsyncMembers()):
            with pytest.raises(cohortsync.exceptions.ConfigurationError, match="is async"):
                cohortsync.Cohort(id="c", name="c", source=source)  # type: ignore[arg-type]

    def test_plain_sources_still_pass(self) -> None:
        """A plain function and a members() object are accepted as before."""
        cohortsync.Cohort(id="c", name="c", source=lambda: ["a"])
        cohortsync.Cohort(id="c", name="c", source=cohortsync.StaticSource(["a"]))
