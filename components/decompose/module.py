"""The distillation LightningModule: mixed-task batches through the student in one pass, LoRKD loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from components.config.training import LrSchedule
from components.decompose.layers import ExpertLayer
from components.decompose.loss import lorkd_loss, task_targets
from components.decompose.student import LoRKDStudent
from components.core.errors import ParamsError
from components.training.module import ValidationScore, log_score
from components.training.schedule import optimizer_config

EXTRA_KEYS = ("labels", "task_ids", "teacher_logits")


class DecomposeModule(L.LightningModule):
    """Trains the whole student (shared weights, experts, heads); validates ``val_<metric>`` averaged over tasks
    (per task as ``val_<metric>_<task>``, each over the whole validation split, all DDP ranks together)."""

    def __init__(self, student: LoRKDStudent, kinds: Mapping[str, str], kd_weight: float, temperature: float,
                 lr: float, weight_decay: float, metric: str = "macro_f1",
                 loss_weights: Mapping[str, torch.Tensor | None] | None = None,
                 lr_schedule: LrSchedule = "constant") -> None:
        super().__init__()
        missing = [t for t in student.task_names if t not in kinds]
        if missing:
            raise ParamsError(f"no task kind for student task(s) {missing}")
        self.student = student
        self.kinds = [kinds[t] for t in student.task_names]
        self.widths = [student.num_labels[t] for t in student.task_names]
        self.kd_weight, self.temperature = kd_weight, temperature
        # per task (task-id order): its class balance (components.training.balance), None: unweighted
        self.loss_weights = [(loss_weights or {}).get(t) for t in student.task_names]
        self.lr, self.weight_decay, self.metric, self.lr_schedule = lr, weight_decay, metric, lr_schedule
        # one per task, in task-id order (a list, not a dict: task names need not be valid module names)
        self.val_scores = nn.ModuleList(ValidationScore(kind, width, metric)
                                        for kind, width in zip(self.kinds, self.widths, strict=True))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in EXTRA_KEYS}
        return self.student(batch["task_ids"], **inputs)

    def _loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return lorkd_loss(logits, batch["labels"], batch["teacher_logits"], batch["task_ids"], self.kinds,
                          self.widths, self.kd_weight, self.temperature, loss_weights=self.loss_weights)

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss, parts = self._loss(batch, self(batch))
        n = len(batch["task_ids"])
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        self.log("train_task_loss", parts["task"], on_step=False, on_epoch=True, batch_size=n)
        self.log("train_kd_loss", parts["kd"], on_step=False, on_epoch=True, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        for scores in self.val_scores:
            scores.reset()  # nothing left over from an interrupted validation

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        logits = self(batch)
        loss, _ = self._loss(batch, logits)
        self.log("val_loss", loss, on_epoch=True, batch_size=len(batch["task_ids"]))
        ids, labels = batch["task_ids"], batch["labels"]
        for t, (kind, width, scores) in enumerate(zip(self.kinds, self.widths, self.val_scores, strict=True)):
            # every task every batch, empty or not: each rank then runs the same metric syncs at epoch end
            mask = ids == t
            scores.add(logits[mask, :width], task_targets(labels[mask], kind, width))

    def on_validation_epoch_end(self) -> None:
        values: dict[str, float] = {}
        for name, scores in zip(self.student.task_names, self.val_scores, strict=True):
            value = scores.score()
            scores.reset()
            if value is not None:  # else no rank had a sample of this task
                values[name] = value
                log_score(self, f"val_{self.metric}_{name}", value)
        if not values:
            return
        defined = [v for v in values.values() if not math.isnan(v)]  # auroc is nan where a task lacks a class
        mean = sum(defined) / len(defined) if defined else float("nan")
        log_score(self, f"val_{self.metric}", mean, prog_bar=True)

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
        return optimizer_config(self, torch.optim.AdamW(groups, lr=self.lr), self.lr_schedule)
