"""ResNet for 28x28 images (the MedMNIST v2 adaptation: a 3x3 stride-1 stem and no max-pool), GroupNorm.

``ImageBackbone([64, 128, 256, 512], blocks=2)`` is ResNet-18's body: the image foundation's ``resnet`` arch
(params/foundation.yaml). Narrow widths make the LoRKD image students and FedKIM's client encoders. Defined
here rather than taken from torchvision: torchvision's PyPI wheel is built against a different torch than the
pinned CPU torch 2.13 file and does not import beside it, and the norm layer differs anyway (below).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from components.core.errors import ParamsError


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
    """ResNet for 28x28 inputs: a 3x3 stem, then one stage of ``blocks`` residual blocks per width (each stage
    after the first halves the resolution), global average pool. Same input as ImageEncoder: ``pixels``
    (N, C, H, W). LoRA targets its blocks' ``conv1`` and ``conv2``."""

    arch = "resnet"

    def __init__(self, widths: list[int], blocks: int = 1, in_channels: int = 3) -> None:
        super().__init__()
        if not widths or min(widths) < 1 or blocks < 1:
            raise ParamsError(f"ResNet widths must be positive and blocks >= 1; got widths {widths}, blocks {blocks}")
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
