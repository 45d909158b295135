"""AT-MoE's layer-wise routers (Li & Yao, arXiv 2410.10896) and the baselines they are compared with.

Grouped router, one per adapted layer: experts are split into groups; the group weights are
w_G = softmax(x W_G / τ) over the groups, each group has a softmax over its own experts (logits x W_in, or static
learned logits as an ablation), and an expert's weight is its group's weight times its within-group weight, so
each row sums to 1 and a group's weight is the sum of its experts'. Groups of unequal size are laid out as
(G, S) slots, S the largest group, with a mask: padding slots get -inf logits, hence exactly 0 weight, and the
whole router stays one batched op. Baselines: a flat softmax over all experts, and the uniform mixture.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import NamedTuple

import torch
from torch import nn

from components.config import RouterName  # the params validate `router:` against the same names
from components.core.registry import Registry
from components.moe.errors import MoEParamsError



class GroupLayout(NamedTuple):
    """Groups as slots: ``index`` (G, S) expert per slot (0 in padding), ``mask`` (G, S) True where a slot holds
    an expert, ``position`` (E,) each expert's flat slot g·S + j (gathers (N, G·S) back into expert order)."""

    index: torch.Tensor
    mask: torch.Tensor
    position: torch.Tensor


class GroupedWeights(NamedTuple):
    """A grouped routing: ``experts`` (N, E) in expert order, ``groups`` (N, G), ``within`` (N, G, S) slots."""

    experts: torch.Tensor
    groups: torch.Tensor
    within: torch.Tensor


def check_tau(tau: float, what: str = "tau") -> float:
    """A softmax temperature must be a finite number > 0."""
    if not (math.isfinite(tau) and tau > 0):
        raise MoEParamsError(f"{what} must be a finite number > 0, got {tau}")
    return float(tau)


def group_layout(groups: Sequence[Sequence[int]], num_experts: int | None = None) -> GroupLayout:
    """Check a group spec (every expert 0..E-1 in exactly one non-empty group) and lay it out as slots.

    ``num_experts`` defaults to the number of experts named.
    """
    if not groups:
        raise MoEParamsError("groups: no groups given; give a list of groups, each a list of expert indices")
    total = sum(len(g) for g in groups)
    num_experts = total if num_experts is None else num_experts
    seen: dict[int, int] = {}
    for g, group in enumerate(groups):
        if not group:
            raise MoEParamsError(f"groups[{g}] is empty; every group needs at least one expert")
        for e in group:
            if isinstance(e, bool) or not isinstance(e, Integral) or not 0 <= e < num_experts:
                raise MoEParamsError(f"groups[{g}] names expert {e!r}, but experts are 0..{num_experts - 1}")
            if int(e) in seen:
                raise MoEParamsError(f"expert {e} appears twice (groups[{seen[int(e)]}] and groups[{g}]); "
                                     "every expert belongs to exactly one group")
            seen[int(e)] = g
    missing = sorted(set(range(num_experts)) - set(seen))
    if missing:
        raise MoEParamsError(f"experts {missing} are in no group; every expert belongs to exactly one group")
    size = max(len(g) for g in groups)
    index = torch.zeros(len(groups), size, dtype=torch.long)
    mask = torch.zeros(len(groups), size, dtype=torch.bool)
    position = torch.empty(num_experts, dtype=torch.long)
    for g, group in enumerate(groups):
        index[g, :len(group)] = torch.tensor([int(e) for e in group])
        mask[g, :len(group)] = True
        position[[int(e) for e in group]] = g * size + torch.arange(len(group))
    return GroupLayout(index, mask, position)


def flat_weights(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """softmax(logits / τ) over the last axis."""
    return torch.softmax(logits / check_tau(tau), dim=-1)


def grouped_weights(group_logits: torch.Tensor, within_logits: torch.Tensor, layout: GroupLayout,
                    tau: float = 1.0) -> GroupedWeights:
    """Expert weights = softmax over groups (τ) × softmax inside each group.

    group_logits (N, G); within_logits (N, E) per sample or (E,) static, in expert order.
    """
    groups = flat_weights(group_logits, tau)  # (N, G)
    slots = within_logits[..., layout.index].masked_fill(~layout.mask, float("-inf"))  # (N|·, G, S)
    within = torch.softmax(slots, dim=-1).expand(groups.shape[0], -1, -1)  # padding: exp(-inf) = exactly 0
    product = (groups.unsqueeze(-1) * within).flatten(1)  # (N, G·S)
    return GroupedWeights(product[:, layout.position], groups, within)


class GroupedRouter(nn.Module):
    """AT-MoE's router of one layer: pooled input x (N, dim) -> expert weights (N, E), grouped.

    ``static_within``: the ablation with learned, input-independent within-group logits. The last routing is kept
    in ``last`` (detached) for inspection.
    """

    def __init__(self, dim: int, groups: Sequence[Sequence[int]], tau: float = 1.0, static_within: bool = False,
                 num_experts: int | None = None) -> None:
        super().__init__()
        self.tau = check_tau(tau, "grouped router: tau")
        layout = group_layout(groups, num_experts)
        self.num_experts, self.num_groups = len(layout.position), len(layout.index)
        for name, tensor in layout._asdict().items():
            self.register_buffer(f"layout_{name}", tensor, persistent=False)  # derived from the spec, not learned
        self.group_proj = nn.Linear(dim, self.num_groups, bias=False)  # W_G
        self.static_within = static_within
        if static_within:
            self.within_logits = nn.Parameter(torch.zeros(self.num_experts))
        else:
            self.within_proj = nn.Linear(dim, self.num_experts, bias=False)  # W_in, one column per expert
        self.last: GroupedWeights | None = None

    @property
    def layout(self) -> GroupLayout:
        return GroupLayout(self.layout_index, self.layout_mask, self.layout_position)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        within = self.within_logits if self.static_within else self.within_proj(x)
        out = grouped_weights(self.group_proj(x), within, self.layout, self.tau)
        self.last = GroupedWeights(*(t.detach() for t in out))
        return out.experts


class FlatRouter(nn.Module):
    """The ungrouped baseline: softmax(x W / τ) over all experts."""

    def __init__(self, dim: int, num_experts: int, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = check_tau(tau, "flat router: tau")
        self.num_experts = num_experts
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flat_weights(self.proj(x), self.tau)


class UniformRouter(nn.Module):
    """The uniform mixture: every expert weighs 1/E, whatever the input."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        if num_experts < 1:
            raise MoEParamsError(f"uniform router: num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_full((x.shape[0], self.num_experts), 1.0 / self.num_experts)


# --- the registry: the ``router:`` value in params, its pretty name and paper ---

@dataclass(frozen=True)
class RouterKind:
    name: str
    pretty: str
    paper: str
    what: str
    build: Callable[..., nn.Module]  # (dim, num_experts, groups, tau, static_within) -> router


def _no_groups(name: str, groups: object, static_within: bool) -> None:
    if groups is not None or static_within:
        raise MoEParamsError(f"router {name!r} takes no groups and no static_within; use router 'grouped'")


def _grouped(dim: int, num_experts: int, groups: Sequence[Sequence[int]] | None, tau: float,
             static_within: bool) -> nn.Module:
    if groups is None:
        raise MoEParamsError("router 'grouped' needs groups: a list of groups, each a list of expert indices")
    return GroupedRouter(dim, groups, tau, static_within, num_experts)


def _flat(dim: int, num_experts: int, groups: object, tau: float, static_within: bool) -> nn.Module:
    _no_groups("flat", groups, static_within)
    return FlatRouter(dim, num_experts, tau)


def _uniform(dim: int, num_experts: int, groups: object, tau: float, static_within: bool) -> nn.Module:
    _no_groups("uniform", groups, static_within)
    return UniformRouter(num_experts)


ROUTERS: Registry[RouterKind] = Registry("router", MoEParamsError)
for _kind in (
    RouterKind("grouped", "AT-MoE grouped router", "Li & Yao, arXiv 2410.10896",
               "softmax over expert groups × softmax inside each group, per layer", _grouped),
    RouterKind("flat", "Flat softmax router", "Shazeer et al., ICLR 2017 (dense gating)",
               "one softmax over all experts, per layer", _flat),
    RouterKind("uniform", "Uniform mixture", "-", "every expert weighs 1/E", _uniform),
):
    ROUTERS.add(_kind.name, _kind)
ROUTERS.check_names(RouterName)


def make_router(name: RouterName, dim: int, num_experts: int, *, groups: Sequence[Sequence[int]] | None = None,
                tau: float = 1.0, static_within: bool = False) -> nn.Module:
    """A fresh router of kind ``name`` for one layer; an unknown name lists the known ones."""
    return ROUTERS.get(name).build(dim, num_experts, groups, tau, static_within)
