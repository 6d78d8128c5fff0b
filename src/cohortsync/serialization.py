"""
Turning cohortsync's values into JSON and back.

Every public value (cohort definitions without their source, policies,
syncs, runs, events) round-trips through the library's own cattrs converter;
the global cattrs converter is never touched. Use :func:`dumps` and
:func:`loads` to store or ship values, or :func:`make_converter` for a
converter of your own built on the same hooks.
"""

from cohortsync._converter import dumps, loads, make_converter

__all__ = ["dumps", "loads", "make_converter"]
