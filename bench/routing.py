"""AT-MoE (Li & Yao, arXiv 2410.10896) on the text tasks: routing frozen LoRA experts vs merging them vs each task's
own expert. `medexperts bench routing [--work DIR] [--profile quick]` -> bench/results/routing.json

On every available text task (the shipped ones, plus Symptom2Disease and HoC when $MEDEXPERTS_SHARED_DATA /
../shared/data has them), with the pipeline's own stage code and one data split:
- data + text foundation (the data stage's `prepare_data`, `describe_text_foundation`), one LoRA expert per task
  (the experts stage's `train_expert`, the profile's schedule; an existing `--work` folder's
  `experts/<task>-lora` are reused, the layout of `medexperts bench experts --work`);
- the fusion stage (`fuse_experts`) once, every merge method, coefficients on validation; its best method by
  validation is "fused";
- the routing stage (`components.stages.routing.run`) four times over the same frozen experts: router `uniform`
  (every expert 1/E, nothing trained), `flat` (one softmax over all experts per layer), and `grouped` (AT-MoE) with
  two groupings of the experts:
  * function (params/routing.yaml's default; what the task asks): question answering = PubMedQA; classification =
    Medical Abstracts, HoC; diagnosis = Symptom2Disease;
  * domain (what the text is and who wrote it; its vocabulary and register): clinical research literature =
    PubMedQA, Medical Abstracts (abstracts of clinical studies, disease-level vocabulary); molecular oncology = HoC
    (basic-science cancer-biology sentences: pathways, genes, cell lines); patient narratives = Symptom2Disease
    (lay, first-person symptom descriptions). It differs from the function grouping where it matters: Medical
    Abstracts sits with PubMedQA (same kind of text) instead of with HoC (same kind of output).
  The "grouped" row of the goals is the function grouping (the pipeline's default); the domain grouping is shown
  next to it.
- test metrics per task (compute_metrics: accuracy, macro-F1, AUROC, MCC; capped at --test-cap per task, same
  seeded subset for every model) of: the task's own expert (deployed bundle; the oracle: one-hot routing), the
  best fused model, the uniform mixture, the flat router, the grouped routers, and the grouped (function) router
  mixed with AT-MoE's optional general adapter (routing.general: one LoRA trained first on the mixed training set,
  same caps as the routers; then lambda * routed + (1 - lambda) * general, lambda learned per layer). Goals (the
  issue): grouped >= best fused on every task; mean(oracle) - mean(grouped) <= 2 macro-F1 points.
- layer analysis: every trained router's mean expert weights per layer (validation, the stage's
  routing_weights.json), the 12 adapted Linear layers (query, value) averaged into MiniLM's 6 layers, summed into
  the groups of both groupings. The paper's claim (lower layers prefer domain experts, upper layers function
  experts) is read as: for a task whose domain peers differ from its function peers, D - F = (weight on the
  experts of its domain group) - (weight on the experts of its function group) = domain peers - function peers (its
  own expert is in both and cancels) is larger in the lower half (layers 0-2) than in the upper half (3-5), and
  (strict form) positive below and negative above. Layer x group heatmaps are written to the work folder.
- held-out task (default Symptom2Disease, else HoC; skipped with a note when neither is available): the grouped
  (function) router trained over the experts of the other text tasks only; on the held-out task only a new head is
  fitted (components.training.probe.fit_probe, L2 by validation) on pooled features of the routed model, and
  likewise on the uniform mixture, on each single other expert and on the frozen foundation; test metrics.
- latency (components.metrics.latency.measure_latency; median of 3 rounds in which the models alternate) and peak
  memory (components.metrics.memory.PeakMemory: RSS the load and a forward add, each model in a fresh process) of
  the routed model (grouped, with and without the general adapter) vs the best fused model vs a single deployed
  expert, batch 1 and 64, CPU (and CUDA when present).

Capped for a 2-core CPU (every text is padded to 128 tokens, and a routed forward runs the foundation twice): expert
training as the profile says (quick: 800 texts per task, 3 epochs), router training --router-train-cap texts per task
(mixed) for --router-epochs epochs, validation --val-cap per task (fusion search, router monitoring and the weights),
test --test-cap per task (the same seeded rows for every model), the held-out task's head --held-out-train-cap texts.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, run_child, write_result

FUNCTION_GROUPS = {"question_answering": ["pubmedqa"], "classification": ["medical_abstracts", "hoc"],
                   "diagnosis": ["symptom2disease"]}
DOMAIN_GROUPS = {"clinical_literature": ["pubmedqa", "medical_abstracts"], "molecular_oncology": ["hoc"],
                 "patient_narratives": ["symptom2disease"]}
GROUPINGS = {"function": FUNCTION_GROUPS, "domain": DOMAIN_GROUPS}
# name -> (router, grouping, general adapter); "grouped" is AT-MoE with the pipeline's default (function) grouping;
# "grouped_general" adds AT-MoE's optional general adapter (routing.general: trained first on the mixed training
# set with the same caps as the routers, then λ·routed + (1 − λ)·general with λ learned)
ROUTERS = {"uniform": ("uniform", None, False), "flat": ("flat", None, False), "grouped": ("grouped", "function", False),
           "grouped_domain": ("grouped", "domain", False), "grouped_general": ("grouped", "function", True)}
METRICS = ("accuracy", "macro_f1", "auroc", "mcc")
HELD_OUT_ORDER = ("symptom2disease", "hoc")


def _params(profile: str, overrides: dict[str, Any]):  # noqa: ANN202
    from components.config import load_params

    return load_params(ROOT / "params", profile, overrides)


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in METRICS if k in metrics}


# --------------------------------------------------------------------------- data, foundation, experts
def text_tasks(profile: str, tasks: list[str] | None) -> list[str]:
    from bench.experts import available_tasks

    chosen = tasks or available_tasks(profile)
    params = _params(profile, {"data.active": chosen})
    return [t for t in chosen if params.data.tasks[t].modality == "text"]


def setup_text(work: Path, profile: str, tasks: list[str]) -> None:
    """The data stage's `prepare_data` (kept when the folder already has every task) and the text foundation."""
    from components.core.artifacts import read_manifest
    from components.core.layout import MANIFEST, foundation_dir
    from components.nn.foundation import describe_text_foundation
    from components.stages.data import prepare_data

    params = _params(profile, {"data.active": tasks})
    have = set()
    if (work / "data" / MANIFEST).is_file():
        have = set(read_manifest(work / "data", verify=False).get("tasks", {}))
    if not set(tasks) <= have:
        prepare_data(params.data, ROOT, work / "data", seed=params.pipeline.seed)
    if not (foundation_dir(work / "foundation", "text") / MANIFEST).is_file():
        describe_text_foundation(params.foundation, ROOT, foundation_dir(work / "foundation", "text"))


def ensure_experts(work: Path, profile: str, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """`experts/<task>-lora` for every task: the experts stage's `train_expert` where missing."""
    from components.core.artifacts import read_manifest
    from components.core.layout import MANIFEST
    from components.stages.experts import ExpertsInputs, train_expert

    out = {}
    for task in tasks:
        folder = work / "experts" / f"{task}-lora"
        if (folder / MANIFEST).is_file():
            manifest, trained = read_manifest(folder, kind="expert", verify=False), False
        else:
            params = _params(profile, {"data.active": tasks, "experts.method": "lora"})
            manifest, trained = train_expert(task, ExpertsInputs.from_params(params), work / "data",
                                             work / "foundation", folder), True
        out[task] = {"trained_here": trained, "train_samples": manifest["train_samples"],
                     "train_seconds": manifest["train_seconds"], "val": manifest["metrics"]["val"]}
        print(f"expert {task:18s} {'trained' if trained else 'reused '} val macro-F1 "
              f"{manifest['metrics']['val']['macro_f1']:.3f} ({manifest['train_seconds']:.0f} s)", flush=True)
    return out


def link_experts(work: Path, tasks: list[str], name: str) -> Path:
    """A stage-layout experts folder (``<task>/``) of symlinks to ``experts/<task>-lora``."""
    links = work / "routing-bench" / "experts" / name
    links.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        link = links / task
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((work / "experts" / f"{task}-lora").resolve())
    return links


# --------------------------------------------------------------------------- stages
def run_fusion(work: Path, profile: str, tasks: list[str], val_cap: int) -> tuple[Any, Path]:
    from bench.fusion import GRIDS
    from components.stages.fusion import FusionInputs, fuse_experts

    params = _params(profile, {"data.active": tasks, "experts.method": "lora", "fusion.modality": "text",
                               "fusion.lora_space": "delta_w", "fusion.max_val_samples": val_cap, **GRIDS})
    out = work / "routing-bench" / "fusion"
    summary = fuse_experts(FusionInputs.from_params(params), work / "data", work / "foundation",
                           link_experts(work, tasks, "all"), out)
    return summary, out


def run_router(work: Path, profile: str, tasks: list[str], name: str, router: str, grouping: str | None,
               train_cap: int, epochs: int, val_cap: int, links: str = "all",
               general: bool = False) -> tuple[Any, Path]:
    """The routing stage's own `run` with one router (and grouping, and the general adapter when ``general``);
    returns its summary and output folder."""
    from components.stages.routing import RoutingInputs, run

    groups = GROUPINGS[grouping or "function"]  # flat / uniform ignore the groups; they must still cover the tasks
    overrides = {"data.active": tasks, "routing.router": router, "routing.groups": groups,
                 "routing.trainer.max_train_samples": train_cap, "routing.trainer.max_epochs": epochs,
                 "routing.max_val_samples": val_cap, "routing.general.enabled": general}
    if general:
        overrides.update({"routing.general.enabled": True, "routing.general.trainer.max_train_samples": train_cap,
                          "routing.general.trainer.max_epochs": epochs})
    params = _params(profile, overrides)
    out = work / "routing-bench" / "routing" / name
    summary = run(RoutingInputs.from_params(params), work / "data", work / "foundation",
                  link_experts(work, tasks, links), out)
    if summary.skipped:
        raise SystemExit(f"routing stage skipped ({name}): {summary.skipped}")
    return summary, out


# --------------------------------------------------------------------------- scoring
def test_data(work: Path, tasks: list[str], cap: int, seed: int) -> dict[str, Any]:
    """Per task: the tokenised test subset (the same seeded rows for every model), labels, the split."""
    from components.data.datasets import load_split
    from components.nn.foundation import load_foundation
    from components.training.data import labels_tensor

    found = load_foundation(work / "foundation", "text")
    out = {}
    for t in tasks:
        d = load_split(work / "data", t, "test").subset(cap, seed)
        out[t] = (found.inputs(d.inputs), labels_tensor(d.labels, d.kind), d)
    return out


def score_bundle(folder: Path, data: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    from components.bundle.format import load_bundle
    from components.metrics.classification import compute_metrics
    from components.training.inference import batched

    model = load_bundle(folder).model.eval()
    out = {}
    for t in tasks:
        x, y, d = data[t]
        out[t] = _pick(compute_metrics(d.kind, batched(model.for_task(t), x), y, d.num_labels))
    return out


# --------------------------------------------------------------------------- layer analysis
def layer_index(name: str) -> int:
    m = re.search(r"layer\.(\d+)\.", name)
    if not m:
        raise ValueError(f"no transformer layer index in adapted layer name {name!r}")
    return int(m.group(1))


def per_layer(weights: dict[str, list[float]]) -> dict[int, list[float]]:
    """Adapted Linear layers (query, value, ...) averaged into their transformer layer."""
    acc: dict[int, list[list[float]]] = {}
    for name, w in weights.items():
        acc.setdefault(layer_index(name), []).append(w)
    return {i: [statistics.mean(col) for col in zip(*rows)] for i, rows in sorted(acc.items())}


def group_of(task: str, groups: dict[str, list[str]]) -> str:
    return next(g for g, members in groups.items() if task in members)


def layer_analysis(weights: dict[str, dict[str, list[float]]], experts: list[str]) -> dict[str, Any]:
    """Per task: expert and group weights (both groupings) per transformer layer, the lower vs upper half, and the
    domain-minus-function-peers reading of the paper's claim."""
    out: dict[str, Any] = {}
    for task, w in weights.items():
        layers = per_layer(w)
        idx = sorted(layers)
        half = len(idx) // 2
        lower, upper = idx[:half], idx[half:]
        rec: dict[str, Any] = {"experts": {i: dict(zip(experts, layers[i])) for i in idx},
                               "own_expert": {i: layers[i][experts.index(task)] for i in idx}, "groups": {}}
        for gname, groups in GROUPINGS.items():
            active = {g: [e for e in m if e in experts] for g, m in groups.items()}
            active = {g: m for g, m in active.items() if m}
            per = {i: {g: sum(layers[i][experts.index(e)] for e in m) for g, m in active.items()} for i in idx}
            low = {g: statistics.mean(per[i][g] for i in lower) for g in active}
            up = {g: statistics.mean(per[i][g] for i in upper) for g in active}
            rec["groups"][gname] = {"per_layer": per, "lower": low, "upper": up,
                                    "top_lower": max(low, key=low.get), "top_upper": max(up, key=up.get)}
        dom = set(DOMAIN_GROUPS[group_of(task, DOMAIN_GROUPS)]) & set(experts)
        fun = set(FUNCTION_GROUPS[group_of(task, FUNCTION_GROUPS)]) & set(experts)
        if dom != fun:
            d_minus_f = {i: sum(layers[i][experts.index(e)] for e in dom)
                         - sum(layers[i][experts.index(e)] for e in fun) for i in idx}
            low, up = statistics.mean(d_minus_f[i] for i in lower), statistics.mean(d_minus_f[i] for i in upper)
            rec["domain_minus_function"] = {"per_layer": d_minus_f, "lower": low, "upper": up,
                                            "domain_peers": sorted(dom - fun), "function_peers": sorted(fun - dom),
                                            "trend_holds": low > up, "strict_holds": low > 0 > up}
        out[task] = rec
    return out


def claim_verdict(analysis: dict[str, dict[str, Any]]) -> dict[str, Any]:
    informative = {t: r["domain_minus_function"] for t, r in analysis.items() if "domain_minus_function" in r}
    return {"tasks": sorted(informative), "trend_holds": {t: r["trend_holds"] for t, r in informative.items()},
            "strict_holds": {t: r["strict_holds"] for t, r in informative.items()},
            "trend_all": bool(informative) and all(r["trend_holds"] for r in informative.values()),
            "strict_all": bool(informative) and all(r["strict_holds"] for r in informative.values()),
            "top_group_changes": {g: {t: r["groups"][g]["top_lower"] != r["groups"][g]["top_upper"]
                                      for t, r in analysis.items()} for g in GROUPINGS}}


def heatmaps(analysis: dict[str, Any], name: str, folder: Path) -> list[str]:
    from components.metrics.plots import plot_heatmap

    paths = []
    for task, rec in analysis.items():
        for gname, g in rec["groups"].items():
            rows = sorted(g["per_layer"])
            cols = list(g["per_layer"][rows[0]])
            path = folder / f"{name}_{task}_{gname}_groups.png"
            plot_heatmap([[g["per_layer"][i][c] for c in cols] for i in rows], [f"layer {i}" for i in rows], cols,
                         f"{task}: {name} router, {gname} group weight per layer", path)
            paths.append(str(path))
    return paths


# --------------------------------------------------------------------------- held-out task
def held_out(work: Path, profile: str, tasks: list[str], task: str, train_cap: int, epochs: int, val_cap: int,
             test_cap: int, head_train_cap: int) -> dict[str, Any]:
    """Route over the experts of every other text task (grouped, function grouping), then fit only a head on the
    held-out task over the routed model's pooled features; the same head on each single expert, the uniform
    mixture and the frozen foundation."""
    import torch

    from components.bundle.format import load_bundle
    from components.core.layout import expert_bundle, routed_bundle
    from components.data.datasets import load_split
    from components.metrics.classification import compute_metrics
    from components.nn.foundation import load_foundation
    from components.training.data import labels_tensor
    from components.training.inference import batched
    from components.training.probe import fit_probe

    seen = [t for t in tasks if t != task]
    start = time.perf_counter()
    summary, out = run_router(work, profile, seen, "held_out", "grouped", "function", train_cap, epochs, val_cap,
                              links=f"without-{task}")
    router_seconds = time.perf_counter() - start
    params = _params(profile, {"data.active": tasks})
    seed, probe_params = params.pipeline.seed, params.experts.probe
    found = load_foundation(work / "foundation", "text")
    splits = {"train": load_split(work / "data", task, "train").subset(head_train_cap, seed),
              "val": load_split(work / "data", task, "val"),
              "test": load_split(work / "data", task, "test").subset(test_cap, seed)}
    x = {s: found.inputs(d.inputs) for s, d in splits.items()}
    y = {s: labels_tensor(d.labels, d.kind) for s, d in splits.items()}
    kind, width = splits["train"].kind, splits["train"].num_labels

    routed = load_bundle(routed_bundle(out)).model.encoder.eval()
    encoders: dict[str, Any] = {"routed_grouped": routed}
    for t in seen:
        encoders[f"expert:{t}"] = load_bundle(expert_bundle(work / "experts" / f"{t}-lora")).model.encoder.eval()
    encoders["foundation"] = found.encoder
    results: dict[str, Any] = {}
    for name, enc in [*encoders.items(), ("routed_uniform", None)]:
        t0 = time.perf_counter()
        if enc is None:  # the same routed model with every expert at 1/E (fixed routing)
            routed.fixed = torch.full((len(seen),), 1.0 / len(seen))
            enc = routed
        feats = {s: batched(enc, x[s]) for s in splits}
        routed.fixed = None
        head, val = fit_probe((feats["train"], y["train"]), (feats["val"], y["val"]), kind, width, probe_params,
                              "macro_f1", seed)
        with torch.no_grad():
            test = compute_metrics(kind, head(feats["test"]), y["test"], width)
        results[name] = {"val": _pick(val), "l2": val["l2"], "test": _pick(test),
                         "seconds": time.perf_counter() - t0}
        print(f"held-out {task}: {name:28s} head val macro-F1 {val['macro_f1']:.3f} test {test['macro_f1']:.3f}",
              flush=True)
    singles = [k for k in results if k.startswith("expert:")]
    by_val = max(singles, key=lambda k: results[k]["val"]["macro_f1"])
    by_test = max(singles, key=lambda k: results[k]["test"]["macro_f1"])
    routed_f1 = results["routed_grouped"]["test"]["macro_f1"]
    return {"task": task, "routed_over": seen, "groups": summary.groups, "router_train_seconds": summary.train_seconds,
            "router_run_seconds": router_seconds, "train_samples": len(splits["train"]),
            "val_samples": len(splits["val"]), "test_samples": len(splits["test"]), "heads": results,
            "best_single_by_val": by_val, "best_single_by_test": by_test,
            "routed_beats_best_single_by_val": routed_f1 > results[by_val]["test"]["macro_f1"],
            "routed_beats_best_single_by_test": routed_f1 > results[by_test]["test"]["macro_f1"],
            "routed_beats_foundation": routed_f1 > results["foundation"]["test"]["macro_f1"]}


# --------------------------------------------------------------------------- latency and memory
def _load_model(spec: dict[str, Any]) -> Any:
    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle

    bundle = load_bundle(Path(spec["path"]))
    return bundle.model.for_task(spec["task"]).eval(), bundle


def _batch(work: Path, task: str, n: int, found_inputs: Any) -> dict[str, Any]:
    from components.data.datasets import load_split

    d = load_split(work / "data", task, "test")
    texts = [d.inputs[i % len(d)] for i in range(n)]
    return found_inputs(texts)


def one_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Child process: RSS the load adds, then what a batch-1 and a batch-64 forward add (after one warm-up each)."""
    import torch

    from components.metrics.memory import PeakMemory

    device = spec["device"]
    with PeakMemory("cpu") as load:
        model, bundle = _load_model(spec)
    model.to(device)
    weight_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    out: dict[str, Any] = {"load_added_mb": load.added_mb, "weights_mb": weight_mb, "device": device}
    for n in spec["batches"]:
        x = {k: v.to(device) for k, v in _batch(Path(spec["work"]), spec["task"], n, bundle.inputs).items()}
        with PeakMemory(device) as mem, torch.inference_mode():
            model(**x)
        out[f"batch_{n}"] = {"added_mb": mem.added_mb, "peak_mb": mem.peak_mb, "kind": mem.kind}
    return out


def latency(work: Path, models: dict[str, Path], task: str, batches: list[int], rounds: int,
            device: str) -> dict[str, Any]:
    import torch

    from components.metrics.latency import measure_latency

    loaded = {name: _load_model({"path": str(p), "task": task}) for name, p in models.items()}
    inputs = {n: {k: v.to(device) for k, v in _batch(work, task, n, next(iter(loaded.values()))[1].inputs).items()}
              for n in batches}
    out: dict[str, Any] = {}
    for n in batches:
        times: dict[str, list[float]] = {name: [] for name in loaded}
        for _ in range(rounds):  # the models alternate, so a load change on the machine hits all of them
            for name, (model, _) in loaded.items():
                model.to(device)
                r = measure_latency(lambda m=model, x=inputs[n]: m(**x), n_samples=n,
                                    repeats=10 if n == 1 else 3, warmup=2 if n == 1 else 1)
                times[name].append(r["median_ms"])
        out[f"batch_{n}"] = {name: {"ms_per_batch": statistics.median(v), "ms_per_sample": statistics.median(v) / n,
                                    "rounds_ms": v} for name, v in times.items()}
        print(f"latency {device} batch {n:3d}: " + "  ".join(f"{k} {v['ms_per_batch']:.1f} ms"
                                                          for k, v in out[f"batch_{n}"].items()), flush=True)
    del loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def cost(work: Path, models: dict[str, Path], task: str, rounds: int) -> dict[str, Any]:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out: dict[str, Any] = {"task": task, "batches": [1, 64], "rounds": rounds, "models": {k: str(v.relative_to(work))
                                                                                       for k, v in models.items()}}
    for device in devices:
        mem = {name: run_child("bench.routing", "memory", {"work": str(work), "path": str(p), "task": task,
                                                            "batches": [1, 64], "device": device})
               for name, p in models.items()}
        lat = latency(work, models, task, [1, 64], rounds, device)
        for name, m in mem.items():
            print(f"memory {device} {name:8s} weights {m['weights_mb']:.0f} MB, load +{m['load_added_mb']:.0f} MB, "
                  f"batch 1 +{m['batch_1']['added_mb']:.0f} MB, batch 64 +{m['batch_64']['added_mb']:.0f} MB",
                  flush=True)
        out[device] = {"latency": lat, "memory": mem}
    return out


# --------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--work", type=Path, help="folder for data, foundation and experts (reused: its "
                                                   "experts/<task>-lora are not retrained); default: a new temporary "
                                                   "folder")
    parser.add_argument("--tasks", nargs="*", help="default: the shipped text tasks + the optional ones found")
    parser.add_argument("--held-out", help="the task left out of the routed experts (default: symptom2disease, "
                                           "else hoc, when present); 'none' skips the held-out part")
    parser.add_argument("--test-cap", type=int, default=500, help="test samples per task")
    parser.add_argument("--val-cap", type=int, default=64, help="validation samples per task (fusion search, "
                                                                "router monitoring, router weights)")
    parser.add_argument("--router-train-cap", type=int, default=200, help="router training samples per task")
    parser.add_argument("--router-epochs", type=int, default=2)
    parser.add_argument("--held-out-train-cap", type=int, default=400, help="training samples of the held-out "
                                                                            "task's new head")
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec, out = args.child
        if kind != "memory":
            raise SystemExit(f"unknown child kind {kind!r}")
        Path(out).write_text(json.dumps(one_memory(json.loads(spec))))
        return

    import components.plugins  # noqa: F401
    from components.core.layout import expert_bundle, fused_bundle, routed_bundle, routing_weights

    import os

    t_start, load_start = time.perf_counter(), os.getloadavg()
    phases: dict[str, float] = {}
    tasks = text_tasks(args.profile, args.tasks)
    if len(tasks) < 2:
        raise SystemExit(f"routing needs at least 2 text tasks; found {tasks}")
    work = (args.work or Path(tempfile.mkdtemp(prefix="medexperts-bench-routing-"))).resolve()
    print(f"work folder: {work}; text tasks: {tasks}", flush=True)
    setup_text(work, args.profile, tasks)
    t0 = time.perf_counter()
    experts = ensure_experts(work, args.profile, tasks)
    phases["experts"] = time.perf_counter() - t0
    params = _params(args.profile, {"data.active": tasks})
    seed = params.pipeline.seed

    t0 = time.perf_counter()
    fusion, fusion_out = run_fusion(work, args.profile, tasks, args.val_cap)
    phases["fusion"] = time.perf_counter() - t0
    print(f"fusion: best method by validation {fusion.best_method} {fusion.methods[fusion.best_method].coefficients}",
          flush=True)

    runs: dict[str, Any] = {}
    for name, (router, grouping, general) in ROUTERS.items():
        t0 = time.perf_counter()
        summary, out = run_router(work, args.profile, tasks, name, router, grouping, args.router_train_cap,
                                  args.router_epochs, args.val_cap, general=general)
        runs[name] = {"summary": summary, "out": out, "seconds": time.perf_counter() - t0}
        print(f"routing {name:15s} val macro-F1 mean {summary.val_mean():.3f} (train {summary.train_seconds:.0f} s, "
              f"run {runs[name]['seconds']:.0f} s)", flush=True)
    phases["routing"] = sum(r["seconds"] for r in runs.values())

    t0 = time.perf_counter()
    data = test_data(work, tasks, args.test_cap, seed)
    test: dict[str, dict[str, dict[str, float]]] = {"oracle": {}}
    for t in tasks:
        test["oracle"].update(score_bundle(expert_bundle(work / "experts" / f"{t}-lora"), data, [t]))
    test["fused"] = score_bundle(fused_bundle(fusion_out, fusion.best_method), data, tasks)
    for name, r in runs.items():
        test[name] = score_bundle(routed_bundle(r["out"]), data, tasks)
    phases["test_scoring"] = time.perf_counter() - t0
    models = list(test)
    per_task = {t: {m: test[m][t] for m in models} for t in tasks}
    for t in tasks:
        print(f"test {t:18s} " + "  ".join(f"{m} {per_task[t][m]['macro_f1']:.3f}" for m in models), flush=True)
    mean = {m: statistics.mean(test[m][t]["macro_f1"] for t in tasks) for m in models}

    def goals(name: str) -> dict[str, Any]:
        beats = {t: test[name][t]["macro_f1"] >= test["fused"][t]["macro_f1"] for t in tasks}
        gap = mean["oracle"] - mean[name]
        return {"ge_fused_per_task": beats, "ge_fused_every_task": all(beats.values()),
                "oracle_gap_points": 100 * gap, "within_2_points_of_oracle": gap <= 0.02}

    analysis = {}
    plots = work / "routing-bench" / "plots"
    for name, r in runs.items():
        if name == "uniform":
            continue
        weights = json.loads(routing_weights(r["out"]).read_text())
        a = layer_analysis(weights, r["summary"].experts)
        analysis[name] = {"layers": a, "verdict": claim_verdict(a), "heatmaps": heatmaps(a, name, plots)}

    t0 = time.perf_counter()
    choice = args.held_out or next((t for t in HELD_OUT_ORDER if t in tasks), None)
    if choice in (None, "none"):
        held = {"skipped": f"no optional task to hold out among {tasks} (Symptom2Disease / HoC need "
                           "$MEDEXPERTS_SHARED_DATA or ../shared/data)"}
    elif choice not in tasks:
        raise SystemExit(f"--held-out {choice!r} is not among the text tasks {tasks}")
    elif len(tasks) < 3:
        held = {"skipped": f"holding out {choice} leaves fewer than 2 experts to route"}
    else:
        held = held_out(work, args.profile, tasks, choice, args.router_train_cap, args.router_epochs, args.val_cap,
                        args.test_cap, args.held_out_train_cap)
        held["own_expert_test"] = test["oracle"][choice]  # reference: an expert trained on the task itself
    phases["held_out"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    lat_task = "medical_abstracts" if "medical_abstracts" in tasks else tasks[0]
    costs = cost(work, {"routed_general": routed_bundle(runs["grouped_general"]["out"]),
                        "routed": routed_bundle(runs["grouped"]["out"]),
                        "merged": fused_bundle(fusion_out, fusion.best_method),
                        "expert": expert_bundle(work / "experts" / f"{lat_task}-lora")}, lat_task, args.latency_rounds)
    phases["latency"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start

    routing_runs = {name: {"router": r["summary"].router, "groups": r["summary"].groups,
                           "experts": r["summary"].experts, "val": {t: _pick(v) for t, v in r["summary"].val.items()},
                           "val_oracle": {t: _pick(v) for t, v in r["summary"].val_oracle.items()},
                           "val_uniform": {t: _pick(v) for t, v in r["summary"].val_uniform.items()},
                           "val_general": {t: _pick(v) for t, v in r["summary"].val_general.items()},
                           "lam": r["summary"].lam,
                           "trainable_params": r["summary"].trainable_params,
                           "train_seconds": r["summary"].train_seconds, "run_seconds": r["seconds"],
                           "weights": json.loads(routing_weights(r["out"]).read_text())}
                    for name, r in runs.items()}
    profile_params = params.experts.trainer.text
    path = write_result("routing", {
        "params": {"profile": args.profile, "tasks": tasks, "metric": "macro_f1", "routers": ROUTERS,
                   "groupings": GROUPINGS, "test_cap": args.test_cap, "val_cap": args.val_cap,
                   "router_train_cap": args.router_train_cap, "router_epochs": args.router_epochs,
                   "router_lr": params.routing.trainer.lr, "router_batch_size": params.routing.trainer.batch_size,
                   "general": {"rank": params.routing.general.rank, "lam_start": params.routing.general.lam,
                               "learn_lam": params.routing.general.learn_lam, "lr": params.routing.general.trainer.lr,
                               "batch_size": params.routing.general.trainer.batch_size},
                   "expert_train_cap": profile_params.max_train_samples, "expert_epochs": profile_params.max_epochs,
                   "max_length": params.foundation.text.max_length, "latency_rounds": args.latency_rounds,
                   "held_out_train_cap": args.held_out_train_cap,
                   "test_samples": {t: len(data[t][2]) for t in tasks}, "seed": seed},
        "experts": experts,
        "fusion": {"best_method": fusion.best_method, "coefficients": fusion.methods[fusion.best_method].coefficients,
                   "val_normalised": {m: r.val_normalised for m, r in fusion.methods.items()},
                   "search_seconds": fusion.search_seconds},
        "routing_runs": routing_runs,
        "test": per_task, "test_mean_macro_f1": mean,
        "goals": {name: goals(name) for name in runs},
        "layer_analysis": analysis, "held_out": held, "cost": costs,
        "wall_seconds": wall, "phase_seconds": phases,
        # other jobs shared the 2 cores: the 1-minute load average at the start and at the end of the run
        "load_average": {"start": load_start[0], "end": os.getloadavg()[0]},
    })
    print(json.dumps({"test_mean_macro_f1": mean, "goals": {n: goals(n) for n in runs if n.startswith("grouped")},
                      "wall_seconds": wall}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
