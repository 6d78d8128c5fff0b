"""
The sample host's fixtures.

A host enables the kit's fixtures in its ROOT ``conftest.py`` with::

    pytest_plugins = ["cohortsync.testing.pytest_plugin"]

This sample lives in a sub-directory of cohortsync's own tests, where pytest
refuses ``pytest_plugins`` (only the root conftest may declare plugins), so it
imports the same fixtures by name instead: the effect within this directory
is identical.
"""

from __future__ import annotations

import pytest

import cohortsync as cs
from cohortsync.testing.pytest_plugin import (  # noqa: F401 - fixtures are found by name
    clock,
    recording_destination,
    scheduler,
    storage,
)
from host_project.adapters import PushAudience
from host_project.fakes import POWER_USERS, FakePushClient


@pytest.fixture
def push_client() -> FakePushClient:
    return FakePushClient()


@pytest.fixture
def push(
    scheduler: cs.Scheduler,  # noqa: F811 - asks pytest for the fixture imported above
    push_client: FakePushClient,
) -> PushAudience:
    """
    The host's adapter registered on the kit's scheduler, with a cohort to sync.
    """
    scheduler.add_cohort(
        cs.Cohort(id="power-users", name="Power users", source=lambda: set(POWER_USERS))
    )
    adapter = PushAudience(push_client)
    scheduler.add_destination("push", adapter)
    return adapter
