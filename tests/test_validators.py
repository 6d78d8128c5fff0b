"""
The engine's trusted constructors: no converters, but never a wrong value.
"""

from __future__ import annotations

from datetime import datetime, timezone

import attrs
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
        with pytest.raises(TypeError, match=r"Progress\(\) missing .* 'slot'"):
            v.make_trusted(Progress)
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            v.make_trusted(Progress, slot=datetime(2030, 1, 1, tzinfo=timezone.utc), bogus=1)


class TestEvolveTrusted:
    """
    evolve_trusted copies a frozen value like attrs.evolve, without converters.
    """

    def test_equals_attrs_evolve(self) -> None:
        """Changed fields are replaced, the others copied; no change is a copy."""
        at = datetime(2030, 1, 1, tzinfo=timezone.utc)
        tally = Tally(added=2, batches=1)
        assert attrs.evolve(tally, removed=3, rejected=1) == v.evolve_trusted(
            tally, removed=3, rejected=1
        )
        assert attrs.evolve(tally, rejected=1, removed=3) == v.evolve_trusted(
            tally, rejected=1, removed=3
        )
        copy = v.evolve_trusted(Progress(slot=at))
        assert Progress(slot=at) == copy

    def test_unknown_field_is_refused(self) -> None:
        """A field the class does not have is a TypeError naming it."""
        with pytest.raises(TypeError, match=r"Tally has no field.* bogus"):
            v.evolve_trusted(Tally(), bogus=1)
