"""Keep the best epoch's trainable weights in memory and restore them when training ends.

Lightning's ModelCheckpoint writes the whole model to disk every time; for adapters the trainable
part is a few hundred KB, so a copy in memory is enough and costs nothing.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch


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
