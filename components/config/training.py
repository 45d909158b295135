"""Trainer settings shared by every stage that trains (foundation, experts, decompose)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from components.config.base import PerModality, Strict


# How a loss weighs classes (components/training/balance.py): the trainers', the probe's and the federated clients'.
ClassWeight = Literal["balanced", "none"]
# The trainers' learning-rate schedule (components/training/schedule.py).
LrSchedule = Literal["constant", "one_cycle"]


class TrainerParams(Strict):
    max_epochs: int = Field(3, ge=1, description="Epochs.")
    batch_size: int = Field(32, ge=1, description="Samples per step (per device).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (one_cycle: the peak).")
    lr_schedule: LrSchedule = Field("constant", description="constant, or one_cycle: warm-up over the first 15 % of "
                                    "the steps to lr, then cosine annealing to ~0 at max_epochs (torch's OneCycleLR); "
                                    "with early_stopping_patience the run may stop before the annealing.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description="Lightning accelerator.")
    devices: int | Literal["auto"] = Field(1, description="Devices per node (>1 or 'auto' with strategy ddp).")
    num_nodes: int = Field(1, ge=1, description="Nodes (DDP across nodes when > 1).")
    strategy: Literal["auto", "ddp"] = Field("auto", description="Lightning strategy.")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto = bf16-mixed on GPU, 32-true on CPU."
    )
    accumulate_grad_batches: int = Field(1, ge=1, description="Gradient accumulation steps.")
    early_stopping_patience: int = Field(0, ge=0, description="Epochs without val improvement; 0 = off.")
    deterministic: bool = Field(False, description="torch deterministic algorithms.")
    max_train_samples: int | None = Field(None, ge=1, description="Cap on training samples per task.")
    resume: bool = Field(True, description="Checkpoint every epoch (trainable weights, optimiser, callbacks) and "
                         "resume a killed run from its last checkpoint.")
    class_weight: ClassWeight = Field(
        "balanced", description="balanced: each class (multilabel: each label's positives) weighs n / (k * n_c) in "
                                "the loss, from the training labels (macro-F1 on imbalanced tasks); none: plain "
                                "cross-entropy / BCE.")
    group_by_length: bool = Field(False, description="Text: batch rows of like lengths (sorted within random chunks "
                                  "of up to 50 batches, the batches then in random order), so short texts skip the "
                                  "padding a random batch's longest text forces (bench/results/length_grouping.json); "
                                  "images: no effect.")
    data_on_device: bool = Field(True, description="Move in-memory training data to the GPU once (single-device "
                                 "runs), instead of copying every batch from the host.")


class ModalityTrainers(PerModality[TrainerParams]):
    text: TrainerParams = Field(default_factory=TrainerParams, description="Training of text experts.")
    image: TrainerParams = Field(default_factory=TrainerParams, description="Training of image experts.")
