"""Linearized LoRA (L-LoRA; Tang et al., ICLR 2024): each adapted layer replaced by its first-order Taylor
expansion in the adapter parameters φ around their initial values φ0:

    h_lin(x; φ) = h(x; φ0) + J_φ h(x; φ0) · (φ − φ0)

PEFT has no linearized adapters, so this wraps PEFT's LoRA layers. Two paths:
- ``jvp``: the general one, forward-mode AD (``torch.func.jvp``) over a functional call of the layer; valid
  for any φ0 (e.g. B0 ≠ 0 when continuing from a trained adapter).
- ``frozen_a``: with PEFT's init B0 = 0 the Jacobian w.r.t. A vanishes, so h_lin = W0 x + s (B − 0) A0 x:
  LoRA with A frozen at A0. Same function, no JVP cost.
The trainable parameters are the task vector δ = φ − φ0 itself, so experts add without re-deriving it.
"""

from __future__ import annotations

from typing import Literal

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.func import functional_call, jvp

from components.experts.lora import ADAPTER, lora_layers

Path_ = Literal["auto", "jvp", "frozen_a"]


def adapter_names(layer: LoraLayer) -> list[str]:
    """Names (inside the layer) of its adapter weights, A then B."""
    return [n for n, _ in layer.named_parameters() if f"lora_A.{ADAPTER}." in n or f"lora_B.{ADAPTER}." in n]


class LinearizedLayer(nn.Module):
    """A LoRA layer frozen at φ0, evaluated at φ0 + δ through its first-order expansion (JVP)."""

    wrapped_attr = "layer"  # lets lora_layers() name the wrapped layer as before wrapping

    def __init__(self, layer: LoraLayer) -> None:
        super().__init__()
        self.layer = layer
        self.names = adapter_names(layer)
        for n in self.names:
            layer.get_parameter(n).requires_grad_(False)
        self.delta = nn.ParameterDict(
            {n.replace(".", "__"): nn.Parameter(torch.zeros_like(layer.get_parameter(n))) for n in self.names}
        )

    def tangents(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.delta[n.replace(".", "__")] for n in self.names)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        primals = tuple(self.layer.get_parameter(n) for n in self.names)

        def call(*params: torch.Tensor) -> torch.Tensor:
            return functional_call(self.layer, dict(zip(self.names, params, strict=True)), (x, *args), kwargs)

        out, tangent = jvp(call, primals, self.tangents())
        return out + tangent


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def b_is_zero(model: PeftModel) -> bool:
    return all(torch.count_nonzero(m.lora_B[ADAPTER].weight) == 0 for m in lora_layers(model).values())


def linearize(model: PeftModel, path: Path_ = "auto") -> str:
    """Make ``model`` (a PEFT LoRA model) linear in its adapter parameters, in place; returns the path used."""
    if path == "auto":
        path = "frozen_a" if b_is_zero(model) else "jvp"
    if path == "frozen_a":
        if not b_is_zero(model):
            raise ValueError("the frozen-A path equals the linearization only when every B0 is zero")
        for layer in lora_layers(model).values():
            layer.lora_A[ADAPTER].weight.requires_grad_(False)
        return path
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and not isinstance(module, LinearizedLayer):
            _set_module(model, name, LinearizedLayer(module))
    return path


def _bilinear_delta(layer: LoraLayer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PEFT's ΔW(A, B) = s·B·A for given A, B (its layout logic covers convs and fan_in_fan_out)."""
    wa, wb = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    saved = wa.data, wb.data
    try:
        wa.data, wb.data = a, b
        return layer.get_delta_weight(ADAPTER).detach().clone()
    finally:
        wa.data, wb.data = saved


@torch.no_grad()
def linearized_delta_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """ΔW of every adapted layer. A linearized layer is exactly linear in δ, and ΔW is bilinear in (A, B), so
    ΔW_lin = ΔW(A0, B0) + ΔW(A0, δB) + ΔW(δA, B0); a layer without wrapper (frozen-A path) is plain LoRA.
    """
    wrappers = {id(m.layer): m for m in model.modules() if isinstance(m, LinearizedLayer)}
    out = {}
    for key, layer in lora_layers(model).items():
        a0, b0 = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        wrapper = wrappers.get(id(layer))
        if wrapper is None:
            out[key] = _bilinear_delta(layer, a0.data, b0.data)
            continue
        d_a, d_b = wrapper.tangents()
        out[key] = (_bilinear_delta(layer, a0.data, b0.data) + _bilinear_delta(layer, a0.data, d_b.data)
                    + _bilinear_delta(layer, d_a.data, b0.data))
    return out
