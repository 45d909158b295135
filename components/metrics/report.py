"""Result tables for the terminal (rich) and for README / MLflow artifacts (GitHub markdown)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

MISSING = "—"


def format_cell(value: Any) -> str:
    """Floats to 3 decimals; None and nan to an em dash; everything else via str()."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _is_numeric(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    values = [row.get(key) for row in rows if row.get(key) is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def results_table(
    rows: list[dict[str, Any]], columns: list[tuple[str, str]], title: str
) -> Table:
    """A rich Table with one column per (key, header); numeric columns right-aligned."""
    table = Table(title=title)
    for key, header in columns:
        table.add_column(header, justify="right" if _is_numeric(rows, key) else "left")
    for row in rows:
        table.add_row(*(format_cell(row.get(key)) for key, _ in columns))
    return table


def _escape(text: str) -> str:
    # A bare pipe would split the cell; newlines would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """The same table as GitHub-flavoured markdown, numeric columns right-aligned; ends with a newline."""
    headers = [_escape(header) for _, header in columns]
    aligns = ["---:" if _is_numeric(rows, key) else "---" for key, _ in columns]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(aligns) + " |"]
    for row in rows:
        cells = [_escape(format_cell(row.get(key))) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
