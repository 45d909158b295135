"""The fusion stage: merge one modality's experts into one backbone by every configured method, each method's
coefficients (λ; TIES' k; DARE's p) chosen by a grid search on validation data only (``components.fusion``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from components.bundle.format import TaskHead, save_bundle
from components.config import Params
from components.core.artifacts import write_json
from components.core.errors import ArtifactError
from components.experts.io import load_expert
from components.fusion.merge import MERGE_METHODS, check_compatible, coefficient_grid
from components.fusion.search import Searched, ValidationScorer, _finite, best_per_lambda, search_coefficients
from components.fusion.spaces import check_same_start, task_vectors
from components.metrics.plots import plot_fusion_curve
from components.nn.foundation import load_foundation

log = logging.getLogger("medexperts")


def fuse_experts(params: Params, data_dir: Path, foundation_dir: Path, experts_dir: Path,
                 out_dir: Path) -> dict[str, Any]:
    """Merge by every configured method, its coefficients by validation normalised score; write one bundle per
    method, the curve and summary.json. Every check runs before the first bundle is written."""
    fp, metric, seed = params.fusion, params.evaluate.primary_metric, params.pipeline.seed
    tasks = list(params.data.active_tasks(fp.modality))  # the stage skips fusion with fewer than 2
    if not tasks:
        raise ArtifactError(f"no experts to merge (empty expert list): no active {fp.modality} task")
    foundation = load_foundation(foundation_dir, fp.modality)
    experts = {t: load_expert(experts_dir / t, foundation) for t in tasks}
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

    heads = {t: TaskHead(e.head, e.manifest["task_kind"], e.manifest["label_names"]) for t, e in experts.items()}
    results: dict[str, Any] = {}
    for method, s in searched.items():
        chosen = {"lambda": s.coefficients.get("lam"), "coefficients": s.coefficients, "val_normalised": s.score,
                  "val_metrics": s.per_task, **({"seed": seed} if MERGE_METHODS[method].stochastic else {})}
        save_bundle(out_dir / method, foundation, s.delta, heads, name=f"fused-{fp.modality}-{method}", metadata={
            "method": method, **chosen, "lora_space": fp.lora_space, "tasks_merged": tasks,
            "single_val": scorer.single, "metric": metric,
        })
        results[method] = {**chosen, "grid": s.grid}
    curves = {m: best_per_lambda(s.grid, len(tasks)) for m, s in searched.items()}
    best_method = max(results, key=lambda m: _finite(results[m]["val_normalised"]))
    summary = {
        "modality": fp.modality, "tasks": tasks, "metric": metric, "methods": results, "best_method": best_method,
        "single_val": scorer.single, "curves": {m: [list(p) for p in c] for m, c in curves.items()},
        "lora_space": fp.lora_space, "seed": seed, "search_seconds": search_seconds,
    }
    chosen_lam = {m: s.coefficients.get("lam", 1.0 / len(tasks)) for m, s in searched.items()}
    plot_fusion_curve(curves, chosen_lam, f"normalised val {metric}", out_dir / "fusion_curve.png")
    write_json(out_dir / "summary.json", summary)
    return summary
