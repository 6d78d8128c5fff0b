"""
The library's own cattrs converter: every public value round-trips to JSON and
plain data, bad data fails with a typed error, and the global converter is
never touched.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import cattrs
import pytest
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from hypothesis import given
from hypothesis import strategies as st

import cohortsync
import strategies as s
from cohortsync import _converter
from cohortsync._converter import dump_run, dump_sync
from cohortsync.advice import Recommendation
from cohortsync.events import EligibilityChanged, Event
from cohortsync.exceptions import ConfigurationError
from cohortsync.serialization import dumps, loads, make_converter
from cohortsync.storage import AppliedBatch, Completion, Lease, LedgerEntry, MemberIssue, SyncRecord
from threads import race

UTC = timezone.utc
NOW = datetime(2030, 1, 1, 12, 30, tzinfo=UTC)

#: Every public value class, with a strategy drawing valid instances of it.
VALUES: dict[type[object], st.SearchStrategy[Any]] = {
    cohortsync.Cohort: s.cohorts(),
    cohortsync.RateLimit: s.rate_limits(),
    cohortsync.Capabilities: s.capabilities(),
    cohortsync.MassRemovalGuard: s.guards(),
    cohortsync.RetryPolicy: s.retry_policies(),
    cohortsync.SyncPolicy: s.sync_policies(),
    cohortsync.Sync: s.syncs(),
    cohortsync.SyncRun: s.sync_runs(),
    cohortsync.Identifier: s.identifiers(),
    cohortsync.Member: s.members(),
    cohortsync.Rejection: s.rejections(),
    cohortsync.DeliveryResult: s.delivery_results(),
    cohortsync.Changes: s.changes(),
    cohortsync.RunContext: s.run_contexts(),
    cohortsync.Batch: s.batches(),
    LedgerEntry: s.ledger_entries(),
    MemberIssue: s.member_issues(),
    Lease: s.leases(),
    SyncRecord: s.sync_records(),
    Completion: s.completions(),
    AppliedBatch: s.applied_batches(),
    Recommendation: s.recommendations(),
}
KINDS = sorted(VALUES, key=lambda cls: cls.__name__)


def _sync() -> cohortsync.Sync:
    return cohortsync.Sync(
        id="s1",
        cohort_id="c1",
        destination_id="d1",
        policy=cohortsync.SyncPolicy.daily("Europe/Berlin"),
        created_at=NOW,
        updated_at=NOW,
    )


def _only_cause(err: ClassValidationError) -> BaseException:
    """
    The single leaf error inside (possibly nested) cattrs validation groups.
    """
    leaf: BaseException = err
    while isinstance(leaf, cattrs.BaseValidationError):
        assert 1 == len(leaf.exceptions)
        leaf = leaf.exceptions[0]
    return leaf


class TestRoundTrip:
    """Every public value survives JSON and plain data unchanged."""

    @pytest.mark.parametrize("cls", KINDS, ids=lambda cls: cls.__name__)
    def test_round_trip(self, cls: type[object]) -> None:
        """dumps()/loads() and unstructure()/structure() give back an equal value."""

        @given(VALUES[cls])
        def check(value: object) -> None:
            text = dumps(value)
            data = _converter.unstructure(value)

            assert value == loads(text, cls)
            assert text == dumps(loads(text, cls))
            assert value == _converter.structure(data, cls)
            assert json.loads(text) == json.loads(json.dumps(data))

        check()

    @given(s.events())
    def test_events(self, event: Event) -> None:
        """Scheduler events round-trip too (structured by their concrete class)."""
        assert event == loads(dumps(event), type(event))

    @given(s.cohorts())
    def test_cohort_source_is_omitted(self, cohort: cohortsync.Cohort) -> None:
        """A cohort's membership source is host code: it is not serialised and comes back None."""
        data = _converter.unstructure(cohort)
        back = _converter.structure(data, cohortsync.Cohort)

        assert {"id", "name", "type", "size"} == set(data)
        assert back.source is None
        assert (cohort.id, cohort.name, cohort.type, cohort.size) == (
            back.id,
            back.name,
            back.type,
            back.size,
        )

    @given(s.aware_datetimes(any_zone=True))
    def test_datetimes_are_utc_iso_strings(self, when: datetime) -> None:
        """Instants are stored as ISO-8601 UTC strings and come back aware UTC."""
        text = _converter.unstructure(when)
        back = _converter.structure(text, datetime)

        assert text.endswith("+00:00")
        # Compare instants: under PEP 495 a time in a repeated hour (fold=1)
        # never equals a datetime of another zone, even at the same instant.
        assert when.astimezone(UTC) == back
        assert UTC is back.tzinfo

    def test_plain_shapes(self) -> None:
        """Enums are their values, identifier kinds a sorted list, timedeltas seconds."""
        data = _converter.unstructure(cohortsync.destinations.catalog.GOOGLE_ADS)

        assert ["advertising_id", "email_sha256", "phone_sha256"] == data["accepted_identifiers"]
        assert 540 * 86_400 == data["membership_ttl"]
        assert "daily" == _converter.unstructure(cohortsync.SyncPolicy.daily())["cadence"]

    def test_event_cadence(self) -> None:
        """An event's cadence is its plain value in JSON and a Cadence when loaded."""
        event = EligibilityChanged(
            sync_id="s1",
            eligible=False,
            codes=("realtime_cohort_type",),
            cadence=cohortsync.Cadence.HOURLY,
            at=NOW,
        )

        text = dumps(event)

        assert "hourly" == json.loads(text)["cadence"]
        assert cohortsync.Cadence.HOURLY is loads(text, EligibilityChanged).cadence

    def test_catalog_presets(self) -> None:
        """Every catalog preset round-trips."""
        for preset in cohortsync.destinations.catalog.PRESETS.values():
            assert preset == loads(dumps(preset), cohortsync.Capabilities)


class TestBadData:
    """Invalid data fails with a typed error that says what is wrong, never a crash."""

    def test_naive_datetime_string(self) -> None:
        """A datetime without offset is refused: it means different instants on different hosts."""
        data = {**_converter.unstructure(_sync()), "created_at": "2030-01-01T00:00:00"}

        with pytest.raises(ClassValidationError) as info:
            _converter.structure(data, cohortsync.Sync)

        cause = _only_cause(info.value)
        assert isinstance(cause, TypeError)
        assert "timezone-aware" in str(cause)

    def test_naive_datetime_alone(self) -> None:
        """Structuring a lone naive datetime string is a TypeError."""
        with pytest.raises(TypeError, match="timezone-aware"):
            _converter.structure("2030-01-01T00:00:00", datetime)

    def test_not_iso(self) -> None:
        """A string that is not ISO-8601 is a ConfigurationError holding it."""
        with pytest.raises(ConfigurationError) as info:
            _converter.structure("next tuesday", datetime)

        assert "next tuesday" == info.value.value

    @pytest.mark.parametrize(
        ("field", "value"),
        [("status", "zombie"), ("effective_cadence", "fortnightly")],
    )
    def test_unknown_enum_value(self, field: str, value: str) -> None:
        """An unknown enum value is a ValueError naming the value, inside a ClassValidationError."""
        data = {**_converter.unstructure(_sync()), field: value}

        with pytest.raises(ClassValidationError) as info:
            _converter.structure(data, cohortsync.Sync)

        cause = _only_cause(info.value)
        assert isinstance(cause, ValueError)
        assert repr(value) in str(cause)

    def test_unknown_cadence_nested(self) -> None:
        """An unknown cadence inside a nested policy is reported through both classes."""
        data = _converter.unstructure(_sync())
        data["policy"]["cadence"] = "fortnightly"

        with pytest.raises(ClassValidationError, match="Sync") as info:
            _converter.structure(data, cohortsync.Sync)

        nested = info.value.exceptions[0]
        assert isinstance(nested, ClassValidationError)
        assert "SyncPolicy" in str(nested)
        assert isinstance(_only_cause(info.value), ValueError)

    def test_unknown_cohort_type(self) -> None:
        """An unknown cohort type does not load."""
        with pytest.raises(ClassValidationError) as info:
            loads('{"id":"c","name":"n","type":"lifecycle","size":null}', cohortsync.Cohort)

        assert "'lifecycle'" in str(_only_cause(info.value))

    def test_extra_keys_are_forbidden(self) -> None:
        """An unknown key is an error, not silently dropped."""
        data = {**_converter.unstructure(_sync()), "colour": "blue"}

        with pytest.raises(ClassValidationError) as info:
            _converter.structure(data, cohortsync.Sync)

        cause = _only_cause(info.value)
        assert isinstance(cause, ForbiddenExtraKeysError)
        assert {"colour"} == cause.extra_fields

    def test_extra_keys_nested(self) -> None:
        """Extra keys are forbidden in nested values too."""
        data = _converter.unstructure(_sync())
        data["policy"]["guard"]["max_removals"] = 5

        with pytest.raises(ClassValidationError) as info:
            _converter.structure(data, cohortsync.Sync)

        assert isinstance(_only_cause(info.value), ForbiddenExtraKeysError)

    def test_missing_key(self) -> None:
        """A missing required key is reported (as cattrs' KeyError naming it)."""
        with pytest.raises(ClassValidationError) as info:
            loads('{"id":"c"}', cohortsync.Cohort)

        cause = _only_cause(info.value)
        assert isinstance(cause, KeyError)
        assert "name" in str(cause)

    @pytest.mark.parametrize(
        ("field", "value", "expected_field"),
        [
            ("size", -1, "size"),
            ("size", "3", "int"),
            ("size", True, "int"),
            ("size", 2.5, "int"),
            ("size", float("nan"), "int"),
            ("id", "", "id"),
            ("id", 7, "str"),
            ("name", None, "str"),
        ],
    )
    def test_invalid_cohort_fields(self, field: str, value: object, expected_field: str) -> None:
        """Wrong values and wrong types are ConfigurationErrors, never coerced."""
        data = {"id": "c", "name": "n", "type": "static", "size": 3, field: value}

        with pytest.raises(ClassValidationError) as info:
            _converter.structure(data, cohortsync.Cohort)

        cause = _only_cause(info.value)
        assert isinstance(cause, ConfigurationError)
        assert expected_field == cause.field

    @pytest.mark.parametrize("flag", ["false", 0, 1, None])
    def test_bools_are_not_coerced(self, flag: object) -> None:
        """A stored "false" must not load as True (cattrs' default would call bool())."""
        data = {
            **_converter.unstructure(cohortsync.destinations.catalog.BRAZE),
            "supports_realtime": flag,
        }

        with pytest.raises(ClassValidationError) as info:
            _converter.structure(data, cohortsync.Capabilities)

        cause = _only_cause(info.value)
        assert isinstance(cause, ConfigurationError)
        assert flag == cause.value

    @pytest.mark.parametrize("ttl", [-5, 0, "long", float("nan"), float("inf"), 1e20])
    def test_bad_ttl(self, ttl: object) -> None:
        """A TTL that is not a positive, representable number of seconds is refused."""
        data = {
            **_converter.unstructure(cohortsync.destinations.catalog.BRAZE),
            "membership_ttl": ttl,
        }

        with pytest.raises(ClassValidationError) as info:
            _converter.structure(data, cohortsync.Capabilities)

        assert isinstance(_only_cause(info.value), ConfigurationError)

    def test_unknown_identifier_kind(self) -> None:
        """An unknown identifier kind in a capability list does not load."""
        data = {
            **_converter.unstructure(cohortsync.destinations.catalog.BRAZE),
            "accepted_identifiers": ["fax"],
        }

        with pytest.raises(ClassValidationError) as info:
            _converter.structure(data, cohortsync.Capabilities)

        assert isinstance(_only_cause(info.value), ValueError)

    def test_invalid_policy_is_validated_on_load(self) -> None:
        """attrs validators run on load: a time zone on an hourly policy is refused."""
        data = {**_converter.unstructure(cohortsync.SyncPolicy.hourly()), "timezone": "UTC"}

        with pytest.raises(ClassValidationError) as info:
            _converter.structure(data, cohortsync.SyncPolicy)

        cause = _only_cause(info.value)
        assert isinstance(cause, ConfigurationError)
        assert "timezone" == cause.field

    def test_not_json(self) -> None:
        """loads() of text that is not JSON raises json's decode error (a ValueError)."""
        with pytest.raises(json.JSONDecodeError):
            loads("{not json", cohortsync.Sync)


class TestIsolation:
    """Our converter is private: building it never changes cattrs' global one."""

    def test_fresh_converter(self) -> None:
        """make_converter() builds a new converter each call."""
        first = make_converter()
        second = make_converter()

        assert first is not second
        assert first is not cattrs.global_converter
        assert "2030-01-01T12:30:00+00:00" == first.unstructure(NOW)

    def test_global_converter_untouched(self) -> None:
        """The global converter keeps cattrs' own behaviour for datetimes and cohorts."""
        make_converter()
        _converter.unstructure(_sync())

        assert NOW == cattrs.global_converter.unstructure(NOW)
        assert timedelta(days=1) == cattrs.global_converter.unstructure(timedelta(days=1))
        cohort = cohortsync.Cohort(id="c", name="n", source=lambda: ["a"])
        assert "source" in cattrs.global_converter.unstructure(cohort)

    def test_global_converter_still_coerces(self) -> None:
        """Our strict primitive hooks stay on our converter: the global one still calls int()."""
        assert 3 == cattrs.global_converter.structure("3", int)
        with pytest.raises(ConfigurationError):
            make_converter().structure("3", int)

    def test_fresh_converter_is_independent(self) -> None:
        """A hook a host registers on one converter does not leak into another, or ours."""
        mine = make_converter()
        mine.register_unstructure_hook(datetime, lambda _d: "redacted")

        assert "redacted" == mine.unstructure(NOW)
        assert NOW.isoformat() == make_converter().unstructure(NOW)
        assert f'"{NOW.isoformat()}"' == dumps(NOW)

    def test_values_are_attrs_classes(self) -> None:
        """Every class round-tripped here is an attrs class (what the converter relies on)."""
        for cls in VALUES:
            assert attrs.has(cls), cls


class TestSyncDefinitionCache:
    """Parsed sync definitions are kept in a bounded LRU: hot ones survive a flood."""

    def test_a_hot_definition_survives_more_than_the_bound_of_others(self) -> None:
        """A definition read often stays shared while 10,000+ others pass through."""
        _converter.load_sync.cache_clear()
        hot_text = dumps(_sync())
        hot = _converter.load_sync(hot_text)
        cold_texts = [
            hot_text.replace('"s1"', f'"cold-{n}"')
            for n in range(_converter.SYNC_CACHE_SIZE + 1_000)
        ]
        first_cold = _converter.load_sync(cold_texts[0])

        for n, text in enumerate(cold_texts):
            _converter.load_sync(text)
            if n % 100 == 0:
                assert hot is _converter.load_sync(hot_text)

        assert hot is _converter.load_sync(hot_text)
        assert first_cold is not _converter.load_sync(cold_texts[0])
        assert _converter.SYNC_CACHE_SIZE == _converter.load_sync.cache_info().currsize


class TestSyncDefinitionParse:
    """
    A stored definition parses to the same Sync straight or through the
    converter; policies are shared; any other shape is the converter's.
    """

    @given(s.syncs())
    def test_direct_parse_equals_the_converter(self, sync: cohortsync.Sync) -> None:
        """For any sync, the definition dumps writes is built directly, and equal."""
        text = dumps(sync)

        direct = _converter._load_sync_direct(text)

        assert direct is not None
        assert loads(text, cohortsync.Sync) == direct
        assert sync == direct

    def test_the_fields_are_the_sync_fields(self) -> None:
        """The direct parse knows every field of Sync (a new field must be added there)."""
        assert {f.name for f in attrs.fields(cohortsync.Sync)} == _converter._SYNC_FIELDS

    def test_syncs_of_one_policy_share_it(self) -> None:
        """Two definitions not in the cache: one parsed policy between them."""
        _converter.load_sync.cache_clear()
        _converter._load_policy.cache_clear()
        first = _converter.load_sync(dumps(_sync()))
        second = _converter.load_sync(dumps(attrs.evolve(_sync(), id="s2")))

        assert first.policy is second.policy
        assert (1, 1) == (
            _converter._load_policy.cache_info().hits,
            _converter._load_policy.cache_info().misses,
        )

    def test_the_policy_cache_is_bounded(self) -> None:
        """At most POLICY_CACHE_SIZE policies are kept."""
        assert _converter.POLICY_CACHE_SIZE == _converter._load_policy.cache_info().maxsize

    def test_an_older_shape_loads_through_the_converter(self) -> None:
        """A definition without a defaulted field (written before it existed) still loads."""
        data = json.loads(dumps(_sync()))
        del data["guard_released"]
        text = json.dumps(data)

        assert _converter._load_sync_direct(text) is None
        assert _sync() == _converter.load_sync(text)

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("generation", "1"),
            ("generation", True),
            ("generation", 0),
            ("guard_released", 1),
            ("status_reason", 5),
            ("status", "sleeping"),
            ("id", ""),
            ("created_at", "2030-01-01T00:00:00"),
            ("policy", "daily"),
        ],
    )
    def test_a_damaged_value_gets_the_converters_error(self, field: str, value: object) -> None:
        """A value dumps would not write is left to the converter, which refuses it."""
        data = json.loads(dumps(_sync()))
        data[field] = value
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))

        assert _converter._load_sync_direct(text) is None
        with pytest.raises((ClassValidationError, ConfigurationError, TypeError, ValueError)):
            _converter.load_sync(text)


class TestDefinitionEncoding:
    """
    The hand-written definition encoder writes exactly what the converter does.
    """

    @given(s.syncs())
    def test_dump_sync_equals_dumps(self, sync: cohortsync.Sync) -> None:
        """Field for field, in the same order and spelling, for any definition."""
        assert dumps(sync) == dump_sync(sync)
        assert sync == loads(dump_sync(sync), cohortsync.Sync)

    def test_every_field_is_written(self) -> None:
        """A field added to Sync without the encoder fails here."""
        written = json.loads(dump_sync(_sync()))
        assert {f.name for f in attrs.fields(cohortsync.Sync)} == set(written)

    def test_an_equal_policy_is_written_as_its_own(self) -> None:
        """
        The policy's text is remembered by the object, not by equality: equal
        policies written differently (1 and 1.0) each keep their own text.
        """
        whole = cohortsync.SyncPolicy.hourly(retry=cohortsync.RetryPolicy(initial=1))
        point = cohortsync.SyncPolicy.hourly(retry=cohortsync.RetryPolicy(initial=1.0))
        assert whole == point
        for policy in (whole, point, whole):
            sync = attrs.evolve(_sync(), policy=policy)
            assert dumps(sync) == dump_sync(sync)

    def test_threads_evicting_at_once_lose_nothing(self) -> None:
        """
        Threads writing definitions of more policies than the cache holds
        evict at once without a KeyError (7 of 8 threads raised without its lock).
        """
        policies = [
            cohortsync.SyncPolicy.hourly(retry=cohortsync.RetryPolicy(max_retries=i % 50 + 1))
            for i in range(3_000)
        ]
        syncs = [attrs.evolve(_sync(), policy=p) for p in policies]

        def write(start: int) -> None:
            for sync in syncs[start::2] + syncs[::3]:
                assert dumps(sync) == dump_sync(sync)

        assert [] == race(write)


class TestRunRecordEncoding:
    """
    The hand-written run record encoder writes exactly what the converter does.
    """

    @given(s.sync_runs())
    def test_dump_run_equals_dumps(self, run: cohortsync.SyncRun) -> None:
        """Field for field, in the same order and spelling, for any run."""
        assert dumps(run) == dump_run(run)
        assert run == loads(dump_run(run), cohortsync.SyncRun)

    def test_every_field_is_written(self) -> None:
        """A field added to SyncRun without the encoder fails here."""
        run = cohortsync.SyncRun(
            id="r",
            sync_id="s",
            generation=1,
            trigger=cohortsync.Trigger.SCHEDULED,
            slot=datetime(2030, 1, 1, tzinfo=timezone.utc),
            started_at=datetime(2030, 1, 1, tzinfo=timezone.utc),
            finished_at=datetime(2030, 1, 1, tzinfo=timezone.utc),
            status=cohortsync.RunStatus.SUCCEEDED,
            cadence=cohortsync.Cadence.HOURLY,
        )
        assert {f.name for f in attrs.fields(cohortsync.SyncRun)} == set(json.loads(dump_run(run)))
