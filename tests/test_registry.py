"""Promotion gate: pure decision table, then against a real (temporary) MLflow registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from components.core.errors import RegistryError
from components.bundle.format import TaskHead, save_bundle
from components.nn.classifier import make_head
from components.nn.encoders import ImageEncoder
from components.nn.foundation import Foundation
from components.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    aliases,
    champion,
    decide,
    gate,
    promote_manual,
    register_bundle,
    register_foundation,
)


@pytest.mark.parametrize(
    ("metric", "champion", "promoted"),
    [(0.6, None, True), (0.4, None, False), (0.71, 0.70, True), (0.704, 0.70, False), (0.65, 0.70, False)],
)
def test_decide(metric: float, champion: float | None, promoted: bool) -> None:
    ok, reason = decide(metric, champion, margin=0.005, floor=0.5)
    assert ok is promoted
    assert f"{metric:.4f}" in reason


def test_champion_without_metric_does_not_block() -> None:
    ok, _ = decide(0.6, float("nan"), margin=0.005, floor=0.5)
    assert ok


def bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    enc = ImageEncoder([4]).eval()
    found = Foundation("image", enc, "a" * 64, {"config": enc.config})
    save_bundle(tmp_path / "b", found, {}, {"t": TaskHead(make_head(4, 2), "binary", ["no", "yes"])}, "t", {})
    return tmp_path / "b"


def test_gate_moves_aliases_and_records(tmp_path: Path, mlflow_store: str) -> None:
    folder = bundle(tmp_path)
    with mlflow.start_run():
        # a lineage tag named after a site (a Flower client-id is the hospital's own string) is made an MLflow name
        v1 = register_bundle("m", folder, 0.70, {"git.commit": "x", "federated.shard.St. Mary's (Leeds)#1": "ab"})
        d1 = gate("m", v1, 0.70, margin=0.01, floor=0.5)
        assert mlflow.MlflowClient().get_model_version("m", v1).tags["federated.shard.St. Mary_s _Leeds__1"] == "ab"
        v2 = register_bundle("m", folder, 0.705, {})
        d2 = gate("m", v2, 0.705, margin=0.01, floor=0.5)
        v3 = register_bundle("m", folder, 0.80, {})
        d3 = gate("m", v3, 0.80, margin=0.01, floor=0.5)
    assert (d1.promoted, d2.promoted, d3.promoted) == (True, False, True)
    assert d2.champion_version == v1 and d2.champion_metric == pytest.approx(0.70)
    assert aliases("m") == {CHAMPION: v3, CHALLENGER: v3}
    client = mlflow.MlflowClient()
    assert client.get_model_version("m", v2).tags["promotion.decision"] == "challenger"
    history = [k for k in client.get_registered_model("m").tags if k.startswith("promotion.")]
    assert len(history) == 3  # every alias move is kept
    d = promote_manual("m", v2)
    assert d.champion_version == v3 and aliases("m")[CHAMPION] == v2
    # the run's registry table reads the live champion: v2 now, though the run's decision made v3 champion
    from rich.console import Console

    from flows.report import registry_table

    console = Console(record=True, width=300)
    console.print(registry_table({"cached": True, "decisions": [
        {"model": "m", "version": v3, "metric": 0.8, "promoted": True, "reason": "better"}]}))
    text = console.export_text()
    assert "nothing registered by this run" in " ".join(text.split())
    assert [line for line in text.splitlines() if line.startswith("│ m ")][0].split("│")[5].strip() == f"v{v2}"
    loaded = mlflow.pyfunc.load_model("models:/m@champion")
    import numpy as np

    frame = loaded.predict(np.zeros((3, 28, 28), dtype=np.uint8))
    assert list(frame["label"].unique())[0] in ("no", "yes") and len(frame) == 3


def test_unknown_model_or_version(mlflow_store: str) -> None:
    with pytest.raises(RegistryError, match=r"model 'nope' version 1 does not exist"):
        promote_manual("nope", "1")
    with pytest.raises(RegistryError, match=r"registered model 'nope' does not exist"):
        aliases("nope")


# --------------------------------------------------------------------------- transient registry failures
def _versions(name: str, n: int) -> list[str]:
    """A registered model with ``n`` versions (no artifacts: the gate only reads tags and aliases)."""
    client = mlflow.MlflowClient()
    client.create_registered_model(name)
    return [str(client.create_model_version(name, f"file:///nowhere/{i}").version) for i in range(n)]


def _fail(monkeypatch: pytest.MonkeyPatch, code: int, *methods: str) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise MlflowException("database is locked\n(sqlite3.OperationalError)", code)

    for method in methods:
        monkeypatch.setattr(mlflow.MlflowClient, method, boom)


@pytest.mark.parametrize("code", [TEMPORARILY_UNAVAILABLE, INTERNAL_ERROR])
def test_gate_moves_nothing_when_the_champion_cannot_be_read(mlflow_store: str, monkeypatch: pytest.MonkeyPatch,
                                                             code: int) -> None:
    (v1,) = _versions("m", 1)
    with monkeypatch.context() as m:  # both ways of reading an alias fail, as they would with a locked store
        _fail(m, code, "get_registered_model", "get_model_version_by_alias")
        with pytest.raises(RegistryError, match=r"registered model 'm'") as err:
            gate("m", v1, 0.9, margin=0.01, floor=0.5)
    assert "\n" not in str(err.value)
    assert aliases("m") == {}  # the first-model rule did not fire on a transient failure


def test_gate_keeps_the_champion_when_it_cannot_be_read(mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2 = _versions("m", 2)
    gate("m", v1, 0.70, margin=0.01, floor=0.5)
    with monkeypatch.context() as m:
        _fail(m, TEMPORARILY_UNAVAILABLE, "get_registered_model", "get_model_version_by_alias", "get_model_version")
        with pytest.raises(RegistryError, match="'m'"):
            gate("m", v2, 0.60, margin=0.01, floor=0.5)  # below the champion, above the floor
    assert aliases("m") == {CHAMPION: v1, CHALLENGER: v1}


def test_champion_absent_only_when_the_alias_is(mlflow_store: str) -> None:
    client = mlflow.MlflowClient()
    assert champion(client, "nope") is None  # no model, no champion
    (v1,) = _versions("m", 1)
    assert champion(client, "m") is None
    client.set_registered_model_alias("m", CHALLENGER, v1)
    assert champion(client, "m") is None
    client.set_model_version_tag("m", v1, "val_metric", "0.75")
    client.set_registered_model_alias("m", CHAMPION, v1)
    assert champion(client, "m") == (v1, pytest.approx(0.75))


def test_promote_manual_and_aliases_tell_failure_from_absence(mlflow_store: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2 = _versions("m", 2)
    gate("m", v1, 0.70, margin=0.01, floor=0.5)
    with monkeypatch.context() as m:
        _fail(m, INTERNAL_ERROR, "get_model_version")
        with pytest.raises(RegistryError, match=r"cannot read model 'm' version 2: INTERNAL_ERROR") as err:
            promote_manual("m", v2)
    assert "does not exist" not in str(err.value)
    with monkeypatch.context() as m:
        _fail(m, TEMPORARILY_UNAVAILABLE, "get_registered_model")
        with pytest.raises(RegistryError, match=r"registered model 'm': TEMPORARILY_UNAVAILABLE") as err:
            aliases("m")
    assert "does not exist" not in str(err.value)
    assert aliases("m") == {CHAMPION: v1, CHALLENGER: v1}  # the failed promotion moved nothing
    with monkeypatch.context() as m:  # a server's 404 is still "does not exist"
        _fail(m, RESOURCE_DOES_NOT_EXIST, "get_registered_model")
        with pytest.raises(RegistryError, match=r"registered model 'm' does not exist"):
            aliases("m")


# --------------------------------------------------------------------------- foundation registration
def _weights(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(content)
    (folder / "manifest.json").write_text("{}")
    return folder


def test_register_foundation_once_per_hash(tmp_path: Path, mlflow_store: str) -> None:
    a, b = _weights(tmp_path / "a", b"aaaa"), _weights(tmp_path / "b", b"bbbb")
    with mlflow.start_run() as run:
        v1 = register_foundation("f", a, "1" * 64)
        assert register_foundation("f", a, "1" * 64) == v1  # same weights: no new version
        v2 = register_foundation("f", b, "2" * 64)
    assert (v1, v2) == ("1", "2")
    client = mlflow.MlflowClient()
    assert client.get_registered_model("f").description == "MedExperts foundation model (frozen)"
    versions = {str(mv.version): mv for mv in client.search_model_versions("name='f'")}
    assert sorted(versions) == ["1", "2"] and versions["2"].tags["sha256"] == "2" * 64
    assert versions["1"].run_id == run.info.run_id
    logged = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "f")}
    assert logged == {"model.safetensors", "manifest.json"}
    with mlflow.start_run():  # a later run finds the version by its hash
        assert register_foundation("f", b, "2" * 64) == v2


def test_register_foundation_needs_a_run(tmp_path: Path, mlflow_store: str) -> None:
    with pytest.raises(RegistryError, match=r"foundation 'f' needs an active MLflow run"):
        register_foundation("f", _weights(tmp_path / "a", b"a"), "1" * 64)


def test_register_foundation_only_swallows_already_exists(tmp_path: Path, mlflow_store: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _fail(monkeypatch, TEMPORARILY_UNAVAILABLE, "create_registered_model")
    with mlflow.start_run() as run, pytest.raises(RegistryError, match=r"model 'f': TEMPORARILY_UNAVAILABLE"):
        register_foundation("f", _weights(tmp_path / "a", b"a"), "1" * 64)
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == []


def test_a_registration_cut_short_is_completed_not_duplicated(tmp_path: Path, mlflow_store: str) -> None:
    """kill -9 during promote: the version exists (created with its tags and promote fingerprint) but was never
    gated, or even lacks its file digest; the next promote with the same fingerprint finds it, finishes it and
    gates it instead of registering a duplicate; a finished one is reported as it was decided."""
    from components.tracking.registry import FILES_TAG, REGISTRATION_TAG, registered

    folder = bundle(tmp_path)
    client = mlflow.MlflowClient()
    assert registered("m", "fp1") is None
    with mlflow.start_run():
        v = register_bundle("m", folder, 0.7, {"git.commit": "x"}, registration="fp1")
    mv = client.get_model_version("m", v)
    assert mv.tags[REGISTRATION_TAG] == "fp1" and mv.tags["git.commit"] == "x" and mv.tags["val_metric"]
    client.delete_model_version_tag("m", v, FILES_TAG)  # killed before its last step
    assert registered("m", "fp1") == (v, None)  # found, not gated
    assert FILES_TAG in client.get_model_version("m", v).tags  # and finished
    d = gate("m", v, 0.7, margin=0.01, floor=0.5)
    again = registered("m", "fp1")
    assert again is not None and again[0] == v and again[1] == d
    assert registered("m", "other-fingerprint") is None
    assert len(client.search_model_versions("name='m'")) == 1


def test_a_tag_write_that_loses_an_insert_race_is_written_again() -> None:
    """Team mode: two runs gating one version write the same tags at once; PostgreSQL refuses the second insert."""
    from components.tracking.registry import _set_tag

    calls: list[tuple[str, ...]] = []

    def racing(*args: str) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise MlflowException("(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "
                                  '"model_version_tag_pk"')

    _set_tag(racing, "m", "2", "promotion.reason", "why")
    assert calls == [("m", "2", "promotion.reason", "why")] * 2

    def failing(*args: str) -> None:
        raise MlflowException("model not found", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException, match="not found"):  # any other failure is not retried
        _set_tag(failing, "m", "2", "k", "v")
