"""The one Markdown table writer every benchmark report uses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Lines of a Markdown table: the header, its separator, then one line per row.

    Cells are written as given (``str``); the caller formats numbers.
    """
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
