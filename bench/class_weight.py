"""Class-balanced vs plain losses on the real tasks: `medexperts bench class_weight [--work DIR]
[--image-foundation DIR]` -> bench/results/class_weight.json

What `class_weight: balanced` (components/training/balance.py, the default of every trainer, probe and federated
client) does to a model that is fitted to convergence: the frozen foundation's linear probe (`fit_probe`, the
experts stage's own, with its L2 picked on validation) on every task of the full profile found on disk, once with
`class_weight: none` (plain cross-entropy / BCE) and once `balanced`, same features, same splits (the data stage's
own, seed 42). Text: all-MiniLM-L6-v2 mean-pooled (128 tokens); image: the pre-trained image foundation
(--image-foundation: an image foundation folder the foundation stage or `bench image_foundation --work` wrote;
without it the image tasks are skipped). Reported per task: validation and test accuracy, macro-F1, AUROC, MCC of
both (medians over --seeds probe seeds: the L2 picked on validation depends on the probe's initialisation), and the
test macro-F1 change. DermaMNIST, when present, is the shared folder's JPEG-75 copy (not comparable to
published DermaMNIST figures).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, write_result

METRICS = ("accuracy", "macro_f1", "auroc", "mcc")
MODES = ("none", "balanced")


def _params(active: list[str] | None = None):  # noqa: ANN202
    from components.config import load_params

    return load_params(ROOT / "params", "full", {"data.active": active} if active else {})


def available() -> list[str]:
    from components.config import expand_env

    tasks = _params().data.tasks
    out = []
    for name, spec in tasks.items():
        path = Path(expand_env(spec.path))
        if (path if path.is_absolute() else ROOT / path).exists():
            out.append(name)
    return out


def setup(work: Path, tasks: list[str], image_foundation: Path | None) -> None:
    from components.core.layout import foundation_dir
    from components.nn.foundation import describe_text_foundation
    from components.stages.data import prepare_data
    from components.stages.foundation import copy_image_checkpoint

    params = _params(tasks)
    if not (work / "data" / "manifest.json").is_file():
        prepare_data(params.data, ROOT, work / "data", seed=params.pipeline.seed)
    if not (foundation_dir(work / "foundation", "text") / "manifest.json").is_file():
        describe_text_foundation(params.foundation, ROOT, foundation_dir(work / "foundation", "text"))
    if image_foundation is not None and not (foundation_dir(work / "foundation", "image") / "manifest.json").is_file():
        copy_image_checkpoint(image_foundation, foundation_dir(work / "foundation", "image"))


def one_task(work: Path, task: str, found: Any, seeds: list[int]) -> dict[str, Any]:
    import torch

    from components.config import ProbeParams
    from components.data.datasets import load_split
    from components.metrics.classification import compute_metrics
    from components.training.data import labels_tensor
    from components.training.inference import batched
    from components.training.probe import fit_probe

    feats, counts = {}, {}
    t0 = time.perf_counter()
    for split in ("train", "val", "test"):
        d = load_split(work / "data", task, split)
        with torch.no_grad():
            feats[split] = (batched(found.encoder, found.inputs(d.inputs), 256), labels_tensor(d.labels, d.kind))
        counts[split] = len(d)
    kind, width = d.kind, d.num_labels
    out: dict[str, Any] = {"kind": kind, "rows": counts, "feature_seconds": time.perf_counter() - t0}
    y = feats["train"][1]
    out["train_class_shares"] = (y.float().mean(0) if kind == "multilabel"
                                 else torch.bincount(y, minlength=width).float() / len(y)).tolist()
    for mode in MODES:
        runs = []
        for seed in seeds:  # the L2 picked on validation varies with the probe's initialisation: several seeds
            head, val = fit_probe(feats["train"], feats["val"], kind, width, ProbeParams(class_weight=mode),
                                  "macro_f1", seed)
            with torch.no_grad():
                test = compute_metrics(kind, head(feats["test"][0]), feats["test"][1], width)
            runs.append({"seed": seed, "l2": val["l2"], "val": {k: float(val[k]) for k in METRICS},
                         "test": {k: float(test[k]) for k in METRICS}})
        out[mode] = {"seeds": runs,
                     "val": {k: statistics.median(r["val"][k] for r in runs) for k in METRICS},
                     "test": {k: statistics.median(r["test"][k] for r in runs) for k in METRICS}}
    out["test_macro_f1_change"] = out["balanced"]["test"]["macro_f1"] - out["none"]["test"]["macro_f1"]
    out["test_macro_f1_change_per_seed"] = [b["test"]["macro_f1"] - n["test"]["macro_f1"]
                                            for b, n in zip(out["balanced"]["seeds"], out["none"]["seeds"], strict=True)]
    out["val_picks"] = max(MODES, key=lambda m: out[m]["val"]["macro_f1"])
    out["test_prefers"] = max(MODES, key=lambda m: out[m]["test"]["macro_f1"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench class_weight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for splits and foundations (default: a temporary one)")
    parser.add_argument("--image-foundation", type=Path,
                        help="an image foundation folder the foundation stage wrote (e.g. `bench image_foundation "
                             "--work DIR`'s DIR/resnet18/image)")
    parser.add_argument("--tasks", nargs="*", help="default: every full-profile task found on disk")
    parser.add_argument("--seeds", type=int, default=3, help="probe seeds per task and weighting (medians reported; "
                                                             "the first is the pipeline's seed)")
    args = parser.parse_args()

    from components.core.layout import foundation_dir
    from components.nn.foundation import load_foundation

    tasks = args.tasks or available()
    if args.image_foundation is None:
        skipped = [t for t in tasks if _params().data.tasks[t].modality == "image"]
        tasks = [t for t in tasks if t not in skipped]
        print(f"no --image-foundation: image tasks {skipped} skipped", flush=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="medexperts-bench-classweight-"))).resolve()
    first = _params().pipeline.seed
    seeds = [first + i for i in range(args.seeds)]
    t0 = time.perf_counter()
    setup(work, tasks, args.image_foundation)
    modality = {t: _params().data.tasks[t].modality for t in tasks}
    founds = {m: load_foundation(work / "foundation", m) for m in set(modality.values())}
    results = {}
    for task in tasks:
        results[task] = one_task(work, task, founds[modality[task]], seeds)
        r = results[task]
        print(f"{task}: test macro-F1 none {r['none']['test']['macro_f1']:.3f} balanced "
              f"{r['balanced']['test']['macro_f1']:.3f} ({r['test_macro_f1_change']:+.3f})", flush=True)
    changes = [r["test_macro_f1_change"] for r in results.values()]
    summary = {"median_test_macro_f1_change": statistics.median(changes),
               "mean_test_macro_f1_change": statistics.fmean(changes),
               "tasks_better_balanced": sum(c > 0 for c in changes), "tasks": len(changes),
               "validation_picked_the_better_on_test": sum(r["val_picks"] == r["test_prefers"]
                                                           for r in results.values())}
    image = None
    if args.image_foundation is not None:
        import json

        image = json.loads((foundation_dir(work / "foundation", "image") / "manifest.json").read_text())["config"]
    write_result("class_weight", {
        "params": {"profile": "full", "tasks": tasks, "probe": "fit_probe (experts.probe defaults)", "seeds": seeds,
                   "image_foundation": image, "derma_note": "dermamnist: the JPEG-75 copy" if "dermamnist" in tasks
                   else None},
        "tasks": results, "summary": summary, "wall_seconds": time.perf_counter() - t0})
    print(summary)


if __name__ == "__main__":
    main()
