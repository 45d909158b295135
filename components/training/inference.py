"""Batched inference: features and logits without autograd."""

from __future__ import annotations

from collections.abc import Callable

import torch

from components.core import stop


@torch.no_grad()  # not inference_mode: probe features are reused as leaf tensors in a backward pass
def batched(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Apply ``fn(**batch)`` over the rows of ``inputs`` and concatenate the outputs (float32), row for row.

    Text rows (an ``attention_mask``) are batched shortest first and the outputs put back in the rows' order: a
    text batch runs at its longest text (``trim_padding``), so batches of like lengths skip most of the padding
    (HoC's sentences beside 256-token abstracts). No row's output depends on the others in its batch (inference:
    eval mode), so only float rounding can tell the two orders apart."""
    n = len(next(iter(inputs.values())))
    mask = inputs.get("attention_mask")
    order = torch.argsort(mask.sum(1), stable=True) if mask is not None and mask.ndim == 2 else None
    outs = []
    for i in range(0, n, batch_size):  # one batch of rows at a time: no sorted copy of the whole split
        stop.check("an inference batch")
        if order is None:
            outs.append(fn(**{k: v[i : i + batch_size] for k, v in inputs.items()}))  # views, no copy
        else:
            rows = order[i : i + batch_size]
            outs.append(fn(**{k: v[rows.to(v.device)] for k, v in inputs.items()}))
    out = torch.cat(outs).float()
    if order is None:
        return out
    restored = torch.empty_like(out)
    restored[order.to(out.device)] = out
    return restored
