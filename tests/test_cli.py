"""
The command line: the demo, the store commands, eligibility checks and the worker.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from datetime import time as dt_time
from pathlib import Path

import pytest

import cohortsync
from cohortsync import _cli
from cohortsync._cli import main


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


SRC = str(Path(cohortsync.__file__).parent.parent)
"""Where the package under test lives: worker subprocesses import this copy."""
RUN_COUNTS = ("status", "added", "removed", "skipped", "rejected", "batches", "retries")


def _start_worker(tmp_path: Path, app: str, *flags: str) -> subprocess.Popen[str]:
    """``cohortsync worker --app APP --idle 1`` of this checkout, in *tmp_path*."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC])}
    return subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "cohortsync", "worker", "--app", app, "--idle", "1", *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_worker(tmp_path: Path, app: str, *flags: str) -> tuple[str, str]:
    """
    Run ``cohortsync worker`` on *app* in a subprocess until its sync ``s``
    has a succeeded run, then stop it with SIGTERM; return its stdout and stderr.
    """
    proc = _start_worker(tmp_path, app, *flags)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, out = run_cli("history", "s", "--db", str(tmp_path / "worker.db"))
            if code == 0 and "succeeded" in out:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert 0 == proc.returncode, stderr
    return stdout, stderr


def run_bad(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the command line and return its exit code and standard error, whoever reports."""
    capsys.readouterr()
    try:
        code = main(list(argv), out=io.StringIO())
    except SystemExit as e:  # argparse reports bad arguments by exiting
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def assert_usage_error(code: int, err: str, *words: str) -> None:
    """Exit code 2 and the one line docs/cli.md promises, naming what was wrong."""
    assert 2 == code
    assert err.startswith("cohortsync: error: ")
    assert 1 == err.count("\n"), err
    for word in words:
        assert word in err


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("demo")
    code, out = run_cli("demo", "--dir", str(directory), "--hours", "10", "--no-progress")
    assert 0 == code
    return directory, out


class TestDemo:
    def test_prints_a_history_with_the_outage_and_the_recovery(
        self, demo: tuple[Path, str]
    ) -> None:
        """The demo's history shows the CRM failing during its outage, then succeeding."""
        _, out = demo
        crm = out.split("churn-risk-crm:")[1].split("\n\n")[0]

        assert "failed" in crm
        assert "TransientError" in crm
        last = [line for line in crm.splitlines() if "scheduled" in line][-1]
        assert "succeeded" in last

    def test_every_sync_ran_and_one_time_completed(self, demo: tuple[Path, str]) -> None:
        """Each planned sync appears with runs; the one-time sync is completed."""
        _, out = demo
        for sync_id in ("power-users-hourly", "churn-risk-daily-s3", "newsletter-realtime"):
            assert f"{sync_id}:" in out
        assert "vip-once: vip -> crm, one_time, now completed; 1 runs (1 succeeded)" in out

    def test_writes_s3_style_files(self, demo: tuple[Path, str]) -> None:
        """The CSV-directory destination published entering/exiting/existing files."""
        directory, out = demo
        assert "latest S3-style export: entering:" in out
        assert list((directory / "s3").rglob("existing.csv"))

    def test_the_secret_header_never_shows(self, demo: tuple[Path, str]) -> None:
        """The CRM's Authorization header appears nowhere in the output."""
        _, out = demo
        assert "demo-secret" not in out


class TestStoreCommands:
    def test_syncs_lists_the_demo_syncs(self, demo: tuple[Path, str]) -> None:
        """`syncs` lists every sync in the store."""
        directory, _ = demo
        code, out = run_cli("syncs", "--db", str(directory / "cohortsync.db"))
        assert 0 == code
        assert 5 == sum(1 for line in out.splitlines() if "-" in line.split()[0])

    def test_history_shows_runs_newest_first(self, demo: tuple[Path, str]) -> None:
        """`history SYNC` prints the runs table; --json prints the export."""
        directory, _ = demo
        db = str(directory / "cohortsync.db")
        code, out = run_cli("history", "churn-risk-crm", "--db", db, "--limit", "3")
        assert 0 == code
        assert 3 == sum(1 for line in out.splitlines() if "scheduled" in line)
        code, out = run_cli("history", "churn-risk-crm", "--db", db, "--json")
        assert 0 == code
        assert '"members": []' in out

    def test_unknown_sync_is_an_error(self, demo: tuple[Path, str]) -> None:
        """An unknown sync id exits non-zero with a message."""
        directory, _ = demo
        code, _ = run_cli("history", "nope", "--db", str(directory / "cohortsync.db"))
        assert 1 == code

    def test_missing_store_is_a_usage_error(self, tmp_path: Path) -> None:
        """A store path that does not exist exits 2 and creates nothing."""
        missing = tmp_path / "missing.db"
        code, _ = run_cli("syncs", "--db", str(missing))
        assert 2 == code
        assert not missing.exists()

    def test_upcoming_lists_due_runs(self, demo: tuple[Path, str]) -> None:
        """`upcoming` lists runs ahead (the demo's simulated day lies in 2030)."""
        directory, _ = demo
        db = str(directory / "cohortsync.db")
        code, out = run_cli("upcoming", "--db", db, "--hours", "100000", "--limit", "5000")
        assert 0 == code
        assert "power-users-hourly" in out


class TestBadArguments:
    """Bad arguments exit 2 with one line on standard error, never a traceback."""

    @pytest.mark.parametrize("hours", ["inf", "nan", "-inf", "-1", "0", "1h"])
    def test_upcoming_hours_must_be_finite_and_above_0(
        self, demo: tuple[Path, str], capsys: pytest.CaptureFixture[str], hours: str
    ) -> None:
        """inf and nan crashed with a traceback; -1 and 0 were accepted silently."""
        directory, _ = demo
        code, err = run_bad(
            capsys, "upcoming", "--db", str(directory / "cohortsync.db"), f"--hours={hours}"
        )

        assert_usage_error(code, err, "--hours", repr(hours))

    @pytest.mark.parametrize("hours", ["1e9", "70000000"])
    def test_upcoming_horizon_must_fit_a_date(
        self, demo: tuple[Path, str], capsys: pytest.CaptureFixture[str], hours: str
    ) -> None:
        """A horizon past year 9999 crashed with OverflowError; it says how far it may go."""
        directory, _ = demo
        code, err = run_bad(
            capsys, "upcoming", "--db", str(directory / "cohortsync.db"), "--hours", hours
        )

        assert_usage_error(code, err, "--hours", "past 9999-12-31")

    @pytest.mark.parametrize("command", ["syncs", "upcoming", "history"])
    @pytest.mark.parametrize("limit", ["0", "-1"])
    def test_limit_must_be_at_least_1(
        self,
        demo: tuple[Path, str],
        capsys: pytest.CaptureFixture[str],
        command: str,
        limit: str,
    ) -> None:
        """--limit 0 printed "(no syncs)" on a full store, or only "... more"."""
        directory, _ = demo
        target = ("churn-risk-crm",) if command == "history" else ()
        code, err = run_bad(
            capsys, command, *target, "--db", str(directory / "cohortsync.db"), "--limit", limit
        )

        assert_usage_error(code, err, "--limit", f"not {limit}")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose listings run far past a pipe's buffer (64 KiB on Linux)."""
    import cohortsync as cs
    from cohortsync.storage import SQLiteStorage
    from cohortsync.testing import RecordingDestination

    path = tmp_path_factory.mktemp("big") / "big.db"
    scheduler = cs.Scheduler(SQLiteStorage(path))
    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u"]))
    scheduler.add_destination("d", RecordingDestination())
    scheduler.create_syncs(
        cs.SyncSpec("c", "d", cs.SyncPolicy.every(timedelta(minutes=1)), sync_id=f"s-{i:05d}")
        for i in range(2_000)
    )
    scheduler.close()
    return path


class TestPipes:
    """A reader that stops early (`| head`) ends the command quietly."""

    @pytest.mark.parametrize(
        "argv",
        [("syncs",), ("syncs", "--json"), ("upcoming", "--limit", "100000")],
        ids=["syncs", "syncs-json", "upcoming"],
    )
    def test_reader_closing_early_is_no_traceback(
        self, big_store: Path, argv: tuple[str, ...]
    ) -> None:
        """`cohortsync syncs | head -2` printed a BrokenPipeError traceback and exited 1."""
        import cohortsync

        env = {**os.environ, "PYTHONPATH": str(Path(cohortsync.__file__).parents[1])}
        proc = subprocess.Popen(  # noqa: S603 - our command, with the test's arguments
            [sys.executable, "-m", "cohortsync", *argv, "--db", str(big_store)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            head = [proc.stdout.readline() for _ in range(2)]
            proc.stdout.close()  # as `head -2` does once it has its lines
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

        assert all(head)
        assert b"" == stderr
        assert 141 == proc.returncode  # 128 + SIGPIPE, as `cat` killed by the pipe


class TestCheck:
    def test_eligible(self) -> None:
        """An eligible combination exits 0."""
        code, out = run_cli("check", "--destination", "braze", "--cadence", "realtime")
        assert 0 == code
        assert ": eligible" in out

    def test_ineligible_lists_every_reason(self) -> None:
        """An ineligible combination exits 1 and prints each reason code."""
        code, out = run_cli(
            "check",
            "--destination", "facebook_ads",
            "--cadence", "realtime",
            "--cohort-type", "funnel",
            "--size", "2000000",
        )  # fmt: skip
        assert 1 == code
        for reason in ("realtime_size_limit", "realtime_cohort_type", "realtime_destination"):
            assert reason in out

    def test_bad_arguments_exit_2(self) -> None:
        """An unknown cadence is a usage error."""
        with pytest.raises(SystemExit) as info:
            run_cli("check", "--destination", "braze", "--cadence", "fortnightly")
        assert 2 == info.value.code


class TestSchedules:
    """The store commands and `check` speak the schedules of issue 17."""

    @pytest.fixture
    def db(self, tmp_path: Path) -> str:
        import cohortsync as cs
        from cohortsync.testing import FakeClock, RecordingDestination

        path = tmp_path / "s.db"
        clock = FakeClock(datetime(2020, 1, 6, tzinfo=timezone.utc))
        scheduler = cs.Scheduler(cs.storage.SQLiteStorage(path), clock=clock)
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u"]))
        scheduler.add_destination("d", RecordingDestination())
        scheduler.create_sync("c", "d", cs.SyncPolicy.every(timedelta(minutes=15)), sync_id="e")
        scheduler.create_sync(
            "c", "d", cs.SyncPolicy.cron("0 6 * * 1-5", timezone="America/New_York"), sync_id="k"
        )
        scheduler.create_sync(
            "c", "d", cs.SyncPolicy.weekly(["mon", "fri"], at=dt_time(9, 30)), sync_id="w"
        )
        scheduler.close()
        return str(path)

    def test_syncs_show_the_schedule(self, db: str) -> None:
        """Each sync's line says its schedule in a few words."""
        code, out = run_cli("syncs", "--db", db)

        assert 0 == code
        assert "every 15m" in out
        assert "cron '0 6 * * 1-5' America/New_York" in out
        assert "weekly mon,fri at 09:30" in out

    def test_upcoming_shows_the_schedule(self, db: str) -> None:
        """Upcoming runs name their sync's schedule."""
        code, out = run_cli("upcoming", "--db", db, "--hours", "1", "--limit", "10")

        assert 0 == code
        assert "every 15m" in out

    @pytest.mark.parametrize(
        ("options", "expected"),
        [
            (("--cadence", "every", "--every", "15"), "every 15m: eligible"),
            (("--cadence", "cron", "--cron", "0 6 * * 1-5"), "cron '0 6 * * 1-5' UTC: eligible"),
            (("--cadence", "weekly", "--on", "mon,thu", "--at", "06:30"), "at 06:30: eligible"),
            (("--cadence", "daily", "--at", "06:00", "--timezone", "Europe/Berlin"), "eligible"),
        ],
    )
    def test_check_new_cadences(self, options: tuple[str, ...], expected: str) -> None:
        """`check` builds every new cadence from its options."""
        code, out = run_cli("check", "--destination", "facebook_ads", "--size", "5000", *options)

        assert (0, True) == (code, expected in out)

    def test_check_sub_hourly_size(self) -> None:
        """Every 15 minutes with 2M members hits the sub-hourly size limit."""
        code, out = run_cli(
            "check", "--destination", "braze", "--cadence", "every", "--every", "15",
            "--size", "2000000",
        )  # fmt: skip

        assert (1, True) == (code, "sub_hourly_size_limit" in out)

    @pytest.mark.parametrize(
        ("options", "words"),
        [
            (("--cadence", "cron", "--cron", "0 25 * * *"), ("--cron '0 25 * * *'", "hour")),
            (("--cadence", "cron", "--cron", "x y"), ("--cron 'x y'", "5 fields")),
            (("--cadence", "daily", "--at", "6h"), ("--at '6h'",)),
            (("--cadence", "daily", "--at", "25:00"), ("--at '25:00'",)),
            (("--cadence", "every", "--every", "0"), ("--every '0'", "1 minute to 7 days")),
            (("--cadence", "every", "--every", "8d"), ("--every '8d'", "1 minute to 7 days")),
            (("--cadence", "every", "--every", "9" * 20 + "d"), ("--every", "7 days")),
            (("--cadence", "every", "--every", "15s"), ("--every '15s'", "15m, 2h or 1d")),
            (("--cadence", "every"), ("--cadence every needs --every",)),
            (("--cadence", "cron"), ("--cadence cron needs --cron",)),
            (("--cadence", "weekly"), ("--cadence weekly needs --on",)),
            (("--cadence", "weekly", "--on", "mon,someday"), ("--on 'mon,someday'", "'mon'")),
            (("--cadence", "daily", "--timezone", "Mars/Olympus"), ("--timezone 'Mars/Olympus'",)),
            (("--cadence", "daily", "--every", "15"), ("--every applies only to --cadence every",)),
            (("--cadence", "hourly", "--on", "mon"), ("--on applies only to --cadence weekly",)),
            (("--cadence", "hourly", "--timezone", "UTC"), ("daily, weekly or cron",)),
            (("--cadence", "hourly", "--size", "-5"), ("--size -5",)),
            (("--cadence", "hourly", "--identifier", "fax"), ("--identifier 'fax'",)),
        ],
    )
    def test_check_bad_schedule(
        self,
        capsys: pytest.CaptureFixture[str],
        options: tuple[str, ...],
        words: tuple[str, ...],
    ) -> None:
        """
        A bad or missing schedule option is a usage error naming the option
        as typed: they exited 1, a missing --every with "interval=None:
        every() needs a datetime.timedelta".
        """
        code, err = run_bad(capsys, "check", "--destination", "braze", *options)

        assert_usage_error(code, err, *words)
        assert "()" not in err
        assert "datetime" not in err

    @pytest.mark.parametrize(
        ("every", "expected"), [("15", "every 15m"), ("15m", "every 15m"), ("2H", "every 2h"),
                                ("1d", "every 1d")]
    )  # fmt: skip
    def test_check_every_takes_units(self, every: str, expected: str) -> None:
        """--every takes minutes, or a number with m, h or d ("15m" was "invalid int value")."""
        code, out = run_cli(
            "check", "--destination", "braze", "--cadence", "every", "--every", every
        )

        assert (0, True) == (code, f"{expected}: eligible" in out)

    def test_check_days_in_any_case(self) -> None:
        """--on MON,Fri is read as mon,fri (the library takes lower case only)."""
        code, out = run_cli(
            "check", "--destination", "braze", "--cadence", "weekly", "--on", "MON,Fri"
        )

        assert (0, True) == (code, "weekly mon,fri" in out)


class TestWorker:
    def test_a_second_sigterm_stops_at_once(self, tmp_path: Path) -> None:
        """The first SIGTERM waits for the run in progress; a second one stops the worker now."""
        (tmp_path / "slowapp.py").write_text(
            textwrap.dedent(
                """
                import time
                from pathlib import Path
                import cohortsync as cs
                from cohortsync.storage import SQLiteStorage

                class Slow(cs.Destination):
                    def add(self, batch):
                        Path("started").touch()
                        time.sleep(60)
                        return cs.DeliveryResult.ok()

                    def remove(self, batch):
                        return cs.DeliveryResult.ok()

                def make():
                    scheduler = cs.Scheduler(SQLiteStorage("worker.db"))
                    scheduler.add_destination("slow", Slow())
                    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["a"]))
                    scheduler.create_sync("c", "slow", cs.SyncPolicy.hourly(), sync_id="s")
                    return scheduler
                """
            )
        )
        proc = _start_worker(tmp_path, "slowapp:make")
        try:
            deadline = time.monotonic() + 30
            while not (tmp_path / "started").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (tmp_path / "started").exists()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # the first signal waits for the run
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            stdout, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert -signal.SIGTERM == proc.returncode
        assert time.monotonic() - stopped_at < 20
        assert "received SIGTERM, stopping after the current run (send it again" in stdout
        assert "received SIGTERM again, stopping now" in stdout

    def test_runs_a_host_scheduler_and_stops_on_sigterm(self, tmp_path: Path) -> None:
        """`worker --app` runs the host's scheduler in a loop and exits cleanly on SIGTERM."""
        (tmp_path / "hostapp.py").write_text(
            textwrap.dedent(
                """
                import cohortsync as cs
                from cohortsync.storage import SQLiteStorage
                from cohortsync.testing import RecordingDestination

                def make():
                    scheduler = cs.Scheduler(SQLiteStorage("worker.db"))
                    scheduler.add_destination("rec", RecordingDestination())
                    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["a", "b"]))
                    if not scheduler.syncs():
                        scheduler.create_sync("c", "rec", cs.SyncPolicy.hourly(), sync_id="s")
                    return scheduler
                """
            )
        )
        stdout, _ = _run_worker(tmp_path, "hostapp:make")
        _, out = run_cli("history", "s", "--db", str(tmp_path / "worker.db"))

        assert "received SIGTERM, stopping after the current run" in stdout
        assert "cohortsync worker stopped" in stdout
        assert "succeeded" in out
        # By default (INFO, text) each run prints its end with its counts.
        assert "INFO cohortsync.run: sync s run " in stdout
        assert ": succeeded +2 -0 skipped=0 rejected=0 batches=1 retries=0 in " in stdout

    def test_json_logs_and_progress(self, tmp_path: Path) -> None:
        """--log-format json prints one object per line with the run's fields; --progress draws."""
        (tmp_path / "jsonapp.py").write_text(
            textwrap.dedent(
                """
                import cohortsync as cs
                from cohortsync.storage import SQLiteStorage
                from cohortsync.testing import RecordingDestination

                def make():
                    scheduler = cs.Scheduler(SQLiteStorage("worker.db"))
                    caps = cs.Capabilities(max_batch_size=2)
                    scheduler.add_destination("rec", RecordingDestination(caps))
                    members = [f"m{i}" for i in range(5)]
                    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: members))
                    if not scheduler.syncs():
                        scheduler.create_sync("c", "rec", cs.SyncPolicy.hourly(), sync_id="s")
                    return scheduler
                """
            )
        )
        stdout, stderr = _run_worker(
            tmp_path, "jsonapp:make", "--log-format", "json", "--log-level", "debug", "--progress"
        )

        lines = [json.loads(line) for line in stdout.splitlines()]
        assert {"time", "level", "logger", "message"} <= set(lines[0])
        (finished,) = [r for r in lines if r["logger"] == "cohortsync.run" and "status" in r]
        assert {
            "sync_id": "s",
            "destination_id": "rec",
            "status": "succeeded",
            "added": 5,
            "removed": 0,
            "skipped": 0,
            "rejected": 0,
            "batches": 3,
            "retries": 0,
            "level": "INFO",
        } == {k: finished[k] for k in (*RUN_COUNTS, "sync_id", "destination_id", "level")}
        assert finished["message"].startswith(f"sync s run {finished['run_id']} slot ")
        debug = [r for r in lines if r["level"] == "DEBUG" and r["logger"] == "cohortsync.run"]
        assert [1, 2, 3] == [r["batch"] for r in debug if "batch" in r]
        assert "cohortsync worker stopped" == lines[-1]["message"]
        assert "  s [##############################] 100%  3/3 batches  5/5 members" in stderr

    def test_log_level_warning_is_quiet(self, tmp_path: Path) -> None:
        """--log-level warning prints no line for an ordinary run."""
        (tmp_path / "quietapp.py").write_text(
            textwrap.dedent(
                """
                import cohortsync as cs
                from cohortsync.storage import SQLiteStorage
                from cohortsync.testing import RecordingDestination

                def make():
                    scheduler = cs.Scheduler(SQLiteStorage("worker.db"))
                    scheduler.add_destination("rec", RecordingDestination())
                    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["a"]))
                    if not scheduler.syncs():
                        scheduler.create_sync("c", "rec", cs.SyncPolicy.hourly(), sync_id="s")
                    return scheduler
                """
            )
        )

        stdout, _ = _run_worker(tmp_path, "quietapp:make", "--log-level", "WARNING")

        assert "" == stdout

    def test_json_formatter(self) -> None:
        """A record becomes one JSON object: time in UTC, level, logger, message, fields."""
        logger = logging.getLogger("cohortsync.run")
        record = logger.makeRecord(
            "cohortsync.run",
            logging.WARNING,
            __file__,
            1,
            "sync %s: %d skipped",
            ("s1", 2),
            None,
            extra={"sync_id": "s1", "slot": "2030-01-01T00:00:00+00:00", "added": 3},
        )
        record.created = 1_893_456_000.25

        line = _cli._JsonFormatter().format(record)

        assert "\n" not in line
        assert {
            "time": "2030-01-01T00:00:00.250+00:00",
            "level": "WARNING",
            "logger": "cohortsync.run",
            "message": "sync s1: 2 skipped",
            "sync_id": "s1",
            "slot": "2030-01-01T00:00:00+00:00",
            "added": 3,
        } == json.loads(line)

    def test_json_formatter_exception(self) -> None:
        """A traceback travels as exc_info text inside the one line."""
        try:
            raise ValueError("boom")  # noqa: TRY301 - the record needs a real exception
        except ValueError:
            record = logging.getLogger("x").makeRecord(
                "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
            )

        data = json.loads(_cli._JsonFormatter().format(record))

        assert "ValueError: boom" in data["exc_info"]

    def test_json_formatter_non_finite_numbers(self) -> None:
        """NaN and infinity in a host's extra= fields come out as strings: strict JSON."""
        record = logging.getLogger("x").makeRecord(
            "x", logging.INFO, __file__, 1, "hi", (), None, extra={"n": float("nan"), "i": 1e999}
        )

        line = _cli._JsonFormatter().format(record)

        assert "NaN" not in line.replace('"nan"', "")
        data = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
        assert ("nan", "inf") == (data["n"], data["i"])

    def test_text_formatter(self) -> None:
        """The text lines start with the UTC time, the level and the logger."""
        record = logging.getLogger("x").makeRecord("x", logging.INFO, __file__, 1, "hi", (), None)
        record.created = 1_893_456_000.0

        assert "2030-01-01T00:00:00.000+00:00 INFO x: hi" == _cli._TextFormatter().format(record)

    def test_worker_logging_is_undone(self) -> None:
        """The worker's handler and levels are put back as they were when it stops."""
        root, package = logging.getLogger(), logging.getLogger("cohortsync")
        before = (list(root.handlers), root.level, package.level)
        out = io.StringIO()

        with _cli._worker_logging("DEBUG", "text", out):
            logging.getLogger("cohortsync.run").debug("inside")
        logging.getLogger("cohortsync.run").warning("outside")

        assert before == (list(root.handlers), root.level, package.level)
        assert ["inside"] == [line.rsplit(": ", 1)[1] for line in out.getvalue().splitlines()]

    def test_bad_log_format_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An unknown --log-format exits 2 with the one-line error."""
        code, err = run_bad(capsys, "worker", "--app", "x:y", "--log-format", "xml")

        assert_usage_error(code, err, "--log-format", "xml")

    def test_bad_app_is_a_usage_error(self) -> None:
        """An --app that does not name a Scheduler exits 2."""
        code, _ = run_cli("worker", "--app", "json:dumps")
        assert 2 == code


SECRET = "hunter2-Zq9"  # noqa: S105 - a made-up password the tests look for
"""A password that must never show in what the command line prints."""


def make_store(path: Path, sync_ids: tuple[str, ...] = ("s",)) -> Path:
    """An SQLite store at *path* holding hourly syncs of the given ids."""
    import cohortsync as cs
    from cohortsync.testing import FakeClock, RecordingDestination

    clock = FakeClock(datetime(2030, 3, 4, tzinfo=timezone.utc))
    with cs.Scheduler(cs.storage.SQLiteStorage(path), clock=clock) as scheduler:
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u"]))
        scheduler.add_destination("d", RecordingDestination())
        for sync_id in sync_ids:
            scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id=sync_id)
    return path


def run_help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The --help text of a command (argparse prints it and exits 0)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"], out=io.StringIO())
    assert 0 == info.value.code
    return capsys.readouterr().out


READ_COMMANDS = [("syncs",), ("history", "s"), ("upcoming",)]
READ_IDS = ["syncs", "history", "upcoming"]


class TestVersion:
    def test_version_option(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`cohortsync --version` prints the package's version on stdout and exits 0."""
        import cohortsync

        with pytest.raises(SystemExit) as info:
            main(["--version"])

        assert 0 == info.value.code
        assert f"cohortsync {cohortsync.__version__}\n" == capsys.readouterr().out


class TestStoreOptions:
    """--db takes a file or a DSN, --dsn a DSN, and COHORTSYNC_DB is the default."""

    def test_environment_names_the_store(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without --db or --dsn, COHORTSYNC_DB names the store."""
        monkeypatch.setenv("COHORTSYNC_DB", str(make_store(tmp_path / "s.db")))

        code, out = run_cli("syncs")

        assert (0, True) == (code, "hourly" in out)

    def test_db_wins_over_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """--db overrides COHORTSYNC_DB (here a file that does not exist)."""
        monkeypatch.setenv("COHORTSYNC_DB", str(tmp_path / "other.db"))

        code, _ = run_cli("syncs", "--db", str(make_store(tmp_path / "s.db")))

        assert 0 == code
        assert not (tmp_path / "other.db").exists()

    @pytest.mark.parametrize("command", READ_COMMANDS, ids=READ_IDS)
    def test_no_store_given(
        self,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        command: tuple[str, ...],
    ) -> None:
        """Neither an option nor the variable: exit 2, saying each way to name a store."""
        monkeypatch.delenv("COHORTSYNC_DB", raising=False)

        code, err = run_bad(capsys, *command)

        assert_usage_error(code, err, "--db", "--dsn", "COHORTSYNC_DB")

    def test_db_and_dsn_together(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--db and --dsn exclude each other."""
        code, err = run_bad(capsys, "syncs", "--db", "x.db", "--dsn", "postgresql://h/db")

        assert_usage_error(code, err, "--dsn", "not allowed with argument --db")

    def test_other_url_schemes_are_refused_masked(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A mysql:// URL is refused (exit 2) without its password."""
        code, err = run_bad(capsys, "syncs", "--db", f"mysql://u:{SECRET}@h/db")

        assert_usage_error(code, err, "mysql://u:***@h/db", "postgresql://")
        assert SECRET not in err

    def test_schema_is_for_postgres(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--schema with an SQLite store is a usage error, not ignored."""
        db = str(make_store(tmp_path / "s.db"))

        code, err = run_bad(capsys, "syncs", "--db", db, "--schema", "x")

        assert_usage_error(code, err, "--schema applies only to a PostgreSQL store")

    def test_keyword_string_that_is_also_a_file(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A file named like a key=value DSN is ambiguous: exit 2, saying how to choose."""
        monkeypatch.chdir(tmp_path)
        Path("dbname=app").write_bytes(b"")

        code, err = run_bad(capsys, "syncs", "--db", "dbname=app")

        assert_usage_error(code, err, "./dbname=app", "--dsn")

    @pytest.mark.parametrize("command", READ_COMMANDS, ids=READ_IDS)
    def test_missing_file_is_an_error_and_stays_missing(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
    ) -> None:
        """Each read command refuses a path that does not exist, and creates nothing."""
        missing = tmp_path / "typo.db"

        code, err = run_bad(capsys, *command, "--db", str(missing))

        assert_usage_error(code, err, "no such file", str(missing))
        assert [] == list(tmp_path.iterdir())

    @pytest.mark.parametrize("command", READ_COMMANDS, ids=READ_IDS)
    def test_empty_file_is_not_made_a_store(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
    ) -> None:
        """An empty file (a fresh SQLite database) is refused, and left empty."""
        empty = tmp_path / "empty.db"
        empty.write_bytes(b"")

        code, err = run_bad(capsys, *command, "--db", str(empty))

        assert_usage_error(code, err, "is empty (no tables), not a cohortsync store")
        assert (0, ["empty.db"]) == (empty.stat().st_size, [p.name for p in tmp_path.iterdir()])

    def test_directory_is_not_a_store(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A directory given as --db is refused with exit 2."""
        code, err = run_bad(capsys, "syncs", "--db", str(tmp_path))

        assert_usage_error(code, err, "is not a file")

    def test_another_applications_database_is_an_error(self, tmp_path: Path) -> None:
        """An SQLite file of another application exits 1 and is left as it was."""
        import sqlite3

        other = tmp_path / "app.db"
        with sqlite3.connect(other) as conn:
            conn.execute("CREATE TABLE users (id integer)")
        conn.close()
        before = other.read_bytes()

        code, _ = run_cli("syncs", "--db", str(other))

        assert (1, before) == (code, other.read_bytes())

    @pytest.mark.parametrize("command", ["syncs", "history", "upcoming"])
    def test_help_never_shows_the_environment(
        self,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        command: str,
    ) -> None:
        """--help names COHORTSYNC_DB, never its value (a DSN with a password)."""
        monkeypatch.setenv("COHORTSYNC_DB", f"postgresql://u:{SECRET}@db.internal/app")

        text = run_help(capsys, command)

        assert "COHORTSYNC_DB" in text
        assert SECRET not in text
        assert "db.internal" not in text

    def test_every_command_has_a_description(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Each command's --help says what it does (not only its usage line)."""
        for command in ("demo", "syncs", "history", "upcoming", "check", "worker"):
            text = run_help(capsys, command)
            description = text.partition("\n\n")[2]
            assert not description.startswith("options:"), command

    @pytest.mark.parametrize(
        ("command", "default"),
        [
            ("demo", "(default: 24)"),
            ("demo", "(default: 7)"),
            ("history", "(default: 20)"),
            ("upcoming", "(default: 24)"),
            ("upcoming", "(default: 50)"),
            ("upcoming", "(default: cohortsync)"),
            ("worker", "(default: 30.0)"),
            ("check", "(default: behavioral)"),
        ],
    )
    def test_help_shows_defaults(
        self, capsys: pytest.CaptureFixture[str], command: str, default: str
    ) -> None:
        """--help states each option's default."""
        text = " ".join(run_help(capsys, command).split())

        assert default in text
        assert "(default: None)" not in text


class TestPostgresWithoutServer:
    """DSNs are recognised, checked and masked before any server is reached."""

    @pytest.mark.parametrize(
        "dsn",
        [
            f"postgresql://u:{SECRET}@127.0.0.1:1/db",
            f"postgres://u:{SECRET}@127.0.0.1:1/db",
            f"host=127.0.0.1 port=1 dbname=db password={SECRET}",
        ],
        ids=["postgresql-url", "postgres-url", "key-value"],
    )
    def test_missing_driver_names_the_extra(
        self,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        dsn: str,
    ) -> None:
        """Without psycopg a DSN exits 1 naming pip install 'cohortsync[postgres]', masked."""
        monkeypatch.setitem(sys.modules, "psycopg", None)  # type: ignore[arg-type]
        monkeypatch.delitem(sys.modules, "cohortsync.storage._postgres", raising=False)

        code, err = run_bad(capsys, "syncs", "--db", dsn)

        assert 1 == code
        assert "pip install 'cohortsync[postgres]'" in err
        assert SECRET not in err

    def test_unreachable_server_is_masked(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A failed connection exits 1 and shows the DSN without its password."""
        pytest.importorskip("psycopg")
        code, err = run_bad(capsys, "syncs", "--db", f"postgresql://u:{SECRET}@127.0.0.1:1/db")

        assert 1 == code
        assert "cannot connect to PostgreSQL at 'postgresql://u:***@127.0.0.1:1/db'" in err
        assert SECRET not in err
        assert 1 == err.count("\n")  # the driver's two-line message, on one line

    def test_unreachable_server_key_value_is_masked(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The same for a key=value DSN given as --db (recognised, not taken for a file)."""
        pytest.importorskip("psycopg")
        dsn = f"host=127.0.0.1 port=1 dbname=db user=u password='{SECRET} x'"

        code, err = run_bad(capsys, "history", "s", "--db", dsn)

        assert 1 == code
        assert "password=***':" in err  # masked once, its quote intact
        assert SECRET not in err

    def test_invalid_dsn_is_a_usage_error_not_echoed(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A DSN that does not parse exits 2 without quoting it."""
        pytest.importorskip("psycopg")
        code, err = run_bad(capsys, "syncs", "--dsn", f"host=h password={SECRET} nonsense")

        assert_usage_error(code, err, "--dsn is not a valid PostgreSQL DSN")
        assert SECRET not in err

    def test_bad_schema_name(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--schema is checked before connecting: exit 2 naming it."""
        pytest.importorskip("psycopg")
        code, err = run_bad(
            capsys, "syncs", "--dsn", f"postgresql://u:{SECRET}@127.0.0.1:1/db", "--schema", "A-b"
        )

        assert_usage_error(code, err, "--schema 'A-b'", "unquoted PostgreSQL name")
        assert SECRET not in err

    def test_empty_schema_name(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--schema '' is refused, not taken as the default."""
        pytest.importorskip("psycopg")
        code, err = run_bad(
            capsys, "syncs", "--dsn", "postgresql://u@127.0.0.1:1/db", "--schema", ""
        )

        assert_usage_error(code, err, "--schema ''")
        assert SECRET not in err

    def test_argparse_echo_is_masked(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A DSN typed where no argument goes is quoted by argparse: masked too."""
        code, err = run_bad(capsys, "syncs", "--db", "x.db", f"postgresql://u:{SECRET}@h/db")

        assert_usage_error(code, err, "unrecognized arguments", "postgresql://u:***@h/db")
        assert SECRET not in err


class TestMasking:
    """Every form of password is masked in messages."""

    @pytest.mark.parametrize(
        ("text", "masked"),
        [
            ("postgresql://u:p%40ss%2Fw@h:5432/db", "postgresql://u:***@h:5432/db"),
            ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgresql://h/db?sslmode=require&password=pw", "postgresql://h/db?sslmode=require&password=***"),
            ("host=h password=pw dbname=d", "host=h password=*** dbname=d"),
            ("host=h password = 'p w\\'x' dbname=d", "host=h password = *** dbname=d"),
            ("host=h password='p w", "host=h password=***"),
            ("host=h sslpassword=pw", "host=h sslpassword=***"),
            ("x postgresql://u:pw@h/db, password=pw", "x postgresql://u:***@h/db, password=***"),
            ("at 'host=h password=***': refused", "at 'host=h password=***': refused"),
            ("at 'postgresql://h/db?password=***'", "at 'postgresql://h/db?password=***'"),
            ("--db 'postgresql:/u:pw@h/db': gone", "--db 'postgresql:/u:***@h/db': gone"),
            ("postgres//u:pw@h/db", "postgres//u:***@h/db"),
            ("a:b@c", "a:b@c"),
        ],
    )  # fmt: skip
    def test_mask_secrets(self, text: str, masked: str) -> None:
        """URLs (encoded, or with a raw @), query strings, key=value forms, inside any text."""
        from cohortsync.storage._dsn import mask_secrets

        assert masked == mask_secrets(text)

    @pytest.mark.parametrize(
        ("text", "keyword"),
        [
            ("host=db dbname=app", True),
            (" dbname = app", True),
            ("service=prod", True),
            ("cohortsync.db", False),
            ("data/host=1.db", False),
            ("x=1", False),
            ("postgresql://h/db", False),
        ],
    )
    def test_keyword_dsn_detection(self, text: str, keyword: bool) -> None:
        """Only a string starting with a libpq parameter and '=' is a key=value DSN."""
        from cohortsync.storage._dsn import is_keyword_dsn

        assert keyword == is_keyword_dsn(text)


class TestValues:
    """Every command checks its values: exit 2 with one line naming the option."""

    @pytest.mark.parametrize(
        ("hours", "words"),
        [
            ("0", ("not 0",)),
            ("-3", ("not -3",)),
            ("8785", ("8784",)),
            ("99999999999", ("8784",)),
            ("1.5", ("whole number",)),
        ],
    )
    def test_demo_hours(
        self, capsys: pytest.CaptureFixture[str], hours: str, words: tuple[str, ...]
    ) -> None:
        """demo --hours 0 or below ran nothing silently; a huge one crashed with OverflowError."""
        code, err = run_bad(capsys, "demo", f"--hours={hours}", "--no-progress")

        assert_usage_error(code, err, "--hours", *words)

    @pytest.mark.parametrize("command", ["syncs", "upcoming", "history"])
    @pytest.mark.parametrize("limit", ["99999999999999999999999", "9223372036854775807"])
    def test_huge_limits(
        self, demo: tuple[Path, str], capsys: pytest.CaptureFixture[str], command: str, limit: str
    ) -> None:
        """A --limit past any store's rows crashed with a traceback; it is a usage error."""
        directory, _ = demo
        args = ["s"] if command == "history" else []

        code, err = run_bad(
            capsys, command, *args, "--db", str(directory / "cohortsync.db"), "--limit", limit
        )

        assert_usage_error(code, err, "--limit", "1,000,000,000")

    def test_an_app_whose_store_fails_is_exit_1(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A worker app whose store refuses the password is an error (1), not bad arguments."""
        (tmp_path / "failingapp.py").write_text(
            "import cohortsync\n"
            "def build():\n"
            f"    raise cohortsync.exceptions.StorageError('password refused for {SECRET}')\n"
        )
        monkeypatch.chdir(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))

        code, err = run_bad(capsys, "worker", "--app", "failingapp:build")

        assert 1 == code
        assert err.startswith("cohortsync: error: ")
        assert "password refused" in err

    @pytest.mark.parametrize("typo", ["postgresql:/u:{}@h/db", "postgres//u:{}@h/db"])
    def test_a_mistyped_url_taken_for_a_file(
        self, capsys: pytest.CaptureFixture[str], typo: str
    ) -> None:
        """A PostgreSQL URL missing a slash is a missing file, and its password stays hidden."""
        code, err = run_bad(capsys, "syncs", "--db", typo.format(SECRET))

        assert_usage_error(code, err, "no such file", ":***@h")
        assert SECRET not in err

    def test_a_port_that_is_no_number(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A DSN whose port is not a number does not parse: exit 2, password masked."""
        code, err = run_bad(capsys, "syncs", "--db", f"postgresql://u:{SECRET}@127.0.0.1:x/db")

        assert_usage_error(code, err, "not a valid PostgreSQL DSN")
        assert SECRET not in err

    def test_demo_dir_that_is_a_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """demo --dir naming a file crashed with FileExistsError; it is a usage error."""
        file = tmp_path / "f"
        file.write_text("x")

        code, err = run_bad(capsys, "demo", "--dir", str(file), "--no-progress")

        assert_usage_error(code, err, "--dir", "is a file")

    @pytest.mark.parametrize("idle", ["0", "-1", "nan", "inf", "soon"])
    def test_worker_idle(self, capsys: pytest.CaptureFixture[str], idle: str) -> None:
        """worker --idle must be a finite number of seconds above 0."""
        code, err = run_bad(capsys, "worker", "--app", "json:dumps", f"--idle={idle}")

        assert_usage_error(code, err, "--idle", repr(idle))

    @pytest.mark.parametrize(
        ("at", "words"),
        [
            ("2030-03-04T12:00:00", ("no UTC offset", "2030-03-04T12:00:00Z")),
            ("2030-03-04", ("no UTC offset",)),
            ("tomorrow", ("not an ISO 8601 instant",)),
            ("0001-01-01T00:00:00+01:00", ("outside the years 1 to 9999",)),
        ],
    )
    def test_upcoming_at_must_be_aware(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        at: str,
        words: tuple[str, ...],
    ) -> None:
        """--at without a UTC offset means a different instant on every host: exit 2."""
        db = str(make_store(tmp_path / "s.db"))

        code, err = run_bad(capsys, "upcoming", "--db", db, "--at", at)

        assert_usage_error(code, err, "--at", *words)

    def test_upcoming_at_near_the_end_of_time(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--at plus --hours past year 9999 says which options to change."""
        db = str(make_store(tmp_path / "s.db"))

        code, err = run_bad(capsys, "upcoming", "--db", db, "--at", "9999-12-31T00:00Z")

        assert_usage_error(code, err, "--at plus --hours", "past 9999-12-31")

    @pytest.mark.parametrize("sync", ["", " ", "x" * 201])
    def test_history_sync_id(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], sync: str
    ) -> None:
        """An id no sync can have is a bad argument (exit 2), not an error of the store."""
        db = str(make_store(tmp_path / "s.db"))

        code, err = run_bad(capsys, "history", sync, "--db", db)

        assert_usage_error(code, err, "SYNC")


class TestUpcomingAt:
    """upcoming --at lists from a given instant: for stores not at the present time."""

    def test_lists_from_the_instant(self, tmp_path: Path) -> None:
        """
        From --at, the never-run sync's overdue first run, then its slots in
        the window; the Z and +01:00 forms of one instant agree.
        """
        db = str(make_store(tmp_path / "s.db"))

        code, out = run_cli("upcoming", "--db", db, "--at", "2030-03-04T05:00:00Z", "--hours", "2")
        _, same = run_cli(
            "upcoming", "--db", db, "--at", "2030-03-04T06:00:00+01:00", "--hours", "2"
        )

        assert 0 == code
        assert out == same
        overdue, *times = [line.split("  ")[0] for line in out.splitlines()[1:]]
        assert "2030-03-04 00:00:00" == overdue
        assert 2 == len(times)
        assert all("2030-03-04 05:00:00" < t <= "2030-03-04 07:00:00" for t in times)

    def test_demo_store(self, demo: tuple[Path, str]) -> None:
        """The demo's store, whose clock is in 2030, lists its runs at 2030."""
        directory, _ = demo
        db = str(directory / "cohortsync.db")

        code, out = run_cli("upcoming", "--db", db, "--at", "2030-03-04T10:00Z", "--hours", "1")

        assert 0 == code
        assert "power-users-hourly" in out
        assert "newsletter-realtime" in out


class TestColumns:
    """Tables are as wide as what they print: long ids align, short ones leave no gap."""

    def test_syncs_short_ids(self, tmp_path: Path) -> None:
        """Short ids and names: the columns are two spaces apart, not 24 wide."""
        db = str(make_store(tmp_path / "s.db", ("a", "b")))

        _, out = run_cli("syncs", "--db", db)

        assert "sync  cohort  destination  status  gen  schedule" == out.splitlines()[0]
        assert "a     c       d            active    1  hourly" == out.splitlines()[1]

    def test_syncs_long_ids_align(self, tmp_path: Path) -> None:
        """An id longer than the old fixed width (24) keeps every column aligned."""
        long_id = "a-very-long-sync-id-for-the-crm-" * 2
        db = str(make_store(tmp_path / "s.db", ("s", long_id)))

        _, out = run_cli("syncs", "--db", db)

        lines = out.splitlines()
        column = lines[0].index("cohort")
        assert column == len(long_id) + 2
        assert all(line[column:].startswith("c ") for line in lines[1:])

    def test_syncs_blocks_grow(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """In blocks, a later longer id widens the columns from there on; all rows listed."""
        import cohortsync._cli as cli

        monkeypatch.setattr(cli, "_SYNCS_BLOCK", 2)
        db = str(make_store(tmp_path / "s.db", ("a1", "a2", "b-longer-id")))

        _, out = run_cli("syncs", "--db", db)

        lines = out.splitlines()
        assert 4 == len(lines)
        assert 1 == sum(line.startswith("sync ") for line in lines)
        assert lines[3].index("c ") > lines[1].index("c ")

    def test_upcoming_long_ids_align(self, tmp_path: Path) -> None:
        """upcoming's columns fit the longest sync id listed."""
        long_id = "x" * 40
        db = str(make_store(tmp_path / "s.db", ("s", long_id)))

        _, out = run_cli("upcoming", "--db", db, "--at", "2030-03-04T00:30Z", "--hours", "1")

        lines = out.splitlines()
        column = lines[0].index("trigger")
        assert all(line[column - 2 : column] == "  " for line in lines)
        assert all(line[column] != " " for line in lines)

    def test_table_layout(self) -> None:
        """Right-aligned numbers, an unpadded last column, no trailing spaces."""
        from cohortsync._table import table

        lines = table(
            ("id", "n", "note"), [("abc", "12345", ""), ("d", "1", "long note")], right={1}
        )

        assert ["id       n  note", "abc  12345", "d        1  long note"] == lines

    def test_history_rows_align(self, demo: tuple[Path, str]) -> None:
        """Every history row starts its status column where the header does."""
        directory, _ = demo

        _, out = run_cli("history", "churn-risk-crm", "--db", str(directory / "cohortsync.db"))

        lines = out.splitlines()
        column = lines[0].index("status")
        assert all(line[column - 2 : column] == "  " for line in lines[2:])
        assert all(line[column] in "sf" for line in lines[2:])


POSTGRES_DSN = "COHORTSYNC_TEST_POSTGRES_DSN"


@pytest.fixture(scope="module")
def pg_dsn() -> str:
    """The test server's DSN; skips (fails in CI) without one, as test_postgres_storage does."""
    pytest.importorskip("psycopg")
    value = os.environ.get(POSTGRES_DSN)
    if not value:
        how = (
            f"start a throwaway server with `source .ci/postgres.sh start` or point {POSTGRES_DSN} "
            "at a database you may create schemas in"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_DSN} is not set, and CI must run the PostgreSQL tests: {how}")
        pytest.skip(f"no PostgreSQL server for the CLI tests: {how}")
    return value


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name, dropped afterwards (so parallel runs never collide)."""
    import secrets

    import psycopg
    from psycopg import sql

    name = f"cs_cli_{secrets.token_hex(6)}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def pg_store(pg_dsn: str, pg_schema: str) -> str:
    """A PostgreSQL store in a fresh schema with an hourly sync that has run once."""
    import cohortsync as cs
    from cohortsync.storage import PostgresStorage
    from cohortsync.testing import FakeClock, RecordingDestination

    clock = FakeClock(datetime(2030, 3, 4, tzinfo=timezone.utc))
    with cs.Scheduler(PostgresStorage(pg_dsn, schema=pg_schema), clock=clock) as scheduler:
        scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1", "u2"]))
        scheduler.add_destination("d", RecordingDestination())
        scheduler.create_sync("c", "d", cs.SyncPolicy.hourly(), sync_id="pg-hourly")
        scheduler.run_due()
    return pg_schema


def password_of(dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    return str(conninfo_to_dict(dsn).get("password") or "")


def with_password(dsn: str, password: str) -> str:
    """*dsn* as a URL whose password is *password*, URL-encoded."""
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    p = conninfo_to_dict(dsn)
    return (
        f"postgresql://{quote(str(p['user']), safe='')}:{quote(password, safe='')}"
        f"@{p['host']}:{p['port']}/{p['dbname']}"
    )


@pytest.mark.postgres
class TestPostgres:
    """The store commands on a real PostgreSQL server, passwords masked throughout."""

    @pytest.mark.parametrize("how", ["db-url", "dsn", "env", "db-key-value"])
    def test_every_read_command(
        self,
        pg_dsn: str,
        pg_store: str,
        monkeypatch: pytest.MonkeyPatch,
        how: str,
    ) -> None:
        """syncs, history and upcoming read the store given each way; no password shows."""
        from psycopg.conninfo import make_conninfo

        options = {
            "db-url": ["--db", pg_dsn],
            "dsn": ["--dsn", pg_dsn],
            "env": [],
            "db-key-value": ["--db", make_conninfo(pg_dsn)],
        }[how]
        monkeypatch.setenv("COHORTSYNC_DB", pg_dsn if how == "env" else "/nonexistent.db")
        store = [*options, "--schema", pg_store]

        outputs = [
            run_cli("syncs", *store),
            run_cli("syncs", *store, "--json"),
            run_cli("history", "pg-hourly", *store),
            run_cli("upcoming", *store, "--at", "2030-03-04T00:00:01Z", "--hours", "2"),
        ]

        assert [0, 0, 0, 0] == [code for code, _ in outputs]
        syncs, json_out, history, upcoming = (out for _, out in outputs)
        assert "pg-hourly" in syncs
        assert '"id": "pg-hourly"' in json_out
        assert "succeeded" in history
        assert "pg-hourly" in upcoming
        secret = password_of(pg_dsn)
        assert not secret or all(secret not in out for _, out in outputs)

    def test_missing_schema_is_an_error_and_not_created(
        self, pg_dsn: str, pg_schema: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A schema holding no store exits 2 and stays missing (never an empty store)."""
        import psycopg

        code, err = run_bad(capsys, "syncs", "--dsn", pg_dsn, "--schema", pg_schema)

        assert_usage_error(code, err, "no cohortsync store in schema", pg_schema)
        secret = password_of(pg_dsn)
        assert not secret or secret not in err
        with psycopg.connect(pg_dsn) as conn:
            found = conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (pg_schema,)
            ).fetchone()
        assert (0,) == found

    @pytest.mark.parametrize(
        "wrong", ["plain-wrong-pw", "w@ng/p:ss%?#word", f"{SECRET} spaced"], ids=str
    )
    def test_refused_password_url_is_masked(
        self, pg_dsn: str, capsys: pytest.CaptureFixture[str], wrong: str
    ) -> None:
        """A refused password, URL-encoded in the DSN, shows neither encoded nor decoded."""
        from urllib.parse import quote

        code, err = run_bad(capsys, "syncs", "--db", with_password(pg_dsn, wrong))

        assert 1 == code
        assert "password authentication failed" in err
        assert ":***@" in err
        assert wrong not in err
        assert quote(wrong, safe="") not in err

    def test_refused_password_key_value_is_masked(
        self, pg_dsn: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The same with a key=value DSN holding password='...'."""
        from psycopg.conninfo import make_conninfo

        wrong = f"{SECRET} it's"
        code, err = run_bad(capsys, "syncs", "--db", make_conninfo(pg_dsn, password=wrong))

        assert 1 == code
        assert "password authentication failed" in err
        assert "password=***" in err
        assert SECRET not in err

    def test_worker_start_line_is_masked(self, pg_dsn: str, pg_store: str, tmp_path: Path) -> None:
        """`worker` on a PostgreSQL store prints the store masked, and signal names."""
        (tmp_path / "pgapp.py").write_text(
            textwrap.dedent(
                f"""
                import os
                import cohortsync as cs
                from cohortsync.storage import PostgresStorage
                from cohortsync.testing import RecordingDestination

                def make():
                    storage = PostgresStorage(os.environ["APP_DSN"], schema={pg_store!r})
                    scheduler = cs.Scheduler(storage)
                    scheduler.add_destination("d", RecordingDestination())
                    scheduler.add_cohort(cs.Cohort(id="c", name="C", source=lambda: ["u1"]))
                    return scheduler
                """
            )
        )
        import cohortsync

        src = str(Path(cohortsync.__file__).parents[1])
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{src}", "APP_DSN": pg_dsn}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cohortsync", "worker", "--app", "pgapp:make", "--idle", "1"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            started = proc.stdout.readline()
            proc.send_signal(signal.SIGINT)
            rest, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

        assert 0 == proc.returncode, stderr
        assert "PostgresStorage(" in started
        assert "received SIGINT" in rest
        secret = password_of(pg_dsn)
        assert not secret or secret not in started + rest + stderr
