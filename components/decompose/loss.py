"""LoRKD loss: each sample's supervised task loss + kd_weight · T² · KL(teacher || student) on its task's logits."""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

from components.training.module import task_loss


def task_targets(labels: torch.Tensor, kind: str, num_labels: int) -> torch.Tensor:
    """Labels of one task from a mixed batch: class ids (N,) stay; (N, max L) rows are cut to the task
    (multilabel) or turned back into class ids (one-hot single-label rows)."""
    if labels.ndim == 1:
        return labels
    if kind == "multilabel":
        return labels[:, :num_labels].float()
    return labels[:, :num_labels].argmax(dim=1)


def distill_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student), times T² (Hinton) so its gradient scale does not shrink with T.

    Single-label: KL between the softmax distributions, averaged over samples. Multilabel: the labels are
    independent Bernoullis, so the per-label binary KL between sigmoid(t/T) and sigmoid(s/T), averaged
    over samples and labels.
    """
    s, t = student / temperature, teacher / temperature
    if kind == "multilabel":
        p = torch.sigmoid(t)
        log_p, log_not_p = F.logsigmoid(t), F.logsigmoid(-t)
        kl = p * (log_p - F.logsigmoid(s)) + (1 - p) * (log_not_p - F.logsigmoid(-s))
        return kl.mean() * temperature**2
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def lorkd_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, task_ids: torch.Tensor,
               kinds: list[str], num_labels: list[int], kd_weight: float, temperature: float,
               reduction: Literal["mean", "sum"] = "mean", loss_weights: list[torch.Tensor | None] | None = None,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of a mixed batch and its parts (``task``, ``kd``), summed per sample then averaged over the batch.
    ``loss_weights``: per task, its class balance (``components.training.balance.loss_weight``: per-class weights,
    a multilabel task's per-label positive weights; None: unweighted), as the probe and the experts use: rare
    classes and labels are not learnt as "never".

    ``logits`` and ``teacher`` are (N, max L), zero-padded. The loop runs over the T tasks, not the
    samples, and only over the head outputs (the backbone pass is already done): the tasks differ in loss
    kind and label count, so a masked loss per task is the clear way; it costs T small ops per step.
    """
    sup = logits.new_zeros(())
    kd = logits.new_zeros(())
    for t, (kind, width) in enumerate(zip(kinds, num_labels, strict=True)):
        mask = task_ids == t
        count = int(mask.sum())
        if not count:
            continue
        s = logits[mask, :width]
        weight = loss_weights[t] if loss_weights is not None else None
        sup = sup + task_loss(kind, s, task_targets(labels[mask], kind, width), weight) * count
        kd = kd + distill_loss(kind, s, teacher[mask, :width], temperature) * count
    if reduction == "mean":
        sup, kd = sup / len(task_ids), kd / len(task_ids)
    return sup + kd_weight * kd, {"task": sup.detach(), "kd": kd.detach()}
