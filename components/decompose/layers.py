"""Low-rank task experts inside a layer (LoRKD): g_t(h) = (W0 + s·B_t A_t) h, one expert per task.

Knowledge separation happens in one forward pass over a mixed-task batch: every task's A-projection is
computed at once (one matmul, or one conv, to T·r channels), each sample's channels of the other tasks are
zeroed (a 0/1 mask per sample), and one dense product with every task's B stacked (out, T·r) maps back. The
mask is exact in both directions: a sample's output gets only its own task's B_t A_t, the masked channels'
gradients are exact zeros, so an expert's gradient comes only from its own task's samples, while the shared
W0 sees every sample.

Why a mask and not a per-sample gather of B (the first version): the gather materialised B per sample and
ran a batched product of N thin matrices; with the mask, and with a linear layer folding one of its two
low-rank products into its base GEMM (see ``ExpertLinear.forward``, so the expert path adds no full pass over
the layer's wider side), a text student's one-pass step adds 767 MB instead of 969 MB at 1.08x a plain step
instead of 1.19x (bench/results/decompose_step_full.json against decompose_step_full_gather.json). PEFT's
mixed-adapter batches (``adapter_names``) loop over the sub-batches and refuse a model in training mode, so this
is written here.

The current task is set from outside (``task_context``), because a layer deep inside a Hugging Face
``BertLayer`` cannot be handed extra forward arguments. A scalar task (task switching at deployment)
takes a fast path that touches only that task's factors.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from components.core.errors import ParamsError

TaskSel = int | torch.Tensor  # one task index for the whole batch, or a LongTensor (N,) of task ids


def linear_delta(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s·B A for a linear layer: B (out, r), A (r, in) -> (out, in)."""
    return scale * (b @ a)


def conv_delta(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW for a conv: A is a kxk conv to r channels, B a 1x1 conv back, so they fold into one kxk kernel.

    ``ΔW[o, i, :, :] = s · Σ_j B[o, j] · A[j, i, :, :]``; B (out, r), A (r, in, kh, kw) -> (out, in, kh, kw).
    """
    return scale * torch.einsum("oj,jikl->oikl", b, a)


def task_channel_mask(task_ids: torch.Tensor, num_tasks: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, T·r) 0/1: sample n keeps the r channels (task-major, as ``expert_a`` stacks them) of its own task."""
    return F.one_hot(task_ids, num_tasks).to(dtype).repeat_interleave(rank, dim=1)


class ExpertLayer(nn.Module):
    """T rank-r experts next to a shared base layer; ``task`` is set by ``task_context`` before a forward.

    ``expert_a`` stacks every task's A (T·r rows, task-major) so one op projects onto all of them;
    ``expert_b`` is (T, out, r), zero-initialised so every task starts from the shared W0.
    """

    def __init__(self, base: nn.Module, num_tasks: int, rank: int, alpha: float | None,
                 a_shape: tuple[int, ...], out_features: int, generator: torch.Generator | None) -> None:
        super().__init__()
        self.base = base
        self.num_tasks, self.rank = num_tasks, rank
        self.scale = 1.0 if alpha is None else alpha / rank
        fan_in = math.prod(a_shape)
        # Kaiming-uniform with a=sqrt(5) (nn.Linear's default, as in LoRA): bound 1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(fan_in)
        a = (torch.rand((num_tasks * rank, *a_shape), generator=generator) * 2 - 1) * bound
        self.expert_a = nn.Parameter(a.to(base.weight.dtype))
        self.expert_b = nn.Parameter(torch.zeros(num_tasks, out_features, rank, dtype=base.weight.dtype))
        self.task: TaskSel | None = None

    def stacked_b(self) -> torch.Tensor:
        """Every task's B side by side, (out, T·r), in ``expert_a``'s task-major channel order."""
        return self.expert_b.permute(1, 0, 2).reshape(self.expert_b.shape[1], self.num_tasks * self.rank)

    def mask(self, task_ids: torch.Tensor) -> torch.Tensor:
        return task_channel_mask(task_ids, self.num_tasks, self.rank, self.expert_a.dtype)

    def factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_t, A_t) of one task: (out, r) and (r, in[, kh, kw])."""
        return self.expert_b[task], self.expert_a[task * self.rank:(task + 1) * self.rank]

    def _current(self) -> TaskSel:
        if self.task is None:
            raise RuntimeError(f"{type(self).__name__}: no task selected; run it inside task_context(...) "
                               "or through the student's forward(task, ...)")
        return self.task

    def delta_weight(self, task: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def fold(self, task: int) -> nn.Module:
        """A plain copy of the base layer with task ``task``'s expert folded in: W = W0 + s·B_t A_t."""
        plain = copy.deepcopy(self.base)
        plain.weight.add_(self.delta_weight(task).to(plain.weight.dtype))
        return plain


class ExpertLinear(ExpertLayer):
    """Linear layer with per-task low-rank experts; inputs are (N, ..., in), batch first."""

    def __init__(self, base: nn.Linear, num_tasks: int, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None, name: str = "linear") -> None:
        limit = min(base.in_features, base.out_features)
        if rank > limit:
            raise ParamsError(
                f"layer {name!r} (Linear {base.in_features}->{base.out_features}): rank {rank} exceeds "
                f"min(in_features, out_features) = min({base.in_features}, {base.out_features}) = {limit}"
            )
        super().__init__(base, num_tasks, rank, alpha, (base.in_features,), base.out_features, generator)

    def delta_weight(self, task: int) -> torch.Tensor:
        return linear_delta(*self.factors(task), self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self._current()
        if isinstance(task, int):
            b, a = self.factors(task)
            return self.base(x) + self.scale * F.linear(F.linear(x, a), b)
        base, width = self.base, self.num_tasks * self.rank
        mask = self.mask(task).view(x.shape[0], *([1] * (x.dim() - 2)), width)
        if base.out_features > base.in_features:
            # Widening layer: B joins the base GEMM along its input, [x | own] @ [W0 | s·B]^T, so the wide
            # output is written (and its gradient read) once.
            own = F.linear(x, self.expert_a) * mask
            weight = torch.cat([base.weight, self.scale * self.stacked_b()], dim=1)
            return F.linear(torch.cat([x, own], dim=-1), weight, base.bias)
        # Otherwise A joins it along its output, x @ [W0; A]^T, so the (wider) input is read once; B is added
        # into the output by addmm.
        bias = None if base.bias is None else torch.cat([base.bias, base.bias.new_zeros(width)])
        out, own = F.linear(x, torch.cat([base.weight, self.expert_a]), bias).split(
            [base.out_features, width], dim=-1)
        flat = torch.addmm(out.reshape(-1, base.out_features), (own * mask).reshape(-1, width),
                           self.stacked_b().t(), alpha=self.scale)
        return flat.reshape(out.shape)


class ExpertConv2d(ExpertLayer):
    """Conv2d with per-task experts: A_t a kxk conv (the base's stride/padding/dilation) to r channels,
    B_t a 1x1 conv back."""

    def __init__(self, base: nn.Conv2d, num_tasks: int, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None, name: str = "conv") -> None:
        c_out, c_in, kh, kw = base.weight.shape
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ParamsError(f"layer {name!r}: experts need groups=1 and zero padding; "
                              f"got groups={base.groups}, padding_mode={base.padding_mode!r}")
        limit = min(c_in * kh * kw, c_out)
        if rank > limit:
            raise ParamsError(
                f"layer {name!r} (Conv2d {c_in}->{c_out}, kernel {kh}x{kw}): rank {rank} exceeds "
                f"min(in_channels*kh*kw, out_channels) = min({c_in * kh * kw}, {c_out}) = {limit}"
            )
        super().__init__(base, num_tasks, rank, alpha, (c_in, kh, kw), c_out, generator)

    def delta_weight(self, task: int) -> torch.Tensor:
        return conv_delta(*self.factors(task), self.scale)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base
        return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        task = self._current()
        if isinstance(task, int):
            b, a = self.factors(task)
            return out + self.scale * F.conv2d(self._conv(x, a), b[:, :, None, None])
        own = self._conv(x, self.expert_a) * self.mask(task)[:, :, None, None]  # every task's A, own kept
        return out + self.scale * F.conv2d(own, self.stacked_b()[:, :, None, None])


def attach_experts(module: nn.Module, num_tasks: int, rank: int, alpha: float | None,
                   seed: int) -> list[ExpertLayer]:
    """Replace every nn.Linear / nn.Conv2d under ``module`` by its expert layer, in place.

    A_t is drawn from a generator seeded with ``seed`` in module order, so equal seeds give equal experts.
    """
    gen = torch.Generator().manual_seed(seed)
    targets = [(n, m) for n, m in module.named_modules() if n and type(m) in (nn.Linear, nn.Conv2d)]
    layers: list[ExpertLayer] = []
    for name, plain in targets:
        cls = ExpertLinear if isinstance(plain, nn.Linear) else ExpertConv2d
        layer = cls(plain, num_tasks, rank, alpha, generator=gen, name=name)
        module.set_submodule(name, layer)
        layers.append(layer)
    return layers


def expert_layers(module: nn.Module) -> list[ExpertLayer]:
    return [m for m in module.modules() if isinstance(m, ExpertLayer)]


@contextlib.contextmanager
def task_context(layers: Iterable[ExpertLayer], task: TaskSel) -> Iterator[None]:
    """Select ``task`` (an index, or one id per sample) on every expert layer for the enclosed forward."""
    layers = list(layers)
    previous = [layer.task for layer in layers]
    for layer in layers:
        layer.task = task
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous, strict=True):
            layer.task = prev


@torch.no_grad()
def fold_experts(module: nn.Module, task: int) -> nn.Module:
    """A copy of ``module`` where every expert layer is replaced by its plain layer with task ``task`` folded in."""
    plain = copy.deepcopy(module)
    for name, layer in [(n, m) for n, m in plain.named_modules() if isinstance(m, ExpertLayer)]:
        plain.set_submodule(name, layer.fold(task))
    return plain
