"""Merge math on task vectors (dicts of dense weight updates ΔW), as small pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from components.errors import ArtifactError

TaskVector = dict[str, torch.Tensor]


def check_compatible(task_vectors: Sequence[TaskVector], names: Sequence[str]) -> None:
    """All task vectors must adapt the same weights with the same shapes."""
    if not task_vectors:
        raise ArtifactError("no experts to merge (empty expert list)")
    ref_keys, ref_name = set(task_vectors[0]), names[0]
    for tv, name in zip(task_vectors[1:], names[1:], strict=True):
        if set(tv) != ref_keys:
            diff = sorted(set(tv) ^ ref_keys)[:3]
            raise ArtifactError(f"experts {ref_name!r} and {name!r} adapt different weights (e.g. {diff}); "
                                "train them with the same target modules")
        for key in ref_keys:
            if tv[key].shape != task_vectors[0][key].shape:
                raise ArtifactError(f"experts {ref_name!r} and {name!r} disagree on the shape of {key!r}")


def weighted_sum(task_vectors: Sequence[TaskVector], weights: Sequence[float]) -> TaskVector:
    """Σ_t w_t τ_t, key by key (one accumulator per weight, no per-task copies)."""
    if len(weights) != len(task_vectors):
        raise ValueError(f"{len(weights)} weights for {len(task_vectors)} task vectors")
    out: TaskVector = {}
    for key in task_vectors[0]:
        acc = torch.zeros_like(task_vectors[0][key])
        for tv, w in zip(task_vectors, weights, strict=True):
            acc.add_(tv[key], alpha=float(w))
        out[key] = acc
    return out


def merge_average(task_vectors: Sequence[TaskVector]) -> TaskVector:
    """Simple weight averaging of the experts: θ0 + (1/T) Σ τ_t."""
    return weighted_sum(task_vectors, [1.0 / len(task_vectors)] * len(task_vectors))


def merge_task_arithmetic(task_vectors: Sequence[TaskVector], lam: float) -> TaskVector:
    """Task arithmetic (Ilharco et al., 2023): θ0 + λ Σ τ_t."""
    return weighted_sum(task_vectors, [lam] * len(task_vectors))
