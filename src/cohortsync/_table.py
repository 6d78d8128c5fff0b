"""
Plain-text tables for the command line and the demo: each column as wide as
the longest value printed in it, so that neither long ids break the
alignment nor short ones leave wide gaps.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence

__all__ = ["GAP", "grow", "render", "table"]

GAP = "  "
"""Between two columns."""


def grow(widths: Sequence[int], rows: Iterable[Sequence[str]]) -> list[int]:
    """
    *widths* widened to fit every cell of *rows* (never narrowed: a listing
    printed in blocks keeps the columns it has already printed).
    """
    wider = list(widths)
    for row in rows:
        for i, cell in enumerate(row):
            wider[i] = max(wider[i], len(cell))
    return wider


def render(row: Sequence[str], widths: Sequence[int], *, right: Container[int] = ()) -> str:
    """
    One line: cells padded to *widths* (right-aligned for the columns in
    *right*, numbers), the last left-aligned column unpadded, no trailing
    space.
    """
    last = len(row) - 1
    cells = [
        cell.rjust(widths[i]) if i in right else cell if i == last else cell.ljust(widths[i])
        for i, cell in enumerate(row)
    ]
    return GAP.join(cells).rstrip()


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Container[int] = ()
) -> list[str]:
    """
    The header line, then one line per row, every column as wide as its
    longest cell (the header's included).
    """
    widths = grow([len(h) for h in header], rows)
    return [render(row, widths, right=right) for row in (header, *rows)]
