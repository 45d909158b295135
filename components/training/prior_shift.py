"""Single-label decisions tuned on validation: post-hoc logit adjustment, folded into the head's bias.

A softmax head (binary heads here have two logits) predicts ``argmax_c z_c``. Adding ``tau * log(pi_c)``, with
``pi`` the training split's class frequencies, moves the decision toward the frequent classes (``tau > 0``) or
away from them (``tau < 0``): Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021), whose
balanced-error rule is ``tau = -1`` on a plain cross-entropy head. A class-balanced head (every trainer's
default here) already carries about ``-log(pi)`` in its logits, and on a task with rare classes it then
over-predicts them, which costs those classes' precision and so macro-F1; ``tau > 0`` takes part of that back.
Which ``tau`` is best depends on the head and the task, so it is picked on validation from ``TAUS``, and kept
only where it generalises: the ``tau`` picked on one half of the validation rows (even / odd) must beat
``tau = 0`` on the other half, summed over both ways (``components.training.half_split``, as the multilabel
thresholds are checked). Folded into the bias (``bias_c += tau * log(pi_c)``), the rule travels with
the head into every bundle and the registry, and nothing at inference changes.

scikit-learn has no post-hoc decision tuning for more than two classes (its ``TunedThresholdClassifierCV`` is
binary only) and it would not act on a torch head's bias, hence this module.
"""

from __future__ import annotations

import torch
from torch import nn

from components.metrics.classification import confusion_counts
from components.training.half_split import confirmed_pick

TAUS = torch.linspace(-1.0, 1.0, 9)  # -1, -0.75, ..., 1


def class_priors(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class frequencies of (N,) integer labels, (K,); a class absent from them counts as one example."""
    counts = torch.bincount(labels.long().reshape(-1), minlength=num_classes).float().clamp(min=1)
    return counts / counts.sum()


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Macro-F1 over all ``num_classes`` classes (a class neither predicted nor present scores 0, as the
    evaluate stage's torchmetrics call does), from the evaluate stage's confusion counts."""
    cm = confusion_counts(preds, labels, num_classes).float()
    tp = cm.diagonal()
    f1 = 2 * tp / (cm.sum(dim=0) + cm.sum(dim=1)).clamp(min=1)
    return float(f1.mean())


def macro_f1_per_tau(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Macro-F1 at every ``TAUS`` entry: (len(TAUS),)."""
    k = logits.shape[1]
    return torch.tensor([macro_f1((logits + tau * log_prior).argmax(dim=1), labels, k) for tau in TAUS])


def _pick(scores: torch.Tensor) -> int:
    """Index of the best score; among (near-)ties, the ``tau`` closest to 0 (the head's own decision)."""
    return int((scores - 1e-6 * TAUS.abs()).argmax())


def best_prior_shift(logits: torch.Tensor, labels: torch.Tensor, priors: torch.Tensor) -> float:
    """The ``tau`` of ``TAUS`` with the best macro-F1 on (validation) ``logits`` (N, K) / ``labels`` (N,), or 0.0
    where the half-split check says a tuned ``tau`` does not beat the head's own decision."""
    if logits.ndim != 2 or logits.shape[1] != len(priors) or labels.shape != logits.shape[:1]:
        raise ValueError(f"best_prior_shift: logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and "
                         f"{len(priors)} class priors do not match")
    z, y = logits.detach().float(), labels.long()
    log_prior = priors.float().log()
    default = int(TAUS.abs().argmin())
    best = confirmed_pick(len(y), lambda rows: macro_f1_per_tau(z[rows], y[rows], log_prior), _pick, default)
    return 0.0 if best == default else float(TAUS[best])


@torch.no_grad()
def fold_prior_shift(head: nn.Linear, priors: torch.Tensor, tau: float) -> None:
    """``bias_c += tau * log(pi_c)``: the head now predicts the adjusted argmax."""
    head.bias += tau * priors.to(head.bias).log()


def tune_prior_shift(head: nn.Linear, val_logits: torch.Tensor, val_labels: torch.Tensor,
                     train_labels: torch.Tensor) -> float:
    """Pick ``tau`` on validation (``best_prior_shift``, priors from the training labels), fold it into ``head``
    and return it (0.0: the head's own decision kept)."""
    priors = class_priors(train_labels, head.out_features)
    tau = best_prior_shift(val_logits, val_labels, priors)
    if tau:
        fold_prior_shift(head, priors, tau)
    return tau
