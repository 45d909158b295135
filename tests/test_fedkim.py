"""FedKIM on tiny models (CPU, seconds): client local models through the federated engine, injection of the
aggregated encoders into a frozen tiny BERT through M3OE, server training of only the added parts, held-out heads,
the no-injection baseline, save/load, and bad inputs refused with one clear error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from components.config import load_params
from components.core.errors import ArtifactError, DataError, ParamsError
from components.data.datasets import TaskData
from components.federated.clients import (
    ClientModel,
    TaskSpec,
    aggregate_client_models,
    build_client_model,
    client_updater,
    encode_shard,
    fedkim_clients,
    train_clients,
)
from components.federated.fedkim import (
    InjectedFoundation,
    build_injected,
    evaluate_injected,
    fit_head_on,
    fit_probe_heads,
    load_injected,
    mixed_loss,
    no_injection,
    save_injected,
    train_injected,
)
from components.federated.payload import to_payload
from components.moe.layers import molora_layers
from components.nn.foundation import Foundation, describe_text_foundation, load_foundation

PARAMS = Path(__file__).resolve().parents[1] / "params"
TASKS = {
    "xray": TaskSpec("image", "Detect pneumonia in a chest X-ray.", "chest X-ray image", 2, "binary"),
    "notes": TaskSpec("text", "Classify the disease category of a clinical abstract.", "clinical abstract text", 3,
                      "multiclass"),
    "codes": TaskSpec("text", "Tag the findings mentioned in a clinical note.", "clinical note text", 2,
                      "multilabel"),
}
HELD_OUT = TaskSpec("image", "Find a malignant lesion in a breast ultrasound.", "breast ultrasound image", 2, "binary")
WORDS = [["fever", "cough", "infection"], ["fracture", "bone", "cast"], ["tumour", "mass", "biopsy"]]


# --- tiny synthetic tasks: learnable, both classes present ---

def images(name: str, n: int, seed: int, where: str = "centre") -> TaskData:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.integers(0, 80, size=(n, 28, 28), dtype=np.uint8)
    rows, cols = (slice(10, 18), slice(10, 18)) if where == "centre" else (slice(0, 28), slice(0, 10))
    x[y == 1, rows, cols] = 220
    return TaskData(name, "image", "binary", ["no", "yes"], x, y.astype(np.int64))


def notes(n: int, seed: int) -> TaskData:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    texts = [" ".join(rng.choice(WORDS[c], size=4)) + " patient seen today" for c in y]
    return TaskData("notes", "text", "multiclass", ["infection", "trauma", "oncology"], texts, y.astype(np.int64))


def codes(n: int, seed: int) -> TaskData:
    rng = np.random.default_rng(seed)
    y = np.stack([np.arange(n) % 2, (np.arange(n) // 2) % 2], 1).astype(np.float32)
    texts = [" ".join((["fever"] if a else ["calm"]) + (["fracture"] if b else ["intact"]) + list(rng.choice(
        WORDS[2], size=2))) for a, b in y]
    return TaskData("codes", "text", "multilabel", ["fever", "fracture"], texts, y)


def split(n: int, seed: int) -> dict[str, TaskData]:
    return {"xray": images("xray", n, seed), "notes": notes(n, seed + 1), "codes": codes(n, seed + 2)}


def batch_of(model: InjectedFoundation, data: dict[str, TaskData]) -> dict[str, torch.Tensor]:
    ds = model.encode(data)
    return {**ds.inputs, "task_ids": ds.task_ids, "labels": ds.labels}


def inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def frozen_state(model: InjectedFoundation) -> dict[str, torch.Tensor]:
    """Foundation and client-encoder weights (the experts' factors excluded)."""
    state = model.state_dict()
    return {k: v for k, v in state.items() if k.startswith(("encoder.", "client_encoders."))
            and "expert_" not in k}


# --- fixtures ---

@pytest.fixture(scope="module")
def found(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Foundation:
    folder = tmp_path_factory.mktemp("fedkim-foundation")
    params = load_params(PARAMS, "tiny", {"foundation.text.source": str(tiny_bert)})
    describe_text_foundation(params.foundation, folder, folder / "foundation" / "text")
    return load_foundation(folder / "foundation", "text")


def client_model(found: Foundation, channels: tuple[int, ...] = (4, 8), seed: int = 0) -> ClientModel:
    return build_client_model(TASKS, teacher=found.encoder, image_channels=channels, embedding_rank=8,
                              max_positions=found.max_length, seed=seed)


def injected(found: Foundation, experts: int = 3, seed: int = 0) -> InjectedFoundation:
    return build_injected(found, client_model(found), TASKS, num_experts=experts, rank=2, alpha=4.0, seed=seed)


# --- clients ---

def test_a_client_trains_its_tasks_and_leaves_other_heads_alone(found: Foundation) -> None:
    model = client_model(found)
    tasks = encode_shard(model, {"xray": images("xray", 12, 1), "notes": notes(12, 2)},
                         tokenizer=found.tokenizer, max_length=found.max_length)
    glob = to_payload(model, lambda _: True)
    update = client_updater(model, tasks, index=0, epochs=1, batch_size=4, lr=1e-2, mu=0.1, seed=0)
    result = update(glob, 1)
    assert set(result.payload) == set(glob) and result.num_examples == 24 and np.isfinite(result.loss)
    moved = {k for k in glob if not torch.equal(glob[k], result.payload[k])}
    assert any(k.startswith("encoders.image.") for k in moved) and any(k.startswith("encoders.text.") for k in moved)
    assert {"heads.xray.weight", "heads.notes.weight"} <= moved
    assert not any(k.startswith("heads.codes.") for k in moved)  # this client does not hold 'codes'
    again = client_updater(model, tasks, index=0, epochs=1, batch_size=4, lr=1e-2, mu=0.1, seed=0)(glob, 1)
    assert all(torch.equal(again.payload[k], result.payload[k]) for k in glob)  # reproducible from its seeds


# --- injection ---

def test_server_training_moves_only_experts_gate_projections_and_heads(found: Foundation) -> None:
    before_foundation = digest(found.encoder.state_dict())
    model = injected(found)
    trainable = set(model.trainable_names())
    assert trainable and all("expert_a" in n or "expert_b" in n or n.startswith(("gate.", "project.", "heads."))
                             for n in trainable)
    assert any(n.startswith("gate.") for n in trainable)
    assert {"project.image.weight", "project.text.weight"} <= trainable
    targets = {n.rsplit(".", 1)[-1] for n in molora_layers(model.encoder.model)}
    assert len(molora_layers(model.encoder.model)) == 2 * 6 and targets == {"query", "key", "value", "dense"}

    batch = batch_of(model, split(6, 0))
    mixed_loss(model, batch).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable and {"gate.proj.weight", "project.image.weight", "project.text.weight",
                                       "heads.xray.weight", "heads.notes.weight", "heads.codes.weight"} <= with_grad
    model.zero_grad(set_to_none=True)

    frozen, start = digest(frozen_state(model)), model.trainable_state()
    metrics = train_injected(model, split(12, 1), epochs=2, batch_size=8, lr=1e-2, seed=0)
    assert np.isfinite(metrics["train_loss"])
    assert digest(frozen_state(model)) == frozen  # foundation and client encoders untouched
    assert digest(found.encoder.state_dict()) == before_foundation  # the caller's foundation too
    end = model.trainable_state()
    assert all(not torch.equal(start[n], end[n]) for n in end if "expert_b" in n or n.startswith("gate."))


def test_gate_weights_follow_the_descriptions(found: Foundation) -> None:
    tasks = {**TASKS, "xray_again": TASKS["xray"]._replace(modality_description="chest CT image")}
    model = build_injected(found, None, tasks, num_experts=4, rank=2, seed=0)
    ids = torch.tensor([0, 0, 1, 1, 0, 3])
    w = model.routing_weights(ids)
    assert w.shape == (6, 4) and torch.allclose(w.sum(-1), torch.ones(6))
    assert torch.equal(w[0], w[1]) and torch.equal(w[0], w[4]) and torch.equal(w[2], w[3])
    assert not torch.allclose(w[0], w[2], atol=1e-4)  # another task description
    # same task text, another modality description: other weights (by little at init: the query only steers the
    # attention over the task tokens, near uniform with a random tiny BERT's small embeddings)
    assert not torch.equal(w[0], w[5])
    data = {"xray": images("xray", 2, 0), "notes": notes(2, 0)}
    batch = batch_of(model, data)
    model.eval()(batch["task_ids"], **{k: v for k, v in batch.items() if k not in ("labels", "task_ids")})
    expected = model.routing_weights(batch["task_ids"]).detach()
    assert all(torch.equal(layer.last_weights, expected) for layer in molora_layers(model.encoder.model).values())


def test_extra_tokens_extend_the_mask_and_padding_changes_nothing(found: Foundation) -> None:
    model = injected(found).eval()
    seen: list[torch.Tensor] = []
    hook = model.encoder.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["attention_mask"].clone()), with_kwargs=True)
    batch = batch_of(model, {"xray": images("xray", 2, 0), "notes": notes(2, 0)})
    x = inputs_of(batch)
    out = model(**x)
    hook.remove()
    mask = seen[0]
    width = int(x["attention_mask"].sum(1).max())  # the batch runs without the padding no row uses
    assert width < found.max_length and mask.shape == (4, width + 1)
    assert torch.equal(mask[:, 1:], x["attention_mask"][:, :width]) and not x["attention_mask"][:, width:].any()
    assert bool((mask[:, 0] == 1).all())  # image rows: the image token; text rows: the client text token

    padded = x["attention_mask"] == 0
    assert bool(padded.any())
    ids = x["input_ids"].clone()
    ids[padded] = 1999  # another token where the mask is 0
    assert torch.allclose(model(**{**x, "input_ids": ids}), out, atol=1e-6)

    pixels = x["pixels"].clone()
    pixels[:] = 1.0  # image rows see new pixels; text rows' (zero) pixels are never read
    moved = model(**{**x, "pixels": pixels})
    image_rows = batch["task_ids"] == 0
    assert not torch.allclose(moved[image_rows], out[image_rows], atol=1e-5)
    assert torch.equal(moved[~image_rows], out[~image_rows])

    with torch.no_grad():
        model.project["text"].weight.mul_(2.0)  # the client text token reaches text rows only
    moved = model(**x)
    assert not torch.allclose(moved[~image_rows], out[~image_rows], atol=1e-5)
    assert torch.equal(moved[image_rows], out[image_rows])


def test_the_text_keeps_its_pretrained_positions_beside_the_extra_tokens(found: Foundation,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With the extra tokens masked out and the experts at zero, the injected model IS the foundation: the text
    keeps position ids 0..L-1 (the extra tokens sit after max_length). The layout of models saved before that
    (extra tokens first, the text shifted by one) is not, which is why it was changed."""
    batch = inputs_of(batch_of(no_injection(found, TASKS), {"notes": notes(4, 0)}))
    plain = found.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    outputs = {}
    for layout in ("after_text", "first"):
        model = build_injected(found, client_model(found), TASKS, num_experts=2, rank=2,
                               extra_positions=layout).eval()
        real = model._extra

        def masked(*args: Any, real: Any = real) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            tokens, mask, scores = real(*args)
            return tokens, torch.zeros_like(mask), scores

        monkeypatch.setattr(model, "_extra", masked)
        with torch.no_grad():
            outputs[layout] = model(**batch)
    assert torch.allclose(outputs["after_text"], plain, atol=1e-5)
    assert not torch.allclose(outputs["first"], plain, atol=1e-3)
    with pytest.raises(ParamsError, match="extra_positions='middle'"):
        build_injected(found, client_model(found), TASKS, extra_positions="middle")


def test_no_injection_is_the_foundation_with_heads(found: Foundation) -> None:
    model = no_injection(found, TASKS).eval()
    assert all(n.startswith("heads.") for n in model.trainable_names()) and not molora_layers(model.encoder.model)
    batch = batch_of(model, {"notes": notes(4, 0)})
    feats = model(**inputs_of(batch))
    plain = found.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.allclose(feats, plain, atol=1e-5)
    metrics = train_injected(model, split(12, 1), split(6, 2), epochs=1, batch_size=8, lr=1e-2)
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["val_notes_accuracy"])


def test_one_round_injection_and_server_training_end_to_end(found: Foundation) -> None:
    glob = client_model(found)
    shards = [{"xray": images("xray", 16, 10 + i), "notes": notes(16, 20 + i), "codes": codes(16, 30 + i)}
              for i in range(2)]
    shards[1] = {"xray": shards[1]["xray"], "notes": shards[1]["notes"]}  # a client without 'codes'
    reports = []
    run = train_clients(glob, shards, tokenizer=found.tokenizer, max_length=found.max_length, rounds=1, epochs=1,
                        batch_size=8, lr=1e-2, seed=0, val=split(8, 40), on_round=reports.append)
    assert len(reports) == 1 and reports[0].accepted == ["client_0", "client_1"]
    assert reports[0].num_examples == {"client_0": 48, "client_1": 32}
    assert np.isfinite(reports[0].metrics["xray_accuracy"])
    assert set(run.payload) == {n for n, _ in glob.named_parameters()}  # the whole local model travels

    model = build_injected(found, run.model, TASKS, num_experts=2, rank=2, alpha=4.0, seed=0)
    injected_conv = model.client_encoders["image"].blocks[0].conv.weight
    assert torch.equal(injected_conv, glob.encoders["image"].blocks[0].conv.weight)  # the aggregate, frozen
    assert not injected_conv.requires_grad and glob.encoders["image"].blocks[0].conv.weight.requires_grad
    epochs: list[int] = []
    metrics = train_injected(model, split(16, 50), split(8, 60), epochs=2, batch_size=8, lr=1e-2, seed=0,
                             on_epoch=lambda e, _m: epochs.append(e))
    assert epochs == [1, 2] and np.isfinite(metrics["train_loss"])
    scores = evaluate_injected(model, split(8, 70))
    assert set(scores) == set(TASKS)
    assert all(np.isfinite(scores[t][k]) for t in scores for k in ("accuracy", "macro_f1", "mcc"))

    head = fit_head_on(model, "breast", HELD_OUT, images("breast", 16, 80, "left"), images("breast", 8, 81, "left"),
                       shots=8, epochs=5)
    assert np.isfinite(head["train_loss"]) and np.isfinite(head["val_accuracy"])
    assert model.task_names == [*TASKS, "breast"]
    assert set(evaluate_injected(model, {"breast": images("breast", 4, 82, "left")})) == {"breast"}


def test_the_best_validation_epoch_is_kept_and_patience_stops(found: Foundation) -> None:
    from components.config import TrainerParams

    model = injected(found)
    seen: dict[int, dict[str, float]] = {}
    states: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        seen[epoch] = metrics
        states[epoch] = model.trainable_state()

    trainer = TrainerParams(max_epochs=6, batch_size=8, lr=5e-2, early_stopping_patience=2)
    start = evaluate_injected(model, split(8, 60))  # epoch 0, the untrained start, is a candidate too
    on_epoch(0, {f"val_{t}_{k}": v for t, m in start.items() for k, v in m.items()})
    metrics = train_injected(model, split(16, 50), split(8, 60), trainer=trainer, seed=0, monitor="macro_f1",
                             on_epoch=on_epoch)
    mean = {e: np.nanmean([m[f"val_{t}_macro_f1"] for t in TASKS]) for e, m in seen.items()}
    best = max(mean, key=lambda e: (mean[e], -e))  # the first epoch with the best score
    assert metrics["best_epoch"] == best and metrics["val_xray_macro_f1"] == seen[best]["val_xray_macro_f1"]
    assert all(torch.equal(v, states[best][k]) for k, v in model.trainable_state().items())  # its weights, restored
    last = max(seen)
    assert last == 6 or last - best == 2  # stopped after 2 epochs without improvement, or ran them all


def test_knowledge_preservation_keeps_the_text_tasks_near_the_reference(found: Foundation) -> None:
    from components.decompose.loss import distill_loss
    from components.federated.fedkim import PRESERVE_KEY, _reference_logits, injected_logits

    reference = no_injection(found, TASKS, seed=1)
    train = split(16, 50)
    # the reference against itself: the term is exactly zero, so the loss is the plain one
    batch = batch_of(reference, train)
    batch[PRESERVE_KEY] = _reference_logits(reference, train)
    assert (batch[PRESERVE_KEY][:16] == 0).all()  # the image rows carry no reference
    assert torch.allclose(mixed_loss(reference, batch, preserve=5.0), mixed_loss(reference, batch))

    def drift(preserve: float) -> float:
        model = injected(found)
        model.heads.load_state_dict(reference.heads.state_dict())
        train_injected(model, train, epochs=3, batch_size=8, lr=5e-2, seed=0, preserve=preserve, reference=reference)
        return sum(float(distill_loss(TASKS[t].kind, injected_logits(model, t, train[t]),
                                      injected_logits(reference, t, train[t]), 1.0)) for t in ("notes", "codes"))

    free, kept = drift(0.0), drift(20.0)
    assert kept < 0.5 * free, (kept, free)  # the text predictions stay near the reference's
    with pytest.raises(ParamsError, match="reference"):
        train_injected(injected(found), train, epochs=1, preserve=1.0)


def test_training_that_does_not_beat_the_start_on_validation_is_not_kept(found: Foundation,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import components.federated.fedkim as fedkim
    from components.config import TrainerParams

    model = injected(found)
    before = model.trainable_state()
    # validation that only gets worse after the start (scripted: a "wrecking" learning rate is not reliably worse
    # on a few rows, its outcome differs between CPUs), while the weights really train
    scores = iter([0.9, 0.5, 0.4])
    monkeypatch.setattr(fedkim, "evaluate_injected", lambda model, val: {t: {"macro_f1": next(scores)} for t in ["x"]})
    trained: list[dict[str, torch.Tensor]] = []
    metrics = train_injected(model, split(16, 50), split(8, 60), seed=0, monitor="macro_f1",
                             trainer=TrainerParams(max_epochs=2, batch_size=8, lr=1e-2),
                             on_epoch=lambda epoch, m: trained.append(model.trainable_state()))
    assert metrics["best_epoch"] == 0 and metrics["val_x_macro_f1"] == 0.9
    assert not all(torch.equal(v, before[k]) for k, v in trained[-1].items())  # the weights did train
    assert all(torch.equal(v, before[k]) for k, v in model.trainable_state().items())  # the start, restored
    assert next(scores, None) is None  # the start and both epochs were scored


def test_probe_heads_are_the_experts_probe_on_the_frozen_features(found: Foundation) -> None:
    from components.config import ProbeParams
    from components.federated.fedkim import task_features
    from components.training.probe import fit_probe

    model = no_injection(found, {t: TASKS[t] for t in ("notes", "codes")})
    train, val = split(24, 90), split(12, 91)
    train, val = {t: train[t] for t in ("notes", "codes")}, {t: val[t] for t in ("notes", "codes")}
    pp = ProbeParams(epochs=200)
    scores = fit_probe_heads(model, train, val, pp, "macro_f1", seed=0)
    x, y = task_features(model, "notes", train["notes"])
    xv, yv = task_features(model, "notes", val["notes"])
    head, expected = fit_probe((x, y), (xv, yv), "multiclass", 3, pp, "macro_f1", 0)
    assert torch.equal(model.heads["notes"].weight, head.weight) and scores["notes"]["macro_f1"] == expected["macro_f1"]
    assert evaluate_injected(model, {"notes": val["notes"]})["notes"]["macro_f1"] == pytest.approx(
        expected["macro_f1"])
    with pytest.raises(DataError, match="no validation rows"):
        fit_probe_heads(model, train, {"notes": val["notes"]}, pp, "macro_f1")


def test_save_then_load_reproduces_the_outputs(found: Foundation, tmp_path: Path) -> None:
    model = injected(found)
    train_injected(model, split(8, 1), epochs=1, batch_size=8, lr=1e-2)
    fit_head_on(model, "breast", HELD_OUT, images("breast", 8, 3, "left"), epochs=2)
    manifest = save_injected(model, tmp_path / "fedkim", {"stage": "federated"})
    assert manifest["kind"] == "fedkim" and manifest["stage"] == "federated"
    loaded = load_injected(tmp_path / "fedkim", found)
    assert loaded.task_names == model.task_names
    data = {**split(4, 5), "breast": images("breast", 4, 6, "left")}
    batch = inputs_of(batch_of(model, data))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch), model.eval()(**batch))
        assert torch.equal(loaded.heads["breast"].weight, model.heads["breast"].weight)

    assert loaded.extra_positions == "after_text"
    # a model saved before the extra tokens' positions were a setting: they came first; it loads that way
    path = tmp_path / "fedkim" / "manifest.json"
    old = json.loads(path.read_text())
    del old["config"]["extra_positions"]
    path.write_text(json.dumps(old))
    assert load_injected(tmp_path / "fedkim", found).extra_positions == "first"

    other = Foundation("text", found.encoder, "0" * 64, found.spec, found.tokenizer, found.max_length)
    with pytest.raises(ArtifactError, match="sha256"):
        load_injected(tmp_path / "fedkim", other)
    (tmp_path / "fedkim" / "injected.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ArtifactError, match="injected.safetensors"):
        load_injected(tmp_path / "fedkim", found)


def test_no_experts_but_client_encoders_is_a_valid_ablation(found: Foundation, tmp_path: Path) -> None:
    model = injected(found, experts=0)
    assert model.gate is None and not molora_layers(model.encoder.model)
    assert {n.split(".")[0] for n in model.trainable_names()} == {"project", "heads"}
    train_injected(model, split(8, 1), epochs=1, batch_size=8, lr=1e-2)
    save_injected(model, tmp_path / "e0")
    batch = inputs_of(batch_of(model, split(3, 2)))
    with torch.no_grad():
        assert torch.equal(load_injected(tmp_path / "e0", found).eval()(**batch), model.eval()(**batch))


# --- bad inputs: one clear error each ---

def _unknown_task_shard(found: Foundation) -> Any:
    return fedkim_clients(client_model(found), [{"xray": images("xray", 4, 0)}, {"ultrasound": images("u", 4, 1)}],
                          tokenizer=found.tokenizer)


def _mismatched_clients(found: Foundation) -> Any:
    glob = client_model(found)
    workers = [client_model(found), client_model(found, channels=(4, 16))]
    shards = [{"xray": images("xray", 4, i)} for i in range(2)]
    return train_clients(glob, shards, tokenizer=found.tokenizer, workers=workers)


def _mismatched_aggregate(found: Foundation) -> Any:
    return aggregate_client_models([client_model(found), client_model(found, channels=(4, 16))], [3, 4])


def _server_unknown_task(found: Foundation) -> Any:
    return build_injected(found, None, TASKS, num_experts=0).encode({"ultrasound": images("ultrasound", 4, 0)})


def _held_out_twice(found: Foundation) -> Any:
    return fit_head_on(build_injected(found, None, TASKS, num_experts=0), "xray", HELD_OUT, images("xray", 4, 0))


CASES = {
    "shard task unknown to the server": (_unknown_task_shard, DataError, r"client_1.*'ultrasound'.*does not know"),
    "client models of other shapes": (_mismatched_clients, ArtifactError, r"client_1.*encoders\.image.*shape"),
    "aggregating other shapes": (_mismatched_aggregate, ArtifactError, r"client_0.*client_1.*shape"),
    "zero clients": (lambda f: train_clients(client_model(f), [], tokenizer=f.tokenizer), ParamsError,
                     "at least one client"),
    "zero models to aggregate": (lambda f: aggregate_client_models([], []), ParamsError, "at least one client"),
    "bad task kind": (lambda f: build_injected(f, None, {"t": ("text", "d", "m", 3, "regression")}), ParamsError,
                      "kind 'regression'"),
    "binary with three labels": (lambda f: build_injected(f, None, {"t": ("text", "d", "m", 3, "binary")}),
                                 ParamsError, "binary task has 2 labels"),
    "unknown client modality": (lambda f: build_injected(f, {"audio": torch.nn.Linear(2, 2)}, TASKS), ParamsError,
                                "'audio'"),
    "server split of an unknown task": (_server_unknown_task, DataError, "unknown task 'ultrasound'"),
    "held-out name already taken": (_held_out_twice, ParamsError, "'xray' is already a task"),
    "too long for the positions": (lambda f: build_injected(f, client_model(f), TASKS, max_length=64), ParamsError,
                                   "exceeds the foundation's 64 positions"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_raise_one_clear_error(case: str, found: Foundation) -> None:
    call, error, message = CASES[case]
    with pytest.raises(error, match=message):
        call(found)


def test_fasttext_clients_train_at_their_own_rate_and_their_encoder_is_injected_and_reloaded(
        found: Foundation, tmp_path: Path) -> None:
    model = build_client_model(TASKS, teacher=found.encoder, image_channels=(4, 8), text_encoder="ngram",
                               ngram_buckets=64, ngram_dim=8, seed=0)
    text = model.encoders["text"]
    assert type(text).__name__ == "NgramTextEncoder" and text.vocab_size == found.encoder.model.config.vocab_size
    tasks = encode_shard(model, {"xray": images("xray", 12, 1), "notes": notes(12, 2)},
                         tokenizer=found.tokenizer, max_length=found.max_length)
    glob = to_payload(model, lambda _: True)

    def update(**kw: Any) -> dict[str, torch.Tensor]:
        return client_updater(model, tasks, index=0, epochs=1, batch_size=4, seed=0, **kw)(glob, 1).payload

    slow, fast, text_only = update(lr=1e-3), update(lr=1e-3, text_lr=1e-1), update(lr=1e-1)
    for key in glob:  # the text task trains at text_lr, the image task at lr
        reference = text_only if key.startswith(("encoders.text.", "heads.notes.")) else slow
        assert torch.equal(fast[key], reference[key]), key
    assert not torch.equal(fast["encoders.text.embedding.weight"], slow["encoders.text.embedding.weight"])

    run = train_clients(model, [{"xray": images("xray", 16, 3), "notes": notes(16, 4), "codes": codes(16, 5)}],
                        tokenizer=found.tokenizer, max_length=found.max_length, rounds=1, batch_size=8, lr=1e-2,
                        text_lr=1e-1, seed=0)
    injected_model = build_injected(found, run.model, TASKS, num_experts=2, rank=2, alpha=4.0, seed=0)
    train_injected(injected_model, split(8, 1), epochs=1, batch_size=8, lr=1e-2)
    save_injected(injected_model, tmp_path / "fedkim", {"stage": "federated"})
    loaded = load_injected(tmp_path / "fedkim", found)
    assert type(loaded.client_encoders["text"]).__name__ == "NgramTextEncoder"
    batch = inputs_of(batch_of(injected_model, split(4, 5)))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch), injected_model.eval()(**batch))
    with pytest.raises(ParamsError, match="text_encoder='gpt'"):
        build_client_model(TASKS, teacher=found.encoder, text_encoder="gpt")


def test_client_heads_log_probabilities_join_the_feature_and_are_saved(found: Foundation, tmp_path: Path) -> None:
    """With client heads the injected heads read [pooled feature, the sample's client log-probabilities]: exactly
    the aggregated client model's prediction of its own task (zero-padded; zeros for a task without a client head),
    frozen, saved and reloaded; a model saved before client heads existed loads without them."""
    clients = client_model(found).eval()  # no dropout: the reference predictions below are deterministic
    heads = {t: clients.heads[t] for t in ("xray", "notes")}  # "codes" without one
    model = build_injected(found, clients, TASKS, num_experts=2, rank=2, client_heads=heads, seed=0)
    plain = build_injected(found, clients, TASKS, num_experts=2, rank=2, seed=0)
    assert model.client_width == 3 and model.feature_dim == model.dim + 3 and plain.feature_dim == plain.dim
    assert all(h.in_features == model.feature_dim for h in model.heads.values())
    assert not any(n.startswith("client_heads.") for n in model.trainable_names())
    data = split(6, 1)
    batch = inputs_of(batch_of(model, data))
    with torch.no_grad():
        feats = model.eval()(**batch)
        assert torch.allclose(feats[:, :model.dim], plain.eval()(**batch), atol=1e-6)  # the pooled part unchanged
        rows = {t: batch["task_ids"] == model.task_index(t) for t in TASKS}
        one = batch_of(model, {"xray": data["xray"]})
        xray = clients("xray", "image", pixels=one["pixels"]).log_softmax(-1)
        assert torch.allclose(feats[rows["xray"], model.dim:model.dim + 2], xray, atol=1e-6)
        text = batch_of(model, {"notes": data["notes"]})
        notes_lp = clients("notes", "text", input_ids=text["input_ids"],
                           attention_mask=text["attention_mask"]).log_softmax(-1)
        assert torch.allclose(feats[rows["notes"], model.dim:], notes_lp, atol=1e-6)
        assert not feats[rows["xray"], -1].any() and not feats[rows["codes"], model.dim:].any()
    before = {k: v.clone() for k, v in model.client_heads.state_dict().items()}
    train_injected(model, split(8, 2), epochs=1, batch_size=8, lr=1e-2)
    assert all(torch.equal(before[k], v) for k, v in model.client_heads.state_dict().items())
    fit_head_on(model, "breast", HELD_OUT, images("breast", 8, 3, "left"), epochs=2)
    assert model.heads["breast"].in_features == model.feature_dim

    save_injected(model, tmp_path / "fedkim")
    loaded = load_injected(tmp_path / "fedkim", found)
    assert list(loaded.client_heads) == ["xray", "notes"]
    mixed = inputs_of(batch_of(model, {**split(4, 5), "breast": images("breast", 4, 6, "left")}))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**mixed), model.eval()(**mixed))
    save_injected(plain, tmp_path / "old")  # saved before the setting existed: no "client_heads" key
    path = tmp_path / "old" / "manifest.json"
    old = json.loads(path.read_text())
    del old["config"]["client_heads"]
    path.write_text(json.dumps(old))
    assert not len(load_injected(tmp_path / "old", found).client_heads)

    with pytest.raises(ParamsError, match="'breast', which is not a task"):
        build_injected(found, clients, TASKS, client_heads={"breast": clients.heads["xray"]})
    with pytest.raises(ParamsError, match="client head of task 'notes' must be a Linear"):
        build_injected(found, clients, TASKS, client_heads={"notes": clients.heads["xray"]})
    with pytest.raises(ParamsError, match="no client image encoder"):
        build_injected(found, {"text": clients.encoders["text"]}, TASKS, client_heads={"xray": clients.heads["xray"]})
