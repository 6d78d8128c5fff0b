"""
cohortsync's own cattrs converter: every public value to plain JSON-ready data
and back. The global converter is never touched, so a host's cattrs
configuration and ours cannot interfere.
"""

from __future__ import annotations

import json
from datetime import datetime, time, timedelta
from functools import cache, lru_cache
from json.encoder import encode_basestring_ascii as _quote
from typing import TYPE_CHECKING, Any, TypeVar

import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from cohortsync._cache import Bounded
from cohortsync._clock import require_aware
from cohortsync._cohort import Cohort
from cohortsync._destination import IdentifierKind
from cohortsync.exceptions import ConfigurationError

if TYPE_CHECKING:
    from cohortsync._policy import SyncPolicy
    from cohortsync._sync import Sync, SyncRun

__all__ = ["dumps", "loads", "make_converter"]

T = TypeVar("T")


def _structure_datetime(value: Any, _type: Any) -> datetime:
    if isinstance(value, datetime):
        return require_aware(value)
    if not isinstance(value, str):
        raise ConfigurationError("datetime", value, "must be an ISO-8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigurationError("datetime", value, "is not ISO-8601") from None
    return require_aware(parsed)


def _structure_timedelta(value: Any, _type: Any) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError("timedelta", value, "must be a number of seconds")
    try:
        return timedelta(seconds=value)
    except (ValueError, OverflowError):  # NaN, infinities, beyond timedelta.max
        raise ConfigurationError("timedelta", value, "is not a representable duration") from None


def _structure_time(value: Any, _type: Any) -> time:
    if isinstance(value, time):
        return value
    if not isinstance(value, str):
        raise ConfigurationError("time", value, "must be an ISO-8601 time string")
    try:
        return time.fromisoformat(value)
    except ValueError:
        raise ConfigurationError("time", value, "is not an ISO-8601 time") from None


def _structure_bool(value: Any, _type: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError("bool", value, "must be true or false")
    return value


def _structure_int(value: Any, _type: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError("int", value, "must be an integer")
    return value


def _structure_float(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError("float", value, "must be a number")
    return float(value)


def _structure_str(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise ConfigurationError("str", value, "must be a string")
    return value


def make_converter() -> cattrs.Converter:
    """
    Build a converter that turns cohortsync values into JSON-compatible data
    (datetimes as ISO-8601 UTC strings, times of day as ISO-8601 wall times,
    timedeltas as seconds, enums as their values, frozensets as sorted lists)
    and back, validating on the way in.
    """
    conv = cattrs.Converter(forbid_extra_keys=True)
    # cattrs' defaults call int()/bool()/str() on whatever they get, so a stored
    # "false" would load as True and 1.9 as 1: corrupt data must fail loudly.
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(str, _structure_str)
    conv.register_unstructure_hook(datetime, lambda d: require_aware(d).isoformat())
    conv.register_structure_hook(datetime, _structure_datetime)
    conv.register_unstructure_hook(timedelta, lambda d: d.total_seconds())
    conv.register_structure_hook(timedelta, _structure_timedelta)
    # A policy's local time of day: "06:30:00", the zone is the policy's own.
    conv.register_unstructure_hook(time, time.isoformat)
    conv.register_structure_hook(time, _structure_time)
    conv.register_unstructure_hook_func(
        lambda t: t == frozenset[IdentifierKind], lambda s: sorted(k.value for k in s)
    )
    # A cohort's membership source is host code, not data: it is never serialised.
    conv.register_unstructure_hook(
        Cohort, make_dict_unstructure_fn(Cohort, conv, source=override(omit=True))
    )
    return conv


@cache
def _converter() -> cattrs.Converter:
    return make_converter()


def unstructure(value: object) -> object:
    """
    *value* as plain JSON-ready data (an attrs value becomes a ``dict``).
    """
    return _converter().unstructure(value)


def structure(data: Any, cls: type[T]) -> T:
    """
    Rebuild a *cls* from plain data; invalid data raises ``ConfigurationError``
    (or a cattrs ``ClassValidationError`` grouping several).
    """
    return _converter().structure(data, cls)


def dumps(value: object) -> str:
    """
    Serialise a cohortsync value to a JSON string.
    """
    return json.dumps(unstructure(value), sort_keys=True, separators=(",", ":"))


def dump_run(run: SyncRun) -> str:
    """
    :func:`dumps` of a run record, written out field by field in sorted key
    order, strings quoted as :func:`json.dumps` quotes them: every run
    stores one, and the generic unstructuring costs more than the rest of a
    short run's bookkeeping. A test holds it equal to :func:`dumps`.
    """
    return (
        f'{{"added":{int(run.added)},"batches":{int(run.batches)}'
        f',"cadence":{_quote(run.cadence.value)},"coalesced":{int(run.coalesced)}'
        f',"collisions":{int(run.collisions)},"error_message":{_optional(run.error_message)}'
        f',"error_type":{_optional(run.error_type)}'
        f',"finished_at":"{run.finished_at.isoformat()}"'
        f',"full_sync":{"true" if run.full_sync else "false"}'
        f',"generation":{int(run.generation)},"id":{_quote(run.id)}'
        f',"notes":[{",".join(map(_quote, run.notes))}]'
        f',"rejected":{int(run.rejected)},"removed":{int(run.removed)}'
        f',"retries":{int(run.retries)},"skipped":{int(run.skipped)}'
        f',"slot":"{run.slot.isoformat()}","started_at":"{run.started_at.isoformat()}"'
        f',"status":{_quote(run.status.value)},"sync_id":{_quote(run.sync_id)}'
        f',"trigger":{_quote(run.trigger.value)}}}'
    )


def dump_sync(sync: Sync) -> str:
    """
    :func:`dumps` of a sync definition, written out field by field, with its
    policy's JSON remembered: every create and save of a sync writes one,
    bulk creation writes a million under the store's write lock, and the
    policy (most of the text, shared by many syncs) costs most of the
    generic unstructuring. Strings are quoted as :func:`json.dumps` quotes
    them (ASCII only). A test holds it equal to :func:`dumps`.
    """
    effective = sync.effective_cadence
    return (
        f'{{"cohort_id":{_quote(sync.cohort_id)}'
        f',"created_at":"{sync.created_at.isoformat()}"'
        f',"destination_id":{_quote(sync.destination_id)}'
        f',"effective_cadence":{"null" if effective is None else _quote(effective.value)}'
        f',"generation":{int(sync.generation)}'
        f',"guard_released":{"true" if sync.guard_released else "false"}'
        f',"id":{_quote(sync.id)}'
        f',"mapping_id":{_optional(sync.mapping_id)}'
        f',"policy":{_dump_policy(sync.policy)}'
        f',"status":{_quote(sync.status.value)}'
        f',"status_reason":{_optional(sync.status_reason)}'
        f',"updated_at":"{sync.updated_at.isoformat()}"}}'
    )


def _optional(text: str | None) -> str:
    return "null" if text is None else _quote(text)


def _dump_policy(policy: SyncPolicy) -> str:
    """
    A policy's JSON, remembered by the policy object: definitions read from
    a store share their policy objects (see :func:`load_sync`), and so do
    syncs a host creates with one policy. Keyed by identity, not equality:
    equal policies may be written differently (``1`` and ``1.0``), and the
    text written is always this object's own. The entry keeps the policy
    alive, so its id is not reused while the entry exists.
    """
    hit = _POLICY_TEXT.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    text = dumps(policy)
    _POLICY_TEXT.remember(id(policy), (policy, text))
    return text


def loads(text: str | bytes, cls: type[T]) -> T:
    """
    Parse a JSON string produced by :func:`dumps` back into a *cls*.
    """
    return structure(json.loads(text), cls)


SYNC_CACHE_SIZE = 10_000
"""Most parsed sync definitions kept; the least recently used leaves first."""
POLICY_CACHE_SIZE = 1_024
"""Most parsed policies kept (by their JSON text); many syncs share one policy.
Also the most policy texts :func:`dump_sync` keeps (by policy object)."""
_POLICY_TEXT: Bounded[int, tuple[SyncPolicy, str]] = Bounded(POLICY_CACHE_SIZE)


@lru_cache(maxsize=SYNC_CACHE_SIZE)
def load_sync(text: str) -> Sync:
    """
    Parse a stored sync definition, remembering recent ones by their text.

    Every run reads its sync's definition; parsing it again (tens of
    microseconds of validation) for a definition that has not changed is
    most of a short run's cost. ``Sync`` is immutable, so sharing is safe.
    The cache is a bounded LRU rather than a dict emptied when full: a
    process that sees more definitions than it holds (many syncs, or many
    edits) keeps the ones it reads often instead of parsing all of them again.

    A store of more syncs than the cache holds misses it on most reads (a
    worker of a million syncs, a listing of the next minute's 50,000 runs),
    so a miss is made cheap too: the policy, most of a definition and
    shared by many syncs, comes from a cache of its own, and a definition
    of the shape :func:`dumps` writes is built directly, with the class's
    validators (a little over half the converter's time). Anything else
    goes through the converter, which reports what is wrong with it.
    """
    return _load_sync_direct(text) or loads(text, _sync_class())


@cache
def _sync_class() -> type[Sync]:
    from cohortsync._sync import Sync as SyncClass  # noqa: PLC0415 - _sync imports this module's users

    return SyncClass


@lru_cache(maxsize=POLICY_CACHE_SIZE)
def _load_policy(text: str) -> SyncPolicy:
    from cohortsync._policy import SyncPolicy as PolicyClass  # noqa: PLC0415 - as in _sync_class

    return loads(text, PolicyClass)


_DECODER = json.JSONDecoder()
_POLICY_KEY = '"policy":'
"""Only the definition's own ``policy`` key can appear so: a quote inside a
string value is escaped, and no value holds an object with that key."""
_STRINGS = ("id", "cohort_id", "destination_id", "status", "created_at", "updated_at")
_OPTIONAL_STRINGS = ("mapping_id", "status_reason", "effective_cadence")


def _load_sync_direct(text: str | bytes) -> Sync | None:
    """
    The sync in *text* built without the converter, when *text* has exactly
    the fields of a :class:`~cohortsync.Sync`, each of the JSON type
    :func:`dumps` writes; ``None`` for anything else (an older shape, a
    damaged value), which :func:`load_sync` leaves to the converter. The
    class's own validators check the values, as they do for the converter.
    """
    if not isinstance(text, str):
        return None
    data = json.loads(text)
    start = text.find(_POLICY_KEY)
    if type(data) is not dict or data.keys() != _SYNC_FIELDS or start < 0:
        return None
    if not (
        all(type(data[k]) is str for k in _STRINGS)
        and all(data[k] is None or type(data[k]) is str for k in _OPTIONAL_STRINGS)
        and type(data["generation"]) is int
        and type(data["guard_released"]) is bool
        and type(data["policy"]) is dict
    ):
        return None
    try:
        start += len(_POLICY_KEY)
        _, end = _DECODER.raw_decode(text, start)
        return _sync_class()(
            id=data["id"],
            cohort_id=data["cohort_id"],
            destination_id=data["destination_id"],
            policy=_load_policy(text[start:end]),
            mapping_id=data["mapping_id"],
            generation=data["generation"],
            status=data["status"],
            status_reason=data["status_reason"],
            effective_cadence=data["effective_cadence"],
            created_at=_structure_datetime(data["created_at"], datetime),
            updated_at=_structure_datetime(data["updated_at"], datetime),
            guard_released=data["guard_released"],
        )
    except Exception:  # noqa: BLE001 - the converter's parse reports what is wrong
        return None


_SYNC_FIELDS = frozenset(
    (
        "cohort_id",
        "created_at",
        "destination_id",
        "effective_cadence",
        "generation",
        "guard_released",
        "id",
        "mapping_id",
        "policy",
        "status",
        "status_reason",
        "updated_at",
    )
)
"""The fields of :class:`~cohortsync.Sync` (a test holds them equal)."""
