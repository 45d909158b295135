"""LightningModules: a single-task classifier and the multi-task (mixed-batch) classifier."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from components.core.errors import ArtifactError
from components.metrics.classification import compute_metrics


def task_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "multilabel":
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    return nn.functional.cross_entropy(logits, labels)


class TrainableCheckpoint(L.LightningModule):
    """Checkpoints hold only the trainable weights: an adapter's checkpoint is KBs, not the frozen foundation
    again (the foundation is rebuilt and hash-checked from its own stage before resuming)."""

    strict_loading = False  # the frozen weights are absent from the checkpoint by design

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        stored = set(checkpoint["state_dict"])
        if stored != trainable:
            missing, extra = sorted(trainable - stored)[:3], sorted(stored - trainable)[:3]
            raise ArtifactError(f"checkpoint does not match the model being trained (missing {missing}, "
                                f"unexpected {extra}); delete it to start over")


class ClassifierModule(TrainableCheckpoint):
    """Trains whatever parameters of ``model`` require grad; validates on ``metric``."""

    def __init__(
        self, model: nn.Module, kind: str, num_labels: int, lr: float, weight_decay: float, metric: str
    ) -> None:
        super().__init__()
        self.model, self.kind, self.num_labels = model, kind, num_labels
        self.lr, self.weight_decay, self.metric = lr, weight_decay, metric
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "task_ids")}
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss = task_loss(self.kind, self(batch), batch["labels"])
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        logits = self(batch)
        self.log("val_loss", task_loss(self.kind, logits, batch["labels"]), on_epoch=True,
                 batch_size=len(batch["labels"]))
        self._val_logits.append(logits.float().cpu())
        self._val_labels.append(batch["labels"].cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        metrics = compute_metrics(
            self.kind, torch.cat(self._val_logits), torch.cat(self._val_labels), self.num_labels
        )
        self.log(f"val_{self.metric}", metrics[self.metric], prog_bar=True, sync_dist=True)
        self._val_logits.clear()
        self._val_labels.clear()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class MultiTaskModule(TrainableCheckpoint):
    """Mixed batches of several tasks: shared encoder features, each sample scored by its own head."""

    def __init__(self, model: nn.Module, task_names: list[str], kinds: dict[str, str], lr: float,
                 weight_decay: float) -> None:
        super().__init__()
        self.model, self.task_names, self.kinds = model, task_names, kinds
        self.lr, self.weight_decay = lr, weight_decay

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "task_ids")}
        feats = self.model.encoder(**inputs)
        total = feats.new_zeros(())
        for i, name in enumerate(self.task_names):
            mask = batch["task_ids"] == i
            if mask.any():
                logits = self.model.heads[name](feats[mask])
                total = total + task_loss(self.kinds[name], logits, batch["labels"][mask]) * mask.sum()
        return total / len(batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        self.log("val_loss", self._loss(batch), on_epoch=True, batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
