"""
Every check cohortsync runs, in one place: ``nox`` runs the default sessions
(tests, lint, typing, docs); ``nox -s bench`` and ``nox -s reliability`` are
run on demand.
"""

from __future__ import annotations

import os

import nox

# The test session runs last so its summary line closes the log.
nox.options.sessions = ["lint", "typing", "docs", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """
    The test suite with coverage (PostgreSQL tests run when
    COHORTSYNC_TEST_POSTGRES_DSN is set; in CI they must).
    """
    session.install("-e", ".[postgres]", *_group("tests"))
    session.run("coverage", "erase")
    session.run(
        "coverage",
        "run",
        "-m",
        "pytest",
        "-m",
        "not slow",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"HYPOTHESIS_PROFILE": "ci" if os.environ.get("CI") else "dev"},
    )
    session.run("coverage", "combine", success_codes=[0, 1])
    session.run("coverage", "report", "--fail-under=85")


@nox.session
def reliability(session: nox.Session) -> None:
    """
    The long reliability variants (crash at every step, soak, many workers).
    """
    session.install("-e", ".[postgres]", *_group("tests"))
    session.run("pytest", "-m", "slow", *session.posargs)


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
    session.install("-e", ".[postgres]", *_group("typing"))
    session.run("mypy", "src", "tests/typing")


@nox.session
def docs(session: nox.Session) -> None:
    """
    Build the docs with warnings as errors, and run their code examples.
    """
    session.install("-e", ".", *_group("docs"))
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "doctest", "docs", "docs/_build/doctest"
    )


@nox.session
def bench(session: nox.Session) -> None:
    """
    The benchmarks of SPEC section 9, as one table of ratios (not a test).
    """
    session.install("-e", ".[postgres]", *_group("bench"))
    session.run("python", "benchmarks/run.py", *session.posargs)
