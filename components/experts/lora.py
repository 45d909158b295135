"""LoRA experts through PEFT: attach, check targets, read the dense update ΔW = s·B·A per layer."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from components.config import LoraParams
from components.core.errors import ParamsError

ADAPTER = "default"


def lora_targets(lp: LoraParams, modality: str) -> list[str]:
    return list(lp.text_targets if modality == "text" else lp.image_targets)


def check_targets(model: nn.Module, targets: list[str], where: str) -> None:
    """Every target must name (as a suffix) at least one Linear/Conv2d; PEFT only fails if none does."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            sample = sorted({n.rsplit(".", 1)[-1] for n in names})[:12]
            raise ParamsError(
                f"{where}: target module {t!r} matches no Linear/Conv2d layer in the model; "
                f"layer names end in e.g. {sample}"
            )


def attach_lora(encoder: nn.Module, lp: LoraParams, modality: str) -> PeftModel:
    """A trainable LoRA copy of a frozen encoder (the encoder itself is left untouched)."""
    targets = lora_targets(lp, modality)
    key = "text_targets" if modality == "text" else "image_targets"
    check_targets(encoder, targets, f"experts.lora.{key}")
    config = LoraConfig(r=lp.rank, lora_alpha=lp.alpha, lora_dropout=lp.dropout, target_modules=targets,
                        bias="none")
    return get_peft_model(copy.deepcopy(encoder), config)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """LoRA layers keyed by the name of the weight they adapt in the plain encoder.

    A layer wrapped by a linearizing module (one with ``wrapped_attr``) keeps its name from before wrapping.
    """
    wrappers = {name for name, m in model.named_modules() if getattr(m, "wrapped_attr", None)}
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parent = name.rpartition(".")[0]
            plain = (parent if parent in wrappers else name).removeprefix("base_model.model.")
            out[f"{plain}.weight"] = module
    return out


@torch.no_grad()
def delta_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The dense weight update of every adapted layer, ΔW = (alpha/r)·B·A (conv kernels reshaped).

    Fusion works in this space: merging A and B separately would make w=-1 equal w=+1 and add cross
    terms (peft#3004), so task vectors are ΔW, not (A, B).
    """
    return {k: m.get_delta_weight(ADAPTER).detach().clone() for k, m in lora_layers(model).items()}
