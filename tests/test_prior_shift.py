"""Single-label decisions tuned on validation (post-hoc logit adjustment): a class-balanced head on a task with
rare classes over-predicts them; the prior shift picked on validation takes that back and lifts test macro-F1."""

from __future__ import annotations

import pytest
import torch

from components.metrics.classification import compute_metrics
from components.training.prior_shift import best_prior_shift, class_priors, fold_prior_shift, macro_f1
from components.training.probe import fit_head

PRIORS = torch.tensor([0.88, 0.08, 0.04])


def long_tailed(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes at PRIORS, overlapping Gaussians in 4-d: the rare classes are hard to tell from the common one."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(PRIORS, n, replacement=True, generator=g)
    centres = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.2, 0.0, 0.0, 0.0], [0.0, 1.2, 0.0, 0.0]])
    return centres[y] + torch.randn(n, 4, generator=g), y


def test_the_shift_picked_on_validation_takes_back_what_the_balanced_loss_over_predicts() -> None:
    (x, y), (xv, yv), (xt, yt) = long_tailed(4000, 0), long_tailed(2000, 1), long_tailed(4000, 2)
    head = fit_head(x, y, "multiclass", 3, 300, 0.05, 0.0, seed=0, class_weight="balanced")
    with torch.no_grad():
        before = compute_metrics("multiclass", head(xt), yt, 3)
        assert (head(xt).argmax(1) != 0).float().mean() > 0.3  # the failure: rare classes predicted far too often
    priors = class_priors(y, 3)
    tau = best_prior_shift(head(xv), yv, priors)
    assert tau > 0  # toward the frequent class
    fold_prior_shift(head, priors, tau)
    with torch.no_grad():
        after = compute_metrics("multiclass", head(xt), yt, 3)
    assert after["macro_f1"] > before["macro_f1"] + 0.05
    assert after["accuracy"] > before["accuracy"]


def test_folding_equals_adding_the_shift_and_macro_f1_matches_the_evaluate_stage() -> None:
    head = torch.nn.Linear(4, 3)
    x, y = long_tailed(500, 3)
    priors = class_priors(y, 3)
    with torch.no_grad():
        expected = head(x) + 0.5 * priors.log()
        fold_prior_shift(head, priors, 0.5)
        assert torch.allclose(head(x), expected, atol=1e-6)
        ours = macro_f1(head(x).argmax(1), y, 3)
    assert ours == pytest.approx(compute_metrics("multiclass", head(x).detach(), y, 3)["macro_f1"], abs=1e-6)


def test_no_shift_where_it_cannot_help() -> None:
    # balanced classes: log(pi) is the same for every class, so every tau gives the same decisions: 0 is kept
    g = torch.Generator().manual_seed(4)
    y = torch.arange(600) % 3
    logits = torch.randn(600, 3, generator=g) + 2 * torch.nn.functional.one_hot(y, 3)
    assert best_prior_shift(logits, y, class_priors(y, 3)) == 0.0


def test_shapes_that_do_not_match_are_named() -> None:
    with pytest.raises(ValueError, match="class priors do not match"):
        best_prior_shift(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long), torch.full((4,), 0.25))
    assert class_priors(torch.tensor([0, 0, 1]), 3)[2] > 0  # an absent class counts as one example


def test_the_probe_carries_the_shift_when_asked() -> None:
    from components.config import ProbeParams
    from components.training.probe import fit_probe

    (x, y), (xv, yv), (xt, yt) = long_tailed(4000, 5), long_tailed(2000, 6), long_tailed(4000, 7)
    scores = {}
    for shift in (False, True):
        head, _ = fit_probe((x, y), (xv, yv), "multiclass", 3, ProbeParams(epochs=300, prior_shift=shift),
                            "macro_f1", 0)
        with torch.no_grad():
            scores[shift] = compute_metrics("multiclass", head(xt), yt, 3)["macro_f1"]
    assert scores[True] > scores[False] + 0.05
