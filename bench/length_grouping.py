"""Length-grouped training batches: a text expert trained with random batches vs batches of like lengths
(``trainer.group_by_length``), same data, seed and schedule: training time and test quality.

Each run is the experts stage's own ``train_expert`` in a fresh process (``bench.experts``' quality child: the
deployed bundle and the probe scored on the test split), on the quick profile's schedule with up to
``--max-train-samples`` training rows. Per task and seed, the two arms run back to back, their
order swapped every other seed so drift on a noisy machine hits both alike; medians of the training seconds and
their ratio, mean and spread of the test metrics. Grouping changes which rows share a batch, so the two arms do
not train the same steps: the quality columns say whether that costs anything.
`medexperts bench length_grouping [--profile quick] [--seeds 3] [--tasks hoc symptom2disease]`
-> bench/results/length_grouping.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, run_child, write_result
from bench.experts import METRICS, setup  # setup: the data splits and the text foundation (text tasks: no image one)

ARMS = ("random", "grouped")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"train_seconds_median": statistics.median(r["train_seconds"] for r in runs)}
    for m in METRICS:
        values = [r["test"][m] for r in runs]
        out[f"test_{m}_mean"] = statistics.fmean(values)
        out[f"test_{m}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench length_grouping", description=__doc__)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["hoc", "symptom2disease"])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--max-train-samples", type=int, default=3000,
                        help="training rows per task (the quick profile caps 800: its validation pass, the same in "
                             "both arms, would dominate the time)")
    args = parser.parse_args()
    from flows.environment import configure

    configure(ROOT)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup(work, args.profile, args.tasks)
        for task in args.tasks:
            runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
            for seed in range(args.seeds):
                for arm in ARMS if seed % 2 == 0 else ARMS[::-1]:
                    spec = {"work": str(work), "task": task, "method": args.method, "profile": args.profile,
                            "active": args.tasks,
                            "overrides": {"pipeline.seed": seed,
                                          "experts.trainer.text.max_train_samples": args.max_train_samples,
                                          "experts.trainer.text.group_by_length": arm == "grouped"}}
                    result = run_child("bench.experts", "quality", spec)
                    runs[arm].append({"seed": seed, "train_seconds": result["train_seconds"], "test": result["test"],
                                      "val": result["val"], "train_samples": result["train_samples"]})
                    print(f"{task} seed {seed} {arm}: {result['train_seconds']:.1f} s, test macro-F1 "
                          f"{result['test']['macro_f1']:.3f}", flush=True)
            arms = {arm: summarise(v) for arm, v in runs.items()}
            figures[task] = {"runs": runs, "arms": arms, "train_samples": runs["random"][0]["train_samples"],
                             "speedup": arms["random"]["train_seconds_median"]
                             / arms["grouped"]["train_seconds_median"]}
            print(f"{task}: {figures[task]['speedup']:.2f}x faster grouped", flush=True)
    path = write_result("length_grouping", {"params": {"profile": args.profile, "seeds": args.seeds,
                                                       "tasks": args.tasks, "method": args.method,
                                                       "max_train_samples": args.max_train_samples},
                                            "figures": figures})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
