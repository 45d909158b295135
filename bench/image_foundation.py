"""The image foundation over four imaging modalities: the compact CNN vs ResNet-18, beside the simple baselines and
MedMNIST v2's published ResNet-18. `medexperts bench image_foundation [--epochs 10] [--work DIR]`
-> bench/results/image_foundation.json

Tasks: chest X-ray (PneumoniaMNIST), breast ultrasound (BreastMNIST), retinal fundus (RetinaMNIST, 5 grades) and,
when the shared folder has it, dermatoscopy (DermaMNIST's JPEG-75 copy: official splits and labels, pixels decoded
from JPEG, so its figures are NOT comparable to published DermaMNIST numbers). The data stage's own code writes
the official splits (seed 42). Each arch is pre-trained by the foundation stage's own function
(`pretrain_image_foundation`: multi-task, one head per task, mixed batches, the full profile's trainer settings,
--epochs epochs, the checkpoint with the best validation loss kept) on every task's whole training split, then its
pre-training heads are scored on each test split with the evaluate stage's `compute_metrics`: accuracy and AUROC
(MedMNIST's two metrics) and macro-F1 and MCC. The archs:

- `cnn`: the quick profile's compact CNN (`foundation.image.channels`, 3 conv blocks);
- `resnet18`: the full profile's ResNet-18 adapted to 28 px (3x3 stem, no max-pool; GroupNorm, see
  components/nn/resnet.py), 11.2M parameters.

Beside them, on the same splits: the strongest simple baseline (bench/baselines.py's pixel logistic regression and
small CNN on every training row, hyper-parameters on validation; --cnn-seeds seeds) and the published anchor
(MedMNIST v2, Yang et al. 2023, Table: ResNet-18 (28), test ACC / AUC; their ResNet trains 100 epochs per task,
alone, with BatchNorm).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MEDMNIST_ANCHORS, ROOT, parse_sets, write_result

IMAGE_TASKS = ("pneumoniamnist", "breastmnist", "retinamnist", "dermamnist")
ANCHORS = MEDMNIST_ANCHORS
ARCHS = {"cnn": {"foundation.image.arch": "cnn", "experts.lora.image_targets": ["conv"]},
         "resnet18": {"foundation.image.arch": "resnet", "foundation.image.widths": [64, 128, 256, 512],
                      "foundation.image.blocks": 2}}
METRICS = ("accuracy", "auroc", "macro_f1", "mcc")
DERMA_NOTE = ("dermamnist is the JPEG-75 copy of the shared folder (official splits and labels, pixels decoded from "
              "JPEG): not comparable to the published DermaMNIST figures")


def available(tasks: tuple[str, ...]) -> list[str]:
    from components.config import expand_env, load_params

    spec = load_params(ROOT / "params", "full").data.tasks
    out = []
    for task in tasks:
        path = Path(expand_env(spec[task].path))
        if (path if path.is_absolute() else ROOT / path).is_file():
            out.append(task)
    return out


def score_foundation(work: Path, arch: str, tasks: list[str]) -> dict[str, Any]:
    """Test (and validation) metrics of a pre-trained foundation's own heads."""
    import torch

    from components.data.datasets import load_split
    from components.metrics.classification import compute_metrics
    from components.nn.foundation import load_foundation, load_image_heads
    from components.training.data import labels_tensor
    from components.training.inference import batched

    folder = work / arch
    found = load_foundation(folder, "image")
    heads = load_image_heads(folder, found)
    out: dict[str, Any] = {}
    for task in tasks:
        out[task] = {}
        for split in ("val", "test"):
            data = load_split(work / "data", task, split)
            with torch.no_grad():
                logits = batched(lambda **x: heads[task](found.encoder(**x)),  # noqa: B023 - called right here
                                 found.inputs(np.asarray(data.inputs)), 256)
            m = compute_metrics(data.kind, logits, labels_tensor(data.labels, data.kind), data.num_labels)
            out[task][split] = {k: float(m[k]) for k in METRICS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench image_foundation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="pre-training epochs of each arch")
    parser.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--tasks", nargs="*", help="default: the four image tasks found on disk")
    parser.add_argument("--work", type=Path, help="folder for the splits and foundations (default: a temporary one)")
    parser.add_argument("--cnn-seeds", type=int, default=1, help="seeds of the small-CNN baseline")
    parser.add_argument("--cnn-epochs", type=int, default=15)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a param changed for every arch's pre-training (YAML value), e.g. "
                             "foundation.image.trainer.class_weight=none; recorded in the result")
    parser.add_argument("--result", default="image_foundation", help="results file name (bench/results/NAME.json)")
    args = parser.parse_args()

    import torch

    from bench.baselines import run_task
    from components.config import load_params
    from components.core.layout import foundation_dir
    from components.stages.data import prepare_data
    from components.stages.foundation import FoundationInputs, pretrain_image_foundation

    tasks = args.tasks or available(IMAGE_TASKS)
    work = (args.work or Path(tempfile.mkdtemp(prefix="medexperts-bench-imagefound-"))).resolve()
    t0 = time.perf_counter()
    overrides = parse_sets(parser, args.overrides)
    base = {"data.active": tasks, "foundation.image.trainer.max_epochs": args.epochs, **overrides}
    params = load_params(ROOT / "params", "full", {**base, **ARCHS["resnet18"]})
    if not (work / "data" / "manifest.json").is_file():
        prepare_data(params.data, ROOT, work / "data", seed=params.pipeline.seed)
    archs: dict[str, Any] = {}
    for arch in args.archs:
        p = load_params(ROOT / "params", "full", {**base, **ARCHS[arch]})
        out = foundation_dir(work / arch, "image")
        start = time.perf_counter()
        if not (out / "manifest.json").is_file():  # a rerun on the same --work scores what is there
            pretrain_image_foundation(FoundationInputs.from_params(p), work / "data", out)
        manifest = json.loads((out / "manifest.json").read_text())
        archs[arch] = {"config": manifest["config"], "parameters": manifest["parameters"],
                       "train_seconds": manifest.get("train_seconds", time.perf_counter() - start),
                       "train_samples": manifest["train_samples"],
                       "trainer": p.foundation.image.trainer.model_dump(), "tasks": score_foundation(work, arch, tasks)}
        print(f"{arch}: {manifest['parameters'] / 1e6:.2f}M parameters, {archs[arch]['train_seconds'] / 60:.1f} min; "
              + "  ".join(f"{t} acc {m['test']['accuracy']:.3f} auc {m['test']['auroc']:.3f}"
                          for t, m in archs[arch]["tasks"].items()), flush=True)
    baselines = {}
    if not args.no_baselines:
        for task in tasks:
            baselines[task] = run_task(work / "data", task, None, params.pipeline.seed, args.cnn_seeds,
                                       args.cnn_epochs)["expert_rows"]
    write_result(args.result, {
        "params": {"epochs": args.epochs,
                   "overrides": overrides, "tasks": tasks, "seed": params.pipeline.seed, "archs": args.archs,
                   "cnn_seeds": args.cnn_seeds, "cnn_epochs": args.cnn_epochs, "torch_threads": torch.get_num_threads(),
                   "selection": "checkpoint with the best validation loss; baselines by validation macro-F1"},
        "archs": archs, "baselines": baselines,
        "anchors": {"source": "MedMNIST v2 (Yang et al., Scientific Data 2023), ResNet-18 (28), test ACC / AUC",
                    "tasks": {t: ANCHORS[t] for t in tasks}},
        "notes": [DERMA_NOTE] if "dermamnist" in tasks else [],
        "wall_seconds": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
