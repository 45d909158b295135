"""`bench/full_profile_time.py`: the samples each stage's loops run follow the params and the split sizes."""

from __future__ import annotations

import pytest

from bench.common import ROOT
from bench.full_profile_time import estimate, fusion_grid, work
from components.config import load_params
from components.fusion.merge import coefficient_grid

SIZES = {  # a text task over the quick cap, a small multilabel one, an image task; 4 client shards each
    "medical_abstracts": {"modality": "text", "kind": "multiclass", "train": 2000, "val": 300, "test": 500,
                          "shards": [500, 500, 500, 500]},
    "hoc": {"modality": "text", "kind": "multilabel", "train": 600, "val": 100, "test": 200,
            "shards": [150, 150, 150, 150]},
    "pneumoniamnist": {"modality": "image", "kind": "multiclass", "train": 1000, "val": 100, "test": 100,
                       "shards": [400, 300, 200, 100]},
}


def _loop(loops: dict, stage: str, what: str) -> float:
    (n,) = [n for w, n, _ in loops[stage] if w.startswith(what)]
    return n


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_counts_follow_the_params(profile: str) -> None:
    p = load_params(ROOT / "params", profile)
    loops = work(profile, SIZES)
    cap = p.experts.trainer.text.max_train_samples or 2000
    assert _loop(loops, "experts", "medical_abstracts: LoRA steps") == min(2000, cap) * p.experts.trainer.text.max_epochs
    assert _loop(loops, "experts", "pneumoniamnist: LoRA steps") == 1000 * p.experts.trainer.image.max_epochs
    assert _loop(loops, "foundation", "pre-training") == 1000 * p.foundation.image.trainer.max_epochs
    grid = fusion_grid(p.fusion)
    val = sum(min(v, p.fusion.max_val_samples or v) for v in (300, 100))
    assert _loop(loops, "fusion", f"{grid} merged models") == grid * val
    clients = p.federated.client.max_train_samples
    assert _loop(loops, "federated", "image clients") == p.federated.rounds * sum(min(k, clients) for k in
                                                                                   (400, 300, 200, 100))


def test_grid_is_the_fusion_stages_own() -> None:
    p = load_params(ROOT / "params", "full").fusion
    grids = {"lam": p.lambdas, "k": p.ks, "p": p.ps}
    assert fusion_grid(p) == sum(len(coefficient_grid(m, grids)) for m in p.methods) == 79


def test_estimate_is_samples_times_cost() -> None:
    stages = estimate({"experts": [("a", 10, "x"), ("b", 4, "y")]}, {"x": 0.5, "y": 2.0})
    assert stages["experts"]["seconds"] == pytest.approx(13.0)
    assert [r["seconds"] for r in stages["experts"]["loops"]] == [5.0, 8.0]
