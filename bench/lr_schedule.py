"""Does the image foundation's learning-rate schedule matter? `medexperts bench lr_schedule [--epochs 8]
[--widths 32 64 128 256] [--tasks dermamnist]` -> bench/results/lr_schedule.json

The foundation stage's own pre-training (`pretrain_image_foundation`: the full profile's trainer settings, AdamW at
lr 0.002, the checkpoint with the best validation loss kept), once per
`foundation.image.trainer.lr_schedule` (constant, one_cycle) and per loss (`class_weight`: balanced, the
default, and none: plain cross-entropy), same seed, same data, same epochs, on a narrower
ResNet than ResNet-18 (`--widths`, two blocks per stage, GroupNorm as in the foundation) so the comparison takes
minutes on 2 CPUs; scored on test with the pre-training heads (accuracy, AUROC, macro-F1, MCC). Early stopping is
off, so both schedules train the same number of epochs. Default task: DermaMNIST (the JPEG-75 copy of the shared
folder), where the full profile's ResNet-18 pre-trained with a constant step size lost to a small CNN.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, write_result
from bench.image_foundation import DERMA_NOTE, available, score_foundation

SCHEDULES = ("constant", "one_cycle")


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench lr_schedule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--tasks", nargs="+", default=["dermamnist"])
    parser.add_argument("--class-weights", nargs="+", default=["balanced", "none"], choices=["balanced", "none"],
                        help="the pre-training loss's class weighting: each is run with both schedules")
    parser.add_argument("--work", type=Path, help="folder for the splits and foundations (default: a temporary one)")
    args = parser.parse_args()

    import torch

    from components.config import load_params
    from components.core.errors import ParamsError
    from components.core.layout import foundation_dir
    from components.stages.data import prepare_data
    from components.stages.foundation import FoundationInputs, pretrain_image_foundation

    known = load_params(ROOT / "params", "full").data.tasks
    unknown = [t for t in args.tasks if t not in known or known[t].modality != "image"]
    if unknown:
        raise ParamsError(f"bench lr_schedule: {unknown} are not image tasks of params/data.yaml; known: "
                          f"{sorted(t for t in known if known[t].modality == 'image')}")
    missing = sorted(set(args.tasks) - set(available(tuple(args.tasks))))
    if missing:
        raise ParamsError(f"bench lr_schedule: task(s) {missing} not found on disk (MEDEXPERTS_SHARED_DATA?)")
    work = (args.work or Path(tempfile.mkdtemp(prefix="medexperts-bench-lrschedule-"))).resolve()
    base = {"data.active": args.tasks, "foundation.image.arch": "resnet", "foundation.image.widths": args.widths,
            "foundation.image.blocks": 2, "foundation.image.trainer.max_epochs": args.epochs,
            "foundation.image.trainer.early_stopping_patience": 0}
    t0 = time.perf_counter()
    params = load_params(ROOT / "params", "full", base)
    if not (work / "data" / "manifest.json").is_file():
        prepare_data(params.data, ROOT, work / "data", seed=params.pipeline.seed)
    runs: dict[str, Any] = {}  # "<class_weight>/<schedule>"
    for class_weight in args.class_weights:
        for schedule in SCHEDULES:
            name = f"{class_weight}/{schedule}"
            p = load_params(ROOT / "params", "full", {**base, "foundation.image.trainer.lr_schedule": schedule,
                                                      "foundation.image.trainer.class_weight": class_weight})
            folder = f"{class_weight}-{schedule}"
            manifest = pretrain_image_foundation(FoundationInputs.from_params(p), work / "data",
                                                 foundation_dir(work / folder, "image"))
            runs[name] = {"class_weight": class_weight, "lr_schedule": schedule,
                          "train_seconds": manifest["train_seconds"], "parameters": manifest["parameters"],
                          "tasks": score_foundation(work, folder, args.tasks)}
            print(name, {t: round(m["test"]["macro_f1"], 3) for t, m in runs[name]["tasks"].items()}, flush=True)
    write_result("lr_schedule", {
        "params": {"epochs": args.epochs, "widths": args.widths, "blocks": 2, "tasks": args.tasks,
                   "seed": params.pipeline.seed, "schedules": list(SCHEDULES), "class_weights": args.class_weights,
                   "trainer": params.foundation.image.trainer.model_dump(exclude={"lr_schedule", "class_weight"}),
                   "torch_threads": torch.get_num_threads(),
                   "selection": "checkpoint with the best validation loss (the foundation stage's)"},
        "runs": runs,
        "macro_f1_one_cycle_minus_constant": {cw: {
            t: runs[f"{cw}/one_cycle"]["tasks"][t]["test"]["macro_f1"] - runs[f"{cw}/constant"]["tasks"][t]["test"][
                "macro_f1"] for t in args.tasks} for cw in args.class_weights},
        "notes": [DERMA_NOTE] if "dermamnist" in args.tasks else [],
        "wall_seconds": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
