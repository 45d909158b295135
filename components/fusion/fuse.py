"""The fusion stage: merge one modality's experts into one backbone by every configured method, each method's
coefficients (λ; TIES' k; DARE's p) chosen by a grid search on validation data only.

Task vectors live in one of two spaces (``fusion.lora_space``):
- ``delta_w``: the dense update ΔW of every adapted weight (Expert.delta()), for every method with weights.
- ``adapter``: plain LoRA experts' adapter parameters, τ_t = (A_t − A0, B_t − B0) per layer, merged as the L-LoRA
  paper merges PEFT parameters; the merged model's ΔW per layer is s·B_merged·A_merged. Not linear in the task
  vectors (cross terms B_s·A_t; weight −1 does not negate, peft#3004): the comparison is the point of offering it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.artifacts import write_json
from components.config import LoraParams, Params
from components.data.datasets import load_split
from components.errors import ArtifactError, ParamsError
from components.evaluation.metrics import compute_metrics, normalised_score
from components.evaluation.plots import plot_fusion_curve
from components.experts.io import Expert, load_expert
from components.experts.lora import ADAPTER, attach_lora, delta_weights, lora_layers, lora_targets
from components.fusion.merge import MERGE_METHODS, TaskVector, check_compatible, coefficient_grid, merge
from components.models.bundle import TaskHead, add_delta, save_bundle
from components.models.classifier import Classifier
from components.models.foundation import Foundation, load_foundation
from components.training.data import labels_tensor
from components.training.inference import batched

log = logging.getLogger("medexperts")

Metrics = dict[str, dict[str, float]]
Scorer = Callable[[TaskVector], tuple[float, Metrics]]  # merged ΔW -> (normalised score, metrics per task)
ToDelta = Callable[[TaskVector], TaskVector]  # a merged task vector -> the ΔW the merged model adds


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

    def score(self, delta: TaskVector) -> tuple[float, Metrics]:
        """Normalised score: the mean over tasks of the merged model's metric / that task's expert's."""
        encoder = add_delta(copy.deepcopy(self.foundation.encoder), delta).eval()
        per_task = {}
        for task, expert in self.experts.items():
            per_task[task] = self._metrics(task, Classifier(encoder, expert.head))
        norm = [normalised_score(per_task[t][self.metric], self.single[t]) for t in self.experts]
        return float(sum(norm) / len(norm)), per_task


# --------------------------------------------------------------------------- checks
def _who(values: dict[str, Any]) -> str:
    """'a, b: x; c: y': which experts share which value, for the messages of conflicts."""
    groups: dict[str, list[str]] = {}
    for task, value in values.items():
        groups.setdefault(str(value), []).append(task)
    return "; ".join(f"{', '.join(tasks)}: {value}" for value, tasks in groups.items())


def check_same_start(experts: dict[str, Expert]) -> None:
    """Task vectors only add when the experts share a method and (L-LoRA) the same initial adapter φ0."""
    if not experts:
        raise ArtifactError("no experts to merge (empty expert list)")
    methods = {t: e.manifest["method"] for t, e in experts.items()}
    if len(set(methods.values())) > 1:
        raise ArtifactError(f"experts of different methods cannot be merged ({_who(methods)}); "
                            "train them with one experts.method")
    inits = {t: e.manifest.get("init_sha256") for t, e in experts.items()}
    if len(set(inits.values())) > 1:
        short = {t: (h or "none")[:12] for t, h in inits.items()}
        raise ArtifactError(f"L-LoRA experts start from different initialisations φ0 (hashes {_who(short)}); "
                            "train them with the same seed and LoRA settings")


def check_adapter_space(experts: dict[str, Expert], modality: str) -> None:
    """Adapter-space merging adds A and B entry by entry: plain LoRA experts with one rank, scale and target set,
    trained from the same seed (their shared A0 is rebuilt from it)."""
    other = {t: e.manifest["method"] for t, e in experts.items() if e.manifest["method"] != "lora"}
    if other:
        why = ("L-LoRA is linear in its adapter parameters, so its ΔW-space merge already is the merge in the "
               "linearized form" if set(other.values()) == {"llora"} else "they have no LoRA adapter")
        raise ParamsError(f"fusion.lora_space 'adapter' merges plain LoRA adapters (method 'lora'), but the experts "
                          f"are {_who(other)}: {why}; set fusion.lora_space: delta_w")
    def targets(e: Expert) -> list[str]:
        return sorted(e.manifest.get("targets") or lora_targets(LoraParams(**e.manifest["lora"]), modality))

    settings = {
        "rank": {t: e.manifest["lora"]["rank"] for t, e in experts.items()},
        "alpha": {t: e.manifest["lora"]["alpha"] for t, e in experts.items()},
        "target modules": {t: targets(e) for t, e in experts.items()},
        "seed (the initial A0)": {t: e.manifest.get("seed") for t, e in experts.items()},
    }
    unseeded = [t for t, s in settings["seed (the initial A0)"].items() if s is None]
    if unseeded:
        raise ArtifactError(f"experts {unseeded} record no seed, so their initial A0 cannot be rebuilt for "
                            "adapter-space merging; set fusion.lora_space: delta_w")
    for what, values in settings.items():
        if len(set(map(str, values.values()))) > 1:
            raise ArtifactError(f"adapter-space merging needs every LoRA expert to share its {what}, but they differ "
                                f"({_who(values)}); retrain them with the same experts.lora and pipeline.seed, or set "
                                "fusion.lora_space: delta_w (ΔW space allows different ranks)")


# --------------------------------------------------------------------------- task vector spaces
def _identity(delta: TaskVector) -> TaskVector:
    return delta


@torch.no_grad()
def shared_start_delta(expert: Expert) -> TaskVector:
    """ΔW(φ0) = s·B0·A0 of an L-LoRA expert's start, a constant in every expert's ΔW (φ0 is shared; checked).

    Only the jvp path can start from B0 ≠ 0 (continuing from a trained adapter); PEFT's init B0 = 0 makes it
    vanish, and then it is left out ({}). On the jvp path the wrapped layer's own A, B stay at φ0.
    """
    if expert.manifest["method"] != "llora" or expert.manifest.get("llora_path") != "jvp":
        return {}
    start = {k: layer.get_delta_weight(ADAPTER).detach().clone() for k, layer in lora_layers(expert.encoder).items()}
    return start if any(bool(v.any()) for v in start.values()) else {}


def delta_w_space(experts: dict[str, Expert]) -> tuple[list[TaskVector], ToDelta]:
    """ΔW task vectors (and how a merged one becomes the model's ΔW).

    L-LoRA: a linearized layer is exactly linear in δ = φ − φ0, ΔW_lin(δ) = ΔW(φ0) + J·δ, so merging
    ΔW_lin − ΔW(φ0) IS merging the linearized models' task vectors (exactly, for the linear methods; TIES and DARE
    trim or drop entries of ΔW, as they do for every expert method here). The constant ΔW(φ0) is taken out before
    merging and added once after, else λ·Σ would count it T·λ times.
    """
    vectors = [e.delta() for e in experts.values()]
    start = shared_start_delta(next(iter(experts.values())))
    if not start:
        return vectors, _identity
    vectors = [{k: v - start[k] for k, v in tv.items()} for tv in vectors]
    return vectors, lambda merged: {k: v + start[k] for k, v in merged.items()}


class AdapterSpace:
    """Plain LoRA experts in adapter space: τ_t = φ_t − φ0 with φ = (A, B) of every layer; ``to_delta`` maps a
    merged τ to ΔW(φ0 + τ) = s·B·A per layer (PEFT's get_delta_weight reshapes a conv's A (r, in, k, k) and
    B (out, r, 1, 1)).

    A plain LoRA expert does not store φ0: it is rebuilt as training built it, the foundation's LoRA at the
    experts' shared seed (train_expert seeds right before building, so every task starts from this φ0; B0 = 0).
    """

    def __init__(self, foundation: Foundation, manifest: dict[str, Any]) -> None:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
            torch.manual_seed(manifest["seed"])
            self.model = attach_lora(foundation.encoder, LoraParams(**manifest["lora"]), foundation.modality).eval()
        self.init = {k: p.detach().clone() for k, p in self.params(self.model).items()}

    @staticmethod
    def params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """A and B of every LoRA layer, named after the weight they adapt."""
        return {f"{key.removesuffix('.weight')}.lora_{ab}.weight": getattr(layer, f"lora_{ab}")[ADAPTER].weight
                for key, layer in lora_layers(model).items() for ab in ("A", "B")}

    def task_vector(self, expert: Expert) -> TaskVector:
        mine = self.params(expert.encoder)
        if mine.keys() != self.init.keys():
            raise ArtifactError(f"expert {expert.task!r} adapts other layers than its manifest's LoRA settings build")
        return {k: (p.detach() - self.init[k]).clone() for k, p in mine.items()}

    @torch.no_grad()
    def to_delta(self, merged: TaskVector) -> TaskVector:
        for k, p in self.params(self.model).items():
            p.copy_(self.init[k] + merged[k])
        return delta_weights(self.model)


def task_vectors(experts: dict[str, Expert], foundation: Foundation, space: str) -> tuple[list[TaskVector], ToDelta]:
    """The experts' task vectors in ``space`` (fusion.lora_space) and the map from a merged one to ΔW."""
    if space == "delta_w":
        return delta_w_space(experts)
    check_adapter_space(experts, foundation.modality)
    adapter = AdapterSpace(foundation, next(iter(experts.values())).manifest)
    return [adapter.task_vector(e) for e in experts.values()], adapter.to_delta


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


# --------------------------------------------------------------------------- the stage
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
