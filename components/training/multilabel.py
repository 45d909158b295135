"""Multilabel done right: per-label class weighting in the loss and per-label decision thresholds chosen on
validation, folded into the head's bias.

On an imbalanced multilabel task (HoC: most hallmarks are absent from most sentences) a plain BCE head learns that
"absent" is always a safe bet and predicts all-negative: macro-F1 near 0. Two standard fixes, together:

- ``pos_weight`` = negatives / positives per label (clamped), so each label's positives weigh as much as its
  negatives in the loss (scikit-learn's ``class_weight="balanced"`` for one-vs-rest);
- a per-label threshold picked on validation to maximise that label's F1. A sigmoid head predicts label j when
  ``logit_j > 0``; thresholding at probability t_j is ``logit_j > logit(t_j)``, i.e. the same rule after
  ``bias_j -= logit(t_j)``. Folded into the bias, the threshold travels with the head into every bundle, the fused
  model and the registry, and nothing at inference changes (AUROC, a ranking measure, is unaffected).
"""

from __future__ import annotations

import torch
from torch import nn

from components.training.half_split import confirmed_pick

MAX_POS_WEIGHT = 100.0
THRESHOLDS = torch.arange(0.05, 0.951, 0.05)
# A label's threshold is tuned only when validation holds at least this many of its positives (15 per half of the
# half-split check). Measured on HoC's probe (bench/results/multilabel_probe.json `per_label`, the check run with and
# without this floor): below it, the labels with 11 and 20 validation positives would lose 0.22 and 0.09 test F1
# (validation's label rates differ from test's) and the one with 23 would gain 0.03; above it, the tuned labels moved
# by +0.035 (72 positives) and -0.008 (45).
MIN_POSITIVES = 30


def pos_weight(labels: torch.Tensor) -> torch.Tensor:
    """negatives / positives per label of (N, L) 0/1 labels, in [1/MAX, MAX]; 1 for a label never (or always) on."""
    y = labels.float()
    pos, neg = y.sum(dim=0), (1 - y).sum(dim=0)
    w = torch.where((pos > 0) & (neg > 0), neg / pos.clamp(min=1), torch.ones_like(pos))
    return w.clamp(1 / MAX_POS_WEIGHT, MAX_POS_WEIGHT)


def f1_at(p: torch.Tensor, y: torch.Tensor, thresholds: torch.Tensor = THRESHOLDS) -> torch.Tensor:
    """F1 of one label (probabilities ``p``, bool truths ``y``, both (N,)) at every threshold: (T,)."""
    pred = p.unsqueeze(0) >= thresholds.unsqueeze(1)  # (T, N)
    tp = (pred & y).sum(dim=1).float()
    return 2 * tp / (pred.sum(dim=1) + y.sum()).clamp(min=1)


def best_thresholds(logits: torch.Tensor, labels: torch.Tensor, min_positives: int = MIN_POSITIVES) -> torch.Tensor:
    """Per label, the probability threshold in 0.05..0.95 with the best F1 on (validation) ``logits`` -- kept only
    where it generalises: the threshold picked on one half of the rows (even / odd) must beat 0.5 on the other half,
    summed over both ways (``components.training.half_split``; a threshold tuned on a handful of positives otherwise
    overfits). 0.5 for a label with fewer than ``min_positives`` positives in ``labels``."""
    p = torch.sigmoid(logits.detach().float())
    y = labels.float() > 0.5
    default = int((THRESHOLDS - 0.5).abs().argmin())
    out = torch.full((p.shape[1],), 0.5)
    for j in range(p.shape[1]):
        if int(y[:, j].sum()) < min_positives:
            continue
        best = confirmed_pick(p.shape[0], lambda rows, j=j: f1_at(p[rows, j], y[rows, j]),
                              lambda f1: int(f1.argmax()), default)
        if best != default:
            out[j] = THRESHOLDS[best]
    return out


@torch.no_grad()
def fold_thresholds(head: nn.Linear, thresholds: torch.Tensor) -> None:
    """``bias_j -= logit(t_j)``: the head now predicts label j exactly when p_j >= t_j."""
    t = thresholds.to(head.bias).clamp(1e-4, 1 - 1e-4)
    head.bias -= torch.log(t / (1 - t))
