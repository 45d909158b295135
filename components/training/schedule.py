"""Learning-rate schedules of the trainers (``trainer.lr_schedule``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from components.config.training import LrSchedule

WARMUP_FRACTION = 0.15  # one_cycle's rising part (torch's pct_start; the DermaMNIST check in params/profiles/full.yaml)


def optimizer_config(module: L.LightningModule, optimizer: torch.optim.Optimizer, schedule: LrSchedule) -> Any:
    """What ``configure_optimizers`` returns: the optimizer alone (constant step size), or with torch's OneCycleLR
    stepped every optimizer step (warm-up to ``lr``, then cosine annealing to ~0 over the run's
    ``max_epochs``, Smith & Topin 2019). Lightning saves and restores the schedule's state with the optimizer's,
    so a resumed run continues the same curve."""
    if schedule == "constant":
        return optimizer
    if schedule != "one_cycle":
        raise ValueError(f"unknown lr_schedule {schedule!r}; known: constant, one_cycle")
    scheduler = one_cycle(optimizer, int(module.trainer.estimated_stepping_batches))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR peaking at each parameter group's own ``lr``, over ``total_steps`` optimizer steps (for loops
    outside Lightning: call ``step()`` after every ``optimizer.step()``). Its defaults otherwise, as measured
    (bench/results/lr_schedule.json): the start is lr / 25, and AdamW's beta1 cycles opposite to the step size
    (0.95 -> 0.85 at the peak -> 0.95)."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=max(total_steps, 1),
                                               pct_start=WARMUP_FRACTION)
