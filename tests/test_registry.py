"""Promotion gate: pure decision table, then against a real (temporary) MLflow registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from components.core.errors import RegistryError
from components.bundle.format import TaskHead, save_bundle
from components.nn.classifier import make_head
from components.nn.encoders import ImageEncoder
from components.nn.foundation import Foundation
from components.tracking.registry import CHALLENGER, CHAMPION, aliases, decide, gate, promote_manual, register_bundle


@pytest.mark.parametrize(
    ("metric", "champion", "promoted"),
    [(0.6, None, True), (0.4, None, False), (0.71, 0.70, True), (0.704, 0.70, False), (0.65, 0.70, False)],
)
def test_decide(metric: float, champion: float | None, promoted: bool) -> None:
    ok, reason = decide(metric, champion, margin=0.005, floor=0.5)
    assert ok is promoted
    assert f"{metric:.4f}" in reason


def test_champion_without_metric_does_not_block() -> None:
    ok, _ = decide(0.6, float("nan"), margin=0.005, floor=0.5)
    assert ok


def bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    enc = ImageEncoder([4]).eval()
    found = Foundation("image", enc, "a" * 64, {"config": enc.config})
    save_bundle(tmp_path / "b", found, {}, {"t": TaskHead(make_head(4, 2), "binary", ["no", "yes"])}, "t", {})
    return tmp_path / "b"


def test_gate_moves_aliases_and_records(tmp_path: Path, mlflow_store: str) -> None:
    folder = bundle(tmp_path)
    with mlflow.start_run():
        v1 = register_bundle("m", folder, 0.70, {"git.commit": "x"})
        d1 = gate("m", v1, 0.70, margin=0.01, floor=0.5)
        v2 = register_bundle("m", folder, 0.705, {})
        d2 = gate("m", v2, 0.705, margin=0.01, floor=0.5)
        v3 = register_bundle("m", folder, 0.80, {})
        d3 = gate("m", v3, 0.80, margin=0.01, floor=0.5)
    assert (d1.promoted, d2.promoted, d3.promoted) == (True, False, True)
    assert d2.champion_version == v1 and d2.champion_metric == pytest.approx(0.70)
    assert aliases("m") == {CHAMPION: v3, CHALLENGER: v3}
    client = mlflow.MlflowClient()
    assert client.get_model_version("m", v2).tags["promotion.decision"] == "challenger"
    history = [k for k in client.get_registered_model("m").tags if k.startswith("promotion.")]
    assert len(history) == 3  # every alias move is kept
    d = promote_manual("m", v2)
    assert d.champion_version == v3 and aliases("m")[CHAMPION] == v2
    loaded = mlflow.pyfunc.load_model("models:/m@champion")
    import numpy as np

    frame = loaded.predict(np.zeros((3, 28, 28), dtype=np.uint8))
    assert list(frame["label"].unique())[0] in ("no", "yes") and len(frame) == 3


def test_unknown_model_or_version(mlflow_store: str) -> None:
    with pytest.raises(RegistryError, match=r"model 'nope' version 1 does not exist"):
        promote_manual("nope", "1")
    with pytest.raises(RegistryError, match=r"registered model 'nope' does not exist"):
        aliases("nope")
