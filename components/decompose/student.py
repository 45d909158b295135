"""The LoRKD student: a shared backbone with per-task low-rank experts in every layer, one head per task.

One forward pass serves a mixed-task batch (``task`` = one id per sample) or a single task (``task`` =
index or name: task switching without reloading anything).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from components.decompose.backbones import backbone_from_config, text_backbone_from_teacher
from components.decompose.layers import TaskRuns, attach_experts, expert_layers, task_context
from components.config import DecomposeParams
from components.core.errors import DataError, ParamsError
from components.nn.classifier import make_head
from components.nn.resnet import ImageBackbone

Task = str | int | torch.Tensor


def gathered_logits(features: torch.Tensor, heads: list[nn.Linear], task_ids: torch.Tensor) -> torch.Tensor:
    """Each sample scored by its own task's head in one batched product; (N, max labels), zero-padded.

    The heads' weights are stacked (padded to the widest head) and gathered per sample, so a head's
    gradient, like an expert's, comes only from its own task's samples.
    """
    width = max(h.out_features for h in heads)
    weight = torch.stack([nn.functional.pad(h.weight, (0, 0, 0, width - h.out_features)) for h in heads])
    bias = torch.stack([nn.functional.pad(h.bias, (0, width - h.out_features)) for h in heads])
    return torch.einsum("nd,nld->nl", features, weight[task_ids]) + bias[task_ids]


class LoRKDStudent(nn.Module):
    """``backbone`` (with expert layers) + ``heads`` (task name -> nn.Linear); ``config`` rebuilds it."""

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Linear], config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.task_names = list(heads)
        self.config = config
        self.experts = expert_layers(backbone)  # a plain list: the layers are registered under backbone

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_labels(self) -> dict[str, int]:
        return {n: h.out_features for n, h in self.heads.items()}

    def task_index(self, task: str | int) -> int:
        """Index of a task name (or a checked index)."""
        if isinstance(task, str):
            if task not in self.task_names:
                raise DataError(f"unknown task {task!r}; the student's tasks are {self.task_names}")
            return self.task_names.index(task)
        if not 0 <= int(task) < self.num_tasks:
            raise DataError(f"task id {int(task)} is outside the registered tasks: the student has "
                            f"{self.num_tasks} tasks (ids 0..{self.num_tasks - 1})")
        return int(task)

    def select(self, task: Task, batch_size: int) -> int | torch.Tensor:
        """Validate ``task``: a name or index (one task), or a LongTensor with one task id per sample."""
        if not isinstance(task, torch.Tensor):
            return self.task_index(task)
        if task.ndim == 0:
            return self.task_index(int(task))
        if task.ndim != 1 or task.dtype not in (torch.int64, torch.int32) or len(task) != batch_size:
            raise DataError(f"task_ids must be an integer tensor of shape ({batch_size},); got "
                            f"{task.dtype} {tuple(task.shape)}")
        bad = task[(task < 0) | (task >= self.num_tasks)]
        if len(bad):
            raise DataError(f"task id {int(bad[0])} is outside the registered tasks: the student has "
                            f"{self.num_tasks} tasks (ids 0..{self.num_tasks - 1})")
        return task.long()

    def _backbone(self, sel: int | torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Backbone features, each sample through its own task's expert, in the inputs' order.

        Per-sample ids: the batch is sorted by task (one run per task, ``TaskRuns``), passed once, and the
        features put back in the caller's order.
        """
        if isinstance(sel, int):
            with task_context(self.experts, sel):
                return self.backbone(**inputs)
        runs, order = TaskRuns.sort(sel, self.num_tasks)
        with task_context(self.experts, runs):
            feats = self.backbone(**{k: v.index_select(0, order) for k, v in inputs.items()})
        return feats.index_select(0, torch.argsort(order))

    def features(self, task: Task, **inputs: torch.Tensor) -> torch.Tensor:
        """Backbone features with each sample's expert (one pass over the batch; each layer runs each task's run)."""
        return self._backbone(self.select(task, len(next(iter(inputs.values())))), inputs)

    def forward(self, task: Task, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits: (N, L_t) for one task; for per-sample ids, (N, max L) with zeros past a task's labels."""
        sel = self.select(task, len(next(iter(inputs.values()))))
        feats = self._backbone(sel, inputs)
        if isinstance(sel, int):
            return self.heads[self.task_names[sel]](feats)
        return gathered_logits(feats, list(self.heads.values()), sel)


def _heads(names_labels: Mapping[str, int], out_dim: int, teacher_heads: Mapping[str, nn.Module] | None,
           head_init: str) -> dict[str, nn.Linear]:
    heads = {}
    for name, num_labels in names_labels.items():
        head = make_head(out_dim, num_labels)
        teacher = teacher_heads[name] if teacher_heads is not None else None
        if teacher is not None and head_init != "random":
            if teacher.weight.shape == head.weight.shape:
                head.load_state_dict(teacher.state_dict())
            elif head_init == "teacher":
                raise ParamsError(
                    f"head_init 'teacher': task {name!r}: the student head needs weight shape "
                    f"{tuple(head.weight.shape)} (student feature dim {out_dim}) but the teacher head has "
                    f"{tuple(teacher.weight.shape)}; match the student's feature dim or use head_init 'random'"
                )
        heads[name] = head
    return heads


def build_student(dp: DecomposeParams, modality: str, teacher: nn.Module,
                  teacher_heads: Mapping[str, nn.Module], seed: int) -> LoRKDStudent:
    """A fresh student for the tasks of ``teacher_heads`` (name -> Linear; its out_features = label count).

    Image: a narrow ResNet (random, seeded). Text: the teacher's listed BertLayers and an SVD-factorised
    word embedding; experts go into every Linear of the copied layers (query, key, value, attention
    output, intermediate, output) and into the embedding's k->hidden projection; the embedding table,
    position/type embeddings and LayerNorms stay shared (they are lookups and norms, not conv/linear).
    """
    if not teacher_heads:
        raise ParamsError("decompose needs at least one task head from the teacher")
    for name, head in teacher_heads.items():
        if getattr(teacher, "out_dim", head.in_features) != head.in_features:
            raise ParamsError(f"teacher head {name!r} has weight shape {tuple(head.weight.shape)} but the "
                              f"teacher's features are {teacher.out_dim}-d")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if modality == "image":
            ip = dp.student.image
            in_channels = getattr(teacher, "config", {}).get("in_channels", 3)
            backbone: nn.Module = ImageBackbone(ip.widths, ip.blocks, in_channels)
        else:
            tp = dp.student.text
            backbone = text_backbone_from_teacher(teacher, tp.layers, tp.embedding_rank, tp.max_positions)
        names_labels = {n: int(h.out_features) for n, h in teacher_heads.items()}
        heads = _heads(names_labels, backbone.out_dim, teacher_heads, dp.head_init)
    attach_experts(backbone, len(heads), dp.rank, dp.alpha, seed)
    # Tasks as a list: their order is the task-id order of the experts (manifests sort JSON keys).
    config = {"modality": modality, "backbone": backbone.config, "rank": dp.rank, "alpha": dp.alpha,
              "tasks": [{"name": n, "num_labels": k} for n, k in names_labels.items()]}
    return LoRKDStudent(backbone, heads, config)


def student_from_config(config: dict[str, Any]) -> LoRKDStudent:
    """The same architecture as a saved student (weights to be loaded)."""
    backbone = backbone_from_config(config["modality"], config["backbone"])
    attach_experts(backbone, len(config["tasks"]), config["rank"], config["alpha"], 0)
    heads = {t["name"]: make_head(backbone.out_dim, t["num_labels"]) for t in config["tasks"]}
    return LoRKDStudent(backbone, heads, config)
