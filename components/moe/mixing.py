"""Pure math of a mixture of LoRA experts: Σ_e w_e · s_e · B_e A_e applied to inputs, or folded into ΔW.

Every expert is applied in one batched product over stacked factors, A (E, r, in) and B (E, out, r), never in
a Python loop over experts, so E experts cost two einsums whatever E is. Weights are merged in ΔW space
(Σ_e w_e s_e B_e A_e), not by averaging A and B separately, which would add cross terms (peft#3004).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from components.moe.errors import MoEParamsError


class LoraFactors(NamedTuple):
    """One LoRA expert of a Linear layer: ΔW = scale · B A, with A (r, in) and B (out, r)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def stack_factors(experts: Sequence[LoraFactors], in_features: int, out_features: int,
                  where: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check and stack experts into A (E, r, in), B (E, out, r) and scales (E,); they must share their rank."""
    if not experts:
        raise MoEParamsError(f"{where}: no expert factors given; a mixture needs at least one expert")
    rank = None
    for e, (a, b, scale) in enumerate(experts):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features:
            raise MoEParamsError(
                f"{where}: expert {e} has A {tuple(a.shape)} and B {tuple(b.shape)}; a Linear "
                f"{in_features}->{out_features} needs A (r, {in_features}) and B ({out_features}, r)")
        if a.shape[0] != b.shape[1]:
            raise MoEParamsError(f"{where}: expert {e} has A of rank {a.shape[0]} but B of rank {b.shape[1]}")
        rank = a.shape[0] if rank is None else rank
        if a.shape[0] != rank:
            raise MoEParamsError(f"{where}: experts must share their rank to be stacked; expert 0 has rank "
                                 f"{rank}, expert {e} rank {a.shape[0]}")
        if not math.isfinite(float(scale)):
            raise MoEParamsError(f"{where}: expert {e} has a non-finite scale {scale}")
    a = torch.stack([f.a.detach() for f in experts])
    b = torch.stack([f.b.detach() for f in experts]).to(a)
    return a, b, torch.tensor([float(f.scale) for f in experts], dtype=a.dtype, device=a.device)


def check_weights(weights: torch.Tensor, batch: int, num_experts: int, where: str = "layer") -> torch.Tensor:
    """Routing weights as (N, E): one vector (E,) is shared by the whole batch; anything else is an error."""
    if weights.dim() == 1:
        weights = weights.expand(batch, -1)
    if weights.dim() != 2 or weights.shape[1] != num_experts or weights.shape[0] != batch:
        raise MoEParamsError(f"{where}: routing weights of shape {tuple(weights.shape)} do not fit a batch of "
                             f"{batch} over {num_experts} experts; expected ({batch}, {num_experts}) or "
                             f"({num_experts},)")
    return weights


def mix_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Σ_e coef[n, e] · B_e A_e x[n, s] for every expert at once.

    x (N, S, in), a (E, r, in), b (E, out, r), coef (N, E) (routing weight times scale) -> (N, S, out).
    """
    z = torch.einsum("nsi,eri->nser", x, a) * coef[:, None, :, None]
    return torch.einsum("nser,eor->nso", z, b)


def mixture_delta(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """ΔW = Σ_e coef[e] · B_e A_e for one fixed weight vector: a (E, r, in), b (E, out, r), coef (E,) -> (out, in)."""
    return torch.einsum("eor,eri->oi", b * coef[:, None, None], a)
