"""
Advice from history: the product rule that a real-time sync which mostly
updates nobody would be better off hourly, and its twin for syncs every one
to five minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import attrs

from cohortsync._policy import Cadence
from cohortsync._sync import RunStatus, Sync, SyncRun

__all__ = ["MIN_RUNS", "SHORT_INTERVAL", "ZERO_SHARE", "Recommendation", "recommend"]

MIN_RUNS = 30
"""Fewer recent runs than this are not evidence enough."""

ZERO_SHARE = 0.8
""""Most runs updated 0 members" means at least this share."""

SHORT_INTERVAL = timedelta(minutes=5)
"""An every() sync at this interval or shorter is advised like a real-time one."""


@attrs.frozen(kw_only=True)
class Recommendation:
    """
    A suggested change to a sync, with the evidence behind it.

    Args:
        sync_id: The sync it is about.
        code: Stable code: ``"realtime_to_hourly"`` or
            ``"short_interval_to_hourly"``.
        message: For people.
        suggested_cadence: The cadence to move to.
        runs_considered: Recent runs looked at.
        zero_update_runs: Of those, runs that added and removed nobody.
        zero_update_share: Their share.
    """

    sync_id: str
    code: str
    message: str
    suggested_cadence: Cadence
    runs_considered: int
    zero_update_runs: int
    zero_update_share: float


def recommend(
    sync: Sync,
    history: Sequence[SyncRun],
    *,
    min_runs: int = MIN_RUNS,
    zero_share: float = ZERO_SHARE,
    window: int = 60,
) -> Recommendation | None:
    """
    Apply the advice rules to *sync* and its recent *history* (newest first).

    A real-time sync whose last *window* completed runs mostly (at least
    *zero_share*) updated 0 members is advised to move to hourly: it pays for
    a check every minute and rarely has anything to send. A sync every 1 to
    5 minutes (:data:`SHORT_INTERVAL`) with the same history is advised to
    move to a longer interval (hourly), for the same reason.

    Returns:
        A recommendation, or ``None`` when there is nothing to advise.
    """
    policy = sync.policy
    cadence = policy.cadence
    if cadence is Cadence.REALTIME:
        code, what = "realtime_to_hourly", "real-time runs"
        saving = "a sixtieth of the work"
    elif (
        cadence is Cadence.EVERY
        and policy.interval is not None
        and policy.interval <= SHORT_INTERVAL
    ):
        minutes = int(policy.interval.total_seconds()) // 60
        code, what = (
            "short_interval_to_hourly",
            f"runs every {minutes} minute{'' if minutes == 1 else 's'}",
        )
        saving = f"1/{60 // minutes} of the work"
    else:
        return None
    recent = [
        r
        for r in history
        if r.status in (RunStatus.SUCCEEDED, RunStatus.PARTIAL) and r.cadence is cadence
    ][:window]
    if len(recent) < min_runs:
        return None
    zero = sum(1 for r in recent if r.updated == 0)
    share = zero / len(recent)
    if share < zero_share:
        return None
    return Recommendation(
        sync_id=sync.id,
        code=code,
        message=(
            f"{zero} of the last {len(recent)} {what} updated 0 members; "
            f"an hourly sync would deliver nearly the same audience for {saving}"
        ),
        suggested_cadence=Cadence.HOURLY,
        runs_considered=len(recent),
        zero_update_runs=zero,
        zero_update_share=share,
    )
