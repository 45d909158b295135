"""LoRKD student backbones, plain (no expert code): a narrow ResNet for 28x28 images and a shallow BERT.

The expert student is one of these with ``attach_experts`` applied; a fused deployable model is one of
these again, with task weights folded in. Both are rebuilt from ``config`` alone, which is what the
saved manifests record.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from components.core.errors import DataError, ParamsError
from components.nn.encoders import TextEncoder


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: per-sample statistics keep the samples of a mixed batch independent (so
    # gradients separate exactly by task) and make fused weights give the same outputs in any batch.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResidualBlock(nn.Module):
    """conv3x3-GN-ReLU-conv3x3-GN plus a (1x1 conv-GN when the shape changes) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(c_out)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return self.act(y + self.shortcut(x))


class ImageBackbone(nn.Module):
    """Narrow ResNet for 28x28 inputs: a 3x3 stem, then one stage per width (each after the first halves
    the resolution), global average pool. Same input as ImageEncoder: ``pixels`` (N, C, H, W)."""

    def __init__(self, widths: list[int], blocks: int = 1, in_channels: int = 3) -> None:
        super().__init__()
        if not widths or min(widths) < 1 or blocks < 1:
            raise ParamsError(f"student.image: widths must be positive and blocks >= 1; got {widths}, {blocks}")
        self.config: dict[str, Any] = {"widths": list(widths), "blocks": blocks, "in_channels": in_channels}
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), _norm(widths[0]),
                                  nn.ReLU())
        layers: list[nn.Module] = []
        c_prev = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                layers.append(ResidualBlock(c_prev, width, 2 if i > 0 and j == 0 else 1))
                c_prev = width
        self.stages = nn.Sequential(*layers)
        self.out_dim = c_prev

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(pixels)).mean(dim=(2, 3))


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
