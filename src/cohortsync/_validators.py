"""
attrs validators and converters that raise :class:`ConfigurationError` naming
the field and the value, so bad input never surfaces as a bare ``TypeError`` deep
inside the engine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, TypeVar

import attrs
from attrs import AttrsInstance

from cohortsync._clock import require_aware
from cohortsync.exceptions import ConfigurationError

E = TypeVar("E", bound=Enum)
T = TypeVar("T")
A = TypeVar("A", bound=AttrsInstance)

MAX_ID_LENGTH = 200

# C0 controls, DEL and C1 controls: invisible in logs and UIs, and break CSV/HTTP
# headers. One regular-expression search instead of a Python loop per character:
# identifiers are checked on every record the engine builds.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_id(field: str, value: object) -> str:
    """
    Return *value* if it is a usable identifier: a non-blank string of at most
    200 characters without control characters.
    """
    if not isinstance(value, str):
        raise ConfigurationError(field, value, f"must be a str, not {type(value).__name__}")
    if not value.strip():
        raise ConfigurationError(field, value, "must not be empty or blank")
    if len(value) > MAX_ID_LENGTH:
        raise ConfigurationError(field, value, f"must be at most {MAX_ID_LENGTH} characters")
    if _CONTROL.search(value) is not None:
        raise ConfigurationError(field, value, "must not contain control characters")
    if not _encodable(value):
        # A lone surrogate cannot be encoded as UTF-8: no store could hold it.
        raise ConfigurationError(field, value, "must be valid Unicode (no lone surrogates)")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def holdable(text: str) -> bool:
    """
    Whether every store can hold *text* as it is: no NUL (PostgreSQL text
    cannot hold it) and no lone surrogate (not encodable as UTF-8).
    """
    return "\x00" not in text and _encodable(text)


def storable(text: str) -> str:
    """
    *text* as every store can hold it: NUL characters (PostgreSQL text cannot
    hold them) and lone surrogates (not encodable as UTF-8) are replaced by
    their ``\\x00`` / ``\\udcXX`` escapes. Everything else is kept as is.

    Applied where text from outside reaches a stored value (a destination's
    rejection reasons, error messages, notes), so remote junk can never make
    a run impossible to record.
    """
    if holdable(text):
        return text
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if c == "\x00" or "\ud800" <= c <= "\udfff"
        else c
        for c in text
    )


def to_storable(value: object) -> str:
    """
    Converter: a str made storable (see :func:`storable`); other values are
    turned into text first, so a host passing an exception or a number as a
    reason loses nothing.
    """
    return storable(value if isinstance(value, str) else str(value))


def to_optional_storable(value: object) -> str | None:
    return None if value is None else to_storable(value)


def to_storable_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (storable(value),)
    return tuple(to_storable(v) for v in value)  # type: ignore[attr-defined]


def identifier(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_id(attribute.name, value)


def instance_of(*types: type) -> Callable[[object, attrs.Attribute[Any], object], None]:
    """
    Like ``attrs.validators.instance_of``, but raising :class:`ConfigurationError`
    naming the field, as every other validator here does.
    """
    expected = " or ".join(t.__name__ for t in types)

    def validate(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, types):
            raise ConfigurationError(
                attribute.name, value, f"must be a {expected}, not {type(value).__name__}"
            )

    return validate


def check_count(field: str, value: object, *, minimum: int = 0) -> int:
    """
    Return *value* if it is an ``int`` (not a ``bool``) of at least *minimum*.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        shown = "NaN" if isinstance(value, float) and math.isnan(value) else type(value).__name__
        raise ConfigurationError(field, value, f"must be an int, not {shown}")
    if value < minimum:
        raise ConfigurationError(field, value, f"must be >= {minimum}")
    return value


def check_bool(field: str, value: object) -> bool:
    """Return *value* if it is a ``bool``: a truthy string or a 0 is refused, not taken."""
    if not isinstance(value, bool):
        raise ConfigurationError(field, value, f"must be a bool, not {type(value).__name__}")
    return value


def count(minimum: int = 0) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def validate(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        check_count(attribute.name, value, minimum=minimum)

    return validate


def optional_count(minimum: int = 0) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def validate(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            check_count(attribute.name, value, minimum=minimum)

    return validate


def check_number(field: str, value: object, *, minimum: float, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(field, value, f"must be a number, not {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise ConfigurationError(field, value, "must be a finite number")
    if value < minimum or (not inclusive and value == minimum):
        op = ">=" if inclusive else ">"
        raise ConfigurationError(field, value, f"must be {op} {minimum}")
    return float(value)


def number(
    minimum: float, *, inclusive: bool = True
) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def validate(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        check_number(attribute.name, value, minimum=minimum, inclusive=inclusive)

    return validate


def share(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_number(attribute.name, value, minimum=0.0)
    if float(value) > 1.0:  # type: ignore[arg-type]
        raise ConfigurationError(attribute.name, value, "must be a share between 0 and 1")


def positive_timedelta(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, timedelta):
        raise ConfigurationError(
            attribute.name, value, f"must be a timedelta, not {type(value).__name__}"
        )
    if value <= timedelta(0):
        raise ConfigurationError(attribute.name, value, "must be positive")


def to_enum(enum: type[E], field: str) -> Callable[[object], E]:
    """
    Make a converter that accepts a member of *enum* or its value, and names the
    allowed values when given anything else.
    """

    def convert(value: object) -> E:
        if isinstance(value, enum):
            return value
        try:
            return enum(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in enum)
            raise ConfigurationError(
                field, value, f"unknown {enum.__name__}; expected one of {allowed}"
            ) from None

    return convert


def aware_instant(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """
    Require an aware datetime; the ``TypeError`` names the field and the value.
    """
    require_aware(value, attribute.name)  # type: ignore[arg-type]


def utc_if_aware(value: datetime) -> datetime:
    """
    attrs converter paired with the :func:`aware_instant` validator: converts
    aware values to UTC and leaves anything else for the validator, whose
    ``TypeError`` names the field (a converter cannot know it).
    """
    if isinstance(value, datetime) and value.utcoffset() is not None:
        return require_aware(value)
    return value


def to_utc(value: datetime) -> datetime:
    return require_aware(value)


def optional_to_utc(value: datetime | None) -> datetime | None:
    return None if value is None else require_aware(value)


_EVOLVERS: dict[tuple[type, tuple[str, ...]], Callable[..., Any]] = {}


def _make_evolver(cls: type, changed: tuple[str, ...]) -> Callable[..., Any]:
    """
    A copy function for the frozen attrs *cls* that replaces the fields
    *changed*, generated as straight-line code (one line per field), as
    attrs generates its own ``__init__``: a loop over the fields with
    ``getattr``, or a lookup of every field in the changes, cost twice as much
    on the hot path. Python's own argument binding refuses an unknown field.
    """
    names = tuple(a.name for a in attrs.fields(cls))
    unknown = sorted(set(changed) - set(names))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    lines = [f"def evolve(inst, {', '.join(changed)}):", "    new = new_(cls)"]
    lines += [f"    put(new, {n!r}, {n if n in changed else 'inst.' + n})" for n in names]
    lines.append("    return new")
    scope: dict[str, Any] = {"new_": object.__new__, "put": object.__setattr__, "cls": cls}
    exec("\n".join(lines), scope)  # noqa: S102 - generated from the class's own field names
    evolve: Callable[..., Any] = scope["evolve"]
    return evolve


def evolve_trusted(inst: A, **changes: Any) -> A:
    """
    ``attrs.evolve`` without converters and validators, for the engine's hot
    path: a copy of the frozen attrs instance *inst* with *changes*.

    Only for values that were validated when they were built (a lease, a
    completion, a datetime the engine computed from validated ones): input
    from a host always goes through the validating constructor. An unknown
    field name is still refused.
    """
    key = (type(inst), tuple(changes))
    evolve = _EVOLVERS.get(key)
    if evolve is None:
        evolve = _EVOLVERS[key] = _make_evolver(*key)
    new: A = evolve(inst, **changes)
    return new


_MAKERS: dict[type, Callable[..., Any]] = {}
_MISSING = object()


def _make_maker(cls: type) -> Callable[..., Any]:
    """
    A keyword-only constructor for the frozen attrs *cls* without converters
    and validators, generated as straight-line code like :func:`_make_evolver`:
    Python's own argument binding refuses an unknown or a missing field.
    """
    params, lines = [], []
    scope: dict[str, Any] = {"new_": object.__new__, "put": object.__setattr__, "cls": cls}
    scope["missing"] = _MISSING
    for a in attrs.fields(cls):
        n = a.name
        if a.default is attrs.NOTHING:
            params.append(n)
            lines.append(f"    put(new, {n!r}, {n})")
        elif isinstance(a.default, attrs.Factory):  # type: ignore[arg-type]
            scope[f"factory_{n}"] = a.default.factory
            params.append(f"{n}=missing")
            lines.append(f"    put(new, {n!r}, factory_{n}() if {n} is missing else {n})")
        else:
            scope[f"default_{n}"] = a.default
            params.append(f"{n}=default_{n}")
            lines.append(f"    put(new, {n!r}, {n})")
    # Named for the class: a missing or unknown field reads "Progress() missing ...".
    name = cls.__name__
    code = [f"def {name}(*, {', '.join(params)}):", "    new = new_(cls)", *lines, "    return new"]
    exec("\n".join(code), scope)  # noqa: S102 - generated from the class's own field names
    maker: Callable[..., Any] = scope[name]
    return maker


def trusted_maker(cls: type[A]) -> Callable[..., A]:
    """
    The constructor :func:`make_trusted` uses for *cls*, to call directly on
    the hot path (one keyword binding instead of two).
    """
    maker = _MAKERS.get(cls)
    if maker is None:
        maker = _MAKERS[cls] = _make_maker(cls)
    return maker


def make_trusted(cls: type[A], **values: Any) -> A:
    """
    A frozen attrs *cls* built without converters and validators: the same
    contract as :func:`evolve_trusted`, for a value the engine assembles
    from validated parts. Fields left out take their defaults; a missing
    required field or an unknown one is refused (:class:`TypeError`).
    """
    return trusted_maker(cls)(**values)
