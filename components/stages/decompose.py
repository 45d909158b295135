"""The decompose stage: per modality, distil the frozen foundation (teacher) into one LoRKD student on mixed-task
batches, fuse each task into a plain deployable bundle, and train a same-size single-task student per task as
the no-decomposition baseline.

The teacher of a modality (``decompose.teacher``): ``expert``, each task's deployed expert (the experts stage's
bundle: the strongest per-task model the pipeline has, the text default), or ``foundation``, the frozen foundation
with the image foundation's own pre-training head (the image default) or, for a task it has no head for, a linear
probe fitted here exactly as the experts stage fits it (same features, grid, seed).
Output per modality (``components.core.layout``): the whole decomposed student, the teacher heads, one fused
bundle and one single-task bundle per task, and the summary's per-task validation metrics and sizes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

import components.plugins  # noqa: F401  the expert bundles it loads may be soft prompts (their wrapper)
from components.bundle.format import image_input, load_bundle
from components.config import DecomposeParams, Modality, PrimaryMetric, ProbeParams
from components.config.decompose import TeacherKind
from components.core.errors import ArtifactError
from components.core.layout import (MANIFEST, expert_bundle, expert_dir, lorkd_dir, lorkd_fused, lorkd_single,
                                    lorkd_student, teacher_heads as heads_file)
from components.data.datasets import TaskData, load_split
from components.decompose.deploy import fuse, save_fused, save_student, student_hash
from components.decompose.module import DecomposeModule
from components.decompose.student import LoRKDStudent, build_student
from components.decompose.teacher import mixed_dataset
from components.metrics.classification import compute_metrics
from components.metrics.counts import count_parameters
from components.metrics.memory import PeakMemory
from components.nn.classifier import Classifier, load_heads, save_heads
from components.nn.foundation import Foundation, load_foundation, load_image_heads
from components.stages.base import StageSummary, TaskInputs, param
from components.training.balance import loss_weight
from components.training.multilabel import best_thresholds, fold_thresholds
from components.training.prior_shift import tune_prior_shift
from components.training.data import labels_tensor, loader
from components.training.inference import batched
from components.training.probe import fit_probe
from components.training.trainer import build_trainer, data_device, resume_from

log = logging.getLogger("medexperts")


class DecomposeInputs(TaskInputs):
    decompose: DecomposeParams = param("decompose")
    probe: ProbeParams = param("experts.probe", "the teacher's probe heads are fitted as the experts stage fits its probe")
    metric: PrimaryMetric = param("evaluate.primary_metric")
    seed: int = param("pipeline.seed")


class LoRKDTask(StageSummary):
    val: dict[str, float]  # the fused LoRKD expert
    teacher_val: dict[str, float]
    single_val: dict[str, float]  # the same-size single-task student
    parameters: int  # deployed (fused) parameters
    teacher_parameters: int
    parameter_fraction: float
    single_train_seconds: float


class ModalityDecomposition(StageSummary):
    tasks: dict[str, LoRKDTask]
    teacher: TeacherKind = "foundation"
    student_sha256: str
    student_parameters: int
    teacher_seconds: float
    train_seconds: float
    train_peak_memory_mb: float
    train_peak_memory_kind: str


class DecomposeSummary(StageSummary):
    modalities: dict[str, ModalityDecomposition]


@dataclass
class DistillSplit:
    """One split of every task, ready to distil: encoder inputs, labels and the frozen teacher's logits per task."""

    inputs: dict[str, dict[str, torch.Tensor]]
    labels: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]

    def of(self, tasks: list[str]) -> tuple[dict, dict, dict]:
        return ({t: self.inputs[t] for t in tasks}, {t: self.labels[t] for t in tasks},
                {t: self.logits[t] for t in tasks})


def teacher_heads(found: Foundation, foundation_dir: Path, feats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  val_feats: dict[str, tuple[torch.Tensor, torch.Tensor]], data: dict[str, TaskData],
                  inp: DecomposeInputs) -> dict[str, nn.Linear]:
    """The ``foundation`` teacher's head per task: pre-training head (image) where there is one, else a probe
    fitted on the frozen foundation's features."""
    stored = load_image_heads(foundation_dir, found, {t: td.num_labels for t, td in data.items()}) \
        if found.modality == "image" else {}
    heads = {}
    for task, td in data.items():
        if task in stored:
            head = stored[task]
        else:
            head, _ = fit_probe(feats[task], val_feats[task], td.kind, td.num_labels, inp.probe, inp.metric, inp.seed)
        heads[task] = head.eval().requires_grad_(False)
    return heads


def expert_teachers(experts_dir: Path | None, tasks: list[str], found: Foundation) -> dict[str, Classifier]:
    """The ``expert`` teacher per task: the experts stage's deployed bundle of the task (ΔW folded in), frozen."""
    if experts_dir is None:
        raise ArtifactError("decompose.teacher asks for the deployed experts but no experts stage output was given: "
                            "run the experts stage first, or set decompose.teacher.<modality>: foundation")
    teachers = {}
    for task in tasks:
        bundle = expert_bundle(expert_dir(experts_dir, task))
        if not (bundle / MANIFEST).is_file():
            raise ArtifactError(f"no deployed expert for task {task!r} at {bundle} (decompose.teacher = expert): "
                                "run the experts stage with this task active first")
        loaded = load_bundle(bundle)
        if loaded.info.base.sha256 != found.sha256:
            raise ArtifactError(f"{bundle}: the expert of {task!r} was trained on foundation "
                                f"{loaded.info.base.sha256[:12]}, not on the loaded one ({found.sha256[:12]}): "
                                "re-run the experts stage")
        teachers[task] = loaded.model.for_task(task).eval().requires_grad_(False)
    return teachers


def lorkd_teacher(teacher: TeacherKind, decompose_dir: Path, experts_dir: Path | None, found: Foundation,
                  task: str) -> Classifier:
    """The ``teacher`` a stored LoRKD decomposition of ``task`` was distilled from (its bundle's and its summary's
    ``teacher``), to score it beside the student."""
    if teacher == "expert":
        return expert_teachers(experts_dir, [task], found)[task]
    head = load_heads(heads_file(decompose_dir, found.modality), found.encoder.out_dim, [task])[task]
    return Classifier(found.encoder, head.eval()).eval()


def _train(student: LoRKDStudent, kinds: dict[str, str], tasks: list[str], train: DistillSplit, val: DistillSplit,
           inp: DecomposeInputs, modality: Modality, logger: Any, checkpoint_dir: Path | None) -> float:
    dp, metric, seed = inp.decompose, inp.metric, inp.seed
    tp = dp.trainer.of(modality)
    train_ds = mixed_dataset(student, *train.of(tasks))
    val_ds = mixed_dataset(student, *val.of(tasks))
    weights = {t: loss_weight(kinds[t], train.labels[t], student.num_labels[t], tp.class_weight)
               for t in tasks}  # as probe and experts
    module = DecomposeModule(student, {t: kinds[t] for t in tasks}, dp.kd_weight, dp.temperature, tp.lr,
                             tp.weight_decay, metric, loss_weights=weights, lr_schedule=tp.lr_schedule)
    device = data_device(tp)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        trainer = build_trainer(tp, Path(root), logger=logger, monitor=f"val_{metric}", checkpoint_dir=checkpoint_dir,
                                label=f"[decompose] {modality} student ({', '.join(tasks)})")
        student.train()
        trainer.fit(module, loader(train_ds.to(device), tp.batch_size, shuffle=True, seed=seed,
                                   group_by_length=tp.group_by_length),
                    loader(val_ds.to(device), tp.batch_size * 2, shuffle=False), ckpt_path=resume_from(checkpoint_dir))
    student.cpu().eval()
    return time.perf_counter() - start


def _val_metrics(model: nn.Module, x: dict[str, torch.Tensor], y: torch.Tensor, td: TaskData) -> dict[str, float]:
    return compute_metrics(td.kind, batched(model, x), y, td.num_labels)


def fold_val_decisions(student: LoRKDStudent, tasks: list[str], kinds: dict[str, str],
                       x_va: dict[str, dict[str, torch.Tensor]], y_va: dict[str, torch.Tensor],
                       y_tr: dict[str, torch.Tensor], pp: ProbeParams) -> None:
    """The decision rule picked on validation for each task's fused model, as the probe and the experts pick
    theirs, folded into the student's head of that task, so the student, its fused expert and every bundle made
    from them decide the same way: per-label thresholds for a multilabel task (``pp.multilabel_thresholds``,
    ``best_thresholds``), the prior shift for a single-label one (``pp.prior_shift``, ``tune_prior_shift``)."""
    for task in tasks:
        multilabel = kinds[task] == "multilabel"
        if not (pp.multilabel_thresholds if multilabel else pp.prior_shift):
            continue
        with torch.no_grad():
            logits = batched(fuse(student, task), x_va[task])
            if multilabel:
                fold_thresholds(student.heads[task], best_thresholds(logits, y_va[task]))
            else:
                tune_prior_shift(student.heads[task], logits, y_va[task], y_tr[task])


def decompose_modality(modality: Modality, inp: DecomposeInputs, data_dir: Path, foundation_dir: Path,
                       out_root: Path, logger: Any = False, checkpoint_dir: Path | None = None,
                       experts_dir: Path | None = None) -> ModalityDecomposition:
    """Decompose ``modality``'s foundation over its active tasks, distilling the teacher ``decompose.teacher``
    names (``experts_dir``: the experts stage's output, for the ``expert`` teacher); write under ``out_root``."""
    dp, seed = inp.decompose, inp.seed
    teacher_kind = dp.teacher.of(modality)
    tp = dp.trainer.of(modality)
    tasks = list(inp.active_tasks(modality))
    found = load_foundation(foundation_dir, modality)
    if modality == "text" and dp.student.text.max_positions < found.max_length:
        # checked again here: the foundation's own max_length is what the student must read
        raise ArtifactError(f"decompose.student.text.max_positions is {dp.student.text.max_positions}, below the "
                            f"foundation's max_length {found.max_length}: the student could not read its inputs")
    train = {t: load_split(data_dir, t, "train").subset(tp.max_train_samples, seed) for t in tasks}
    val = {t: load_split(data_dir, t, "val") for t in tasks}
    x = {t: found.inputs(d.inputs) for t, d in train.items()}
    y = {t: labels_tensor(d.labels, d.kind) for t, d in train.items()}
    x_va = {t: found.inputs(d.inputs) for t, d in val.items()}
    y_va = {t: labels_tensor(d.labels, d.kind) for t, d in val.items()}
    kinds = {t: d.kind for t, d in train.items()}

    start = time.perf_counter()
    if teacher_kind == "expert":
        teachers = expert_teachers(experts_dir, tasks, found)
        logits = {t: batched(teachers[t], x[t]) for t in tasks}  # batched: no grad
        logits_va = {t: batched(teachers[t], x_va[t]) for t in tasks}
    else:  # the frozen features once: for the probe heads and for the logits
        feats = {t: (batched(found.encoder, x[t]), y[t]) for t in tasks}
        feats_va = {t: (batched(found.encoder, x_va[t]), y_va[t]) for t in tasks}
        heads = teacher_heads(found, foundation_dir, feats, feats_va, train, inp)
        teachers = {t: Classifier(found.encoder, heads[t]).eval() for t in tasks}
        with torch.no_grad():
            logits = {t: heads[t](feats[t][0]) for t in tasks}
            logits_va = {t: heads[t](feats_va[t][0]) for t in tasks}
    heads = {t: teachers[t].head for t in tasks}  # the student's heads start from them (decompose.head_init)
    tr, va = DistillSplit(x, y, logits), DistillSplit(x_va, y_va, logits_va)
    teacher_seconds = time.perf_counter() - start
    log.info("[decompose] %s teacher: %s (logits of %d training samples in %.1f s)", modality,
             "each task's deployed expert" if teacher_kind == "expert" else "the foundation + its heads",
             sum(len(v) for v in y.values()), teacher_seconds)
    lorkd_dir(out_root, modality).mkdir(parents=True, exist_ok=True)
    save_heads(heads, heads_file(out_root, modality))

    L.seed_everything(seed, workers=True, verbose=False)
    student = build_student(dp, modality, found.encoder, heads, seed)
    with PeakMemory(data_device(tp).type) as memory:
        train_seconds = _train(student, kinds, tasks, tr, va, inp, modality, logger,
                               checkpoint_dir / "student" if checkpoint_dir else None)
    fold_val_decisions(student, tasks, kinds, x_va, y_va, y, inp.probe)
    sha = student_hash(student)
    save_student(lorkd_student(out_root, modality), student, {"tasks_kinds": kinds, "teacher_sha256": found.sha256})

    summary_tasks: dict[str, LoRKDTask] = {}
    for task in tasks:
        td = train[task]
        label_names = td.label_names
        fused = fuse(student, task, expected_hash=sha)
        fused_val = _val_metrics(fused, x_va[task], y_va[task], td)
        single = build_student(dp, modality, found.encoder, {task: heads[task]}, seed)
        single_seconds = _train(single, kinds, [task], tr, va, inp, modality, False,
                                checkpoint_dir / f"single-{task}" if checkpoint_dir else None)
        fold_val_decisions(single, [task], kinds, x_va, y_va, y, inp.probe)
        single_fused = fuse(single, task)
        single_val = _val_metrics(single_fused, x_va[task], y_va[task], td)
        deployed = count_parameters(fused)
        teacher_total = count_parameters(teachers[task])
        info = LoRKDTask(val=fused_val, teacher_val=_val_metrics(teachers[task], x_va[task], y_va[task], td),
                         single_val=single_val, parameters=deployed, teacher_parameters=teacher_total,
                         parameter_fraction=deployed / teacher_total, single_train_seconds=single_seconds)
        common = {"teacher_sha256": found.sha256, "teacher_parameters": teacher_total, "teacher": teacher_kind}
        for method, model, metrics, folder, h in (("lorkd", student, fused_val, lorkd_fused, sha),
                                                   ("single_student", single, single_val, lorkd_single, None)):
            save_fused(folder(out_root, modality, task), model, task, kind=td.kind, label_names=label_names,
                       expected_hash=h, tokenizer=found.tokenizer, max_length=found.max_length,
                       metadata={"method": method, **common, "val_metrics": metrics},
                       input_spec=image_input(td.inputs) if modality == "image" else None)
        summary_tasks[task] = info
        metric = inp.metric
        log.info("[decompose] %s: val %s teacher %.3f, LoRKD fused %.3f, single-task student %.3f; %d params "
                 "(%.1f%% of the teacher)", task, metric, info.teacher_val[metric], fused_val[metric],
                 single_val[metric], deployed, 100 * info.parameter_fraction)
    return ModalityDecomposition(tasks=summary_tasks, teacher=teacher_kind, student_sha256=sha, student_parameters=count_parameters(student),
                                 teacher_seconds=teacher_seconds, train_seconds=train_seconds,
                                 train_peak_memory_mb=memory.added_mb, train_peak_memory_kind=memory.kind)


def run(inp: DecomposeInputs, data_dir: Path, foundation_dir: Path, out_dir: Path, logger: Any = False,
        checkpoint_dir: Path | None = None, experts_dir: Path | None = None) -> DecomposeSummary:
    """The stage: every configured modality that has active tasks."""
    summary = {}
    for modality in inp.decompose.modalities:
        if not inp.active_tasks(modality):
            continue
        summary[modality] = decompose_modality(modality, inp, data_dir, foundation_dir, out_dir, logger,
                                               checkpoint_dir / modality if checkpoint_dir else None, experts_dir)
    return DecomposeSummary(modalities=summary)
