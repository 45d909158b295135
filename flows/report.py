"""What `medexperts run` and `predict` print: results, registry decisions, how to look further."""

from __future__ import annotations

import zipfile
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
    promote = results.get("promote") or {}
    if promote.get("decisions"):
        console.print(registry_table(promote))
    console.print(f"MLflow run {results.get('run_id', '?')}. Open the UI: [bold]medexperts ui[/] "
                  "(http://127.0.0.1:5000)")


def registry_table(promote: dict[str, Any]) -> Table:
    """This run's registry decisions beside the live champion of each model (read now, so a manual
    `medexperts promote` since shows); a skipped promote stage says that nothing was registered."""
    from components.tracking.registry import live_champions

    decisions = promote["decisions"]
    live = live_champions([d["model"] for d in decisions])
    cached = bool(promote.get("cached"))
    title = ("Model registry: promote skipped (nothing changed), nothing registered by this run; the decisions of the "
             "run that registered these versions, and the champions now" if cached else "Model registry")
    table = Table(title=title)
    for col in ("model", "version", "val metric", "decision", "champion now", "why"):
        table.add_column(col)
    for d in decisions:
        decision = "champion + challenger" if d["promoted"] else "challenger"
        now = live.get(d["model"])
        table.add_row(d["model"], str(d["version"]), f"{d['metric']:.3f}", decision,
                      f"v{now}" if now else "none", d["reason"])
    return table


def load_raw_inputs(path: Path) -> list[str] | np.ndarray:
    """Text file: one input per non-empty line (UTF-8). .npy: an image array. .npz: its 'x' (or only) array.
    A file that does not read is one DataError naming it and what was expected."""
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if path.suffix in (".npy", ".npz"):
        try:
            if path.suffix == ".npy":
                return np.load(path, allow_pickle=False)
            with np.load(path, allow_pickle=False) as npz:
                if not npz.files:
                    raise DataError(f"{path}: the .npz holds no array; expected images under 'x'")
                return npz["x"] if "x" in npz.files else npz[npz.files[0]]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: not a readable {path.suffix} image array ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'}); expected uint8 images, "
                            "(N,H,W) or (N,H,W,C), saved with numpy.save / numpy.savez") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); expected one input per line, or .npy/.npz "
                        "for images") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
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
