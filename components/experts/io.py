"""Save and load a task expert: adapter + head (+ its probe head) as safetensors, and a manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from components.artifacts import read_manifest, write_manifest
from components.config import LoraParams
from components.errors import ArtifactError
from components.experts.lora import attach_lora
from components.models.classifier import Classifier, make_head
from components.models.foundation import Foundation


@dataclass
class Expert:
    task: str
    peft_encoder: PeftModel
    head: nn.Linear
    probe_head: nn.Linear
    manifest: dict[str, Any]

    def classifier(self) -> Classifier:
        return Classifier(self.peft_encoder, self.head).eval()


def save_expert(out_dir: Path, peft_encoder: PeftModel, head: nn.Module, probe_head: nn.Module,
                manifest: dict[str, Any]) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(peft_encoder).items()}
    save_file(adapter, out_dir / "adapter.safetensors")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, out_dir / "head.safetensors")
    save_file({k: v.contiguous() for k, v in probe_head.state_dict().items()}, out_dir / "probe_head.safetensors")
    return write_manifest(out_dir, {"kind": "expert", **manifest})


def load_expert(folder: Path, foundation: Foundation) -> Expert:
    """Load an expert onto ``foundation``; refuse one trained on another foundation."""
    manifest = read_manifest(folder, kind="expert")
    if manifest["base_sha256"] != foundation.sha256:
        raise ArtifactError(
            f"{folder}: expert for task {manifest['task']!r} was trained on foundation "
            f"{manifest['base_sha256'][:12]}, but the loaded foundation is {foundation.sha256[:12]}"
        )
    lp = LoraParams(**manifest["lora"])
    peft_encoder = attach_lora(foundation.encoder, lp, foundation.modality)
    result = set_peft_model_state_dict(peft_encoder, load_file(folder / "adapter.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise ArtifactError(f"{folder}/adapter.safetensors: unexpected keys {result.unexpected_keys[:3]}")
    heads = []
    for name in ("head", "probe_head"):
        state = load_file(folder / f"{name}.safetensors")
        head = make_head(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        heads.append(head.eval())
    peft_encoder.eval().requires_grad_(False)
    return Expert(manifest["task"], peft_encoder, heads[0], heads[1], manifest)

