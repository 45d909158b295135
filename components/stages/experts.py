"""The experts stage: per task, a frozen-foundation linear probe, then the expert (experts.method) from it.

The driver runs ``train_expert`` once per active task (each in its own MLflow run) and collects ``ExpertRun``s.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from components.config import ExpertsParams, PrimaryMetric
from components.core.errors import ParamsError
from components.core.layout import expert_bundle
from components.data.datasets import TaskData, load_split
from components.metrics.counts import count_parameters
from components.metrics.memory import PeakMemory
from components.metrics.classification import compute_metrics
from components.experts.io import save_expert
from components.experts.lora import lora_targets
from components.experts.methods import get_method
from components.bundle.format import TaskHead, image_input, save_bundle
from components.training.augment import task_augment
from components.training.balance import loss_weight
from components.training.multilabel import best_thresholds, fold_thresholds
from components.training.prior_shift import class_priors, fold_prior_shift, tune_prior_shift
from components.training.probe import fit_probe
from components.nn.classifier import Classifier, make_head
from components.nn.foundation import Foundation, load_foundation
from components.training.data import TensorDictDataset, labels_tensor, loader
from components.training.inference import batched
from components.training.module import ClassifierModule
from components.training.trainer import build_trainer, data_device, resume_from

from components.stages.base import StageSummary, TaskInputs, param

log = logging.getLogger("medexperts")


class ExpertsInputs(TaskInputs):
    experts: ExpertsParams = param("experts")
    metric: PrimaryMetric = param("evaluate.primary_metric")
    seed: int = param("pipeline.seed")


class ExpertRun(StageSummary):
    """One task's expert as later stages see it (the full record is the expert's manifest)."""

    method: str
    val: dict[str, float]
    probe_val: dict[str, float]
    trainable_params: int
    train_seconds: float
    run_id: str | None = None  # the MLflow run that trained it


class ExpertsSummary(StageSummary):
    tasks: dict[str, ExpertRun]


def task_tensors(foundation: Foundation, data: TaskData) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tokenise / convert a split once; training then batches by index."""
    return foundation.inputs(data.inputs), labels_tensor(data.labels, data.kind)


def train_expert(task: str, inp: ExpertsInputs, data_dir: Path, foundation_dir: Path, out_dir: Path,
                 logger: Any = False, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Fit the probe and the expert of ``task``; write ``out_dir`` (an expert folder).

    ``checkpoint_dir``: where training checkpoints every epoch; a killed run called again with the same
    folder resumes from its last epoch. The caller keys the folder by everything that decides the result.
    """
    seed, metric, ep = inp.seed, inp.metric, inp.experts
    if task not in inp.active_tasks():
        raise ParamsError(f"unknown task {task!r} for the experts stage; active: {inp.active}")
    spec = inp.tasks[task]
    tp = ep.trainer.of(spec.modality)
    train = load_split(data_dir, task, "train").subset(tp.max_train_samples, seed)
    val = load_split(data_dir, task, "val")
    foundation = load_foundation(foundation_dir, train.modality)
    x_tr, y_tr = task_tensors(foundation, train)
    x_va, y_va = task_tensors(foundation, val)

    t0 = time.perf_counter()
    probe, probe_val = fit_probe((batched(foundation.encoder, x_tr), y_tr), (batched(foundation.encoder, x_va), y_va),
                                 train.kind, train.num_labels, ep.probe, metric, seed)
    probe_seconds = time.perf_counter() - t0
    log.info("[experts] %s: probe val %s=%.3f (%d train samples)", task, metric, probe_val[metric], len(train))

    L.seed_everything(seed, workers=True, verbose=False)  # same seed: every task starts from the same φ0
    method_name = ep.method_for(train.modality)
    method = get_method(method_name)
    encoder = method.build(foundation, ep, spec.description)
    lr = ep.lr_for(method_name, train.modality)
    head = copy.deepcopy(probe) if ep.head_init == "probe" else make_head(
        foundation.encoder.out_dim, train.num_labels)
    if ep.head_init == "probe" and probe_val.get("prior_shift"):
        # Start from the probe's own decision: the expert's shift is picked again after training, on its own logits.
        fold_prior_shift(head, class_priors(y_tr, head.out_features), -probe_val["prior_shift"])
    head.requires_grad_(True)
    model = Classifier(encoder, head)
    module = ClassifierModule(model, train.kind, train.num_labels, lr, tp.weight_decay, metric,
                              loss_weight(train.kind, y_tr, train.num_labels, tp.class_weight), tp.lr_schedule)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root, PeakMemory(data_device(tp).type) as memory:
        trainer = build_trainer(tp, Path(root), logger=logger, monitor=f"val_{metric}", checkpoint_dir=checkpoint_dir,
                                label=f"[experts] {task} {method.pretty}")
        device = data_device(tp)
        trainer.fit(
            module,
            loader(TensorDictDataset(x_tr, y_tr, augment=task_augment([spec.augment], seed)).to(device),
                   tp.batch_size, shuffle=True, seed=seed,
                   group_by_length=tp.group_by_length),
            loader(TensorDictDataset(x_va, y_va).to(device), tp.batch_size * 2, shuffle=False),
            ckpt_path=resume_from(checkpoint_dir),
        )
    model.cpu()
    train_seconds = time.perf_counter() - t0
    model.eval()
    prior_shift = 0.0
    if train.kind == "multilabel" and ep.probe.multilabel_thresholds:  # per-label thresholds on val, in the bias
        with torch.no_grad():
            fold_thresholds(head, best_thresholds(batched(model, x_va), y_va))
    elif train.kind != "multilabel" and ep.probe.prior_shift:  # the decision's prior shift on val, in the bias
        with torch.no_grad():
            prior_shift = tune_prior_shift(head, batched(model, x_va), y_va, y_tr)
    expert_val = compute_metrics(train.kind, batched(model, x_va), y_va, train.num_labels)
    log.info("[experts] %s: %s val %s=%.3f (probe %.3f) in %.1fs", task, method.pretty, metric,
             expert_val[metric], probe_val[metric], train_seconds)

    lp = ep.lora
    # The deployable form: ΔW folded into the foundation's weights, plain architecture, zero overhead.
    save_bundle(expert_bundle(out_dir), foundation, method.delta(encoder, foundation.encoder) if method.delta else {},
                {task: TaskHead(head, train.kind, train.label_names,
                                 image_input(train.inputs) if train.modality == "image" else None)}, name=f"{task}-expert",
                metadata={"method": method_name, "task": task, "val_metrics": expert_val},
                wrappers=method.wrappers(encoder) if method.wrappers else None)
    manifest = save_expert(out_dir, encoder, head, probe, {
        "task": task, "method": method_name, "modality": train.modality, "task_kind": train.kind,
        "label_names": train.label_names, "base_sha256": foundation.sha256,
        "lora": lp.model_dump(), "targets": lora_targets(lp, train.modality),
        "seed": seed, "train_samples": len(train), "val_samples": len(val), "prior_shift": prior_shift,
        "metrics": {"val": expert_val, "probe_val": probe_val},
        "trainable_params": count_parameters(model, trainable_only=True),
        "train_seconds": train_seconds, "probe_seconds": probe_seconds,
        # what training added on top of the loaded foundation and data (peak RSS on CPU, allocated on GPU)
        "train_peak_memory_mb": memory.added_mb, "train_peak_memory_kind": memory.kind,
    })
    return manifest


def expert_run(manifest: dict[str, Any], run_id: str | None) -> ExpertRun:
    """What the stage summary keeps of an expert's manifest."""
    return ExpertRun(method=manifest["method"], val=manifest["metrics"]["val"],
                     probe_val=manifest["metrics"]["probe_val"], trainable_params=manifest["trainable_params"],
                     train_seconds=manifest["train_seconds"], run_id=run_id)
