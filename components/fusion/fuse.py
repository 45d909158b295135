"""The fusion stage: merge one modality's experts into one backbone; choose λ on validation data."""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from components.artifacts import write_json
from components.config import Params
from components.data.datasets import load_split
from components.errors import ArtifactError
from components.evaluation.metrics import compute_metrics, normalised_score
from components.evaluation.plots import plot_fusion_curve
from components.experts.io import Expert, load_expert
from components.fusion.merge import TaskVector, check_compatible, merge_average, merge_task_arithmetic
from components.models.classifier import Classifier
from components.models.bundle import TaskHead, add_delta, save_bundle
from components.models.foundation import Foundation, load_foundation
from components.training.data import labels_tensor
from components.training.inference import batched

log = logging.getLogger("medexperts")


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

    def score(self, delta: TaskVector) -> tuple[float, dict[str, dict[str, float]]]:
        encoder = add_delta(copy.deepcopy(self.foundation.encoder), delta).eval()
        per_task = {}
        for task, expert in self.experts.items():
            per_task[task] = self._metrics(task, Classifier(encoder, expert.head))
        norm = [normalised_score(per_task[t][self.metric], self.single[t]) for t in self.experts]
        return float(sum(norm) / len(norm)), per_task


def check_same_start(experts: dict[str, Expert]) -> None:
    """Task vectors only add when the experts share a method and (L-LoRA) the same initial adapter φ0."""
    methods = {t: e.manifest["method"] for t, e in experts.items()}
    if len(set(methods.values())) > 1:
        raise ArtifactError(f"experts of different methods cannot be merged: {methods}")
    inits = {t: e.manifest.get("init_sha256") for t, e in experts.items()}
    if len(set(inits.values())) > 1:
        raise ArtifactError(f"L-LoRA experts start from different initialisations (φ0 hashes {inits}); "
                            "train them with the same seed and LoRA settings")


def _finite(score: float) -> float:
    """NaN scores (an undefined metric) rank last."""
    return -math.inf if math.isnan(score) else score


def fuse_experts(params: Params, data_dir: Path, foundation_dir: Path, experts_dir: Path,
                 out_dir: Path) -> dict[str, Any]:
    """Merge by every configured method; λ by validation normalised score; write bundles + curve."""
    fp, metric, seed = params.fusion, params.evaluate.primary_metric, params.pipeline.seed
    tasks = list(params.data.active_tasks(fp.modality))  # the stage skips fusion with fewer than 2
    foundation = load_foundation(foundation_dir, fp.modality)
    experts = {t: load_expert(experts_dir / t, foundation) for t in tasks}
    check_same_start(experts)
    t0 = time.perf_counter()
    deltas = [e.delta() for e in experts.values()]
    check_compatible(deltas, tasks)
    scorer = ValidationScorer(foundation, experts, data_dir, fp.max_val_samples, metric, seed)
    results: dict[str, Any] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for method in fp.methods:
        if method == "average":
            grid = [(None, merge_average(deltas))]
        else:
            grid = [(lam, merge_task_arithmetic(deltas, lam)) for lam in fp.lambdas]
        scored = [(lam, delta, *scorer.score(delta)) for lam, delta in grid]
        if method == "task_arithmetic":
            curves[method] = [(lam, s) for lam, _, s, _ in scored]
        else:  # simple averaging is task arithmetic at λ = 1/T: one point on the same axes
            curves[method] = [(1.0 / len(tasks), scored[0][2])]
        best = max(scored, key=lambda r: _finite(r[2]))
        lam, delta, score, per_task = best
        heads = {t: TaskHead(e.head, e.manifest["task_kind"], e.manifest["label_names"]) for t, e in experts.items()}
        save_bundle(out_dir / method, foundation, delta, heads, name=f"fused-{fp.modality}-{method}", metadata={
            "method": method, "lambda": lam, "tasks_merged": tasks, "val_normalised": score,
            "val_metrics": per_task, "single_val": scorer.single, "metric": metric,
        })
        results[method] = {"lambda": lam, "val_normalised": score, "val_metrics": per_task}
        log.info("[fusion] %s: λ=%s, normalised val %s=%.3f", method, lam, metric, score)
    best_method = max(results, key=lambda m: _finite(results[m]["val_normalised"]))
    summary = {
        "modality": fp.modality, "tasks": tasks, "metric": metric, "methods": results, "best_method": best_method,
        "single_val": scorer.single, "curves": {m: [list(p) for p in c] for m, c in curves.items()},
        "search_seconds": time.perf_counter() - t0,  # merges + validation scoring
    }
    chosen = {m: results[m]["lambda"] or 1.0 / len(tasks) for m in curves}
    plot_fusion_curve(curves, chosen, f"normalised val {metric}", out_dir / "fusion_curve.png")
    write_json(out_dir / "summary.json", summary)
    return summary
