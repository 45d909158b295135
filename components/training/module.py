"""LightningModules: a single-task classifier and the multi-task (mixed-batch) classifier."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)
from torchmetrics.utilities.data import dim_zero_cat

from components.config.training import LrSchedule
from components.core.errors import ArtifactError
from components.metrics.classification import (PRIMARY_METRICS, _auroc_defined, confusion_counts, mcc_from_confusion,
                                               predictions)
from components.training.schedule import optimizer_config


def task_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy, or for multilabel BCE. ``weight`` (``components.training.balance.loss_weight``): per-class
    weights of the cross-entropy, or a multilabel task's per-label positive weights; None: unweighted."""
    if weight is not None:
        weight = weight.to(logits.device, logits.dtype)
    if kind == "multilabel":
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weight)
    return nn.functional.cross_entropy(logits, labels, weight=weight)


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


# torchmetrics' warnings on degenerate validation data (one class only, empty F1 denominators, a rank that saw no
# sample of a task): the values it returns are the ones compute_metrics returns, so these are noise.
_DEGENERATE_WARNINGS = (
    r"No (positive|negative) samples",
    r".*was `nan`\. Ignoring these classes",
    r"Detected zero division",
    r"The ``compute`` method of metric .* was called before the ``update`` method",
)


@contextmanager
def _quiet_degenerate() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _DEGENERATE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def _auroc_or_nan(kind: str, width: int, target: torch.Tensor | list[torch.Tensor],
                  compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """nan, as compute_metrics gives, where the labels lack a class; ``target`` is already synced across ranks."""
    labels = dim_zero_cat(target)
    if not _auroc_defined(kind, labels, width):
        return torch.tensor(math.nan, device=labels.device)
    return compute()


class _BinaryAUROC(BinaryAUROC):
    def compute(self) -> torch.Tensor:
        return _auroc_or_nan("binary", 2, self.target, super().compute)


class _MulticlassAUROC(MulticlassAUROC):
    def compute(self) -> torch.Tensor:
        return _auroc_or_nan("multiclass", self.num_classes, self.target, super().compute)


class _MultilabelAUROC(MultilabelAUROC):
    def compute(self) -> torch.Tensor:
        return _auroc_or_nan("multilabel", self.num_labels, self.target, super().compute)


class _Samples(Metric):
    """How many samples were scored, over all ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, target: torch.Tensor) -> None:
        self.count += target.shape[0]

    def compute(self) -> torch.Tensor:
        return self.count


class _MCC(Metric):
    """MCC from confusion counts summed over ranks, computed exactly as ``compute_metrics`` does
    (``mcc_from_confusion``: 0 for a constant predictor, where torchmetrics' own is not)."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion += confusion_counts(preds.long(), target.long(), self.num_classes).to(self.confusion.device)

    def compute(self) -> torch.Tensor:
        return torch.tensor(mcc_from_confusion(self.confusion))


def _score_metric(kind: str, width: int, metric: str) -> Metric:
    """The torchmetrics twin of ``compute_metrics(kind, ...)[metric]``: same task, average and inputs."""
    if kind not in ("binary", "multiclass", "multilabel"):
        raise ValueError(f"unknown task kind {kind!r}; expected binary, multiclass or multilabel")
    if metric not in PRIMARY_METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(PRIMARY_METRICS)}")
    if metric == "auroc":
        if kind == "binary":
            return _BinaryAUROC()
        if kind == "multilabel":
            return _MultilabelAUROC(width, average="macro")
        return _MulticlassAUROC(width, average="macro")
    if kind == "multilabel":  # accuracy element-wise (micro), mcc over the pooled decisions
        if metric == "accuracy":
            return MultilabelAccuracy(width, average="micro")
        return MultilabelF1Score(width, average="macro") if metric == "macro_f1" else _MCC(2)  # pooled decisions
    # binary is scored as two-class multiclass, so macro F1 covers the negative class too
    if metric == "accuracy":
        return MulticlassAccuracy(width, average="micro")
    return MulticlassF1Score(width, average="macro") if metric == "macro_f1" else _MCC(width)


class ValidationScore(MetricCollection):
    """``compute_metrics(kind, logits, labels, num_labels)[metric]``, accumulated batch by batch over every rank.

    Stateful torchmetrics: the states (confusion counts; for auroc the scores and labels) are gathered across
    DDP ranks before computing, so the score is that of the whole validation split, not a mean of per-rank
    scores. The states are not persistent: they never enter a ``state_dict``, hence never a checkpoint.
    """

    SAMPLES = "samples"

    def __init__(self, kind: str, num_labels: int, metric: str) -> None:
        width = 2 if kind == "binary" else num_labels
        super().__init__({metric: _score_metric(kind, width, metric), self.SAMPLES: _Samples()}, compute_groups=False)
        self.task_kind, self.metric_name = kind, metric

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Score a batch; an empty one (a task absent from a mixed batch) is allowed."""
        x = logits.detach().float()  # bf16 logits from mixed precision, as compute_metrics does
        y = labels.detach()
        if self.task_kind == "multilabel":
            y = (y > 0.5).long() if y.is_floating_point() else y.long()  # BCE targets may be float 0/1
        else:
            y = y.reshape(-1).long()
        self[self.SAMPLES].update(y)
        score = self[self.metric_name]
        if self.metric_name == "auroc":
            # auroc keeps scores and labels (list states). It takes empty batches too, so that a rank without
            # samples of a task still holds tensors of the right shape and dtype to gather under DDP.
            if self.task_kind == "multilabel":
                score.update(x.sigmoid(), y)
            else:
                probs = x.softmax(dim=-1)
                score.update(probs[:, 1] if self.task_kind == "binary" else probs, y)
        elif len(y):  # count states stay zero without updates; torchmetrics refuses empty batches here
            score.update(predictions(self.task_kind, x), y)

    def score(self) -> float | None:
        """The metric over every rank's samples (nan where auroc is undefined); None where no rank scored any.

        Under DDP every rank must call it (it gathers the states); ranks that called ``add`` equally often
        take the same branches.
        """
        samples = self[self.SAMPLES]
        if not samples.update_called:
            return None
        with _quiet_degenerate():
            if int(samples.compute()) == 0:
                return None
            return float(self[self.metric_name].compute())


def log_score(module: L.LightningModule, name: str, value: float, prog_bar: bool = False) -> None:
    """Log a value that is already the same on every rank (computed from synced metric states).

    ``sync_dist`` with ``max`` keeps it exact (a mean of copies can be off by an ulp) and tells Lightning it is
    synchronised (else it suggests syncing a per-rank mean, the very mistake avoided here).
    """
    module.log(name, value, prog_bar=prog_bar, sync_dist=True, reduce_fx="max")


class ClassifierModule(TrainableCheckpoint):
    """Trains whatever parameters of ``model`` require grad; validates on ``metric`` (over all ranks under DDP)."""

    def __init__(
        self, model: nn.Module, kind: str, num_labels: int, lr: float, weight_decay: float, metric: str,
        loss_weight: torch.Tensor | None = None, lr_schedule: LrSchedule = "constant",
    ) -> None:
        super().__init__()
        self.model, self.kind, self.num_labels = model, kind, num_labels
        self.lr, self.weight_decay, self.metric, self.lr_schedule = lr, weight_decay, metric, lr_schedule
        self.loss_weight = loss_weight  # class balance of the training labels (components.training.balance)
        self.val_score = ValidationScore(kind, num_labels, metric)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "task_ids")}
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss = task_loss(self.kind, self(batch), batch["labels"], self.loss_weight)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch["labels"]),
                 sync_dist=True)  # the mean over DDP ranks (a no-op in one process)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_score.reset()  # nothing left over from an interrupted validation

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        logits = self(batch)
        self.log("val_loss", task_loss(self.kind, logits, batch["labels"], self.loss_weight), on_epoch=True,
                 batch_size=len(batch["labels"]), sync_dist=True)
        self.val_score.add(logits, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        value = self.val_score.score()
        self.val_score.reset()
        if value is not None:
            log_score(self, f"val_{self.metric}", value, prog_bar=True)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return optimizer_config(self, torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay),
                                self.lr_schedule)


def task_labels(labels: torch.Tensor, kind: str, width: int) -> torch.Tensor:
    """One task's labels out of a mixed batch: class ids as they are; padded rows (``mixed_tasks`` with a multilabel
    task present) cut to the task's width, and back to class ids for a single-label task."""
    if labels.ndim == 1:
        return labels
    labels = labels[:, :width]
    return labels if kind == "multilabel" else labels.argmax(dim=1)


class MultiTaskModule(TrainableCheckpoint):
    """Mixed batches of several tasks: shared encoder features, each sample scored by its own head."""

    def __init__(self, model: nn.Module, task_names: list[str], kinds: dict[str, str], lr: float,
                 weight_decay: float, loss_weights: Mapping[str, torch.Tensor | None] | None = None,
                 lr_schedule: LrSchedule = "constant") -> None:
        super().__init__()
        self.model, self.task_names, self.kinds = model, task_names, kinds
        self.lr, self.weight_decay, self.lr_schedule = lr, weight_decay, lr_schedule
        self.loss_weights = dict(loss_weights or {})  # per task, its class balance (components.training.balance)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "task_ids")}
        feats = self.model.encoder(**inputs)
        total = feats.new_zeros(())
        for i, name in enumerate(self.task_names):
            mask = batch["task_ids"] == i
            if mask.any():
                logits = self.model.heads[name](feats[mask])
                labels = task_labels(batch["labels"][mask], self.kinds[name], logits.shape[1])
                total = total + task_loss(self.kinds[name], logits, labels, self.loss_weights.get(name)) * mask.sum()
        return total / len(batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch["labels"]),
                 sync_dist=True)  # the mean over DDP ranks (a no-op in one process)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        self.log("val_loss", self._loss(batch), on_epoch=True, batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> Any:
        return optimizer_config(self, torch.optim.AdamW(self.model.parameters(), lr=self.lr,
                                                        weight_decay=self.weight_decay), self.lr_schedule)
