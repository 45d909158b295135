"""Expert methods as a self-checking registry: how each builds its trainable encoder, saves and reloads it,
and turns it into a dense weight update ΔW (the task vector fusion and deployment work on).

The key is the value of ``method:`` in params/experts.yaml and the MLflow tag.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from components.core.artifacts import save_tensors
from components.config import ExpertMethodName, ExpertsParams, LoraParams
from components.core.errors import ArtifactError, ParamsError
from components.core.registry import Registry
from components.experts.linearize import LinearizedLayer, linearize, linearized_delta_weights
from components.experts.lora import attach_lora, delta_weights
from components.experts.prompt import attach_prompt, load_prompt, prompt_tensors
from components.core.fingerprint import sha256_bytes
from components.nn.foundation import Foundation

TaskVector = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ExpertMethod:
    name: str
    pretty: str
    paper: str
    what: str
    build: Callable[[Foundation, ExpertsParams, str], nn.Module]  # (foundation, params, task description)
    save: Callable[[nn.Module, Path], dict[str, Any]]
    load: Callable[[nn.Module, dict[str, Any], str, Path], nn.Module]
    # ΔW over the foundation (the task vector); None: the method changes no weight (a soft prompt), so it
    # cannot be folded into the backbone or merged in weight space.
    delta: Callable[[nn.Module, nn.Module], TaskVector] | None
    # Parts a deployed bundle must carry besides ΔW (the soft prompt), as {registered wrapper name: tensors}, or None.
    wrappers: Callable[[nn.Module], dict[str, dict[str, torch.Tensor]]] | None = None


METHODS: Registry[ExpertMethod] = Registry("expert method", ParamsError)


def register(method: ExpertMethod) -> ExpertMethod:
    """Add a method; a bad or duplicate name is an error at import."""
    return METHODS.add(method.name, method)


def init_hash(tensors: dict[str, torch.Tensor]) -> str:
    """Identity of an adapter initialisation φ0 (experts to be added must share it)."""
    return sha256_bytes(b"".join(k.encode() + t.detach().cpu().contiguous().numpy().tobytes()
                                 for k, t in sorted(tensors.items())))


# --------------------------------------------------------------------------- LoRA
def _lora_build(found: Foundation, ep: ExpertsParams, description: str) -> nn.Module:
    return attach_lora(found.encoder, ep.lora, found.modality)


def _lora_save(model: nn.Module, folder: Path) -> dict[str, Any]:
    save_tensors(get_peft_model_state_dict(model), folder / "adapter.safetensors")
    return {}


def _lora_load(encoder: nn.Module, manifest: dict[str, Any], modality: str, folder: Path) -> nn.Module:
    model = attach_lora(encoder, LoraParams(**manifest["lora"]), modality)
    result = set_peft_model_state_dict(model, load_file(folder / "adapter.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise ArtifactError(f"{folder}/adapter.safetensors: unexpected keys {result.unexpected_keys[:3]}")
    return model


register(ExpertMethod("lora", "LoRA", "Hu et al., ICLR 2022",
                      "low-rank update W0 + (alpha/r)·B·A on the target layers (PEFT); foundation frozen",
                      _lora_build, _lora_save, _lora_load,
                      lambda model, _: delta_weights(model)))


# --------------------------------------------------------------------------- L-LoRA
def _llora_build(found: Foundation, ep: ExpertsParams, description: str) -> nn.Module:
    model = attach_lora(found.encoder, ep.lora, found.modality)  # φ0 from the seeded init: the same for every task
    model.medexperts_init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    model.medexperts_path = linearize(model, ep.llora_path)
    return model


def _deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, m in model.named_modules() if isinstance(m, LinearizedLayer)
            for k, v in m.delta.items()}


def _llora_save(model: nn.Module, folder: Path) -> dict[str, Any]:
    init = model.medexperts_init
    save_tensors(init, folder / "adapter_init.safetensors")
    save_tensors(get_peft_model_state_dict(model), folder / "adapter.safetensors")
    if model.medexperts_path == "jvp":
        save_tensors(_deltas(model), folder / "delta.safetensors")
    return {"llora_path": model.medexperts_path, "init_sha256": init_hash(init)}


def _llora_load(encoder: nn.Module, manifest: dict[str, Any], modality: str, folder: Path) -> nn.Module:
    model = attach_lora(encoder, LoraParams(**manifest["lora"]), modality)
    init = load_file(folder / "adapter_init.safetensors")
    model.medexperts_init, model.medexperts_path = init, manifest["llora_path"]
    if model.medexperts_path == "frozen_a":
        # trained B with A0: plain LoRA weights that are exactly the linearization at B0 = 0
        set_peft_model_state_dict(model, load_file(folder / "adapter.safetensors"))
        return model
    set_peft_model_state_dict(model, init)
    linearize(model, "jvp")
    deltas = load_file(folder / "delta.safetensors")
    for name, m in model.named_modules():
        if isinstance(m, LinearizedLayer):
            for k, p in m.delta.items():
                p.data.copy_(deltas[f"{name}.{k}"])
    return model


register(ExpertMethod("llora", "L-LoRA (linearized LoRA)", "Tang et al., ICLR 2024",
                      "each LoRA layer replaced by its first-order expansion in (A, B) around the shared seeded φ0 "
                      "(torch.func.jvp; closed form when B0 = 0), so task vectors add exactly per layer",
                      _llora_build, _llora_save,
                      _llora_load, lambda model, _: linearized_delta_weights(model)))


# --------------------------------------------------------------------------- full fine-tuning
def _full_build(found: Foundation, ep: ExpertsParams, description: str) -> nn.Module:
    return copy.deepcopy(found.encoder).requires_grad_(True)


def _full_save(model: nn.Module, folder: Path) -> dict[str, Any]:
    save_tensors(model.state_dict(), folder / "encoder.safetensors")
    return {}


def _full_load(encoder: nn.Module, manifest: dict[str, Any], modality: str, folder: Path) -> nn.Module:
    model = copy.deepcopy(encoder)
    model.load_state_dict(load_file(folder / "encoder.safetensors"))
    return model


@torch.no_grad()
def _full_delta(model: nn.Module, base: nn.Module) -> TaskVector:
    base_params = dict(base.named_parameters())
    return {n: (p - base_params[n]).detach().clone() for n, p in model.named_parameters()}


register(ExpertMethod("full", "Full fine-tuning", "reference", "every encoder weight trained; the reference "
                      "the parameter-efficient methods are compared against", _full_build, _full_save, _full_load,
                      _full_delta))


# --------------------------------------------------------------------------- soft prompt
def _prompt_build(found: Foundation, ep: ExpertsParams, description: str) -> nn.Module:
    folder = Path(found.spec["folder"]) if "folder" in found.spec else None
    return attach_prompt(found.encoder, ep.prompt, description=description, tokenizer_folder=folder,
                         max_length=found.max_length)


def _prompt_save(model: nn.Module, folder: Path) -> dict[str, Any]:
    save_tensors(prompt_tensors(model), folder / "prompt.safetensors")
    return {"num_virtual_tokens": model.model.peft_config["default"].num_virtual_tokens}


def _prompt_load(encoder: nn.Module, manifest: dict[str, Any], modality: str, folder: Path) -> nn.Module:
    return load_prompt(encoder, load_file(folder / "prompt.safetensors"), str(folder / "prompt.safetensors"))


register(ExpertMethod("prompt", "Soft prompt (prompt tuning)", "Lester et al., EMNLP 2021",
                      "N trainable virtual-token embeddings before the input embeddings of the frozen text encoder "
                      "(PEFT prompt tuning; init from the task description); text only", _prompt_build,
                      _prompt_save, _prompt_load, None, lambda model: {"prompt": prompt_tensors(model)}))


def get_method(name: str) -> ExpertMethod:
    return METHODS.get(name)


METHODS.check_names(ExpertMethodName)  # params validate `method:` against the same names
