"""M3OE's gate (FedKIM, Wang et al., EMNLP 2024, arXiv 2408.10276): expert weights from task and modality text.

The modality description and the task description are embedded with the foundation's own token embeddings
(``describe``); the modality tokens attend to the task tokens (query = modality, key/value = task), the attended
modality tokens are mean-pooled over their real (unpadded) positions, and a linear map + softmax gives one
weight per expert. One vector per sample, shared by every mixture layer of the model (``routing_context``
with ``weights=``), so a new (task, modality) pair is routed from its descriptions alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from components.moe.errors import MoEParamsError
from components.nn.encoders import masked_mean, tokenize


def describe(texts: Sequence[str], tokenizer: Any, embedding: nn.Embedding,
             max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (N, L, d) of description texts and their mask (N, L), 1 on real tokens.

    ``embedding`` is the foundation's token embedding table (e.g. ``bert.embeddings.word_embeddings``); texts are
    padded/truncated to ``max_length``. Embed each distinct description once and index it per sample.
    """
    if not texts:
        raise MoEParamsError("describe: no description texts given")
    enc = tokenize(tokenizer, list(texts), max_length)
    ids = enc["input_ids"].to(embedding.weight.device)
    return embedding(ids), enc["attention_mask"].to(embedding.weight.device)


def _check_mask(mask: torch.Tensor | None, seq: torch.Tensor, what: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)
    if tuple(mask.shape) != tuple(seq.shape[:2]):
        raise MoEParamsError(f"M3OE gate: {what} mask of shape {tuple(mask.shape)} does not match its embeddings "
                             f"{tuple(seq.shape)}; expected {tuple(seq.shape[:2])}")
    mask = mask.bool()
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise MoEParamsError(f"M3OE gate: {what} description of samples {empty[:8]} has no real token (mask all 0)")
    return mask


class M3OEGate(nn.Module):
    """(modality M (N, Lm, d), task T (N, Lt, d)) -> expert weights (N, E): cross-attention, pooling, softmax.

    Masks are 1 on real tokens (Hugging Face's attention_mask); padded task tokens are never attended to and
    padded modality tokens are left out of the pooling, so padding cannot change the weights.
    """

    def __init__(self, dim: int, num_experts: int, num_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if num_experts < 1 or num_heads < 1 or dim % num_heads:
            raise MoEParamsError(f"M3OE gate: need num_experts >= 1 and num_heads dividing dim; got dim={dim}, "
                                 f"num_experts={num_experts}, num_heads={num_heads}")
        self.num_experts = num_experts
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.proj = nn.Linear(dim, num_experts)
        self.last_weights: torch.Tensor | None = None

    def forward(self, modality: torch.Tensor, task: torch.Tensor, modality_mask: torch.Tensor | None = None,
                task_mask: torch.Tensor | None = None) -> torch.Tensor:
        if modality.dim() != 3 or task.dim() != 3 or modality.shape[0] != task.shape[0]:
            raise MoEParamsError(f"M3OE gate: expected modality (N, Lm, d) and task (N, Lt, d) embeddings, got "
                                 f"{tuple(modality.shape)} and {tuple(task.shape)}")
        modality_mask = _check_mask(modality_mask, modality, "modality")
        task_mask = _check_mask(task_mask, task, "task")
        attended, _ = self.attention(modality, task, task, key_padding_mask=~task_mask, need_weights=False)
        weights = torch.softmax(self.proj(masked_mean(attended, modality_mask)), dim=-1)
        self.last_weights = weights.detach()
        return weights
