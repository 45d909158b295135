"""What `medexperts run` and `predict` print: results, registry decisions, how to look further."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from components.core.errors import DataError
from components.metrics.report import results_table


def print_results(console: Console, root: Path, results: dict[str, Any]) -> None:
    """Per-task test metrics (probe / expert / fused), the registry decisions, and the UI command."""
    from components.stages.evaluate import COLUMNS, report_rows

    evaluation = results.get("evaluate")
    if evaluation:
        title = f"Test {evaluation['metric']} per task (probe = frozen foundation + linear head)"
        console.print(results_table(report_rows(evaluation), COLUMNS, title))
    promoted = (results.get("promote") or {}).get("decisions", [])
    if promoted:
        table = Table(title="Model registry")
        for col in ("model", "version", "val metric", "alias", "why"):
            table.add_column(col)
        for d in promoted:
            alias = "champion + challenger" if d["promoted"] else "challenger"
            table.add_row(d["model"], str(d["version"]), f"{d['metric']:.3f}", alias, d["reason"])
        console.print(table)
    console.print(f"MLflow run {results.get('run_id', '?')}. Open the UI: [bold]medexperts ui[/] "
                  "(http://127.0.0.1:5000)")


def load_raw_inputs(path: Path) -> list[str] | np.ndarray:
    """Text file: one input per non-empty line. .npy: an image array. .npz: its first (or 'x') array."""
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return npz["x"] if "x" in npz.files else npz[npz.files[0]]
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: no input lines")
    return lines


def print_predictions(console: Console, frame: pd.DataFrame) -> None:
    table = Table()
    for col in frame.columns:
        table.add_column(str(col))
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
