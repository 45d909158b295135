"""Expert methods as a self-checking registry: how each builds its trainable encoder, saves and reloads it,
and turns it into a dense weight update ΔW (the task vector fusion and deployment work on).

The key is the value of ``method:`` in params/experts.yaml and the MLflow tag.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import CONFIG_NAME as PEFT_CONFIG
from peft.utils import SAFETENSORS_WEIGHTS_NAME as PEFT_WEIGHTS
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from components.core.artifacts import save_tensors
from components.config import ExpertMethodName, ExpertsParams, LoraParams
from components.core.errors import ArtifactError, ParamsError
from components.core.registry import Registry
from components.experts.linearize import LinearizedLayer, linearize, linearized_delta_weights
from components.experts.lora import ADAPTER, attach_lora, delta_weights, lora_targets
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


def save_peft_adapter(model: PeftModel, folder: Path) -> None:
    """PEFT's standard adapter layout in ``folder``: ``adapter_config.json`` + ``adapter_model.safetensors``,
    written by ``PeftModel.save_pretrained``, so ``PeftModel.from_pretrained(foundation encoder, folder)`` opens
    the expert without this project's code.

    save_pretrained also writes a Hub model card (README.md, placeholder text); an expert folder is no Hub repo
    (its manifest is its record), so PEFT writes into a scratch folder and only the two adapter files are moved in:
    nothing else in ``folder`` is touched (PEFT would update a README.md already there).
    """
    with tempfile.TemporaryDirectory(dir=folder, prefix=".peft-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[ADAPTER])
        _canonical_config(Path(tmp) / PEFT_CONFIG)
        for name in (PEFT_CONFIG, PEFT_WEIGHTS):
            os.replace(Path(tmp) / name, folder / name)


def _canonical_config(path: Path) -> None:
    """PEFT keeps ``target_modules`` as a set and writes it in set order, which Python's per-process string
    hashing changes from one process to the next: the same expert would get a different ``adapter_config.json``
    (and sha256) in another process. Sorted, it is the same file wherever it was written."""
    config = json.loads(path.read_text())
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def load_peft_adapter(encoder: nn.Module, manifest: dict[str, Any], modality: str, folder: Path) -> PeftModel:
    """A LoRA expert saved by :func:`save_peft_adapter`, opened with PEFT's own loader on a copy of ``encoder``."""
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:  # checked here: PEFT would look a missing local file up on the Hub
        raise ArtifactError(f"{folder}: no {' and '.join(missing)} (PEFT's adapter layout); an expert saved with a "
                            "bare adapter.safetensors predates it: re-run the experts stage")
    try:
        model = PeftModel.from_pretrained(copy.deepcopy(encoder), str(folder), adapter_name=ADAPTER)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
        raise ArtifactError(f"{folder}: PEFT cannot open the adapter ({type(exc).__name__}: {exc})") from exc
    # the adapter must be the one the manifest records (fusion rebuilds φ0 and compares from those settings)
    lp, config = LoraParams(**manifest["lora"]), model.peft_config[ADAPTER]
    saved = {"rank": config.r, "alpha": float(config.lora_alpha), "targets": sorted(config.target_modules or [])}
    wanted = {"rank": lp.rank, "alpha": float(lp.alpha), "targets": sorted(lora_targets(lp, modality))}
    if saved != wanted:
        raise ArtifactError(f"{config_path}: adapter settings {saved} differ from the manifest's LoRA {wanted}")
    # PEFT only warns about stray or missing adapter weights; here they are an error naming the file
    with safe_open(weights_path, "pt") as fh:
        stored = set(fh.keys())
    expected = set(get_peft_model_state_dict(model))
    if stored - expected:
        raise ArtifactError(f"{weights_path}: unexpected keys {sorted(stored - expected)[:3]}")
    if expected - stored:
        raise ArtifactError(f"{weights_path}: missing keys {sorted(expected - stored)[:3]}")
    return model


def _lora_save(model: nn.Module, folder: Path) -> dict[str, Any]:
    save_peft_adapter(model, folder)
    return {}


register(ExpertMethod("lora", "LoRA", "Hu et al., ICLR 2022",
                      "low-rank update W0 + (alpha/r)·B·A on the target layers (PEFT); foundation frozen",
                      _lora_build, _lora_save, load_peft_adapter,
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
    """φ0 (``adapter_init.safetensors``) and the trained point. On the frozen-A path the trained adapter is a plain
    LoRA adapter (B trained from B0 = 0, A at A0), stored in PEFT's layout like the lora method's. On the jvp path
    the LoRA weights stay at φ0 and the task vector δ lives in the linearized wrappers (``delta.safetensors``):
    PEFT cannot represent that model, so no PEFT adapter is written (its weights would just repeat φ0)."""
    init = model.medexperts_init
    save_tensors(init, folder / "adapter_init.safetensors")
    if model.medexperts_path == "jvp":
        save_tensors(_deltas(model), folder / "delta.safetensors")
    else:
        save_peft_adapter(model, folder)
    return {"llora_path": model.medexperts_path, "init_sha256": init_hash(init)}


def _llora_load(encoder: nn.Module, manifest: dict[str, Any], modality: str, folder: Path) -> nn.Module:
    init = load_file(folder / "adapter_init.safetensors")
    if manifest["llora_path"] == "frozen_a":
        # trained B with A0: plain LoRA weights that are exactly the linearization at B0 = 0
        model = load_peft_adapter(encoder, manifest, modality, folder)
        model.medexperts_init, model.medexperts_path = init, "frozen_a"
        return model
    model = attach_lora(encoder, LoraParams(**manifest["lora"]), modality)
    model.medexperts_init, model.medexperts_path = init, "jvp"
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
