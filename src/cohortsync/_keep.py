"""
:data:`KEEP`, the default of arguments that mean "leave the current value"
(``Capabilities.evolve``, ``Scheduler.update_sync``), where ``None`` is a value
a caller may set.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

__all__ = ["KEEP", "Keep"]


class _Keep(enum.Enum):
    KEEP = "keep"

    def __repr__(self) -> str:
        # What signatures show in docs and IDEs: `name=KEEP`.
        return "KEEP"


KEEP: Final = _Keep.KEEP
"""Leave the current value."""

Keep = Literal[_Keep.KEEP]
"""The type of :data:`KEEP`, for annotations: ``name: str | Keep = KEEP``."""
