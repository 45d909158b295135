"""Keep the best epoch's trainable weights in memory and restore them when training ends.

Lightning's ModelCheckpoint writes the whole model to disk every time; for adapters the trainable
part is a few hundred KB, so a copy in memory is enough and costs nothing.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from components.core import stop

log = logging.getLogger("medexperts")

class RestoreBestTrainable(L.Callback):
    def __init__(self, monitor: str, mode: str = "max") -> None:
        self.monitor, self.mode = monitor, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch: int | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def _better(self, value: float) -> bool:
        return value > self.best if self.mode == "max" else value < self.best

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not math.isnan(value) and self._better(value):
            self.best, self.best_epoch = value, trainer.current_epoch
            self._state = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, Any]:  # saved in checkpoints: a resumed run still restores the best epoch
        return {"best": self.best, "best_epoch": self.best_epoch, "state": self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self._state = state["best"], state["best_epoch"], state["state"]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is None:
            return
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            for name, value in self._state.items():
                params[name].copy_(value)


class ResumableEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, with one fix for resuming: a run that had already stopped early (its patience
    spent) and is resumed from its last checkpoint stays stopped. Lightning restores the patience count but not the
    stop itself, so every resume of a finished run trained one more epoch, and a killed and re-run stage gave
    another model than one that ran straight through."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.patience and self.wait_count >= self.patience:
            trainer.should_stop = True


class StopAtSafePoint(L.Callback):
    """A stop request (SIGTERM, ``components.core.stop``) ends training after the current batch, not in the middle
    of an optimiser step or a checkpoint write; Lightning's own SIGTERM flag would wait for the epoch's end."""

    def __init__(self, label: str) -> None:
        self.label = label

    def on_train_batch_end(self, *args: Any) -> None:
        stop.check(f"{self.label}: a training batch")

    def on_validation_batch_end(self, *args: Any) -> None:
        stop.check(f"{self.label}: a validation batch")

    def on_train_epoch_end(self, *args: Any) -> None:  # before Lightning's own check at the epoch's end
        stop.check(f"{self.label}: the end of an epoch")

    def on_validation_end(self, *args: Any) -> None:
        stop.check(f"{self.label}: the end of a validation")


class EpochLog(L.Callback):
    """One line per epoch on the ``medexperts`` logger (``<label>: epoch 2/5 train_loss 0.512 val_macro_f1 0.631,
    12.3 s, ETA 37 s``): what a log file or a scheduled run shows, where Lightning's progress bar (a TTY only) is
    off. Rank 0 only."""

    def __init__(self, label: str, monitor: str | None = None) -> None:
        self.label, self.monitor = label, monitor
        self._t0 = self._fit_t0 = 0.0
        self._first_epoch: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_t0 = time.perf_counter()
        self._first_epoch = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        if self._first_epoch is None:
            self._first_epoch = trainer.current_epoch  # > 0 when resumed from a checkpoint

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        now = time.perf_counter()
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs or 0
        done = epoch - (self._first_epoch or 0)
        per_epoch = (now - self._fit_t0) / max(done, 1)
        metrics = trainer.callback_metrics
        names = ["train_loss", "val_loss"] + ([self.monitor] if self.monitor and self.monitor != "val_loss" else [])
        log_epoch(self.label, epoch, total, {n: float(metrics[n]) for n in names if n in metrics}, now - self._t0,
                  per_epoch)


def log_epoch(label: str, epoch: int, total: int, metrics: dict[str, float], seconds: float,
              per_epoch: float) -> None:
    """``<label>: epoch 2/5 train_loss 0.5120 val_loss 0.6010, 12.3 s, ETA 37 s`` on the ``medexperts`` logger
    (``seconds``: this epoch's; ``per_epoch``: the mean so far, for the ETA). Lightning runs log it through
    ``EpochLog``; training loops outside Lightning call it directly."""
    shown = " ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    eta = f", ETA {per_epoch * (total - epoch):.0f} s" if total > epoch else ""
    log.info("%s: epoch %d/%d %s, %.1f s%s", label, epoch, total, shown, seconds, eta)
