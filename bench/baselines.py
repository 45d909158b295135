"""The simple baselines a practitioner tries first, on exactly the pipeline's splits, beside the pipeline's experts.
`medexperts bench baselines [--profile quick] [--work DIR] [--result NAME]` -> bench/results/baselines.json
(`--result NAME`: bench/results/NAME.json)

Per task (the shipped ones, plus the optional ones found on disk, as `medexperts bench experts` takes them), the data
stage's own code (`prepare_data`, the profile's params, seed 42) writes the splits; every baseline picks its
hyper-parameters on the validation split only and is scored on test with the evaluate stage's `compute_metrics`
(accuracy, macro-F1, AUROC, MCC):

- majority class (the training split's most frequent class; multilabel: each label's most frequent value);
- text: TF-IDF (word 1-2 grams, sublinear tf) + logistic regression; C in {0.1, 1, 10, 100} x class weights
  {none, balanced}; multilabel: one balanced LR per label and a per-label decision threshold chosen on validation;
- images: pixel logistic regression (standardised pixels; C in {0.001, 0.01, 0.1, 1} x class weights), and a small
  CNN (two 3x3 conv layers 16/32 + max-pool + linear, AdamW 1e-3, up to --cnn-epochs epochs, the best epoch and
  plain vs class-weighted loss picked on validation), --cnn-seeds seeds (median and spread reported).

Each baseline is fitted twice: on the same training rows as the pipeline's expert (the profile's
`experts.trainer.<modality>.max_train_samples`, same seeded subset), and on every training row (what a user with
the data would do). The "strongest baseline" of a task is the one with the best validation macro-F1 on the expert's
rows; the README table sets it beside the experts of `bench/results/experts.json` (same profile, same splits).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, write_result

# Every metric the evaluate stage reports: these four for every task, and micro-F1 for multilabel ones (HoC).
METRICS = ("accuracy", "macro_f1", "auroc", "mcc")
TEXT_C = (0.1, 1.0, 10.0, 100.0)
PIXEL_C = (0.001, 0.01, 0.1, 1.0)


def _params(profile: str, overrides: dict[str, Any]):  # noqa: ANN202
    from components.config import load_params

    return load_params(ROOT / "params", profile, overrides)


def _scores(kind: str, logits: np.ndarray, labels: np.ndarray, width: int) -> dict[str, float]:
    import torch

    from components.metrics.classification import compute_metrics

    m = compute_metrics(kind, torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(labels), width)
    return {k: float(v) for k, v in m.items()}  # compute_metrics' own set: METRICS, + micro_f1 if multilabel


def _logits_from_proba(kind: str, proba: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities as logits for compute_metrics: log p (single-label); for multilabel, logit(p) -
    logit(threshold) so that compute_metrics' `logit > 0` rule applies the chosen per-label threshold."""
    eps = 1e-7
    p = np.clip(proba, eps, 1 - eps)
    if kind != "multilabel":
        return np.log(p)
    t = np.full(p.shape[1], 0.5) if thresholds is None else np.clip(thresholds, eps, 1 - eps)
    return np.log(p / (1 - p)) - np.log(t / (1 - t))


def majority(train: Any, test: Any) -> dict[str, float]:
    y = np.asarray(train.labels)
    n = len(test)
    if train.kind == "multilabel":
        on = (y.mean(axis=0) > 0.5).astype(float)
        logits = np.tile(np.where(on > 0, 5.0, -5.0), (n, 1))
    else:
        width = 2 if train.kind == "binary" else train.num_labels
        counts = np.bincount(y.astype(int), minlength=width)
        logits = np.full((n, width), -5.0)
        logits[:, counts.argmax()] = 5.0
    return _scores(train.kind, logits, np.asarray(test.labels), train.num_labels)


def _fit_lr(x_tr: Any, y_tr: np.ndarray, x_va: Any, y_va: np.ndarray, kind: str, width: int,
            grid: tuple[float, ...]) -> tuple[Any, dict[str, Any], float]:
    """The (model, choice, val macro-F1) of the LR grid best on validation (single-label kinds)."""
    from sklearn.linear_model import LogisticRegression

    best: tuple[Any, dict[str, Any], float] | None = None
    for c in grid:
        for weight in (None, "balanced"):
            model = LogisticRegression(C=c, class_weight=weight, max_iter=2000)
            model.fit(x_tr, y_tr)
            proba = _full_proba(model, x_va, 2 if kind == "binary" else width)
            f1 = _scores(kind, _logits_from_proba(kind, proba), y_va, width)["macro_f1"]
            if best is None or f1 > best[2]:
                best = (model, {"C": c, "class_weight": weight or "none"}, f1)
    assert best is not None
    return best


def _full_proba(model: Any, x: Any, width: int) -> np.ndarray:
    """predict_proba with a column for every class (classes absent from a small training subset get 0)."""
    proba = model.predict_proba(x)
    out = np.zeros((proba.shape[0], width))
    out[:, model.classes_.astype(int)] = proba
    return out


def _fit_multilabel(x_tr: Any, y_tr: np.ndarray, x_va: Any, y_va: np.ndarray, grid: tuple[float, ...]
                    ) -> tuple[list[Any], np.ndarray, dict[str, Any], float]:
    """One balanced LR per label, C shared (picked on validation), then per-label thresholds on validation."""
    from sklearn.linear_model import LogisticRegression

    width = y_tr.shape[1]
    best = None
    for c in grid:
        models = []
        for j in range(width):
            if y_tr[:, j].min() == y_tr[:, j].max():
                models.append(float(y_tr[0, j]))  # a label constant in training: predict that constant
                continue
            models.append(LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x_tr, y_tr[:, j]))
        proba = _ml_proba(models, x_va)
        thresholds = np.array([_best_threshold(proba[:, j], y_va[:, j]) for j in range(width)])
        f1 = _scores("multilabel", _logits_from_proba("multilabel", proba, thresholds), y_va, width)["macro_f1"]
        if best is None or f1 > best[3]:
            best = (models, thresholds, {"C": c, "class_weight": "balanced", "thresholds": "per label, on val"}, f1)
    assert best is not None
    return best


def _ml_proba(models: list[Any], x: Any) -> np.ndarray:
    n = x.shape[0]
    cols = [np.full(n, m) if isinstance(m, float) else m.predict_proba(x)[:, 1] for m in models]
    return np.stack(cols, axis=1)


def _best_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """The threshold in a 0.05..0.95 grid that maximises this label's F1 on validation (0.5 when it has no
    positives there)."""
    if y.sum() == 0:
        return 0.5
    best_t, best_f1 = 0.5, -1.0
    for t in np.arange(0.05, 0.96, 0.05):
        pred = p >= t
        tp = float((pred & (y > 0)).sum())
        f1 = 2 * tp / (pred.sum() + y.sum()) if (pred.sum() + y.sum()) else 0.0
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    return best_t


def text_lr(train: Any, val: Any, test: Any) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if len(train) >= 500 else 1)
    x_tr = vec.fit_transform(list(train.inputs))
    x_va, x_te = vec.transform(list(val.inputs)), vec.transform(list(test.inputs))
    return _lr_eval(train, val, test, x_tr, x_va, x_te, TEXT_C)


def pixel_lr(train: Any, val: Any, test: Any) -> dict[str, Any]:
    from sklearn.preprocessing import StandardScaler

    def flat(d: Any) -> np.ndarray:
        return np.asarray(d.inputs, dtype=np.float32).reshape(len(d), -1) / 255.0

    scaler = StandardScaler().fit(flat(train))
    return _lr_eval(train, val, test, scaler.transform(flat(train)), scaler.transform(flat(val)),
                    scaler.transform(flat(test)), PIXEL_C)


def _lr_eval(train: Any, val: Any, test: Any, x_tr: Any, x_va: Any, x_te: Any, grid: tuple[float, ...]
             ) -> dict[str, Any]:
    y_tr, y_va, y_te = (np.asarray(d.labels) for d in (train, val, test))
    if train.kind == "multilabel":
        models, thresholds, choice, val_f1 = _fit_multilabel(x_tr, y_tr, x_va, y_va, grid)
        logits = _logits_from_proba("multilabel", _ml_proba(models, x_te), thresholds)
    else:
        width = 2 if train.kind == "binary" else train.num_labels
        model, choice, val_f1 = _fit_lr(x_tr, y_tr, x_va, y_va, train.kind, train.num_labels, grid)
        logits = _logits_from_proba(train.kind, _full_proba(model, x_te, width))
    return {"test": _scores(train.kind, logits, y_te, train.num_labels), "val_macro_f1": val_f1, "choice": choice}


def small_cnn(train: Any, val: Any, test: Any, seeds: int, epochs: int) -> dict[str, Any]:
    """The 2-conv CNN, per seed: plain and class-weighted loss, best epoch on validation; the better of the two
    on validation is that seed's model. Median over seeds of test metrics (and min/max macro-F1)."""
    runs = []
    for seed in range(seeds):
        best = None
        for weighted in (False, True):
            r = _cnn_run(train, val, test, seed, epochs, weighted)
            if best is None or r["val_macro_f1"] > best["val_macro_f1"]:
                best = r
        runs.append(best)
    test = {k: statistics.median(r["test"][k] for r in runs) for k in runs[0]["test"]}
    f1s = [r["test"]["macro_f1"] for r in runs]
    return {"test": test, "val_macro_f1": statistics.median(r["val_macro_f1"] for r in runs),
            "choice": {"seeds": seeds, "weighted_loss": [r["weighted"] for r in runs],
                       "best_epoch": [r["epoch"] for r in runs]},
            "test_macro_f1_min": min(f1s), "test_macro_f1_max": max(f1s)}


def _images(d: Any) -> Any:
    import torch

    x = torch.as_tensor(np.asarray(d.inputs), dtype=torch.float32).div_(127.5).sub_(1.0)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _cnn_run(train: Any, val: Any, test: Any, seed: int, epochs: int, weighted: bool) -> dict[str, Any]:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x_tr, x_va, x_te = _images(train), _images(val), _images(test)
    y_tr = torch.as_tensor(np.asarray(train.labels)).long()
    width = 2 if train.kind == "binary" else train.num_labels
    c, h, w = x_tr.shape[1:]
    model = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), width))
    counts = torch.bincount(y_tr, minlength=width).float().clamp(min=1)
    loss_fn = nn.CrossEntropyLoss(weight=(counts.sum() / (width * counts)) if weighted else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    best: dict[str, Any] = {"val_macro_f1": -1.0}
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_tr), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_logits = model(x_va).numpy()
            f1 = _scores(train.kind, val_logits, np.asarray(val.labels), train.num_labels)["macro_f1"]
            if f1 > best["val_macro_f1"]:
                best = {"val_macro_f1": f1, "epoch": epoch + 1, "weighted": weighted,
                        "test": _scores(train.kind, model(x_te).numpy(), np.asarray(test.labels), train.num_labels)}
    return best


def run_task(data_dir: Path, task: str, cap: int | None, seed: int, cnn_seeds: int, cnn_epochs: int
             ) -> dict[str, Any]:
    from components.data.datasets import load_split

    train_all = load_split(data_dir, task, "train")
    val, test = load_split(data_dir, task, "val"), load_split(data_dir, task, "test")
    out: dict[str, Any] = {"modality": train_all.modality, "kind": train_all.kind, "test_samples": len(test),
                           "val_samples": len(val)}
    subsets = {"expert_rows": train_all.subset(cap, seed)}
    if len(subsets["expert_rows"]) < len(train_all):
        subsets["all_rows"] = train_all
    for rows, train in subsets.items():
        t0 = time.perf_counter()
        res: dict[str, Any] = {"train_samples": len(train), "majority": {"test": majority(train, test)}}
        if train.modality == "text":
            res["tfidf_lr"] = text_lr(train, val, test)
        else:
            res["pixel_lr"] = pixel_lr(train, val, test)
            if train.kind != "multilabel":
                res["small_cnn"] = small_cnn(train, val, test, cnn_seeds, cnn_epochs)
        res["seconds"] = time.perf_counter() - t0
        candidates = {k: v for k, v in res.items() if isinstance(v, dict) and "val_macro_f1" in v}
        res["strongest"] = max(candidates, key=lambda k: candidates[k]["val_macro_f1"])
        out[rows] = res
        print(f"{task:18s} {rows:12s} n={len(train):6d}  " + "  ".join(
            f"{k} {v['test']['macro_f1']:.3f}" for k, v in res.items() if isinstance(v, dict) and "test" in v)
            + f"  strongest (val): {res['strongest']}", flush=True)
    return out


def experts_beside(baselines: dict[str, Any], profile: str) -> dict[str, Any]:
    """Per task: the strongest baseline (expert's rows, by validation) beside the LoRA expert (the pipeline's
    default method) and the best method of bench/results/experts.json, test macro-F1; empty when that file is
    missing or was measured on another profile (other splits and caps: not comparable)."""
    import json

    path = ROOT / "bench" / "results" / "experts.json"
    if not path.is_file():
        return {}
    experts = json.loads(path.read_text())
    if experts.get("params", {}).get("profile", "quick") != profile:
        return {}
    runs = experts["runs"]
    out = {}
    for task, b in baselines.items():
        mine = [r for r in runs if r["task"] == task]
        if not mine:
            continue
        rows = b["expert_rows"]
        strongest = rows["strongest"]
        lora = next((r for r in mine if r["method"] == "lora"), None)
        best = max(mine, key=lambda r: r["val"]["macro_f1"])
        base_f1 = rows[strongest]["test"]["macro_f1"]
        all_rows = b.get("all_rows")
        out[task] = {
            "strongest_baseline": strongest, "baseline_test_macro_f1": base_f1,
            "baseline_all_rows_test_macro_f1": (all_rows[all_rows["strongest"]]["test"]["macro_f1"]
                                                if all_rows else None),
            "majority_test_macro_f1": rows["majority"]["test"]["macro_f1"],
            "lora_test_macro_f1": lora["test"]["macro_f1"] if lora else None,
            "best_method": best["method"], "best_method_test_macro_f1": best["test"]["macro_f1"],
            "probe_test_macro_f1": mine[0]["probe_test"]["macro_f1"],
            "lora_beats_baseline": bool(lora and lora["test"]["macro_f1"] > base_f1),
            "best_method_beats_baseline": best["test"]["macro_f1"] > base_f1,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--tasks", nargs="*", help="default: the shipped tasks + the optional ones found on disk")
    parser.add_argument("--work", type=Path, help="folder for the data stage's output (default: a temporary one)")
    parser.add_argument("--cnn-seeds", type=int, default=3)
    parser.add_argument("--cnn-epochs", type=int, default=15)
    parser.add_argument("--result", default="baselines", help="bench/results/RESULT.json")
    args = parser.parse_args()

    from bench.experts import available_tasks
    from components.stages.data import prepare_data

    tasks = args.tasks or available_tasks(args.profile)
    params = _params(args.profile, {"data.active": tasks})
    work = (args.work or Path(tempfile.mkdtemp(prefix="medexperts-bench-baselines-"))).resolve()
    t0 = time.perf_counter()
    if not (work / "data" / "manifest.json").is_file():
        prepare_data(params.data, ROOT, work / "data", seed=params.pipeline.seed)
    results = {}
    for task in tasks:
        modality = params.data.tasks[task].modality
        cap = params.experts.trainer.of(modality).max_train_samples
        results[task] = run_task(work / "data", task, cap, params.pipeline.seed, args.cnn_seeds, args.cnn_epochs)
    beside = experts_beside(results, args.profile)
    write_result(args.result, {
        "params": {"profile": args.profile, "result": args.result, "tasks": tasks, "seed": params.pipeline.seed,
                   "text_C": TEXT_C, "pixel_C": PIXEL_C, "cnn_seeds": args.cnn_seeds, "cnn_epochs": args.cnn_epochs,
                   "selection": "validation macro-F1", "metrics": [*METRICS, "micro_f1 (multilabel)"]},
        "tasks": results, "experts_vs_baseline": beside, "wall_seconds": time.perf_counter() - t0,
    })
    for task, row in beside.items():
        print(f"{task:18s} strongest baseline {row['strongest_baseline']} {row['baseline_test_macro_f1']:.3f}  "
              f"LoRA {row['lora_test_macro_f1']}  best expert ({row['best_method']}) "
              f"{row['best_method_test_macro_f1']:.3f}", flush=True)


if __name__ == "__main__":
    main()
