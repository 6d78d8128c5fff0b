"""
A per-process copy of recently delivered states, so a steady-state run of a
large cohort diffs in memory instead of re-reading every delivered row.

Correctness never depends on it: each entry carries the store's version
token of that delivered state (:meth:`Storage.delivered_version`), which every
applied batch changes. A run uses an entry only if the token still matches,
so another worker's progress, a crash or a restart simply makes it miss.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from operator import attrgetter
from typing import TypeVar

from cohortsync._destination import Member

__all__ = ["Bounded", "DeliveredCache", "DeliveredState"]

_KEY = attrgetter("key")


_K = TypeVar("_K")
_V = TypeVar("_V")


class Bounded(dict[_K, _V]):
    """
    A dict of at most *limit* entries that, when full, forgets its oldest
    entry to make room for a new key (never all of them: emptying a cache at
    its bound made every key above it miss). Reads are plain dict reads;
    :meth:`remember` is safe from several threads at once (two threads
    evicting together raised ``KeyError`` or "changed size during
    iteration").
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self._lock = threading.Lock()

    def remember(self, key: _K, value: _V) -> None:
        with self._lock:
            if key not in self and len(self) >= self.limit:
                del self[next(iter(self))]  # the oldest (dicts keep insertion order)
            self[key] = value


class DeliveredCache:
    """
    Delivered keys by sync, least recently used first out, bounded by the
    total number of keys held.

    Args:
        max_keys: Most keys held across all syncs; a state larger than this
            is never cached. ``0`` disables the cache.
    """

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._entries: OrderedDict[str, tuple[str, set[str]]] = OrderedDict()
        self._size = 0
        # Runs in threads (an AsyncScheduler's, host threads sharing one
        # Scheduler) take and put at once: eviction and the key count must
        # not interleave.
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return (
            f"DeliveredCache(syncs={len(self._entries)}, keys={self._size}, "
            f"max_keys={self.max_keys}, hits={self.hits}, misses={self.misses})"
        )

    def take(self, sync_id: str, version: str) -> set[str] | None:
        """
        Remove and return the cached state of *sync_id* if it is at *version*.

        The caller owns the set afterwards (a run mutates it, then :meth:`put`
        stores the new state), so a run that fails midway leaves nothing stale.
        """
        with self._lock:
            entry = self._entries.pop(sync_id, None)
            if entry is None:
                self.misses += 1
                return None
            cached_version, keys = entry
            self._size -= len(keys)
            if cached_version != version:
                self.misses += 1
                return None
            self.hits += 1
            return keys

    def put(self, sync_id: str, version: str, keys: set[str]) -> None:
        """
        Remember *keys* as the delivered state of *sync_id* at *version*.
        """
        with self._lock:
            old = self._entries.pop(sync_id, None)
            if old is not None:
                self._size -= len(old[1])
            if len(keys) > self.max_keys:
                return
            while self._entries and self._size + len(keys) > self.max_keys:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._size -= len(evicted)
            self._entries[sync_id] = (version, keys)
            self._size += len(keys)

    def drop(self, sync_id: str) -> None:
        with self._lock:
            old = self._entries.pop(sync_id, None)
            if old is not None:
                self._size -= len(old[1])


class DeliveredState:
    """
    A run's in-memory mirror of the delivered state: the keys delivered when
    the run started, and the batches applied since, folded in when the run
    ends (:meth:`keys`).

    The batches are kept as tuples of keys rather than folded into the set
    one by one: a full garbage collection visits every entry of every set,
    and a first sync of five million members, whose set would grow to five
    million entries while it delivers, runs hundreds of them (one every few
    batches). A tuple of strings is not tracked by the collector at all
    once it has survived one collection.
    """

    __slots__ = ("_applied", "_keys")

    def __init__(self, keys: set[str]) -> None:
        self._keys = keys
        self._applied: list[tuple[tuple[str, ...], tuple[str, ...]]] = []

    def apply(self, removed: Iterable[str], added: Iterable[Member]) -> None:
        """
        Record one applied batch: *removed* keys left the delivered state,
        *added* members joined it (in this order).
        """
        change = (tuple(removed), tuple(map(_KEY, added)))
        if change[0] or change[1]:
            self._applied.append(change)

    def keys(self) -> set[str]:
        """
        The delivered state now: the starting set, updated in place.
        """
        keys = self._keys
        for removed, added in self._applied:
            keys.difference_update(removed)
            keys.update(added)
        self._applied.clear()
        return keys
