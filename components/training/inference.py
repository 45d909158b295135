"""Batched inference: features and logits without autograd."""

from __future__ import annotations

from collections.abc import Callable

import torch

from components.core import stop


@torch.no_grad()  # not inference_mode: probe features are reused as leaf tensors in a backward pass
def batched(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Apply ``fn(**batch)`` over the rows of ``inputs`` and concatenate the outputs (float32)."""
    n = len(next(iter(inputs.values())))
    outs = []
    for i in range(0, n, batch_size):
        stop.check("an inference batch")
        outs.append(fn(**{k: v[i : i + batch_size] for k, v in inputs.items()}))
    return torch.cat(outs).float()
