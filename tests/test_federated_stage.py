"""The federated (FedKIM) stage on the data stage's real shards: clients, rounds, injection, held-out task."""

from __future__ import annotations

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

    p = params(tiny_bert, **{"federated.held_out": ["medical_abstracts"], "federated.rounds": 2})
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
    manifest = json.loads((tmp_path / "out" / "injected" / "manifest.json").read_text())
    assert manifest["kind"] == "fedkim" and manifest["rounds"] == 2 and len(manifest["clients"]) == 3
    model = load_for_evaluation(tmp_path / "out", tmp_path / "foundation")  # what evaluate scores on test
    test = load_split(tmp_path / "data", "medical_abstracts", "test").subset(16, 0)
    assert 0 <= evaluate_injected(model, {"medical_abstracts": test})["medical_abstracts"]["macro_f1"] <= 1


def test_skipped_without_a_text_foundation(tiny_bert: Path, tmp_path: Path) -> None:
    p = params(tiny_bert, **{"data.active": ["breastmnist"]})
    summary = run(FederatedInputs.from_params(p), tmp_path / "data", tmp_path / "foundation", tmp_path / "out")
    assert summary.skipped == "FedKIM injects into the text foundation; no text task is active"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"federated.held_out": ["hoc"]}, "federated.held_out lists ['hoc'], which are not active tasks"),
    ({"federated.held_out": TASKS}, "federated.held_out holds out every active task"),
    ({"federated.min_clients": 5}, "federated.min_clients (5) exceeds data.federation.num_clients (3)"),
    ({"federated.rounds": 0}, "key 'rounds': Input should be greater than or equal to 1"),
    ({"federated.client.mu": -1}, "key 'client.mu': Input should be greater than or equal to 0"),
])
def test_bad_federated_params_are_one_clear_error(tiny_bert: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(message)):
        params(tiny_bert, **overrides)
