"""Coefficient search on validation data: merge at every grid point, score the merged model, keep the best."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.bundle.format import add_delta
from components.core.errors import ParamsError
from components.data.datasets import load_split
from components.experts.io import Expert
from components.fusion.merge import TaskVector, merge
from components.fusion.spaces import ToDelta, _identity
from components.metrics.classification import compute_metrics, normalised_score
from components.nn.classifier import Classifier
from components.nn.foundation import Foundation
from components.training.data import labels_tensor
from components.training.inference import batched
from components.training.multilabel import best_thresholds, fold_thresholds

Metrics = dict[str, dict[str, float]]
Scorer = Callable[[TaskVector], tuple[float, Metrics]]  # merged ΔW -> (normalised score, metrics per task)


class ValidationScorer:
    """Scores a merged task vector on every task's validation split (tensors prepared once)."""

    def __init__(self, foundation: Foundation, experts: dict[str, Expert], data_dir: Path, cap: int | None,
                 metric: str, seed: int) -> None:
        self.foundation, self.experts, self.metric = foundation, experts, metric
        self.data = {}
        for task in experts:
            val = load_split(data_dir, task, "val").subset(cap, seed)
            self.data[task] = (foundation.inputs(val.inputs), labels_tensor(val.labels, val.kind), val)
        self.single = {t: self._metrics(t, e.classifier())[metric] for t, e in experts.items()}

    def _metrics(self, task: str, model: torch.nn.Module) -> dict[str, float]:
        x, y, val = self.data[task]
        return compute_metrics(val.kind, batched(model, x), y, val.num_labels)

    def score(self, delta: TaskVector, heads: dict[str, torch.nn.Module] | None = None) -> tuple[float, Metrics]:
        """Normalised score: the mean over tasks of the merged model's metric / that task's expert's (with the
        experts' own heads, or ``heads``)."""
        encoder = add_delta(copy.deepcopy(self.foundation.encoder), delta).eval()
        per_task = {}
        for task, expert in self.experts.items():
            per_task[task] = self._metrics(task, Classifier(encoder, (heads or {}).get(task, expert.head)))
        norm = [normalised_score(per_task[t][self.metric], self.single[t]) for t in self.experts]
        return float(sum(norm) / len(norm)), per_task

    def refit_thresholds(self, delta: TaskVector) -> dict[str, torch.nn.Module]:
        """Multilabel tasks: a copy of the expert's head whose per-label decision thresholds are picked again on the
        merged model's validation logits (``best_thresholds``, folded on top of the expert's own: the merged
        features are not the expert's); other tasks keep the expert's head."""
        encoder = add_delta(copy.deepcopy(self.foundation.encoder), delta).eval()
        heads = {}
        for task, expert in self.experts.items():
            x, y, val = self.data[task]
            heads[task] = expert.head
            if val.kind == "multilabel":
                heads[task] = copy.deepcopy(expert.head)
                with torch.no_grad():
                    logits = batched(Classifier(encoder, heads[task]), x)
                fold_thresholds(heads[task], best_thresholds(logits, y))
        return heads


# --------------------------------------------------------------------------- search
def _finite(score: float) -> float:
    """NaN scores (an undefined metric) rank last."""
    return -math.inf if math.isnan(score) else score


@dataclass
class Searched:
    """One method's search: the best point (its ΔW kept for the bundle) and every point tried, in order."""

    coefficients: dict[str, float]
    score: float
    per_task: Metrics
    delta: TaskVector
    grid: list[dict[str, Any]]


def search_coefficients(method: str, vectors: Sequence[TaskVector], names: Sequence[str],
                        grid: Sequence[dict[str, float]], score: Scorer, *, seed: int = 0,
                        to_delta: ToDelta = _identity) -> Searched:
    """Merge at every grid point, score the merged ΔW, keep the best (the first of equals; NaN ranks last)."""
    if not grid:
        raise ParamsError(f"merge method {method!r}: empty coefficient grid")
    best: Searched | None = None
    points: list[dict[str, Any]] = []
    for coeffs in grid:
        delta = to_delta(merge(method, vectors, lam=coeffs.get("lam", 1.0 / len(vectors)), k=coeffs.get("k"),
                               p=coeffs.get("p"), seed=seed, names=names))
        value, per_task = score(delta)
        points.append({"coefficients": dict(coeffs), "val_normalised": value})
        if best is None or _finite(value) > _finite(best.score):
            best = Searched(dict(coeffs), value, per_task, delta, [])
    assert best is not None
    best.grid = points
    return best


def best_per_lambda(grid: Sequence[dict[str, Any]], n_tasks: int) -> list[tuple[float, float]]:
    """The curve plotted for a method: its best validation score at each λ (the max over k and p), by λ;
    'average' is one point at λ = 1/T (task arithmetic's λ that equals it)."""
    best: dict[float, float] = {}
    for point in grid:
        lam, value = point["coefficients"].get("lam", 1.0 / n_tasks), point["val_normalised"]
        if lam not in best or _finite(value) > _finite(best[lam]):
            best[lam] = value
    return sorted(best.items())
