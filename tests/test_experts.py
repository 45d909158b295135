"""LoRA experts, merge-into-backbone bundles and merge math, on tiny models (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import LoraParams, load_params
from components.core.errors import ArtifactError, ParamsError
from components.experts.io import load_expert, save_expert
from components.experts.lora import attach_lora, delta_weights
from components.fusion.merge import check_compatible, merge_average, merge_task_arithmetic
from components.bundle.format import TaskHead, add_delta, load_bundle, save_bundle
from components.nn.classifier import Classifier, make_head
from components.nn.encoders import ImageEncoder, image_tensor
from components.nn.foundation import Foundation, describe_text_foundation, load_foundation
from components.training.inference import batched

PARAMS = Path(__file__).resolve().parents[1] / "params"


def image_foundation() -> Foundation:
    torch.manual_seed(0)
    enc = ImageEncoder([8, 16]).eval()
    return Foundation("image", enc, "f" * 64, {"config": enc.config})


def text_foundation(tiny_bert: Path, tmp_path: Path) -> Foundation:
    params = load_params(PARAMS, "tiny", {"foundation.text.source": str(tiny_bert)})
    describe_text_foundation(params.foundation, tmp_path, tmp_path / "foundation" / "text")
    return load_foundation(tmp_path / "foundation", "text")


def inputs_for(found: Foundation) -> dict[str, torch.Tensor]:
    if found.modality == "text":
        return found.inputs(["chest pain radiating to the left arm", "no evidence of malignancy", "fever"])
    rng = np.random.default_rng(0)
    return found.inputs(rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8))


def trained_like(found: Foundation, seed: int = 1) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A LoRA encoder whose B is non-zero (as after training) and a head."""
    lp = LoraParams(rank=2, alpha=4, text_targets=["query", "value"], image_targets=["conv"])
    peft = attach_lora(found.encoder, lp, found.modality)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    torch.manual_seed(seed)
    return peft.eval(), make_head(found.encoder.out_dim, 3).eval()


@pytest.fixture(params=["image", "text"])
def found(request: pytest.FixtureRequest, tiny_bert: Path, tmp_path: Path) -> Foundation:
    return image_foundation() if request.param == "image" else text_foundation(tiny_bert, tmp_path)


def test_target_matching_nothing_is_an_error() -> None:
    lp = LoraParams(image_targets=["conv", "attention"])
    with pytest.raises(ParamsError, match=r"target module 'attention' matches no Linear/Conv2d"):
        attach_lora(image_foundation().encoder, lp, "image")


def test_attach_leaves_foundation_untouched(found: Foundation) -> None:
    before = {k: v.clone() for k, v in found.encoder.state_dict().items()}
    trained_like(found)
    after = found.encoder.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_merged_bundle_equals_adapter_model(found: Foundation, tmp_path: Path) -> None:
    peft, head = trained_like(found)
    x = inputs_for(found)
    adapter_logits = batched(Classifier(peft, head), x)
    save_bundle(tmp_path / "b", found, delta_weights(peft), {"t": TaskHead(head, "multiclass", ["a", "b", "c"])},
                "t-expert", {})
    bundle = load_bundle(tmp_path / "b")
    deployed = bundle.model.for_task("t")
    assert type(deployed.encoder) is type(found.encoder)  # plain architecture, no adapter code
    torch.testing.assert_close(batched(deployed, x), adapter_logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched(Classifier(found.encoder, head), x), adapter_logits)


def test_expert_save_load_round_trip_and_checks(found: Foundation, tmp_path: Path) -> None:
    peft, head = trained_like(found)
    x = inputs_for(found)
    save_expert(tmp_path / "e", peft, head, head, {"task": "t", "method": "lora", "base_sha256": found.sha256,
                                                   "lora": LoraParams(rank=2, alpha=4).model_dump()})
    expert = load_expert(tmp_path / "e", found)
    torch.testing.assert_close(batched(expert.classifier(), x), batched(Classifier(peft, head), x))

    other = Foundation(found.modality, found.encoder, "0" * 64, found.spec, found.tokenizer, found.max_length)
    with pytest.raises(ArtifactError, match=r"trained on foundation ffff|trained on foundation \w{12}, but"):
        load_expert(tmp_path / "e", other)
    data = bytearray((tmp_path / "e" / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "e" / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors: sha256 does not match its manifest"):
        load_expert(tmp_path / "e", found)


def test_merge_invariants(found: Foundation) -> None:
    tv1 = delta_weights(trained_like(found, seed=1)[0])
    tv2 = delta_weights(trained_like(found, seed=2)[0])
    for key in tv1:
        torch.testing.assert_close(merge_task_arithmetic([tv1], 1.0)[key], tv1[key])
        torch.testing.assert_close(merge_task_arithmetic([tv1], -1.0)[key], -tv1[key])
        torch.testing.assert_close(merge_average([tv1, tv1])[key], tv1[key])
        torch.testing.assert_close(merge_task_arithmetic([tv1, tv2], 0.5)[key], merge_average([tv1, tv2])[key])
    # merge then unmerge returns the base weights
    import copy

    enc = copy.deepcopy(found.encoder)
    base = {k: v.clone() for k, v in enc.state_dict().items()}
    add_delta(add_delta(enc, tv1), tv1, scale=-1.0)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)


def test_incompatible_and_empty_merges() -> None:
    found = image_foundation()
    tv = delta_weights(trained_like(found)[0])
    partial = dict(list(tv.items())[:1])
    with pytest.raises(ArtifactError, match=r"experts 'a' and 'b' adapt different weights"):
        check_compatible([tv, partial], ["a", "b"])
    with pytest.raises(ArtifactError, match="empty expert list"):
        check_compatible([], [])


def test_wrong_image_shape_is_rejected() -> None:
    with pytest.raises(ArtifactError, match=r"uint8 with shape"):
        image_tensor(np.zeros((2, 28), dtype=np.uint8))
    with pytest.raises(ArtifactError, match=r"expects 3"):
        image_tensor(np.zeros((2, 28, 28, 2), dtype=np.uint8))


def test_an_adapter_config_is_the_same_file_in_every_process(tmp_path: Path) -> None:
    """PEFT writes ``target_modules`` in set order, which string hashing changes per process: the same expert
    got another adapter_config.json (sha256) in another process (found by the Dask fan-out test)."""
    import subprocess
    import sys

    code = ("import sys, torch; from pathlib import Path\n"
            "from components.config import LoraParams\n"
            "from components.experts.lora import attach_lora\n"
            "from components.experts.methods import save_peft_adapter\n"
            "from components.nn.encoders import ImageEncoder\n"
            "torch.manual_seed(0)\n"
            "lp = LoraParams(image_targets=['blocks.0.conv', 'blocks.2.conv'])\n"
            "save_peft_adapter(attach_lora(ImageEncoder([4, 8]).eval(), lp, 'image'), Path(sys.argv[1]))\n")
    written = set()
    for seed in range(6):
        out = tmp_path / str(seed)
        out.mkdir()
        env = {**__import__("os").environ, "PYTHONHASHSEED": str(seed)}
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=Path(__file__).parents[1])
        written.add((out / "adapter_config.json").read_bytes())
    assert len(written) == 1
