"""
A fake of the push provider, as the host's tests would have.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import attrs

from host_project.adapters import PushApiError

POWER_USERS = frozenset({"u1", "u2", "u3", "u4"})
"""The members of the sample "power users" cohort."""


@attrs.define
class FakePushClient:
    """
    Segments in memory; de-duplicates on ``request_id``; fails on cue.
    """

    segments: dict[str, set[str]] = attrs.Factory(dict)
    requests: list[tuple[str, tuple[str, ...]]] = attrs.Factory(list)
    unknown_devices: set[str] = attrs.Factory(set)
    _failures: list[BaseException] = attrs.Factory(list)
    _seen: set[str] = attrs.Factory(set)

    def fail_next(self, status: int, retry_after: float | None = None) -> None:
        self._failures.append(PushApiError(status, retry_after))

    def time_out_next(self) -> None:
        self._failures.append(TimeoutError("read timed out"))

    def refuse(self, users: Collection[str]) -> None:
        self.unknown_devices.update(users)

    def update_segment(
        self, segment: str, users: Sequence[str], *, member: bool, request_id: str
    ) -> list[str]:
        self.requests.append((segment, tuple(users)))
        if self._failures:
            raise self._failures.pop(0)
        refused = sorted(self.unknown_devices)
        if request_id in self._seen:
            return refused
        self._seen.add(request_id)
        held = self.segments.setdefault(segment, set())
        accepted = [u for u in users if u not in self.unknown_devices]
        if member:
            held.update(accepted)
        else:
            held.difference_update(accepted)
        return refused
