"""
Mistakes a host's type checker catches: a misspelled option, an option of
another cadence or a value outside a closed set is a mypy error with the
expected code, and the correct spelling passes. Each case is a small file; one
``mypy --strict`` run checks them all, as a host project would.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import mypy.api
import pytest

import cohortsync

HEADER = """\
import cohortsync as cs
from cohortsync.events import EligibilityChanged
from cohortsync.testing import MemoryStorage

"""

BULK = """\
from collections.abc import Sequence
from cohortsync.identifiers import Bulk
def emails_for(keys: Sequence[str]) -> dict[str, str]: return {}
"""

HTTP = """\
from cohortsync.destinations import (
    AsyncHttpxTransport, AsyncWebhookDestination, HttpxTransport, WebhookDestination
)
"""

#: Case name: (code, the mypy error codes it must produce; none means it passes).
CASES: dict[str, tuple[str, set[str]]] = {
    # SyncPolicy's named constructors.
    "hourly_misspelled": ("cs.SyncPolicy.hourly(send_removal=False)", {"call-arg"}),
    "hourly_spelled": ("cs.SyncPolicy.hourly(send_removals=False)", set()),
    "daily_zone_not_a_str": ("cs.SyncPolicy.daily(timezone=3)", {"arg-type"}),
    "daily_zone": ('cs.SyncPolicy.daily(timezone="Europe/Berlin")', set()),
    "daily_zone_by_position": ('cs.SyncPolicy.daily("Europe/Berlin", send_removals=False)', set()),
    "hourly_zone": ('cs.SyncPolicy.hourly(timezone="Europe/Berlin")', {"call-arg"}),
    "daily_on_ineligible": ('cs.SyncPolicy.daily(on_ineligible="pause")', {"call-arg"}),
    "hourly_option_by_position": ("cs.SyncPolicy.hourly(False)", {"call-arg"}),
    "realtime_on_ineligible_typo": ('cs.SyncPolicy.realtime(on_ineligible="pasue")', {"arg-type"}),
    "realtime_on_ineligible": ('cs.SyncPolicy.realtime(on_ineligible="pause")', set()),
    "on_delete_typo": ('cs.SyncPolicy.hourly(on_delete="remove")', {"arg-type"}),
    "on_delete_member": ("cs.SyncPolicy.hourly(on_delete=cs.OnDelete.REMOVE_DELIVERED)", set()),
    "cadence_typo": ('cs.SyncPolicy(cadence="fortnightly")', {"arg-type"}),
    "cadence_value": ('cs.SyncPolicy(cadence="daily", timezone="UTC")', set()),
    # Capabilities.evolve.
    "evolve_misspelled": ("cs.Capabilities().evolve(max_batchsize=5)", {"call-arg"}),
    "evolve_spelled": ("cs.Capabilities().evolve(max_batch_size=5, rate_limit=None)", set()),
    "evolve_wrong_type": ('cs.Capabilities().evolve(max_batch_size="5")', {"arg-type"}),
    "evolve_unknown_kind": (
        'cs.Capabilities().evolve(accepted_identifiers=["fax"])',
        {"list-item"},
    ),
    "evolve_kinds": (
        'cs.Capabilities().evolve(accepted_identifiers=["email", cs.IdentifierKind.PHONE])',
        set(),
    ),
    # Other closed sets a host spells.
    "cohort_type_typo": ('cs.Cohort(id="c", name="C", type="dynamic")', {"arg-type"}),
    "cohort_type": ('cs.Cohort(id="c", name="C", type="behavioral")', set()),
    "identifier_kind_typo": ('cs.Identifier("mail", "a@example.com")', {"arg-type"}),
    "identifier_kind": ('cs.Identifier("email", "a@example.com")', set()),
    "mapping_kind_typo": ('cs.IdentifierMapping(rules=[("mail", str.lower)])', {"list-item"}),
    "mapping_kind": ('cs.IdentifierMapping(rules=[("email", str.lower)])', set()),
    # A batch lookup is a rule only inside identifiers.Bulk.
    "bulk_unwrapped": (f'{BULK}cs.IdentifierMapping([("email", emails_for)])', {"list-item"}),
    "bulk_wrapped": (f'{BULK}cs.IdentifierMapping([("email", Bulk(emails_for))])', set()),
    # The scheduler's slot allocation.
    "allocation_typo": ('cs.Scheduler(MemoryStorage(), slot_allocation="hashed")', {"arg-type"}),
    "allocation": ('cs.Scheduler(MemoryStorage(), slot_allocation="hash")', set()),
    # A webhook destination takes a transport of its own kind.
    "webhook_async_transport": (
        f'{HTTP}WebhookDestination("https://x.example", transport=AsyncHttpxTransport())',
        {"arg-type"},
    ),
    "webhook_transport": (
        f'{HTTP}WebhookDestination("https://x.example", transport=HttpxTransport())',
        set(),
    ),
    "async_webhook_blocking_transport": (
        f'{HTTP}AsyncWebhookDestination("https://x.example", transport=HttpxTransport())',
        {"arg-type"},
    ),
    "async_webhook_transport": (
        f'{HTTP}AsyncWebhookDestination("https://x.example", transport=AsyncHttpxTransport())',
        set(),
    ),
    # An event's cadence is a Cadence, not its string value.
    "event_cadence_as_text": (
        'def fell_back(e: EligibilityChanged) -> bool: return e.cadence == "hourly"',
        {"comparison-overlap"},
    ),
    "event_cadence": (
        "def fell_back(e: EligibilityChanged) -> bool: return e.cadence is cs.Cadence.HOURLY",
        set(),
    ),
    # A listener typed for some event classes subscribes to those classes only.
    "listener_for_its_events": (
        (
            "from cohortsync.events import RunFinished\n"
            "def done(e: RunFinished) -> None: ...\n"
            "cs.Scheduler(MemoryStorage()).add_listener(done, events=(RunFinished,))"
        ),
        set(),
    ),
    "listener_for_other_events": (
        (
            "from cohortsync.events import GuardTripped, RunFinished\n"
            "def done(e: RunFinished) -> None: ...\n"
            "cs.Scheduler(MemoryStorage()).add_listener(done, events=(GuardTripped,))"
        ),
        {"arg-type"},
    ),
    "narrow_listener_for_every_event": (
        (
            "from cohortsync.events import RunFinished\n"
            "def done(e: RunFinished) -> None: ...\n"
            "cs.Scheduler(MemoryStorage()).add_listener(done)"
        ),
        {"arg-type"},
    ),
    "listener_events_not_classes": (
        "cs.Scheduler(MemoryStorage()).add_listener(print, events=(int,))",
        {"type-var"},
    ),
}

_ERROR = re.compile(r"^(?P<file>[^:]+\.py):\d+: error: .*\[(?P<code>[a-z-]+)\]$")


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """
    The error codes mypy --strict reports for each case file, from one run.
    """
    root = tmp_path_factory.mktemp("typing_cases")
    for name, (code, _) in CASES.items():
        (root / f"{name}.py").write_text(HEADER + code + "\n", encoding="utf-8")
    args = [
        "--strict",
        "--config-file=",  # the host's view: no project configuration
        "--cache-dir",
        str(root / ".mypy_cache"),
        "--no-error-summary",
        "--show-error-codes",
        *sorted(str(p) for p in root.glob("*.py")),
    ]
    src = Path(cohortsync.__file__).parent.parent
    with pytest.MonkeyPatch.context() as mp:
        # Check the package under test, not another copy installed elsewhere.
        if src.name == "src":
            mp.setenv("MYPYPATH", str(src))
        stdout, stderr, _ = mypy.api.run(args)
    assert "" == stderr
    codes: dict[str, set[str]] = defaultdict(set)
    for line in stdout.splitlines():
        if match := _ERROR.match(line):
            codes[Path(match["file"]).stem].add(match["code"])
    # Errors anywhere but in the cases (the package itself, a bad header) are bugs.
    assert set() == set(codes) - set(CASES), stdout
    return codes


class TestMypyErrors:
    """mypy --strict flags each mistake with the expected error code and passes the fix."""

    @pytest.mark.parametrize("name", list(CASES))
    def test_case(self, reported: dict[str, set[str]], name: str) -> None:
        """The case produces exactly the expected error codes (none for a correct call)."""
        _, expected = CASES[name]

        assert expected == reported.get(name, set())
