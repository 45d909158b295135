"""Merge math on task vectors (dicts of dense weight updates ΔW), as small pure functions.

Every method works key by key, so besides its output a merge holds about one stacked (tasks, *weight) tensor
at a time, never a copy of every task vector. ``MERGE_METHODS`` is the registry of methods and the
coefficients each takes; ``merge()`` is the one entry point and validates before it touches a tensor.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

from components.config import MergeMethodName
from components.core.errors import ArtifactError, ParamsError
from components.core.registry import Registry

TaskVector = dict[str, torch.Tensor]
TrimScope = Literal["task_vector", "tensor"]
# (weight name, task index, τ_t[name]) -> the sparsified delta; the first step of a TIES-style merge.
Sparsify = Callable[[str, int, torch.Tensor], torch.Tensor]


def check_compatible(task_vectors: Sequence[TaskVector], names: Sequence[str]) -> None:
    """All task vectors must adapt the same weights with the same shapes."""
    if not task_vectors:
        raise ArtifactError("no experts to merge (empty expert list)")
    ref_keys, ref_name = set(task_vectors[0]), names[0]
    for tv, name in zip(task_vectors[1:], names[1:], strict=True):
        if set(tv) != ref_keys:
            diff = sorted(set(tv) ^ ref_keys)[:3]
            raise ArtifactError(f"experts {ref_name!r} and {name!r} adapt different weights (e.g. {diff}); "
                                "train them with the same target modules")
        for key in ref_keys:
            if tv[key].shape != task_vectors[0][key].shape:
                raise ArtifactError(f"experts {ref_name!r} and {name!r} disagree on the shape of {key!r}")


def weighted_sum(task_vectors: Sequence[TaskVector], weights: Sequence[float]) -> TaskVector:
    """Σ_t w_t τ_t, key by key (one accumulator per weight, no per-task copies)."""
    if len(weights) != len(task_vectors):
        raise ValueError(f"{len(weights)} weights for {len(task_vectors)} task vectors")
    out: TaskVector = {}
    for key in task_vectors[0]:
        acc = torch.zeros_like(task_vectors[0][key])
        for tv, w in zip(task_vectors, weights, strict=True):
            acc.add_(tv[key], alpha=float(w))
        out[key] = acc
    return out


def merge_average(task_vectors: Sequence[TaskVector]) -> TaskVector:
    """Simple weight averaging of the experts: θ0 + (1/T) Σ τ_t."""
    return weighted_sum(task_vectors, [1.0 / len(task_vectors)] * len(task_vectors))


def merge_task_arithmetic(task_vectors: Sequence[TaskVector], lam: float) -> TaskVector:
    """Task arithmetic (Ilharco et al., 2023): θ0 + λ Σ τ_t."""
    return weighted_sum(task_vectors, [lam] * len(task_vectors))


# The ranges the coefficients are defined on, as messages and grid searches should show them.
COEFFICIENT_RANGES: dict[str, str] = {"lam": "(0, inf)", "k": "(0, 1]", "p": "[0, 1)"}


def check_coefficients(lam: float | None = None, k: float | None = None, p: float | None = None) -> None:
    """Reject a coefficient outside its range before any tensor work; NaN fails every test and is rejected."""
    if lam is not None and not (lam > 0 and math.isfinite(lam)):
        raise ParamsError(f"lam={lam} is outside (0, inf): λ scales the merged update and must be positive")
    if k is not None and not 0 < k <= 1:
        raise ParamsError(f"k={k} is outside (0, 1]: it is the fraction of each task vector's entries TIES keeps")
    if p is not None and not 0 <= p < 1:
        raise ParamsError(f"p={p} is outside [0, 1): it is the probability DARE drops an entry (1 drops all)")


# --- TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean ---

def keep_count(k: float, n: int) -> int:
    """Entries the top-k fraction of n keeps: rounded half up, because int(k·n) floors 0.29·100 to 28 (PEFT's
    rule), and at least one, so a small k on a small tensor keeps its largest entry instead of nothing."""
    return min(n, max(1, math.floor(k * n + 0.5)))


def magnitude_threshold(tensors: Iterable[torch.Tensor], n: int, k: float) -> torch.Tensor:
    """|x| of the keep_count(k, n)-th largest entry over `tensors` (n entries in all), as a 0-d tensor.

    Entries tied with it are kept too (the paper's code does the same), so the trim does not depend on
    topk's arbitrary order among equal magnitudes. `tensors` may be a generator: only one is held at a time.
    """
    flat: torch.Tensor | None = None
    start = 0
    for t in tensors:
        if flat is None:
            flat = torch.empty(n, dtype=t.dtype, device=t.device)
        flat[start:start + t.numel()] = t.detach().abs().flatten()
        start += t.numel()
    if flat is None or start != n:
        raise ValueError(f"magnitude_threshold: expected {n} entries, got {start}")
    return flat.kthvalue(n - keep_count(k, n) + 1).values


def _keep_all(key: str, task: int, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _ties(task_vectors: Sequence[TaskVector], lam: float, k: float, scope: TrimScope,
          sparsify: Sparsify) -> TaskVector:
    """λ · disjoint_mean(elect(trim_k(sparsify(τ_t)))), one weight at a time."""
    if scope not in ("task_vector", "tensor"):
        raise ParamsError(f"trim scope {scope!r} is not one of 'task_vector', 'tensor'")
    trim = k < 1
    thresholds: list[torch.Tensor] = []
    if trim and scope == "task_vector":
        # The paper ranks each task vector as a whole (one threshold over all its weights), which needs one
        # pass over it before merging any key; a generator keeps one sparsified weight alive at a time.
        for t, tv in enumerate(task_vectors):
            n = sum(v.numel() for v in tv.values())
            thresholds.append(magnitude_threshold((sparsify(key, t, v) for key, v in tv.items()), n, k))
    out: TaskVector = {}
    for key, ref in task_vectors[0].items():
        stacked = torch.empty((len(task_vectors), *ref.shape), dtype=ref.dtype, device=ref.device)
        for t, tv in enumerate(task_vectors):
            stacked[t] = sparsify(key, t, tv[key])
        if trim:
            per_task = thresholds or [magnitude_threshold([row], row.numel(), k) for row in stacked]
            cut = torch.stack(per_task).to(stacked.dtype).view(-1, *[1] * ref.dim())
            stacked.masked_fill_(stacked.abs() < cut, 0)
        # PEFT's steps 2-3: the sign of Σ_t τ̂_t per entry (a zero sum, measure-zero, elects +; the paper's code
        # takes the overall majority sign), then the mean over the tasks whose non-zero entry has that sign.
        # λ > 0 is applied after: it changes no sign, and scales one tensor, not T.
        mask = calculate_majority_sign_mask(stacked, method="total")
        # .to: PEFT divides by a float32 count, which would promote a bf16/fp16 merge to float32.
        out[key] = disjoint_merge(stacked, mask).to(ref.dtype).mul_(lam)
    return out


@torch.no_grad()
def merge_ties(task_vectors: Sequence[TaskVector], lam: float, k: float, *,
               scope: TrimScope = "task_vector") -> TaskVector:
    """TIES-merging: keep each task vector's top-k fraction by |x|, elect a sign per entry by summed mass, average
    the entries that agree with it, scale by λ.

    We trim with our own rule, not PEFT's ``prune``/``ties``: the paper ranks the whole task vector
    (``scope="task_vector"``) where PEFT ranks each matrix (``scope="tensor"``, kept for comparison), and
    PEFT's keep count floors k·n (keep_count says why that matters).
    """
    check_coefficients(lam=lam, k=k)
    return _ties(task_vectors, lam, k, scope, _keep_all)


# --- DARE (Yu et al., ICML 2024): drop and rescale, then merge ---

def dare_generator(seed: int, key: str, task: int, device: torch.device) -> torch.Generator:
    """One RNG stream per (seed, weight name, task). PEFT's ``random_pruning`` draws from the global RNG, so its
    result depends on whatever ran before; a stream per key also makes a mask independent of the order and the
    set of the other keys, and lets a two-pass merge (global TIES trim) redraw the same mask."""
    digest = hashlib.sha256(f"{seed}/{task}/{key}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))


def drop_and_rescale(tensor: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each entry with probability p and scale the kept ones by 1/(1-p), so E[result] = tensor.
    At p = 0 the tensor itself is returned (no copy, no draw): callers must not modify the result in place."""
    if p == 0:
        return tensor
    keep = torch.rand(tensor.shape, generator=generator, device=tensor.device) >= p
    return (tensor * keep).div_(1 - p)


def dare_sparsifier(p: float, seed: int) -> Sparsify:
    """DARE's drop as the first step of a TIES-style merge."""
    def drop(key: str, task: int, tensor: torch.Tensor) -> torch.Tensor:
        return drop_and_rescale(tensor, p, dare_generator(seed, key, task, tensor.device))
    return drop


@torch.no_grad()
def merge_dare_linear(task_vectors: Sequence[TaskVector], lam: float, p: float, *, seed: int = 0) -> TaskVector:
    """DARE then task arithmetic: λ Σ_t DARE_p(τ_t); at p = 0 exactly merge_task_arithmetic.

    Written here rather than with PEFT's ``dare_linear``, which draws from the global RNG and stacks all tasks:
    one accumulator per weight suffices for a linear merge.
    """
    check_coefficients(lam=lam, p=p)
    drop = dare_sparsifier(p, seed)
    out: TaskVector = {}
    for key, ref in task_vectors[0].items():
        acc = torch.zeros_like(ref)
        for t, tv in enumerate(task_vectors):
            acc.add_(drop(key, t, tv[key]), alpha=float(lam))
        out[key] = acc
    return out


@torch.no_grad()
def merge_dare_ties(task_vectors: Sequence[TaskVector], lam: float, p: float, k: float = 1.0, *, seed: int = 0,
                    scope: TrimScope = "task_vector") -> TaskVector:
    """DARE then TIES-merging. k = 1 (the default) lets the random drop replace the magnitude trim, as PEFT's and
    mergekit's ``dare_ties`` do; k < 1 also trims, as the DARE paper runs TIES on DARE'd models.
    At p = 0 it equals merge_ties with the same k."""
    check_coefficients(lam=lam, k=k, p=p)
    return _ties(task_vectors, lam, k, scope, dare_sparsifier(p, seed))


# --- the registry and the one entry point ---

@dataclass(frozen=True)
class MergeMethod:
    """A registry entry: the merge function, the coefficients it takes, and what the README table shows."""

    name: str
    pretty: str
    paper: str
    what: str
    fn: Callable[..., TaskVector]
    coefficients: tuple[str, ...] = ()  # which of lam, k, p it takes: what a grid search sweeps
    defaults: dict[str, float] = field(default_factory=dict)  # optional coefficients, used when not given
    stochastic: bool = False  # takes `seed`; log it with the result (DARE moves scores by seed, mergekit#26)


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", ParamsError)


def register_merge_method(method: MergeMethod) -> MergeMethod:
    """Add a method; a bad or duplicate name, or an unknown coefficient, is an error at import."""
    unknown = (set(method.coefficients) | set(method.defaults)) - set(COEFFICIENT_RANGES)
    if unknown or not set(method.defaults) <= set(method.coefficients):
        raise ValueError(f"merge method {method.name!r}: coefficients must be among {list(COEFFICIENT_RANGES)} "
                         f"and defaults among its coefficients, got {method.coefficients} / {method.defaults}")
    return MERGE_METHODS.add(method.name, method)


register_merge_method(MergeMethod("average", "Weight averaging", "Wortsman et al., ICML 2022 (model soups)",
                                  "mean of the task vectors: task arithmetic at λ = 1/T", merge_average))
register_merge_method(MergeMethod("task_arithmetic", "Task arithmetic", "Ilharco et al., ICLR 2023",
                                  "λ times the sum of the task vectors", merge_task_arithmetic, ("lam",)))
register_merge_method(MergeMethod("ties", "TIES-merging", "Yadav et al., NeurIPS 2023",
                                  "trim to the top-k fraction, elect signs, mean of the agreeing entries, times λ",
                                  merge_ties, ("lam", "k")))
register_merge_method(MergeMethod("dare_linear", "DARE + task arithmetic", "Yu et al., ICML 2024",
                                  "drop entries with probability p, rescale by 1/(1-p), λ times the sum",
                                  merge_dare_linear, ("lam", "p"), stochastic=True))
register_merge_method(MergeMethod("dare_ties", "DARE + TIES-merging", "Yu et al., ICML 2024",
                                  "drop with probability p and rescale, then TIES (trim to k, default 1: none)",
                                  merge_dare_ties, ("lam", "p", "k"), {"k": 1.0}, stochastic=True))
MERGE_METHODS.check_names(MergeMethodName)  # params validate against the same names

# Method -> the coefficients it takes, for a grid search to know which of λ, k, p to sweep.
MERGE_COEFFICIENTS: dict[str, tuple[str, ...]] = {name: m.coefficients for name, m in MERGE_METHODS.items()}


def get_merge_method(name: str) -> MergeMethod:
    """The registry entry of `name` (the ``method:`` value in params), or an error listing the known ones."""
    return MERGE_METHODS.get(name)


def coefficient_grid(method: str, grids: dict[str, Sequence[float]]) -> list[dict[str, float]]:
    """The points a coefficient search tries for `method`: the product of the grids of the coefficients it takes
    (MERGE_COEFFICIENTS), in their registry order; a method without coefficients (average) has one point, {}."""
    names = get_merge_method(method).coefficients
    missing = [n for n in names if not grids.get(n)]
    if missing:
        raise ParamsError(f"merge method {method!r} needs a non-empty grid for {missing}")
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grids[n] for n in names))]


def merge(method: str, task_vectors: Sequence[TaskVector], *, lam: float, k: float | None = None,
          p: float | None = None, seed: int = 0, names: Sequence[str] | None = None) -> TaskVector:
    """Merge task vectors by a registered method. lam is always checked but 'average' ignores it (its λ is 1/T);
    k or p given to a method that does not take it is an error, not silently dropped. `names` label the task
    vectors in compatibility errors."""
    entry = get_merge_method(method)
    check_coefficients(lam=lam, k=k, p=p)
    coeffs: dict[str, float | int] = {"lam": lam} if "lam" in entry.coefficients else {}
    for name, value in (("k", k), ("p", p)):
        if name not in entry.coefficients:
            if value is not None:
                raise ParamsError(f"merge method {method!r} takes no {name} (its coefficients: "
                                  f"{list(entry.coefficients) or 'none'}); remove {name}={value}")
        elif value is not None or name in entry.defaults:
            coeffs[name] = entry.defaults[name] if value is None else value
        else:
            raise ParamsError(f"merge method {method!r} needs {name} in {COEFFICIENT_RANGES[name]}")
    if entry.stochastic:
        coeffs["seed"] = seed
    check_compatible(task_vectors, names or [f"#{i}" for i in range(len(task_vectors))])
    return entry.fn(task_vectors, **coeffs)
