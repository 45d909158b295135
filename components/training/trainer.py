"""The one Trainer factory: precision, devices, strategy and callbacks all come from params."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from components.config import TrainerParams
from components.training.callbacks import RestoreBestTrainable


def resolve_precision(tp: TrainerParams) -> str:
    """bf16-mixed on a GPU, 32-bit on CPU, unless params name one."""
    if tp.precision != "auto":
        return tp.precision
    on_gpu = tp.accelerator == "gpu" or (tp.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def build_trainer(
    tp: TrainerParams,
    root_dir: Path,
    *,
    logger: Any = False,
    monitor: str | None = None,
    mode: str = "max",
    progress: bool | None = None,
) -> L.Trainer:
    """A Lightning Trainer for ``tp``. With ``monitor``: the best epoch's trainable weights are restored
    at the end, and training stops early after ``early_stopping_patience`` epochs without gain."""
    callbacks: list[L.Callback] = []
    if monitor:
        callbacks.append(RestoreBestTrainable(monitor, mode))
    if tp.early_stopping_patience and monitor:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=tp.early_stopping_patience,
                                       check_finite=False))
    # Lightning's hints about dataloader workers and tiny logging intervals are noise for in-memory data.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    return L.Trainer(
        max_epochs=tp.max_epochs,
        accelerator=tp.accelerator,
        devices=tp.devices,
        num_nodes=tp.num_nodes,
        strategy=tp.strategy,
        precision=resolve_precision(tp),
        accumulate_grad_batches=tp.accumulate_grad_batches,
        deterministic=tp.deterministic,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=sys.stderr.isatty() if progress is None else progress,
        enable_model_summary=False,
        default_root_dir=str(root_dir),
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )
