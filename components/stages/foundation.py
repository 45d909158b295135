"""The foundation stage: describe the text encoder (weights hash) and pre-train (or copy) the image foundation:
one CNN, one head per image task, trained on mixed batches."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from components.config import FoundationParams
from components.core.artifacts import read_manifest
from components.core.errors import DataError, ParamsError
from components.core.layout import foundation_dir
from components.data.datasets import TaskData, load_split
from components.nn.encoders import image_tensor
from components.nn.foundation import describe_text_foundation, new_image_model, save_image_foundation
from components.stages.base import StageSummary, TaskInputs, param
from components.training.augment import ImageAugment, task_augment
from components.training.balance import loss_weight
from components.training.data import TensorDictDataset, labels_tensor, loader
from components.training.module import MultiTaskModule
from components.training.trainer import build_trainer, data_device, resume_from

log = logging.getLogger("medexperts")


class FoundationInputs(TaskInputs):
    foundation: FoundationParams = param("foundation")
    seed: int = param("pipeline.seed")


class FoundationInfo(StageSummary):
    sha256: str
    parameters: int
    source: str


class FoundationSummary(StageSummary):
    text: FoundationInfo | None = None
    image: FoundationInfo | None = None


def _mixed(tasks: dict[str, TaskData], augment: ImageAugment | None = None) -> TensorDictDataset:
    shapes = {n: tuple(t.inputs.shape[1:3]) for n, t in tasks.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"image pre-training needs one image size; the active image tasks have {shapes}")
    pixels = torch.cat([image_tensor(t.inputs)["pixels"] for t in tasks.values()])
    labels = torch.cat([torch.as_tensor(t.labels).long() for t in tasks.values()])
    ids = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(tasks.values())])
    return TensorDictDataset({"pixels": pixels}, labels, ids, augment)


def pretrain_image_foundation(inp: FoundationInputs, data_dir: Path, out_dir: Path, logger: Any = False,
                              checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Multi-task pre-training on the union of the active image tasks' train splits (resumable from
    ``checkpoint_dir``, see ``train_expert``)."""
    ip, seed = inp.foundation.image, inp.seed
    specs = inp.active_tasks("image")
    multilabel = [n for n, s in specs.items() if s.kind == "multilabel"]
    if multilabel:
        raise ParamsError(f"data.tasks: image pre-training supports single-label tasks; {multilabel} are multilabel")
    cap = ip.trainer.max_train_samples
    train = {n: load_split(data_dir, n, "train").subset(cap, seed) for n in specs}
    val = {n: load_split(data_dir, n, "val") for n in specs}
    L.seed_everything(seed, workers=True, verbose=False)
    model = new_image_model(ip, train)
    weights = {n: loss_weight(t.kind, labels_tensor(t.labels, t.kind), t.num_labels, ip.trainer.class_weight)
               for n, t in train.items()}
    module = MultiTaskModule(model, list(train), {n: t.kind for n, t in train.items()}, ip.trainer.lr,
                             ip.trainer.weight_decay, weights, ip.trainer.lr_schedule)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        trainer = build_trainer(ip.trainer, Path(root), logger=logger, monitor="val_loss", mode="min",
                                checkpoint_dir=checkpoint_dir, label="[foundation] image pre-training")
        device = data_device(ip.trainer)
        augment = task_augment([specs[n].augment for n in train], seed)
        trainer.fit(module, loader(_mixed(train, augment).to(device), ip.trainer.batch_size, shuffle=True, seed=seed),
                    loader(_mixed(val).to(device), 256, shuffle=False), ckpt_path=resume_from(checkpoint_dir))
    model.cpu()
    seconds = time.perf_counter() - t0
    log.info("[foundation] image %s (%.2fM parameters) pre-trained on %s in %.1fs", ip.arch,
             sum(p.numel() for p in model.encoder.parameters()) / 1e6, list(train), seconds)
    return save_image_foundation(model.eval(), train, out_dir, {
        "source": "pretrain", "tasks": list(train), "train_samples": {n: len(t) for n, t in train.items()},
        "train_seconds": seconds, "seed": seed,
    })


def copy_image_checkpoint(source: Path, out_dir: Path) -> dict[str, Any]:
    """Use an image foundation written earlier by this stage (verified against its manifest)."""
    manifest = read_manifest(source, kind="foundation")
    if manifest.get("modality") != "image":
        raise ParamsError(f"foundation.image.source: {source} is not an image foundation")
    shutil.copytree(source, out_dir, dirs_exist_ok=True)
    return manifest


def run(inp: FoundationInputs, project_dir: Path, data_dir: Path, out_dir: Path, logger: Any = False,
        checkpoint_dir: Path | None = None) -> FoundationSummary:
    """The stage: one foundation per modality that has active tasks, under ``out_dir/<modality>``."""
    summary = FoundationSummary()
    if inp.active_tasks("text"):
        m = describe_text_foundation(inp.foundation, project_dir, foundation_dir(out_dir, "text"))
        summary.text = FoundationInfo(sha256=m["sha256"], parameters=m["parameters"], source=m["source"])
    if inp.active_tasks("image"):
        image_out = foundation_dir(out_dir, "image")
        if inp.foundation.image.source == "pretrain":
            m = pretrain_image_foundation(inp, data_dir, image_out, logger=logger,
                                          checkpoint_dir=checkpoint_dir / "image" if checkpoint_dir else None)
        else:
            m = copy_image_checkpoint(project_dir / inp.foundation.image.source, image_out)
        summary.image = FoundationInfo(sha256=m["sha256"], parameters=m["parameters"], source=m["source"])
    return summary
