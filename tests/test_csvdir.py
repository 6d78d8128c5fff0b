from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import attrs
import pytest

from cohortsync._csvdir import CsvDirectoryDestination
from cohortsync._destination import (
    Batch,
    DeliveryResult,
    Identifier,
    IdentifierKind,
    Member,
    Operation,
    RunContext,
)
from cohortsync.exceptions import ConfigurationError, PermanentError

if TYPE_CHECKING:
    from pathlib import Path

COMPUTED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
RUN_DIR = "20240501T120000.000000Z_run-1"

CONTEXT = RunContext(
    run_id="run-1",
    sync_id="sync-1",
    generation=1,
    cohort_id="power-users",
    cohort_name="Power users",
    computed_at=COMPUTED_AT,
    full_sync=True,
)


def make_batch(
    users: list[str],
    operation: Operation,
    context: RunContext = CONTEXT,
    sequence: int = 0,
) -> Batch:
    members = tuple(Member(u, Identifier(IdentifierKind.USER_ID, u)) for u in users)
    return Batch(
        context=context,
        operation=operation,
        members=members,
        sequence=sequence,
        idempotency_key=f"{context.run_id}-{operation.value}-{sequence}",
    )


def run(
    dest: CsvDirectoryDestination,
    context: RunContext = CONTEXT,
    *,
    entering: list[str] | None = None,
    exiting: list[str] | None = None,
    existing: list[str] | None = None,
) -> None:
    """
    Drive one run the way the engine does: open, removals, adds, close.
    """
    dest.open(context)
    if exiting:
        dest.remove(make_batch(exiting, Operation.REMOVE, context))
    if entering:
        dest.add(make_batch(entering, Operation.ADD, context))
    if existing:
        dest.add(make_batch(existing, Operation.EXISTING, context))
    dest.close(context, succeeded=True)


def visible(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


class TestFiles:
    def test_layout_and_contents(self, tmp_path: Path) -> None:
        """A run writes entering, exiting and existing CSVs under sync and run."""
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, entering=["u1", "u2"], exiting=["u9"], existing=["u5"])

        run_dir = tmp_path / "sync-1" / RUN_DIR
        assert ["sync-1"] == sorted(p.name for p in tmp_path.iterdir())
        assert [RUN_DIR] == sorted(p.name for p in (tmp_path / "sync-1").iterdir())
        assert ["entering.csv", "existing.csv", "exiting.csv"] == visible(run_dir)
        assert "user\r\nu1\r\nu2\r\n" == (run_dir / "entering.csv").read_bytes().decode()
        assert "user\r\nu9\r\n" == (run_dir / "exiting.csv").read_bytes().decode()
        assert "user\r\nu5\r\n" == (run_dir / "existing.csv").read_bytes().decode()

    def test_empty_sets_still_get_a_file(self, tmp_path: Path) -> None:
        """Readers can rely on all three files existing, header only when empty."""
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, entering=["u1"])

        assert {"entering": ["u1"], "exiting": [], "existing": []} == dest.read_latest("sync-1")

    def test_batches_accumulate_in_order(self, tmp_path: Path) -> None:
        """Several batches of one operation end up in one file, in delivery order."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)

        results = [
            dest.add(make_batch(["a", "b"], Operation.ADD, sequence=0)),
            dest.add(make_batch(["c"], Operation.ADD, sequence=1)),
            dest.add(make_batch(["d"], Operation.EXISTING, sequence=2)),
        ]
        dest.close(CONTEXT, succeeded=True)

        assert [DeliveryResult.ok()] * 3 == results
        assert ["a", "b", "c"] == dest.read_latest("sync-1")["entering"]

    def test_resent_batch_is_not_duplicated(self, tmp_path: Path) -> None:
        """A batch re-sent with the same idempotency key replaces its rows."""
        dest = CsvDirectoryDestination(tmp_path)
        batch = make_batch(["u1", "u2"], Operation.ADD)
        dest.open(CONTEXT)

        dest.add(batch)
        dest.add(batch)
        dest.close(CONTEXT, succeeded=True)

        assert ["u1", "u2"] == dest.read_latest("sync-1")["entering"]

    def test_awkward_identifiers_round_trip(self, tmp_path: Path) -> None:
        """Commas, quotes, newlines and non-ASCII survive CSV quoting."""
        users = ["a,b", 'say "hi"', "two\nlines", "Zoë"]
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, entering=users)

        assert users == dest.read_latest("sync-1")["entering"]

    def test_ids_cannot_escape_the_directory(self, tmp_path: Path) -> None:
        """Sync and run ids are encoded into single, non-hidden path components."""
        base = tmp_path / "out"
        context = attrs.evolve(CONTEXT, sync_id="../../evil", run_id=".hidden/run")
        dest = CsvDirectoryDestination(base)

        run(dest, context, entering=["u1"])

        assert ["out"] == sorted(p.name for p in tmp_path.iterdir())
        (sync_dir,) = base.iterdir()
        assert "%2E.%2F..%2Fevil" == sync_dir.name
        assert ["20240501T120000.000000Z_%2Ehidden%2Frun"] == visible(sync_dir)
        assert {"entering": ["u1"], "exiting": [], "existing": []} == (
            dest.read_latest("../../evil")
        )

    def test_long_ids_are_shortened(self, tmp_path: Path) -> None:
        """Very long ids still make valid file names, distinct per id."""
        dest = CsvDirectoryDestination(tmp_path)
        first = attrs.evolve(CONTEXT, sync_id="s" * 300)
        second = attrs.evolve(CONTEXT, sync_id="s" * 299 + "t")

        run(dest, first, entering=["a"])
        run(dest, second, entering=["b"])

        assert ["a"] == dest.read_latest("s" * 300)["entering"]
        assert ["b"] == dest.read_latest("s" * 299 + "t")["entering"]
        assert all(len(p.name) <= 100 for p in tmp_path.iterdir())


class TestCapabilities:
    def test_full_sync_only(self) -> None:
        """Files take the whole membership every run and cannot be real-time."""
        caps = CsvDirectoryDestination.capabilities

        assert ("Amazon S3 (CSV directory)", True, False, 100_000) == (
            caps.name,
            caps.full_sync_only,
            caps.supports_realtime,
            caps.max_batch_size,
        )


class TestAtomicity:
    def test_nothing_visible_before_close(self, tmp_path: Path) -> None:
        """While a run is in progress only a hidden temporary directory exists."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)
        dest.add(make_batch(["u1"], Operation.ADD))

        sync_dir = tmp_path / "sync-1"
        assert [] == visible(sync_dir)
        assert 1 == len(list(sync_dir.iterdir()))
        with pytest.raises(FileNotFoundError):
            dest.read_latest("sync-1")

        dest.close(CONTEXT, succeeded=True)

        assert [RUN_DIR] == visible(sync_dir)
        assert [RUN_DIR] == [p.name for p in sync_dir.iterdir()]

    def test_failed_run_leaves_nothing(self, tmp_path: Path) -> None:
        """close(succeeded=False) deletes everything the run wrote."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)
        dest.add(make_batch(["u1"], Operation.ADD))

        dest.close(CONTEXT, succeeded=False)

        assert [] == list((tmp_path / "sync-1").iterdir())

    def test_failed_run_keeps_the_previous_one(self, tmp_path: Path) -> None:
        """A failed run does not disturb the last published run."""
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, entering=["u1"])
        second = attrs.evolve(CONTEXT, run_id="run-2", computed_at=COMPUTED_AT + timedelta(hours=1))
        dest.open(second)
        dest.add(make_batch(["u2"], Operation.ADD, second))

        dest.close(second, succeeded=False)

        assert ["u1"] == dest.read_latest("sync-1")["entering"]

    def test_crash_leftovers_are_cleaned_on_next_open(self, tmp_path: Path) -> None:
        """A crashed run's hidden directory goes at the next open; other files stay."""
        sync_dir = tmp_path / "sync-1"
        stale = sync_dir / ".20240101T000000.000000Z_run-0.tmp-99999"
        stale_old = sync_dir / f".{RUN_DIR}.old-4242"
        for leftover in (stale, stale_old):
            leftover.mkdir(parents=True)
            (leftover / "00000000-entering.part").write_text("u1\r\n")
        (sync_dir / ".keep").write_text("not ours")
        dest = CsvDirectoryDestination(tmp_path)

        dest.open(CONTEXT)

        assert not stale.exists()
        assert not stale_old.exists()
        assert (sync_dir / ".keep").exists()
        dest.close(CONTEXT, succeeded=False)

    def test_republishing_a_run_replaces_it(self, tmp_path: Path) -> None:
        """The same run published twice (a re-run after a crash) keeps only the new files."""
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, entering=["old"])

        run(dest, entering=["new"])

        assert [RUN_DIR] == visible(tmp_path / "sync-1")
        assert ["new"] == dest.read_latest("sync-1")["entering"]
        assert [RUN_DIR] == [p.name for p in (tmp_path / "sync-1").iterdir()]

    def test_close_of_unknown_run_is_a_no_op(self, tmp_path: Path) -> None:
        """Closing a run that never opened (open failed) does nothing."""
        CsvDirectoryDestination(tmp_path).close(CONTEXT, succeeded=True)

        assert [] == list(tmp_path.iterdir())


class TestReadLatest:
    def test_newest_run_wins(self, tmp_path: Path) -> None:
        """read_latest reads the run with the newest computed time."""
        dest = CsvDirectoryDestination(tmp_path)
        later = attrs.evolve(CONTEXT, run_id="a-run", computed_at=COMPUTED_AT + timedelta(days=1))

        run(dest, later, entering=["new"], exiting=["gone"])
        run(dest, entering=["old"])

        assert {"entering": ["new"], "exiting": ["gone"], "existing": []} == (
            dest.read_latest("sync-1")
        )
        assert [RUN_DIR, "20240502T120000.000000Z_a-run"] == [
            p.name for p in dest.run_directories("sync-1")
        ]

    def test_no_run_yet(self, tmp_path: Path) -> None:
        """Reading a sync that never published raises FileNotFoundError."""
        dest = CsvDirectoryDestination(tmp_path / "missing")

        with pytest.raises(FileNotFoundError, match="sync-1"):
            dest.read_latest("sync-1")
        assert [] == dest.run_directories("sync-1")


class TestMisuse:
    def test_batch_before_open(self, tmp_path: Path) -> None:
        """Batches for a run that is not open fail the run clearly."""
        dest = CsvDirectoryDestination(tmp_path)

        with pytest.raises(PermanentError, match="not open"):
            dest.add(make_batch(["u1"], Operation.ADD))

    def test_remove_batch_through_add(self, tmp_path: Path) -> None:
        """add() refuses REMOVE batches instead of writing them to the wrong file."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)

        with pytest.raises(PermanentError, match="remove"):
            dest.add(make_batch(["u1"], Operation.REMOVE))
        dest.close(CONTEXT, succeeded=False)

    def test_directory_that_is_a_file(self, tmp_path: Path) -> None:
        """A path that is a file is refused up front."""
        target = tmp_path / "file"
        target.write_text("")

        with pytest.raises(ConfigurationError, match="not a directory"):
            CsvDirectoryDestination(target)

    def test_directory_of_the_wrong_type(self) -> None:
        """Only paths are accepted."""
        with pytest.raises(ConfigurationError, match="directory"):
            CsvDirectoryDestination(42)  # type: ignore[arg-type]

    def test_naive_computed_at(self, tmp_path: Path) -> None:
        """A naive run time is refused: it would name files in local time."""
        context = attrs.evolve(CONTEXT, computed_at=datetime(2024, 5, 1))  # noqa: DTZ001 - the point

        with pytest.raises(TypeError, match="timezone-aware"):
            CsvDirectoryDestination(tmp_path).open(context)

    def test_repr(self, tmp_path: Path) -> None:
        """The repr names the directory."""
        assert f"CsvDirectoryDestination({os.fspath(tmp_path)!r})" == (
            repr(CsvDirectoryDestination(tmp_path))
        )
