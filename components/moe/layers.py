"""Mixture-of-LoRA-experts Linear layers inside a frozen network (shared by M3OE and AT-MoE).

y = W0 x + Σ_e w_e(x) · s_e · B_e A_e x, every expert in one batched product (``mixing.mix_lora``); with a general
adapter (AT-MoE's option) y = W0 x + λ·routed + (1 − λ)·general. W0 is frozen. Experts are either fresh and
trainable (M3OE: A random, B zero, so training starts from the foundation) or trained LoRA experts loaded from
outside and frozen (AT-MoE: only the routers train); frozen factors are buffers, so they get no gradient.

The routing is set from outside for the whole network (``routing_context``), because a layer deep inside a
Hugging Face ``BertLayer`` cannot be handed extra forward arguments. Either
- ``weights``: (N, E) per sample (or (E,) for the batch) shared by every layer — M3OE's gate — or a dict
  layer name -> weights (replaying recorded or fixed per-layer routings); or
- ``features``: a pooled input (N, d) that each layer's own router (``attach_routers``) turns into that layer's
  weights — AT-MoE's layer-wise routing.
Each layer keeps the weights it last used (``last_weights``, detached) for inspection.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from components.moe.errors import MoEParamsError
from components.moe.mixing import LoraFactors, check_weights, mix_lora, mixture_delta, stack_factors

Weights = torch.Tensor | Mapping[str, torch.Tensor]  # one (N, E) / (E,) for every layer, or per layer name


class Routing(NamedTuple):
    """What ``routing_context`` hands every layer: shared/per-layer weights, or features for per-layer routers."""

    weights: Weights | None
    features: torch.Tensor | None


def _store(module: nn.Module, name: str, tensor: torch.Tensor, trainable: bool) -> None:
    # Frozen factors are buffers: they move with .to() and sit in the state dict, but can never get a gradient.
    if trainable:
        module.register_parameter(name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)


def _random_a(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    # Kaiming-uniform with a=sqrt(5) (nn.Linear's default, as PEFT's LoRA): bound 1/sqrt(fan_in).
    return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(shape[-1])


def _pick(weights: Weights, name: str) -> torch.Tensor:
    if isinstance(weights, Mapping):
        if name not in weights:
            raise MoEParamsError(f"routing weights are given for layers {sorted(weights)[:6]} but not for {name!r}")
        return weights[name]
    return weights


class MoLoRALinear(nn.Module):
    """A frozen nn.Linear plus E rank-r LoRA experts mixed per sample; inputs (N, in) or (N, T, in), batch first.

    Fresh experts: ``MoLoRALinear(base, num_experts, rank, alpha)``; given ones: ``MoLoRALinear(base,
    experts=[LoraFactors(A, B, scale), ...])`` (scales may differ, ranks must match). ``train_experts`` defaults
    to True for fresh experts and False for given ones.
    """

    def __init__(self, base: nn.Linear, num_experts: int | None = None, rank: int | None = None,
                 alpha: float | None = None, *, experts: Sequence[LoraFactors] | None = None,
                 train_experts: bool | None = None, dropout: float = 0.0,
                 generator: torch.Generator | None = None, name: str = "linear") -> None:
        super().__init__()
        self.name, self.in_features, self.out_features = name, base.in_features, base.out_features
        if experts is None:
            if num_experts is None or rank is None or num_experts < 1 or rank < 1:
                raise MoEParamsError(f"layer {name!r}: fresh experts need num_experts >= 1 and rank >= 1, "
                                     f"got num_experts={num_experts}, rank={rank}")
            limit = min(base.in_features, base.out_features)
            if rank > limit:
                raise MoEParamsError(f"layer {name!r} (Linear {base.in_features}->{base.out_features}): rank {rank} "
                                     f"exceeds min(in_features, out_features) = {limit}")
            a = _random_a((num_experts, rank, base.in_features), generator)
            b = torch.zeros(num_experts, base.out_features, rank)
            scales = torch.full((num_experts,), 1.0 if alpha is None else alpha / rank)
            trainable = True if train_experts is None else train_experts
        else:
            if num_experts is not None or rank is not None or alpha is not None:
                raise MoEParamsError(f"layer {name!r}: give either experts or num_experts/rank/alpha, not both")
            a, b, scales = stack_factors(experts, base.in_features, base.out_features, f"layer {name!r}")
            trainable = bool(train_experts)
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.num_experts, self.rank = a.shape[0], a.shape[1]
        self.base = base.requires_grad_(False)
        _store(self, "expert_a", a.to(**like), trainable)  # (E, r, in)
        _store(self, "expert_b", b.to(**like), trainable)  # (E, out, r)
        self.register_buffer("scales", scales.to(**like))  # (E,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_module("router", None)  # AT-MoE: this layer's own router (attach_routers)
        self.general_a: torch.Tensor | None = None
        self.routing: Routing | None = None
        self.last_weights: torch.Tensor | None = None
        self.bypass = False
        self.general_alone = False

    def add_general(self, factors: LoraFactors | None = None, *, rank: int | None = None, alpha: float | None = None,
                    trainable: bool | None = None, mix: float = 0.5, learn_mix: bool = False,
                    generator: torch.Generator | None = None) -> None:
        """Mix in one general LoRA: y = W0 x + λ·routed + (1 − λ)·general.

        ``factors`` loads a trained one (frozen unless ``trainable``); else a fresh rank-``rank`` one (trainable).
        λ = ``mix``, or with ``learn_mix`` a learnable sigmoid(θ) in (0, 1) starting at ``mix``.
        """
        if self.general_a is not None:
            raise MoEParamsError(f"layer {self.name!r} already has a general adapter")
        if not (0.0 < mix < 1.0 if learn_mix else 0.0 <= mix <= 1.0):
            raise MoEParamsError(f"layer {self.name!r}: mix λ={mix} must lie in "
                                 f"{'(0, 1) to be learned as a sigmoid' if learn_mix else '[0, 1]'}")
        like = {"dtype": self.base.weight.dtype, "device": self.base.weight.device}
        if factors is None:
            if rank is None or not 1 <= rank <= min(self.in_features, self.out_features):
                raise MoEParamsError(f"layer {self.name!r}: a fresh general adapter needs 1 <= rank <= "
                                     f"{min(self.in_features, self.out_features)}, got {rank}")
            a, b = _random_a((rank, self.in_features), generator), torch.zeros(self.out_features, rank)
            scale, trainable = 1.0 if alpha is None else alpha / rank, True if trainable is None else trainable
        else:
            sa, sb, ss = stack_factors([factors], self.in_features, self.out_features, f"layer {self.name!r} general")
            a, b, scale, trainable = sa[0], sb[0], float(ss[0]), bool(trainable)
        del self.general_a  # the plain None attribute gives way to a parameter or buffer
        _store(self, "general_a", a.to(**like), trainable)
        _store(self, "general_b", b.to(**like), trainable)
        self.register_buffer("general_scale", torch.tensor(scale, **like))
        if learn_mix:
            self.mix_logit = nn.Parameter(torch.tensor(math.log(mix / (1 - mix)), **like))
        else:
            self.register_buffer("mix_value", torch.tensor(mix, **like))

    @property
    def mix(self) -> torch.Tensor | None:
        """λ, the routed experts' share against the general adapter (None without one)."""
        if self.general_a is None:
            return None
        return torch.sigmoid(self.mix_logit) if hasattr(self, "mix_logit") else self.mix_value

    def _weights(self, batch: int) -> torch.Tensor:
        if self.routing is None:
            raise RuntimeError(f"layer {self.name!r}: no routing set; run the model inside routing_context(...)")
        if self.routing.features is not None:
            if self.router is None:
                raise RuntimeError(f"layer {self.name!r}: routing by features needs a router on every layer "
                                   "(attach_routers)")
            weights = self.router(self.routing.features)
        else:
            weights = _pick(self.routing.weights, self.name)
        weights = check_weights(weights, batch, self.num_experts, f"layer {self.name!r}")
        self.last_weights = weights.detach()
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.bypass:  # the frozen foundation alone (AT-MoE reads its pooled input embedding this way)
            return out
        n = x.shape[0]
        h = self.dropout(x).reshape(n, -1, self.in_features)  # (N, in) -> (N, 1, in); tokens stay a sequence
        if self.general_alone:  # λ = 0: the general adapter is trained this way, before the routers
            if self.general_a is None:
                raise RuntimeError(f"layer {self.name!r}: general_only() needs a general adapter (add_general)")
            return out + (self.general_scale * F.linear(F.linear(h, self.general_a), self.general_b)).reshape(
                out.shape)
        weights = self._weights(n)
        routed = mix_lora(h, self.expert_a, self.expert_b, weights.to(h.dtype) * self.scales).reshape(out.shape)
        if self.general_a is None:
            return out + routed
        general = self.general_scale * F.linear(F.linear(h, self.general_a), self.general_b)
        lam = self.mix
        return out + lam * routed + (1 - lam) * general.reshape(out.shape)

    def delta_weight(self, weights: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in) of this layer under one fixed weight vector (E,), the general adapter included."""
        weights = check_weights(weights, 1, self.num_experts, f"layer {self.name!r}")[0]
        delta = mixture_delta(self.expert_a, self.expert_b, weights.to(self.scales.dtype) * self.scales)
        if self.general_a is None:
            return delta
        lam = self.mix
        return lam * delta + (1 - lam) * self.general_scale * (self.general_b @ self.general_a)

    @torch.no_grad()
    def fold(self, weights: torch.Tensor) -> nn.Linear:
        """A plain copy of the base Linear with the mixture under ``weights`` (E,) folded in: W = W0 + ΔW."""
        plain = copy.deepcopy(self.base)
        plain.weight.add_(self.delta_weight(weights).to(plain.weight.dtype))
        return plain


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and type(m) is nn.Linear]


def match_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the nn.Linear layers whose name is a target or ends in ``.target`` (PEFT's target_modules)."""
    names = _linear_names(model)
    if not targets:
        raise MoEParamsError("targets: no target modules given")
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            sample = sorted({n.rsplit(".", 1)[-1] for n in names})[:12]
            raise MoEParamsError(f"target module {t!r} matches no nn.Linear layer in the model; "
                                 f"layer names end in e.g. {sample}")
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def attach_molora(model: nn.Module, targets: Sequence[str], num_experts: int | None = None, rank: int | None = None,
                  alpha: float | None = None, *, experts: Mapping[str, Sequence[LoraFactors]] | None = None,
                  train_experts: bool | None = None, dropout: float = 0.0, seed: int = 0,
                  freeze: bool = True) -> dict[str, MoLoRALinear]:
    """Replace every targeted nn.Linear by a ``MoLoRALinear``, in place; returns the new layers by name.

    ``experts`` maps each targeted layer's name to its experts' factors (e.g. ``peft_factors`` of each trained
    expert); without it fresh experts are drawn from a generator seeded with ``seed`` in module order.
    ``freeze`` first freezes every existing parameter of ``model`` (the foundation stays frozen, as in PEFT);
    the targeted bases are frozen either way.
    """
    names = match_targets(model, targets)
    if experts is not None:
        missing, extra = [n for n in names if n not in experts], sorted(set(experts) - set(names))
        if missing or extra:
            raise MoEParamsError(f"expert factors must cover exactly the targeted layers; missing for {missing[:4]}, "
                                 f"given for untargeted {extra[:4]}")
        counts = {n: len(experts[n]) for n in names}
        if len(set(counts.values())) > 1:
            raise MoEParamsError(f"every layer needs the same number of experts; got {counts}")
    if freeze:
        model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, MoLoRALinear] = {}
    for name in names:
        base = model.get_submodule(name)
        if experts is None:
            layer = MoLoRALinear(base, num_experts, rank, alpha, train_experts=train_experts, dropout=dropout,
                                 generator=gen, name=name)
        else:
            layer = MoLoRALinear(base, experts=experts[name], train_experts=train_experts, dropout=dropout, name=name)
        model.set_submodule(name, layer)
        layers[name] = layer
    return layers


def molora_layers(model: nn.Module) -> dict[str, MoLoRALinear]:
    return {m.name: m for m in model.modules() if isinstance(m, MoLoRALinear)}


def attach_routers(layers: Mapping[str, MoLoRALinear], make: Callable[[str], nn.Module]) -> dict[str, nn.Module]:
    """Give every layer its own router, ``make(layer_name)`` (AT-MoE: one router per adapted layer)."""
    for name, layer in layers.items():
        layer.router = make(name)
    return {name: layer.router for name, layer in layers.items()}


def layer_weights(layers: Mapping[str, MoLoRALinear], features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's router applied to ``features`` (N, d): the per-layer routing (N, E), e.g. to fold or plot."""
    return {name: layer.router(features) for name, layer in layers.items()}


@contextlib.contextmanager
def routing_context(layers: Iterable[MoLoRALinear] | Mapping[str, MoLoRALinear], *, weights: Weights | None = None,
                    features: torch.Tensor | None = None) -> Iterator[None]:
    """Route every layer for the enclosed forward: by ``weights`` (shared or per layer) or by ``features``."""
    if (weights is None) == (features is None):
        raise MoEParamsError("routing_context: give exactly one of weights (shared or per layer) or features")
    layers = list(layers.values() if isinstance(layers, Mapping) else layers)
    previous = [layer.routing for layer in layers]
    for layer in layers:
        layer.routing = Routing(weights, features)
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous, strict=True):
            layer.routing = prev


@contextlib.contextmanager
def _flag(layers: Iterable[MoLoRALinear] | Mapping[str, MoLoRALinear], name: str) -> Iterator[None]:
    layers = list(layers.values() if isinstance(layers, Mapping) else layers)
    for layer in layers:
        setattr(layer, name, True)
    try:
        yield
    finally:
        for layer in layers:
            setattr(layer, name, False)


def foundation_only(layers: Iterable[MoLoRALinear] | Mapping[str, MoLoRALinear]) -> contextlib.AbstractContextManager:
    """Inside: every mixture layer is its frozen base Linear (no experts, no general adapter)."""
    return _flag(layers, "bypass")


def general_only(layers: Iterable[MoLoRALinear] | Mapping[str, MoLoRALinear]) -> contextlib.AbstractContextManager:
    """Inside: every mixture layer is its base plus its general adapter alone (λ = 0; no routing needed)."""
    return _flag(layers, "general_alone")


@torch.no_grad()
def fold_molora(model: nn.Module, weights: Weights) -> nn.Module:
    """A copy of ``model`` with every mixture layer folded under a fixed routing (one task or request):
    ``weights`` (E,) for every layer, or a dict layer name -> (E,). The copy is a plain network."""
    plain = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in plain.named_modules() if isinstance(m, MoLoRALinear)]:
        plain.set_submodule(name, layer.fold(_pick(weights, layer.name)))
    return plain


def peft_factors(model: nn.Module, adapter: str = "default") -> dict[str, LoraFactors]:
    """The LoRA factors of a PEFT model's Linear layers, keyed by the layer's name in the plain model."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, LoraFactors] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            plain = name.removeprefix("base_model.model.")
            if not isinstance(module.get_base_layer(), nn.Linear):
                raise MoEParamsError(f"layer {plain!r}: only Linear LoRA experts can be mixed, got "
                                     f"{type(module.get_base_layer()).__name__}")
            out[plain] = LoraFactors(module.lora_A[adapter].weight.detach().clone(),
                                     module.lora_B[adapter].weight.detach().clone(), float(module.scaling[adapter]))
    return out
