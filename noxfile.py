"""
Every check cohortsync runs, in one place. ``nox`` runs the default sessions,
which are what CI runs: lint, typing, docs, tests (the fast suite, with
coverage) and reliability (crash matrices, many workers, soaks, the benchmark
smoke tests). ``nox -s slow`` (the long variants) and ``nox -s bench`` run on
demand.
"""

from __future__ import annotations

import os

import nox

# The reliability session runs last so a pytest summary line closes the log.
nox.options.sessions = ["lint", "typing", "docs", "tests", "reliability"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


def _hypothesis_env() -> dict[str, str]:
    return {"HYPOTHESIS_PROFILE": "ci" if os.environ.get("CI") else "dev"}


@nox.session
def tests(session: nox.Session) -> None:
    """
    The fast suite with coverage: everything but the reliability and slow
    tests, under 4 minutes on 2 cores. PostgreSQL tests run when
    COHORTSYNC_TEST_POSTGRES_DSN is set; in CI they must.
    """
    session.install("-e", ".[postgres,otel,httpx]", *_group("tests"))
    session.run("coverage", "erase")
    session.run(
        "coverage",
        "run",
        "-m",
        "pytest",
        "-m",
        "not slow and not reliability",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env=_hypothesis_env(),
    )
    session.run("coverage", "combine", success_codes=[0, 1])
    session.run("coverage", "report")


@nox.session
def reliability(session: nox.Session) -> None:
    """
    The reliability tests (marker ``reliability``): SIGKILL at every step of a
    run, many worker processes on one store, the model test, a faulty HTTP
    server, simulated weeks, audiences of 200,000 to a million members and the
    benchmark smoke tests. Without coverage: much of their work happens in
    child processes, and tracing would double the rest.
    """
    session.install("-e", ".[postgres,httpx]", *_group("tests"))
    session.run(
        "pytest",
        "-m",
        "reliability and not slow",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env=_hypothesis_env(),
    )


@nox.session
def slow(session: nox.Session) -> None:
    """
    The long variants (marker ``slow``, about 20 minutes): crash trials with an
    unchanged cohort, a simulated day per number of workers, the simulated
    month, the long model-test profile. Opt-in, not in CI.
    """
    session.install("-e", ".[postgres,httpx]", *_group("tests"))
    session.run("pytest", "-m", "slow", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """
    mypy strict on the package and on tests/typing, which uses the API as a host would.
    """
    session.install("-e", ".[postgres,otel,httpx]", *_group("typing"))
    session.run("mypy", "src", "tests/typing")


@nox.session
def docs(session: nox.Session) -> None:
    """
    Build the docs with warnings as errors, and run their code examples.
    """
    session.install("-e", ".[otel,httpx]", *_group("docs"))
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "doctest", "docs", "docs/_build/doctest"
    )


@nox.session
def bench(session: nox.Session) -> None:
    """
    The benchmarks of SPEC section 9, as one table of ratios (not a test).
    """
    session.install("-e", ".[postgres,httpx]", *_group("bench"))
    session.run("python", "benchmarks/run.py", *session.posargs)
