"""Evaluation helpers: metrics vs hand computation, confusion counts, plots, latency, sizes, tables."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from components.core.errors import ArtifactError
from components.metrics.classification import PRIMARY_METRICS, compute_metrics, confusion, normalised_score, predictions
from components.metrics.counts import count_parameters, file_bytes, tensor_bytes
from components.metrics.latency import measure_latency
from components.metrics.plots import plot_confusion, plot_fusion_curve
from components.metrics.report import markdown_table, results_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def one_hot_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).float() * 10.0 - 5.0


def perfect_case(kind: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    if kind == "binary":
        y = torch.tensor([0, 1, 0, 1, 1, 0])
        return one_hot_logits(y, 2), y, 2
    if kind == "multiclass":
        y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
        return one_hot_logits(y, 4), y, 4
    y = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    return y * 10.0 - 5.0, y, 3


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_perfect_logits_score_one(kind: str) -> None:
    logits, labels, n = perfect_case(kind)
    scores = compute_metrics(kind, logits, labels, n)  # type: ignore[arg-type]
    assert set(PRIMARY_METRICS) <= set(scores)
    assert ("micro_f1" in scores) == (kind == "multilabel")
    for name, value in scores.items():
        assert value == pytest.approx(1.0), name
        assert isinstance(value, float)


def test_binary_matches_hand_computation() -> None:
    y = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    # class-1 scores; preds = score > 0 → [1, 1, 0, 1, 0, 0, 0, 0]
    score = torch.tensor([3.0, 2.0, -0.5, 1.0, -1.0, -2.0, -3.0, -4.0])
    logits = torch.stack([torch.zeros_like(score), score], dim=1)
    m = compute_metrics("binary", logits, y, 2)
    tp, fn, fp, tn = 2, 1, 1, 4
    assert m["accuracy"] == pytest.approx((tp + tn) / 8)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(mcc)  # 7/15
    f1_pos = 2 * tp / (2 * tp + fp + fn)
    f1_neg = 2 * tn / (2 * tn + fp + fn)
    assert m["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    # AUROC = fraction of (positive, negative) pairs ranked correctly: only (-0.5 vs 1.0) is wrong.
    assert m["auroc"] == pytest.approx(14 / 15)


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_constant_predictor_has_zero_mcc(kind: str) -> None:
    """A majority-class model is no better than chance: MCC 0 (torchmetrics 1.x gave 0.030 on a 37/63 binary
    split, which made a constant model look informative)."""
    n, c = 300, (2 if kind == "binary" else 3)
    if kind == "multilabel":
        labels = (torch.arange(n * c).reshape(n, c) % 5 == 0).long()
        logits = torch.full((n, c), -1.0)  # always "absent"
    else:
        labels = torch.tensor([0] * 112 + [1] * 188) if kind == "binary" else torch.arange(n) % c
        logits = one_hot_logits(torch.ones(n, dtype=torch.long), c)  # always class 1
    assert compute_metrics(kind, logits, labels, c)["mcc"] == 0.0  # type: ignore[arg-type]


def test_multiclass_mcc_matches_gorodkin() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 2])
    cm = torch.zeros(3, 3)
    for t, p in zip(y.tolist(), pred.tolist(), strict=True):
        cm[t, p] += 1
    t_k, p_k, s, c = cm.sum(1), cm.sum(0), cm.sum(), cm.trace()
    expected = (c * s - (t_k * p_k).sum()) / math.sqrt((s * s - (p_k**2).sum()) * (s * s - (t_k**2).sum()))
    assert compute_metrics("multiclass", one_hot_logits(pred, 3), y, 3)["mcc"] == pytest.approx(float(expected))


def test_multiclass_hand_accuracy() -> None:
    y = torch.tensor([0, 1, 2, 2])
    logits = one_hot_logits(torch.tensor([0, 2, 2, 2]), 3)
    m = compute_metrics("multiclass", logits, y, 3)
    assert m["accuracy"] == pytest.approx(0.75)
    # per-class F1: 1, 0, 0.8
    assert m["macro_f1"] == pytest.approx((1.0 + 0.0 + 0.8) / 3)


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_random_logits_auroc_near_half(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 20_000, 4
    if kind == "binary":
        c = 2
    logits = torch.randn(n, c, generator=g)
    if kind == "multilabel":
        labels = torch.randint(0, 2, (n, c), generator=g)
    else:
        labels = torch.randint(0, c, (n,), generator=g)
    m = compute_metrics(kind, logits, labels, c)  # type: ignore[arg-type]
    assert m["auroc"] == pytest.approx(0.5, abs=0.02)
    assert abs(m["mcc"]) < 0.05


def test_absent_class_gives_nan_auroc_without_warnings() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (30,), generator=g)  # class 2 never appears
    logits = torch.randn(30, 3, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = compute_metrics("multiclass", logits, labels, 3)
        b = compute_metrics("binary", torch.randn(5, 2), torch.zeros(5, dtype=torch.long), 2)
        ml = compute_metrics("multilabel", torch.randn(6, 2), torch.tensor([[0, 1]] * 6), 2)
    assert caught == []
    assert math.isnan(m["auroc"]) and math.isnan(b["auroc"]) and math.isnan(ml["auroc"])
    assert 0.0 <= m["accuracy"] <= 1.0 and not math.isnan(m["macro_f1"])


def test_multilabel_micro_f1_and_float_labels() -> None:
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    logits = torch.tensor([[2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, -2.0]])
    m = compute_metrics("multilabel", logits, labels, 2)
    # TP=3 (1 + 2), FP=1, FN=1 over all cells → micro F1 = 6 / 8
    assert m["micro_f1"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(6 / 8)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        compute_metrics("binary", torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        compute_metrics("multiclass", torch.randn(4, 3), torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError):
        compute_metrics("regression", torch.randn(4, 3), torch.zeros(4), 3)  # type: ignore[arg-type]


def test_normalised_score() -> None:
    assert normalised_score(0.8, 0.9) == pytest.approx(0.8 / 0.9)
    assert math.isnan(normalised_score(0.5, 0.0))
    assert math.isnan(normalised_score(0.5, -0.2))
    assert math.isnan(normalised_score(0.5, float("nan")))


def test_predictions_and_confusion() -> None:
    y = torch.tensor([0, 1, 2, 2, 1])
    logits = one_hot_logits(torch.tensor([0, 2, 2, 1, 1]), 3)
    assert predictions("multiclass", logits).tolist() == [0, 2, 2, 1, 1]
    cm = confusion("multiclass", logits, y, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]  # rows true, cols predicted
    assert confusion("binary", one_hot_logits(torch.tensor([0, 1]), 2), torch.tensor([1, 1]), 2).shape == (2, 2)
    ml_labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    ml_logits = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert predictions("multilabel", ml_logits).tolist() == [[1, 1], [0, 1], [0, 0]]
    mcm = confusion("multilabel", ml_logits, ml_labels, 2)
    assert mcm.shape == (2, 2, 2)
    assert mcm[0].tolist() == [[1, 0], [1, 1]]  # label 0: TN=1 FP=0 FN=1 TP=1
    assert mcm[1].tolist() == [[0, 1], [1, 1]]  # label 1: TN=0 FP=1 FN=1 TP=1


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_png(tmp_path: Path) -> None:
    cm = torch.tensor([[5, 1], [2, 7]])
    out = plot_confusion(cm, ["normal", "pneumonia"], "binary", tmp_path / "a" / "cm.png")
    assert _is_png(out)
    mcm = torch.randint(0, 20, (7, 2, 2))
    out = plot_confusion(mcm.numpy(), [f"label{i}" for i in range(7)], "multilabel", tmp_path / "ml.png")
    assert _is_png(out)
    curves = {"task_arithmetic": [(0.1, 0.7), (0.5, 0.9), (1.0, 0.8)], "ties": [(0.5, 0.95), (0.1, 0.6)]}
    out = plot_fusion_curve(curves, {"task_arithmetic": 0.5, "ties": 0.5}, "normalised acc", tmp_path / "f.png")
    assert _is_png(out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "cm.png", "f.png", "ml.png"]  # no temp leftovers
    with pytest.raises(ValueError):
        plot_confusion(cm, ["only-one"], "bad", tmp_path / "bad.png")


def test_latency_positive() -> None:
    x = torch.randn(64, 32)
    layer = torch.nn.Linear(32, 8)
    stats = measure_latency(lambda: layer(x), n_samples=64, repeats=5, warmup=1)
    assert stats["median_ms"] > 0 and stats["p90_ms"] >= stats["median_ms"]
    assert stats["ms_per_sample"] == pytest.approx(stats["median_ms"] / 64)
    assert stats["repeats"] == 5


def test_count_parameters_frozen_and_shared() -> None:
    emb = torch.nn.Embedding(10, 4)  # 40
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: counted once
    model = torch.nn.Sequential(emb, torch.nn.Linear(4, 4), head)  # + 16 + 4
    assert count_parameters(model) == 60
    model[1].bias.requires_grad_(False)
    emb.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 16


def test_bytes(tmp_path: Path) -> None:
    assert tensor_bytes({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}) == 48 + 10
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "x.bin").write_bytes(b"x" * 7)
    (tmp_path / "d" / "e" / "y.bin").write_bytes(b"y" * 5)
    assert file_bytes(tmp_path / "d" / "x.bin") == 7
    assert file_bytes(tmp_path / "d") == 12
    with pytest.raises(ArtifactError):
        file_bytes(tmp_path / "missing")


def test_tables() -> None:
    rows = [
        {"task": "pneumonia", "acc": 0.91234, "auroc": float("nan"), "n": 12},
        {"task": "a|b", "acc": None, "auroc": 0.5},
    ]
    columns = [("task", "Task"), ("acc", "Accuracy"), ("auroc", "AUROC"), ("n", "N")]
    md = markdown_table(rows, columns)
    assert md.splitlines() == [
        "| Task | Accuracy | AUROC | N |",
        "| --- | ---: | ---: | ---: |",
        "| pneumonia | 0.912 | — | 12 |",
        "| a\\|b | — | 0.500 | — |",
    ]
    table = results_table(rows, columns, "Results")
    assert table.title == "Results" and table.row_count == 2
    assert [c.header for c in table.columns] == ["Task", "Accuracy", "AUROC", "N"]
    assert list(table.columns[2].cells) == ["—", "0.500"]


def test_a_tasks_caveat_is_shown_beside_its_name_in_the_report() -> None:
    """DermaMNIST's JPEG copy is not the published dataset: the report says so wherever its row appears."""
    from components.config import load_params
    from components.stages.evaluate import report_rows

    tasks = load_params(Path(__file__).resolve().parents[1] / "params", None).data.tasks
    assert "not comparable" in tasks["dermamnist"].caveat and tasks["pneumoniamnist"].caveat == ""
    scores = {"probe": {"macro_f1": 0.4}, "expert": {"macro_f1": 0.5}}
    row = {"metrics": scores, "normalised": None, "params": {"stored_bytes": 2048},
           "latency_ms_per_sample": {"expert_merged": 1.0, "base": 1.0}}
    summary = {"metric": "macro_f1", "tasks": {"dermamnist": {**row, "caveat": tasks["dermamnist"].caveat},
                                               "pneumoniamnist": {**row, "caveat": ""}, "old_summary": row}}
    names = [r["task"] for r in report_rows(summary)]
    assert names == [f"dermamnist ({tasks['dermamnist'].caveat})", "pneumoniamnist", "old_summary"]
