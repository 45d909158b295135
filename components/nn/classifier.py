"""Task heads on a shared encoder: one head per task, selected by name."""

from __future__ import annotations

import torch
from torch import nn


def make_head(in_dim: int, num_labels: int) -> nn.Linear:
    return nn.Linear(in_dim, num_labels)


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
