"""The decompose stage: per modality, distil the frozen foundation (teacher) into one LoRKD student on mixed-task
batches, fuse each task into a plain deployable bundle, and train a same-size single-task student per task as
the no-decomposition baseline.

Teacher heads: the image foundation's own pre-training heads; for text (and any image task the foundation was
not pre-trained on) a linear probe fitted here exactly as the experts stage fits it (same features, grid, seed).
Output per modality: ``student/`` (the whole decomposed student), ``teacher_heads.safetensors``,
``fused/<task>/`` and ``single/<task>/`` (bundles), and the summary's per-task validation metrics and sizes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import load_file
from torch import nn

from components.core.artifacts import save_tensors
from components.config import Params
from components.data.datasets import TaskData, load_split
from components.decompose.deploy import fuse, save_fused, save_student, student_hash
from components.decompose.module import DecomposeModule
from components.decompose.student import LoRKDStudent, build_student
from components.decompose.teacher import mixed_dataset
from components.core.errors import ParamsError
from components.metrics.counts import count_parameters
from components.metrics.memory import PeakMemory
from components.metrics.classification import compute_metrics
from components.training.probe import fit_probe
from components.nn.classifier import Classifier, make_head
from components.nn.foundation import Foundation, load_foundation
from components.training.data import labels_tensor, loader
from components.training.inference import batched
from components.training.trainer import build_trainer, data_device, resume_from

log = logging.getLogger("medexperts")


def teacher_heads(found: Foundation, foundation_dir: Path, feats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  val_feats: dict[str, tuple[torch.Tensor, torch.Tensor]], data: dict[str, TaskData],
                  params: Params) -> dict[str, nn.Linear]:
    """The teacher's head per task: pre-training head (image) where there is one, else a fitted probe."""
    stored = {}
    if found.modality == "image":
        tensors = load_file(Path(foundation_dir) / "image" / "heads.safetensors")
        stored = {k.rsplit(".", 1)[0] for k in tensors}
    heads = {}
    for task, td in data.items():
        if task in stored:
            head = make_head(found.encoder.out_dim, td.num_labels)
            head.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == task})
        else:
            head, _ = fit_probe(feats[task], val_feats[task], td.kind, td.num_labels, params.experts.probe,
                                params.evaluate.primary_metric, params.pipeline.seed)
        heads[task] = head.eval().requires_grad_(False)
    return heads


def _train(student: LoRKDStudent, kinds: dict[str, str], tasks: list[str], x: dict, y: dict, logits: dict,
           x_va: dict, y_va: dict, logits_va: dict, params: Params, modality: str, logger: Any,
           checkpoint_dir: Path | None) -> float:
    dp, metric, seed = params.decompose, params.evaluate.primary_metric, params.pipeline.seed
    tp = dp.trainer.of(modality)
    train_ds = mixed_dataset(student, {t: x[t] for t in tasks}, {t: y[t] for t in tasks}, {t: logits[t] for t in tasks})
    val_ds = mixed_dataset(student, {t: x_va[t] for t in tasks}, {t: y_va[t] for t in tasks},
                           {t: logits_va[t] for t in tasks})
    module = DecomposeModule(student, {t: kinds[t] for t in tasks}, dp.kd_weight, dp.temperature, tp.lr,
                             tp.weight_decay, metric)
    device = data_device(tp)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        trainer = build_trainer(tp, Path(root), logger=logger, monitor=f"val_{metric}", checkpoint_dir=checkpoint_dir)
        student.train()
        trainer.fit(module, loader(train_ds.to(device), tp.batch_size, shuffle=True, seed=seed),
                    loader(val_ds.to(device), tp.batch_size * 2, shuffle=False), ckpt_path=resume_from(checkpoint_dir))
    student.cpu().eval()
    return time.perf_counter() - start


def _val_metrics(model: nn.Module, x: dict[str, torch.Tensor], y: torch.Tensor, td: TaskData) -> dict[str, float]:
    return compute_metrics(td.kind, batched(model, x), y, td.num_labels)


def decompose_modality(modality: str, params: Params, data_dir: Path, foundation_dir: Path, out_dir: Path,
                       logger: Any = False, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Decompose ``modality``'s foundation over its active tasks; write ``out_dir``; return the summary."""
    dp, seed = params.decompose, params.pipeline.seed
    tp = dp.trainer.of(modality)
    tasks = list(params.data.active_tasks(modality))
    found = load_foundation(foundation_dir, modality)
    if modality == "text":
        needed = found.max_length
        if dp.student.text.max_positions < needed:
            raise ParamsError(f"params/decompose.yaml: key 'student.text.max_positions' is "
                              f"{dp.student.text.max_positions}, below foundation.text.max_length {needed}: the "
                              "student could not read the inputs the foundation reads")
    train = {t: load_split(data_dir, t, "train").subset(tp.max_train_samples, seed) for t in tasks}
    val = {t: load_split(data_dir, t, "val") for t in tasks}
    x = {t: found.inputs(d.inputs) for t, d in train.items()}
    y = {t: labels_tensor(d.labels, d.kind) for t, d in train.items()}
    x_va = {t: found.inputs(d.inputs) for t, d in val.items()}
    y_va = {t: labels_tensor(d.labels, d.kind) for t, d in val.items()}
    kinds = {t: d.kind for t, d in train.items()}

    start = time.perf_counter()
    feats = {t: (batched(found.encoder, x[t]), y[t]) for t in tasks}
    feats_va = {t: (batched(found.encoder, x_va[t]), y_va[t]) for t in tasks}
    heads = teacher_heads(found, foundation_dir, feats, feats_va, train, params)
    with torch.no_grad():
        logits = {t: heads[t](feats[t][0]) for t in tasks}
        logits_va = {t: heads[t](feats_va[t][0]) for t in tasks}
    teacher_seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors({f"{t}.{k}": v for t, h in heads.items() for k, v in h.state_dict().items()},
                 out_dir / "teacher_heads.safetensors")
    teacher_params = count_parameters(found.encoder)

    L.seed_everything(seed, workers=True, verbose=False)
    student = build_student(dp, modality, found.encoder, heads, seed)
    with PeakMemory(data_device(tp).type) as memory:
        train_seconds = _train(student, kinds, tasks, x, y, logits, x_va, y_va, logits_va, params, modality, logger,
                               checkpoint_dir / "student" if checkpoint_dir else None)
    sha = student_hash(student)
    save_student(out_dir / "student", student, {"tasks_kinds": kinds, "teacher_sha256": found.sha256})

    summary_tasks: dict[str, Any] = {}
    for task in tasks:
        td = train[task]
        label_names = td.label_names
        fused = fuse(student, task, expected_hash=sha)
        fused_val = _val_metrics(fused, x_va[task], y_va[task], td)
        single = build_student(dp, modality, found.encoder, {task: heads[task]}, seed)
        single_seconds = _train(single, kinds, [task], x, y, logits, x_va, y_va, logits_va, params, modality, False,
                                checkpoint_dir / f"single-{task}" if checkpoint_dir else None)
        single_fused = fuse(single, task)
        single_val = _val_metrics(single_fused, x_va[task], y_va[task], td)
        deployed = count_parameters(fused)
        teacher_total = teacher_params + count_parameters(heads[task])
        info = {"val": fused_val, "teacher_val": _val_metrics(Classifier(found.encoder, heads[task]), x_va[task],
                                                               y_va[task], td),
                "single_val": single_val, "parameters": deployed, "teacher_parameters": teacher_total,
                "parameter_fraction": deployed / teacher_total, "single_train_seconds": single_seconds}
        common = {"teacher_sha256": found.sha256, "teacher_parameters": teacher_total}
        for method, model, metrics, folder, h in (("lorkd", student, fused_val, "fused", sha),
                                                   ("single_student", single, single_val, "single", None)):
            save_fused(out_dir / folder / task, model, task, kind=td.kind, label_names=label_names, expected_hash=h,
                       tokenizer=found.tokenizer, max_length=found.max_length,
                       metadata={"method": method, **common, "val_metrics": metrics})
        summary_tasks[task] = info
        metric = params.evaluate.primary_metric
        log.info("[decompose] %s: val %s teacher %.3f, LoRKD fused %.3f, single-task student %.3f; %d params "
                 "(%.1f%% of the teacher)", task, metric, info["teacher_val"][metric], fused_val[metric],
                 single_val[metric], deployed, 100 * info["parameter_fraction"])
    return {"tasks": summary_tasks, "student_sha256": sha, "student_parameters": count_parameters(student),
            "teacher_seconds": teacher_seconds, "train_seconds": train_seconds,
            "train_peak_memory_mb": memory.added_mb, "train_peak_memory_kind": memory.kind}


def decompose(params: Params, data_dir: Path, foundation_dir: Path, out_dir: Path, logger: Any = False,
              checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Every configured modality that has active tasks."""
    summary = {}
    for modality in params.decompose.modalities:
        if not params.data.active_tasks(modality):
            continue
        summary[modality] = decompose_modality(modality, params, data_dir, foundation_dir, out_dir / modality,
                                               logger, checkpoint_dir / modality if checkpoint_dir else None)
    return {"modalities": summary}
