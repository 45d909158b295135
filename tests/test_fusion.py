"""The fusion stage on tiny models (CPU, seconds): task vectors in ΔW and adapter space against hand computations,
L-LoRA merges against the linearized model they stand for, the coefficient search on a synthetic scorer, the
stage end to end with a synthetic scorer, and every bad input refused with its message before anything is written."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from components.config import ExpertsParams, LoraParams, Params, load_params
from components.core.errors import ArtifactError, ParamsError
from components.experts.io import Expert, load_expert, save_expert
from components.experts.linearize import LinearizedLayer, linearize
from components.experts.lora import attach_lora, lora_layers, lora_targets
from components.experts.methods import get_method
from components.fusion.search import Scorer, best_per_lambda, search_coefficients
from components.fusion.spaces import check_adapter_space, check_same_start, shared_start_delta, task_vectors
from components.stages import fusion as fusion_stage
from components.stages.fusion import FusionInputs, fuse_experts
from components.fusion.merge import TaskVector, coefficient_grid, merge
from components.bundle.format import TaskHead, load_bundle, save_bundle
from components.nn.classifier import Classifier, make_head
from components.nn.encoders import ImageEncoder
from components.nn.foundation import Foundation, describe_text_foundation, load_foundation
from components.training.inference import batched

PARAMS = Path(__file__).resolve().parents[1] / "params"
SEED = 42  # the seed every expert trains from (pipeline.seed): it fixes the shared LoRA init φ0
LP = LoraParams(rank=2, alpha=4, text_targets=["query", "value"], image_targets=["conv"])


def image_foundation() -> Foundation:
    torch.manual_seed(0)
    enc = ImageEncoder([4, 8]).eval().requires_grad_(False)
    return Foundation("image", enc, "f" * 64, {"config": enc.config})


def text_params(tiny_bert: Path, **overrides: Any) -> Params:
    return load_params(PARAMS, "tiny", {"foundation.text.source": str(tiny_bert), **overrides})


def text_foundation_dir(tiny_bert: Path, folder: Path) -> Path:
    describe_text_foundation(text_params(tiny_bert).foundation, folder, folder / "foundation" / "text")
    return folder / "foundation"


@pytest.fixture(params=["image", "text"])
def found(request: pytest.FixtureRequest, tiny_bert: Path, tmp_path: Path) -> Foundation:
    if request.param == "image":
        return image_foundation()
    return load_foundation(text_foundation_dir(tiny_bert, tmp_path), "text")


def inputs_for(found: Foundation) -> dict[str, torch.Tensor]:
    if found.modality == "text":
        return found.inputs(["chest pain radiating to the left arm", "no evidence of malignancy"])
    return found.inputs(np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8))


def perturb(params: list[torch.nn.Parameter], seed: int, scale: float = 0.1) -> None:
    """Move parameters as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def save_and_load(found: Foundation, encoder: torch.nn.Module, folder: Path, task: str, method: str,
                  lp: LoraParams = LP, seed: int | None = SEED) -> Expert:
    torch.manual_seed(7)
    head = make_head(found.encoder.out_dim, 3).eval()
    manifest = {"task": task, "method": method, "base_sha256": found.sha256, "lora": lp.model_dump(),
                "targets": lora_targets(lp, found.modality), "task_kind": "multiclass", "label_names": list("abc")}
    save_expert(folder / task, encoder, head, head, {**manifest, **({"seed": seed} if seed is not None else {})})
    return load_expert(folder / task, found)


def expert(found: Foundation, folder: Path, task: str, method: str = "lora", *, move: int = 1,
           init_seed: int = SEED, llora_path: str = "auto", lp: LoraParams = LP, only_b: bool = False) -> Expert:
    """An expert as training leaves it: built right after seeding (so every task shares φ0), then moved."""
    torch.manual_seed(init_seed)
    encoder = get_method(method).build(found, ExpertsParams(method=method, llora_path=llora_path, lora=lp), "desc")
    trainable = [p for n, p in encoder.named_parameters() if p.requires_grad and (not only_b or "lora_B" in n)]
    perturb(trainable, move, 0.1 if method != "full" else 0.01)
    return save_and_load(found, encoder, folder, task, method, lp, init_seed)


def assert_close(a: TaskVector, b: TaskVector, **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol)


def hand_delta(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor, scale: float) -> torch.Tensor:
    """s·B·A by hand: a linear layer's (out, r) @ (r, in); a conv's B (out, r, 1, 1) times A (r, in, k, k)."""
    return scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(like.shape)


# --- adapter space ---

def test_adapter_space_one_expert_is_itself_and_rebuilds_a0(found: Foundation, tmp_path: Path) -> None:
    one = expert(found, tmp_path, "a")
    vectors, to_delta = task_vectors({"a": one}, found, "adapter")
    for method in ("task_arithmetic", "average"):
        assert_close(to_delta(merge(method, vectors, lam=1.0)), one.delta(), atol=1e-6, rtol=1e-5)
    # φ0 is rebuilt from the seed: an expert that moved only B has exactly zero δA
    b_only = expert(found, tmp_path, "b", only_b=True)
    tv = task_vectors({"b": b_only}, found, "adapter")[0][0]
    assert all(not v.any() for k, v in tv.items() if ".lora_A." in k)
    assert all(v.any() for k, v in tv.items() if ".lora_B." in k)


def test_adapter_space_task_arithmetic_by_hand_and_differs_from_delta_w(found: Foundation, tmp_path: Path) -> None:
    experts = {t: expert(found, tmp_path, t, move=i) for i, t in enumerate(("a", "b"), start=1)}
    lam, scale = 0.7, LP.alpha / LP.rank
    vectors, to_delta = task_vectors(experts, found, "adapter")
    adapter = to_delta(merge("task_arithmetic", vectors, lam=lam))
    torch.manual_seed(SEED)
    init = lora_layers(attach_lora(found.encoder, LP, found.modality))
    layers = {t: lora_layers(e.encoder) for t, e in experts.items()}
    assert adapter.keys() == init.keys() and len(init) >= 2
    for key, layer in init.items():
        a0 = layer.lora_A["default"].weight
        d_a = sum(layers[t][key].lora_A["default"].weight - a0 for t in experts)
        b = sum(layers[t][key].lora_B["default"].weight for t in experts)  # B0 = 0
        torch.testing.assert_close(adapter[key], hand_delta(a0 + lam * d_a, lam * b, adapter[key], scale))
    delta_w = merge("task_arithmetic", task_vectors(experts, found, "delta_w")[0], lam=lam)
    gap = max(float((adapter[k] - delta_w[k]).abs().max()) for k in adapter)
    assert gap > 1e-3  # the cross terms B_a·δA_b: adapter-space merging is not ΔW merging


# --- L-LoRA: ΔW merging is merging the linearized models ---

def test_llora_frozen_a_merge_is_the_linearized_model_with_summed_deltas(found: Foundation, tmp_path: Path) -> None:
    experts = {t: expert(found, tmp_path, t, "llora", move=i, llora_path="frozen_a")
               for i, t in enumerate(("a", "b"), start=1)}
    check_same_start(experts)  # one φ0 (same init hash)
    lam = 0.6
    vectors, to_delta = task_vectors(experts, found, "delta_w")
    merged = to_delta(merge("task_arithmetic", vectors, lam=lam))
    deltas = [e.delta() for e in experts.values()]
    assert_close(merged, {k: lam * (deltas[0][k] + deltas[1][k]) for k in merged})
    # the linearized model at φ0 + λ Σ δ_t (frozen A: δ is the trained B, B0 = 0)
    torch.manual_seed(SEED)
    lin = get_method("llora").build(found, ExpertsParams(method="llora", llora_path="frozen_a", lora=LP), "desc")
    layers = {t: lora_layers(e.encoder) for t, e in experts.items()}
    with torch.no_grad():
        for key, layer in lora_layers(lin).items():
            layer.lora_B["default"].weight.copy_(lam * sum(layers[t][key].lora_B["default"].weight for t in experts))
    head = experts["a"].head
    x = inputs_for(found)
    save_bundle(tmp_path / "bundle", found, merged, {"a": TaskHead(head, "multiclass", list("abc"))}, "f", {})
    deployed = load_bundle(tmp_path / "bundle").model.for_task("a")
    torch.testing.assert_close(batched(deployed, x), batched(Classifier(lin.eval(), head), x), atol=1e-5, rtol=1e-4)


def jvp_expert(found: Foundation, folder: Path, task: str, move: int) -> Expert:
    """An L-LoRA expert linearized around φ0 with B0 ≠ 0 (as when continuing from a trained adapter)."""
    torch.manual_seed(SEED)
    model = attach_lora(found.encoder, LP, found.modality)
    perturb([layer.lora_B["default"].weight for layer in lora_layers(model).values()], 99)  # the same B0 for all
    model.medexperts_init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    model.medexperts_path = linearize(model, "jvp")
    perturb([p for m in model.modules() if isinstance(m, LinearizedLayer) for p in m.tangents()], move)
    return save_and_load(found, model, folder, task, "llora")


def test_llora_jvp_with_nonzero_b0_adds_the_shared_start_once(tmp_path: Path) -> None:
    found = image_foundation()
    experts = {t: jvp_expert(found, tmp_path, t, i) for i, t in enumerate(("a", "b"), start=1)}
    lam = 0.6
    start = shared_start_delta(experts["a"])
    assert start and any(v.abs().max() > 1e-3 for v in start.values())
    vectors, to_delta = task_vectors(experts, found, "delta_w")
    merged = to_delta(merge("task_arithmetic", vectors, lam=lam))
    deltas = [e.delta() for e in experts.values()]
    assert_close(merged, {k: start[k] + lam * (deltas[0][k] + deltas[1][k] - 2 * start[k]) for k in merged})
    # predicts what the linearized model at φ0 + λ Σ δ_t predicts
    lin = copy.deepcopy(experts["a"].encoder)
    wrappers = {t: [m for m in e.encoder.modules() if isinstance(m, LinearizedLayer)] for t, e in experts.items()}
    with torch.no_grad():
        for i, m in enumerate(m for m in lin.modules() if isinstance(m, LinearizedLayer)):
            for j, p in enumerate(m.tangents()):
                p.copy_(lam * sum(wrappers[t][i].tangents()[j] for t in experts))
    head, x = experts["a"].head, inputs_for(found)
    save_bundle(tmp_path / "bundle", found, merged, {"a": TaskHead(head, "multiclass", list("abc"))}, "f", {})
    deployed = load_bundle(tmp_path / "bundle").model.for_task("a")
    torch.testing.assert_close(batched(deployed, x), batched(Classifier(lin.eval(), head), x), atol=1e-5, rtol=1e-4)


def test_full_fine_tuning_task_vector_is_every_weight(tmp_path: Path) -> None:
    found = image_foundation()
    one = expert(found, tmp_path, "a", "full")
    base = dict(found.encoder.named_parameters())
    tv = task_vectors({"a": one}, found, "delta_w")[0][0]
    assert tv.keys() == base.keys()
    assert_close(tv, {n: p.detach() - base[n] for n, p in one.encoder.named_parameters()})


# --- the coefficient search ---

def synthetic_scorer(best_lam: float, best_k: float, top: float) -> Scorer:
    """Reads λ and the kept fraction back from the merged ΔW of one task vector (entries 1..n) and scores them
    by their distance to (best_lam, best_k); a point with λ = 1 scores NaN (an undefined metric)."""
    def score(delta: TaskVector) -> tuple[float, dict[str, dict[str, float]]]:
        lam = float(delta["w"].abs().max()) / top
        kept = float((delta["w"] != 0).float().mean())
        value = float("nan") if abs(lam - 1) < 1e-6 else -((lam - best_lam) ** 2) - (kept - best_k) ** 2
        return value, {"t": {"macro_f1": value}}
    return score


def test_search_picks_the_best_point_and_records_the_grid() -> None:
    tv = {"w": torch.arange(1.0, 11.0)}
    grids = {"lam": [0.2, 0.6, 1.0], "k": [0.1, 0.5, 1.0], "p": [0.5]}
    grid = coefficient_grid("ties", grids)
    assert len(grid) == 9 and grid[0] == {"lam": 0.2, "k": 0.1}
    found = search_coefficients("ties", [tv], ["t"], grid, synthetic_scorer(0.6, 0.5, 10.0))
    assert found.coefficients == {"lam": 0.6, "k": 0.5} and found.score == pytest.approx(0.0)
    assert [p["coefficients"] for p in found.grid] == grid
    torch.testing.assert_close(found.delta["w"], merge("ties", [tv], lam=0.6, k=0.5)["w"])
    curve = best_per_lambda(found.grid, 1)
    assert [lam for lam, _ in curve] == [0.2, 0.6, 1.0]
    assert curve[0][1] == pytest.approx(-0.16) and curve[1][1] == pytest.approx(0.0)  # max over k at each λ
    assert np.isnan(curve[2][1])  # NaN ranks last, but is reported
    # every method's grid is the product of the grids of the coefficients it takes
    assert [len(coefficient_grid(m, grids)) for m in ("average", "task_arithmetic", "dare_linear", "dare_ties")] \
        == [1, 3, 3, 9]
    assert best_per_lambda(search_coefficients("average", [tv, tv], ["a", "b"], [{}], lambda d: (0.5, {})).grid,
                           2) == [(0.5, 0.5)]  # average: one point at λ = 1/T


class FakeScorer:
    """Stands in for ValidationScorer (no data): prefers a merged update of a given size."""

    def __init__(self, foundation: Foundation, experts: dict[str, Expert], *args: object) -> None:
        self.single = {t: 0.8 for t in experts}

    def score(self, delta: TaskVector) -> tuple[float, dict[str, dict[str, float]]]:
        norm = float(sum(v.square().sum() for v in delta.values()).sqrt())
        return 1.0 / (1.0 + abs(norm - 0.05)), {t: {"macro_f1": 0.5} for t in self.single}


@pytest.mark.parametrize("space", ["delta_w", "adapter"])
def test_fusion_stage_writes_a_bundle_and_search_per_method(space: str, tiny_bert: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> None:
    monkeypatch.setattr(fusion_stage, "ValidationScorer", FakeScorer)
    params = text_params(tiny_bert, **{"fusion.lora_space": space, "fusion.methods": [
        "average", "task_arithmetic", "ties", "dare_linear", "dare_ties"], "fusion.lambdas": [0.5, 1.0]})
    foundation_dir = text_foundation_dir(tiny_bert, tmp_path)
    found = load_foundation(foundation_dir, "text")
    tasks = list(params.data.active_tasks("text"))
    for i, task in enumerate(tasks, start=1):
        expert(found, tmp_path / "experts", task, move=i)
    inp = FusionInputs.from_params(params)
    summary = fuse_experts(inp, tmp_path / "no-data", foundation_dir, tmp_path / "experts", tmp_path / "out")
    assert summary.tasks == tasks and summary.lora_space == space and summary.seed == params.pipeline.seed
    sizes = {"average": 1, "task_arithmetic": 2, "ties": 2, "dare_linear": 2, "dare_ties": 2}  # tiny: 1 k, 1 p
    for method, r in summary.methods.items():
        assert len(r.grid) == sizes[method]
        assert max(p["val_normalised"] for p in r.grid) == r.val_normalised
        assert r.lam == r.coefficients.get("lam") and set(r.val_metrics) == set(tasks)
        assert (r.seed is not None) == method.startswith("dare")
        manifest = load_bundle(tmp_path / "out" / method).manifest
        assert manifest["coefficients"] == r.coefficients and manifest["lora_space"] == space
        assert [lam for lam, _ in summary.curves[method]] == ([0.5] if method == "average" else [0.5, 1.0])
    assert summary.methods["ties"].coefficients.keys() == {"lam", "k"}
    assert summary.methods["dare_ties"].coefficients.keys() == {"lam", "p", "k"}
    assert summary.best_method in summary.methods and summary.single_val == {t: 0.8 for t in tasks}
    assert (tmp_path / "out" / "fusion_curve.png").is_file()
    # one summary per stage: the driver writes it (_summary.json), fusion no longer writes its own copy
    assert not (tmp_path / "out" / "summary.json").exists()

    # what the stage records in MLflow: chosen coefficients as metrics, the whole search as a JSON artifact
    import mlflow

    from flows.stage_logs import log_fusion

    with mlflow.start_run() as run:
        log_fusion(SimpleNamespace(params=params), inp, summary, tmp_path / "out")
    logged = mlflow.MlflowClient().get_run(run.info.run_id)
    ties = summary.methods["ties"].coefficients
    assert logged.data.metrics["ties.k"] == ties["k"] and logged.data.metrics["ties.lambda"] == ties["lam"]
    assert logged.data.tags["fusion.lora_space"] == space
    grid = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/fusion_grid.json")
    assert grid["dare_ties"]["seed"] == params.pipeline.seed and grid["ties"]["chosen"] == ties
    assert grid["ties"]["grid"] == summary.methods["ties"].grid


# --- bad input: refused with a message naming who conflicts, nothing written ---

def fake(task: str, method: str = "lora", **manifest: Any) -> Expert:
    lora = {**LP.model_dump(), **manifest.pop("lora", {})}
    m = {"task": task, "method": method, "lora": lora, "targets": ["query", "value"], "seed": SEED, **manifest}
    head = make_head(4, 2)
    return Expert(task, torch.nn.Identity(), head, head, m, torch.nn.Identity())


BAD_EXPERTS = [
    (check_same_start, {}, ArtifactError, "no experts to merge (empty expert list)"),
    (check_same_start, {"a": fake("a"), "b": fake("b", "full")}, ArtifactError,
     "experts of different methods cannot be merged (a: lora; b: full)"),
    (check_same_start, {"a": fake("a", "llora", init_sha256="1" * 64), "b": fake("b", "llora", init_sha256="1" * 64),
                        "c": fake("c", "llora", init_sha256="2" * 64)}, ArtifactError,
     "different initialisations φ0 (hashes a, b: 111111111111; c: 222222222222)"),
    (check_adapter_space, {"a": fake("a", "full"), "b": fake("b", "full")}, ParamsError,
     "fusion.lora_space 'adapter' merges plain LoRA adapters (method 'lora'), but the experts are a, b: full: "
     "they have no LoRA adapter"),
    (check_adapter_space, {"a": fake("a", "prompt")}, ParamsError, "the experts are a: prompt"),
    (check_adapter_space, {"a": fake("a", "llora"), "b": fake("b", "llora")}, ParamsError,
     "L-LoRA is linear in its adapter parameters"),
    (check_adapter_space, {"a": fake("a"), "b": fake("b", lora={"rank": 4})}, ArtifactError,
     "share its rank, but they differ (a: 2; b: 4)"),
    (check_adapter_space, {"a": fake("a"), "b": fake("b", lora={"alpha": 8.0})}, ArtifactError,
     "share its alpha, but they differ (a: 4.0; b: 8.0)"),
    (check_adapter_space, {"a": fake("a"), "b": fake("b", targets=["query"])}, ArtifactError,
     "share its target modules, but they differ (a: ['query', 'value']; b: ['query'])"),
    (check_adapter_space, {"a": fake("a"), "b": fake("b", seed=7)}, ArtifactError,
     "share its seed (the initial A0), but they differ (a: 42; b: 7)"),
    (check_adapter_space, {"a": fake("a"), "b": fake("b", seed=None)}, ArtifactError,
     "experts ['b'] record no seed, so their initial A0 cannot be rebuilt"),
]


@pytest.mark.parametrize(("check", "experts", "error", "message"), BAD_EXPERTS)
def test_conflicting_experts_are_refused(check: Any, experts: dict[str, Expert], error: type[Exception],
                                         message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        check(experts) if check is check_same_start else check(experts, "text")


def test_different_llora_inits_are_found_from_real_experts(tmp_path: Path) -> None:
    found = image_foundation()
    experts = {"a": expert(found, tmp_path, "a", "llora", llora_path="frozen_a"),
               "b": expert(found, tmp_path, "b", "llora", init_seed=SEED + 1, llora_path="frozen_a")}
    with pytest.raises(ArtifactError, match=r"different initialisations φ0 \(hashes a: \w{12}; b: \w{12}\)"):
        check_same_start(experts)


@pytest.mark.parametrize("case", ["foundation", "rank", "methods", "no_tasks", "adapter_full"])
def test_stage_refuses_before_writing(case: str, tiny_bert: Path, tmp_path: Path) -> None:
    foundation_dir = text_foundation_dir(tiny_bert, tmp_path)
    found = load_foundation(foundation_dir, "text")
    overrides: dict[str, Any] = {"fusion.lora_space": "adapter"} if case in ("rank", "adapter_full") else {}
    params = text_params(tiny_bert, **overrides)
    pubmedqa, abstracts = params.data.active_tasks("text")
    method = "full" if case == "adapter_full" else "lora"
    expert(found, tmp_path / "experts", pubmedqa, method)
    if case == "foundation":  # trained on another foundation
        other = Foundation("text", found.encoder, "0" * 64, found.spec, found.tokenizer, found.max_length)
        expert(other, tmp_path / "experts", abstracts)
        error, message = ArtifactError, "expert for task 'medical_abstracts' was trained on foundation 000000000000"
    elif case == "rank":
        expert(found, tmp_path / "experts", abstracts, lp=LP.model_copy(update={"rank": 4}))
        error, message = ArtifactError, "share its rank, but they differ (pubmedqa: 2; medical_abstracts: 4)"
    elif case == "methods":
        expert(found, tmp_path / "experts", abstracts, "llora", llora_path="frozen_a")
        error, message = ArtifactError, "different methods cannot be merged (pubmedqa: lora; medical_abstracts: llora)"
    elif case == "adapter_full":
        expert(found, tmp_path / "experts", abstracts, "full", move=2)
        error, message = ParamsError, "the experts are pubmedqa, medical_abstracts: full"
    else:
        params = text_params(tiny_bert, **{"data.active": ["breastmnist"]})
        error, message = ArtifactError, "no experts to merge (empty expert list): no active text task"
    with pytest.raises(error, match=re.escape(message)):
        fuse_experts(FusionInputs.from_params(params), tmp_path / "no-data", foundation_dir, tmp_path / "experts",
                     tmp_path / "out")
    assert not (tmp_path / "out").exists()


BAD_PARAMS = [
    ({"fusion.ks": [0.0, 0.5]}, "key 'ks': Value error, every k must lie in (0, 1]; got 0.0"),
    ({"fusion.ks": [1.5]}, "key 'ks': Value error, every k must lie in (0, 1]; got 1.5"),
    ({"fusion.ps": [0.5, 1.0]}, "key 'ps': Value error, every p must lie in [0, 1); got 1.0"),
    ({"fusion.ps": [-0.1]}, "key 'ps': Value error, every p must lie in [0, 1); got -0.1"),
    ({"fusion.lambdas": [0.0]}, "key 'lambdas': Value error, every λ must lie in (0, 2]"),
    ({"fusion.ks": [0.2, 0.2]}, "key 'ks': Value error, lists a k value twice"),
    ({"fusion.methods": ["ties", "median"]}, "key 'methods.1': Input should be 'average', 'task_arithmetic', 'ties', 'dare_linear' or 'dare_ties'"),
    ({"fusion.methods": ["ties", "ties"]}, "key 'methods': Value error, lists a merge method twice"),
    ({"fusion.methods": []}, "key 'methods': List should have at least 1 item"),
    ({"fusion.lora_space": "ab"}, "key 'lora_space': Input should be 'delta_w' or 'adapter'"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_PARAMS)
def test_bad_fusion_params_name_the_key_and_range(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ParamsError, match="^" + re.escape(f"--set: {message}")):  # a --set value is blamed on --set
        load_params(PARAMS, "tiny", overrides)


def test_shipped_profiles_run_every_method_they_list_with_small_grids() -> None:
    sizes = {}
    for profile in ("quick", "tiny", "full"):
        fp = load_params(PARAMS, profile).fusion
        grids = {"lam": fp.lambdas, "k": fp.ks, "p": fp.ps}
        sizes[profile] = sum(len(coefficient_grid(m, grids)) for m in fp.methods)
    assert sizes["tiny"] <= 8 and sizes["quick"] <= 16  # cheap: the quick profile used to score 7 points
    with pytest.raises(ParamsError, match="needs a non-empty grid for \\['k'\\]"):
        coefficient_grid("ties", {"lam": [1.0], "k": []})
