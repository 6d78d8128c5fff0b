"""
Eligibility: every reason at once, the product's real-time rules, the catalog's
numbers, and the typed error a scheduler raises for an ineligible sync.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cohortsync
import strategies as s
from cohortsync import (
    Cadence,
    Capabilities,
    Cohort,
    CohortType,
    IdentifierKind,
    IdentifierMapping,
    SyncPolicy,
    eligibility,
)
from cohortsync.destinations import catalog
from cohortsync.eligibility import (
    DEFAULT_RULES,
    REALTIME_MAX_MEMBERS,
    REALTIME_UNSUPPORTED_TYPES,
    EligibilityInput,
    Reason,
    ReasonCode,
    Ruleset,
    Severity,
    _check_measured,
    available_destinations,
    check_eligibility,
)
from cohortsync.exceptions import (
    CohortSyncError,
    ConfigurationError,
    DestinationNotFoundError,
    IneligibleSyncError,
)
from cohortsync.storage import MemoryStorage
from cohortsync.testing import FakeClock, RecordingDestination
from threads import race

REALTIME = SyncPolicy.realtime()
HOURLY = SyncPolicy.hourly()

REALTIME_TYPES = [
    CohortType.BEHAVIORAL,
    CohortType.STATIC,
    CohortType.PREDICTIVE,
    CohortType.COMPUTED,
]
NOT_REALTIME_TYPES = [
    CohortType.FUNNEL,
    CohortType.RETENTION,
    CohortType.STICKINESS,
    CohortType.NTH_TIME_EVENT,
    CohortType.EVENT_WITHIN,
    CohortType.DISTINCT_INTERVAL,
]
NOT_REALTIME_DESTINATIONS = [
    "facebook_ads",
    "google_ads",
    "twitter_ads",
    "hubspot",
    "qualtrics",
    "amazon_s3",
    "tiktok_ads",
    "enterpret",
    "salesforce_marketing_cloud",
    "the_trade_desk",
]
REALTIME_DESTINATIONS = ["braze", "customer_io", "marketo", "webhook"]


def _cohort(
    type: CohortType = CohortType.BEHAVIORAL,  # noqa: A002 - mirrors Cohort's field
    size: int | None = None,
) -> Cohort:
    return Cohort(id="c1", name="Power users", type=type, size=size)


def _codes(reasons: Iterable[Reason]) -> list[str]:
    return [r.code for r in reasons]


class TestAllReasonsAtOnce:
    """A check never stops at the first problem: every reason comes back."""

    def test_four_reasons(self) -> None:
        """A 2M-member funnel cohort to Facebook Ads in real time by user id fails four ways."""
        result = check_eligibility(
            _cohort(CohortType.FUNNEL, 2_000_000),
            catalog.FACEBOOK_ADS,
            REALTIME,
            identifier_kinds=[IdentifierKind.USER_ID],
        )

        assert [
            ReasonCode.REALTIME_SIZE_LIMIT,
            ReasonCode.REALTIME_COHORT_TYPE,
            ReasonCode.REALTIME_DESTINATION,
            ReasonCode.IDENTIFIER_INCOMPATIBLE,
        ] == _codes(result.reasons)
        assert not result.eligible
        assert result.reasons == result.blocking
        assert () == result.warnings

    def test_reasons_carry_numbers(self) -> None:
        """Each reason has a message for people and the numbers for programs."""
        result = check_eligibility(
            _cohort(CohortType.FUNNEL, 2_000_000),
            catalog.FACEBOOK_ADS,
            REALTIME,
            identifier_kinds=[IdentifierKind.USER_ID],
        )
        by_code = {r.code: r for r in result.reasons}

        assert {"size": 2_000_000, "limit": 1_000_000} == dict(
            by_code[ReasonCode.REALTIME_SIZE_LIMIT].details
        )
        assert {"cohort_type": "funnel"} == dict(by_code[ReasonCode.REALTIME_COHORT_TYPE].details)
        assert {"destination": "Facebook Ads"} == dict(
            by_code[ReasonCode.REALTIME_DESTINATION].details
        )
        assert {
            "accepted": ["advertising_id", "email_sha256", "phone_sha256"],
            "produced": ["user_id"],
        } == dict(by_code[ReasonCode.IDENTIFIER_INCOMPATIBLE].details)
        assert "2,000,000" in by_code[ReasonCode.REALTIME_SIZE_LIMIT].message
        assert "Facebook Ads" in by_code[ReasonCode.REALTIME_DESTINATION].message
        for reason in result.reasons:
            assert Severity.BLOCKING is reason.severity
            assert reason.message

    def test_codes_are_stable_strings(self) -> None:
        """Codes are plain strings a program can store and compare."""
        assert {
            "realtime_size_limit",
            "realtime_cohort_type",
            "realtime_destination",
            "below_min_audience",
            "identifier_incompatible",
        } == {
            ReasonCode.REALTIME_SIZE_LIMIT,
            ReasonCode.REALTIME_COHORT_TYPE,
            ReasonCode.REALTIME_DESTINATION,
            ReasonCode.BELOW_MIN_AUDIENCE,
            ReasonCode.IDENTIFIER_INCOMPATIBLE,
        }

    def test_warning_and_blocking_together(self) -> None:
        """Warnings are returned alongside blocking reasons."""
        result = check_eligibility(_cohort(CohortType.RETENTION, 10), catalog.GOOGLE_ADS, REALTIME)

        assert (
            frozenset(
                {
                    ReasonCode.REALTIME_COHORT_TYPE,
                    ReasonCode.REALTIME_DESTINATION,
                    ReasonCode.BELOW_MIN_AUDIENCE,
                }
            )
            == result.codes
        )
        assert [ReasonCode.BELOW_MIN_AUDIENCE] == _codes(result.warnings)

    def test_details_are_read_only(self) -> None:
        """A reason's numbers cannot be changed by whoever receives them."""
        reason = check_eligibility(_cohort(size=2_000_000), catalog.BRAZE, REALTIME).reasons[0]

        with pytest.raises(TypeError):
            reason.details["size"] = 1  # type: ignore[index]


class TestRealtimeRules:
    """The product's real-time rules, and only for real time."""

    @pytest.mark.parametrize("cohort_type", NOT_REALTIME_TYPES, ids=lambda t: t.value)
    def test_excluded_cohort_types(self, cohort_type: CohortType) -> None:
        """Six cohort types cannot sync in real time but can hourly."""
        cohort = _cohort(cohort_type, 10)

        realtime = check_eligibility(cohort, catalog.BRAZE, REALTIME)
        hourly = check_eligibility(cohort, catalog.BRAZE, HOURLY)

        assert [ReasonCode.REALTIME_COHORT_TYPE] == _codes(realtime.reasons)
        assert {"cohort_type": cohort_type.value} == dict(realtime.reasons[0].details)
        assert not realtime.eligible
        assert () == hourly.reasons
        assert hourly.eligible

    @pytest.mark.parametrize("cohort_type", REALTIME_TYPES, ids=lambda t: t.value)
    def test_allowed_cohort_types(self, cohort_type: CohortType) -> None:
        """The other cohort types may sync in real time."""
        assert () == check_eligibility(_cohort(cohort_type, 10), catalog.BRAZE, REALTIME).reasons

    def test_excluded_types_constant(self) -> None:
        """The public constant lists exactly the six excluded types."""
        assert frozenset(NOT_REALTIME_TYPES) == REALTIME_UNSUPPORTED_TYPES

    @pytest.mark.parametrize("key", NOT_REALTIME_DESTINATIONS)
    def test_excluded_destinations(self, key: str) -> None:
        """Ten destinations refuse real time but take hourly syncs."""
        caps = catalog.get(key)

        realtime = check_eligibility(_cohort(), caps, REALTIME)
        hourly = check_eligibility(_cohort(), caps, HOURLY)

        assert [ReasonCode.REALTIME_DESTINATION] == _codes(realtime.reasons)
        assert {"destination": caps.name} == dict(realtime.reasons[0].details)
        assert () == hourly.reasons

    @pytest.mark.parametrize("key", REALTIME_DESTINATIONS)
    def test_realtime_destinations(self, key: str) -> None:
        """Braze, Customer.io, Marketo and webhooks take real-time syncs."""
        assert () == check_eligibility(_cohort(), catalog.get(key), REALTIME).reasons

    @pytest.mark.parametrize(
        ("size", "blocked"),
        [
            (0, False),
            (999_999, False),
            (1_000_000, False),
            (1_000_001, True),
            (50_000_000, True),
            (None, False),
        ],
    )
    def test_size_limit(self, size: int | None, blocked: bool) -> None:
        """Real time takes at most 1,000,000 members; an unknown size is not blocked."""
        result = check_eligibility(_cohort(size=size), catalog.BRAZE, REALTIME)

        assert blocked == (ReasonCode.REALTIME_SIZE_LIMIT in result.codes)
        assert (not blocked) == result.eligible
        assert 1_000_000 == REALTIME_MAX_MEMBERS

    @pytest.mark.parametrize("policy", [HOURLY, SyncPolicy.daily(), SyncPolicy.one_time()])
    def test_size_limit_is_realtime_only(self, policy: SyncPolicy) -> None:
        """Big cohorts sync fine on other cadences."""
        assert () == check_eligibility(_cohort(size=50_000_000), catalog.BRAZE, policy).reasons

    def test_cadence_override(self) -> None:
        """Checking another cadence (a real-time sync considering hourly) uses that cadence."""
        cohort = _cohort(CohortType.FUNNEL, 2_000_000)

        result = check_eligibility(cohort, catalog.HUBSPOT, REALTIME, cadence=Cadence.HOURLY)

        assert result.eligible
        assert () == result.reasons

    def test_destination_instance(self) -> None:
        """A destination adapter can be checked directly, by its capabilities."""
        destination = RecordingDestination("facebook_ads")

        result = check_eligibility(_cohort(), destination, REALTIME)

        assert [ReasonCode.REALTIME_DESTINATION] == _codes(result.reasons)


class TestMinimumAudience:
    """A destination's audience floor is a warning: the sync may still be created."""

    @pytest.mark.parametrize(
        ("key", "size", "warned"),
        [
            ("facebook_ads", 99, True),
            ("facebook_ads", 100, False),
            ("facebook_ads", 0, True),
            ("google_ads", 999, True),
            ("google_ads", 1_000, False),
            ("twitter_ads", 99, True),
            ("tiktok_ads", 999, True),
            ("tiktok_ads", 1_000, False),
            ("facebook_ads", None, False),
            ("braze", 1, False),
        ],
    )
    def test_floor(self, key: str, size: int | None, warned: bool) -> None:
        """Below the floor there is a warning; eligibility stays true either way."""
        result = check_eligibility(_cohort(size=size), catalog.get(key), HOURLY)

        assert result.eligible
        assert () == result.blocking
        assert ([ReasonCode.BELOW_MIN_AUDIENCE] if warned else []) == _codes(result.warnings)

    def test_warning_details(self) -> None:
        """The warning says the size and the floor."""
        (reason,) = check_eligibility(_cohort(size=42), catalog.FACEBOOK_ADS, HOURLY).reasons

        assert Severity.WARNING is reason.severity
        assert not reason.blocking
        assert {"size": 42, "minimum": 100} == dict(reason.details)
        assert "100" in reason.message


class TestIdentifierCompatibility:
    """The sync's mapping must produce an identifier kind the destination accepts."""

    def test_incompatible(self) -> None:
        """User ids cannot go to Facebook Ads."""
        result = check_eligibility(
            _cohort(), catalog.FACEBOOK_ADS, HOURLY, identifier_kinds=[IdentifierKind.USER_ID]
        )

        assert [ReasonCode.IDENTIFIER_INCOMPATIBLE] == _codes(result.reasons)
        assert not result.eligible

    def test_one_accepted_kind_is_enough(self) -> None:
        """A mapping with a fallback the destination accepts is compatible."""
        kinds = [IdentifierKind.USER_ID, IdentifierKind.EMAIL_SHA256]

        result = check_eligibility(_cohort(), catalog.FACEBOOK_ADS, HOURLY, identifier_kinds=kinds)

        assert () == result.reasons

    def test_kind_values_accepted(self) -> None:
        """Kinds may be given by value."""
        result = check_eligibility(
            _cohort(),
            catalog.FACEBOOK_ADS,
            HOURLY,
            identifier_kinds=["phone_sha256"],  # type: ignore[list-item]
        )

        assert result.eligible

    def test_unknown_kind(self) -> None:
        """An unknown kind is a ConfigurationError, not a silent pass."""
        with pytest.raises(ConfigurationError) as info:
            check_eligibility(
                _cohort(),
                catalog.FACEBOOK_ADS,
                HOURLY,
                identifier_kinds=["fax"],  # type: ignore[list-item]
            )

        assert "identifier_kinds" == info.value.field
        assert "fax" == info.value.value

    def test_any_kind_destination(self) -> None:
        """A destination that declares no kinds accepts every kind."""
        for kind in IdentifierKind:
            assert check_eligibility(
                _cohort(), catalog.WEBHOOK, HOURLY, identifier_kinds=[kind]
            ).eligible

    def test_skipped_without_kinds(self) -> None:
        """Without identifier kinds the compatibility rule has nothing to check."""
        assert () == check_eligibility(_cohort(), catalog.FACEBOOK_ADS, HOURLY).reasons


def _weekend_rule(i: EligibilityInput) -> Iterable[Reason]:
    if i.cadence is Cadence.REALTIME:
        yield Reason("no_realtime_on_plan", "your plan has no real-time syncs")


class TestRuleset:
    """Hosts extend and override the default rules."""

    def test_defaults(self) -> None:
        """The default ruleset: the product's six rules and the two sub-hourly ones, in order."""
        assert [
            "realtime_size",
            "realtime_cohort_type",
            "realtime_destination",
            "sub_hourly_size",
            "sub_hourly_cohort_type",
            "min_audience",
            "identifier_compatibility",
            "removal_on_delete",
        ] == list(DEFAULT_RULES.rules)

    def test_with_rule(self) -> None:
        """A host rule runs after the defaults and its reasons are returned with theirs."""
        rules = DEFAULT_RULES.with_rule("plan", _weekend_rule)

        result = check_eligibility(_cohort(size=2_000_000), catalog.BRAZE, REALTIME, rules=rules)

        assert [ReasonCode.REALTIME_SIZE_LIMIT, "no_realtime_on_plan"] == _codes(result.reasons)
        assert "plan" in rules.rules
        assert "plan" not in DEFAULT_RULES.rules

    def test_with_rule_replaces(self) -> None:
        """A rule added under an existing name replaces it, in place."""
        rules = DEFAULT_RULES.with_rule("realtime_size", _weekend_rule)

        result = check_eligibility(_cohort(size=2_000_000), catalog.BRAZE, REALTIME, rules=rules)

        assert ["no_realtime_on_plan"] == _codes(result.reasons)
        assert list(DEFAULT_RULES.rules) == list(rules.rules)

    def test_without(self) -> None:
        """Removing the size rule lets a big cohort sync in real time."""
        rules = DEFAULT_RULES.without("realtime_size")

        result = check_eligibility(_cohort(size=2_000_000), catalog.BRAZE, REALTIME, rules=rules)

        assert result.eligible
        assert "realtime_size" in DEFAULT_RULES.rules

    def test_without_unknown(self) -> None:
        """Removing a rule that does not exist is a KeyError listing the rules."""
        with pytest.raises(KeyError, match="realtime_size"):
            DEFAULT_RULES.without("weekend")

    def test_rules_are_read_only(self) -> None:
        """A ruleset cannot be changed in place (DEFAULT_RULES is shared)."""
        with pytest.raises(TypeError):
            DEFAULT_RULES.rules["x"] = _weekend_rule  # type: ignore[index]

    def test_empty_ruleset(self) -> None:
        """With no rules everything is eligible."""
        result = check_eligibility(
            _cohort(CohortType.FUNNEL, 2_000_000), catalog.FACEBOOK_ADS, REALTIME, rules=Ruleset({})
        )

        assert result.eligible
        assert () == result.reasons


class TestAvailableDestinations:
    """The cadence decides which catalog destinations a cohort may sync to."""

    def test_realtime(self) -> None:
        """Real time leaves exactly Braze, Customer.io, Marketo and webhooks."""
        assert REALTIME_DESTINATIONS == available_destinations(_cohort(size=10), REALTIME)

    @pytest.mark.parametrize("policy", [HOURLY, SyncPolicy.daily(), SyncPolicy.one_time()])
    def test_scheduled(self, policy: SyncPolicy) -> None:
        """Every destination takes scheduled syncs (a small audience is only a warning)."""
        assert list(catalog.PRESETS) == available_destinations(_cohort(size=10), policy)

    def test_realtime_excluded_type(self) -> None:
        """A funnel cohort has no real-time destination at all."""
        assert [] == available_destinations(_cohort(CohortType.FUNNEL), REALTIME)

    def test_realtime_too_big(self) -> None:
        """A cohort over the limit has no real-time destination."""
        assert [] == available_destinations(_cohort(size=1_000_001), REALTIME)

    def test_identifier_kinds(self) -> None:
        """Destinations that cannot take the mapping's identifiers are left out."""
        keys = available_destinations(_cohort(), HOURLY, identifier_kinds=[IdentifierKind.USER_ID])

        assert [
            k
            for k in catalog.PRESETS
            if k not in {"facebook_ads", "google_ads", "twitter_ads", "tiktok_ads"}
        ] == keys

    def test_custom_catalog(self) -> None:
        """A host can pass its own catalog."""
        mine = {"push": Capabilities(name="Push"), "ads": catalog.GOOGLE_ADS}

        assert ["push"] == available_destinations(_cohort(), REALTIME, catalog=mine)


#: key: (name, batch size or None if undocumented, real-time, removals,
#: full-sync-only, minimum audience, rate limit (requests, seconds), TTL)
SPEC_TABLE: dict[
    str,
    tuple[
        str,
        int | None,
        bool,
        bool,
        bool,
        int | None,
        tuple[int, float] | None,
        timedelta | None,
    ],
] = {
    "facebook_ads": ("Facebook Ads", 10_000, False, True, False, 100, None, None),
    "google_ads": (
        "Google Ads",
        10_000,
        False,
        True,
        False,
        1_000,
        None,
        timedelta(days=540),
    ),
    "twitter_ads": ("Twitter (X) Ads", 2_500, False, True, False, 100, (1_500, 60.0), None),
    "tiktok_ads": ("TikTok Ads", None, False, True, False, 1_000, (24, 86_400.0), None),
    "hubspot": ("HubSpot", None, False, True, False, None, (100, 10.0), None),
    "qualtrics": ("Qualtrics", None, False, False, False, None, None, None),
    "enterpret": ("Enterpret", None, False, False, False, None, None, None),
    "salesforce_marketing_cloud": (
        "Salesforce Marketing Cloud",
        None,
        False,
        True,
        False,
        None,
        None,
        None,
    ),
    "amazon_s3": ("Amazon S3", None, False, True, True, None, None, None),
    "the_trade_desk": (
        "The Trade Desk",
        None,
        False,
        True,
        True,
        None,
        None,
        timedelta(days=30),
    ),
    "braze": ("Braze", 1_000, True, True, False, None, None, None),
    "customer_io": ("Customer.io", 1_000, True, True, False, None, None, None),
    "marketo": ("Marketo", 300, True, True, False, None, (100, 20.0), None),
    "webhook": ("Webhook", 1_000, True, True, False, None, None, None),
}


class TestCatalog:
    """The presets carry the numbers of SPEC section 6."""

    def test_every_destination(self) -> None:
        """The catalog has exactly the fourteen documented destinations."""
        assert set(SPEC_TABLE) == set(catalog.PRESETS)

    @pytest.mark.parametrize("key", sorted(SPEC_TABLE))
    def test_numbers(self, key: str) -> None:
        """Name, batch size, real-time, removals, full sync, floor, rate limit and TTL."""
        name, batch, realtime, removals, full_sync, floor, rate, ttl = SPEC_TABLE[key]
        caps = catalog.get(key)

        assert name == caps.name
        if batch is not None:
            assert batch == caps.max_batch_size
        assert realtime is caps.supports_realtime
        assert removals is caps.supports_removals
        assert full_sync is caps.full_sync_only
        assert floor == caps.min_audience_size
        assert rate == (
            None
            if caps.rate_limit is None
            else (caps.rate_limit.requests, caps.rate_limit.per_seconds)
        )
        assert ttl == caps.membership_ttl

    def test_facebook_identifiers(self) -> None:
        """Facebook takes hashed email/phone and advertising device ids only."""
        assert (
            frozenset(
                {
                    IdentifierKind.EMAIL_SHA256,
                    IdentifierKind.PHONE_SHA256,
                    IdentifierKind.ADVERTISING_ID,
                }
            )
            == catalog.FACEBOOK_ADS.accepted_identifiers
        )

    def test_s3_sends_whole_file(self) -> None:
        """S3 gets the whole membership in one file, not 1,000-member pieces."""
        assert catalog.AMAZON_S3.max_batch_size >= 1_000_000

    @pytest.mark.parametrize("key", sorted(SPEC_TABLE))
    def test_constants_match_presets(self, key: str) -> None:
        """catalog.FACEBOOK_ADS is catalog.get("facebook_ads"), and so on."""
        assert getattr(catalog, key.upper()) is catalog.get(key)
        assert key.upper() in catalog.__all__

    def test_unknown_key(self) -> None:
        """An unknown key is a LookupError listing every known key."""
        with pytest.raises(LookupError) as info:
            catalog.get("myspace_ads")

        assert isinstance(info.value, DestinationNotFoundError)
        assert "myspace_ads" == info.value.destination_id
        message = str(info.value)
        assert "'myspace_ads'" in message
        for key in SPEC_TABLE:
            assert key in message

    def test_presets_are_read_only(self) -> None:
        """The shared preset mapping cannot be changed."""
        with pytest.raises(TypeError):
            catalog.PRESETS["mine"] = Capabilities()  # type: ignore[index]


def _scheduler() -> cohortsync.Scheduler:
    return cohortsync.Scheduler(MemoryStorage(), clock=FakeClock())


class TestScheduler:
    """Creating an ineligible sync raises a typed error carrying every reason."""

    def test_create_sync_raises_all_reasons(self) -> None:
        """The error has all four reasons of the 2M funnel to Facebook in real time."""
        scheduler = _scheduler()
        scheduler.add_cohort(_cohort(CohortType.FUNNEL, 2_000_000))
        scheduler.add_destination("fb", RecordingDestination("facebook_ads"))

        with pytest.raises(IneligibleSyncError) as info:
            scheduler.create_sync("c1", "fb", REALTIME)

        assert [
            ReasonCode.REALTIME_SIZE_LIMIT,
            ReasonCode.REALTIME_COHORT_TYPE,
            ReasonCode.REALTIME_DESTINATION,
            ReasonCode.IDENTIFIER_INCOMPATIBLE,
        ] == _codes(info.value.reasons)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, CohortSyncError)
        for code in _codes(info.value.reasons):
            assert code in str(info.value)
        assert [] == scheduler.syncs()

    def test_error_matches_check(self) -> None:
        """The error carries the same reasons Scheduler.check returns."""
        scheduler = _scheduler()
        scheduler.add_cohort(_cohort(CohortType.RETENTION, 50))
        scheduler.add_destination("ads", RecordingDestination("google_ads"))

        with pytest.raises(IneligibleSyncError) as info:
            scheduler.create_sync("c1", "ads", REALTIME)

        assert scheduler.check("c1", "ads", REALTIME).reasons == info.value.reasons
        assert ReasonCode.BELOW_MIN_AUDIENCE in _codes(info.value.reasons)

    def test_warning_does_not_block(self) -> None:
        """A sync below the destination's floor, with a compatible mapping, is created."""
        scheduler = _scheduler()
        scheduler.add_cohort(_cohort(size=50))
        scheduler.add_destination("fb", RecordingDestination("facebook_ads"))
        scheduler.add_mapping("email", IdentifierMapping.hashed_email(lambda key: f"{key}@x.io"))

        sync = scheduler.create_sync("c1", "fb", HOURLY, mapping_id="email")

        assert [sync] == scheduler.syncs()
        warnings = scheduler.check("c1", "fb", HOURLY, mapping_id="email").warnings
        assert [ReasonCode.BELOW_MIN_AUDIENCE] == _codes(warnings)

    def test_hourly_to_excluded_destination(self) -> None:
        """The same cohort and destination are fine hourly with a hashed mapping."""
        scheduler = _scheduler()
        scheduler.add_cohort(_cohort(CohortType.FUNNEL, 2_000_000))
        scheduler.add_destination("fb", RecordingDestination("facebook_ads"))
        scheduler.add_mapping("email", IdentifierMapping.hashed_email(lambda key: f"{key}@x.io"))

        sync = scheduler.create_sync("c1", "fb", HOURLY, mapping_id="email")

        assert "fb" == sync.destination_id
        assert Cadence.HOURLY is sync.cadence


class TestCachedAnswers:
    """
    The built-in rules' answers are cached by their whole input; host rules never are.
    """

    @given(s.cohorts(), s.capabilities(), s.sync_policies())
    def test_a_cached_answer_is_the_rules_answer(
        self, cohort: Cohort, caps: Capabilities, policy: SyncPolicy
    ) -> None:
        """Asked twice (the second from the cache), the answer is what the rules say."""
        direct = DEFAULT_RULES.check(
            EligibilityInput(
                cohort=cohort,
                capabilities=caps,
                policy=policy,
                cadence=policy.cadence,
                identifier_kinds=None,
            )
        )
        assert direct == check_eligibility(cohort, caps, policy)
        assert direct == check_eligibility(cohort, caps, policy)

    @given(s.cohorts(), s.capabilities(), s.sync_policies(), st.lists(s.counts(), min_size=2))
    def test_a_measured_size_is_the_sized_cohorts_answer(
        self, cohort: Cohort, caps: Capabilities, policy: SyncPolicy, sizes: list[int]
    ) -> None:
        """
        A run's measured size, given apart from the cohort, answers as the
        sized cohort does, run after run (each answer from the rules or the cache).
        """
        for size in sizes:
            assert check_eligibility(cohort.with_size(size), caps, policy) == _check_measured(
                cohort, size, caps, policy
            )

    def test_a_full_cache_drops_its_oldest_answer_only(self) -> None:
        """At its bound the cache forgets one answer, the oldest, never all of them."""
        caps = catalog.PRESETS["webhook"]
        policy = SyncPolicy.daily()
        bound = eligibility._CHECKED_MAX
        cohort = Cohort(id="c", name="C")
        for size in range(bound + 10):
            _check_measured(cohort, size, caps, policy)
        sizes = [k[2] for k in eligibility._CHECKED if k[:2] == (id(caps), id(policy))]
        assert bound == len(eligibility._CHECKED)
        assert list(range(bound + 10 - len(sizes), bound + 10)) == sizes

    def test_threads_evicting_at_once_lose_nothing(self) -> None:
        """
        Runs in threads (max_parallel, an AsyncScheduler's run threads) fill
        the cache at once: two evicting together raised KeyError or "changed
        size during iteration" in 3 of 3 tries before a lock guarded it.
        """
        caps = catalog.PRESETS["webhook"]
        policy = SyncPolicy.daily()
        cohort = Cohort(id="c", name="C")

        def check(start: int) -> None:
            for size in range(start, start + 2 * eligibility._CHECKED_MAX, 3):
                _check_measured(cohort, size, caps, policy)

        assert [] == race(check)
        assert eligibility._CHECKED_MAX == len(eligibility._CHECKED)

    def test_the_measured_size_changes_the_answer(self) -> None:
        """The same policy and destination with a new size is a new question."""
        caps = catalog.PRESETS["webhook"]
        policy = SyncPolicy.realtime()
        small = Cohort(id="c", name="C", size=10)
        big = small.with_size(10_000_000)
        assert check_eligibility(small, caps, policy).eligible
        assert not check_eligibility(big, caps, policy).eligible
        assert check_eligibility(small, caps, policy).eligible

    def test_a_host_rule_is_asked_every_time(self) -> None:
        """A host rule may read the clock: its ruleset's answers are never cached."""
        calls: list[int] = []

        def counting(i: EligibilityInput) -> Iterable[Reason]:
            calls.append(1)
            return ()

        rules = DEFAULT_RULES.with_rule("counting", counting)
        cohort = Cohort(id="c", name="C", size=10)
        for _ in range(3):
            check_eligibility(cohort, catalog.PRESETS["webhook"], SyncPolicy.daily(), rules=rules)
        assert 3 == len(calls)
