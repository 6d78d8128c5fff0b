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


def _run_worker(tmp_path: Path, app: str, *flags: str) -> tuple[str, str]:
    """
    Run ``cohortsync worker`` on *app* in a subprocess until its sync ``s``
    has a succeeded run, then stop it with SIGTERM; return its stdout and stderr.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC])}
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "cohortsync", "worker", "--app", app, "--idle", "1", *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC])}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cohortsync", "worker", "--app", "hostapp:make", "--idle", "1"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
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
