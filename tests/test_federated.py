"""Federated engine: FedAvg / FedProx math, payload filter, screening, missing clients, round loop, shards."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components.config import DataParams, load_params
from components.core.errors import ArtifactError, DataError, ParamsError
from components.data.datasets import TaskData, load_split
from components.federated import rounds as rounds_mod
from components.federated.aggregate import fedavg, proximal_term, screen, update_distance
from components.federated.client import ClientResult, client_update
from components.federated.payload import load_payload, payload_bytes, select_names, to_payload
from components.federated.rounds import Client, FederatedError, RoundReport, run_rounds
from components.federated.shards import read_shards, shard_data
from components.federated import simulate as simulate_mod
from components.federated.simulate import evaluator, simulate
from components.stages.data import prepare_data
from components.training.data import TensorDictDataset

PROJECT = Path(__file__).parents[1]


class MLP(nn.Module):
    """A frozen 'foundation' layer, a trainable body and a head: the key filter decides what travels."""

    def __init__(self, d: int = 4, h: int = 8, k: int = 2) -> None:
        super().__init__()
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.body = nn.Linear(d, h)
        self.head = nn.Linear(h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.frozen(x) + x)))


def mlp(seed: int = 0, **kw: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kw)


def payload_like(model: nn.Module, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in to_payload(model).items()}


def separable(n: int, d: int, seed: int) -> TaskData:
    """Labels = sign of a fixed linear function (w* from seed 0): linearly separable, balanced."""
    w = np.random.default_rng(0).normal(size=d)
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    y = (x @ w > 0).astype(np.int64)
    return TaskData("toy", "image", "binary", ["neg", "pos"], x, y)


def encode(inputs: np.ndarray) -> dict[str, torch.Tensor]:
    return {"x": torch.as_tensor(np.asarray(inputs, dtype=np.float32))}


def dataset(data: TaskData) -> TensorDictDataset:
    return TensorDictDataset(encode(data.inputs), torch.as_tensor(data.labels))


def fixed(payload: dict[str, torch.Tensor], n: int, loss: float = 0.5) -> Client:
    """A client that always answers ``payload`` (the aggregate is then known exactly)."""
    return Client(f"c{n}", n, lambda _p, _r: ClientResult(payload, n, loss, 0.0))


def failing(name: str) -> Client:
    def update(_p: dict, _r: int) -> ClientResult:
        raise RuntimeError("hospital offline")
    return Client(name, 5, update)


# --------------------------------------------------------------------------- FedAvg
def test_fedavg_weighted_mean_by_hand() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    out = fedavg([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 9) / 4, (2 + 18) / 4]))
    torch.testing.assert_close(out["b"], torch.tensor([3.0]))
    assert out["w"].dtype == torch.float32


def test_fedavg_one_client_and_equal_clients() -> None:
    u = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    for k, v in fedavg([u], [7]).items():
        torch.testing.assert_close(v, u[k])
    for k, v in fedavg([u, u, u], [1, 5, 9]).items():
        torch.testing.assert_close(v, u[k])


def test_fedavg_mismatch_names_the_clients() -> None:
    a, b = {"w": torch.zeros(2)}, {"v": torch.zeros(2)}
    with pytest.raises(ArtifactError, match="'h1' and 'h2'.*different keys"):
        fedavg([a, b], [1, 1], ["h1", "h2"])
    with pytest.raises(ArtifactError, match=r"'h1' and 'h2'.*'w': \(2,\) vs \(3,\)"):
        fedavg([a, {"w": torch.zeros(3)}], [1, 1], ["h1", "h2"])


# --------------------------------------------------------------------------- FedProx
def test_proximal_term_value_and_gradient_by_hand() -> None:
    model = mlp()
    glob = to_payload(model)
    with torch.no_grad():
        model.head.bias.add_(torch.tensor([1.0, -2.0]))
    term = proximal_term(model, glob, mu=0.5)
    assert term.item() == pytest.approx(0.5 / 2 * (1 + 4))
    term.backward()
    torch.testing.assert_close(model.head.bias.grad, 0.5 * torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(model.body.weight.grad, torch.zeros_like(model.body.weight))
    assert proximal_term(model, glob, mu=0.0).item() == 0.0
    with pytest.raises(ParamsError, match="mu=-1"):
        proximal_term(model, glob, mu=-1)


def test_fedprox_keeps_the_client_close_to_the_global_weights() -> None:
    model, data = mlp(), dataset(separable(64, 4, seed=1))
    glob = to_payload(model)
    dist = {}
    for mu in (0.0, 10.0):
        res = client_update(model, glob, data, "binary", epochs=5, batch_size=16, lr=0.05, mu=mu, seed=3)
        dist[mu] = update_distance(res.payload, glob)
    assert dist[10.0] < 0.5 * dist[0.0]


def test_client_update_is_deterministic_and_sends_counts_only() -> None:
    model, data = mlp(), dataset(separable(40, 4, seed=1))
    glob = to_payload(model)
    a = client_update(model, glob, data, "binary", epochs=2, batch_size=8, lr=0.01, seed=1)
    b = client_update(model, glob, data, "binary", epochs=2, batch_size=8, lr=0.01, seed=1)
    assert set(a.payload) == set(glob) and a.num_examples == 40 and np.isfinite(a.loss)
    for k in glob:
        torch.testing.assert_close(a.payload[k], b.payload[k], rtol=0, atol=0)
    assert not any(p.grad is not None for p in model.parameters())  # nothing left behind
    assert not model.frozen.weight.requires_grad and model.body.weight.requires_grad  # flags restored


# --------------------------------------------------------------------------- payload
def test_payload_key_filter_sends_selected_keys_in_fp32() -> None:
    model = mlp().to(torch.float64)
    assert set(to_payload(model)) == {"body.weight", "body.bias", "head.weight", "head.bias"}  # no frozen weight
    head = to_payload(model, ["head.*"])
    assert set(head) == {"head.weight", "head.bias"}
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in head.values())
    assert select_names(model, lambda n: n.endswith("bias")) == ["frozen.bias", "body.bias", "head.bias"]
    assert payload_bytes(head) == (2 * 8 + 2) * 4
    with pytest.raises(ParamsError, match="selects no parameter"):
        to_payload(model, ["lora_*"])


def test_load_payload_shape_and_key_errors() -> None:
    model = mlp()
    before = model.head.bias.detach().clone()
    with pytest.raises(ArtifactError, match=r"'head.weight' has shape \(3, 8\).*\(2, 8\)"):
        load_payload(model, {"head.bias": torch.ones(2), "head.weight": torch.zeros(3, 8)})
    torch.testing.assert_close(model.head.bias, before)  # nothing written by a bad payload
    with pytest.raises(ArtifactError, match="'decoder.weight' is not a parameter"):
        load_payload(model, {"decoder.weight": torch.zeros(1)})
    load_payload(model, {"head.bias": torch.ones(2, dtype=torch.float64)})
    torch.testing.assert_close(model.head.bias, torch.ones(2, requires_grad=True))


# --------------------------------------------------------------------------- screening and the round loop
def test_screen_reasons() -> None:
    ref = {"w": torch.zeros(4)}
    assert screen({"w": torch.ones(4)}, ref, max_norm=3.0) is None  # distance 2
    assert "non-finite" in screen({"w": torch.tensor([0.0, float("nan"), 0, 0])}, ref, None)
    assert "inf" in screen({"w": torch.tensor([0.0, float("inf"), 0, 0])}, ref, None)
    assert "exceeds max_norm=1" in screen({"w": torch.ones(4)}, ref, max_norm=1.0)
    assert "keys differ" in screen({"v": torch.ones(4)}, ref, None)


def test_failing_client_is_missing_and_the_round_completes() -> None:
    model = mlp()
    a, b = payload_like(model, 1.0), payload_like(model, 3.0)
    seen: list[RoundReport] = []
    run = run_rounds(model, [fixed(a, 10), failing("down"), fixed(b, 30)], rounds=1, min_clients=2,
                     on_round=seen.append, evaluate=lambda m: {"acc": 0.5})
    report = seen[0]
    assert report.accepted == ["c10", "c30"] and report.missing == {"down": "RuntimeError: hospital offline"}
    assert report.metrics == {"acc": 0.5} and report.rejected == {}
    assert report.bytes_down == payload_bytes(a)
    assert report.bytes_up == {"c10": payload_bytes(a), "c30": payload_bytes(b)}
    assert report.as_metrics()["val_acc"] == 0.5 and report.as_metrics()["clients_missing"] == 1
    for k, v in to_payload(model).items():
        torch.testing.assert_close(v, torch.full_like(v, 2.5))  # (10·1 + 30·3) / 40
        torch.testing.assert_close(run.payload[k], v)


def test_too_few_clients_fails_cleanly() -> None:
    model = mlp()
    before = to_payload(model)
    with pytest.raises(FederatedError, match=r"round 1: 1 of 3 clients.*min_clients=2.*hospital offline"):
        run_rounds(model, [fixed(payload_like(model, 1.0), 10), failing("x"), failing("y")], rounds=1,
                   min_clients=2)
    for k, v in to_payload(model).items():
        torch.testing.assert_close(v, before[k])  # no partial aggregate applied


def test_nan_and_far_updates_are_rejected_not_averaged() -> None:
    model = mlp()
    glob = to_payload(model)
    a = {k: v + 0.01 for k, v in glob.items()}
    b = {k: v - 0.02 for k, v in glob.items()}
    nan = {k: torch.full_like(v, float("nan")) for k, v in glob.items()}
    far = {k: v + 100.0 for k, v in glob.items()}
    clients = [fixed(a, 10), fixed(b, 20), fixed(nan, 30), fixed(far, 40)]
    run = run_rounds(model, clients, rounds=1, min_clients=2, max_norm=5.0)
    report = run.reports[0]
    assert report.accepted == ["c10", "c20"]
    assert "non-finite" in report.rejected["c30"] and "max_norm=5" in report.rejected["c40"]
    expected = fedavg([a, b], [10, 20])
    for k, v in run.payload.items():
        torch.testing.assert_close(v, expected[k])


def test_slow_client_is_missing_after_the_fact(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(rounds_mod, "perf_counter", lambda: clock[0])
    model = mlp()
    p = payload_like(model, 1.0)

    def slow(_p: dict, _r: int) -> ClientResult:
        clock[0] += 100.0  # a fake clock: no real waiting, no wall-clock assertion
        return ClientResult(payload_like(model, 9.0), 5, 0.1, 100.0)

    run = run_rounds(model, [fixed(p, 10), Client("slow", 5, slow)], rounds=1, timeout_s=10)
    assert "over timeout_s=10" in run.reports[0].missing["slow"]
    torch.testing.assert_close(run.payload["head.bias"], torch.ones(2))


def _join(name: str) -> None:
    """Wait for the engine's thread ``name`` to end (the tests release a hung client first)."""
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join(60)
            assert not thread.is_alive(), f"{name} did not end"


def test_a_hung_client_is_missing_and_skipped_until_its_update_ends() -> None:
    model = mlp()
    a, b, late = payload_like(model, 1.0), payload_like(model, 4.0), payload_like(model, 100.0)
    release = threading.Event()

    def hangs_in_round_1(_p: dict, round_: int) -> ClientResult:
        if round_ == 1:
            release.wait(120)  # hung until the test releases it (a safety bound, never reached when the test passes)
        return ClientResult(late, 5, 0.1, 0.0)

    calls = {"hung": 0}

    def counted(p: dict, round_: int) -> ClientResult:
        calls["hung"] += 1
        return hangs_in_round_1(p, round_)

    after_round_1: dict[str, torch.Tensor] = {}

    def between_rounds(report: RoundReport) -> None:
        if report.round == 1:
            after_round_1.update({k: v.clone() for k, v in to_payload(model).items()})
        if report.round == 2:  # let the round-1 update end before round 3
            release.set()
            _join("federated-hung-round-1")

    # 5 s: far above what the two instant clients take, and the only wait (the hung client is not called in round 2)
    try:
        run = run_rounds(model, [fixed(a, 10), fixed(b, 30), Client("hung", 5, counted)], rounds=3, min_clients=2,
                         timeout_s=5, on_round=between_rounds)
    finally:
        release.set()
    r1, r2, r3 = run.reports
    assert r1.accepted == r2.accepted == ["c10", "c30"]
    assert "no answer within timeout_s=5" in r1.missing["hung"]
    assert "still running its round-1 update" in r2.missing["hung"]
    assert calls["hung"] == 2  # rounds 1 and 3: not called while busy
    assert r3.accepted == ["c10", "c30", "hung"] and not r3.missing
    for k, v in fedavg([a, b], [10, 30]).items():  # round 1 averaged the two that answered
        torch.testing.assert_close(after_round_1[k], v)
    expected = fedavg([a, b, late], [10, 30, 5])  # round 3 took the released client again
    for k, v in run.payload.items():
        torch.testing.assert_close(v, expected[k])


def test_the_simulator_gives_each_client_its_own_model_under_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung simulated client's update is left running: it must not train the model the next client uses."""
    train = separable(90, 8, seed=1)
    parts = shard_data(train, [np.arange(0, 20), np.arange(20, 50), np.arange(50, 90)])
    real, used, release = simulate_mod.client_update, [], threading.Event()

    def update(worker: nn.Module, payload: dict, ds: TensorDictDataset, *args, **kwargs) -> ClientResult:
        used.append(id(worker))
        if len(ds) == 30:
            release.wait(120)  # the second client hangs (released at the end)
        return real(worker, payload, ds, *args, **kwargs)

    monkeypatch.setattr(simulate_mod, "client_update", update)
    release.set()  # first without a timeout (which also pays the first training call's start-up): nobody hangs
    simulate(lambda: MLP(d=8, h=16), parts, encode, rounds=1, lr=0.03, seed=0)
    assert len(set(used)) == 1  # the clients share one worker (no copies)
    used.clear()
    release.clear()
    try:  # 30 s: far above what the healthy clients' few batches take, waited once (round 2 skips the hung client)
        sim = simulate(lambda: MLP(d=8, h=16), parts, encode, rounds=2, lr=0.03, seed=0, min_clients=2, timeout_s=30)
    finally:
        release.set()
        _join("federated-client_1-round-1")
    assert [sorted(r.missing) for r in sim.reports] == [["client_1"], ["client_1"]]
    assert "still running its round-1 update" in sim.reports[1].missing["client_1"]
    assert len(set(used)) == 3  # three workers: the hung one trained its own


def test_bad_runs_are_refused() -> None:
    model = mlp()
    with pytest.raises(ParamsError, match="at least one client"):
        run_rounds(model, [], rounds=1)
    c = fixed(payload_like(model, 1.0), 10)
    with pytest.raises(ParamsError, match="min_clients=2"):
        run_rounds(model, [c], rounds=1, min_clients=2)
    with pytest.raises(ParamsError, match="unique"):
        run_rounds(model, [c, c], rounds=1)
    liar = Client("liar", 5, lambda _p, _r: ClientResult(payload_like(model, 1.0), 500, 0.1, 0.0))
    with pytest.raises(FederatedError, match="reported 500 examples"):
        run_rounds(model, [liar], rounds=1)


def test_federated_training_improves_validation_accuracy() -> None:
    train, val = separable(400, 8, seed=1), separable(200, 8, seed=2)
    shards = np.array_split(np.random.default_rng(0).permutation(400), 4)  # IID
    accs: list[float] = []
    sim = simulate(lambda: MLP(d=8, h=16), shard_data(train, shards), encode, rounds=3, epochs=2, batch_size=32,
                   lr=0.03, seed=0, val=val, on_round=lambda r: accs.append(r.metrics["accuracy"]))
    initial = evaluator(val, encode)(mlp(0, d=8, h=16))["accuracy"]  # simulate builds the model under the seed
    assert len(sim.reports) == 3 and all(len(r.accepted) == 4 for r in sim.reports)
    assert accs[-1] >= max(0.9, accs[0]) and accs[-1] > initial + 0.2
    assert set(sim.payload) == set(to_payload(sim.model))


# --------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def breast(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = load_params(PROJECT / "params").data
    fed = base.federation.model_copy(update={"num_clients": 3, "partition": "iid"})
    out = tmp_path_factory.mktemp("fed") / "data"
    prepare_data(DataParams(tasks=base.tasks, active=["breastmnist"], federation=fed), PROJECT, out, seed=0)
    return out


def test_read_shards_of_the_data_stage(breast: Path) -> None:
    shards = read_shards(breast, "breastmnist")
    train = load_split(breast, "breastmnist", "train")
    assert len(shards) == 3 and sorted(np.concatenate(shards).tolist()) == list(range(len(train)))
    parts = shard_data(train, shards)
    assert [len(p) for p in parts] == [len(s) for s in shards]
    np.testing.assert_array_equal(parts[1].labels, train.labels[shards[1]])
    sim = simulate(lambda: MLP(d=28 * 28, h=8), parts, pixels, rounds=1, lr=1e-3,
                   val=load_split(breast, "breastmnist", "val"))
    report = sim.reports[0]
    assert report.accepted == ["client_0", "client_1", "client_2"] and report.num_examples == {
        f"client_{i}": len(s) for i, s in enumerate(shards)}
    assert 0 <= report.metrics["accuracy"] <= 1


def pixels(images: np.ndarray) -> dict[str, torch.Tensor]:
    return {"x": torch.as_tensor(np.asarray(images).reshape(len(images), -1), dtype=torch.float32) / 255}


def write_shards(root: Path, body: object) -> Path:
    (root / "t").mkdir(parents=True, exist_ok=True)
    (root / "t" / "shards.json").write_text(body if isinstance(body, str) else json.dumps(body))
    return root


@pytest.mark.parametrize("body,match", [
    ("{not json", "is corrupt"),
    ({"mode": "iid"}, "no 'clients' list"),
    ({"clients": []}, "no clients"),
    ({"clients": [[0, 1], []]}, "client 1 has an empty shard"),
    ({"clients": [[0, 1], [1, 2]]}, "clients 0 and 1 share train index 1"),
    ({"clients": [[0, 0]]}, "client 0 lists train index 0"),
    ({"clients": [[0, 10]]}, "train index 10 outside the train split"),
    ({"clients": [[-1]]}, "train index -1 outside"),
    ({"clients": [[0.5, 1]]}, "not a list of integer"),
    ({"clients": [[True]]}, "not a list of integer"),
    ({"clients": ["abc"]}, "not a list of integer"),
])
def test_bad_shards_files(tmp_path: Path, body: object, match: str) -> None:
    with pytest.raises(DataError, match=match) as err:
        read_shards(write_shards(tmp_path, body), "t", train_size=10)
    assert "shards.json" in str(err.value)


def test_shards_file_missing_or_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"shards.json not found; run the data stage"):
        read_shards(tmp_path, "t", train_size=10)
    assert [len(s) for s in read_shards(write_shards(tmp_path, {"clients": [[0, 2], [1]]}), "t", 3)] == [2, 1]
    with pytest.raises(DataError, match="manifest.json not found"):
        read_shards(tmp_path, "t")  # the train size comes from the data stage's manifest


def test_local_settings_are_checked() -> None:
    model, data = mlp(), dataset(separable(8, 4, seed=1))
    with pytest.raises(ParamsError, match="lr=0"):
        client_update(model, to_payload(model), data, "binary", epochs=1, batch_size=4, lr=0)
    with pytest.raises(ParamsError, match="mu=nan"):
        client_update(model, to_payload(model), data, "binary", epochs=1, batch_size=4, lr=0.1, mu=float("nan"))


def test_a_flower_run_is_logged_to_mlflow_round_by_round(isolated_project: Path, tmp_path: Path) -> None:
    """`medexperts log-flower OUTPUT_DIR`: what a Flower ServerApp wrote (reports.json, payload.pt) becomes an MLflow
    run with one step per round; a folder without reports is one line, exit 2."""
    import dataclasses
    import json

    import mlflow
    import torch
    from typer.testing import CliRunner

    from components.federated.rounds import RoundReport
    from flows.cli import app

    folder = tmp_path / "flower-out"
    folder.mkdir()
    reports = [RoundReport(round=r, client_losses={"hospital_a": 0.9 / r, "hospital_b": 1.0 / r},
                           num_examples={"hospital_a": 48, "hospital_b": 64}, accepted=["hospital_a", "hospital_b"],
                           missing={} if r == 1 else {"node_3": "no reply within round-timeout=600s"}, rejected={},
                           metrics={"pubmedqa_macro_f1": 0.3 + 0.1 * r}, seconds={"clients": 2.0, "total": 2.5},
                           client_seconds={"hospital_a": 1.0, "hospital_b": 1.0}, bytes_down=1000,
                           bytes_up={"hospital_a": 1000, "hospital_b": 1000}) for r in (1, 2)]
    (folder / "reports.json").write_text(json.dumps([dataclasses.asdict(r) for r in reports]))
    torch.save({"w": torch.zeros(2)}, folder / "payload.pt")
    result = CliRunner().invoke(app, ["log-flower", str(folder)])
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient()
    run = client.search_runs([mlflow.get_experiment_by_name("medexperts").experiment_id],
                             filter_string="tags.driver = 'flower'")[0]
    history = client.get_metric_history(run.info.run_id, "round.val_pubmedqa_macro_f1")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 0.4), (2, 0.5)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "round.clients_missing")] == [0, 1]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"reports.json", "payload.pt"}
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = CliRunner().invoke(app, ["log-flower", str(empty)])
    assert bad.exit_code == 2 and "no round reports" in bad.output
