"""PNG figures for reports: confusion matrices and fusion-coefficient (λ) sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from components.core.artifacts import atomic_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _save_atomic(fig: Figure, path: Path) -> Path:
    """Write the figure next to `path` then rename, so readers never see a half-written PNG."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure renders through the Agg canvas without touching pyplot's global state or backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _draw_matrix(ax: Axes, counts: np.ndarray, row_names: list[str], col_names: list[str]) -> None:
    """Heatmap with an integer count in every cell; text colour flips on dark cells."""
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), value in np.ndenumerate(counts):
        colour = "white" if value > threshold else "black"
        ax.text(j, i, f"{int(value)}", ha="center", va="center", color=colour, fontsize=8)
    # Only long class names need slanting to avoid overlapping neighbours.
    slant = any(len(name) > 3 for name in col_names)
    ax.set_xticks(range(len(col_names)), col_names, rotation=45 if slant else 0, ha="right" if slant else "center", fontsize=8)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")


def plot_confusion(
    matrix: torch.Tensor | np.ndarray, label_names: list[str], title: str, path: Path
) -> Path:
    """Save an annotated confusion matrix: (C, C) as one heatmap, (L, 2, 2) as a row of small ones."""
    counts = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    counts = counts.astype(np.int64)
    if counts.ndim == 2 and counts.shape[0] == counts.shape[1]:
        if len(label_names) != counts.shape[0]:
            raise ValueError(f"{len(label_names)} label names for a {counts.shape[0]}-class matrix")
        side = max(3.5, 0.6 * counts.shape[0] + 2.0)
        fig = _new_figure(side, side)
        ax = fig.add_subplot()
        _draw_matrix(ax, counts, label_names, label_names)
        ax.set_title(title)
    elif counts.ndim == 3 and counts.shape[1:] == (2, 2):
        n = counts.shape[0]
        if len(label_names) != n:
            raise ValueError(f"{len(label_names)} label names for {n} per-label matrices")
        # Wrap into rows of at most 6 so many-label tasks stay legible.
        cols = min(n, 6)
        rows = (n + cols - 1) // cols
        fig = _new_figure(2.3 * cols, 2.3 * rows + 0.4)
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= n:
                ax.set_axis_off()
                continue
            _draw_matrix(ax, counts[k], ["0", "1"], ["0", "1"])
            ax.set_title(label_names[k], fontsize=9)
        fig.suptitle(title)
    else:
        raise ValueError(f"confusion matrix must be (C, C) or (L, 2, 2), got shape {counts.shape}")
    return _save_atomic(fig, path)


def plot_fusion_curve(
    curves: dict[str, list[tuple[float, float]]], chosen: dict[str, float], ylabel: str, path: Path
) -> Path:
    """Save score-vs-λ lines, one per fusion method, with each method's chosen λ marked."""
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for method, points in curves.items():
        ordered = sorted(points)
        xs = [p[0] for p in ordered]
        ys = [p[1] for p in ordered]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=method)
        if method in chosen and ordered:
            lam = chosen[method]
            # Mark the curve's own point nearest the chosen λ so the marker sits on the line.
            nearest = min(ordered, key=lambda p: abs(p[0] - lam))
            ax.axvline(lam, color=line.get_color(), linestyle=":", linewidth=1)
            ax.plot(
                [nearest[0]],
                [nearest[1]],
                marker="*",
                markersize=12,
                color=line.get_color(),
                linestyle="none",
                label=f"{method}: λ={lam:g}",
            )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("λ")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return _save_atomic(fig, path)


def plot_grouped_bars(
    values: dict[str, dict[str, float]], ylabel: str, path: Path, title: str = "", reference: float | None = None
) -> Path:
    """Save grouped bars: one group per outer key, one bar per inner key (same inner keys share a colour),
    with an optional horizontal reference line (1.0 for normalised scores)."""
    if not values:
        raise ValueError("plot_grouped_bars: nothing to plot")
    groups = list(values)
    bars = list(dict.fromkeys(b for inner in values.values() for b in inner))
    width = 0.8 / len(bars)
    fig = _new_figure(max(6.0, 1.2 * len(groups) * max(1, len(bars)) / 3), 4.0)
    ax = fig.add_subplot()
    for i, bar in enumerate(bars):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        ys = [values[group].get(bar, np.nan) for group in groups]
        ax.bar(xs, ys, width=width, label=bar)
    if reference is not None:
        ax.axhline(reference, color="grey", linewidth=0.8, linestyle="--")
    finite = [v for inner in values.values() for v in inner.values() if np.isfinite(v)]
    if finite:  # zoom on the spread: normalised scores sit near 1, where bars from 0 hide the differences
        low, high = min(finite + ([reference] if reference is not None else [])), max(finite)
        pad = max(0.02, 0.1 * (high - low))
        ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, ncols=min(len(bars), 5))  # below the axes, never on a bar
    return _save_atomic(fig, path)


def plot_heatmap(values: np.ndarray, row_names: list[str], col_names: list[str], title: str, path: Path) -> Path:
    """Save a (rows, cols) matrix of values in [0, 1] (e.g. router weights per layer and expert), each cell labelled."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(row_names), len(col_names)):
        raise ValueError(f"heatmap of shape {values.shape} with {len(row_names)} row and {len(col_names)} column names")
    fig = _new_figure(max(4.0, 0.9 * len(col_names) + 2.5), max(3.0, 0.28 * len(row_names) + 1.5))
    ax = fig.add_subplot()
    ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=7)
    ax.set_xticks(range(len(col_names)), col_names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save_atomic(fig, path)


def plot_rounds(curves: dict[str, list[float | None]], ylabel: str, path: Path) -> Path:
    """Save one line per series over federated rounds 1..R (e.g. each task's validation metric of the aggregate)."""
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, values in curves.items():
        points = [(r, v) for r, v in enumerate(values, start=1) if v is not None]
        ax.plot([r for r, _ in points], [v for _, v in points], marker="o", markersize=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    return _save_atomic(fig, path)
