"""Low-rank task experts inside a layer (LoRKD): g_t(h) = (W0 + s·B_t A_t) h, one expert per task.

Knowledge separation happens in one forward pass over a mixed-task batch. The student sorts the batch by task
once (``TaskRuns.sort``), so each task's samples are one contiguous run; every layer then folds each present
task's expert into its weight, W_t = W0 + s·B_t A_t, and runs the base op on that task's run with W_t. Exact
in both directions: a sample's output gets only its own task's B_t A_t, an expert's gradient comes only from
its own run (an absent task's expert gets none), and the shared W0 gets every run's gradient.

Why folded weights per run (the third version): a kxk conv to T·r channels for every task's A, masked per
sample and mapped back by one stacked 1x1 conv, cost 1.53x a plain image student step, because that extra
conv has T·r = 16 output channels next to base convs of 32-128; a per-sample gather of B (the first
version) was no better. Folding costs a (out, r) x (r, in·k·k) product per task and layer, and each run's op is
the plain layer's op (bench/results/decompose_step_full.json). PEFT's mixed-adapter batches (``adapter_names``)
loop over the sub-batches the same way but refuse a model in training mode, so this is written here.

The current task is set from outside (``task_context``), because a layer deep inside a Hugging Face
``BertLayer`` cannot be handed extra forward arguments. A scalar task (task switching at deployment) is one
run over the whole batch.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from components.core.errors import ParamsError


@dataclass(frozen=True)
class TaskRuns:
    """A mixed-task batch sorted by task: ``counts[t]`` consecutive samples of task t, tasks in id order."""

    counts: tuple[int, ...]

    @staticmethod
    def sort(task_ids: torch.Tensor, num_tasks: int) -> tuple[TaskRuns, torch.Tensor]:
        """The runs of ``task_ids`` (N,) and the stable order that sorts a batch into them (``x[order]``)."""
        counts = torch.bincount(task_ids, minlength=num_tasks).tolist()
        return TaskRuns(tuple(counts)), torch.argsort(task_ids, stable=True)


TaskSel = int | TaskRuns  # one task index for the whole batch, or a batch sorted into one run per task


def linear_delta(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s·B A for a linear layer: B (out, r), A (r, in) -> (out, in)."""
    return scale * (b @ a)


def conv_delta(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW for a conv: A is a kxk conv to r channels, B a 1x1 conv back, so they fold into one kxk kernel.

    ``ΔW[o, i, :, :] = s · Σ_j B[o, j] · A[j, i, :, :]``; B (out, r), A (r, in, kh, kw) -> (out, in, kh, kw).
    """
    return scale * torch.einsum("oj,jikl->oikl", b, a)


class ExpertLayer(nn.Module):
    """T rank-r experts next to a shared base layer; ``task`` is set by ``task_context`` before a forward.

    ``expert_a`` stacks every task's A (T·r rows, task-major); ``expert_b`` is (T, out, r), zero-initialised
    so every task starts from the shared W0.
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

    def factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_t, A_t) of one task: (out, r) and (r, in[, kh, kw])."""
        return self.expert_b[task], self.expert_a[task * self.rank:(task + 1) * self.rank]

    def delta_weight(self, task: int) -> torch.Tensor:
        raise NotImplementedError

    def task_weight(self, task: int) -> torch.Tensor:
        """The base weight with task ``task``'s expert folded in: W0 + s·B_t A_t."""
        return self.base.weight + self.delta_weight(task)

    def base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's op with ``weight`` in place of its own (bias and geometry its own)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task is None:
            raise RuntimeError(f"{type(self).__name__}: no task selected; run it inside task_context(...) "
                               "or through the student's forward(task, ...)")
        if isinstance(self.task, int):
            runs = [(self.task, x)]  # one task: one run over the whole batch
        else:
            counts = self.task.counts
            if len(counts) != self.num_tasks or sum(counts) != x.shape[0]:
                raise ValueError(f"{type(self).__name__}: task runs {list(counts)} do not fit a batch of "
                                 f"{x.shape[0]} samples over {self.num_tasks} tasks")
            runs = [(t, part) for t, part in enumerate(x.split(list(counts))) if len(part)]
            if not runs:  # an empty batch
                return self.base_op(x, self.base.weight)
        # Under a GPU's bf16 autocast the folded weight is rounded to bf16 as a whole (the separate low-rank path
        # rounded the expert's output instead); not measured, no GPU has been lent.
        outs = [self.base_op(part, self.task_weight(t)) for t, part in runs]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @torch.no_grad()
    def fold(self, task: int) -> nn.Module:
        """A plain copy of the base layer with task ``task``'s expert folded in: W = W0 + s·B_t A_t."""
        plain = copy.deepcopy(self.base)
        plain.weight.copy_(self.task_weight(task))
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

    def base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base.bias)


class ExpertConv2d(ExpertLayer):
    """Conv2d with per-task experts: A_t a kxk conv (the base's stride/padding/dilation) to r channels,
    B_t a 1x1 conv back; folded, one kxk kernel per task."""

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

    def base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)


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
    """Select ``task`` (an index, or the runs of a task-sorted batch) on every expert layer for the forward."""
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
