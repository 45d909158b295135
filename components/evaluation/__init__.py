"""Evaluation stage helpers: metrics, confusion matrices, plots, latency, sizes, result tables."""

from __future__ import annotations

from components.evaluation.counts import count_parameters, file_bytes, tensor_bytes
from components.evaluation.latency import measure_latency
from components.evaluation.metrics import (
    PRIMARY_METRICS,
    Kind,
    compute_metrics,
    confusion,
    normalised_score,
    predictions,
)
from components.evaluation.plots import plot_confusion, plot_fusion_curve
from components.evaluation.report import format_cell, markdown_table, results_table

__all__ = [
    "PRIMARY_METRICS",
    "Kind",
    "compute_metrics",
    "confusion",
    "count_parameters",
    "file_bytes",
    "format_cell",
    "markdown_table",
    "measure_latency",
    "normalised_score",
    "plot_confusion",
    "plot_fusion_curve",
    "predictions",
    "results_table",
    "tensor_bytes",
]
