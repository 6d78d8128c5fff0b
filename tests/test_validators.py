"""
The engine's trusted constructors: no converters, but never a wrong value.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cohortsync import _validators as v
from cohortsync.storage import Progress, Tally


class TestMakeTrusted:
    """
    make_trusted builds a frozen value without converters, but not a wrong one.
    """

    def test_equals_the_validating_constructor(self) -> None:
        """Defaults (plain and factory) are filled in like the constructor does."""
        at = datetime(2030, 1, 1, tzinfo=timezone.utc)
        assert Progress(slot=at) == v.make_trusted(Progress, slot=at)
        assert Tally(added=2) == v.make_trusted(Tally, added=2)

    def test_missing_or_unknown_fields_are_refused(self) -> None:
        """A field the class needs, or does not have, is a TypeError."""
        with pytest.raises(TypeError, match="needs slot"):
            v.make_trusted(Progress)
        with pytest.raises(TypeError, match="no field"):
            v.make_trusted(Progress, slot=datetime(2030, 1, 1, tzinfo=timezone.utc), bogus=1)
