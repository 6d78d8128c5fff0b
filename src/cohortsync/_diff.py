"""
What to send: reading a membership source and diffing it against the
delivered state.

Three strategies, chosen per run:

* **set diff** (default): the source's keys go into one ``set``; the delivered
  state is streamed past it in key order. Memory is one set of the cohort plus
  the (small) churn.
* **merge diff**: when the source declares ``sorted_keys = True``, both sides
  are streamed in ascending order and merged, so memory stays bounded whatever
  the cohort size (10,000,000-member daily syncs).
* **change feed**: a real-time sync whose source also implements
  :class:`~cohortsync.ChangeFeed` asks for the changes since its cursor and
  checks only those keys against the delivered state: O(changes) per minute.
"""

from __future__ import annotations

import bisect
import os
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from itertools import filterfalse, islice
from typing import IO

import attrs

from cohortsync._cohort import ChangeFeed, MembershipSource
from cohortsync.exceptions import InvalidMemberError, SourceError

__all__ = [
    "MAX_KEY_LENGTH",
    "Diff",
    "diff_changes",
    "diff_snapshot",
    "diff_with_state",
    "has_key",
    "shown_key",
    "with_keys",
]

MAX_KEY_LENGTH = 1_024
"""Longest member key accepted; longer ones are skipped as invalid."""


def shown_key(key: object) -> str:
    """
    A bounded, printable stand-in for an invalid key in the issue log.
    """
    # repr() for anything a store could not hold either (NUL, lone surrogates).
    text = key if isinstance(key, str) and _storable(key) else repr(key)
    return text if len(text) <= 100 else text[:97] + "..."


def _invalid_reason(key: object) -> str:
    if not isinstance(key, str):
        return f"invalid_key: not a str ({type(key).__name__})"
    if not key:
        return "invalid_key: empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"invalid_key: longer than {MAX_KEY_LENGTH} characters"
    if "\x00" in key:
        return "invalid_key: contains a NUL character"
    return "invalid_key: not valid Unicode (a lone surrogate)"


def _storable(key: str) -> bool:
    """
    Whether every store can hold *key*: no NUL (PostgreSQL text cannot) and
    no lone surrogate (not encodable as UTF-8).
    """
    if "\x00" in key:
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid(key: object) -> bool:
    # isinstance, not an exact type check: the fast path in _read_set accepts
    # str subclasses, and a key must not be valid in one run and not the next.
    # A key no store can hold would be sent, fail to be recorded, and be sent
    # again every run: it is skipped instead.
    return isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH and _storable(key)


def _held(keys: list[str] | tuple[str, ...] | KeyList) -> Keys:
    """
    Keys as a diff holds them: a tuple, not a list, so that the garbage
    collector stops visiting them (a tuple of strings is untracked once it
    has survived one collection; a list is walked, key by key, by every full
    collection while a first sync delivers its million adds).
    """
    return tuple(keys) if isinstance(keys, list) else keys


def _held_optional(keys: list[str] | tuple[str, ...] | KeyList | None) -> Keys | None:
    return None if keys is None else _held(keys)


@attrs.define
class Diff:
    """
    The result of comparing a cohort with what its destination holds.

    Attributes:
        adds: Keys to add, ascending (a list given is kept as a tuple).
        removes: Keys to remove, ascending.
        existing: Keys in both, ascending, when they were asked for (full-sync
            destinations and full resends); else ``None``.
        size: Valid members in the source (``None`` for a change feed).
        delivered: Members in the delivered state before the run.
        invalid: ``(shown key, reason)`` for keys the source yielded that are
            unusable; they are skipped, not delivered.
        feed_cursor: The change-feed cursor this diff brings the sync to.
    """

    adds: Keys = attrs.field(converter=_held)
    removes: Keys = attrs.field(converter=_held)
    existing: Keys | None = attrs.field(converter=_held_optional)
    size: int | None
    delivered: int
    invalid: list[tuple[str, str]] = attrs.Factory(list)
    feed_cursor: str | None = None

    @property
    def source_empty(self) -> bool:
        return self.size == 0

    def close(self) -> None:
        """
        Delete any temporary file the merge diff spilled keys to.
        """
        for keys in (self.adds, self.removes, self.existing):
            if isinstance(keys, KeyList):
                keys.close()


_COLLECTIONS = frozenset({list, tuple, set, frozenset})
"""Exact types a source's snapshot is known to be fine as (no ABC check per run)."""


def _snapshot(source: MembershipSource, cohort_id: str) -> Iterable[object]:
    """
    Call the source and check it returned a collection of keys: a ``str``
    (``lambda: "u1"``), ``bytes`` or a mapping iterates as something else
    (characters, ints, dict keys) and would be delivered as junk.
    """
    try:
        members = source.members()
    except (InvalidMemberError, SourceError):
        raise
    except Exception as e:  # the host's source failed: a typed error the run records
        raise SourceError(cohort_id, f"{type(e).__name__}: {e}") from e
    if type(members) not in _COLLECTIONS and isinstance(
        members, (str, bytes, bytearray, memoryview, Mapping)
    ):
        raise SourceError(
            cohort_id,
            f"the membership source returned a {type(members).__name__}, not a collection "
            "of member keys; return a list, set or generator of str (for one member: "
            '["u1"], not "u1"); nothing was delivered',
        )
    return members


def _read_set(source: MembershipSource, cohort_id: str) -> tuple[set[str], list[tuple[str, str]]]:
    """
    Read the whole snapshot into a set, in one pass over the source.

    Keys are not validated here: only keys that are new to the destination
    can be invalid (everything delivered was checked when it was added), so
    the diff checks its adds, a few thousand keys instead of a million. The
    one thing a set cannot hold, an unhashable key, is recorded and skipped;
    ``set.update`` resumes after it, so the source is never read twice.
    """
    current: set[object] = set()
    invalid: list[tuple[str, str]] = []
    members = _snapshot(source, cohort_id)
    try:
        it = iter(members)
        while True:
            try:
                current.update(it)
                break
            except TypeError as e:
                if not str(e).startswith("unhashable type"):
                    raise
                kind = str(e).partition("'")[2].rstrip("'")
                invalid.append((f"<{kind}>", f"invalid_key: not a str ({kind})"))
    except (InvalidMemberError, SourceError):
        raise
    except Exception as e:  # the host's source failed: a typed error the run records
        raise SourceError(cohort_id, f"{type(e).__name__}: {e}") from e
    return current, invalid  # type: ignore[return-value]


def _read_keys(source: MembershipSource, cohort_id: str) -> Collection[object]:
    """
    Read the whole snapshot once, as a collection that can be gone through
    again: the source's own list, tuple or set, else a list of its keys (one
    pointer per key, not a hash table).
    """
    members = _snapshot(source, cohort_id)
    if type(members) in _REITERABLE:
        return members  # type: ignore[return-value]
    try:
        return list(members)
    except (InvalidMemberError, SourceError):
        raise
    except Exception as e:  # the host's source failed: a typed error the run records
        raise SourceError(cohort_id, f"{type(e).__name__}: {e}") from e


_REITERABLE = (list, tuple, set, frozenset)


def _first_pass(
    keys: Collection[object],
    into_set: Callable[[Collection[object]], set[object]],
    cohort_id: str,
    invalid: list[tuple[str, str]],
) -> tuple[Collection[object], set[object]]:
    """
    ``(keys, into_set(keys))``, leaving out the keys a set cannot hold if
    there are any (reported in *invalid*, as :func:`_read_set` does).

    Raises:
        SourceError: A key's hash or comparison raised.
    """
    try:
        try:
            return keys, into_set(keys)
        except TypeError as e:
            if not str(e).startswith("unhashable type"):
                raise
        keys = [k for k in keys if _hashable(k, invalid)]
        return keys, into_set(keys)
    except (InvalidMemberError, SourceError):
        raise
    except Exception as e:  # the host's source failed: a typed error the run records
        raise SourceError(cohort_id, f"{type(e).__name__}: {e}") from e


def _lacking(known: set[str], keys: Iterable[object]) -> set[object]:
    """
    The *keys* *known* lacks, asked of *known* key by key at C speed (no
    Python call per key): 41 ms for 1,000,000 keys here, against 59 ms for
    set differences a few thousand keys at a time and 37 ms for the
    difference of two built sets, which would cost a second set's memory.
    An unhashable key raises ``TypeError`` as a set would.
    """
    return set(filterfalse(known.__contains__, keys))


def _hashable(key: object, invalid: list[tuple[str, str]]) -> bool:
    """Whether a set can hold *key*; if not, it is recorded in *invalid*."""
    try:
        hash(key)
    except TypeError:
        kind = type(key).__name__
        invalid.append((f"<{kind}>", f"invalid_key: not a str ({kind})"))
        return False
    return True


def _partition(keys: Iterable[object]) -> tuple[list[str], list[tuple[str, str]]]:
    """
    Split candidate keys into valid ones (ascending) and ``(shown, reason)``
    for the rest.

    A first sync checks every key of the cohort, so keys are checked a chunk
    at a time with C-speed string operations (one join, one scan, the
    shortest and longest length); only a chunk that fails is checked key by
    key, to tell its invalid keys apart.
    """
    valid: list[str] = []
    invalid: list[tuple[str, str]] = []
    it = iter(keys)
    while chunk := list(islice(it, _CHECK_CHUNK)):
        if _all_valid(chunk):
            valid.extend(chunk)  # type: ignore[arg-type]
            continue
        for key in chunk:
            if _valid(key):
                valid.append(key)  # type: ignore[arg-type]
            else:
                invalid.append((shown_key(key), _invalid_reason(key)))
    valid.sort()
    return valid, invalid


_CHECK_CHUNK = 10_000
"""Keys :func:`_partition` checks at once."""


def _all_valid(chunk: list[object]) -> bool:
    """
    Whether every key of a non-empty *chunk* passes :func:`_valid`, decided
    without a Python call per key.
    """
    try:
        # Only str (and its subclasses) can be joined.
        joined = "".join(chunk)  # type: ignore[arg-type]
    except TypeError:
        return False
    lengths = list(map(len, chunk))  # type: ignore[arg-type]
    if min(lengths) == 0 or max(lengths) > MAX_KEY_LENGTH or "\x00" in joined:
        return False
    # Python never pairs surrogates across (or within) keys: encoding the
    # whole fails exactly when one key holds a lone surrogate.
    return joined.isascii() or _storable(joined)


def _set_diff(
    current: set[str], delivered: Iterable[str], *, keep_existing: bool
) -> tuple[set[str], list[str], list[str] | None]:
    """
    Stream the delivered keys past *current*, which is left holding the
    (unvalidated, unsorted) adds; removes and existing come out ascending.
    """
    removes: list[str] = []
    existing: list[str] | None = [] if keep_existing else None
    discard = current.discard
    append_remove = removes.append
    # `current` becomes the set of adds as delivered keys are struck off it:
    # no second set of the cohort is ever built.
    if existing is None:
        for key in delivered:
            if key in current:
                discard(key)
            else:
                append_remove(key)
    else:
        append_existing = existing.append
        for key in delivered:
            if key in current:
                discard(key)
                append_existing(key)
            else:
                append_remove(key)
    return current, removes, existing


class _SortedReader:
    """
    Iterates a source declared sorted, checking the promise and the keys.
    """

    def __init__(self, source: MembershipSource, cohort_id: str) -> None:
        self.cohort_id = cohort_id
        self.invalid: list[tuple[str, str]] = []
        self.count = 0
        members: Iterable[str] = _snapshot(source, cohort_id)  # type: ignore[assignment]
        try:
            self._it = iter(members)
        except Exception as e:
            raise SourceError(cohort_id, f"{type(e).__name__}: {e}") from e

    def __iter__(self) -> Iterator[str]:
        previous: str | None = None
        while True:
            try:
                key = next(self._it)
            except StopIteration:
                return
            except Exception as e:
                raise SourceError(self.cohort_id, f"{type(e).__name__}: {e}") from e
            if not _valid(key):
                self.invalid.append((shown_key(key), _invalid_reason(key)))
                continue
            if previous is not None and key <= previous:
                if key == previous:
                    continue
                raise SourceError(
                    self.cohort_id,
                    "source declares sorted_keys but yielded keys out of order; "
                    "nothing was delivered",
                )
            previous = key
            self.count += 1
            yield key


_END = object()


SPILL_AFTER = 200_000
"""Keys a merge diff keeps in memory per list before spilling to a temporary file."""


class KeyList:
    """
    Keys in the order appended, held in memory up to *spill_after* and in a
    temporary file beyond: a sorted 10,000,000-member first sync must not
    hold ten million strings at once. Iterable any number of times.

    Keys are written one per line; the rare key holding a newline or a
    backslash is escaped, so the common case reads back at C speed.
    """

    def __init__(self, spill_after: int | None = None) -> None:
        self._spill_after = SPILL_AFTER if spill_after is None else spill_after
        self._memory: list[str] = []
        self._file: IO[str] | None = None
        self._spilled = 0
        self._ascending = True
        self._last: str | None = None

    def append(self, key: str) -> None:
        if self._last is not None and key <= self._last:
            self._ascending = False
        self._last = key
        self._memory.append(key)
        if len(self._memory) >= self._spill_after:
            self._spill()

    def extend(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.append(key)

    def _spill(self) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(  # noqa: SIM115 - closed by close()
                "w+", encoding="utf-8", errors="surrogatepass", newline="\n"
            )
        self._file.seek(0, os.SEEK_END)
        self._file.write("\n".join(map(_escape, self._memory)))
        self._file.write("\n")
        self._spilled += len(self._memory)
        self._memory = []

    def __len__(self) -> int:
        return self._spilled + len(self._memory)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[str]:
        if self._file is not None:
            self._file.flush()
            with open(
                self._file.fileno(), encoding="utf-8", errors="surrogatepass",
                newline="\n", closefd=False,
            ) as reader:  # fmt: skip
                reader.seek(0)
                for line in reader:
                    yield _unescape(line[:-1])
        yield from list(self._memory)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if self._file is None and self._ascending:
            i = bisect.bisect_left(self._memory, key)
            return i < len(self._memory) and self._memory[i] == key
        return any(k == key for k in self)

    def head(self, n: int) -> list[str]:
        return list(islice(self, n))

    def __eq__(self, other: object) -> bool:
        # Compares as the sequence it stands for, so a spilled diff equals
        # the same diff held in lists.
        if isinstance(other, (KeyList, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        where = "spilled to disk" if self._file is not None else "in memory"
        return f"<KeyList {len(self)} keys, {where}>"


def _escape(key: str) -> str:
    if "\n" in key or "\\" in key:
        return key.replace("\\", "\\\\").replace("\n", "\\n")
    return key


def _unescape(line: str) -> str:
    if "\\" not in line:
        return line
    out: list[str] = []
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            out.append("\n" if line[i + 1] == "n" else line[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


Keys = tuple[str, ...] | KeyList
"""What a diff holds: a tuple, or a KeyList when the merge diff streamed."""


def head(keys: Keys, n: int) -> list[str]:
    return keys.head(n) if isinstance(keys, KeyList) else list(keys[:n])


def _merge_diff(
    source: Iterator[str], delivered: Iterator[str], *, keep_existing: bool
) -> tuple[KeyList, KeyList, KeyList | None]:
    adds = KeyList()
    removes = KeyList()
    existing: KeyList | None = KeyList() if keep_existing else None
    a: object = next(source, _END)
    b: object = next(delivered, _END)
    while a is not _END and b is not _END:
        if a == b:
            if existing is not None:
                existing.append(a)  # type: ignore[arg-type]
            a = next(source, _END)
            b = next(delivered, _END)
        elif a < b:  # type: ignore[operator]
            adds.append(a)  # type: ignore[arg-type]
            a = next(source, _END)
        else:
            removes.append(b)  # type: ignore[arg-type]
            b = next(delivered, _END)
    if a is not _END:
        adds.append(a)  # type: ignore[arg-type]
        adds.extend(source)
    if b is not _END:
        removes.append(b)  # type: ignore[arg-type]
        removes.extend(delivered)
    return adds, removes, existing


def diff_snapshot(
    source: MembershipSource,
    cohort_id: str,
    delivered: Iterator[str],
    delivered_count: int,
    *,
    keep_existing: bool,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> Diff:
    """
    Diff the source's full snapshot against the delivered keys (ascending).

    Args:
        source: The cohort's membership source.
        cohort_id: For error messages.
        delivered: The delivered keys in ascending order.
        delivered_count: How many there are.
        keep_existing: Also list keys in both (full-sync destinations).
        exclude: Keys never to add (dead letters).

    Raises:
        SourceError: The source raised while being read, or broke its promise
            of sorted output. Nothing was delivered.
    """
    adds: list[str] | Keys
    removes: list[str] | Keys
    existing: list[str] | Keys | None
    if getattr(source, "sorted_keys", False):
        reader = _SortedReader(source, cohort_id)
        adds, removes, existing = _merge_diff(iter(reader), delivered, keep_existing=keep_existing)
        size, invalid = reader.count, reader.invalid
    else:
        current, invalid = _read_set(source, cohort_id)
        raw_adds, removes, existing = _set_diff(current, delivered, keep_existing=keep_existing)
        adds, bad = _partition(raw_adds)
        invalid += bad
        # Every delivered key is valid: the cohort is what stays plus the valid adds.
        size = delivered_count - len(removes) + len(adds)
    if exclude:
        if isinstance(adds, KeyList):
            kept = KeyList()
            kept.extend(k for k in adds if k not in exclude)
            adds.close()
            adds = kept
        else:
            adds = [k for k in adds if k not in exclude]
    return Diff(
        adds=adds,
        removes=removes,
        existing=existing,
        size=size,
        delivered=delivered_count,
        invalid=invalid,
    )


def diff_with_state(
    source: MembershipSource,
    cohort_id: str,
    known: set[str] | None,
    read_delivered: Callable[[], Iterator[str]],
    delivered_count: int,
    *,
    keep_existing: bool,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> tuple[Diff, set[str]]:
    """
    Diff the source's snapshot and also return the delivered state as a set,
    for a worker that keeps it in memory between runs.

    With *known* (the delivered state from memory, still current) the store
    is not read at all; without it the delivered keys are streamed from the
    store as in :func:`diff_snapshot`. Either way the state returned is built
    from the source's own strings (``source - adds + removes``), never from
    a second copy of every key, and the run never holds two sets of the
    cohort at once: a steady run holds at its peak one set being built
    (with the table it outgrows) and a list of the source's keys.

    - Kept state: the adds are the source's keys *known* lacks; then the
      source is struck off *known* itself, which leaves the removes, and
      *known* is emptied (its table freed); then the new state is built from
      the source. Putting the source in a set beside *known* peaked at two
      and a half sets; copying *known* to strike the source off the copy,
      at two to three (a copy's table is sized for twice its keys: twice the
      original's at some sizes). The price is one more pass over the source
      than two set differences.
    - Streamed state: the source's set has the delivered keys struck off,
      which leaves the adds, and is dropped before the state is built.

    Returns:
        The diff, and the delivered state before the run, which the caller
        then keeps up to date batch by batch.
    """
    existing: list[str] | None = None
    raw_adds: Collection[object]
    state: set[str]
    if known is not None and not known:
        # A first sync: every key is an add, and there is no state to build.
        raw_adds, invalid = _read_set(source, cohort_id)
        removes: list[str] = []
        state = known
        if keep_existing:
            existing = []
    else:
        invalid = []
        keys = _read_keys(source, cohort_id)
        kept = known is not None
        if known is not None:
            keys, raw_adds = _first_pass(keys, lambda ks: _lacking(known, ks), cohort_id, invalid)
            known.difference_update(keys)  # leaves the removes
            removes = sorted(known)
            # Emptied (its table freed), then filled again: the new state is
            # the same set object, long since in the collector's oldest
            # generation. A new one would be walked, entry by entry, by the
            # next young collection and the one after (a tenth of a second
            # per million members).
            known.clear()
            state = known
        else:
            keys, current = _first_pass(keys, set, cohort_id, invalid)
            raw_adds, removes, existing = _set_diff(
                current,  # type: ignore[arg-type]
                read_delivered(),
                keep_existing=keep_existing,
            )
            raw_adds = set(raw_adds)  # what is left of the table, at its size
            del current
            state = set()
        state.update(keys)  # type: ignore[arg-type]
        del keys
        state.difference_update(raw_adds)
        if kept and keep_existing:
            existing = sorted(state)
        state.update(removes)
    adds, bad = _partition(raw_adds)
    del raw_adds
    invalid += bad
    # Every delivered key is valid, so the cohort is what stays plus the valid adds.
    size = delivered_count - len(removes) + len(adds)
    if exclude:
        adds = [k for k in adds if k not in exclude]
    diff = Diff(
        adds=adds,
        removes=removes,
        existing=existing,
        size=size,
        delivered=delivered_count,
        invalid=invalid,
    )
    return diff, state


def diff_changes(
    feed: ChangeFeed,
    cohort_id: str,
    cursor: str,
    delivered_filter: Callable[[Iterable[str]], set[str]],
    delivered_count: int,
    *,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> Diff:
    """
    Diff from a change feed: only the changed keys are checked against the
    delivered state (so re-reading a window after a crash re-sends nothing
    already delivered).

    Raises:
        SourceError: The feed raised, or reported a key as both entered and left.
    """
    try:
        changes = feed.changes_since(cursor)
    except Exception as e:  # the host's source failed: a typed error the run records
        raise SourceError(cohort_id, f"{type(e).__name__}: {e}") from e
    invalid = [
        (shown_key(k), _invalid_reason(k))
        for k in (*changes.added, *changes.removed)
        if not _valid(k)
    ]
    added = {k for k in changes.added if _valid(k)}
    removed = {k for k in changes.removed if _valid(k)}
    both = added & removed
    if both:
        raise SourceError(
            cohort_id,
            f"change feed reported {len(both)} key(s) as both entered and left; "
            "a feed must report net changes",
        )
    held = delivered_filter(added | removed)
    adds = sorted(k for k in added if k not in held and k not in exclude)
    removes = sorted(k for k in removed if k in held)
    return Diff(
        adds=adds,
        removes=removes,
        existing=None,
        size=None,
        delivered=delivered_count,
        invalid=invalid,
        feed_cursor=changes.cursor,
    )


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """
    Consecutive slices of at most *size* items.
    """
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def has_key(keys: Keys, key: str) -> bool:
    """Whether *keys* (ascending when a tuple) holds *key*."""
    if isinstance(keys, KeyList):
        return key in keys
    i = bisect.bisect_left(keys, key)
    return i < len(keys) and keys[i] == key


def with_keys(keys: Keys, extra: Iterable[str]) -> Keys:
    """
    *keys* plus the *extra* keys it lacks (ascending when *keys* is a tuple;
    a spilled KeyList is appended to rather than read into memory).
    """
    if not isinstance(keys, KeyList):
        return tuple(sorted({*keys, *extra}))
    for key in extra:
        if key not in keys:
            keys.append(key)
    return keys
