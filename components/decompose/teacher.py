"""Teacher targets, computed once: the teacher is frozen, so its logits per training sample never change.

``mixed_dataset`` puts every task's samples into one dataset whose batches mix tasks: inputs, labels,
``task_ids`` and the precomputed ``teacher_logits`` (zero-padded to the widest task).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from components.decompose.student import LoRKDStudent
from components.core.errors import ArtifactError, DataError
from components.training.data import TensorDictDataset
from components.training.inference import batched


def teacher_logits(encoder: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor],
                   batch_size: int = 64) -> torch.Tensor:
    """(N, L) float32 logits of the frozen teacher (eval mode, no grad), batched."""
    modes = [(m, m.training) for m in (encoder, head)]
    encoder.eval()
    head.eval()
    try:
        return batched(lambda **x: head(encoder(**x)), inputs, batch_size).cpu()
    finally:
        for module, training in modes:
            module.train(training)


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return nn.functional.pad(t, (0, width - t.shape[1]))


def mixed_dataset(student: LoRKDStudent, inputs: Mapping[str, dict[str, torch.Tensor]],
                  labels: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> TensorDictDataset:
    """One dataset over the student's tasks, in its task order (task id = position in ``student.task_names``).

    Labels stay class ids (N,) when every task is single-label; with a multilabel task they become (N, max L)
    floats (single-label rows one-hot) so one tensor holds them all.
    """
    names = student.task_names
    missing = [n for n in names if n not in inputs or n not in labels or n not in teacher]
    if missing:
        raise DataError(f"no inputs, labels or teacher logits for task(s) {missing}; student tasks: {names}")
    width = max(student.num_labels.values())
    multilabel = any(labels[n].ndim == 2 for n in names)
    keys = set(inputs[names[0]])
    rows, ys, ts, ids = {k: [] for k in keys}, [], [], []
    for t, name in enumerate(names):
        n_labels, logits = student.num_labels[name], teacher[name]
        if logits.ndim != 2 or logits.shape[1] != n_labels:
            raise ArtifactError(
                f"task {name!r}: teacher logits have shape {tuple(logits.shape)} but the student head outputs "
                f"{n_labels} labels (head weight shape {tuple(student.heads[name].weight.shape)})"
            )
        if set(inputs[name]) != keys:
            raise DataError(f"task {name!r}: inputs {sorted(inputs[name])} differ from {sorted(keys)}")
        y = labels[name]
        n = len(y)
        if len(logits) != n:
            raise DataError(f"task {name!r}: {n} labels but {len(logits)} teacher logits")
        if y.ndim == 2 and y.shape[1] != n_labels:
            raise DataError(f"task {name!r}: labels have shape {tuple(y.shape)}; the head outputs {n_labels}")
        if multilabel:
            y = y.float() if y.ndim == 2 else nn.functional.one_hot(y.long(), n_labels).float()
            y = _pad(y, width)
        for k in keys:
            rows[k].append(inputs[name][k])
        ys.append(y)
        ts.append(_pad(logits.float(), width))
        ids.append(torch.full((n,), t, dtype=torch.long))
    data = {k: torch.cat(v) for k, v in rows.items()}
    data["teacher_logits"] = torch.cat(ts)
    return TensorDictDataset(data, torch.cat(ys), torch.cat(ids))
