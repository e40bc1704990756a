"""Markdown tables from rows of dicts: the one table writer of the results modules and the report.

It imports nothing from the package, so every floor (engine, tasks, report) may use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["fmt", "markdown_table"]


def fmt(v: Any, digits: int = 2) -> str:
    """A cell: None as —, floats to ``digits`` decimals, anything else as ``str``."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    headers: Sequence[str] | None = None,
    digits: int | dict[str, int] = 2,
) -> str:
    """A markdown table of ``rows`` restricted to ``columns`` (missing values shown as —).

    Args:
        rows: one dict per row.
        columns: the keys shown, in order.
        headers: the column titles (default: the keys).
        digits: decimals of float cells, for every column or per key (others: 2).
    """
    headers = list(headers or columns)
    if len(headers) != len(columns):
        raise ValueError(f"markdown_table: {len(headers)} headers for {len(columns)} columns")
    per_key = digits if isinstance(digits, dict) else {}
    default = 2 if isinstance(digits, dict) else digits
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), per_key.get(c, default)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
