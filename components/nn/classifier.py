"""Task heads on a shared encoder: one head per task, selected by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from components.core.artifacts import save_tensors
from components.core.errors import ArtifactError


def make_head(in_dim: int, num_labels: int) -> nn.Linear:
    return nn.Linear(in_dim, num_labels)


def save_heads(heads: Mapping[str, nn.Module], path: Path) -> None:
    """Task heads into one safetensors file, each tensor keyed ``<task>.<parameter>`` (``load_heads`` reads it)."""
    save_tensors({f"{task}.{key}": value for task, head in heads.items() for key, value in head.state_dict().items()},
                 path)


def load_heads(path: Path, in_dim: int, tasks: Iterable[str] | None = None,
               num_labels: Mapping[str, int] | None = None, remedy: str = "") -> dict[str, nn.Linear]:
    """The linear task heads of a ``save_heads`` file (all of them, or those of ``tasks``), each reading ``in_dim``
    features; an unreadable file, a missing task, a head of another width or, for a loaded task that ``num_labels``
    names (others there are ignored), a head with another number of outputs is an ``ArtifactError`` (ending with
    ``remedy``: what the user should do)."""
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"{path}: cannot read the task heads ({exc})") from None
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        task, _, name = key.rpartition(".")
        state.setdefault(task, {})[name] = value
    wanted = sorted(state) if tasks is None else list(tasks)
    heads = {}
    for task in wanted:
        weight = state.get(task, {}).get("weight")
        if weight is None:
            raise ArtifactError(f"{path} has no head for task {task!r} (it holds {sorted(state)})")
        if weight.ndim != 2:
            raise ArtifactError(f"{path}: the head of {task!r} is malformed (weight of shape {tuple(weight.shape)})")
        if weight.shape[1] != in_dim:
            raise ArtifactError(f"{path}: the head of {task!r} reads {weight.shape[1]} features; the encoder gives "
                                f"{in_dim}")
        if num_labels is not None and task in num_labels and weight.shape[0] != num_labels[task]:
            raise ArtifactError(f"{path}: the head of {task!r} has {weight.shape[0]} outputs; the task has "
                                f"{num_labels[task]} labels" + (f": {remedy}" if remedy else ""))
        head = make_head(in_dim, weight.shape[0])
        try:
            head.load_state_dict(state[task])
        except RuntimeError as exc:
            raise ArtifactError(f"{path}: the head of {task!r} does not load ({exc})") from None
        heads[task] = head
    return heads


class Classifier(nn.Module):
    """encoder -> features -> one task head -> logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(**inputs))


class MultiTaskClassifier(nn.Module):
    """One encoder shared by several task heads (the fused model and the image foundation)."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def forward(self, task: str, **inputs: torch.Tensor) -> torch.Tensor:
        return self.heads[task](self.encoder(**inputs))

    def for_task(self, task: str) -> Classifier:
        """A single-task view sharing this encoder's weights."""
        return Classifier(self.encoder, self.heads[task])
