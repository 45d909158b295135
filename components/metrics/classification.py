"""Classification metrics for experts and merged models, computed with torchmetrics' functional API."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

Kind = Literal["binary", "multiclass", "multilabel"]

PRIMARY_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "auroc", "mcc")

_KINDS: frozenset[str] = frozenset(("binary", "multiclass", "multilabel"))


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(_KINDS)}")


def _prepare(
    kind: Kind, logits: torch.Tensor, labels: torch.Tensor, num_labels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and return (float32 CPU logits, int64 CPU labels)."""
    _check_kind(kind)
    # bf16/fp16 logits from mixed-precision inference break some torchmetrics kernels on CPU.
    x = logits.detach().float().cpu()
    y = labels.detach().cpu()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (N, C) tensor, got shape {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} logits but {y.shape[0]} labels")
    if kind == "multilabel":
        if y.ndim != 2 or y.shape[1] != num_labels or x.shape[1] != num_labels:
            raise ValueError(
                f"multilabel expects logits and labels of shape (N, {num_labels}), "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        # Labels may arrive as float 0/1 (BCE targets); torchmetrics wants integers.
        y = (y > 0.5).long() if y.is_floating_point() else y.long()
    else:
        expected = 2 if kind == "binary" else num_labels
        if x.shape[1] != expected:
            raise ValueError(f"{kind} expects logits of shape (N, {expected}), got {tuple(x.shape)}")
        y = y.reshape(-1).long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= expected):
            raise ValueError(f"{kind} labels must lie in [0, {expected}), got [{int(y.min())}, {int(y.max())}]")
    return x, y


def predictions(kind: Kind, logits: torch.Tensor) -> torch.Tensor:
    """Hard predictions: argmax class ids (N,) or sigmoid > 0.5 label indicators (N, L), int64."""
    _check_kind(kind)
    x = logits.detach()
    if kind == "multilabel":
        # sigmoid(x) > 0.5 is x > 0; comparing logits avoids rounding at the boundary.
        return (x > 0).long()
    return x.argmax(dim=-1).long()


def _auroc_defined(kind: Kind, labels: torch.Tensor, num_labels: int) -> bool:
    """AUROC needs both positives and negatives for every class (one-vs-rest) or label."""
    if kind == "multilabel":
        positives = labels.sum(dim=0)
        return bool(((positives > 0) & (positives < labels.shape[0])).all())
    n_classes = 2 if kind == "binary" else num_labels
    counts = torch.bincount(labels, minlength=n_classes)
    return bool((counts > 0).all())


def _auroc(kind: Kind, logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    from torchmetrics.functional import auroc

    if not _auroc_defined(kind, labels, num_labels):
        return float("nan")
    if kind == "binary":
        value = auroc(logits.softmax(dim=-1)[:, 1], labels, task="binary")
    elif kind == "multiclass":
        value = auroc(logits.softmax(dim=-1), labels, task="multiclass", num_classes=num_labels, average="macro")
    else:
        value = auroc(logits.sigmoid(), labels, task="multilabel", num_labels=num_labels, average="macro")
    return float(value)


def mcc_from_confusion(cm: torch.Tensor) -> float:
    """Matthews correlation (Gorodkin's K-class form) from a (K, K) confusion matrix (rows true, columns
    predicted); 0 when a row or column total makes it undefined (a constant predictor, one true class), as
    scikit-learn defines it.

    Hand-written because torchmetrics' ``matthews_corrcoef`` (1.x) returns a non-zero value for a constant
    predictor on an imbalanced binary split (0.030 for 'always positive' at 63 % positives), which made a
    majority-class model look better than chance."""
    cm = cm.double()
    t, p, s, c = cm.sum(dim=1), cm.sum(dim=0), cm.sum(), cm.trace()
    denom = (s * s - (p * p).sum()) * (s * s - (t * t).sum())
    if denom <= 0:
        return 0.0
    return float((c * s - (p * t).sum()) / denom.sqrt())


def confusion_counts(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows true, columns predicted (multilabel: flatten first, K = 2)."""
    counts = torch.bincount(labels.reshape(-1) * num_classes + preds.reshape(-1), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _mcc(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    return mcc_from_confusion(confusion_counts(preds, labels, num_classes))


def compute_metrics(
    kind: Kind, logits: torch.Tensor, labels: torch.Tensor, num_labels: int
) -> dict[str, float]:
    """accuracy, macro_f1, auroc, mcc (plus micro_f1 for multilabel); auroc is nan when undefined.

    Binary macro_f1 averages F1 over both classes. Multilabel accuracy is element-wise (1 - Hamming loss)
    and mcc is computed over all (sample, label) decisions pooled.
    """
    # Imported here: torchmetrics pulls in matplotlib.pyplot and ~1 s of imports at import time.
    from torchmetrics.functional import accuracy, f1_score

    x, y = _prepare(kind, logits, labels, num_labels)
    preds = predictions(kind, x)
    # Degenerate splits (one predicted class, empty F1 denominators) make torchmetrics warn on every
    # call; the values it returns (0) are what we want, so silence the noise here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "multilabel":
            out = {
                "accuracy": float(accuracy(preds, y, task="multilabel", num_labels=num_labels, average="micro")),
                "macro_f1": float(f1_score(preds, y, task="multilabel", num_labels=num_labels, average="macro")),
                "micro_f1": float(f1_score(preds, y, task="multilabel", num_labels=num_labels, average="micro")),
                "mcc": _mcc(preds.reshape(-1), y.reshape(-1), 2),
            }
        else:
            # Binary is scored as two-class multiclass so macro F1 covers the negative class too.
            n = 2 if kind == "binary" else num_labels
            out = {
                "accuracy": float(accuracy(preds, y, task="multiclass", num_classes=n, average="micro")),
                "macro_f1": float(f1_score(preds, y, task="multiclass", num_classes=n, average="macro")),
                "mcc": _mcc(preds, y, n),
            }
        out["auroc"] = _auroc(kind, x, y, num_labels)
    order = ("accuracy", "macro_f1", "micro_f1", "auroc", "mcc")
    return {key: out[key] for key in order if key in out}


def normalised_score(merged: float, single: float) -> float:
    """Merged-model score relative to the single-task expert's; nan when the reference is not positive."""
    if math.isnan(single) or math.isnan(merged) or single <= 0:
        return float("nan")
    return float(merged) / float(single)


def confusion(kind: Kind, logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Counts: (C, C) rows = true, cols = predicted; multilabel (L, 2, 2) per label [[TN, FP], [FN, TP]]."""
    from torchmetrics.functional import confusion_matrix

    x, y = _prepare(kind, logits, labels, num_labels)
    preds = predictions(kind, x)
    if kind == "multilabel":
        return confusion_matrix(preds, y, task="multilabel", num_labels=num_labels)
    n_classes = 2 if kind == "binary" else num_labels
    return confusion_matrix(preds, y, task="multiclass", num_classes=n_classes)
