"""The partial-linearization question (Tang et al., ICLR 2024) on medical text tasks: which expert method merges best?
`medexperts bench fusion [--work DIR]` -> bench/results/fusion.json

For full fine-tuning, LoRA (merged in ΔW space and over its adapter parameters A, B) and L-LoRA experts of the same
foundation on every available text task (shipped + Symptom2Disease and HoC when ../shared/data has them), the
fusion stage's own code (`fuse_experts`) merges all tasks, and every subset of 2 tasks, by every merge method; each
method's coefficients (λ, k, p) are picked on validation. Then on test: the merged model's metric per task, and the
normalised score (merged metric / that method's single-task expert metric), averaged over the merged tasks.
Also: merge time of all experts and the peak memory it adds, and latency of a merged-into-backbone model vs the base
model vs the un-merged adapter model.

Experts: `--work DIR` reuses the folder of a `medexperts bench experts --work DIR` run (its data, foundation and
`experts/<task>-<method>`); without it, the experts are trained here the same way (the quick profile's experts
stage, one process each).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, run_child, write_result

VARIANTS = {"full": ("full", "delta_w"), "lora": ("lora", "delta_w"), "lora_adapter": ("lora", "adapter"),
            "llora": ("llora", "delta_w")}
# λ down to 0.1: with 4 tasks merged the best λ sits near 1/4, and a first run with [0.3, 0.6, 1.0] picked the grid's
# edge (0.3) for most methods, so the optimum could lie below it.
GRIDS = {"fusion.lambdas": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0], "fusion.ks": [0.2], "fusion.ps": [0.5]}
# The authors' own result files (tanganke/peta; CLIP ViT-B/16, 7 vision tasks, all merged, task arithmetic, λ picked
# on test): normalised scores, and single-task accuracies, for orientation.
PAPER = {"source": "Tang et al., ICLR 2024 (tanganke/peta result files): CLIP ViT-B/16, 7 tasks, task arithmetic",
         "normalised": {"full": 0.79, "lora": 0.67, "llora": 0.83}, "single_task_accuracy": {"lora": 0.79, "llora": 0.67}}


def _params(profile: str, overrides: dict[str, Any]):  # noqa: ANN202
    from components.config import load_params

    return load_params(ROOT / "params", profile, overrides)


def merge_methods() -> list[str]:
    """Every registered merge method (components.fusion.merge.MERGE_METHODS), in registration order."""
    from components.fusion.merge import MERGE_METHODS

    return MERGE_METHODS.names()


def text_tasks(profile: str, tasks: list[str]) -> list[str]:
    params = _params(profile, {"data.active": tasks})
    return [t for t in tasks if params.data.tasks[t].modality == "text"]


def ensure_experts(work: Path, profile: str, tasks: list[str]) -> None:
    """Train whatever expert of (task, method) the work folder lacks, with bench.experts' own runner."""
    from bench.experts import setup
    from components.core.layout import MANIFEST

    if not (work / "data").is_dir():
        setup(work, profile, tasks)
    for task in text_tasks(profile, tasks):
        for method in ("lora", "llora", "full"):
            if not (work / "experts" / f"{task}-{method}" / MANIFEST).is_file():
                run_child("bench.experts", "quality", {"work": str(work), "profile": profile, "active": tasks,
                                                       "task": task, "method": method})


def test_scores(work: Path, folder: Path, tasks: list[str], cap: int, seed: int) -> dict[str, dict[str, float]]:
    from components.data.datasets import load_split
    from components.metrics.classification import compute_metrics
    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.training.data import labels_tensor
    from components.training.inference import batched

    bundle = load_bundle(folder)
    out = {}
    for task in tasks:
        test = load_split(work / "data", task, "test").subset(cap, seed)
        x, y = bundle.inputs(test.inputs), labels_tensor(test.labels, test.kind)
        out[task] = compute_metrics(test.kind, batched(bundle.model.for_task(task), x), y, test.num_labels)
    return out


def run_variant(work: Path, profile: str, all_tasks: list[str], variant: str, subsets: list[tuple[str, ...]],
                val_cap: int, test_cap: int) -> dict[str, Any]:
    from components.core.layout import expert_bundle, fused_bundle
    from components.stages.fusion import FusionInputs, fuse_experts

    method, space = VARIANTS[variant]
    single: dict[str, dict[str, float]] = {}
    out: dict[str, Any] = {}
    for subset in subsets:
        links = Path(tempfile.mkdtemp(prefix="experts-"))
        for task in subset:
            (links / task).symlink_to(work / "experts" / f"{task}-{method}")
        params = _params(profile, {"data.active": list(subset), "experts.method": method, "fusion.modality": "text",
                                   "fusion.methods": merge_methods(), "fusion.lora_space": space,
                                   "fusion.max_val_samples": val_cap, **GRIDS})
        fused = links / "fused"
        summary = fuse_experts(FusionInputs.from_params(params), work / "data", work / "foundation", links, fused)
        for task in subset:  # the single-task expert's deployed bundle, same test cap
            if task not in single:
                single[task] = test_scores(work, expert_bundle(work / "experts" / f"{task}-{method}"), [task],
                                           test_cap, params.pipeline.seed)[task]
        key = "+".join(subset)
        out[key] = {}
        for merge_method, r in summary.methods.items():
            scores = test_scores(work, fused_bundle(fused, merge_method), list(subset), test_cap, params.pipeline.seed)
            norm = [scores[t]["macro_f1"] / single[t]["macro_f1"] if single[t]["macro_f1"] > 0 else float("nan")
                    for t in subset]
            out[key][merge_method] = {"coefficients": r.coefficients, "val_normalised": r.val_normalised,
                                      "test": {t: scores[t]["macro_f1"] for t in subset},
                                      "test_normalised": sum(norm) / len(norm)}
        print(f"{variant:13s} {key:45s} " + "  ".join(f"{m} {v['test_normalised']:.3f}" for m, v in out[key].items()),
              flush=True)
    return {"subsets": out, "single_test": {t: s["macro_f1"] for t, s in single.items()}}


def merge_cost(work: Path, tasks: list[str], method: str) -> dict[str, float]:
    """Time and added peak memory of task arithmetic over every text expert's ΔW, and of TIES."""
    from components.experts.io import load_expert
    from components.fusion.merge import merge
    from components.metrics.memory import PeakMemory
    from components.nn.foundation import load_foundation

    found = load_foundation(work / "foundation", "text")
    experts = [load_expert(work / "experts" / f"{t}-{method}", found) for t in tasks]
    with PeakMemory("cpu") as mem:
        start = time.perf_counter()
        vectors = [e.delta() for e in experts]
        deltas_s = time.perf_counter() - start
        times = {}
        for name, kw in (("task_arithmetic", {"lam": 0.5}), ("ties", {"lam": 0.5, "k": 0.2})):
            start = time.perf_counter()
            merge(name, vectors, **kw)
            times[name] = time.perf_counter() - start
    return {"experts": len(tasks), "task_vector_seconds": deltas_s, **{f"{k}_seconds": v for k, v in times.items()},
            "added_peak_mb": mem.added_mb,
            "task_vector_mb": sum(v.numel() * v.element_size() for tv in vectors for v in tv.values()) / 2**20}


def latency(work: Path, task: str, repeats: int) -> dict[str, float]:
    """ms/sample (batch 1) of the base model, the merged-into-backbone LoRA expert and the un-merged adapter model."""
    from components.core.layout import expert_bundle
    from components.data.datasets import load_split
    from components.metrics.latency import measure_latency
    from components.experts.io import load_expert
    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.nn.classifier import Classifier
    from components.nn.foundation import load_foundation

    found = load_foundation(work / "foundation", "text")
    expert = load_expert(work / "experts" / f"{task}-lora", found)
    merged = load_bundle(expert_bundle(work / "experts" / f"{task}-lora")).model.for_task(task)
    models = {"base": Classifier(found.encoder, expert.head).eval(), "merged": merged, "adapter": expert.classifier()}
    x = found.inputs(load_split(work / "data", task, "test").subset(1, 0).inputs)
    rounds: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(3):  # alternate the models so load changes hit all three
        for name, model in models.items():
            rounds[name].append(measure_latency(lambda m=model: m(**x), n_samples=1, repeats=repeats)["ms_per_sample"])
    out = {k: statistics.median(v) for k, v in rounds.items()}
    out["merged_vs_base"] = out["merged"] / out["base"]
    out["adapter_vs_base"] = out["adapter"] / out["base"]
    return out


def main() -> None:
    from bench.experts import available_tasks

    parser = argparse.ArgumentParser(prog="medexperts bench fusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--work", type=Path, help="a `medexperts bench experts --work` folder to reuse "
                                                   "(default: train here)")
    parser.add_argument("--tasks", nargs="*", help="default: the shipped tasks + the optional ones found on disk")
    parser.add_argument("--val-cap", type=int, default=100, help="validation samples per task in the search")
    parser.add_argument("--test-cap", type=int, default=600, help="test samples per task")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()

    tasks = args.tasks or available_tasks(args.profile)
    # absolute: the experts are symlinked from a temporary folder, and child processes get it as a string
    work = (args.work or Path(tempfile.mkdtemp(prefix="medexperts-bench-fusion-"))).resolve()
    ensure_experts(work, args.profile, tasks)
    texts = text_tasks(args.profile, tasks)
    subsets = [tuple(texts)] + [c for c in itertools.combinations(texts, 2) if c != tuple(texts)]
    results = {v: run_variant(work, args.profile, tasks, v, subsets, args.val_cap, args.test_cap) for v in args.variants}

    methods = merge_methods()
    table: dict[str, dict[str, Any]] = {}
    all_key = "+".join(texts)
    for variant, r in results.items():
        pairs = [k for k in r["subsets"] if k != all_key] or [all_key]  # 2 tasks: "all" is the only pair
        table[variant] = {m: {"all_tasks_normalised": r["subsets"][all_key][m]["test_normalised"],
                              "pairs_mean_normalised": statistics.mean(r["subsets"][k][m]["test_normalised"] for k in pairs),
                              "all_tasks_absolute": statistics.mean(r["subsets"][all_key][m]["test"].values())}
                          for m in methods}
        table[variant]["single_task_mean"] = statistics.mean(r["single_test"].values())
    cost = {m: merge_cost(work, texts, m) for m in ("lora", "full")}
    lat = latency(work, texts[0], repeats=20)
    path = write_result("fusion", {
        "params": {"profile": args.profile, "tasks": texts, "variants": {k: list(v) for k, v in VARIANTS.items()},
                   "merge_methods": methods, "grids": GRIDS, "val_cap": args.val_cap, "test_cap": args.test_cap,
                   "metric": "macro_f1", "coefficients_chosen_on": "validation"},
        "results": results, "table": table, "merge_cost": cost, "latency_ms_per_sample": lat, "paper": PAPER,
    })
    print(json.dumps({"table": table, "merge_cost": cost, "latency": lat}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
