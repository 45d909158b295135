"""The decision's prior shift (`experts.probe.prior_shift`) on trained experts and their probes, before and after, on
the same models. `medexperts bench prior_shift --work DIR [--tasks ...] [--result NAME]` -> bench/results/NAME.json
(default `prior_shift`).

DIR is a `medexperts bench experts --work DIR` folder (its data splits, foundation and `experts/<task>-<method>`);
nothing is trained here. For every single-label task there, the deployed expert bundle and the expert's probe score
validation and test; `components.training.prior_shift.best_prior_shift` picks tau on validation exactly as the
experts stage does with the switch on (priors from the training labels; kept only where a half split of validation
confirms it), and the test metrics are reported with tau = 0 (the head's own decision) and with the tau picked.
Also the whole tau grid's macro-F1 on validation and on test (`curve_val`, `curve_test`): how far the picked tau is
from the best one in hindsight.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.common import write_result

METRICS = ("accuracy", "auroc", "macro_f1", "mcc")


def score(work: Path, task: str, method: str) -> dict[str, Any]:
    import torch

    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.core.layout import expert_bundle
    from components.data.datasets import load_split
    from components.experts.io import load_expert
    from components.metrics.classification import compute_metrics
    from components.nn.classifier import Classifier
    from components.nn.foundation import load_foundation
    from components.training.data import labels_tensor
    from components.training.inference import batched
    from components.training.prior_shift import best_prior_shift, class_priors, macro_f1_per_tau

    folder = work / "experts" / f"{task}-{method}"
    splits = {s: load_split(work / "data", task, s) for s in ("train", "val", "test")}
    test = splits["test"]
    found = load_foundation(work / "foundation", test.modality)
    models = {"expert": load_bundle(expert_bundle(folder)).model.for_task(task),
              "probe": Classifier(found.encoder, load_expert(folder, found).probe_head)}
    labels = {s: labels_tensor(d.labels, d.kind) for s, d in splits.items()}
    out: dict[str, Any] = {"task": task, "method": method, "kind": test.kind,
                           "rows": {s: len(d) for s, d in splits.items()}}
    for name, model in models.items():
        with torch.no_grad():
            logits = {s: batched(model, found.inputs(splits[s].inputs)) for s in ("val", "test")}
        priors = class_priors(labels["train"], logits["test"].shape[1])
        tau = best_prior_shift(logits["val"], labels["val"], priors)
        shift = priors.log()

        def curve(split: str) -> list[float]:
            return macro_f1_per_tau(logits[split], labels[split], shift).tolist()

        before = compute_metrics(test.kind, logits["test"], labels["test"], test.num_labels)
        after = compute_metrics(test.kind, logits["test"] + tau * shift, labels["test"], test.num_labels)
        out[name] = {"tau": tau, "test_before": {m: before[m] for m in METRICS},
                     "test_after": {m: after[m] for m in METRICS},
                     "curve_val": curve("val"), "curve_test": curve("test")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench prior_shift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a `bench experts --work` folder")
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every expert in WORK/experts")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--result", default="prior_shift")
    args = parser.parse_args()
    import json

    from components.training.prior_shift import TAUS

    found = sorted(p.name.removesuffix(f"-{args.method}") for p in (args.work / "experts").glob(f"*-{args.method}"))
    tasks = args.tasks or found
    missing = sorted(set(tasks) - set(found))
    if missing:
        raise SystemExit(f"no {args.method} expert for {missing} in {args.work / 'experts'} (found: {found})")
    runs = []
    for task in tasks:
        manifest = json.loads((args.work / "experts" / f"{task}-{args.method}" / "manifest.json").read_text())
        if manifest.get("task_kind") == "multilabel":
            continue  # multilabel tasks have per-label thresholds instead
        runs.append({**score(args.work, task, args.method), "manifest": {k: manifest.get(k) for k in (
            "base_sha256", "seed", "train_samples", "val_samples", "lora", "prior_shift")}})
        e = runs[-1]["expert"]
        print(f"{task}: expert tau {e['tau']:+.2f}, test macro-F1 {e['test_before']['macro_f1']:.3f} -> "
              f"{e['test_after']['macro_f1']:.3f}")
    write_result(args.result, {"runs": runs, "taus": TAUS.tolist(), "work": str(args.work)})


if __name__ == "__main__":
    main()
