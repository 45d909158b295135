"""Every expert method on tiny models: save -> load round trip, ΔW folded into the backbone equals the trained
model, and the L-LoRA properties (linear in its parameters; closed form = JVP when B0 = 0)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from components.config import ExpertsParams, LoraParams, PromptParams, load_params
from components.core.errors import ArtifactError, ParamsError
from components.core.artifacts import read_manifest
from components.experts.io import load_expert, save_expert, stored_bytes
from components.experts.linearize import LinearizedLayer, linearize
from components.experts.lora import attach_lora, lora_layers
from components.experts.methods import METHODS, get_method
from components.experts.prompt import attach_prompt, prompt_tensors
from components.bundle.format import TaskHead, add_delta, load_bundle, save_bundle
from components.nn.classifier import Classifier, make_head
from components.nn.encoders import ImageEncoder
from components.nn.foundation import Foundation, describe_text_foundation, load_foundation
from components.training.inference import batched

PARAMS = Path(__file__).resolve().parents[1] / "params"
CASES = [("lora", "auto"), ("llora", "frozen_a"), ("llora", "jvp"), ("prompt", "auto"), ("full", "auto")]


def image_foundation() -> Foundation:
    torch.manual_seed(0)
    enc = ImageEncoder([4, 8]).eval().requires_grad_(False)
    return Foundation("image", enc, "f" * 64, {"config": enc.config})


@pytest.fixture(params=["image", "text"])
def found(request: pytest.FixtureRequest, tiny_bert: Path, tmp_path: Path) -> Foundation:
    if request.param == "image":
        return image_foundation()
    params = load_params(PARAMS, "tiny", {"foundation.text.source": str(tiny_bert)})
    describe_text_foundation(params.foundation, tmp_path, tmp_path / "f" / "text")
    return load_foundation(tmp_path / "f", "text")


def inputs_for(found: Foundation) -> dict[str, torch.Tensor]:
    if found.modality == "text":
        return found.inputs(["chest pain radiating to the left arm", "no evidence of malignancy"])
    return found.inputs(np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8))


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable parameter, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize(("method", "path"), CASES)
def test_method_round_trip_and_fold(method: str, path: str, found: Foundation, tmp_path: Path) -> None:
    ep = ExpertsParams(method=method, llora_path=path, lora=LoraParams(rank=2, alpha=4),
                       prompt=PromptParams(num_virtual_tokens=3))
    torch.manual_seed(0)
    if method == "prompt" and found.modality == "image":
        with pytest.raises(ParamsError, match="image foundation is a CNN"):
            get_method(method).build(found, ep, "a radiology report")
        return
    encoder = get_method(method).build(found, ep, "a radiology report")
    assert any(p.requires_grad for p in encoder.parameters())
    perturb(encoder)
    head = make_head(found.encoder.out_dim, 3).eval()
    x = inputs_for(found)
    trained = batched(Classifier(encoder.eval(), head), x)
    save_expert(tmp_path / "e", encoder, head, head, {"task": "t", "method": method, "base_sha256": found.sha256,
                                                       "lora": ep.lora.model_dump()})
    expert = load_expert(tmp_path / "e", found)
    torch.testing.assert_close(batched(expert.classifier(), x), trained, atol=1e-5, rtol=1e-4)
    m = get_method(method)
    if m.delta is not None:
        folded = add_delta(copy.deepcopy(found.encoder), expert.delta())
        torch.testing.assert_close(batched(Classifier(folded, head), x), trained, atol=1e-5, rtol=1e-4)
    else:
        with pytest.raises(ArtifactError, match="no task vector"):
            expert.delta()
    # the deployable bundle (ΔW folded in, or the prompt carried) predicts what the trained expert does
    save_bundle(tmp_path / "b", found, expert.delta() if m.delta else {}, {"t": TaskHead(head, "multiclass", list("abc"))},
                name="t", metadata={}, wrappers=m.wrappers(encoder) if m.wrappers else None)
    deployed = load_bundle(tmp_path / "b").model.for_task("t")
    torch.testing.assert_close(batched(deployed, x), trained, atol=1e-5, rtol=1e-4)


def _layer_case() -> torch.nn.Module:
    found = image_foundation()
    model = attach_lora(found.encoder, LoraParams(rank=2, alpha=4, image_targets=["conv"]), "image")
    with torch.no_grad():  # B0 != 0: the general case (continuing from a trained adapter)
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.2)
    return model


def test_linearized_layers_are_linear_and_plain_lora_is_not() -> None:
    model = _layer_case()
    plain = copy.deepcopy(model)
    linearize(model, "jvp")
    layer = next(m for m in model.modules() if isinstance(m, LinearizedLayer))
    h = layer.layer.base_layer.in_channels
    inp = torch.randn(2, h, 28, 28, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    d1 = [torch.randn(p.shape, generator=gen) * 0.3 for p in layer.tangents()]
    d2 = [torch.randn(p.shape, generator=gen) * 0.3 for p in layer.tangents()]

    def out_lin(a: float, b: float) -> torch.Tensor:
        with torch.no_grad():
            for p, u, v in zip(layer.tangents(), d1, d2, strict=True):
                p.copy_(a * u + b * v)
            return layer(inp)

    plain_layer = next(iter(lora_layers(plain).values()))
    start = [p.detach().clone() for p in (plain_layer.lora_A["default"].weight, plain_layer.lora_B["default"].weight)]

    def out_plain(a: float, b: float) -> torch.Tensor:
        with torch.no_grad():
            for p, p0, u, v in zip((plain_layer.lora_A["default"].weight, plain_layer.lora_B["default"].weight),
                                   start, d1, d2, strict=True):
                p.copy_(p0 + a * u + b * v)
            return plain_layer(inp)

    for f in (out_lin, out_plain):
        f0 = f(0, 0)
        lhs = f(0.7, -1.3) - f0
        rhs = 0.7 * (f(1, 0) - f0) - 1.3 * (f(0, 1) - f0)
        err = (lhs - rhs).abs().max() / lhs.abs().max()
        if f is out_lin:
            assert err < 1e-5
        else:
            assert err > 1e-3  # the B·A cross term: plain LoRA is measurably non-linear


def test_closed_form_equals_jvp_when_b0_is_zero() -> None:
    found = image_foundation()
    lp = LoraParams(rank=2, alpha=4, image_targets=["conv"])
    torch.manual_seed(0)
    closed = attach_lora(found.encoder, lp, "image")
    assert linearize(closed, "auto") == "frozen_a"  # B0 = 0 picks the closed form
    torch.manual_seed(0)  # the same φ0
    general = attach_lora(found.encoder, lp, "image")
    linearize(general, "jvp")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer, wrapper in zip(lora_layers(closed).values(),
                                         [m for m in general.modules() if isinstance(m, LinearizedLayer)], strict=True):
            d_a, d_b = wrapper.tangents()
            d_a.copy_(torch.randn(d_a.shape, generator=gen))  # irrelevant at B0 = 0: J_A vanishes
            d_b.copy_(torch.randn(d_b.shape, generator=gen) * 0.1)
            layer.lora_B["default"].weight.copy_(d_b)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(general(x), closed(x), atol=1e-5, rtol=1e-4)


def test_registry_and_unknown_method() -> None:
    assert {"lora", "llora", "full"} <= set(METHODS)
    with pytest.raises(ParamsError, match=r"^--set: key 'method'"):
        load_params(PARAMS, overrides={"experts.method": "qlora"})


def test_soft_prompt_init_length_and_pooling(tiny_bert: Path, tmp_path: Path) -> None:
    params = load_params(PARAMS, "tiny", {"foundation.text.source": str(tiny_bert)})
    describe_text_foundation(params.foundation, tmp_path, tmp_path / "f" / "text")
    found = load_foundation(tmp_path / "f", "text")
    description = "is the radiograph normal"
    pp = PromptParams(num_virtual_tokens=4, init="text")
    model = attach_prompt(found.encoder, pp, description=description, tokenizer_folder=Path(found.spec["folder"]),
                          max_length=found.max_length)
    # text init: the prompt starts as the embeddings of the task description's tokens (repeated to N)
    ids = found.tokenizer(description)["input_ids"]
    expected = found.encoder.model.get_input_embeddings().weight[torch.tensor((ids * 4)[:4])]
    torch.testing.assert_close(prompt_tensors(model)["prompt_embeddings"], expected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and "prompt" in trainable[0]  # only the prompt trains
    x = found.inputs(["pleural effusion", "normal"])
    with torch.no_grad():
        hidden = model.model(**x).last_hidden_state
        assert hidden.shape[1] == 4 + x["input_ids"].shape[1]
        mask = torch.cat([torch.ones(2, 4), x["attention_mask"].float()], 1).unsqueeze(-1)
        torch.testing.assert_close(model(**x), (hidden * mask).sum(1) / mask.sum(1))  # virtual tokens pooled
    limit = found.encoder.model.config.max_position_embeddings
    with pytest.raises(ParamsError, match=r"prompt.num_virtual_tokens.*exceed the text encoder's \d+ positions"):
        attach_prompt(found.encoder, PromptParams(num_virtual_tokens=limit), description=description,
                      tokenizer_folder=None, max_length=found.max_length)
    with pytest.raises(ParamsError, match="no description"):
        attach_prompt(found.encoder, pp, description=" ", tokenizer_folder=None, max_length=found.max_length)


def test_prompt_method_needs_an_image_method() -> None:
    with pytest.raises(ParamsError, match="text-only.*image_method"):
        load_params(PARAMS, overrides={"experts.method": "prompt"})
    p = load_params(PARAMS, overrides={"experts.method": "prompt", "experts.image_method": "lora"})
    assert (p.experts.method_for("text"), p.experts.method_for("image")) == ("prompt", "lora")


# --------------------------------------------------------------------------- PEFT's adapter layout
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def saved_lora_expert(method: str, path: str, found: Foundation, folder: Path) -> torch.nn.Module:
    """A moved (as if trained) LoRA or L-LoRA encoder, saved as an expert in ``folder``; returns the encoder."""
    ep = ExpertsParams(method=method, llora_path=path, lora=LoraParams(rank=2, alpha=4))
    torch.manual_seed(0)
    encoder = get_method(method).build(found, ep, "a radiology report")
    perturb(encoder)
    head = make_head(found.encoder.out_dim, 3).eval()
    save_expert(folder, encoder, head, head, {"task": "t", "method": method, "base_sha256": found.sha256,
                                              "lora": ep.lora.model_dump()})
    return encoder.eval()


@pytest.mark.parametrize(("method", "path"), [("lora", "auto"), ("llora", "frozen_a")])
def test_lora_expert_opens_with_peft_from_pretrained(method: str, path: str, found: Foundation,
                                                     tmp_path: Path) -> None:
    from peft import PeftModel

    encoder = saved_lora_expert(method, path, found, tmp_path / "e")
    names = {p.name for p in (tmp_path / "e").iterdir()}
    assert PEFT_FILES <= names
    assert not names & {"README.md", "adapter.safetensors"}  # no Hub model card, no old bare adapter
    assert not [n for n in names if n.startswith(".")]  # PEFT's scratch folder is gone
    assert PEFT_FILES <= set(read_manifest(tmp_path / "e", kind="expert")["files"])  # hashed like every file
    # the expert folder is a plain PEFT adapter: PEFT alone opens it on the foundation's encoder
    base = copy.deepcopy(found.encoder)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "e").eval()
    expert = load_expert(tmp_path / "e", found)
    x = inputs_for(found)
    ours = batched(expert.encoder, x)
    torch.testing.assert_close(batched(peft_model, x), ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, batched(encoder, x), atol=1e-5, rtol=0)  # and both are the trained encoder
    assert not torch.allclose(ours, batched(found.encoder, x), atol=1e-4)  # the adapter does change the output
    adapter, head = (tmp_path / "e" / n for n in ("adapter_model.safetensors", "head.safetensors"))
    extra = {"adapter_init.safetensors"} if method == "llora" else set()
    # stored size: tensor files only (PEFT's adapter_config.json is settings, like the manifest)
    assert stored_bytes(tmp_path / "e") == sum((tmp_path / "e" / n).stat().st_size
                                               for n in {adapter.name, head.name} | extra)


def test_llora_jvp_expert_keeps_its_own_files_and_no_peft_adapter(tmp_path: Path) -> None:
    saved_lora_expert("llora", "jvp", image_foundation(), tmp_path / "e")
    names = {p.name for p in (tmp_path / "e").iterdir()}
    # PEFT cannot represent the linearized model: φ0 and δ are its own files, no (misleading) PEFT adapter
    assert {"adapter_init.safetensors", "delta.safetensors"} <= names
    assert not names & (PEFT_FILES | {"adapter.safetensors", "README.md"})


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # PEFT only warns; the loader raises
def test_lora_adapter_checks_name_the_file(tmp_path: Path) -> None:
    found = image_foundation()
    saved_lora_expert("lora", "auto", found, tmp_path / "e")
    manifest = read_manifest(tmp_path / "e", kind="expert")
    load = get_method("lora").load  # the method's loader, past the manifest's hash check
    with pytest.raises(ArtifactError, match=r"adapter_config\.json: adapter settings .* differ from the manifest"):
        load(found.encoder, {**manifest, "lora": LoraParams(rank=2, alpha=8).model_dump()}, "image", tmp_path / "e")
    weights = tmp_path / "e" / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({**state, "base_model.model.stray.lora_A.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors: unexpected keys .*stray"):
        load(found.encoder, manifest, "image", tmp_path / "e")
    save_file({k: v for k, v in state.items() if "blocks.0." not in k}, weights)
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors: missing keys .*blocks\.0\."):
        load(found.encoder, manifest, "image", tmp_path / "e")
    (tmp_path / "e" / "adapter_config.json").unlink()
    with pytest.raises(ArtifactError, match=r"no adapter_config\.json \(PEFT's adapter layout\)"):
        load(found.encoder, manifest, "image", tmp_path / "e")
