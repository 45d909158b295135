"""Merge methods on task vectors: TIES against a hand computation and the paper's definition, DARE's statistics
and seeding, the identities between methods, every bad input, and a MiniLM-sized speed check."""

from __future__ import annotations

import re

import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties

from components.core.errors import ArtifactError, ParamsError
from components.fusion.merge import (
    MERGE_COEFFICIENTS,
    MERGE_METHODS,
    MergeMethod,
    TaskVector,
    keep_count,
    merge,
    merge_average,
    merge_task_arithmetic,
    merge_ties,
    register_merge_method,
)

# Coefficients that exercise every step of each method (trimming, dropping).
COEFFS: dict[str, dict[str, float]] = {
    "average": {}, "task_arithmetic": {}, "ties": {"k": 0.3}, "dare_linear": {"p": 0.5}, "dare_ties": {"p": 0.5},
}


def random_tvs(n_tasks: int, shapes: dict[str, tuple[int, ...]], seed: int = 0,
               dtype: torch.dtype = torch.float32) -> list[TaskVector]:
    gen = torch.Generator().manual_seed(seed)
    return [{key: torch.randn(shape, generator=gen).to(dtype) for key, shape in shapes.items()}
            for _ in range(n_tasks)]


def assert_equal(a: TaskVector, b: TaskVector) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- TIES ---

HAND = [{"a": t(3, -1), "b": t(0.5, 2)}, {"a": t(-2, -4), "b": t(0.2, 1)}, {"a": t(-2, 1), "b": t(-3, 0.1)}]


def test_ties_by_hand_trims_the_whole_task_vector() -> None:
    # k = 0.5 of 4 entries keeps 2 per task: τ1 {3, 2}, τ2 {-2, -4}, τ3 {-2, -3}. Elected signs (sums of the
    # trimmed values) a: (-1, -4) b: (-3, 2). a[0]: τ1's +3 disagrees, so the mean of τ2, τ3 is -2 (a plain
    # mean would give -1/3).
    out = merge("ties", HAND, lam=0.5, k=0.5)
    assert torch.equal(out["a"], 0.5 * t(-2, -4))
    assert torch.equal(out["b"], 0.5 * t(-3, 2))


def test_ties_by_hand_per_tensor_scope() -> None:
    # Per matrix, 1 of 2 entries is kept: a rows (3,0) (0,-4) (-2,0), signs (+,-); b rows (0,2) (0,1) (-3,0),
    # signs (-,+), and b[1] is the mean of the two agreeing tasks.
    out = merge_ties(HAND, lam=1.0, k=0.5, scope="tensor")
    assert torch.equal(out["a"], t(3, -4))
    assert torch.equal(out["b"], t(-3, 1.5))


def test_ties_keeps_entries_tied_at_the_threshold() -> None:
    out = merge("ties", [{"w": t(2, -2, 1)}], lam=1.0, k=0.34)  # keeps 1 entry, but |2| = |-2|
    assert torch.equal(out["w"], t(2, -2, 0))


def test_keep_count_rounds_and_keeps_one() -> None:
    assert keep_count(0.29, 100) == 29  # int(0.29 * 100) == 28
    assert keep_count(0.001, 10) == 1
    assert keep_count(1.0, 7) == 7


def ties_as_in_the_paper(tvs: list[TaskVector], lam: float, k: float) -> TaskVector:
    """Yadav et al., Alg. 1, entry by entry on each flattened task vector, in float64."""
    keys = list(tvs[0])
    flat = torch.stack([torch.cat([tv[key].flatten() for key in keys]) for tv in tvs]).double()
    n_tasks, n = flat.shape
    trimmed = torch.zeros_like(flat)
    for i in range(n_tasks):
        top = flat[i].abs().topk(round(k * n)).indices
        trimmed[i, top] = flat[i, top]
    merged = torch.zeros(n, dtype=torch.float64)
    for j in range(n):
        elected = torch.sign(trimmed[:, j].sum())
        agree = [float(trimmed[i, j]) for i in range(n_tasks) if torch.sign(trimmed[i, j]) == elected != 0]
        merged[j] = lam * sum(agree) / len(agree) if agree else 0.0
    out, start = {}, 0
    for key in keys:
        size = tvs[0][key].numel()
        out[key] = merged[start:start + size].view_as(tvs[0][key]).float()
        start += size
    return out


def test_ties_equals_the_papers_definition() -> None:
    tvs = random_tvs(4, {"q": (6, 10), "k": (6, 10), "v": (60,)}, seed=1)
    expected = ties_as_in_the_paper(tvs, lam=0.7, k=0.2)  # 0.2 * 180 = 36 entries kept per task
    out = merge("ties", tvs, lam=0.7, k=0.2)
    for key in tvs[0]:
        torch.testing.assert_close(out[key], expected[key])


def test_ties_per_tensor_equals_peft() -> None:
    tvs = random_tvs(3, {"q": (6, 10), "v": (20,)}, seed=2)
    out = merge_ties(tvs, lam=0.4, k=0.25, scope="tensor")
    for key in tvs[0]:
        ref = peft_ties([tv[key] for tv in tvs], torch.full((3,), 0.4), density=0.25)
        torch.testing.assert_close(out[key], ref)


# --- DARE ---

def test_dare_is_unbiased_over_seeds() -> None:
    tvs, lam, p, n_seeds = random_tvs(2, {"w": (6, 6)}, seed=3), 0.7, 0.4, 500
    mean = sum(merge("dare_linear", tvs, lam=lam, p=p, seed=s)["w"] for s in range(n_seeds)) / n_seeds
    expected = merge_task_arithmetic(tvs, lam)["w"]
    # One draw of λ Σ_t τ_t m_t / (1-p) has variance λ² Σ_t τ_t² p / (1-p); allow 5 standard errors.
    stderr = lam * (sum(tv["w"] ** 2 for tv in tvs) * p / (1 - p) / n_seeds).sqrt()
    assert ((mean - expected).abs() <= 5 * stderr + 1e-6).all()


def test_dare_drops_a_fraction_p_and_rescales_the_rest() -> None:
    tv = random_tvs(1, {"w": (384, 384)}, seed=4)
    out = merge("dare_linear", tv, lam=1.0, p=0.3, seed=7)["w"]
    kept = out != 0
    assert abs((~kept).float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(out[kept], tv[0]["w"][kept] / 0.7)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded(method: str) -> None:
    tvs = random_tvs(3, {"a": (8, 8), "b": (8,)}, seed=5)
    first = merge(method, tvs, lam=0.5, p=0.5, seed=11)
    assert_equal(first, merge(method, tvs, lam=0.5, p=0.5, seed=11))
    assert not torch.equal(first["a"], merge(method, tvs, lam=0.5, p=0.5, seed=12)["a"])
    # A stream per weight name: the key order of a re-saved adapter does not change the merge.
    reordered = [dict(reversed(tv.items())) for tv in tvs]
    again = merge(method, reordered, lam=0.5, p=0.5, seed=11)
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_dare_at_p0_is_task_arithmetic_and_ties() -> None:
    tvs = random_tvs(3, {"a": (8, 8), "b": (8,)}, seed=6)
    assert_equal(merge("dare_linear", tvs, lam=0.3, p=0.0), merge("task_arithmetic", tvs, lam=0.3))
    assert_equal(merge("dare_ties", tvs, lam=0.3, p=0.0), merge("ties", tvs, lam=0.3, k=1.0))
    assert_equal(merge("dare_ties", tvs, lam=0.3, p=0.0, k=0.2), merge("ties", tvs, lam=0.3, k=0.2))


def test_dare_ties_trims_what_it_dropped() -> None:
    # The global trim ranks the dropped vector in a first pass and redraws the same masks in the second: one
    # task keeps exactly keep_count(k, n) entries, all of them survivors of the drop, rescaled.
    tv = random_tvs(1, {"a": (30, 20), "b": (400,)}, seed=12)
    out = merge("dare_ties", tv, lam=1.0, p=0.5, k=0.1, seed=3)
    dropped = merge("dare_linear", tv, lam=1.0, p=0.5, seed=3)
    assert sum(int((v != 0).sum()) for v in out.values()) == keep_count(0.1, 1000)
    for key in out:
        kept = out[key] != 0
        torch.testing.assert_close(out[key][kept], dropped[key][kept])

def test_average_is_task_arithmetic_at_one_over_t() -> None:
    tvs = random_tvs(4, {"a": (8, 8), "b": (8,)}, seed=7)
    assert_equal(merge("average", tvs, lam=1.0), merge("task_arithmetic", tvs, lam=1 / 4))
    assert_equal(merge("average", tvs, lam=1.0), merge_average(tvs))


# --- invariants over every method ---

# Settings under which a method is the identity on one task vector (fusing one expert with weight 1).
IDENTITY = {"average": {}, "task_arithmetic": {}, "ties": {"k": 1.0}, "dare_linear": {"p": 0.0},
            "dare_ties": {"p": 0.0}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_one_expert_is_itself_and_negation_negates(method: str, dtype: torch.dtype) -> None:
    tv = random_tvs(1, {"a": (8, 8), "b": (8,)}, seed=8, dtype=dtype)[0]
    assert_equal(merge(method, [tv], lam=1.0, **IDENTITY[method]), tv)
    assert_equal(merge(method, [{k: -v for k, v in tv.items()}], lam=1.0, **IDENTITY[method]),
                 {k: -v for k, v in tv.items()})


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_merging_leaves_the_inputs_alone_and_keeps_dtype(method: str) -> None:
    tvs = random_tvs(3, {"a": (8, 8), "b": (8,)}, seed=9, dtype=torch.bfloat16)
    before = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    out = merge(method, tvs, lam=0.5, **COEFFS[method])
    for tv, old in zip(tvs, before, strict=True):
        assert_equal(tv, old)
    assert all(v.dtype == torch.bfloat16 and v.shape == tvs[0][k].shape for k, v in out.items())


def test_registry_describes_every_method() -> None:
    assert MERGE_COEFFICIENTS == {"average": (), "task_arithmetic": ("lam",), "ties": ("lam", "k"),
                                  "dare_linear": ("lam", "p"), "dare_ties": ("lam", "p", "k")}
    assert [m for m, e in MERGE_METHODS.items() if e.stochastic] == ["dare_linear", "dare_ties"]
    with pytest.raises(ValueError, match="registered twice"):
        register_merge_method(MergeMethod("ties", "x", "x", "x", merge_ties, ("lam", "k")))
    with pytest.raises(ValueError, match="lower_snake_case"):
        register_merge_method(MergeMethod("Ties-2", "x", "x", "x", merge_ties, ("lam", "k")))
    with pytest.raises(ValueError, match="coefficients must be among"):
        register_merge_method(MergeMethod("ties2", "x", "x", "x", merge_ties, ("lam", "density")))


# --- bad inputs ---

TWO = random_tvs(2, {"a": (4, 4)}, seed=10)
BAD = [
    ("median", {}, TWO, ParamsError, "unknown merge method 'median'; known: ['average', 'dare_linear'"),
    ("ties", {"k": 0.0}, TWO, ParamsError, "k=0.0 is outside (0, 1]"),
    ("ties", {"k": 1.5}, TWO, ParamsError, "k=1.5 is outside (0, 1]"),
    ("ties", {"k": float("nan")}, TWO, ParamsError, "k=nan is outside (0, 1]"),
    ("ties", {}, TWO, ParamsError, "merge method 'ties' needs k in (0, 1]"),
    ("dare_linear", {"p": 1.0}, TWO, ParamsError, "p=1.0 is outside [0, 1)"),
    ("dare_ties", {"p": -0.1}, TWO, ParamsError, "p=-0.1 is outside [0, 1)"),
    ("dare_linear", {}, TWO, ParamsError, "merge method 'dare_linear' needs p in [0, 1)"),
    ("task_arithmetic", {"lam": 0.0}, TWO, ParamsError, "lam=0.0 is outside (0, inf)"),
    ("ties", {"lam": -1.0, "k": 0.5}, TWO, ParamsError, "lam=-1.0 is outside (0, inf)"),
    ("task_arithmetic", {"lam": float("inf")}, TWO, ParamsError, "lam=inf is outside (0, inf)"),
    ("task_arithmetic", {"p": 0.5}, TWO, ParamsError, "'task_arithmetic' takes no p (its coefficients: ['lam'])"),
    ("average", {"k": 0.5}, TWO, ParamsError, "'average' takes no k (its coefficients: none)"),
    ("ties", {"k": 0.5}, [], ArtifactError, "no experts to merge (empty expert list)"),
    ("average", {}, [TWO[0], {"b": torch.zeros(4, 4)}], ArtifactError, "experts '#0' and '#1' adapt different"),
    ("average", {}, [TWO[0], {"a": torch.zeros(4, 5)}], ArtifactError, "experts '#0' and '#1' disagree on the shape"),
]


@pytest.mark.parametrize(("method", "kwargs", "tvs", "error", "message"), BAD)
def test_bad_input_is_refused_with_a_message(method: str, kwargs: dict[str, float], tvs: list[TaskVector],
                                              error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        merge(method, tvs, **{"lam": 0.5, **kwargs})


def test_bad_trim_scope_and_names_in_errors() -> None:
    with pytest.raises(ParamsError, match=re.escape("trim scope 'layer' is not one of 'task_vector', 'tensor'")):
        merge_ties(TWO, lam=1.0, k=0.5, scope="layer")  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="experts 'cxr' and 'ecg' adapt different weights"):
        merge("average", [TWO[0], {"b": torch.zeros(1)}], lam=1.0, names=["cxr", "ecg"])
