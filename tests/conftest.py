from __future__ import annotations

import os
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, settings

from cohortsync.testing import FakeClock

# The kit's fixtures, for the sample host project (tests/host_project). An
# installed cohortsync loads them through its pytest11 entry point; this
# loads them when it is not installed (PYTHONPATH=src). The entry point is
# named after the module, so with both the plugin is registered once.
pytest_plugins = ["cohortsync.testing.pytest_plugin"]

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

START = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)
