"""Linear probe: a task head fitted on frozen foundation features (full batch)."""

from __future__ import annotations

import torch
from torch import nn

from components.config import ProbeParams
from components.models.classifier import make_head
from components.training.module import task_loss


def fit_probe(features: torch.Tensor, labels: torch.Tensor, kind: str, num_labels: int, pp: ProbeParams,
              seed: int) -> nn.Linear:
    """Fit a linear head with AdamW on standardised-free features (the head deploys as is)."""
    torch.manual_seed(seed)
    head = make_head(features.shape[1], num_labels)
    opt = torch.optim.AdamW(head.parameters(), lr=pp.lr, weight_decay=pp.weight_decay)
    for _ in range(pp.epochs):
        opt.zero_grad()
        loss = task_loss(kind, head(features), labels)
        loss.backward()
        opt.step()
    return head.eval()
