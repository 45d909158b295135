"""The distillation LightningModule: mixed-task batches through the student in one pass, LoRKD loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from components.decompose.layers import ExpertLayer
from components.decompose.loss import lorkd_loss, task_targets
from components.decompose.student import LoRKDStudent
from components.core.errors import ParamsError
from components.metrics.classification import compute_metrics

EXTRA_KEYS = ("labels", "task_ids", "teacher_logits")


class DecomposeModule(L.LightningModule):
    """Trains the whole student (shared weights, experts, heads); validates ``val_<metric>`` averaged over tasks
    (per task as ``val_<metric>_<task>``)."""

    def __init__(self, student: LoRKDStudent, kinds: Mapping[str, str], kd_weight: float, temperature: float,
                 lr: float, weight_decay: float, metric: str = "macro_f1") -> None:
        super().__init__()
        missing = [t for t in student.task_names if t not in kinds]
        if missing:
            raise ParamsError(f"no task kind for student task(s) {missing}")
        self.student = student
        self.kinds = [kinds[t] for t in student.task_names]
        self.widths = [student.num_labels[t] for t in student.task_names]
        self.kd_weight, self.temperature = kd_weight, temperature
        self.lr, self.weight_decay, self.metric = lr, weight_decay, metric
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in EXTRA_KEYS}
        return self.student(batch["task_ids"], **inputs)

    def _loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return lorkd_loss(logits, batch["labels"], batch["teacher_logits"], batch["task_ids"], self.kinds,
                          self.widths, self.kd_weight, self.temperature)

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss, parts = self._loss(batch, self(batch))
        n = len(batch["task_ids"])
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        self.log("train_task_loss", parts["task"], on_step=False, on_epoch=True, batch_size=n)
        self.log("train_kd_loss", parts["kd"], on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        logits = self(batch)
        loss, _ = self._loss(batch, logits)
        self.log("val_loss", loss, on_epoch=True, batch_size=len(batch["task_ids"]))
        self._val.append((logits.float().cpu(), batch["labels"].cpu(), batch["task_ids"].cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        logits, labels, ids = (torch.cat(parts) for parts in zip(*self._val, strict=True))
        self._val.clear()
        scores = []
        for t, (name, kind, width) in enumerate(zip(self.student.task_names, self.kinds, self.widths, strict=True)):
            mask = ids == t
            if not mask.any():
                continue
            value = compute_metrics(kind, logits[mask, :width], task_targets(labels[mask], kind, width),
                                    width)[self.metric]
            self.log(f"val_{self.metric}_{name}", value, sync_dist=True)
            if not math.isnan(value):
                scores.append(value)
        mean = sum(scores) / len(scores) if scores else float("nan")
        self.log(f"val_{self.metric}", mean, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        # No weight decay on experts: AdamW decays every parameter every step, so a task's expert would
        # also shrink on the batches that hold none of its samples (its gradient there is exactly zero).
        expert_ids = {id(p) for m in self.student.modules() if isinstance(m, ExpertLayer)
                      for p in (m.expert_a, m.expert_b)}
        params = [p for p in self.student.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) not in expert_ids], "weight_decay": self.weight_decay},
            {"params": [p for p in params if id(p) in expert_ids], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.lr)
