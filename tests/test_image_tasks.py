"""The colour image tasks (RetinaMNIST shipped; DermaMNIST's JPEG copy when the shared folder has it) run through
the data, foundation and experts stages beside the grayscale ones, and the expert refuses grayscale input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.config import expand_env, load_params
from components.core.errors import DataError
from components.stages.data import prepare_data
from components.stages.experts import ExpertsInputs, train_expert
from components.stages.foundation import FoundationInputs, pretrain_image_foundation

PROJECT = Path(__file__).resolve().parents[1]


def test_retina_and_derma_with_the_grayscale_tasks(tmp_path: Path) -> None:
    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.core.layout import expert_bundle, foundation_dir
    from components.data.datasets import load_split
    from components.tracking.pyfunc import predict_frame

    base = load_params(PROJECT / "params", "tiny")
    derma = Path(expand_env(base.data.tasks["dermamnist"].path))
    derma = derma if derma.is_absolute() else PROJECT / derma
    active = ["breastmnist", "retinamnist"] + (["dermamnist"] if derma.is_file() else [])
    p = load_params(PROJECT / "params", "tiny", {"data.active": active})
    manifest = prepare_data(p.data, PROJECT, tmp_path / "data", p.pipeline.seed)
    retina = manifest["tasks"]["retinamnist"]["splits"]
    assert (retina["train"]["n"], retina["val"]["n"], retina["test"]["n"]) == (1080, 120, 400)
    assert retina["test"]["class_counts"] == {"grade_0": 174, "grade_1": 46, "grade_2": 92, "grade_3": 68, "grade_4": 20}
    pretrain_image_foundation(FoundationInputs.from_params(p), tmp_path / "data",
                              foundation_dir(tmp_path / "foundation", "image"))
    m = train_expert("retinamnist", ExpertsInputs.from_params(p), tmp_path / "data", tmp_path / "foundation",
                     tmp_path / "experts" / "retinamnist")
    assert m["train_samples"] == 96 and 0.0 <= m["metrics"]["val"]["macro_f1"] <= 1.0
    bundle = load_bundle(expert_bundle(tmp_path / "experts" / "retinamnist"))
    assert bundle.manifest["tasks"]["retinamnist"]["input"] == {"height": 28, "width": 28, "channels": 3}
    test = load_split(tmp_path / "data", "retinamnist", "test")
    frame = predict_frame(bundle, np.asarray(test.inputs[:5]), "retinamnist")
    assert len(frame) == 5 and set(frame["label"]) <= set(test.label_names)
    with pytest.raises(DataError, match="got 1 channel"):
        predict_frame(bundle, np.asarray(test.inputs[:5, :, :, 0]), "retinamnist")
