"""
A destination that writes S3-style cohort files to a local (or mounted) directory.

Each slot becomes one directory holding ``entering.csv``, ``exiting.csv`` and
``existing.csv``, the layout cohort exports to Amazon S3 use, so whatever
downstream job reads those buckets can read this directory too.

The adapter is a small write-ahead log. A batch is acknowledged only once it
is a durable *part* file in the sync's hidden staging directory; publishing
folds every staged part (and the export already published for the same slot,
if any) into one export with a k-way merge of sorted files, swaps it into
place, and only then forgets the parts. A crash anywhere leaves either parts
that the next publication includes, or an intent record that tells the next
``open`` whether the swap happened.

On disk, per sync::

    <slot>/{entering,exiting,existing}.csv   published exports
    .staging/<position>-<op>-<key>.csv       acknowledged, not yet published
    .publishing                              intent, while an export is swapped in
    .<slot>.export/ .<slot>.old/ .<slot>.merge/   transient, while publishing
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import functools
import hashlib
import heapq
import itertools
import json
import logging
import os
import re
import shutil
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timezone
from pathlib import Path
from typing import ClassVar, TextIO

import attrs

from cohortsync._clock import require_aware
from cohortsync._destination import (
    Batch,
    Capabilities,
    DeliveryResult,
    Destination,
    Operation,
    RunContext,
)
from cohortsync.destinations.catalog import AMAZON_S3
from cohortsync.exceptions import ConfigurationError, PermanentError, TransientError

__all__ = ["CsvDirectoryDestination"]

log = logging.getLogger("cohortsync.destinations")

_FILES = {Operation.ADD: "entering", Operation.REMOVE: "exiting", Operation.EXISTING: "existing"}
_HEADER = "user"
_MAX_COMPONENT = 100
_STAGING = ".staging"
_INTENT = ".publishing"
_INTENT_WRITING = ".publishing.writing"
_PART = re.compile(r"([0-9]{12})-(add|remove|existing)-([0-9a-f]{32})\.csv")
_STAMP = r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z"
_TRANSIENT = re.compile(rf"\.({_STAMP})\.(export|old|merge)")
# What earlier versions left behind: ".<run>.tmp-<pid>" held a run's acknowledged
# batches (adopted, never deleted), ".<run>.old-<pid>" a replaced copy (deleted).
_LEGACY_RUN = re.compile(r"\..+\.tmp-[0-9]+")
_LEGACY_OLD = re.compile(r"\..+\.old-[0-9]+")
_LEGACY_PART = re.compile(r"[0-9]{8}-(entering|exiting|existing)\.part")
_CHUNK = 100_000
"""Rows sorted in memory at once when a file must be re-sorted (legacy, edited)."""
_FAN_IN = 64
"""Most files merged at once: more parts are merged in rounds, oldest first."""

_BY_STEM = {stem: op for op, stem in _FILES.items()}
_BY_CODE = {op.value: op for op in Operation}


def _component(value: str, field: str) -> str:
    """
    Turn an id into one safe path component: reversible percent-encoding (no
    ``/``, no ``..``, no hidden names), shortened with a hash when long.
    """
    if not isinstance(value, str) or not value:
        raise ConfigurationError(field, value, "must be a non-empty str")
    encoded = urllib.parse.quote(value, safe="-_.~@+=,")
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    if len(encoded) > _MAX_COMPONENT:
        digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]
        encoded = f"{encoded[: _MAX_COMPONENT - 17]}~{digest}"
    return encoded


def _to_directory(value: str | os.PathLike[str]) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigurationError("directory", value, "must be a path")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigurationError("directory", str(path), "exists and is not a directory")
    return path


def _export_name(context: RunContext) -> str:
    """
    The export directory of *context*'s slot: the scheduled slot, so that a
    run taking over a crashed attempt publishes to the same place; the run's
    computed time when the adapter is driven by hand (no slot).
    """
    when = context.slot if context.slot is not None else context.computed_at
    field = "slot" if context.slot is not None else "computed_at"
    return require_aware(when, field).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


# -- durable file system operations ---------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """
    Make a directory's entries durable: POSIX records a create, rename or
    unlink on disk only once the directory itself is synced.
    """
    if os.name == "nt":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """
    ``mkdir -p`` whose result survives a power cut: each created directory's
    parent is synced.
    """
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        _fsync_dir(created.parent)


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _write_rows(path: Path, rows: Iterable[str], *, header: bool = False) -> None:
    """
    Write one identifier per CSV row and fsync the file (not its directory).
    """
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow([_HEADER])
        writer.writerows([value] for value in rows)
        f.flush()
        os.fsync(f.fileno())


def _read_rows(path: Path, *, header: bool) -> Iterator[str]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        if header:
            next(rows, None)
        for row in rows:
            if row:
                yield row[0]


def _chunks(rows: Iterator[str]) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(rows, _CHUNK)):
        yield chunk


@functools.cache
def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    if not sys.platform.startswith("linux"):  # pragma: no cover - platform dependent
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - glibc before 2.28, musl
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    renameat2: Callable[[int, bytes, int, bytes, int], int] = function
    return renameat2


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """
    Swap two directories in one atomic step (Linux ``RENAME_EXCHANGE``).
    Returns false where the platform or file system cannot.
    """
    renameat2 = _renameat2()
    if renameat2 is None:  # pragma: no cover - platform dependent
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # pragma: no cover - fs dependent
        return False
    raise OSError(code, os.strerror(code), os.fspath(a))  # pragma: no cover - I/O failure


# -- staging ---------------------------------------------------------------------------


@attrs.define
class _Staging:
    """
    One sync's acknowledged, unpublished batches: ``.staging/`` with one part
    per batch, named ``<position>-<operation>-<key digest>.csv``. A part holds
    the batch's identifiers sorted and de-duplicated, so publishing can merge
    parts without reading any of them whole. Positions order the parts by
    acknowledgement across runs and attempts, until a publication consumes
    them.
    """

    path: Path
    next_position: int = 0
    # key digest -> part file, to replace a batch re-sent with the same key.
    parts: dict[str, Path] = attrs.Factory(dict)
    lock: threading.Lock = attrs.Factory(threading.Lock)

    @classmethod
    def load(cls, path: Path) -> _Staging:
        """
        Open (creating it durably) the staging directory at *path*, adopting
        every part an earlier attempt or run left, and deleting torn writes:
        a part is complete once it has its final name, since it is renamed
        only after its data was synced.
        """
        _make_dirs(path)
        staging = cls(path)
        for entry in sorted(path.iterdir()):
            match = _PART.fullmatch(entry.name)
            if match is None:
                log.debug("removing an unfinished part write: %s", entry)
                _remove_tree(entry)
                continue
            staging.next_position = max(staging.next_position, int(match[1]) + 1)
            previous = staging.parts.get(match[3])
            if previous is not None:  # a crash between a re-send and its cleanup
                previous.unlink()
            staging.parts[match[3]] = entry
        return staging

    def stage(self, values: Iterable[str], operation: Operation, key: str) -> None:
        """
        Store one batch durably: write, fsync, rename into place, fsync the
        directory. A batch with a key already staged replaces that part, at
        the later position, since it is the later send.
        """
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
        rows = sorted(set(values))
        with self.lock:
            position = self.next_position
            self.next_position += 1
        part = self.path / f"{position:012d}-{operation.value}-{digest}.csv"
        writing = self.path / f".{position:012d}.writing"
        _write_rows(writing, rows)
        writing.replace(part)
        _fsync_dir(self.path)
        with self.lock:
            previous = self.parts.get(digest)
            self.parts[digest] = part
        if previous is not None and previous != part:
            # Same key, same rows: a crash before this unlink leaves a copy
            # that publishing de-duplicates.
            previous.unlink(missing_ok=True)

    def sources(self) -> list[_Source]:
        found: list[_Source] = []
        for entry in sorted(self.path.iterdir()):
            match = _PART.fullmatch(entry.name)
            if match is not None:
                found.append(_Source(int(match[1]), _BY_CODE[match[2]], entry, header=False))
        return found


def _adopt_legacy(run_dir: Path, staging: _Staging) -> None:
    """
    Stage what an earlier version left in a crashed run's hidden directory:
    its part files in delivery order, or, when it died while publishing, the
    files it had assembled. Those batches were acknowledged, so they belong
    in the next export.
    """
    parts = sorted(p for p in run_dir.iterdir() if _LEGACY_PART.fullmatch(p.name))
    if parts:
        files = [(p, _BY_STEM[p.name.split("-", 1)[1].removesuffix(".part")], False) for p in parts]
    else:
        files = [
            (run_dir / f"{stem}.csv", op, True)
            for op, stem in _FILES.items()
            if (run_dir / f"{stem}.csv").is_file()
        ]
    for path, operation, header in files:
        for n, chunk in enumerate(_chunks(_read_rows(path, header=header))):
            staging.stage(chunk, operation, f"legacy:{run_dir.name}:{path.name}:{n}")
    log.info("staged the acknowledged batches of an unfinished run: %s", run_dir)
    shutil.rmtree(run_dir)


# -- publishing -------------------------------------------------------------------------


@attrs.frozen
class _Source:
    """
    A sorted file of identifiers that all received *operation* at *position*
    (published exports are at position -1, before every staged part).
    """

    position: int
    operation: Operation
    path: Path
    header: bool


def _resolve(operations: Sequence[Operation]) -> Operation:
    """
    Which file an identifier goes to, from what it received in order: the last
    operation decides whether it is in or out; one that is in but entered,
    left or re-entered during this export is entering, not existing.
    """
    last = operations[-1]
    if last is Operation.EXISTING and any(op is not Operation.EXISTING for op in operations):
        return Operation.ADD
    return last


class _UnsortedError(Exception):
    pass


def _checked(values: Iterator[str]) -> Iterator[str]:
    previous: str | None = None
    for value in values:
        if previous is not None and value <= previous:
            raise _UnsortedError(value)
        previous = value
        yield value


def _is_sorted(source: _Source) -> bool:
    try:
        for _ in _checked(_read_rows(source.path, header=source.header)):
            pass
    except _UnsortedError:
        return False
    return True


def _merge(sources: Sequence[_Source]) -> Iterator[tuple[Operation, str]]:
    """
    Merge sorted sources: each identifier once, in identifier order, with the
    file :func:`_resolve` picks for it. Holds one row per source in memory.
    """

    def tagged(index: int, source: _Source) -> Iterator[tuple[str, int, int, Operation]]:
        for value in _checked(_read_rows(source.path, header=source.header)):
            yield value, source.position, index, source.operation

    streams = [tagged(i, s) for i, s in enumerate(sources)]
    for value, group in itertools.groupby(heapq.merge(*streams), key=lambda row: row[0]):
        yield _resolve([row[3] for row in group]), value


def _write_triple(sources: Sequence[_Source], target: Path, *, header: bool) -> None:
    with contextlib.ExitStack() as stack:
        files: dict[Operation, TextIO] = {
            op: stack.enter_context(
                (target / f"{stem}.csv").open("w", newline="", encoding="utf-8")
            )
            for op, stem in _FILES.items()
        }
        writers = {op: csv.writer(f) for op, f in files.items()}
        if header:
            for writer in writers.values():
                writer.writerow([_HEADER])
        for op, value in _merge(sources):
            writers[op].writerow([value])
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())


def _assemble(sources: list[_Source], target: Path, scratch: Path) -> None:
    """
    Write the export of *sources* to *target*, merging at most ``_FAN_IN``
    files at once: the oldest are folded first into an intermediate triple,
    which keeps their place in the order.
    """
    sources = sorted(sources, key=lambda s: s.position)
    fan_in = max(_FAN_IN, 4)  # each round turns fan_in files into 3
    rounds = 0
    while len(sources) > fan_in:
        rounds += 1
        step = scratch / f"round-{rounds:04d}"
        step.mkdir()
        head, sources = sources[:fan_in], sources[fan_in:]
        _write_triple(head, step, header=False)
        position = head[-1].position
        sources[:0] = [
            _Source(position, op, step / f"{stem}.csv", header=False) for op, stem in _FILES.items()
        ]
    _write_triple(sources, target, header=True)


def _published_sources(folder: Path, scratch: Path) -> list[_Source]:
    """
    The rows of an export already published for the slot, as sources before
    every staged part. Exports this adapter wrote are sorted; anything else
    (an edited file) is re-sorted in chunks first.
    """
    found: list[_Source] = []
    for op, stem in _FILES.items():
        source = _Source(-1, op, folder / f"{stem}.csv", header=True)
        if not source.path.is_file():
            continue
        if _is_sorted(source):
            found.append(source)
            continue
        for n, chunk in enumerate(_chunks(_read_rows(source.path, header=True))):
            path = scratch / f"published-{stem}-{n:06d}.csv"
            _write_rows(path, sorted(set(chunk)))
            found.append(_Source(-1, op, path, header=False))
    return found


@attrs.define
class _Run:
    sync_dir: Path
    name: str
    staging: _Staging


def _recover(sync_dir: Path, staging_path: Path) -> None:
    """
    Finish or undo a publication a crash interrupted, and clear transient
    leftovers. The intent record names the export and the inode of the new
    directory: if the export now has that inode the swap happened and the
    staged parts are in it (so they go); otherwise the old export is put
    back and the parts stay staged.
    """
    intent = sync_dir / _INTENT
    if intent.exists():
        try:
            record = json.loads(intent.read_text(encoding="utf-8"))
            name, identity = str(record["name"]), [int(record["inode"]), int(record["device"])]
        except (ValueError, KeyError, TypeError):  # pragma: no cover - written atomically
            name, identity = "", []
        final = sync_dir / name if name else None
        published = False
        if final is not None and final.is_dir():
            stat = final.stat()
            published = [stat.st_ino, stat.st_dev] == identity
        if published:
            log.debug("a publication of %s completed before a crash; clearing its parts", final)
            _remove_tree(staging_path)
        elif final is not None and not final.exists() and (old := _old(final)).is_dir():
            old.replace(final)
        _fsync_dir(sync_dir)
        intent.unlink()
        _fsync_dir(sync_dir)
    for entry in sync_dir.iterdir():
        transient = _TRANSIENT.fullmatch(entry.name)
        if entry.name == _INTENT_WRITING or _LEGACY_OLD.fullmatch(entry.name):
            _remove_tree(entry)
        elif transient is not None:
            final = sync_dir / transient[1]
            if transient[2] == "old" and not final.exists():
                entry.replace(final)  # the fallback swap was cut between its two renames
            else:
                _remove_tree(entry)


def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


@attrs.define(eq=False, repr=False)
class CsvDirectoryDestination(Destination):
    """
    Writes one export per slot as ``<directory>/<sync_id>/<slot>/`` with
    ``entering.csv``, ``exiting.csv`` and ``existing.csv`` (a ``user``
    header, then one identifier per row, sorted).

    Guarantees, for each sync (the engine runs one run of a sync at a time):

    - **Acknowledged means durable.** ``add()``/``remove()`` return only once
      the batch is a complete, fsynced file in the sync's hidden ``.staging``
      directory (file and directory synced). A failure before that raises
      :class:`~cohortsync.exceptions.TransientError`, and nothing is
      acknowledged.
    - **Nothing acknowledged is lost.** Staged batches are kept until an
      export containing them is durably published: a run that crashes, or
      closes with ``succeeded=False``, leaves them staged, and the next
      successful run of the sync (a takeover of the same slot or a later
      slot) publishes them with its own.
    - **One export per slot.** The export is named by the run's scheduled
      slot (``RunContext.slot``; the computed time when there is none). If
      that export already exists (the worker died after publishing, before
      the engine recorded the run), the new publication merges the published
      rows with the new batches and replaces it.
    - **Atomic.** Readers see an export whole or not at all, and a
      replacement old or new, never a mix (on Linux by an atomic directory
      exchange; elsewhere the slot's directory is briefly absent while it is
      replaced).
    - **Each identifier once.** In an export an identifier is in at most one
      file, once. Batches are applied in the order they were acknowledged,
      older exports' rows first: the last decides in or out, and a member in
      the audience that entered, left or came back since the previous export
      is in ``entering.csv``, not ``existing.csv``.

    Publishing merges sorted files, so memory stays flat whatever the
    audience size (a few rows per staged batch); churn and disk are the
    limits.

    Args:
        directory: Where the sync directories go; created when first needed.
    """

    capabilities: ClassVar[Capabilities] = AMAZON_S3.evolve(
        name="Amazon S3 (CSV directory)", max_batch_size=100_000
    )

    directory: Path = attrs.field(converter=_to_directory)
    _runs: dict[str, _Run] = attrs.field(init=False, factory=dict)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def open(self, context: RunContext) -> None:
        """
        Start a run: finish or undo a publication a crash interrupted, and
        adopt the batches earlier attempts and runs of this sync staged (they
        were acknowledged, so this run's export will list them).

        Raises:
            TransientError: The directory cannot be written.
            TypeError: The slot (or, without one, the computed time) is naive.
        """
        sync_dir = self.directory / _component(context.sync_id, "sync_id")
        name = _export_name(context)
        try:
            _make_dirs(sync_dir)
            staging_path = sync_dir / _STAGING
            _recover(sync_dir, staging_path)
            staging = _Staging.load(staging_path)
            for entry in sorted(sync_dir.iterdir()):
                if _LEGACY_RUN.fullmatch(entry.name) and entry.is_dir():
                    _adopt_legacy(entry, staging)
        except OSError as e:
            raise TransientError(f"cannot prepare {sync_dir}: {e}") from e
        with self._lock:
            # One run per sync at a time: an earlier run of it that never
            # closed was abandoned (its staged parts were just adopted).
            for run_id in [k for k, r in self._runs.items() if r.sync_dir == sync_dir]:
                del self._runs[run_id]
            self._runs[context.run_id] = _Run(sync_dir, name, staging)

    def add(self, batch: Batch) -> DeliveryResult:
        """
        Stage an ``ADD`` batch (for ``entering.csv``) or an ``EXISTING`` one
        (for ``existing.csv``) durably, then acknowledge it.

        Raises:
            TransientError: The batch could not be written and synced.
            PermanentError: The run is not open, or the batch is a removal.
        """
        if batch.operation is Operation.REMOVE:
            raise PermanentError("add() was given a REMOVE batch; removals go through remove()")
        return self._write(batch, batch.operation)

    def remove(self, batch: Batch) -> DeliveryResult:
        """
        Stage the batch (for ``exiting.csv``) durably, then acknowledge it.

        Raises:
            TransientError: The batch could not be written and synced.
            PermanentError: The run is not open.
        """
        return self._write(batch, Operation.REMOVE)

    def close(self, context: RunContext, *, succeeded: bool) -> None:
        """
        Publish the slot's export, or, if the run failed, keep its batches
        staged for the next run to publish: they were acknowledged.

        Raises:
            PermanentError: The export could not be published; the batches
                stay staged and the next successful run publishes them.
        """
        with self._lock:
            run = self._runs.pop(context.run_id, None)
        if run is None:
            return
        if not succeeded:
            log.debug(
                "sync %s run %s: failed; its batches stay staged for the next run",
                context.sync_id,
                context.run_id,
                extra={
                    "sync_id": context.sync_id,
                    "run_id": context.run_id,
                    "slot": None if context.slot is None else context.slot.isoformat(),
                },
            )
            return
        final = run.sync_dir / run.name
        try:
            self._publish(run)
        except (OSError, csv.Error, _UnsortedError) as e:
            raise PermanentError(
                f"cannot publish {final}: {e}; its batches stay staged for the next run"
            ) from e
        log.debug("published the export %s", final)

    def run_directories(self, sync_id: str) -> list[Path]:
        """
        Return the published exports of *sync_id*, oldest first (their names
        are the slot times, UTC).
        """
        sync_dir = self.directory / _component(sync_id, "sync_id")
        if not sync_dir.is_dir():
            return []
        return sorted(p for p in sync_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def read_latest(self, sync_id: str) -> dict[str, list[str]]:
        """
        Read the newest published export of *sync_id*.

        Returns:
            ``{"entering": [...], "exiting": [...], "existing": [...]}``, the
            identifiers in file order.

        Raises:
            FileNotFoundError: The sync has no published export yet.
        """
        runs = self.run_directories(sync_id)
        if not runs:
            raise FileNotFoundError(f"no published run for sync {sync_id!r} in {self.directory}")
        return {
            stem: list(_read_rows(runs[-1] / f"{stem}.csv", header=True))
            for stem in _FILES.values()
        }

    def _write(self, batch: Batch, operation: Operation) -> DeliveryResult:
        with self._lock:
            run = self._runs.get(batch.context.run_id)
        if run is None:
            raise PermanentError(
                f"run {batch.context.run_id!r} is not open; open() must come before batches"
            )
        try:
            run.staging.stage(batch.identifiers, operation, batch.idempotency_key)
        except OSError as e:
            raise TransientError(
                f"cannot stage batch {batch.sequence} in {run.staging.path}: {e}"
            ) from e
        return DeliveryResult.ok()

    @staticmethod
    def _publish(run: _Run) -> None:
        """
        Assemble the export next to its place, record the intent, swap it in,
        then forget the staged parts; each step durable before the next.
        """
        sync_dir = run.sync_dir
        final = sync_dir / run.name
        temp = sync_dir / f".{run.name}.export"
        scratch = sync_dir / f".{run.name}.merge"
        for leftover in (temp, scratch):
            _remove_tree(leftover)
        temp.mkdir()
        scratch.mkdir()
        sources = run.staging.sources()
        if final.is_dir():
            sources = _published_sources(final, scratch) + sources
        _assemble(sources, temp, scratch)
        _fsync_dir(temp)
        shutil.rmtree(scratch)
        stat = temp.stat()
        intent = sync_dir / _INTENT_WRITING
        with intent.open("w", encoding="utf-8") as f:
            json.dump({"name": run.name, "inode": stat.st_ino, "device": stat.st_dev}, f)
            f.flush()
            os.fsync(f.fileno())
        intent.replace(sync_dir / _INTENT)
        _fsync_dir(sync_dir)
        if not final.exists():
            temp.rename(final)
        elif not _exchange(temp, final):
            old = _old(final)
            _remove_tree(old)
            final.rename(old)
            temp.rename(final)
        _fsync_dir(sync_dir)
        # Published: the parts are in the export now.
        _remove_tree(run.staging.path)
        _fsync_dir(sync_dir)
        for leftover in (temp, _old(final)):
            _remove_tree(leftover)  # the replaced export
        (sync_dir / _INTENT).unlink()
        _fsync_dir(sync_dir)

    def __repr__(self) -> str:
        return f"CsvDirectoryDestination({str(self.directory)!r})"
