"""AT-MoE routing stage: frozen LoRA experts from the experts stage, per-layer grouped routers, the routed bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.config import load_params
from components.core.errors import ParamsError
from components.nn.foundation import describe_text_foundation
from components.stages.data import prepare_data
from components.stages.experts import ExpertsInputs, train_expert
from components.stages.routing import RoutingInputs, run

PROJECT = Path(__file__).resolve().parents[1]
TASKS = ["pubmedqa", "medical_abstracts"]


def params(tiny_bert: Path, **overrides: object):  # noqa: ANN201
    return load_params(PROJECT / "params", "tiny", {"foundation.text.source": str(tiny_bert), "data.active": TASKS,
                                                   "routing.trainer.max_epochs": 1, **overrides})


@pytest.fixture(scope="module")
def stage_inputs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data, text foundation and one LoRA expert per task, as the earlier stages write them."""
    root = tmp_path_factory.mktemp("routing")
    p = params(tiny_bert)
    prepare_data(p.data, PROJECT, root / "data", p.pipeline.seed)
    describe_text_foundation(p.foundation, PROJECT, root / "foundation" / "text")
    for task in TASKS:
        train_expert(task, ExpertsInputs.from_params(p), root / "data", root / "foundation", root / "experts" / task)
    return root


@pytest.mark.parametrize("router", ["grouped", "flat", "uniform"])
def test_routes_the_experts_and_deploys_a_bundle(stage_inputs: Path, tiny_bert: Path, tmp_path: Path,
                                                 router: str) -> None:
    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.experts.io import load_expert
    from components.nn.foundation import load_foundation
    from components.training.inference import batched

    groups = {"qa": ["pubmedqa"], "classification": ["medical_abstracts", "hoc"]}
    inp = RoutingInputs.from_params(params(tiny_bert, **{"routing.router": router, "routing.groups": groups,
                                                          "routing.general.enabled": False}))
    root = stage_inputs
    summary = run(inp, root / "data", root / "foundation", root / "experts", tmp_path / "out")
    assert summary.skipped is None and summary.experts == TASKS and summary.router == router
    assert summary.groups == {"qa": ["pubmedqa"], "classification": ["medical_abstracts"]}  # hoc is not active
    assert (summary.trainable_params > 0) == (router != "uniform")
    weights = __import__("json").loads((tmp_path / "out" / "routing_weights.json").read_text())
    for task in TASKS:
        per_layer = weights[task]
        assert len(per_layer) == 4  # query and value of the tiny BERT's 2 layers
        assert all(abs(sum(w) - 1) < 1e-5 for w in per_layer.values())
        assert (tmp_path / "out" / "plots" / f"routing_{task}.png").is_file()
    found = load_foundation(root / "foundation", "text")
    x = found.inputs(["Does aspirin prevent stroke in older adults?", "Colon adenocarcinoma with nodal spread."])
    bundle = load_bundle(tmp_path / "out" / "routed")
    routed = bundle.model.encoder
    for e, task in enumerate(TASKS):  # one-hot routing is that expert exactly (the oracle)
        routed.fixed = torch.nn.functional.one_hot(torch.tensor(e), len(TASKS)).float()
        expert = load_expert(root / "experts" / task, found)
        torch.testing.assert_close(batched(bundle.model.for_task(task), x), batched(expert.classifier(), x),
                                   atol=1e-5, rtol=1e-4)
    routed.fixed = None
    logits = batched(bundle.model.for_task("pubmedqa"), x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    last = routed.last_weights()  # the routing of the last request, per layer, for inspection
    assert len(last) == 4 and all(w.shape == (2, len(TASKS)) for w in last.values())
    if router == "uniform":
        assert all(torch.allclose(w, torch.full_like(w, 0.5)) for w in last.values())
    # a request's routing, as served (MLflow pyfunc / medexperts predict --routing)
    from components.tracking.pyfunc import predict_frame

    frame = predict_frame(bundle, ["Does aspirin prevent stroke?"], "pubmedqa", routing=True)
    route = __import__("json").loads(frame["routing"].iloc[0])
    assert set(route) == set(last) and all(abs(sum(w.values()) - 1) < 1e-5 for w in route.values())
    assert set(next(iter(route.values()))) == set(TASKS)
    # several texts of different lengths (scored shortest first): each row keeps its own routing
    texts = ["Does long-term low-dose aspirin prevent a first ischaemic stroke in adults over seventy?", "Stroke?",
             "Colon adenocarcinoma with nodal spread."]
    frame = predict_frame(bundle, texts, "pubmedqa", routing=True, batch_size=2)
    assert router == "uniform" or frame["routing"].nunique() == 3  # a learned router routes each text its own way
    for i, text in enumerate(texts):
        alone = predict_frame(bundle, [text], "pubmedqa", routing=True)
        got, want = (__import__("json").loads(f["routing"].iloc[j]) for f, j in ((frame, i), (alone, 0)))
        assert all(abs(got[layer][e] - want[layer][e]) < 1e-5 for layer in want for e in want[layer])


@pytest.mark.parametrize(("lam", "learn"), [(0.5, True), (1.0, False), (0.0, False)])
def test_general_adapter_is_trained_first_then_mixed(stage_inputs: Path, tiny_bert: Path, tmp_path: Path,
                                                     lam: float, learn: bool) -> None:
    """AT-MoE's option y = W0 h + λ·routed + (1 − λ)·general: λ = 1 is the routed experts alone (one-hot routing
    = the expert exactly), λ = 0 the general adapter alone (the routing no longer matters); learned λ moves."""
    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.experts.io import load_expert
    from components.moe.layers import molora_layers
    from components.nn.foundation import load_foundation
    from components.training.inference import batched

    root = stage_inputs
    general = {"enabled": True, "rank": 2, "lam": lam, "learn_lam": learn,
               "trainer": {"max_epochs": 1, "max_train_samples": 48, "batch_size": 16, "lr": 0.01}}
    inp = RoutingInputs.from_params(params(tiny_bert, **{"routing.general": general}))
    summary = run(inp, root / "data", root / "foundation", root / "experts", tmp_path / "out")
    assert set(summary.val_general) == set(TASKS) and summary.lam is not None
    bundle = load_bundle(tmp_path / "out" / "routed")
    assert bundle.manifest["general"] == {"rank": 2, "lam": summary.lam}
    routed = bundle.model.encoder
    layers = molora_layers(routed.encoder)
    assert all(layer.general_b.abs().sum() > 0 for layer in layers.values())  # the general adapter trained
    mixes = torch.stack([layer.mix for layer in layers.values()])
    if learn:
        assert 0 < summary.lam < 1 and not torch.allclose(mixes, torch.full_like(mixes, lam))  # λ trained
    else:
        assert torch.equal(mixes, torch.full_like(mixes, lam))
    found = load_foundation(root / "foundation", "text")
    x = found.inputs(["Does aspirin prevent stroke in older adults?", "Colon adenocarcinoma with nodal spread."])
    outputs = []
    for e, task in enumerate(TASKS):
        routed.fixed = torch.nn.functional.one_hot(torch.tensor(e), len(TASKS)).float()
        outputs.append(batched(routed, x))
        if lam == 1.0:
            expert = load_expert(root / "experts" / task, found)
            torch.testing.assert_close(batched(bundle.model.for_task(task), x), batched(expert.classifier(), x),
                                       atol=1e-5, rtol=1e-4)
    if lam == 0.0:
        torch.testing.assert_close(outputs[0], outputs[1])
    else:
        assert not torch.allclose(outputs[0], outputs[1])


@pytest.mark.parametrize("case", ["rank", "foundation"])
def test_experts_that_cannot_be_routed_together_are_refused_before_writing(stage_inputs: Path, tiny_bert: Path,
                                                                           tmp_path: Path, case: str) -> None:
    import json
    import shutil

    from components.core.errors import ArtifactError
    from components.moe.errors import MoEParamsError

    root = stage_inputs
    experts = tmp_path / "experts"
    shutil.copytree(root / "experts" / "pubmedqa", experts / "pubmedqa")
    if case == "rank":  # one expert of another LoRA rank
        other = params(tiny_bert, **{"experts.lora.rank": 4})
        train_expert("medical_abstracts", ExpertsInputs.from_params(other), root / "data", root / "foundation",
                     experts / "medical_abstracts")
        error, message = MoEParamsError, "experts must share their rank to be stacked; expert 0 has rank"
    else:  # one expert trained on another foundation
        shutil.copytree(root / "experts" / "medical_abstracts", experts / "medical_abstracts")
        manifest = experts / "medical_abstracts" / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "base_sha256": "0" * 64}))
        error, message = ArtifactError, "expert for task 'medical_abstracts' was trained on foundation 000000000000"
    with pytest.raises(error, match=__import__("re").escape(message)):
        run(RoutingInputs.from_params(params(tiny_bert)), root / "data", root / "foundation", experts,
            tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_skips_with_the_reason(stage_inputs: Path, tiny_bert: Path, tmp_path: Path) -> None:
    root = stage_inputs
    one = RoutingInputs.from_params(params(tiny_bert, **{"data.active": ["pubmedqa"]}))
    summary = run(one, root / "data", root / "foundation", root / "experts", tmp_path / "out")
    assert summary.skipped == "fewer than 2 active text tasks to route (['pubmedqa'])"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"routing.groups": {"qa": ["pubmedqa"], "x": ["nope"]}}, "routing.groups names ['nope'], which are not tasks"),
    ({"routing.groups": {"qa": ["pubmedqa"], "x": []}}, "group 'x' is empty"),
    ({"routing.groups": {"qa": ["pubmedqa"], "x": ["pubmedqa"]}}, "task 'pubmedqa' is in two groups"),
    ({"routing.groups": {"qa": ["pubmedqa"]}}, "active text task(s) ['medical_abstracts'] are in no group"),
    ({"routing.tau": 0}, "key 'tau': Input should be greater than 0"),
    ({"routing.general.lam": 1.0}, "lam=1.0 must lie in (0, 1) when it is learned"),
    ({"routing.general.lam": 1.5, "routing.general.learn_lam": False}, "lam=1.5 must lie in [0, 1]"),
    ({"routing.router": "topk"}, "key 'router': Input should be 'grouped', 'flat' or 'uniform'"),
])
def test_bad_routing_params_are_one_clear_error(tiny_bert: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=__import__("re").escape(message)):
        params(tiny_bert, **overrides)
