"""The fusion stage: merge one modality's experts into one backbone by every configured method, each method's
coefficients (λ; TIES' k; DARE's p) chosen by a grid search on validation data only (``components.fusion``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from components.bundle.format import TaskHead, save_bundle
from components.config import FusionParams, PrimaryMetric
from components.core.errors import ArtifactError
from components.core.artifacts import read_json
from components.core.layout import expert_bundle, expert_dir, fused_bundle, fusion_curve
from components.experts.io import expert_method, load_expert
from components.experts.methods import get_method
from components.fusion.merge import MERGE_METHODS, check_compatible, coefficient_grid
from components.fusion.search import Searched, ValidationScorer, _finite, best_per_lambda, search_coefficients
from components.fusion.spaces import check_same_start, task_vectors
from components.metrics.plots import plot_fusion_curve
from components.nn.foundation import load_foundation
from components.stages.base import StageSummary, TaskInputs, param

log = logging.getLogger("medexperts")


class FusionInputs(TaskInputs):
    fusion: FusionParams = param("fusion")
    metric: PrimaryMetric = param("evaluate.primary_metric")
    seed: int = param("pipeline.seed")
    thresholds: bool = param("experts.probe.multilabel_thresholds",
                             "a multilabel task's fused model re-picks its per-label thresholds on validation")


class MergeResult(StageSummary):
    """One merge method's chosen point and its whole search."""

    coefficients: dict[str, float]
    val_normalised: float
    val_metrics: dict[str, dict[str, float]]
    seed: int | None = None  # stochastic methods (DARE) only
    grid: list[dict[str, Any]]

    @property
    def lam(self) -> float | None:
        return self.coefficients.get("lam")


class FusionSummary(StageSummary):
    skipped: str | None = None  # why nothing was merged (then every other field is empty)
    modality: str | None = None
    tasks: list[str] = []
    metric: str | None = None
    methods: dict[str, MergeResult] = {}
    best_method: str | None = None
    single_val: dict[str, float] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    lora_space: str | None = None
    seed: int | None = None
    search_seconds: float | None = None

    def best_val_mean(self) -> float:
        """The best method's validation metric, averaged over the merged tasks (what promotion compares)."""
        per_task = self.methods[self.best_method].val_metrics
        return sum(v[self.metric] for v in per_task.values()) / len(per_task)


def _input_of(experts_dir: Path, task: str, modality: str) -> dict[str, int] | None:
    """The image input record of ``task``'s expert bundle (what its fused model accepts too); None for text, or
    for an expert bundle written before the record existed."""
    path = expert_bundle(expert_dir(experts_dir, task)) / "manifest.json"
    if modality != "image" or not path.is_file():
        return None
    return read_json(path, "expert bundle manifest").get("tasks", {}).get(task, {}).get("input")


def run(inp: FusionInputs, data_dir: Path, foundation_dir: Path, experts_dir: Path, out_dir: Path) -> FusionSummary:
    """The stage: skipped (with the reason) when fewer than 2 experts of the modality exist or their method changes
    no weight; else ``fuse_experts``."""
    tasks = list(inp.active_tasks(inp.fusion.modality))
    if len(tasks) < 2:
        return FusionSummary(skipped=f"fewer than 2 active {inp.fusion.modality} tasks ({tasks})")
    method = get_method(expert_method(expert_dir(experts_dir, tasks[0])))
    if method.delta is None:
        return FusionSummary(skipped=f"{method.pretty} experts change no weight: nothing to merge in weight space")
    return fuse_experts(inp, data_dir, foundation_dir, experts_dir, out_dir)


def fuse_experts(inp: FusionInputs, data_dir: Path, foundation_dir: Path, experts_dir: Path,
                 out_dir: Path) -> FusionSummary:
    """Merge by every configured method, its coefficients by validation normalised score; write one bundle per
    method and the curve. Every check runs before the first bundle is written."""
    fp, metric, seed = inp.fusion, inp.metric, inp.seed
    tasks = list(inp.active_tasks(fp.modality))  # the stage skips fusion with fewer than 2
    if not tasks:
        raise ArtifactError(f"no experts to merge (empty expert list): no active {fp.modality} task")
    foundation = load_foundation(foundation_dir, fp.modality)
    experts = {t: load_expert(expert_dir(experts_dir, t), foundation) for t in tasks}
    check_same_start(experts)
    t0 = time.perf_counter()
    vectors, to_delta = task_vectors(experts, foundation, fp.lora_space)
    check_compatible(vectors, tasks)
    scorer = ValidationScorer(foundation, experts, data_dir, fp.max_val_samples, metric, seed)
    grids = {"lam": fp.lambdas, "k": fp.ks, "p": fp.ps}
    searched: dict[str, Searched] = {}
    for method in fp.methods:
        searched[method] = s = search_coefficients(method, vectors, tasks, coefficient_grid(method, grids),
                                                   scorer.score, seed=seed, to_delta=to_delta)
        log.info("[fusion] %s (%s space): %s of %d points, normalised val %s=%.3f", method, fp.lora_space,
                 s.coefficients or "no coefficients", len(s.grid), metric, s.score)
    search_seconds = time.perf_counter() - t0  # task vectors, merges and validation scoring

    inputs = {t: _input_of(experts_dir, t, fp.modality) for t in tasks}
    multilabel = [t for t, e in experts.items() if e.info.task_kind == "multilabel"]
    results: dict[str, MergeResult] = {}
    for method, s in searched.items():
        chosen_heads = {t: e.head for t, e in experts.items()}
        if multilabel and inp.thresholds:  # the chosen point's figures, with the re-picked thresholds
            chosen_heads = scorer.refit_thresholds(s.delta)
            s.score, s.per_task = scorer.score(s.delta, chosen_heads)
        heads = {t: TaskHead(chosen_heads[t], e.info.task_kind, e.info.label_names, inputs[t])
                 for t, e in experts.items()}
        chosen = {"lambda": s.coefficients.get("lam"), "coefficients": s.coefficients, "val_normalised": s.score,
                  "val_metrics": s.per_task, **({"seed": seed} if MERGE_METHODS[method].stochastic else {})}
        save_bundle(fused_bundle(out_dir, method), foundation, s.delta, heads, name=f"fused-{fp.modality}-{method}",
                    metadata={"method": method, **chosen, "lora_space": fp.lora_space, "tasks_merged": tasks,
                              "single_val": scorer.single, "metric": metric})
        results[method] = MergeResult(coefficients=s.coefficients, val_normalised=s.score, val_metrics=s.per_task,
                                      seed=chosen.get("seed"), grid=s.grid)
    curves = {m: best_per_lambda(s.grid, len(tasks)) for m, s in searched.items()}
    best_method = max(results, key=lambda m: _finite(results[m].val_normalised))
    chosen_lam = {m: s.coefficients.get("lam", 1.0 / len(tasks)) for m, s in searched.items()}
    plot_fusion_curve(curves, chosen_lam, f"normalised val {metric}", fusion_curve(out_dir))
    return FusionSummary(modality=fp.modality, tasks=tasks, metric=metric, methods=results, best_method=best_method,
                         single_val=scorer.single, curves=curves, lora_space=fp.lora_space, seed=seed,
                         search_seconds=search_seconds)
