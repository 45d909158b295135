"""Imbalanced single-label tasks: the class-balanced loss (every trainer's, probe's and federated client's default)
recovers the rare class a plain cross-entropy head gives up on, and it is what each training path uses."""

from __future__ import annotations

import pytest
import torch

from components.config import ProbeParams, TrainerParams
from components.config.federated import ClientParams
from components.metrics.classification import compute_metrics
from components.training.balance import MAX_CLASS_WEIGHT, class_weights, loss_weight
from components.training.module import MultiTaskModule, task_loss
from components.training.probe import fit_probe


def imbalanced(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes at 90 / 7 / 3 %, each shifting its own feature by 1 (noise 1): separable only in part."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor([0.90, 0.07, 0.03]), n, replacement=True, generator=g)
    x = torch.randn(n, 8, generator=g)
    x[torch.arange(n), y] += 1.0
    return x, y


def test_class_weights_are_sklearns_balanced() -> None:
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 0])  # 7 / 2 / 1 of 10, class 3 absent
    w = class_weights(y, 4)
    assert torch.allclose(w, torch.tensor([10 / (3 * 7), 10 / (3 * 2), 10 / (3 * 1), 1.0]))
    one_rare = torch.cat([torch.zeros(100_000, dtype=torch.long), torch.ones(1, dtype=torch.long)])
    assert class_weights(one_rare, 2)[1] == MAX_CLASS_WEIGHT
    assert loss_weight("multiclass", y, 4, "none") is None
    assert torch.allclose(loss_weight("multilabel", torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 2),
                          torch.tensor([1.0, 1.0]))  # per-label positive weights (2nd label never on: 1)
    with pytest.raises(ValueError, match="unknown class_weight"):
        loss_weight("binary", y, 4, "inverse")  # type: ignore[arg-type]


def test_weighted_cross_entropy_is_the_mean_over_classes_weighted_by_balance() -> None:
    logits, y = torch.randn(10, 3), torch.tensor([0] * 7 + [1, 1, 2])
    w = class_weights(y, 3)
    manual = (w[y] * torch.nn.functional.cross_entropy(logits, y, reduction="none")).sum() / w[y].sum()
    assert torch.allclose(task_loss("multiclass", logits, y, w), manual)
    assert torch.allclose(task_loss("multiclass", logits, y), torch.nn.functional.cross_entropy(logits, y))


def test_the_balanced_probe_recovers_the_rare_classes_a_plain_one_drops() -> None:
    (x, y), (xv, yv), (xt, yt) = imbalanced(3000, 0), imbalanced(1000, 1), imbalanced(3000, 2)
    plain_head, _ = fit_probe((x, y), (xv, yv), "multiclass", 3, ProbeParams(class_weight="none"), "macro_f1", 0)
    head, _ = fit_probe((x, y), (xv, yv), "multiclass", 3, ProbeParams(), "macro_f1", 0)

    def recalls(h: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            pred = h(xt).argmax(1)
        return torch.stack([(pred[yt == c] == c).float().mean() for c in range(3)])

    plain, fixed = recalls(plain_head), recalls(head)
    assert plain[1:].max() < 0.25  # the failure: the rare classes are (nearly) never predicted
    assert fixed[1:].min() > 0.4 and fixed.mean() > plain.mean() + 0.15, (fixed, plain)  # balanced accuracy
    # the same trade as scikit-learn's balanced multinomial logistic regression on the same features (on such weakly
    # separable data it costs precision: macro-F1 need not rise, bench/results/class_weight.json measures real tasks)
    from sklearn.linear_model import LogisticRegression

    sk = LogisticRegression(class_weight="balanced", max_iter=2000).fit(x.numpy(), y.numpy())
    sk_f1 = compute_metrics("multiclass", torch.as_tensor(sk.decision_function(xt.numpy()), dtype=torch.float32),
                            yt, 3)["macro_f1"]
    with torch.no_grad():
        ours = compute_metrics("multiclass", head(xt), yt, 3)["macro_f1"]
    assert abs(ours - sk_f1) < 0.02, (ours, sk_f1)


def test_multitask_loss_weighs_each_task_by_its_own_balance() -> None:
    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Features()
            self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 2), "b": torch.nn.Linear(4, 3)})

    torch.manual_seed(0)
    x, ids = torch.randn(12, 4), torch.tensor([0] * 6 + [1] * 6)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1, 2, 2, 2, 2])
    weights = {"a": class_weights(y[:6], 2), "b": class_weights(y[6:], 3)}
    module = MultiTaskModule(Model(), ["a", "b"], {"a": "binary", "b": "multiclass"}, 1e-3, 0.0, weights)
    m = module.model
    expected = (task_loss("binary", m.heads["a"](x[:6]), y[:6], weights["a"]) * 6
                + task_loss("multiclass", m.heads["b"](x[6:]), y[6:], weights["b"]) * 6) / 12
    assert torch.allclose(module._loss({"x": x, "labels": y, "task_ids": ids}), expected)


def test_every_trainer_defaults_to_balanced_and_bad_values_are_refused() -> None:
    assert TrainerParams().class_weight == ProbeParams().class_weight == ClientParams().class_weight == "balanced"
    with pytest.raises(ValueError, match="class_weight"):
        TrainerParams(class_weight="inverse")
