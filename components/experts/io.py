"""Save and load a task expert: its method's weights + head (+ probe head) as safetensors, and a manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file
from torch import nn

from components.config import ExpertMethodName, LoraParams, Modality, TaskKind
from components.core.artifacts import check_record, read_manifest, save_tensors, write_manifest
from components.core.errors import ArtifactError
from components.experts.methods import TaskVector, get_method
from components.nn.classifier import Classifier, make_head
from components.nn.foundation import Foundation


class ExpertManifest(BaseModel):
    """``manifest.json`` of an expert folder: what the fusion, evaluate and promote stages may rely on."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    kind: Literal["expert"] = "expert"
    task: str
    method: ExpertMethodName
    base_sha256: str  # the foundation it was trained on (loading onto another one is refused)
    lora: LoraParams
    modality: Modality | None = None
    task_kind: TaskKind | None = None
    label_names: list[str] = []
    targets: list[str] = []
    seed: int | None = None  # fixes the shared adapter start φ0 (fusion rebuilds A0 from it)
    train_samples: int | None = None
    val_samples: int | None = None
    prior_shift: float = 0.0  # tau of the decision's prior shift folded into the head (0: none)
    metrics: dict[str, dict[str, float]] = {}  # "val" (the expert), "probe_val"
    trainable_params: int | None = None
    train_seconds: float | None = None
    probe_seconds: float | None = None
    train_peak_memory_mb: float | None = None
    train_peak_memory_kind: str | None = None
    # written by the method's save (components.experts.methods)
    llora_path: Literal["jvp", "frozen_a"] | None = None
    init_sha256: str | None = None
    num_virtual_tokens: int | None = None
    files: dict[str, str] = {}  # sha256 per file (components.core.artifacts.write_manifest)


def check_expert_manifest(manifest: dict[str, Any], where: Path) -> ExpertManifest:
    return check_record(ExpertManifest, manifest, where, "expert manifest")


@dataclass
class Expert:
    task: str
    encoder: nn.Module  # the method's trained encoder (PEFT, linearized PEFT, or a full copy)
    head: nn.Linear
    probe_head: nn.Linear
    manifest: dict[str, Any]
    base: nn.Module

    @property
    def info(self) -> ExpertManifest:
        """The manifest, typed (checked when the expert was saved and when it was loaded)."""
        return ExpertManifest.model_validate(self.manifest)

    def classifier(self) -> Classifier:
        return Classifier(self.encoder, self.head).eval()

    def delta(self) -> TaskVector:
        """The expert's dense weight update ΔW over the foundation (its task vector)."""
        method = get_method(self.manifest["method"])
        if method.delta is None:
            raise ArtifactError(f"expert {self.task!r} is a {method.pretty}: it changes no weight, so it has no "
                                "task vector to merge or fold into the backbone (use lora, llora or full)")
        return method.delta(self.encoder, self.base)


def expert_method(folder: Path) -> str:
    """The method an expert folder was trained with (read from its manifest, files not verified)."""
    return str(read_manifest(folder, kind="expert", verify=False)["method"])


def stored_bytes(folder: Path) -> int:
    """Bytes an expert needs on disk: its method's weights and its head (not the probe, bundle or manifest).

    Only tensor files count. A LoRA expert's PEFT ``adapter_config.json`` (~1 KB of settings, no weights) is left
    out on purpose, like the manifest that holds the other methods' settings: counting it would charge LoRA and
    frozen-A L-LoRA for a file format rather than for their parameters (on small adapters it is as large as their
    weights); without it sizes compare across methods, and a LoRA expert counts the same tensors as before PEFT's
    layout (adapter_model.safetensors replaced adapter.safetensors).
    """
    skip = {"probe_head.safetensors"}
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors") if p.name not in skip)


def save_expert(out_dir: Path, encoder: nn.Module, head: nn.Module, probe_head: nn.Module,
                manifest: dict[str, Any]) -> dict[str, Any]:
    check_expert_manifest({"kind": "expert", **manifest}, out_dir)  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = get_method(manifest["method"]).save(encoder, out_dir)
    save_tensors(head.state_dict(), out_dir / "head.safetensors")
    save_tensors(probe_head.state_dict(), out_dir / "probe_head.safetensors")
    full = {"kind": "expert", **manifest, **extra}
    check_expert_manifest(full, out_dir)
    return write_manifest(out_dir, full)


def load_expert(folder: Path, foundation: Foundation) -> Expert:
    """Load an expert onto ``foundation``; refuse one trained on another foundation."""
    manifest = read_manifest(folder, kind="expert")
    check_expert_manifest(manifest, folder)
    if manifest["base_sha256"] != foundation.sha256:
        raise ArtifactError(
            f"{folder}: expert for task {manifest['task']!r} was trained on foundation "
            f"{manifest['base_sha256'][:12]}, but the loaded foundation is {foundation.sha256[:12]}"
        )
    encoder = get_method(manifest["method"]).load(foundation.encoder, manifest, foundation.modality, folder)
    heads = []
    for name in ("head", "probe_head"):
        state = load_file(folder / f"{name}.safetensors")
        head = make_head(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        heads.append(head.eval())
    encoder.eval().requires_grad_(False)
    return Expert(manifest["task"], encoder, heads[0], heads[1], manifest, foundation.encoder)
