"""bench/baselines: the simple baselines score the data stage's own splits and make every choice on validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bench import baselines
from components.config import load_params
from components.data.datasets import load_split
from components.stages.data import prepare_data

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("baselines")
    p = load_params(PROJECT / "params", "tiny", {"data.active": ["breastmnist", "medical_abstracts"]})
    prepare_data(p.data, PROJECT, root / "data", p.pipeline.seed)
    return root / "data"


def _peeked(split):  # noqa: ANN001, ANN202
    """The split with its labels permuted: a baseline whose choices read test labels would choose differently."""
    return dataclasses.replace(split, labels=np.random.default_rng(0).permutation(split.labels))


def _cnn(train, val, test):  # noqa: ANN001, ANN202
    return baselines.small_cnn(train, val, test, seeds=1, epochs=2)


@pytest.mark.parametrize(("task", "fit"), [("medical_abstracts", baselines.text_lr),
                                           ("breastmnist", baselines.pixel_lr), ("breastmnist", _cnn)])
def test_every_choice_is_made_on_validation_only(data_dir: Path, task: str, fit) -> None:  # noqa: ANN001
    train, val, test = (load_split(data_dir, task, s) for s in ("train", "val", "test"))
    train = train.subset(400, 0)  # what is checked holds on any size: 400 rows keep the text fits short
    real, peeked = fit(train, val, test), fit(train, val, _peeked(test))
    assert real["choice"] == peeked["choice"] and real["val_macro_f1"] == peeked["val_macro_f1"]
    assert real["test"] != peeked["test"]  # test labels are read, to score only
    assert set(real["test"]) == set(baselines.METRICS)


def test_run_task_scores_the_data_stage_splits(data_dir: Path) -> None:
    train, test = load_split(data_dir, "medical_abstracts", "train"), load_split(data_dir, "medical_abstracts", "test")
    out = baselines.run_task(data_dir, "medical_abstracts", cap=100, seed=42, cnn_seeds=1, cnn_epochs=1)
    assert out["test_samples"] == len(test) and out["kind"] == "multiclass"
    # the experts' capped rows (the same seeded subset the experts stage trains on) and, beside them, all the rows
    assert out["expert_rows"]["train_samples"] == len(train.subset(100, 42)) == 100
    assert out["all_rows"]["train_samples"] == len(train)
    counts = np.bincount(np.asarray(train.subset(100, 42).labels), minlength=train.num_labels)
    majority = np.full(len(test), counts.argmax())
    from sklearn.metrics import f1_score

    assert out["expert_rows"]["majority"]["test"]["macro_f1"] == pytest.approx(
        f1_score(np.asarray(test.labels), majority, average="macro", labels=range(train.num_labels)), abs=1e-6)
    assert out["expert_rows"]["strongest"] == "tfidf_lr"  # the only candidate picked on validation for text


def test_multilabel_scores_carry_micro_f1() -> None:
    """HoC's baselines report what the evaluate stage reports for a multilabel task, micro-F1 included."""
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    proba = np.array([[0.9, 0.2, 0.8], [0.1, 0.7, 0.4], [0.6, 0.3, 0.2], [0.2, 0.1, 0.9]])
    scores = baselines._scores("multilabel", baselines._logits_from_proba("multilabel", proba), labels, 3)
    assert set(scores) == {*baselines.METRICS, "micro_f1"}
    # 5 of 6 positives found, no false positive: micro-F1 = 2 * 5 / (2 * 5 + 1)
    assert scores["micro_f1"] == pytest.approx(10 / 11, abs=1e-6)
    assert set(baselines._scores("multiclass", np.log(proba), np.array([0, 1, 0, 2]), 3)) == set(baselines.METRICS)
