"""LoRKD student backbones, plain (no expert code): a narrow ResNet for 28x28 images and a shallow BERT.

The expert student is one of these with ``attach_experts`` applied; a fused deployable model is one of
these again, with task weights folded in. Both are rebuilt from ``config`` alone, which is what the
saved manifests record.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from components.core.errors import DataError, ParamsError
from components.nn.encoders import TextEncoder
from components.nn.resnet import ImageBackbone


# BertConfig fields the student keeps from its teacher (enough to rebuild it; no hub metadata).
_BERT_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
              "hidden_dropout_prob", "attention_probs_dropout_prob", "type_vocab_size", "layer_norm_eps",
              "pad_token_id", "position_embedding_type")


def factorised_embedding(vocab_size: int, rank: int, hidden: int, pad_token_id: int | None) -> nn.Sequential:
    """vocab x k table, then a k x hidden projection: the word table is ~50 % of all-MiniLM-L6-v2."""
    return nn.Sequential(nn.Embedding(vocab_size, rank, padding_idx=pad_token_id), nn.Linear(rank, hidden, bias=False))


class TextBackbone(TextEncoder):
    """A shallow BertModel (no pooler) with a factorised word embedding, mean-pooled like TextEncoder."""

    def __init__(self, bert: dict[str, Any], embedding_rank: int, layers: list[int]) -> None:
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig(**bert), add_pooling_layer=False)
        model.embeddings.word_embeddings = factorised_embedding(
            bert["vocab_size"], embedding_rank, bert["hidden_size"], bert.get("pad_token_id"))
        super().__init__(model)
        self.config: dict[str, Any] = {"bert": dict(bert), "embedding_rank": embedding_rank, "layers": list(layers)}
        self.max_positions = int(bert["max_position_embeddings"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.max_positions:
            raise DataError(f"text inputs have {input_ids.shape[1]} tokens; the student keeps "
                            f"{self.max_positions} positions (student.text.max_positions)")
        return super().forward(input_ids, attention_mask)


@torch.no_grad()
def svd_factors(table: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD E ≈ (U√S)(√S Vᵀ), split evenly so neither factor dwarfs the other's scale."""
    u, s, vh = torch.linalg.svd(table.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def text_backbone_from_teacher(teacher: TextEncoder, layers: list[int], embedding_rank: int,
                               max_positions: int) -> TextBackbone:
    """Copy the teacher's embeddings (word table by truncated SVD) and the BertLayers listed in ``layers``."""
    cfg = teacher.model.config
    n_layers, hidden, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ParamsError(f"student.text.layers: layer(s) {bad} do not exist; the teacher has {n_layers} "
                          f"layers (0..{n_layers - 1})")
    if not 1 <= embedding_rank <= min(vocab, hidden):
        raise ParamsError(f"student.text.embedding_rank {embedding_rank} must lie in [1, min(vocab, hidden)] "
                          f"= [1, {min(vocab, hidden)}]")
    if max_positions > cfg.max_position_embeddings:
        raise ParamsError(f"student.text.max_positions {max_positions} exceeds the teacher's "
                          f"{cfg.max_position_embeddings} position embeddings")
    bert = {k: getattr(cfg, k) for k in _BERT_KEYS if hasattr(cfg, k)}
    bert.update(num_hidden_layers=len(layers), max_position_embeddings=max_positions)
    student = TextBackbone(bert, embedding_rank, layers)
    src, dst = teacher.model.embeddings, student.model.embeddings
    table, proj = svd_factors(src.word_embeddings.weight, embedding_rank)
    dst.word_embeddings[0].weight.copy_(table)
    dst.word_embeddings[1].weight.copy_(proj.T)
    dst.position_embeddings.weight.copy_(src.position_embeddings.weight[:max_positions])
    dst.token_type_embeddings.load_state_dict(src.token_type_embeddings.state_dict())
    dst.LayerNorm.load_state_dict(src.LayerNorm.state_dict())
    for i, j in enumerate(layers):
        student.model.encoder.layer[i].load_state_dict(teacher.model.encoder.layer[j].state_dict())
    return student


def backbone_from_config(modality: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a plain backbone (random weights) from the config a manifest recorded."""
    if modality == "image":
        return ImageBackbone(**config)
    return TextBackbone(**config)
