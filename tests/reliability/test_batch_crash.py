"""
Kill -9 a worker while the records of a claim batch wait to be stored
(issue 14: completions of consecutive runs committed together). The runs of
the batch delivered everything; their records are lost with the process.
A fresh worker, once the leases expire, runs every slot again: it finds
what was delivered (the store's progress of each attempt), sends nothing
twice, and records each slot once with the whole tally.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
from reliability_harness import (
    BATCH_MEMBERS,
    BATCH_SYNCS,
    T0,
    Figures,
    _whole_record,
    batch_members,
    open_store,
    read_lines,
    replay,
    resent,
    run_worker,
)

import cohortsync as cs
from cohortsync.testing import SharedFakeClock

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize(
    ("step", "stored_before"),
    [
        ("before_complete", 0),  # every run of the batch done, no record stored
        ("acked", 0),  # killed inside the fifth run, four records waiting
        ("completed", 6),  # the batch's records committed, then killed
    ],
)
def test_a_batch_killed_before_its_records_are_stored(
    tmp_path: Path, store_spec: str, step: str, stored_before: int, figures: Figures
) -> None:
    config = {
        "store": store_spec,
        "clock": str(tmp_path / "clock"),
        "remote": str(tmp_path / "remote.jsonl"),
    }
    SharedFakeClock(config["clock"], start=T0)
    assert 0 == run_worker({**config, "mode": "batch_setup"}).returncode

    crashed = run_worker({**config, "mode": "batch_crash", "step": step})
    assert -signal.SIGKILL == crashed.returncode, crashed.stdout + crashed.stderr
    store = open_store(store_spec)
    try:
        assert stored_before == sum(len(store.history(s)) for s in BATCH_SYNCS)
    finally:
        store.close()
    before = read_lines(config["remote"])

    recovered = run_worker({**config, "mode": "batch_recover"})
    assert 0 == recovered.returncode, recovered.stderr.decode()
    out = json.loads(recovered.stdout.decode().strip().splitlines()[-1])

    sends = read_lines(config["remote"])
    audience = replay(sends)
    again = resent(sends)
    store = open_store(store_spec)
    try:
        for sync_id in BATCH_SYNCS:
            members = set(batch_members(sync_id))
            assert members == audience.get(sync_id, set()), sync_id
            assert members == set(store.iter_delivered(sync_id)), sync_id
            history = store.history(sync_id)
            assert all(1 == n for n in Counter(r.slot for r in history).values())
            (record,) = [r for r in history if r.slot == T0]
            # The slot's one record counts everything delivered in it.
            assert BATCH_MEMBERS == record.added, (sync_id, record)
            assert cs.RunStatus.SUCCEEDED is record.status
            assert store.get_sync(sync_id).lease is None
    finally:
        store.close()
    # Only the batch in flight at the kill is sent again, under its key.
    expected_resends = 1 if step == "acked" else 0
    assert expected_resends == sum(n - 1 for n in again.values())
    figures.record(
        f"batch-crash/{store_spec.partition(':')[0]}",
        trials=1,
        faults=1,
        duplicates=0,
        losses=0,
        resent_batches=sum(n - 1 for n in again.values()),
    )
    assert (6 - stored_before) == len(out["runs"])
    assert len(before) <= len(sends)


def test_a_torn_record_followed_by_another_is_dropped() -> None:
    """A worker killed mid-write tears its record; the next one lands on the same line."""
    torn = '{"e":"start","sync":"r09","slot":"2030-01-01T00:38:00+00:'
    whole = '{"e":"start","sync":"r00","slot":"2030-01-01T00:38:00+00:00","owner":"w2"}\n'
    assert {"e": "start", "sync": "r00", "slot": "2030-01-01T00:38:00+00:00", "owner": "w2"} == (
        _whole_record(torn + whole)
    )
