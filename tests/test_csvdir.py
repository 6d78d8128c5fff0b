from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cohortsync._destination import (
    Batch,
    DeliveryResult,
    Identifier,
    IdentifierKind,
    Member,
    Operation,
    RunContext,
)
from cohortsync.destinations import _csvdir
from cohortsync.destinations._csvdir import CsvDirectoryDestination
from cohortsync.exceptions import ConfigurationError, PermanentError, TransientError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

COMPUTED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
RUN_DIR = "20240501T120000.000000Z"

CONTEXT = RunContext(
    run_id="run-1",
    sync_id="sync-1",
    generation=1,
    cohort_id="power-users",
    cohort_name="Power users",
    computed_at=COMPUTED_AT,
    full_sync=True,
)

SLOT_1 = datetime(2024, 5, 1, 13, 0, tzinfo=timezone.utc)
SLOT_2 = SLOT_1 + timedelta(hours=1)
SLOT_1_DIR = "20240501T130000.000000Z"
SLOT_2_DIR = "20240501T140000.000000Z"


def attempt(slot: datetime, run_id: str) -> RunContext:
    """
    The context the engine gives a run of *slot*: each attempt (a takeover
    after a crash) has its own run id and starts later, but runs the same slot.
    """
    return attrs.evolve(
        CONTEXT, run_id=run_id, slot=slot, computed_at=slot + timedelta(minutes=len(run_id))
    )


def make_batch(
    users: list[str],
    operation: Operation,
    context: RunContext = CONTEXT,
    sequence: int = 0,
    key: str | None = None,
) -> Batch:
    members = tuple(Member(u, Identifier(IdentifierKind.USER_ID, u)) for u in users)
    return Batch(
        context=context,
        operation=operation,
        members=members,
        sequence=sequence,
        idempotency_key=key or f"{context.run_id}-{operation.value}-{sequence}",
    )


def send(
    dest: CsvDirectoryDestination, context: RunContext, op: Operation, users: list[str]
) -> None:
    """
    One batch, keyed by slot and content as the engine keys them: a re-send
    by a takeover carries the same key.
    """
    batch = make_batch(users, op, context, key=f"{context.slot}-{op.value}-{','.join(users)}")
    if op is Operation.REMOVE:
        dest.remove(batch)
    else:
        dest.add(batch)


def run(
    dest: CsvDirectoryDestination,
    context: RunContext = CONTEXT,
    *,
    entering: list[str] | None = None,
    exiting: list[str] | None = None,
    existing: list[str] | None = None,
    close: bool | None = True,
) -> None:
    """
    Drive one run the way the engine does: open, removals, adds, existing,
    then close (``close=None``: the worker dies before closing).
    """
    dest.open(context)
    if exiting:
        send(dest, context, Operation.REMOVE, exiting)
    if entering:
        send(dest, context, Operation.ADD, entering)
    if existing:
        send(dest, context, Operation.EXISTING, existing)
    if close is not None:
        dest.close(context, succeeded=close)


def visible(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def hidden(path: Path) -> list[str]:
    """
    What is left besides published exports: nothing, once a publication completed.
    """
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


def exports(dest: CsvDirectoryDestination, sync_id: str = "sync-1") -> list[dict[str, list[str]]]:
    """
    The contents of every published export of *sync_id*, oldest first.
    """
    found = []
    for folder in dest.run_directories(sync_id):
        contents = {}
        for stem in ("entering", "exiting", "existing"):
            with (folder / f"{stem}.csv").open(newline="", encoding="utf-8") as f:
                header, *rows = csv.reader(f)
            assert ["user"] == header
            contents[stem] = [row[0] for row in rows]
        found.append(contents)
    return found


def files(
    entering: list[str] | None = None,
    exiting: list[str] | None = None,
    existing: list[str] | None = None,
) -> dict[str, list[str]]:
    return {"entering": entering or [], "exiting": exiting or [], "existing": existing or []}


class SimulatedCrash(BaseException):
    """
    kill -9 in the middle of a call: a BaseException, so no cleanup code for
    ordinary errors runs.
    """


@attrs.define
class FsyncKiller:
    """
    Kills the "process" (raises SimulatedCrash) at the N-th ``os.fsync``
    inside ``armed(N)``; everything written before that fsync is on disk.
    """

    real: Callable[[int], None]
    left: int = 0
    killed: bool = False

    def fsync(self, fd: int) -> None:
        if self.left:
            self.left -= 1
            if not self.left:
                self.killed = True
                raise SimulatedCrash
        self.real(fd)

    @contextlib.contextmanager
    def armed(self, n: int) -> Iterator[None]:
        self.left, self.killed = n, False
        try:
            yield
        except SimulatedCrash:
            pass
        finally:
            self.left = 0


@pytest.fixture
def killer(monkeypatch: pytest.MonkeyPatch) -> FsyncKiller:
    killer = FsyncKiller(os.fsync)
    monkeypatch.setattr(os, "fsync", killer.fsync)
    return killer


class TestFiles:
    def test_layout_and_contents(self, tmp_path: Path) -> None:
        """A run writes entering, exiting and existing CSVs under sync and slot."""
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, entering=["u1", "u2"], exiting=["u9"], existing=["u5"])

        run_dir = tmp_path / "sync-1" / RUN_DIR
        assert ["sync-1"] == sorted(p.name for p in tmp_path.iterdir())
        assert [RUN_DIR] == sorted(p.name for p in (tmp_path / "sync-1").iterdir())
        assert ["entering.csv", "existing.csv", "exiting.csv"] == sorted(
            p.name for p in run_dir.iterdir()
        )
        assert "user\r\nu1\r\nu2\r\n" == (run_dir / "entering.csv").read_bytes().decode()
        assert "user\r\nu9\r\n" == (run_dir / "exiting.csv").read_bytes().decode()
        assert "user\r\nu5\r\n" == (run_dir / "existing.csv").read_bytes().decode()

    def test_empty_sets_still_get_a_file(self, tmp_path: Path) -> None:
        """Readers can rely on all three files existing, header only when empty."""
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, entering=["u1"])

        assert files(entering=["u1"]) == dest.read_latest("sync-1")

    def test_batches_accumulate_sorted(self, tmp_path: Path) -> None:
        """Several batches of one operation end up in one file, sorted by identifier."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)

        results = [
            dest.add(make_batch(["c", "a"], Operation.ADD, sequence=0)),
            dest.add(make_batch(["b"], Operation.ADD, sequence=1)),
            dest.add(make_batch(["d"], Operation.EXISTING, sequence=2)),
        ]
        dest.close(CONTEXT, succeeded=True)

        assert [DeliveryResult.ok()] * 3 == results
        assert files(entering=["a", "b", "c"], existing=["d"]) == dest.read_latest("sync-1")

    def test_resent_batch_is_not_duplicated(self, tmp_path: Path) -> None:
        """A batch re-sent with the same idempotency key leaves its rows once."""
        dest = CsvDirectoryDestination(tmp_path)
        batch = make_batch(["u1", "u2"], Operation.ADD)
        dest.open(CONTEXT)

        dest.add(batch)
        dest.add(batch)
        dest.close(CONTEXT, succeeded=True)

        assert ["u1", "u2"] == dest.read_latest("sync-1")["entering"]
        assert 1 == len(list(dest.run_directories("sync-1")))

    def test_awkward_identifiers_round_trip(self, tmp_path: Path) -> None:
        """Commas, quotes, newlines and non-ASCII survive CSV quoting."""
        users = ["a,b", 'say "hi"', "two\nlines", "Zoë", "cr\r"]
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, entering=users)

        assert sorted(users) == dest.read_latest("sync-1")["entering"]

    def test_ids_cannot_escape_the_directory(self, tmp_path: Path) -> None:
        """Sync ids are encoded into single, non-hidden path components; run ids name nothing."""
        base = tmp_path / "out"
        context = attrs.evolve(CONTEXT, sync_id="../../evil", run_id="../.hidden/run")
        dest = CsvDirectoryDestination(base)

        run(dest, context, entering=["u1"])

        assert ["out"] == sorted(p.name for p in tmp_path.iterdir())
        (sync_dir,) = base.iterdir()
        assert "%2E.%2F..%2Fevil" == sync_dir.name
        assert [RUN_DIR] == [p.name for p in sync_dir.iterdir()]
        assert files(entering=["u1"]) == dest.read_latest("../../evil")

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

    def test_named_by_slot_in_utc(self, tmp_path: Path) -> None:
        """The export is named by the scheduled slot in UTC, not by when the run started."""
        paris = timezone(timedelta(hours=2))
        context = attrs.evolve(
            CONTEXT, slot=SLOT_1.astimezone(paris), computed_at=SLOT_1 + timedelta(minutes=7)
        )
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, context, entering=["u1"])

        assert [SLOT_1_DIR] == visible(tmp_path / "sync-1")


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
        """While a run is in progress only the hidden staging directory exists."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)
        dest.add(make_batch(["u1"], Operation.ADD))

        sync_dir = tmp_path / "sync-1"
        assert [] == visible(sync_dir)
        assert [".staging"] == [p.name for p in sync_dir.iterdir()]
        with pytest.raises(FileNotFoundError):
            dest.read_latest("sync-1")

        dest.close(CONTEXT, succeeded=True)

        assert [RUN_DIR] == [p.name for p in sync_dir.iterdir()]

    def test_failed_run_keeps_the_previous_export(self, tmp_path: Path) -> None:
        """A failed run does not disturb the last published export."""
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, entering=["u1"])
        second = attrs.evolve(CONTEXT, run_id="run-2", computed_at=COMPUTED_AT + timedelta(hours=1))

        run(dest, second, entering=["u2"], close=False)

        assert [RUN_DIR] == visible(tmp_path / "sync-1")
        assert ["u1"] == dest.read_latest("sync-1")["entering"]

    def test_republishing_a_slot_merges_into_one_export(self, tmp_path: Path) -> None:
        """A second publication for a slot merges with the first and replaces it: one export."""
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, entering=["old"], exiting=["gone"])

        run(dest, entering=["new"])

        assert [RUN_DIR] == [p.name for p in (tmp_path / "sync-1").iterdir()]
        assert files(entering=["new", "old"], exiting=["gone"]) == dest.read_latest("sync-1")

    def test_close_of_unknown_run_is_a_no_op(self, tmp_path: Path) -> None:
        """Closing a run that never opened (open failed) does nothing."""
        CsvDirectoryDestination(tmp_path).close(CONTEXT, succeeded=True)

        assert [] == list(tmp_path.iterdir())


class TestDurability:
    @pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
    def test_acknowledged_only_once_synced(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """add() returns only after the batch's file and its directory were fsynced."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)
        synced: list[Path] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            synced.append(Path(f"/proc/self/fd/{fd}").readlink())
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

        dest.add(make_batch(["u1"], Operation.ADD))

        written = [p for p in synced if p.is_relative_to(tmp_path) and not p.is_dir()]
        assert 1 == len(written)
        assert written[0].parent in synced
        assert synced.index(written[0]) < synced.index(written[0].parent)
        dest.close(CONTEXT, succeeded=True)

    def test_batch_that_cannot_be_synced_is_not_acknowledged(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A write or sync failure raises TransientError, and the batch never appears."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)
        real = os.fsync

        def failing(fd: int) -> None:
            raise OSError(5, "I/O error")

        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(TransientError, match="cannot stage batch 0"):
            dest.add(make_batch(["u1"], Operation.ADD))
        monkeypatch.setattr(os, "fsync", real)

        second = attrs.evolve(CONTEXT, run_id="run-2")
        run(dest, second, entering=["u2"])

        assert files(entering=["u2"]) == dest.read_latest("sync-1")


class TestCrashRecovery:
    """
    A crash at any point before the engine records the run loses no
    acknowledged batch and leaves one export per slot.
    """

    @pytest.mark.parametrize("next_slot", [SLOT_1, SLOT_2], ids=["takeover", "next-slot"])
    def test_batches_of_a_crashed_run_are_published_by_the_next(
        self, tmp_path: Path, next_slot: datetime
    ) -> None:
        """Batches acked before a crash appear in the next export, joiners as entering."""
        run(
            CsvDirectoryDestination(tmp_path),
            attempt(SLOT_1, "run-1"),
            exiting=["gone"],
            entering=["joined"],
            close=None,  # killed after both batches were acknowledged and applied
        )
        # A new process; the delivered state holds "joined", so it comes as EXISTING.
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, attempt(next_slot, "run-2"), existing=["joined", "kept"])

        assert files(entering=["joined"], exiting=["gone"], existing=["kept"]) == (
            dest.read_latest("sync-1")
        )
        assert 1 == len(exports(dest))
        assert [] == hidden(tmp_path / "sync-1")

    def test_batches_of_a_failed_run_are_published_by_the_next(self, tmp_path: Path) -> None:
        """close(succeeded=False) keeps acknowledged batches staged for the next run."""
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, attempt(SLOT_1, "run-1"), exiting=["gone"], entering=["joined"], close=False)
        assert [] == visible(tmp_path / "sync-1")

        run(CsvDirectoryDestination(tmp_path), attempt(SLOT_2, "run-2"), existing=["kept"])

        assert [files(entering=["joined"], exiting=["gone"], existing=["kept"])] == (exports(dest))
        assert [SLOT_2_DIR] == visible(tmp_path / "sync-1")
        assert [] == hidden(tmp_path / "sync-1")

    def test_takeover_after_publishing_merges_into_the_same_export(self, tmp_path: Path) -> None:
        """Killed after publishing, before the run was recorded: still one export for the slot."""
        run(
            CsvDirectoryDestination(tmp_path),
            attempt(SLOT_1, "run-1"),
            exiting=["gone"],
            entering=["joined"],
            existing=["kept"],
        )
        # The takeover's diff finds nothing new: everyone delivered comes as EXISTING.
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, attempt(SLOT_1, "run-2"), existing=["joined", "kept"])

        assert [files(entering=["joined"], exiting=["gone"], existing=["kept"])] == (exports(dest))
        assert [] == hidden(tmp_path / "sync-1")

    @pytest.mark.parametrize("crash_at", range(1, 13))
    def test_killed_while_publishing(
        self, tmp_path: Path, killer: FsyncKiller, crash_at: int
    ) -> None:
        """Killed at any fsync while publishing: readers see no export or all of it."""
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, attempt(SLOT_1, "run-1"), exiting=["gone"], entering=["joined"], close=None)
        complete = files(entering=["joined"], exiting=["gone"], existing=["kept"])
        dest.add(make_batch(["kept"], Operation.EXISTING, attempt(SLOT_1, "run-1"), 9))

        with killer.armed(crash_at):
            dest.close(attempt(SLOT_1, "run-1"), succeeded=True)
        assert exports(dest) in ([], [complete])

        takeover = CsvDirectoryDestination(tmp_path)
        run(takeover, attempt(SLOT_1, "run-2"), existing=["joined", "kept"])

        assert [complete] == exports(takeover)
        assert [] == hidden(tmp_path / "sync-1")

    @pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
    @pytest.mark.parametrize("crash_at", range(1, 13))
    def test_killed_while_republishing(
        self,
        tmp_path: Path,
        killer: FsyncKiller,
        monkeypatch: pytest.MonkeyPatch,
        crash_at: int,
        exchange: bool,
    ) -> None:
        """Killed at any fsync while re-publishing a slot: readers see the old export or the new."""
        if not exchange:
            monkeypatch.setattr(_csvdir, "_exchange", lambda a, b: False)
        run(
            CsvDirectoryDestination(tmp_path),
            attempt(SLOT_1, "run-1"),
            entering=["joined"],
            existing=["kept", "left"],
        )
        first = files(entering=["joined"], existing=["kept", "left"])
        # The takeover finds "left" gone from the cohort and removes it.
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, attempt(SLOT_1, "run-2"), exiting=["left"], close=None)
        dest.add(make_batch(["joined", "kept"], Operation.EXISTING, attempt(SLOT_1, "run-2"), 9))
        second = files(entering=["joined"], exiting=["left"], existing=["kept"])

        with killer.armed(crash_at):
            dest.close(attempt(SLOT_1, "run-2"), succeeded=True)
        assert exports(dest) in ([first], [second])

        last = CsvDirectoryDestination(tmp_path)
        run(last, attempt(SLOT_1, "run-3"), existing=["joined", "kept"])

        assert [second] == exports(last)
        assert [] == hidden(tmp_path / "sync-1")

    def test_killed_between_the_renames_of_a_replacement(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without an atomic exchange, a crash mid-replacement is undone by the next open."""
        monkeypatch.setattr(_csvdir, "_exchange", lambda a, b: False)
        run(CsvDirectoryDestination(tmp_path), attempt(SLOT_1, "run-1"), existing=["kept", "left"])
        first = files(existing=["kept", "left"])
        dest = CsvDirectoryDestination(tmp_path)
        run(dest, attempt(SLOT_1, "run-2"), exiting=["left"], close=None)
        real = Path.rename

        def rename(self: Path, target: Path) -> Path:
            if self.name.endswith(".export"):
                raise SimulatedCrash
            return real(self, target)

        monkeypatch.setattr(Path, "rename", rename)
        with pytest.raises(SimulatedCrash):
            dest.close(attempt(SLOT_1, "run-2"), succeeded=True)
        monkeypatch.setattr(Path, "rename", real)
        assert [] == exports(dest)  # the documented moment without the slot's directory

        CsvDirectoryDestination(tmp_path).open(attempt(SLOT_1, "run-3"))

        assert [first] == exports(dest)
        last = CsvDirectoryDestination(tmp_path)
        run(last, attempt(SLOT_1, "run-4"), existing=["kept"])
        assert [files(exiting=["left"], existing=["kept"])] == exports(last)

    def test_killed_while_staging_a_batch(self, tmp_path: Path, killer: FsyncKiller) -> None:
        """A batch killed before it was acknowledged is not published and blocks nothing."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(attempt(SLOT_1, "run-1"))
        with killer.armed(1):
            send(dest, attempt(SLOT_1, "run-1"), Operation.ADD, ["never-acked"])
        assert killer.killed

        takeover = CsvDirectoryDestination(tmp_path)
        run(takeover, attempt(SLOT_1, "run-2"), entering=["acked"])

        assert [files(entering=["acked"])] == exports(takeover)

    def test_resent_batch_after_a_crash_is_listed_once(self, tmp_path: Path) -> None:
        """A batch acked, then re-sent under its key by the takeover, is in the export once."""
        run(
            CsvDirectoryDestination(tmp_path),
            attempt(SLOT_1, "run-1"),
            entering=["a", "b"],
            close=None,
        )
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, attempt(SLOT_1, "run-2"), entering=["a", "b"])

        assert [files(entering=["a", "b"])] == exports(dest)
        assert [] == hidden(tmp_path / "sync-1")

    @pytest.mark.parametrize(
        ("first", "then", "expected"),
        [
            (Operation.ADD, Operation.REMOVE, files(exiting=["m"])),
            (Operation.REMOVE, Operation.ADD, files(entering=["m"])),
            (Operation.REMOVE, Operation.EXISTING, files(entering=["m"])),
            (Operation.EXISTING, Operation.REMOVE, files(exiting=["m"])),
        ],
    )
    def test_the_later_batch_decides(
        self, tmp_path: Path, first: Operation, then: Operation, expected: dict[str, list[str]]
    ) -> None:
        """A member whose batches across attempts disagree is listed once, as the later one says."""
        crashed = CsvDirectoryDestination(tmp_path)
        crashed.open(attempt(SLOT_1, "run-1"))
        send(crashed, attempt(SLOT_1, "run-1"), first, ["m"])
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(attempt(SLOT_1, "run-2"))
        send(dest, attempt(SLOT_1, "run-2"), then, ["m"])
        dest.close(attempt(SLOT_1, "run-2"), succeeded=True)

        assert [expected] == exports(dest)

    def test_leftovers_of_the_previous_version_are_published(self, tmp_path: Path) -> None:
        """Batches an earlier version acknowledged into a hidden run directory are adopted."""
        sync_dir = tmp_path / "sync-1"
        crashed_run = sync_dir / ".20240101T000000.000000Z_run-0.tmp-99999"
        crashed_run.mkdir(parents=True)
        (crashed_run / "00000000-exiting.part").write_text("gone\r\n")
        (crashed_run / "00000001-entering.part").write_text("b\r\na\r\n")
        mid_publish = sync_dir / ".20240101T010000.000000Z_run-1.tmp-99999"
        mid_publish.mkdir()
        (mid_publish / "entering.csv").write_text("user\r\nc\r\n")
        replaced = sync_dir / f".{RUN_DIR}_run-1.old-4242"
        replaced.mkdir()
        (replaced / "entering.csv").write_text("user\r\nstale\r\n")
        (sync_dir / ".keep").write_text("not ours")
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, existing=["kept"])

        assert files(entering=["a", "b", "c"], exiting=["gone"], existing=["kept"]) == (
            dest.read_latest("sync-1")
        )
        assert [".keep", RUN_DIR] == sorted(p.name for p in sync_dir.iterdir())


class TestOneFilePerIdentifier:
    def test_identifiers_are_listed_once(self, tmp_path: Path) -> None:
        """Duplicates within and across batches collapse to one row."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)

        dest.add(make_batch(["a", "b", "a"], Operation.ADD, sequence=0))
        dest.add(make_batch(["b", "c"], Operation.ADD, sequence=1))
        dest.add(make_batch(["x", "x"], Operation.EXISTING, sequence=2))
        dest.close(CONTEXT, succeeded=True)

        assert files(entering=["a", "b", "c"], existing=["x"]) == dest.read_latest("sync-1")

    def test_entering_members_are_not_also_existing(self, tmp_path: Path) -> None:
        """A member both added and sent as existing in one export is entering only."""
        dest = CsvDirectoryDestination(tmp_path)

        run(dest, entering=["new"], existing=["new", "old"])

        assert files(entering=["new"], existing=["old"]) == dest.read_latest("sync-1")

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        attempts=st.lists(
            st.lists(
                st.tuples(
                    st.sampled_from(list(Operation)),
                    st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=5),
                ),
                max_size=6,
            ),
            min_size=1,
            max_size=4,
        ),
        fan_in=st.integers(4, 6),
    )
    def test_export_replays_the_batches_in_order(
        self,
        monkeypatch: pytest.MonkeyPatch,
        attempts: list[list[tuple[Operation, list[str]]]],
        fan_in: int,
    ) -> None:
        """Crashed attempts, then one that closes: each member once, where its last batch says."""
        monkeypatch.setattr(_csvdir, "_FAN_IN", fan_in)
        history: dict[str, list[Operation]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for n, batches in enumerate(attempts):
                context = attempt(SLOT_1, f"run-{n}")
                dest = CsvDirectoryDestination(tmp)  # a new process per attempt
                dest.open(context)
                for op, users in batches:
                    send(dest, context, op, users)
                    for user in users:
                        history.setdefault(user, []).append(op)
            dest.close(context, succeeded=True)
            published = dest.read_latest("sync-1")

        expected = files()
        for user, ops in sorted(history.items()):
            last = ops[-1]
            if last is Operation.EXISTING and set(ops) != {Operation.EXISTING}:
                last = Operation.ADD
            expected[
                {"add": "entering", "remove": "exiting", "existing": "existing"}[last.value]
            ].append(user)
        assert expected == published


@pytest.mark.reliability
class TestMemory:
    def test_publishing_streams_the_audience(self, tmp_path: Path) -> None:
        """Publishing 300,000 existing members holds a few kilobytes, not the audience."""
        dest = CsvDirectoryDestination(tmp_path)
        dest.open(CONTEXT)
        for sequence in range(3):
            users = [f"user-{sequence}-{i:07d}" for i in range(100_000)]
            dest.add(make_batch(users, Operation.EXISTING, sequence=sequence))
        del users

        tracemalloc.start()
        try:
            dest.close(CONTEXT, succeeded=True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert 300_001 == len((tmp_path / "sync-1" / RUN_DIR / "existing.csv").read_text().split())
        assert peak < 2_000_000, peak


class TestReadLatest:
    def test_newest_export_wins(self, tmp_path: Path) -> None:
        """read_latest reads the export of the latest slot."""
        dest = CsvDirectoryDestination(tmp_path)
        later = attrs.evolve(CONTEXT, run_id="a-run", computed_at=COMPUTED_AT + timedelta(days=1))

        run(dest, later, entering=["new"], exiting=["gone"])
        run(dest, entering=["old"])

        assert files(entering=["new"], exiting=["gone"]) == dest.read_latest("sync-1")
        assert [RUN_DIR, "20240502T120000.000000Z"] == [
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

    def test_naive_slot(self, tmp_path: Path) -> None:
        """A naive slot is refused for the same reason."""
        context = attrs.evolve(CONTEXT, slot=datetime(2024, 5, 1))  # noqa: DTZ001 - the point

        with pytest.raises(TypeError, match="timezone-aware"):
            CsvDirectoryDestination(tmp_path).open(context)

    def test_repr(self, tmp_path: Path) -> None:
        """The repr names the directory."""
        assert f"CsvDirectoryDestination({os.fspath(tmp_path)!r})" == (
            repr(CsvDirectoryDestination(tmp_path))
        )
