from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cohortsync as cs
from cohortsync._destination import Identifier, IdentifierKind, Member, identity_members
from cohortsync.exceptions import ConfigurationError
from cohortsync.identifiers import (
    Bulk,
    IdentifierMapping,
    hash_email,
    hash_phone,
    normalize_email,
    normalize_phone,
    try_hash_email,
    try_hash_phone,
    try_normalize_email,
    try_normalize_phone,
)
from cohortsync.storage import MemoryStorage, SQLiteStorage
from cohortsync.testing import FakeClock, RecordingDestination
from strategies import member_keys

TEST_EMAIL_SHA256 = "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"
US_PHONE_SHA256 = "8a59780bb8cd2ba022bfa5ba2ea3b6e07af17a7d8b30c1f9b3390e36f69019e4"

K = IdentifierKind


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


phone_noise = st.sampled_from(["", " ", "-", ".", "(", ")", "\t"])
phones = st.builds(
    lambda prefix, digits, noise: prefix + noise.join(digits),
    st.sampled_from(["+", "00", "", "0"]),
    st.text(alphabet="0123456789", min_size=0, max_size=18),
    phone_noise,
)
hex_digests = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)


class TestNormalizeEmail:
    def test_trims_and_lower_cases(self) -> None:
        """Surrounding whitespace goes and letters are lower-cased, nothing else changes."""
        assert "jane.doe+tag@example.com" == normalize_email("  Jane.Doe+Tag@Example.COM \n")

    @pytest.mark.parametrize(
        "value",
        ["", "   ", "no-at-sign", "@example.com", "jane@", "ja ne@example.com", "a@" + "b" * 260],
    )
    def test_invalid_raises_and_try_returns_none(self, value: str) -> None:
        """Unusable emails raise from the plain helper and give None from the try_ helper."""
        with pytest.raises(ConfigurationError) as info:
            normalize_email(value)

        assert "email" == info.value.field
        assert try_normalize_email(value) is None

    def test_error_does_not_echo_the_address(self) -> None:
        """Error messages leave the personal data out: they end up in logs."""
        with pytest.raises(ConfigurationError, match="has no '@'") as info:
            normalize_email("Private.Person.example.com")

        assert "private" not in str(info.value).lower()

    def test_non_str_is_invalid(self) -> None:
        """A non-str is rejected as data, not with a TypeError from deep inside."""
        assert try_normalize_email(42) is None  # type: ignore[arg-type]

    @given(st.text())
    def test_idempotent(self, value: str) -> None:
        """Normalising a normalised email changes nothing."""
        once = try_normalize_email(value)

        if once is not None:
            assert once == normalize_email(once)

    @given(st.emails())
    def test_valid_emails_normalise(self, value: str) -> None:
        """Every syntactically valid email is accepted."""
        assert value.lower() == normalize_email(value)


class TestHashEmail:
    def test_known_vector(self) -> None:
        """The digest is SHA-256 of the normalised address, as ad networks compute it."""
        assert TEST_EMAIL_SHA256 == hash_email(" Test@Example.com ")
        assert sha256("test@example.com") == hash_email("TEST@example.com")

    def test_already_hashed_passes_through_lower_cased(self) -> None:
        """A digest is not hashed again, so hosts can mix raw and pre-hashed data."""
        assert TEST_EMAIL_SHA256 == hash_email(f"  {TEST_EMAIL_SHA256.upper()}  ")

    def test_invalid_raises_and_try_returns_none(self) -> None:
        """Something that is neither an email nor a digest is refused."""
        with pytest.raises(ConfigurationError):
            hash_email("abc123")

        assert try_hash_email("abc123") is None
        assert try_hash_email("a" * 63) is None

    @given(st.one_of(st.emails(), hex_digests, st.text()))
    def test_idempotent(self, value: str) -> None:
        """hash(hash(x)) == hash(x): re-hashing a digest returns it unchanged."""
        once = try_hash_email(value)

        if once is not None:
            assert once == hash_email(once)
            assert 64 == len(once)


class TestNormalizePhone:
    @pytest.mark.parametrize(
        ("value", "country", "expected"),
        [
            ("+1 (555) 123-4567", None, "+15551234567"),
            ("+1.555.123.4567", None, "+15551234567"),
            ("0044 20 7946 0958", None, "+442079460958"),
            ("+44 (0)20 7946 0958", None, "+442079460958"),
            ("(555) 123-4567", "1", "+15551234567"),
            ("(555) 123-4567", "+1", "+15551234567"),
            ("020 7946 0958", "44", "+442079460958"),
            ("06 1234 5678", "39", "+390612345678"),
            ("1-555-123-4567", "1", "+15551234567"),
            ("+1 555 123 4567", "1", "+15551234567"),
        ],
    )
    def test_e164(self, value: str, country: str | None, expected: str) -> None:
        """Separators go, 00 becomes +, national numbers get the default country code."""
        assert expected == normalize_phone(value, country)
        assert expected == try_normalize_phone(value, country)

    @pytest.mark.parametrize(
        ("value", "country", "reason"),
        [
            ("", None, "is empty"),
            ("555 123 4567", None, "no country code"),
            ("+1 555 CALL NOW", None, "digits"),
            ("+1234567", None, "has 7 digits"),
            ("+1234567890123456", None, "has 16 digits"),
            ("+0123456789", None, "starting with 0"),
            ("\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18", "1", "digits"),
        ],
    )
    def test_invalid(self, value: str, country: str | None, reason: str) -> None:
        """Numbers that cannot be E.164 raise from the plain helper and give None from try_."""
        with pytest.raises(ConfigurationError, match=reason) as info:
            normalize_phone(value, country)

        assert "phone" == info.value.field
        assert try_normalize_phone(value, country) is None

    @pytest.mark.parametrize("country", ["", "0", "1234", "+", "a1", "44 "])
    def test_bad_default_country_code_raises_even_from_try(self, country: str) -> None:
        """A bad default country code is a caller bug, so it is never silently None."""
        with pytest.raises(ConfigurationError, match="default_country_code"):
            try_normalize_phone("555 123 4567", country)

    def test_limits_are_inclusive(self) -> None:
        """E.164 allows 8 to 15 digits after the +."""
        assert "+12345678" == normalize_phone("+12345678")
        assert "+123456789012345" == normalize_phone("+123456789012345")

    @given(phones, st.sampled_from([None, "1", "44", "39"]))
    def test_idempotent(self, value: str, country: str | None) -> None:
        """Normalising an E.164 number again returns it unchanged."""
        once = try_normalize_phone(value, country)

        if once is not None:
            assert once == normalize_phone(once)
            assert once == normalize_phone(once, country)


class TestHashPhone:
    def test_known_vector(self) -> None:
        """The digest is SHA-256 of the E.164 string."""
        assert US_PHONE_SHA256 == hash_phone("+1 (555) 123-4567")
        assert sha256("+15551234567") == hash_phone("555-123-4567", "1")

    def test_already_hashed_passes_through(self) -> None:
        """A digest passes through lower-cased."""
        assert US_PHONE_SHA256 == hash_phone(US_PHONE_SHA256.upper())

    def test_invalid(self) -> None:
        """A number without a country code cannot be hashed meaningfully."""
        with pytest.raises(ConfigurationError, match="no country code"):
            hash_phone("555 123 4567")

        assert try_hash_phone("555 123 4567") is None

    @given(st.one_of(phones, hex_digests))
    def test_idempotent(self, value: str) -> None:
        """hash(hash(x)) == hash(x)."""
        once = try_hash_phone(value, "1")

        if once is not None:
            assert once == hash_phone(once)


EMAILS = {"u1": "Jane@Example.com", "u2": "not-an-email"}
PHONES = {"u2": "+1 555 123 4567", "u3": "555 123 4567"}


def priority_mapping() -> IdentifierMapping:
    return IdentifierMapping(
        [
            (K.EMAIL_SHA256, EMAILS.get),
            (K.PHONE_SHA256, PHONES.get),
            (K.USER_ID, lambda key: key if key.startswith("u") else None),
        ]
    )


class TestIdentifierMapping:
    def test_primary_wins(self) -> None:
        """The first rule that yields a value is used, hashed for hashed kinds."""
        assert Identifier(K.EMAIL_SHA256, sha256("jane@example.com")) == (
            priority_mapping().resolve("u1")
        )

    def test_falls_back_past_missing_and_invalid_values(self) -> None:
        """A missing or unusable value moves on to the next rule."""
        mapping = priority_mapping()

        assert Identifier(K.PHONE_SHA256, US_PHONE_SHA256) == mapping.resolve("u2")
        assert Identifier(K.USER_ID, "u3") == mapping.resolve("u3")

    def test_unresolved_is_none(self) -> None:
        """A key no rule resolves gives None (the engine skips it as unresolved_mapping)."""
        assert priority_mapping().resolve("x9") is None

    def test_skips_kinds_the_destination_does_not_accept(self) -> None:
        """Rules for kinds outside `accepted` are never consulted."""
        consulted: list[str] = []

        def emails(key: str) -> str:
            consulted.append(key)
            return "jane@example.com"

        mapping = IdentifierMapping([(K.EMAIL_SHA256, emails), (K.USER_ID, str.upper)])

        assert Identifier(K.USER_ID, "U1") == mapping.resolve("u1", frozenset({K.USER_ID}))
        assert [] == consulted
        assert mapping.resolve("u1", frozenset({K.DEVICE_ID})) is None

    def test_accepted_none_means_any(self) -> None:
        """Without a restriction the first rule applies."""
        assert K.EMAIL_SHA256 == priority_mapping().resolve("u1", None).kind  # type: ignore[union-attr]

    def test_plain_kinds_are_normalised(self) -> None:
        """Raw email and phone kinds are sent normalised, other kinds as returned."""
        mapping = IdentifierMapping(
            [(K.EMAIL, EMAILS.get), (K.PHONE, PHONES.get), (K.DEVICE_ID, lambda _: " dev ")],
            default_country_code="1",
        )

        assert Identifier(K.EMAIL, "jane@example.com") == mapping.resolve("u1")
        assert Identifier(K.PHONE, "+15551234567") == mapping.resolve("u3")
        assert Identifier(K.DEVICE_ID, " dev ") == mapping.resolve("zz")

    def test_blank_values_are_missing(self) -> None:
        """An empty or blank value is not an identifier."""
        mapping = IdentifierMapping([(K.USER_ID, lambda _: "  "), (K.DEVICE_ID, lambda _: "")])

        assert mapping.resolve("u1") is None

    def test_identity(self) -> None:
        """identity() uses the member key itself, as the given kind."""
        assert Identifier(K.USER_ID, "u1") == IdentifierMapping.identity().resolve("u1")
        assert Identifier(K.DEVICE_ID, "d") == (
            IdentifierMapping.identity(K.DEVICE_ID).resolve("d")
        )
        assert IdentifierMapping.identity() == IdentifierMapping.identity()

    def test_hashed_email(self) -> None:
        """hashed_email() hashes what the lookup returns and passes digests through."""
        lookup = {"a": "TEST@example.com", "b": TEST_EMAIL_SHA256.upper()}.get
        mapping = IdentifierMapping.hashed_email(lookup)

        assert Identifier(K.EMAIL_SHA256, TEST_EMAIL_SHA256) == mapping.resolve("a")
        assert Identifier(K.EMAIL_SHA256, TEST_EMAIL_SHA256) == mapping.resolve("b")
        assert mapping.resolve("c") is None

    def test_hashed_phone_uses_default_country_code(self) -> None:
        """hashed_phone() normalises national numbers with the given country code."""
        mapping = IdentifierMapping.hashed_phone(PHONES.get, default_country_code="+1")

        assert Identifier(K.PHONE_SHA256, US_PHONE_SHA256) == mapping.resolve("u3")
        assert IdentifierMapping.hashed_phone(PHONES.get).resolve("u3") is None

    def test_kinds(self) -> None:
        """kinds lists every kind the mapping can produce."""
        assert frozenset({K.EMAIL_SHA256, K.PHONE_SHA256, K.USER_ID}) == priority_mapping().kinds

    def test_resolve_many(self) -> None:
        """Bulk resolution keeps input order and reports unresolved keys."""
        members, unresolved = priority_mapping().resolve_many(["u3", "x1", "u1", "x2"])

        assert [
            Member("u3", Identifier(K.USER_ID, "u3")),
            Member("u1", Identifier(K.EMAIL_SHA256, sha256("jane@example.com"))),
        ] == members
        assert ["x1", "x2"] == unresolved

    @given(st.lists(member_keys(8), max_size=12))
    def test_identity_members_are_the_members_the_constructors_build(self, keys: list[str]) -> None:
        """The identity mapping's bulk path builds ordinary frozen Members."""
        built = identity_members(K.USER_ID, keys)

        expected = [Member(k, Identifier(K.USER_ID, k)) for k in keys]
        assert expected == built
        assert [hash(m) for m in expected] == [hash(m) for m in built]
        assert [repr(m) for m in expected] == [repr(m) for m in built]
        assert all(type(m) is Member and type(m.identifier) is Identifier for m in built)
        if built:
            with pytest.raises(attrs.exceptions.FrozenInstanceError):
                built[0].key = "changed"  # type: ignore[misc]
            assert "changed" == attrs.evolve(built[0], key="changed").key

    def test_resolve_many_with_accepted(self) -> None:
        """Bulk resolution honours accepted kinds too."""
        members, unresolved = priority_mapping().resolve_many(["u1", "u2"], {K.PHONE_SHA256})

        assert [Member("u2", Identifier(K.PHONE_SHA256, US_PHONE_SHA256))] == members
        assert ["u1"] == unresolved

    def test_resolver_returning_non_str_is_a_clear_error(self) -> None:
        """A buggy resolver is reported, naming the kind, instead of skipping members."""

        def buggy(key: str) -> object:
            return 42

        mapping = IdentifierMapping([(K.USER_ID, buggy)])  # type: ignore[list-item]

        with pytest.raises(ConfigurationError, match="returned int") as info:
            mapping.resolve("u1")

        assert "user_id" == info.value.value

    def test_kinds_may_be_given_as_strings(self) -> None:
        """Kinds convert from their values, as everywhere in the API."""
        mapping = IdentifierMapping([("device_id", str.upper)])

        assert frozenset({K.DEVICE_ID}) == mapping.kinds

    @pytest.mark.parametrize(
        ("rules", "match"),
        [
            ([], "at least one"),
            ([(K.USER_ID, "not callable")], "callable"),
            ([("phone_number", str.upper)], "unknown IdentifierKind"),
            ([K.USER_ID], "pairs"),
        ],
    )
    def test_invalid_rules(self, rules: list[object], match: str) -> None:
        """Bad rules are refused at construction with a ConfigurationError."""
        with pytest.raises(ConfigurationError, match=match):
            IdentifierMapping(rules)  # type: ignore[arg-type]

    def test_invalid_default_country_code(self) -> None:
        """The default country code is validated up front."""
        with pytest.raises(ConfigurationError, match="default_country_code"):
            IdentifierMapping([(K.PHONE, str)], default_country_code="x")

    def test_repr_hides_resolvers(self) -> None:
        """The repr names the kinds only; resolvers may hold connections or secrets."""

        class SecretLookup:
            def __call__(self, key: str) -> str | None:
                return None

            def __repr__(self) -> str:
                return "SecretLookup(password='hunter2')"

        mapping = IdentifierMapping(
            [(K.EMAIL_SHA256, SecretLookup()), (K.USER_ID, str)], default_country_code="44"
        )

        assert "IdentifierMapping(['email_sha256', 'user_id'], default_country_code='44')" == (
            repr(mapping)
        )


class TestIdentifiersNoStoreCanHold:
    """
    A resolver that returns text no store can hold (a lone surrogate, NUL)
    gives no identifier: the member is skipped as unresolved, and the rest
    are delivered and recorded. Found by an outside test: on SQLite the run
    failed after the destination had taken the batch, and every later run
    failed the same way until the sync paused.
    """

    @pytest.mark.parametrize("bad", ["u1\ud800", "u1\x00"])
    def test_the_identifier_constructor_refuses_it(self, bad: str) -> None:
        with pytest.raises(ConfigurationError, match="NUL or lone surrogates"):
            Identifier(IdentifierKind.USER_ID, bad)

    @pytest.mark.parametrize("bad", ["u1\ud800", "u1\x00", "a\ud800@example.com"])
    @pytest.mark.parametrize("kind", [IdentifierKind.USER_ID, IdentifierKind.EMAIL_SHA256])
    def test_a_mapping_skips_it(self, bad: str, kind: IdentifierKind) -> None:
        mapping = IdentifierMapping([(kind, {"u1": bad, "u2": "u2@example.com"}.get)])
        members, unresolved = mapping.resolve_many(["u1", "u2"])
        assert unresolved == ["u1"]
        assert [m.key for m in members] == ["u2"]

    @pytest.mark.parametrize("store", ["memory", "sqlite"])
    def test_a_run_delivers_the_rest_and_says_so(self, store: str, tmp_path: Path) -> None:
        storage = MemoryStorage() if store == "memory" else SQLiteStorage(tmp_path / "cs.db")
        clock = FakeClock(datetime(2030, 1, 7, 10, 50, tzinfo=timezone.utc))
        scheduler = cs.Scheduler(storage, clock=clock)
        destination = RecordingDestination()
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1", "u2"]))
        scheduler.add_destination("d", destination)
        scheduler.add_mapping(
            "m",
            cs.IdentifierMapping([(cs.IdentifierKind.USER_ID, {"u1": "u1\ud800", "u2": "u2"}.get)]),
        )
        scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s", mapping_id="m")
        (run,) = scheduler.run_due()
        assert run.status is cs.RunStatus.PARTIAL, run
        assert (run.added, run.skipped) == (1, 1)
        assert destination.audience("s") == {"u2"}
        clock.advance(3600)
        (again,) = scheduler.run_due()
        assert (again.added, again.skipped) == (0, 1)
        storage.close()


class CountingLookup:
    """A bulk resolver over a dict that records every batch it is asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, keys: Sequence[str]) -> dict[str, str]:
        self.calls.append(tuple(keys))
        return {k: self.values[k] for k in keys if k in self.values}


def bulk_priority_mapping() -> tuple[IdentifierMapping, CountingLookup, CountingLookup]:
    """priority_mapping() with its first two rules as Bulk lookups (the third stays per key)."""
    emails, phones = CountingLookup(EMAILS), CountingLookup(PHONES)
    mapping = IdentifierMapping(
        [
            (K.EMAIL_SHA256, Bulk(emails)),
            (K.PHONE_SHA256, Bulk(phones)),
            (K.USER_ID, lambda key: key if key.startswith("u") else None),
        ]
    )
    return mapping, emails, phones


class TestBulkResolvers:
    def test_resolves_like_the_per_key_mapping(self) -> None:
        """Bulk rules give the members, order and unresolved keys of the per-key rules."""
        keys = ["u3", "x1", "u1", "x2", "u2"]

        assert priority_mapping().resolve_many(keys) == bulk_priority_mapping()[0].resolve_many(
            keys
        )

    @given(st.lists(st.sampled_from(["u1", "u2", "u3", "x1", "x2", "u9"]), max_size=10))
    def test_any_keys_like_the_per_key_mapping(self, keys: list[str]) -> None:
        """For any batch (repeats included), bulk and per-key resolution agree."""
        assert priority_mapping().resolve_many(keys) == bulk_priority_mapping()[0].resolve_many(
            keys
        )

    def test_one_call_per_rule_with_the_keys_left(self) -> None:
        """Each bulk rule is called once per batch, with only the keys earlier rules left."""
        mapping, emails, phones = bulk_priority_mapping()

        mapping.resolve_many(["u3", "x1", "u1", "u2"])

        assert [("u3", "x1", "u1", "u2")] == emails.calls
        # u1 resolved by email; u2's email is unusable, so it falls back too.
        assert [("u3", "x1", "u2")] == phones.calls

    def test_no_call_once_every_key_is_resolved(self) -> None:
        """A later rule is not called when nothing is left for it."""
        mapping, emails, phones = bulk_priority_mapping()

        mapping.resolve_many(["u1"])

        assert ([("u1",)], []) == (emails.calls, phones.calls)

    def test_accepted_kinds_skip_bulk_rules(self) -> None:
        """A rule of a kind the destination refuses is never called."""
        mapping, emails, _ = bulk_priority_mapping()

        members, unresolved = mapping.resolve_many(["u2", "u1"], {K.PHONE_SHA256})

        assert [Member("u2", Identifier(K.PHONE_SHA256, US_PHONE_SHA256))] == members
        assert ["u1"] == unresolved
        assert [] == emails.calls

    def test_resolve_one_key(self) -> None:
        """resolve() works on a bulk rule too (a batch of one)."""
        mapping, emails, _ = bulk_priority_mapping()

        assert Identifier(K.EMAIL_SHA256, sha256("jane@example.com")) == mapping.resolve("u1")
        assert mapping.resolve("x9") is None
        assert [("u1",), ("x9",)] == emails.calls

    def test_named_constructors_take_bulk(self) -> None:
        """hashed_email and hashed_phone take a Bulk lookup."""
        by_email = IdentifierMapping.hashed_email(Bulk(CountingLookup({"a": "A@example.com"})))
        by_phone = IdentifierMapping.hashed_phone(
            Bulk(CountingLookup({"a": "555 123 4567"})), default_country_code="1"
        )

        assert sha256("a@example.com") == by_email.resolve_many(["a"])[0][0].identifier.value
        assert US_PHONE_SHA256 == by_phone.resolve_many(["a"])[0][0].identifier.value

    def test_answers_none_or_unusable_count_as_missing(self) -> None:
        """None, an unusable value or a key not asked for resolve nothing."""
        mapping = IdentifierMapping(
            [(K.EMAIL, Bulk(lambda keys: {"a": None, "b": "no-at", "zz": "z@example.com"}))]
        )

        assert ([], ["a", "b", "c"]) == mapping.resolve_many(["a", "b", "c"])

    def test_non_mapping_answer_is_a_clear_error(self) -> None:
        """A bulk resolver answering a list is reported, naming the kind."""
        mapping = IdentifierMapping([(K.USER_ID, Bulk(list))])  # type: ignore[arg-type]

        with pytest.raises(ConfigurationError, match="must return a mapping") as info:
            mapping.resolve_many(["u1"])

        assert "user_id" == info.value.value

    def test_non_str_value_is_a_clear_error(self) -> None:
        """A bulk resolver answering a non-str value for a key is reported."""
        mapping = IdentifierMapping([(K.USER_ID, Bulk(lambda keys: dict.fromkeys(keys, 7)))])  # type: ignore[arg-type]

        with pytest.raises(ConfigurationError, match="returned int"):
            mapping.resolve_many(["u1"])

    def test_bulk_function_as_per_key_resolver_says_wrap_it(self) -> None:
        """A batch function given as a per-key resolver fails with the fix in the message."""
        mapping = IdentifierMapping([(K.USER_ID, CountingLookup({"u1": "x"}))])  # type: ignore[list-item]

        with pytest.raises(ConfigurationError, match=r"identifiers\.Bulk"):
            mapping.resolve_many(["u1"])

    def test_not_callable_is_refused(self) -> None:
        """Bulk validates its resolver."""
        with pytest.raises(ConfigurationError, match="must be callable"):
            Bulk({"u1": "x"})  # type: ignore[arg-type]

    def test_a_batch_past_max_keys_takes_several_calls(self) -> None:
        """A whole-file batch is looked up max_keys at a time, in order."""
        lookup = CountingLookup({f"k{i:02d}": f"v{i}" for i in range(0, 25, 2)})
        mapping = IdentifierMapping([(K.USER_ID, Bulk(lookup, max_keys=10))])
        keys = [f"k{i:02d}" for i in range(25)]

        members, unresolved = mapping.resolve_many(keys)

        assert [10, 10, 5] == [len(c) for c in lookup.calls]
        assert keys == [k for c in lookup.calls for k in c]
        assert [f"k{i:02d}" for i in range(0, 25, 2)] == [m.key for m in members]
        assert [f"k{i:02d}" for i in range(1, 25, 2)] == unresolved

    def test_the_default_cap_keeps_a_database_query_small(self) -> None:
        """By default at most 10,000 keys go to one call."""
        assert 10_000 == Bulk(CountingLookup({})).max_keys

    @pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True])
    def test_bad_max_keys(self, bad: object) -> None:
        """max_keys is a positive int."""
        with pytest.raises(ConfigurationError, match="max_keys"):
            Bulk(CountingLookup({}), max_keys=bad)  # type: ignore[arg-type]

    def test_repr_hides_the_resolver(self) -> None:
        """The resolver may hold a connection: neither Bulk nor the mapping shows it."""
        mapping = IdentifierMapping.hashed_email(Bulk(CountingLookup({})))

        assert ("Bulk(...)", "IdentifierMapping(['email_sha256'])") == (
            repr(mapping.rules[0][1]),
            repr(mapping),
        )


class TestBulkResolversInARun:
    """
    A run resolves a batch at a time: a bulk rule costs one call per batch
    (and rule), never one per member.
    """

    def test_one_call_per_batch_per_rule_on_sqlite(self, tmp_path: Path) -> None:
        """2,500 members in batches of 1,000: three calls per rule, each a batch of keys."""
        keys = [f"u{i:04d}" for i in range(2_500)]
        emails = CountingLookup({k: f"{k}@example.com" for k in keys if int(k[1:]) % 5})
        ids = CountingLookup({k: f"id-{k}" for k in keys})
        clock = FakeClock(datetime(2030, 1, 7, 10, 50, tzinfo=timezone.utc))
        destination = RecordingDestination(
            cs.Capabilities(
                max_batch_size=1_000,
                accepted_identifiers=[K.EMAIL_SHA256, K.USER_ID],
            )
        )
        with SQLiteStorage(tmp_path / "cs.db") as storage:
            scheduler = cs.Scheduler(storage, clock=clock)
            scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: keys))
            scheduler.add_destination("d", destination)
            scheduler.add_mapping(
                "m",
                IdentifierMapping([(K.EMAIL_SHA256, Bulk(emails)), (K.USER_ID, Bulk(ids))]),
            )
            scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s", mapping_id="m")

            (run,) = scheduler.run_due()

        assert [1_000, 1_000, 500] == [len(c) for c in emails.calls]
        # Only the keys without an email (every fifth) reach the fallback.
        assert [200, 200, 100] == [len(c) for c in ids.calls]
        assert keys == [k for c in emails.calls for k in c]
        assert (cs.RunStatus.SUCCEEDED, 2_500, 0) == (run.status, run.added, run.skipped)
        sent = {i for b in destination.batches for i in b.identifiers}
        assert sha256("u0001@example.com") in sent
        assert "id-u0000" in sent

    def test_unresolved_members_are_skipped(self, tmp_path: Path) -> None:
        """Keys no bulk rule answers are skipped with unresolved_mapping, the rest delivered."""
        keys = ["a", "b", "c"]
        clock = FakeClock(datetime(2030, 1, 7, 10, 50, tzinfo=timezone.utc))
        destination = RecordingDestination()
        with SQLiteStorage(tmp_path / "cs.db") as storage:
            scheduler = cs.Scheduler(storage, clock=clock)
            scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: keys))
            scheduler.add_destination("d", destination)
            scheduler.add_mapping(
                "m", IdentifierMapping([(K.USER_ID, Bulk(CountingLookup({"b": "B"})))])
            )
            scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="s", mapping_id="m")

            (run,) = scheduler.run_due()
            skipped = [
                (row["key"], row["reason"])
                for row in scheduler.export_history("s")[0]["members"]  # type: ignore[attr-defined]
            ]

        assert (cs.RunStatus.PARTIAL, 1, 2) == (run.status, run.added, run.skipped)
        assert {"B"} == destination.audience("s")
        assert [("a", "unresolved_mapping"), ("c", "unresolved_mapping")] == skipped
