"""
cohortsync: keep user cohorts in sync with third-party destinations.

A host brings its cohorts (a membership source each) and its destination
adapters; cohortsync decides whether a sync may run, when it runs next and
what to send, delivers the diffs safely and records every run.

The top level holds what a host uses every day. The rest lives in
submodules named for their reader:

* :mod:`cohortsync.storage`: the storage protocol, its records, and the
  memory, SQLite and PostgreSQL stores.
* :mod:`cohortsync.destinations`: the catalog of presets, the webhook and
  CSV-directory adapters, HTTP transports.
* :mod:`cohortsync.eligibility`: the rules, their reasons and codes.
* :mod:`cohortsync.identifiers`: email and phone normalising and hashing.
* :mod:`cohortsync.events`: what listeners receive.
* :mod:`cohortsync.advice`: cadence recommendations from run history.
* :mod:`cohortsync.serialization`: JSON round-trips of every value.
* :mod:`cohortsync.exceptions`: the error tree.
* :mod:`cohortsync.testing`: fake clocks, recording destinations, contract suites.
* :mod:`cohortsync.otel`: OpenTelemetry spans and metrics (``cohortsync[otel]``).

The package logs through :mod:`logging` under ``cohortsync`` (see
``docs/operating.md`` for the logger names and record fields) and adds only
a :class:`logging.NullHandler`: where lines go is the host's choice.

``cohortsync.__version__`` is the installed distribution's version.
"""

import logging
from typing import TYPE_CHECKING

from cohortsync import exceptions
from cohortsync._bulk import ApplyResult, BulkFailure, BulkResult, SyncSpec
from cohortsync._clock import Clock, SystemClock
from cohortsync._cohort import (
    CallableSource,
    ChangeFeed,
    Changes,
    Cohort,
    CohortType,
    MembershipSource,
    StaticSource,
)
from cohortsync._destination import (
    AsyncDestination,
    Batch,
    Capabilities,
    DeliveryResult,
    Destination,
    Identifier,
    IdentifierKind,
    Member,
    Operation,
    RateLimit,
    Rejection,
    RunContext,
)
from cohortsync._policy import (
    Cadence,
    FirstRun,
    MassRemovalGuard,
    OnDelete,
    OnIneligible,
    RetryPolicy,
    SyncPolicy,
    Weekday,
)
from cohortsync._scheduler import Preview, Scheduler, Upcoming
from cohortsync._sync import RunStatus, Sync, SyncRun, SyncStatus, Trigger
from cohortsync.identifiers import IdentifierMapping

logging.getLogger("cohortsync").addHandler(logging.NullHandler())

__all__ = [
    "ApplyResult",
    "AsyncDestination",
    "AsyncScheduler",
    "Batch",
    "BulkFailure",
    "BulkResult",
    "Cadence",
    "CallableSource",
    "Capabilities",
    "ChangeFeed",
    "Changes",
    "Clock",
    "Cohort",
    "CohortType",
    "DeliveryResult",
    "Destination",
    "FirstRun",
    "Identifier",
    "IdentifierKind",
    "IdentifierMapping",
    "MassRemovalGuard",
    "Member",
    "MembershipSource",
    "OnDelete",
    "OnIneligible",
    "Operation",
    "Preview",
    "RateLimit",
    "Rejection",
    "RetryPolicy",
    "RunContext",
    "RunStatus",
    "Scheduler",
    "StaticSource",
    "Sync",
    "SyncPolicy",
    "SyncRun",
    "SyncSpec",
    "SyncStatus",
    "SystemClock",
    "Trigger",
    "Upcoming",
    "Weekday",
    "exceptions",
]

if TYPE_CHECKING:
    from cohortsync._async_scheduler import AsyncScheduler

    __version__: str
else:

    def __getattr__(name: str) -> object:
        if name == "AsyncScheduler":
            # Imported on first use: it loads asyncio, which synchronous
            # hosts never pay for.
            from cohortsync._async_scheduler import AsyncScheduler  # noqa: PLC0415

            globals()["AsyncScheduler"] = AsyncScheduler
            return AsyncScheduler
        # Read on first use: importlib.metadata costs more to import than all of
        # cohortsync's core, and most hosts never ask for the version.
        if name != "__version__":
            msg = f"module {__name__!r} has no attribute {name!r}"
            raise AttributeError(msg)
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            found = version("cohortsync")
        except PackageNotFoundError:
            # A source tree on sys.path that was never installed: no metadata.
            found = "0+unknown"
        globals()["__version__"] = found  # read once
        return found
