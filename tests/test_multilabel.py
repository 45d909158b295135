"""Imbalanced multilabel: the class-weighted probe with per-label thresholds predicts positives where a plain BCE
head predicts all-negative, and matches scikit-learn's balanced one-vs-rest logistic regression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from components.config import ProbeParams
from components.data.datasets import load_split
from components.metrics.classification import compute_metrics
from components.nn.classifier import make_head
from components.training.multilabel import best_thresholds, fold_thresholds, pos_weight
from components.training.probe import fit_probe


def imbalanced(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8 labels, each on for ~5 % of rows, weakly visible in 16 noisy features."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 8, generator=g) < 0.05).float()
    x = torch.randn(n, 16, generator=g)
    x[:, :8] += 0.8 * y
    return x, y


def test_plain_bce_predicts_all_negative_and_the_fixed_probe_does_not() -> None:
    (x, y), (xv, yv), (xt, yt) = imbalanced(3000, 0), imbalanced(1000, 1), imbalanced(3000, 2)
    # the same probe with its fix turned off: plain BCE, no thresholds
    plain, _ = fit_probe((x, y), (xv, yv), "multilabel", 8, ProbeParams(class_weight="none",
                                                                      multilabel_thresholds=False), "macro_f1", 0)
    with torch.no_grad():
        assert (plain(xt) > 0).float().mean() < 0.001  # the failure: "absent" (nearly) everywhere
        plain_f1 = compute_metrics("multilabel", plain(xt), yt, 8)["macro_f1"]
    head, val = fit_probe((x, y), (xv, yv), "multilabel", 8, ProbeParams(), "macro_f1", 0)
    with torch.no_grad():
        fixed = compute_metrics("multilabel", head(xt), yt, 8)
    assert plain_f1 < 0.02 and fixed["macro_f1"] > 0.15 and (head(xt) > 0).float().mean() > 0.03
    # at least what scikit-learn's balanced logistic regression reaches on the same features
    from sklearn.linear_model import LogisticRegression

    proba = np.stack([LogisticRegression(class_weight="balanced", max_iter=2000).fit(x.numpy(), y[:, j].numpy())
                      .predict_proba(xt.numpy())[:, 1] for j in range(8)], axis=1)
    sk = compute_metrics("multilabel", torch.logit(torch.as_tensor(proba, dtype=torch.float32), eps=1e-6), yt, 8)
    assert fixed["macro_f1"] >= sk["macro_f1"] - 0.01, (fixed["macro_f1"], sk["macro_f1"])


def test_thresholds_fold_into_the_bias() -> None:
    head = make_head(4, 3)
    x = torch.randn(50, 4)
    t = torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        p = torch.sigmoid(head(x))
        fold_thresholds(head, t)
        assert torch.equal(head(x) > 0, p >= t)


def test_pos_weight_and_thresholds_edge_cases() -> None:
    y = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    assert torch.allclose(pos_weight(y), torch.tensor([3.0, 1.0, 1 / 3]))  # never-on label: 1
    t = best_thresholds(torch.zeros(4, 3), y)
    assert t[1] == 0.5  # no positives: nothing to calibrate


def test_a_threshold_needs_enough_validation_positives() -> None:
    """The same separable pattern moves the threshold with MIN_POSITIVES positives and not with fewer (a threshold
    tuned on a handful of positives does not carry to test)."""
    from components.training.multilabel import MIN_POSITIVES

    def pattern(positives: int) -> tuple[torch.Tensor, torch.Tensor]:
        # positives at p = 0.8, as many negatives at p = 0.6, the rest at 0.1: 0.5 over-predicts, 0.7 is exact
        n = 10 * positives
        p = torch.full((n, 1), 0.1)
        p[:positives], p[positives:2 * positives] = 0.8, 0.6
        y = torch.zeros(n, 1)
        y[:positives] = 1
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        return torch.logit(p[perm]), y[perm]

    assert best_thresholds(*pattern(MIN_POSITIVES))[0] > 0.6
    assert best_thresholds(*pattern(MIN_POSITIVES - 1))[0] == 0.5
    assert best_thresholds(*pattern(MIN_POSITIVES - 1), min_positives=MIN_POSITIVES - 1)[0] > 0.6  # the floor moves


def test_a_fused_multilabel_head_re_picks_its_thresholds_on_the_merged_model() -> None:
    """The merged encoder's features are not the expert's: the fused model's multilabel head gets thresholds picked
    again on the merged model's validation logits (folded on top of the expert's), a single-label head is kept."""
    from types import SimpleNamespace

    from components.fusion.search import ValidationScorer
    from components.nn.foundation import Foundation

    class Identity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)  # the merged task vector lands here
            torch.nn.init.eye_(self.proj.weight)
            torch.nn.init.zeros_(self.proj.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    (x, y), (xv, yv) = imbalanced(3000, 0), imbalanced(1000, 1)
    ml_head, _ = fit_probe((x, y), (xv, yv), "multilabel", 8, ProbeParams(), "macro_f1", 0)
    mc_head = make_head(16, 3)
    experts = {t: SimpleNamespace(head=h) for t, h in (("ml", ml_head), ("mc", mc_head))}
    scorer = object.__new__(ValidationScorer)  # the data a real scorer loads from the splits, given directly
    scorer.foundation = Foundation("image", Identity().eval(), "sha", {})
    scorer.experts = experts
    scorer.data = {"ml": ({"x": xv}, yv, SimpleNamespace(kind="multilabel", num_labels=8)),
                   "mc": ({"x": xv}, torch.zeros(len(xv), dtype=torch.long), SimpleNamespace(kind="multiclass",
                                                                                             num_labels=3))}
    delta = {"proj.weight": 0.6 * torch.eye(16)}  # the merge scales the features: the expert's thresholds are off
    heads = scorer.refit_thresholds(delta)
    assert heads["mc"] is mc_head and heads["ml"] is not ml_head
    with torch.no_grad():
        merged = 1.6 * xv
        t = best_thresholds(ml_head(merged), yv)
        assert (t != 0.5).any()
        torch.testing.assert_close(heads["ml"].bias, ml_head.bias - torch.logit(t))
        torch.testing.assert_close(heads["ml"].weight, ml_head.weight)


def _hoc_shaped(folder: Path, seed: int = 0) -> None:
    """A task shaped like HoC (BLURB's three TSV files, 'k_v' multilabel cells): 3 labels, each on for ~5 % of the
    sentences. A label's keyword is in half its positive sentences and in 5 % of the others, so even with the
    keyword a positive stays the less likely answer (~0.34) and an unweighted model's best guess is 'absent'."""
    rng = np.random.default_rng(seed)
    filler = "cells tumour growth protein expression study patients analysis levels response samples".split()
    keywords = ["metastasis", "angiogenesis", "apoptosis"]
    folder.mkdir(parents=True)
    for fname, n in (("train.tsv", 600), ("dev.tsv", 700), ("test.tsv", 600)):
        rows = ["labels\tsentence\tindex"]
        for i in range(n):
            on = rng.random(3) < 0.05
            words = list(rng.choice(filler, size=8))
            for k in range(3):
                if rng.random() < (0.5 if on[k] else 0.05):
                    words.insert(int(rng.integers(0, len(words) + 1)), keywords[k])
            rows.append(",".join(f"{k}_{int(v)}" for k, v in enumerate(on)) + f"\t{' '.join(words)} .\t{i}")
        (folder / fname).write_text("\n".join(rows) + "\n")


def test_the_experts_stage_weighs_and_thresholds_a_multilabel_task(tiny_bert: Path, tmp_path: Path) -> None:
    """The experts stage's own ``train_expert`` on an imbalanced multilabel task: with the defaults (per-label
    positive weights in the probe's and the expert's losses, per-label thresholds on validation folded into the
    saved head's bias) the expert predicts positives and scores; with weighting and thresholds off it answers
    'absent' (nearly) everywhere."""
    from components.config import load_params
    from components.experts.io import load_expert
    from components.nn.foundation import describe_text_foundation, load_foundation
    from components.stages.data import prepare_data
    from components.stages.experts import ExpertsInputs, train_expert
    from components.training.inference import batched

    project = Path(__file__).resolve().parents[1]
    _hoc_shaped(tmp_path / "hoc_like")
    spec = {"modality": "text", "format": "table", "path": str(tmp_path / "hoc_like"), "sep": "\t",
            "text_column": "sentence", "label_column": "labels", "label_format": "blurb_multilabel",
            "kind": "multilabel", "label_names": ["metastasis", "angiogenesis", "apoptosis"],
            "description": "Which of three hallmarks does this sentence describe.", "split": {"protocol": "files"}}
    common = {"foundation.text.source": str(tiny_bert), "data.tasks.hoc_like": spec, "data.active": ["hoc_like"],
              "experts.trainer.text.max_train_samples": None, "experts.trainer.text.max_epochs": 3,
              "experts.probe.epochs": 300, "routing.groups": {"classification": ["hoc_like"]}}
    plain = {"experts.probe.class_weight": "none", "experts.probe.multilabel_thresholds": False,
             "experts.trainer.text.class_weight": "none"}
    p = load_params(project / "params", "tiny", common)
    prepare_data(p.data, project, tmp_path / "data", p.pipeline.seed)
    describe_text_foundation(p.foundation, project, tmp_path / "foundation" / "text")
    found = load_foundation(tmp_path / "foundation", "text")
    test = load_split(tmp_path / "data", "hoc_like", "test")
    x, y = found.inputs(test.inputs), torch.as_tensor(np.asarray(test.labels))
    scores = {}
    for name, overrides in (("fixed", {}), ("plain", plain)):
        q = load_params(project / "params", "tiny", {**common, **overrides})
        out = tmp_path / "experts" / name
        manifest = train_expert("hoc_like", ExpertsInputs.from_params(q), tmp_path / "data", tmp_path / "foundation",
                                out)
        with torch.no_grad():
            logits = batched(load_expert(out, found).classifier(), x)
        scores[name] = (compute_metrics("multilabel", logits, y, 3)["macro_f1"], float((logits > 0).float().mean()),
                        manifest["metrics"]["val"]["macro_f1"])
    assert scores["plain"][1] < 0.01 and scores["plain"][0] < 0.05, scores  # 'absent' (nearly) everywhere
    assert scores["fixed"][1] > 0.02 and scores["fixed"][0] > scores["plain"][0] + 0.15, scores
