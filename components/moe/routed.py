"""AT-MoE's routed encoder: the frozen foundation with frozen task LoRA experts mixed in every adapted layer by that
layer's own router, and its save/load as a bundle wrapper (``routing``).

The router input is the frozen foundation's own pooled embedding of the request (one extra forward with the
experts bypassed, computed once per forward), so every layer routes from the same x but with its own weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from components.bundle.format import WRAPPERS, Wrapper
from components.core.errors import ArtifactError
from components.moe.errors import MoEParamsError
from components.moe.layers import (attach_molora, attach_routers, foundation_only, molora_layers,
                                   routing_context)
from components.moe.mixing import LoraFactors
from components.moe.routers import make_router

ROUTING = "routing"  # the bundle wrapper name


class RoutedEncoder(nn.Module):
    """``encoder`` (with MoLoRALinear layers) routed per request; ``fixed`` (E,) overrides the routers (a one-hot
    vector is that expert alone, a uniform one the plain mixture)."""

    def __init__(self, encoder: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.encoder, self.config = encoder, config
        self.out_dim = encoder.out_dim
        self.fixed: torch.Tensor | None = None

    @property
    def experts(self) -> list[str]:
        return list(self.config["experts"])

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        layers = molora_layers(self.encoder)
        if self.fixed is not None:
            with routing_context(layers, weights=self.fixed):
                return self.encoder(**inputs)
        with foundation_only(layers), torch.no_grad():
            x = self.encoder(**inputs)
        with routing_context(layers, features=x):
            return self.encoder(**inputs)

    def last_weights(self) -> dict[str, torch.Tensor]:
        """Per layer, the (N, E) expert weights of the last forward (for inspection and heatmaps)."""
        return {name: layer.last_weights for name, layer in molora_layers(self.encoder).items()}


def build_routed(encoder: nn.Module, experts: Mapping[str, Mapping[str, LoraFactors]], targets: Sequence[str], *,
                 router: str, groups: Sequence[Sequence[str]] | None, tau: float = 1.0, static_within: bool = False,
                 seed: int = 0) -> RoutedEncoder:
    """A routed copy of ``encoder``: ``experts`` maps expert name -> {layer: LoRA factors} (every expert must adapt
    the same layers); ``groups`` lists expert names per group (router ``grouped`` only)."""
    names = list(experts)
    if not names:
        raise MoEParamsError("no experts to route")
    layer_names = sorted(next(iter(experts.values())))
    for name, factors in experts.items():
        if sorted(factors) != layer_names:
            raise MoEParamsError(f"expert {name!r} adapts other layers ({sorted(factors)[:3]}...) than "
                                 f"{names[0]!r} ({layer_names[:3]}...); route experts trained with the same targets")
    model = copy.deepcopy(encoder)
    layers = attach_molora(model, targets, experts={layer: [experts[n][layer] for n in names] for layer in layer_names})
    index = None
    if groups is not None:
        unknown = sorted({e for g in groups for e in g} - set(names))
        if unknown:
            raise MoEParamsError(f"groups name expert(s) {unknown} that do not exist; experts: {names}")
        index = [[names.index(e) for e in g] for g in groups]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach_routers(layers, lambda _: make_router(router, encoder.out_dim, len(names), groups=index, tau=tau,
                                                     static_within=static_within))
    config = {"experts": names, "targets": list(targets), "layers": layer_names, "router": router,
              "groups": [list(g) for g in groups] if groups is not None else None, "tau": tau,
              "static_within": static_within, "general": None}
    return RoutedEncoder(model, config)


def add_general_adapter(routed: RoutedEncoder, *, rank: int, alpha: float, lam: float, learn_lam: bool,
                        seed: int = 0) -> None:
    """AT-MoE's general adapter in every routed layer, fresh and trainable: y = W0 h + λ·routed + (1 − λ)·general
    (train it inside ``general_only``, where λ = 0)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in molora_layers(routed.encoder).values():
        layer.add_general(rank=rank, alpha=alpha, mix=lam, learn_mix=learn_lam, generator=gen)
    routed.config["general"] = {"rank": rank, "alpha": alpha}


def routing_tensors(routed: RoutedEncoder) -> dict[str, torch.Tensor]:
    """What a deployed routed model carries besides the foundation: every layer's experts and router (and its
    general adapter with the λ it ended with)."""
    out = {}
    for name, layer in molora_layers(routed.encoder).items():
        out[f"{name}.expert_a"], out[f"{name}.expert_b"], out[f"{name}.scales"] = (
            layer.expert_a.detach(), layer.expert_b.detach(), layer.scales.detach())
        out.update({f"{name}.router.{k}": v.detach() for k, v in layer.router.state_dict().items()})
        if layer.general_a is not None:
            out[f"{name}.general_a"], out[f"{name}.general_b"] = layer.general_a.detach(), layer.general_b.detach()
            out[f"{name}.general_scale"], out[f"{name}.general_mix"] = (layer.general_scale.detach(),
                                                                        layer.mix.detach())
    return out


def load_routed(encoder: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any], where: str) -> nn.Module:
    """Rebuild a routed encoder over ``encoder`` (the bundle's foundation) from ``routing_tensors`` and its config."""
    try:
        experts = {}
        for e, name in enumerate(config["experts"]):
            experts[name] = {layer: LoraFactors(tensors[f"{layer}.expert_a"][e], tensors[f"{layer}.expert_b"][e],
                                                float(tensors[f"{layer}.scales"][e])) for layer in config["layers"]}
        routed = build_routed(encoder, experts, config["targets"], router=config["router"], groups=config["groups"],
                              tau=config["tau"], static_within=config["static_within"])
        for name, layer in molora_layers(routed.encoder).items():
            prefix = f"{name}.router."
            layer.router.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            if config.get("general"):
                layer.add_general(LoraFactors(tensors[f"{name}.general_a"], tensors[f"{name}.general_b"],
                                              float(tensors[f"{name}.general_scale"])),
                                  mix=float(tensors[f"{name}.general_mix"]))
        routed.config["general"] = config.get("general")
    except (KeyError, RuntimeError, MoEParamsError) as exc:
        raise ArtifactError(f"{where}: routed experts do not match their config ({exc})") from None
    return routed.eval().requires_grad_(False)


WRAPPERS.add(ROUTING, Wrapper(ROUTING, load_routed))
