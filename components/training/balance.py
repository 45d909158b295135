"""Class-balanced losses: every class weighs as much in the loss as every other, whatever its frequency.

The pipeline's tasks are imbalanced (PneumoniaMNIST 74 % pneumonia, BreastMNIST 73 % benign, RetinaMNIST's grade 0
at 43 %, DermaMNIST's nevi at 67 %, PubMedQA's "maybe" at 11 %, a federated client's Dirichlet shard far more). A plain
cross-entropy head then learns to favour the frequent classes and loses macro-F1, the pipeline's selection metric, to a
class-weighted small CNN or logistic regression (bench/results/baselines.json). ``class_weight: balanced`` (the default
of every trainer, probe and federated client) weighs class c by n / (k · n_c), scikit-learn's
``class_weight="balanced"``; multilabel tasks get the per-label positive weights of ``multilabel.pos_weight``. The
weights come from the training labels the model is fitted on (a federated client: its own shard). ``none``: plain
cross-entropy / BCE (better accuracy on the frequent classes; bench/results/class_weight.json measures both).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from components.training.multilabel import pos_weight

# The same values as components.config.training.ClassWeight, spelled here because a Flower site imports this module
# without the params layer.
ClassWeight = Literal["balanced", "none"]
MAX_CLASS_WEIGHT = 100.0  # a class seen once among thousands would otherwise dominate every step


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (k · n_c) per class of 1-d class ids, k = the classes present; 1 for a class absent from ``labels`` (no
    sample carries its weight); clamped to [1/MAX, MAX]."""
    counts = torch.bincount(labels.long().flatten(), minlength=num_classes)[:num_classes].float()
    present = counts > 0
    k = int(present.sum())
    w = torch.ones(num_classes)
    if k:
        w[present] = counts.sum() / (k * counts[present])
    return w.clamp(1 / MAX_CLASS_WEIGHT, MAX_CLASS_WEIGHT)


def loss_weight(kind: str, labels: torch.Tensor, num_labels: int, mode: ClassWeight = "balanced") -> torch.Tensor | None:
    """The ``weight`` argument of ``task_loss`` for a model trained on ``labels``: per-class weights (binary,
    multiclass), per-label positive weights (multilabel), or None with ``mode="none"``."""
    if mode == "none":
        return None
    if mode not in get_args(ClassWeight):
        raise ValueError(f"unknown class_weight {mode!r}; expected one of {list(get_args(ClassWeight))}")
    if kind == "multilabel":
        return pos_weight(labels)
    return class_weights(labels, num_labels)
