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
"""

import logging

from cohortsync import exceptions
from cohortsync._bulk import BulkFailure, BulkResult, SyncSpec
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
