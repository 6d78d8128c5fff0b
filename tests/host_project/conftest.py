"""
The sample host's fixtures.

The kit's fixtures (``cohortsync_clock``, ``cohortsync_storage``,
``cohortsync_scheduler``, ``cohortsync_recording_destination``) need nothing
here: installing cohortsync registers its pytest plugin, as it does in any
host project. (cohortsync's own root ``conftest.py`` lists the plugin too, for
runs from a source checkout that is not installed.)
"""

from __future__ import annotations

import pytest

import cohortsync as cs
from host_project.adapters import PushAudience
from host_project.fakes import POWER_USERS, FakePushClient


@pytest.fixture
def push_client() -> FakePushClient:
    return FakePushClient()


@pytest.fixture
def push(
    cohortsync_scheduler: cs.Scheduler,
    push_client: FakePushClient,
) -> PushAudience:
    """
    The host's adapter registered on the kit's scheduler, with a cohort to sync.
    """
    cohortsync_scheduler.add_cohort(
        cs.Cohort(id="power-users", name="Power users", source=lambda: set(POWER_USERS))
    )
    adapter = PushAudience(push_client)
    cohortsync_scheduler.add_destination("push", adapter)
    return adapter
