"""Every expert method on every task, next to the frozen-foundation linear probe; and the per-step cost and
memory of each method. `medexperts bench experts [--profile quick]` -> bench/results/experts.json

Quality: for every task (the shipped ones, plus Symptom2Disease and HoC when ../shared/data has them) and every
method that applies (soft prompts are text-only), the experts stage's own training (`train_expert`, the quick
profile's schedules) in a fresh process, then the deployed bundle and the probe on the test split. Per run:
test metrics, trainable parameters, stored expert bytes, training seconds, the process's peak RSS.

Step cost: one fixed batch (text: 16 x 128 tokens on all-MiniLM-L6-v2; image: 64 images on the profile's
image foundation; LoRA with the profile's targets), AdamW, warm-up then timed steps; median step time, and the
memory a training step adds over the built model (grads, optimiser state, activations: peak RSS on CPU, peak
allocated on GPU). Each method runs in its own process so one method's freed memory cannot hide another's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (MEDMNIST_ANCHORS, MEDMNIST_SOURCE, ROOT, parse_sets, run_child, time_training_steps,
                          write_result)

METHODS = {"image": ["lora", "llora", "full"], "text": ["lora", "llora", "prompt", "full"]}
STEP_CASES = {"image": [("lora", "auto"), ("llora", "frozen_a"), ("llora", "jvp"), ("full", "auto")],
              "text": [("lora", "auto"), ("llora", "frozen_a"), ("llora", "jvp"), ("prompt", "auto"), ("full", "auto")]}
METRICS = ("accuracy", "macro_f1", "auroc", "mcc")
# Published anchors (facts, with sources) the README puts next to the table.
ANCHORS = {
    **{t: {"source": MEDMNIST_SOURCE, **MEDMNIST_ANCHORS[t]} for t in ("pneumoniamnist", "breastmnist")},
    "pubmedqa": {"source": "BLURB (Gu et al., 2021), reasoning-required accuracy: BioBERT 68.1, "
                           "PubMedBERT ~55.8; human 78.0 (Jin et al., 2019)",
                 "accuracy": {"biobert": 0.681, "pubmedbert": 0.558, "human": 0.78}},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _params(profile: str, overrides: dict[str, Any]):  # noqa: ANN202
    from components.config import load_params

    return load_params(ROOT / "params", profile, overrides)


# --------------------------------------------------------------------------- one quality run (child process)
def one_quality(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from components.core.layout import expert_bundle
    from components.data.datasets import load_split
    from components.metrics.counts import count_parameters
    from components.metrics.classification import compute_metrics
    from components.experts.io import load_expert, stored_bytes
    from components.stages.experts import ExpertsInputs, train_expert
    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.nn.classifier import Classifier
    from components.nn.foundation import load_foundation
    from components.training.data import labels_tensor
    from components.training.inference import batched

    work, task, method = Path(spec["work"]), spec["task"], spec["method"]
    params = _params(spec["profile"], {**spec.get("overrides", {}), "data.active": spec["active"],
                                       "experts.method": method,
                                       "experts.image_method": "lora" if method == "prompt" else method})
    out = work / "experts" / f"{task}-{method}"
    start = time.perf_counter()
    manifest = train_expert(task, ExpertsInputs.from_params(params), work / "data", work / "foundation", out)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    test = load_split(work / "data", task, "test")
    found = load_foundation(work / "foundation", test.modality)
    x, y = found.inputs(test.inputs), labels_tensor(test.labels, test.kind)
    deployed = load_bundle(expert_bundle(out)).model.for_task(task)
    expert = load_expert(out, found)
    with torch.no_grad():
        expert_m = compute_metrics(test.kind, batched(deployed, x), y, test.num_labels)
        probe_m = compute_metrics(test.kind, batched(Classifier(found.encoder, expert.probe_head), x), y, test.num_labels)
    return {"task": task, "method": method, "modality": test.modality, "test": {k: expert_m[k] for k in METRICS},
            "probe_test": {k: probe_m[k] for k in METRICS}, "val": manifest["metrics"]["val"],
            "trainable_params": manifest["trainable_params"],
            "foundation_params": count_parameters(found.encoder), "stored_bytes": stored_bytes(out),
            "train_seconds": manifest["train_seconds"], "run_seconds": seconds, "peak_rss_mb": peak,
            "train_memory_mb": manifest["train_peak_memory_mb"],
            "train_samples": manifest["train_samples"], "test_samples": len(test)}


# --------------------------------------------------------------------------- one step-cost run (child process)
def one_step(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from components.config import ExpertsParams, PromptParams
    from components.experts.methods import get_method
    from components.nn.classifier import Classifier, make_head
    from components.nn.foundation import load_foundation
    from components.training.module import task_loss

    modality, method, path = spec["modality"], spec["method"], spec["path"]
    found = load_foundation(Path(spec["work"]) / "foundation", modality)
    rng = np.random.default_rng(0)
    if modality == "text":
        words = "patient presents with fever cough chest pain and shortness of breath after surgery".split()
        texts = [" ".join(rng.choice(words, 200)) for _ in range(16)]  # long enough to fill 128 tokens
        x = found.inputs(texts)
    else:
        x = found.inputs(rng.integers(0, 256, size=(64, 28, 28), dtype=np.uint8))
    y = torch.as_tensor(rng.integers(0, 3, size=len(next(iter(x.values())))))
    # the profile's LoRA targets: the full profile's ResNet names its convs conv1/conv2, the quick CNN's are conv
    lora = _params(spec["profile"], spec["overrides"]).experts.lora
    ep = ExpertsParams(method=method, llora_path=path, lora=lora, prompt=PromptParams(init="random"))
    torch.manual_seed(0)
    model = Classifier(get_method(method).build(found, ep, ""), make_head(found.encoder.out_dim, 3)).train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    x, y = {k: v.to(device) for k, v in x.items()}, y.to(device)
    cost = time_training_steps(model, lambda: task_loss("multiclass", model(**x), y), device, spec["warmup"],
                               spec["steps"])
    return {"modality": modality, "method": method, "path": path, **cost, "batch": len(y)}


# --------------------------------------------------------------------------- driver
def setup(work: Path, profile: str, active: list[str], image_foundation: Path | None = None) -> None:
    """The data and foundation stages' own code into ``work/data`` and ``work/foundation/<modality>``; the image
    foundation is pre-trained, or ``image_foundation`` (a folder the foundation stage wrote) is used as it is."""
    from components.core.artifacts import read_manifest
    from components.core.errors import DataError
    from components.core.layout import MANIFEST, foundation_dir
    from components.nn.foundation import describe_text_foundation
    from components.data.datasets import DATA_KIND
    from components.stages.data import params_hash, prepare_data
    from components.stages.foundation import FoundationInputs, copy_image_checkpoint, pretrain_image_foundation

    params = _params(profile, {"data.active": active})
    data_dir = work / "data"
    if (data_dir / MANIFEST).exists():  # a --work folder used before: its data, if prepared the same way
        made = read_manifest(data_dir, kind=DATA_KIND)
        if made.get("params_hash") != params_hash(params.data) or made.get("seed") != params.pipeline.seed:
            raise DataError(f"{data_dir} holds data prepared for other tasks or params (tasks: "
                            f"{sorted(made.get('tasks', {}))}); give a new --work folder")
    elif data_dir.exists():
        raise DataError(f"{data_dir} has no {MANIFEST}: left by an interrupted run; delete it or give a new --work")
    else:
        prepare_data(params.data, ROOT, data_dir, seed=params.pipeline.seed)
    describe_text_foundation(params.foundation, ROOT, foundation_dir(work / "foundation", "text"))
    if image_foundation is not None:
        copy_image_checkpoint(image_foundation, foundation_dir(work / "foundation", "image"))
    elif any(params.data.tasks[t].modality == "image" for t in active):  # text tasks only: no image foundation
        pretrain_image_foundation(FoundationInputs.from_params(params), work / "data",
                                  foundation_dir(work / "foundation", "image"))


def available_tasks(profile: str) -> list[str]:
    from components.config import expand_env

    params = _params(profile, {})
    out = []
    for name, spec in params.data.tasks.items():
        path = Path(expand_env(spec.path))
        if name in params.data.active or (spec.optional and (path if path.is_absolute() else ROOT / path).exists()):
            out.append(name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench experts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--tasks", nargs="*", help="default: the shipped tasks + the optional ones found on disk")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method and round (step cost)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the step-cost part (median reported)")
    parser.add_argument("--skip-quality", action="store_true", help="step cost only")
    parser.add_argument("--methods", nargs="*", help="expert methods to train (default: every method that applies)")
    parser.add_argument("--image-foundation", type=Path,
                        help="an image foundation folder the foundation stage wrote (e.g. `bench image_foundation "
                             "--work DIR`'s DIR/resnet18/image), used instead of pre-training one")
    parser.add_argument("--result", default="experts", help="results file name (bench/results/NAME.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a param changed for the experts' training (YAML value), e.g. "
                             "experts.trainer.image.max_epochs=10; recorded in the result")
    parser.add_argument("--work", type=Path, help="folder for data, foundation and experts (kept: `medexperts "
                                                   "bench fusion --work` reuses it); default: a new temporary folder")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec, out = args.child
        result = (one_quality if kind == "quality" else one_step)(json.loads(spec))
        Path(out).write_text(json.dumps(result))
        return

    overrides = parse_sets(parser, args.overrides)
    tasks = args.tasks or available_tasks(args.profile)
    work = (args.work or Path(tempfile.mkdtemp(prefix="medexperts-bench-experts-"))).resolve()
    if not (work / "data" / "manifest.json").is_file():  # a rerun on the same --work reuses data and foundation
        setup(work, args.profile, tasks, args.image_foundation.resolve() if args.image_foundation else None)
    print(f"work folder: {work}", flush=True)
    params = _params(args.profile, {"data.active": tasks})
    runs = []
    for task in [] if args.skip_quality else tasks:
        modality = params.data.tasks[task].modality
        for method in [m for m in METHODS[modality] if not args.methods or m in args.methods]:
            r = run_child("bench.experts", "quality", {"work": str(work), "profile": args.profile, "active": tasks,
                                                       "task": task, "method": method, "overrides": overrides})
            runs.append(r)
            print(f"{task:18s} {method:7s} test macro-F1 {r['test']['macro_f1']:.3f} (probe "
                  f"{r['probe_test']['macro_f1']:.3f})  trainable {r['trainable_params']:>9,d}  "
                  f"{r['stored_bytes'] / 1024:9.1f} KB  {r['train_seconds']:6.1f} s  peak {r['peak_rss_mb']:.0f} MB",
                  flush=True)
    # Methods alternate within each round (a load change on the machine hits all of them), median over rounds.
    rounds: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for modality, cases in STEP_CASES.items():
            for method, path in cases:
                r = run_child("bench.experts", "step", {"work": str(work), "modality": modality, "method": method,
                                                        "path": path, "warmup": 3, "steps": args.steps,
                                                        "profile": args.profile, "overrides": overrides})
                rounds.setdefault((modality, method, path), []).append(r)
    steps = []
    for runs_of_case in rounds.values():
        r = {**runs_of_case[0], "step_ms": statistics.median(x["step_ms"] for x in runs_of_case),
             "train_memory_mb": statistics.median(x["train_memory_mb"] for x in runs_of_case),
             "step_ms_rounds": [x["step_ms"] for x in runs_of_case]}
        steps.append(r)
        print(f"step {r['modality']:5s} {r['method']:6s} {r['path']:8s} {r['step_ms']:8.1f} ms  "
              f"+{r['train_memory_mb']:.0f} MB", flush=True)

    def ratio(modality: str, num: tuple[str, str], den: tuple[str, str], key: str) -> float | None:
        pick = {(s["method"], s["path"]): s[key] for s in steps if s["modality"] == modality}
        return pick[num] / pick[den] if num in pick and den in pick and pick[den] else None

    figures = {m: {"llora_frozen_a_step_vs_lora": ratio(m, ("llora", "frozen_a"), ("lora", "auto"), "step_ms"),
                   "llora_jvp_step_vs_lora": ratio(m, ("llora", "jvp"), ("lora", "auto"), "step_ms"),
                   "lora_memory_vs_full": ratio(m, ("lora", "auto"), ("full", "auto"), "train_memory_mb"),
                   "prompt_memory_vs_full": ratio(m, ("prompt", "auto"), ("full", "auto"), "train_memory_mb"),
                   "prompt_step_vs_lora": ratio(m, ("prompt", "auto"), ("lora", "auto"), "step_ms")}
               for m in STEP_CASES}
    wins = {r["task"] + ":" + r["method"]: r["test"]["macro_f1"] > r["probe_test"]["macro_f1"] for r in runs}
    image = None
    if (work / "foundation" / "image" / "manifest.json").is_file():
        image = json.loads((work / "foundation" / "image" / "manifest.json").read_text()).get("config")
    path = write_result(args.result, {
        "params": {"profile": args.profile, "tasks": tasks, "methods": METHODS, "timed_steps": args.steps,
                   "rounds": args.rounds, "only_methods": args.methods, "image_foundation": image,
                   "overrides": overrides,
                   "primary_metric": "macro_f1"},
        "runs": runs, "step_cost": steps, "figures": figures, "beats_probe": wins, "anchors": ANCHORS,
    })
    print(json.dumps(figures, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
