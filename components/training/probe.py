"""Linear probe: a task head fitted on frozen foundation features, L2 strength chosen on validation.

The probe is the baseline every expert is compared with, so it gets the same treatment: an
unregularised head on 384-d features fits 800 samples perfectly and generalises worse.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from components.core import stop
from components.config import ProbeParams
from components.metrics.classification import compute_metrics
from components.nn.classifier import make_head
from components.training.module import task_loss
from components.training.balance import ClassWeight, loss_weight
from components.training.multilabel import best_thresholds, fold_thresholds
from components.training.prior_shift import tune_prior_shift


def fit_head(features: torch.Tensor, labels: torch.Tensor, kind: str, num_labels: int, epochs: int, lr: float,
             l2: float, seed: int, class_weight: ClassWeight = "balanced") -> nn.Linear:
    """Full-batch Adam on cross-entropy + l2·||W||² (a multinomial logistic regression); multilabel: BCE (one
    logistic regression per label). ``class_weight="balanced"``: classes (labels' positives) weighted as
    scikit-learn's balanced logistic regression."""
    torch.manual_seed(seed)
    head = make_head(features.shape[1], num_labels)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    weight = loss_weight(kind, labels, num_labels, class_weight)
    for _ in range(epochs):
        stop.check("a probe epoch")
        opt.zero_grad()
        loss = task_loss(kind, head(features), labels, weight) + l2 * head.weight.pow(2).sum()
        loss.backward()
        opt.step()
    return head.eval()


def fit_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], kind: str,
              num_labels: int, pp: ProbeParams, metric: str, seed: int) -> tuple[nn.Linear, dict[str, float]]:
    """Best head over ``pp.l2_grid`` by validation ``metric``; returns it and its validation metrics. Multilabel
    heads are class-weighted per ``pp.class_weight``; with ``pp.multilabel_thresholds`` they also carry per-label thresholds
    picked on validation (in their bias), and single-label heads with ``pp.prior_shift`` a prior shift (its ``tau`` is
    returned with the metrics as ``prior_shift``)."""
    best: tuple[float, nn.Linear, dict[str, float]] | None = None
    for l2 in pp.l2_grid:
        head = fit_head(*train, kind, num_labels, pp.epochs, pp.lr, l2, seed, pp.class_weight)
        if kind == "multilabel" and pp.multilabel_thresholds:  # per-label thresholds on validation, in the bias
            with torch.no_grad():
                fold_thresholds(head, best_thresholds(head(val[0]), val[1]))
        tau = 0.0
        if kind != "multilabel" and pp.prior_shift:  # the decision's prior shift on validation, in the bias
            with torch.no_grad():
                tau = tune_prior_shift(head, head(val[0]), val[1], train[1])
        with torch.no_grad():
            scores = compute_metrics(kind, head(val[0]), val[1], num_labels)
        value = -math.inf if math.isnan(scores[metric]) else scores[metric]
        if best is None or value > best[0]:
            best = (value, head, {**scores, "l2": l2, "prior_shift": tau})
    assert best is not None  # l2_grid has at least one value (validated)
    return best[1], best[2]
