"""
A destination that writes S3-style cohort files to a local (or mounted) directory.

Each run becomes one directory holding ``entering.csv``, ``exiting.csv`` and
``existing.csv``, the layout cohort exports to Amazon S3 use, so whatever
downstream job reads those buckets can read this directory too.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import shutil
import threading
import urllib.parse
from pathlib import Path
from typing import ClassVar

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
from cohortsync.catalog import AMAZON_S3
from cohortsync.exceptions import ConfigurationError, PermanentError, TransientError

__all__ = ["CsvDirectoryDestination"]

log = logging.getLogger(__name__)

_FILES = {Operation.ADD: "entering", Operation.REMOVE: "exiting", Operation.EXISTING: "existing"}
_HEADER = "user"
# Leftovers of runs that never published: ".<run>.tmp-<pid>" and ".<run>.old-<pid>".
_LEFTOVER = re.compile(r"\..+\.(tmp|old)-[0-9]+")
_MAX_COMPONENT = 100


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


def _fsync_dir(path: Path) -> None:
    """
    Make a rename durable: POSIX only records it once the directory is synced.
    """
    if os.name == "nt":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define
class _Run:
    temp: Path
    final: Path
    # idempotency key -> (file stem, part file); insertion order is delivery order.
    parts: dict[str, tuple[str, Path]] = attrs.Factory(dict)


@attrs.define(eq=False, repr=False)
class CsvDirectoryDestination(Destination):
    """
    Writes every run as ``<directory>/<sync_id>/<computed time>_<run_id>/``
    with ``entering.csv``, ``exiting.csv`` and ``existing.csv`` (a ``user``
    header, then one identifier per row).

    Readers never see a half-written run: batches go to a hidden temporary
    directory that is fsynced and renamed into place only when the run closes
    successfully; a failed run's files are deleted, and a crashed run's hidden
    leftovers are removed by the next ``open`` for the same sync. Each batch is
    stored under its idempotency key, so a batch re-sent after an error does not
    duplicate rows.

    It relies on the engine's guarantee of one run at a time per sync: two
    processes writing the same sync directory at once would clean up each
    other's temporary directories.

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
        Start a run: clean up after crashed runs of this sync, then create the
        hidden directory this run's batches are written to.

        Raises:
            TransientError: The directory cannot be written.
        """
        sync_dir = self.directory / _component(context.sync_id, "sync_id")
        stamp = require_aware(context.computed_at, "computed_at").strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}_{_component(context.run_id, 'run_id')}"
        run = _Run(temp=sync_dir / f".{name}.tmp-{os.getpid()}", final=sync_dir / name)
        with self._lock:
            stale = self._runs.pop(context.run_id, None)
            active = {r.temp for r in self._runs.values()}
        try:
            if stale is not None:
                shutil.rmtree(stale.temp, ignore_errors=True)
            sync_dir.mkdir(parents=True, exist_ok=True)
            for entry in sync_dir.iterdir():
                if _LEFTOVER.fullmatch(entry.name) and entry not in active:
                    log.debug("removing leftover of an unfinished run: %s", entry)
                    shutil.rmtree(entry, ignore_errors=True)
            run.temp.mkdir()
        except OSError as e:
            raise TransientError(f"cannot prepare {sync_dir}: {e}") from e
        with self._lock:
            self._runs[context.run_id] = run

    def add(self, batch: Batch) -> DeliveryResult:
        """
        Write ``ADD`` batches to ``entering.csv`` and ``EXISTING`` ones to
        ``existing.csv``.
        """
        if batch.operation is Operation.REMOVE:
            raise PermanentError("add() was given a REMOVE batch; removals go through remove()")
        return self._write(batch, _FILES[batch.operation])

    def remove(self, batch: Batch) -> DeliveryResult:
        """
        Write the batch to ``exiting.csv``.
        """
        return self._write(batch, _FILES[Operation.REMOVE])

    def close(self, context: RunContext, *, succeeded: bool) -> None:
        """
        Publish the run's files atomically, or discard them if the run failed.

        Raises:
            PermanentError: The files could not be published; they are discarded.
        """
        with self._lock:
            run = self._runs.pop(context.run_id, None)
        if run is None:
            return
        if not succeeded:
            shutil.rmtree(run.temp, ignore_errors=True)
            return
        try:
            self._publish(run)
        except OSError as e:
            shutil.rmtree(run.temp, ignore_errors=True)
            raise PermanentError(f"cannot publish {run.final}: {e}") from e
        log.debug("published run files to %s", run.final)

    def run_directories(self, sync_id: str) -> list[Path]:
        """
        Return the published run directories of *sync_id*, oldest first (their
        names start with the computed time).
        """
        sync_dir = self.directory / _component(sync_id, "sync_id")
        if not sync_dir.is_dir():
            return []
        return sorted(p for p in sync_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def read_latest(self, sync_id: str) -> dict[str, list[str]]:
        """
        Read the newest published run of *sync_id*.

        Returns:
            ``{"entering": [...], "exiting": [...], "existing": [...]}``, the
            identifiers in file order.

        Raises:
            FileNotFoundError: The sync has no published run yet.
        """
        runs = self.run_directories(sync_id)
        if not runs:
            raise FileNotFoundError(f"no published run for sync {sync_id!r} in {self.directory}")
        contents: dict[str, list[str]] = {}
        for stem in _FILES.values():
            with (runs[-1] / f"{stem}.csv").open(newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            contents[stem] = [row[0] for row in rows[1:] if row]
        return contents

    def _write(self, batch: Batch, stem: str) -> DeliveryResult:
        with self._lock:
            run = self._runs.get(batch.context.run_id)
            if run is None:
                raise PermanentError(
                    f"run {batch.context.run_id!r} is not open; open() must come before batches"
                )
            entry = run.parts.get(batch.idempotency_key)
            if entry is None:
                entry = (stem, run.temp / f"{len(run.parts):08d}-{stem}.part")
                run.parts[batch.idempotency_key] = entry
        part = entry[1]
        writing = part.with_suffix(".writing")
        try:
            with writing.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([value] for value in batch.identifiers)
            writing.replace(part)
        except OSError as e:
            raise TransientError(f"cannot write batch {batch.sequence} to {run.temp}: {e}") from e
        return DeliveryResult.ok()

    @staticmethod
    def _publish(run: _Run) -> None:
        for stem in _FILES.values():
            with (run.temp / f"{stem}.csv").open("w", newline="", encoding="utf-8") as out:
                csv.writer(out).writerow([_HEADER])
                for part_stem, part in run.parts.values():
                    if part_stem == stem:
                        with part.open(newline="", encoding="utf-8") as src:
                            shutil.copyfileobj(src, out)
                out.flush()
                os.fsync(out.fileno())
        for _, part in run.parts.values():
            part.unlink()
        _fsync_dir(run.temp)
        if run.final.exists():
            # The same run published before (re-run after a crash): swap it out,
            # so readers see the old or the new directory, never a mix.
            old = run.final.with_name(f".{run.final.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            run.final.replace(old)
            run.temp.replace(run.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            run.temp.replace(run.final)
        _fsync_dir(run.final.parent)

    def __repr__(self) -> str:
        return f"CsvDirectoryDestination({str(self.directory)!r})"
