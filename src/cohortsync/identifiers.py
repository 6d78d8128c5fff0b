"""
From member keys to the identifiers destinations accept.

Ad networks match audiences on SHA-256 hashes of *normalised* emails and phone
numbers: ``" Jane@Example.com"`` and ``"jane@example.com"`` must hash alike or
the member silently never matches. The helpers here normalise first, hash
second, and pass values that are already hashed through untouched, so a host
may hand over raw or hashed values without tracking which is which.

Each helper comes in two flavours:

* ``normalize_email`` / ``hash_email`` / ``normalize_phone`` / ``hash_phone``
  raise :class:`~cohortsync.exceptions.ConfigurationError` on a value they
  cannot use: for values the host typed in (configuration, a single lookup).
* ``try_normalize_email`` / ``try_hash_email`` / ``try_normalize_phone`` /
  ``try_hash_phone`` return ``None`` instead: for bulk data, where one bad
  address must skip one member, not fail a run.

Error messages never echo the offending value: emails and phone numbers are
personal data and error messages end up in logs and run history.

:class:`IdentifierMapping` ties these together with priority fallback. Its
rules look identifiers up one member key at a time (a :data:`Resolver`), or a
whole batch of keys in one call (a :data:`BulkResolver` wrapped in
:class:`Bulk`): one database query per batch instead of one per member.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TypeAlias

import attrs

from cohortsync import _validators as v
from cohortsync._destination import (
    Identifier,
    IdentifierKind,
    Member,
    _IdentifierKindValue,
    identity_members,
)
from cohortsync.exceptions import ConfigurationError

__all__ = [
    "MAX_EMAIL_LENGTH",
    "MAX_PHONE_DIGITS",
    "MIN_PHONE_DIGITS",
    "Bulk",
    "BulkResolver",
    "IdentifierMapping",
    "Resolver",
    "hash_email",
    "hash_phone",
    "normalize_email",
    "normalize_phone",
    "try_hash_email",
    "try_hash_phone",
    "try_normalize_email",
    "try_normalize_phone",
]

Resolver: TypeAlias = Callable[[str], "str | None"]
"""
Takes a member key, returns the raw identifier value for it, or ``None``.
"""

BulkResolver: TypeAlias = Callable[[Sequence[str]], Mapping[str, "str | None"]]
"""
Takes a batch of member keys, returns the raw identifier value of each key it
knows; a key missing from the answer (or mapped to ``None``) has none.
"""


@attrs.frozen
class Bulk:
    """
    Marks a rule's resolver as a :data:`BulkResolver`: the mapping calls it
    once per batch of member keys (a destination batch, or a chunk of the
    run's diff) instead of once per member, so a database-backed lookup is
    one query per batch (``WHERE id IN (...)``), not one per member.

    With priority fallback, each later rule is called only with the keys the
    earlier ones left unresolved: at most one call per rule per batch.

    Args:
        resolver: The batch lookup. It receives the keys (a tuple of str)
            and may answer more or fewer keys than asked: only the keys
            asked are read from its answer.
        max_keys: Most keys per call. Destination batches are 1,000 to
            10,000 keys for most destinations, but a whole-file destination
            (Amazon S3) takes the full audience in one batch: without a cap
            its lookup would be one query with a million parameters, past
            what databases accept (SQLite: 32,766, PostgreSQL: 65,535). A
            larger batch is looked up in several calls of at most this many.

    Example::

        def emails_for(keys: Sequence[str]) -> dict[str, str]:
            rows = User.objects.filter(pk__in=keys).values_list("pk", "email")
            return {str(pk): email for pk, email in rows}

        IdentifierMapping.hashed_email(Bulk(emails_for))
    """

    resolver: BulkResolver = attrs.field()
    max_keys: int = attrs.field(default=10_000, kw_only=True, validator=v.count(1))

    @resolver.validator
    def _callable(self, _: object, value: object) -> None:
        if not callable(value):
            raise ConfigurationError(
                "resolver", type(value).__name__, "a Bulk resolver must be callable"
            )

    def __repr__(self) -> str:
        # The function may close over a connection or credentials.
        return "Bulk(...)"


MAX_EMAIL_LENGTH = 254  # RFC 5321 path limit; longer values are not deliverable addresses
MIN_PHONE_DIGITS = 8
MAX_PHONE_DIGITS = 15  # E.164

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_PHONE_NOISE = re.compile(r"[\s\-.()]")
_ASCII_DIGITS = re.compile(r"[0-9]+")
_COUNTRY_CODE = re.compile(r"\+?([1-9][0-9]{0,2})")
# Countries whose leading 0 is part of the number even when dialled from
# abroad (Italy, San Marino, Vatican): dropping it would make a different number.
_KEEPS_LEADING_ZERO = frozenset({"39", "378", "379"})
_NANP_WITH_TRUNK = 11  # North American numbers have 10 digits, 11 with the leading 1


class _InvalidError(Exception):
    """
    Internal: why a value is unusable, turned into ``None`` or a ConfigurationError.
    """


def _redacted(value: object) -> str:
    if isinstance(value, str):
        return f"<redacted, {len(value)} chars>"
    return f"<{type(value).__name__}>"


def _is_sha256(value: str) -> bool:
    return _SHA256_HEX.fullmatch(value) is not None


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _email(value: object) -> str:
    if not isinstance(value, str):
        raise _InvalidError(f"must be a str, not {type(value).__name__}")
    email = value.strip().lower()
    if not email:
        raise _InvalidError("is empty")
    local, at, domain = email.rpartition("@")
    if not at:
        raise _InvalidError("has no '@'")
    if not local or not domain:
        raise _InvalidError("needs text on both sides of the '@'")
    if any(c.isspace() for c in email):
        raise _InvalidError("contains whitespace")
    if len(email) > MAX_EMAIL_LENGTH:
        raise _InvalidError(f"is longer than {MAX_EMAIL_LENGTH} characters")
    return email


def _country_code(value: object) -> str | None:
    """
    Validate *default_country_code* ("1", "+44", ...). A bad one is a programming
    error, so it raises even from the ``try_*`` helpers.
    """
    if value is None:
        return None
    match = _COUNTRY_CODE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigurationError(
            "default_country_code", value, "must be 1 to 3 digits, optionally after '+'"
        )
    return match.group(1)


def _phone(value: object, country_code: str | None) -> str:
    if not isinstance(value, str):
        raise _InvalidError(f"must be a str, not {type(value).__name__}")
    compact = _PHONE_NOISE.sub("", value)
    if not compact:
        raise _InvalidError("is empty")
    if compact.startswith(("+", "00")):
        # "+44 (0)20 ...": the bracketed trunk zero is not dialled from abroad.
        compact = _PHONE_NOISE.sub("", value.replace("(0)", ""))
        digits = compact[1:] if compact.startswith("+") else compact[2:]
    elif country_code is not None:
        national = compact
        if national.startswith("0") and country_code not in _KEEPS_LEADING_ZERO:
            national = national[1:]
        elif country_code == "1" and len(national) == _NANP_WITH_TRUNK and national[0] == "1":
            national = national[1:]  # "1-555-123-4567": the NANP trunk prefix is 1
        digits = country_code + national
    else:
        raise _InvalidError("has no country code: start it with '+' or '00', or pass one")
    if _ASCII_DIGITS.fullmatch(digits) is None:
        raise _InvalidError("must be digits after the '+' or '00' prefix")
    if digits.startswith("0"):
        raise _InvalidError("has a country code starting with 0")
    if not MIN_PHONE_DIGITS <= len(digits) <= MAX_PHONE_DIGITS:
        raise _InvalidError(
            f"has {len(digits)} digits; E.164 allows {MIN_PHONE_DIGITS} to {MAX_PHONE_DIGITS}"
        )
    return "+" + digits


def _hash_email(value: object) -> str:
    if isinstance(value, str) and _is_sha256(value.strip()):
        return value.strip().lower()
    return _sha256(_email(value))


def _hash_phone(value: object, country_code: str | None) -> str:
    if isinstance(value, str) and _is_sha256(value.strip()):
        return value.strip().lower()
    return _sha256(_phone(value, country_code))


def normalize_email(value: str) -> str:
    """
    Return *value* trimmed and lower-cased, the form ad networks hash.

    Only the two documented steps are applied; provider-specific rewriting
    (Gmail dots, ``+tags``) would make hashes disagree with other senders'.

    Raises:
        ConfigurationError: *value* is empty, has no ``@`` with text on both
            sides, contains whitespace or is longer than 254 characters.
    """
    try:
        return _email(value)
    except _InvalidError as e:
        raise ConfigurationError("email", _redacted(value), str(e)) from None


def try_normalize_email(value: str) -> str | None:
    """
    Like :func:`normalize_email`, but return ``None`` for an unusable value.
    """
    try:
        return _email(value)
    except _InvalidError:
        return None


def hash_email(value: str) -> str:
    """
    Return the lower-case hex SHA-256 of the normalised email.

    A value that already is a SHA-256 hex digest (64 hex digits, any case) is
    returned lower-cased instead of hashed again, so hashing is idempotent and
    hosts may mix raw and pre-hashed data.

    Raises:
        ConfigurationError: *value* is neither a usable email nor a digest.
    """
    try:
        return _hash_email(value)
    except _InvalidError as e:
        raise ConfigurationError("email", _redacted(value), str(e)) from None


def try_hash_email(value: str) -> str | None:
    """
    Like :func:`hash_email`, but return ``None`` for an unusable value.
    """
    try:
        return _hash_email(value)
    except _InvalidError:
        return None


def normalize_phone(value: str, default_country_code: str | None = None) -> str:
    """
    Return *value* in E.164 form: ``+`` and 8 to 15 digits.

    Spaces, dashes, dots and parentheses are dropped, a ``00`` prefix becomes
    ``+`` and ``+44 (0)20 ...`` loses its bracketed trunk zero. A number without
    either prefix is national: it gets *default_country_code*, after dropping
    the trunk prefix, one leading ``0`` (except for Italy, San Marino and the
    Vatican, where the zero is part of the international number) or, for
    country code 1, the ``1`` of an 11-digit number. Without a default country
    code a national number is refused rather than guessed.

    Args:
        value: The phone number as the host stores it.
        default_country_code: Calling code for national numbers, e.g. ``"1"``
            or ``"+44"``.

    Raises:
        ConfigurationError: *value* cannot be made into an E.164 number, or
            *default_country_code* is not 1 to 3 digits.
    """
    country_code = _country_code(default_country_code)
    try:
        return _phone(value, country_code)
    except _InvalidError as e:
        raise ConfigurationError("phone", _redacted(value), str(e)) from None


def try_normalize_phone(value: str, default_country_code: str | None = None) -> str | None:
    """
    Like :func:`normalize_phone`, but return ``None`` for an unusable number.

    Raises:
        ConfigurationError: *default_country_code* is invalid: that is a bug in
            the caller, not bad data.
    """
    country_code = _country_code(default_country_code)
    try:
        return _phone(value, country_code)
    except _InvalidError:
        return None


def hash_phone(value: str, default_country_code: str | None = None) -> str:
    """
    Return the lower-case hex SHA-256 of the E.164 form of *value*.

    An existing SHA-256 hex digest passes through lower-cased (no phone number
    has 64 digits, so the two cannot be confused).

    Raises:
        ConfigurationError: As :func:`normalize_phone`.
    """
    country_code = _country_code(default_country_code)
    try:
        return _hash_phone(value, country_code)
    except _InvalidError as e:
        raise ConfigurationError("phone", _redacted(value), str(e)) from None


def try_hash_phone(value: str, default_country_code: str | None = None) -> str | None:
    """
    Like :func:`hash_phone`, but return ``None`` for an unusable number.

    Raises:
        ConfigurationError: *default_country_code* is invalid.
    """
    country_code = _country_code(default_country_code)
    try:
        return _hash_phone(value, country_code)
    except _InvalidError:
        return None


def _to_country_code(value: str | None) -> str | None:
    return _country_code(value)


def _identity(key: str) -> str:
    return key


def _has_bulk(rules: tuple[tuple[IdentifierKind, Resolver | Bulk], ...]) -> bool:
    """Whether some rule is a :class:`Bulk` (checked once per call, never per member)."""
    return any(isinstance(resolver, Bulk) for _, resolver in rules)


_VERBATIM = frozenset(
    {IdentifierKind.USER_ID, IdentifierKind.DEVICE_ID, IdentifierKind.ADVERTISING_ID}
)
"""Kinds whose values are sent as the resolver returns them (no normalising)."""


def _to_rules(
    value: Iterable[tuple[IdentifierKind | _IdentifierKindValue, Resolver | Bulk]],
) -> tuple[tuple[IdentifierKind, Resolver | Bulk], ...]:
    to_kind = v.to_enum(IdentifierKind, "kind")
    try:
        pairs = [(to_kind(kind), resolver) for kind, resolver in value]
    except ConfigurationError:
        raise
    except (TypeError, ValueError):
        raise ConfigurationError(
            "rules", type(value).__name__, "must be (IdentifierKind, resolver) pairs"
        ) from None
    if not pairs:
        raise ConfigurationError("rules", (), "needs at least one (kind, resolver) pair")
    for kind, resolver in pairs:
        if not callable(resolver) and not isinstance(resolver, Bulk):
            raise ConfigurationError(
                "rules",
                kind.value,
                f"resolver must be callable or a Bulk, not {type(resolver).__name__}",
            )
    return tuple(pairs)


def _not_str(kind: IdentifierKind, raw: object) -> ConfigurationError:
    hint = (
        " (a function that answers many keys at once goes in identifiers.Bulk)"
        if isinstance(raw, Mapping)
        else ""
    )
    return ConfigurationError(
        "resolver",
        kind.value,
        f"returned {type(raw).__name__}; a resolver must return a str or None{hint}",
    )


@attrs.frozen
class IdentifierMapping:
    """
    How a sync turns member keys into identifiers a destination accepts.

    Rules are tried in order (primary, secondary, ...); kinds the destination
    does not accept are skipped, and the first resolver that yields a usable
    value wins. Values are prepared per kind, so a resolver can simply return
    what the host stores:

    * ``EMAIL`` / ``PHONE``: normalised (trimmed lower-case email; E.164 phone).
    * ``EMAIL_SHA256`` / ``PHONE_SHA256``: normalised then hashed; digests pass
      through. Raw data can therefore never be sent under a hashed kind.
    * other kinds: used as returned.

    A value that cannot be prepared (an email without ``@``) counts as missing
    and the next rule is tried. A member no rule resolves is skipped by the
    engine with reason ``unresolved_mapping``.

    A resolver is either a :data:`Resolver`, called once per member key (the
    simple path: fine for a dict's ``get`` or a cache, slow for a database,
    one query per member), or a :class:`Bulk` of a :data:`BulkResolver`,
    called once per batch with every key the earlier rules left unresolved
    (the path to take for a database: one query per batch and rule). The two
    may be mixed in one mapping.

    Args:
        rules: ``(IdentifierKind, resolver)`` pairs in priority order.
        default_country_code: Calling code for national phone numbers; without
            it only international numbers (``+`` or ``00``) resolve.

    Example::

        IdentifierMapping(
            [
                (IdentifierKind.EMAIL_SHA256, Bulk(emails_for)),
                (IdentifierKind.USER_ID, lambda key: key),
            ]
        )
    """

    rules: tuple[tuple[IdentifierKind, Resolver | Bulk], ...] = attrs.field(converter=_to_rules)
    default_country_code: str | None = attrs.field(
        default=None, kw_only=True, converter=_to_country_code
    )
    _kinds: frozenset[IdentifierKind] = attrs.field(
        init=False,
        repr=False,
        eq=False,
        default=attrs.Factory(lambda self: frozenset(k for k, _ in self.rules), takes_self=True),
    )
    """:attr:`kinds`, made once: every run's eligibility re-check asks."""

    @classmethod
    def identity(cls, kind: IdentifierKind = IdentifierKind.USER_ID) -> IdentifierMapping:
        """
        Map every member key to itself: for destinations that know the host's ids.
        """
        return cls([(kind, _identity)])

    @classmethod
    def hashed_email(cls, lookup: Resolver | Bulk) -> IdentifierMapping:
        """
        Map member keys to ``EMAIL_SHA256`` through *lookup*, which returns the
        raw (or already hashed) email for a key (or, as a :class:`Bulk`, for
        each key of a batch).
        """
        return cls([(IdentifierKind.EMAIL_SHA256, lookup)])

    @classmethod
    def hashed_phone(
        cls, lookup: Resolver | Bulk, *, default_country_code: str | None = None
    ) -> IdentifierMapping:
        """
        Map member keys to ``PHONE_SHA256`` through *lookup*, which returns the
        raw (or already hashed) phone number for a key (or, as a
        :class:`Bulk`, for each key of a batch).
        """
        return cls(
            [(IdentifierKind.PHONE_SHA256, lookup)], default_country_code=default_country_code
        )

    @property
    def kinds(self) -> frozenset[IdentifierKind]:
        """
        Every kind this mapping can produce: eligibility checks that at least one
        is accepted by the destination.
        """
        return self._kinds

    def resolve(
        self, key: str, accepted: AbstractSet[IdentifierKind] | None = None
    ) -> Identifier | None:
        """
        Return the identifier for *key*, or ``None`` if no accepted rule yields one.

        Args:
            key: The member key.
            accepted: Kinds the destination accepts (its
                ``Capabilities.accepted_identifiers``); ``None`` accepts any.

        Raises:
            ConfigurationError: A resolver returned something other than a str or
                ``None``: a bug in the host's resolver, reported rather than skipped.
        """
        rules = self._active(accepted)
        if _has_bulk(rules):
            members, _ = self._resolve_bulk([key], rules)
            return members[0].identifier if members else None
        return self._resolve(key, rules)

    def resolve_many(
        self, keys: Iterable[str], accepted: AbstractSet[IdentifierKind] | None = None
    ) -> tuple[list[Member], list[str]]:
        """
        Resolve *keys* in bulk: each :class:`Bulk` rule is called once, with
        the keys the rules before it left unresolved; a per-key
        :data:`Resolver` once per such key. The run calls this once per
        batch (or chunk of its diff).

        Returns:
            The resolved members in input order, and the keys that resolved to
            nothing (to be recorded as skipped with ``unresolved_mapping``).

        Raises:
            ConfigurationError: A resolver answered something other than a
                str or ``None`` for a key (a :class:`Bulk` one: other than a
                mapping).
        """
        rules = self._active(accepted)
        if len(rules) == 1 and rules[0][1] is _identity and rules[0][0] in _VERBATIM:
            # The identity mapping: member keys are already validated
            # non-empty strings, so skip the per-member checks.
            return identity_members(rules[0][0], keys if isinstance(keys, list) else list(keys)), []
        if _has_bulk(rules):
            return self._resolve_bulk(keys if isinstance(keys, list) else list(keys), rules)
        members: list[Member] = []
        unresolved: list[str] = []
        for key in keys:
            identifier = self._resolve(key, rules)
            if identifier is None:
                unresolved.append(key)
            else:
                members.append(Member(key, identifier))
        return members, unresolved

    def identity_kind(
        self, accepted: AbstractSet[IdentifierKind] | None = None
    ) -> IdentifierKind | None:
        """
        The kind every member key maps to unchanged, if this mapping is the
        identity mapping (for the *accepted* kinds); else ``None``. Distinct
        keys then always map to distinct identifiers.
        """
        rules = self._active(accepted)
        if len(rules) == 1 and rules[0][1] is _identity and rules[0][0] in _VERBATIM:
            return rules[0][0]
        return None

    def _active(
        self, accepted: AbstractSet[IdentifierKind] | None
    ) -> tuple[tuple[IdentifierKind, Resolver | Bulk], ...]:
        if accepted is None:
            return self.rules
        return tuple(rule for rule in self.rules if rule[0] in accepted)

    def _resolve(
        self, key: str, rules: tuple[tuple[IdentifierKind, Resolver | Bulk], ...]
    ) -> Identifier | None:
        """The identifier of *key* under per-key *rules* (no :class:`Bulk` among them)."""
        for kind, resolver in rules:
            raw = resolver(key)  # type: ignore[operator] # per-key rules only: see the callers
            if raw is None:
                continue
            if not isinstance(raw, str):
                raise _not_str(kind, raw)
            value = self._prepare(kind, raw)
            if value:
                # _prepare checked it: a non-blank str every store can hold.
                return Identifier._trusted(kind, value)  # noqa: SLF001 - same package
        return None

    def _resolve_bulk(
        self, keys: list[str], rules: tuple[tuple[IdentifierKind, Resolver | Bulk], ...]
    ) -> tuple[list[Member], list[str]]:
        """
        :meth:`resolve_many` when some rule is a :class:`Bulk`: rule by rule,
        each over the keys still unresolved, so a bulk rule is called once.
        """
        found: dict[str, Identifier] = {}
        pending = keys
        for kind, resolver in rules:
            if not pending:
                break
            rest: list[str] = []
            if isinstance(resolver, Bulk):
                size = resolver.max_keys
                for start in range(0, len(pending), size):
                    part = pending[start : start + size]
                    answers = resolver.resolver(tuple(part))
                    if not isinstance(answers, Mapping):
                        raise ConfigurationError(
                            "resolver",
                            kind.value,
                            f"a Bulk resolver returned {type(answers).__name__}; it must "
                            "return a mapping of member key to value (str or None)",
                        )
                    self._take(kind, part, answers.get, found, rest)
            else:
                self._take(kind, pending, resolver, found, rest)
            pending = rest
        members = [Member(k, found[k]) for k in keys if k in found]
        return members, pending

    def _take(
        self,
        kind: IdentifierKind,
        keys: list[str],
        lookup: Resolver,
        found: dict[str, Identifier],
        rest: list[str],
    ) -> None:
        """Look up each of *keys*: a usable value goes to *found*, the key to *rest* if none."""
        for key in keys:
            raw = lookup(key)
            if raw is None:
                rest.append(key)
                continue
            if not isinstance(raw, str):
                raise _not_str(kind, raw)
            value = self._prepare(kind, raw)
            if value:
                found[key] = Identifier._trusted(kind, value)  # noqa: SLF001 - same package
            else:
                rest.append(key)

    def _prepare(self, kind: IdentifierKind, raw: str) -> str | None:
        if not v.holdable(raw):
            # No store can keep it (NUL, a lone surrogate): not an identifier,
            # so the member is skipped as unresolved, never a run that fails.
            return None
        cc = self.default_country_code
        try:
            if kind is IdentifierKind.EMAIL:
                return _email(raw)
            if kind is IdentifierKind.EMAIL_SHA256:
                return _hash_email(raw)
            if kind is IdentifierKind.PHONE:
                return _phone(raw, cc)
            if kind is IdentifierKind.PHONE_SHA256:
                return _hash_phone(raw, cc)
        except _InvalidError:
            return None
        return raw if raw.strip() else None

    def __repr__(self) -> str:
        # Resolvers may close over connections or credentials: show only the kinds.
        kinds = ", ".join(repr(kind.value) for kind, _ in self.rules)
        cc = self.default_country_code
        extra = "" if cc is None else f", default_country_code={cc!r}"
        return f"IdentifierMapping([{kinds}]{extra})"
