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


def test_retina_and_derma_with_the_grayscale_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.core.layout import expert_bundle, foundation_dir
    from components.data.datasets import load_split
    from components.tracking.pyfunc import predict_frame

    base = load_params(PROJECT / "params", "tiny")
    derma = Path(expand_env(base.data.tasks["dermamnist"].path))
    derma = derma if derma.is_absolute() else PROJECT / derma
    active = ["breastmnist", "retinamnist"] + (["dermamnist"] if derma.is_file() else [])
    p = load_params(PROJECT / "params", "tiny", {"data.active": active, "experts.probe.prior_shift": True})
    manifest = prepare_data(p.data, PROJECT, tmp_path / "data", p.pipeline.seed)
    retina = manifest["tasks"]["retinamnist"]["splits"]
    assert (retina["train"]["n"], retina["val"]["n"], retina["test"]["n"]) == (1080, 120, 400)
    assert retina["test"]["class_counts"] == {"grade_0": 174, "grade_1": 46, "grade_2": 92, "grade_3": 68, "grade_4": 20}
    pretrain_image_foundation(FoundationInputs.from_params(p), tmp_path / "data",
                              foundation_dir(tmp_path / "foundation", "image"))
    import components.stages.experts as experts_stage

    shifts = []  # experts.probe.prior_shift: the stage tunes its expert's decision on validation and records it
    tune = experts_stage.tune_prior_shift
    monkeypatch.setattr(experts_stage, "tune_prior_shift", lambda *a: shifts.append(tune(*a)) or shifts[-1])
    m = train_expert("retinamnist", ExpertsInputs.from_params(p), tmp_path / "data", tmp_path / "foundation",
                     tmp_path / "experts" / "retinamnist")
    assert m["train_samples"] == 96 and 0.0 <= m["metrics"]["val"]["macro_f1"] <= 1.0
    assert len(shifts) == 1 and m["prior_shift"] == shifts[0]
    bundle = load_bundle(expert_bundle(tmp_path / "experts" / "retinamnist"))
    assert bundle.manifest["tasks"]["retinamnist"]["input"] == {"height": 28, "width": 28, "channels": 3}
    test = load_split(tmp_path / "data", "retinamnist", "test")
    frame = predict_frame(bundle, np.asarray(test.inputs[:5]), "retinamnist")
    assert len(frame) == 5 and set(frame["label"]) <= set(test.label_names)
    with pytest.raises(DataError, match="got 1 channel"):
        predict_frame(bundle, np.asarray(test.inputs[:5, :, :, 0]), "retinamnist")


def test_resnet18_is_the_medmnist_adaptation() -> None:
    """The default ResNet widths/blocks are ResNet-18's body with the 28 px stem: torchvision's resnet18 has
    11,689,512 parameters; less its fc (512*1000 + 1000) and with a 3x3x3x64 stem instead of 7x7x3x64 that is
    11,168,832 (GroupNorm has BatchNorm's affine parameters, so the count is the same)."""
    import torch

    from components.config.foundation import ImageFoundationParams
    from components.nn.resnet import ImageBackbone

    ip = ImageFoundationParams(arch="resnet")
    net = ImageBackbone(ip.widths, ip.blocks)
    assert sum(p.numel() for p in net.parameters()) == 11_689_512 - (512 * 1000 + 1000) - (7 * 7 - 3 * 3) * 3 * 64
    assert net(torch.zeros(2, 3, 28, 28)).shape == (2, 512)


def test_resnet_foundation_through_experts_and_bundle(tmp_path: Path) -> None:
    """arch resnet: pre-trained, recorded (arch in the manifest), rebuilt, LoRA-adapted on its conv1/conv2 and
    served from the bundle; an unknown arch in a manifest and a CNN target with the ResNet are refused."""
    import torch

    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.core.errors import ArtifactError, ParamsError
    from components.core.layout import expert_bundle, foundation_dir
    from components.data.datasets import load_split
    from components.nn.encoders import image_encoder_from_config
    from components.nn.foundation import load_foundation
    from components.tracking.pyfunc import predict_frame

    over = {"data.active": ["breastmnist", "retinamnist"], "foundation.image.arch": "resnet",
            "foundation.image.widths": [4, 8], "foundation.image.blocks": 1,
            "experts.lora.image_targets": ["conv1", "conv2"]}
    with pytest.raises(ParamsError, match=r"image_targets \['conv'\] name no conv of the 'resnet'"):
        load_params(PROJECT / "params", "tiny", {**over, "experts.lora.image_targets": ["conv"]})
    p = load_params(PROJECT / "params", "tiny", over)
    prepare_data(p.data, PROJECT, tmp_path / "data", p.pipeline.seed)
    manifest = pretrain_image_foundation(FoundationInputs.from_params(p), tmp_path / "data",
                                         foundation_dir(tmp_path / "foundation", "image"))
    assert manifest["config"] == {"arch": "resnet", "widths": [4, 8], "blocks": 1, "in_channels": 3}
    for method in ("lora", "llora"):
        p = load_params(PROJECT / "params", "tiny", {**over, "experts.method": method})
        found = load_foundation(tmp_path / "foundation", "image")
        assert type(found.encoder).__name__ == "ImageBackbone"
        m = train_expert("breastmnist", ExpertsInputs.from_params(p), tmp_path / "data", tmp_path / "foundation",
                         tmp_path / method / "breastmnist")
        assert sorted(m["targets"]) == ["conv1", "conv2"] and 0.0 <= m["metrics"]["val"]["macro_f1"] <= 1.0
        bundle = load_bundle(expert_bundle(tmp_path / method / "breastmnist"))
        test = load_split(tmp_path / "data", "breastmnist", "test")
        frame = predict_frame(bundle, np.asarray(test.inputs[:4]), "breastmnist")
        assert len(frame) == 4 and set(frame["label"]) <= set(test.label_names)
        # the bundle's model is the foundation with the expert's update added: not the foundation itself
        x = found.inputs(np.asarray(test.inputs[:4]))
        with torch.no_grad():
            assert not torch.allclose(bundle.model.encoder(**x), found.encoder(**x))
    with pytest.raises(ArtifactError, match="arch 'vit' is unknown"):
        image_encoder_from_config({"arch": "vit", "widths": [4]})
    with pytest.raises(ArtifactError, match="does not fit arch 'resnet'"):
        image_encoder_from_config({"arch": "resnet", "channels": [4]})
