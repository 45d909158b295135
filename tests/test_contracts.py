"""The cross-stage contract is typed and checked: summaries, manifests, and the one door to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.core.artifacts import read_model, write_model
from components.core.errors import ArtifactError, TrackingError
from components.stages.experts import ExpertRun, ExpertsSummary
from components.stages.fusion import FusionSummary
from components.tracking import runs


def test_a_summary_round_trips_and_keeps_nan(tmp_path: Path) -> None:
    summary = ExpertsSummary(tasks={"t": ExpertRun(method="lora", val={"auroc": float("nan"), "macro_f1": 0.5},
                                                   probe_val={}, trainable_params=3, train_seconds=1.0)})
    write_model(tmp_path / "s.json", summary)
    back = read_model(tmp_path / "s.json", ExpertsSummary, "experts summary")
    assert back.tasks["t"].val["macro_f1"] == 0.5 and back.tasks["t"].val["auroc"] != back.tasks["t"].val["auroc"]


def test_a_summary_of_another_shape_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"tasks": {"t": {"val": {}}}}))
    with pytest.raises(ArtifactError, match=r"s\.json: experts summary does not match its schema \(tasks\.t\.method"):
        read_model(tmp_path / "s.json", ExpertsSummary, "experts summary")
    (tmp_path / "f.json").write_text(json.dumps({"skipped": "x", "bogus": 1}))
    with pytest.raises(ArtifactError, match="bogus"):
        read_model(tmp_path / "f.json", FusionSummary, "fusion summary")


@pytest.mark.parametrize("call", [
    lambda: runs.log_params({"a": 1}),
    lambda: runs.log_metrics({"a": 1.0}),
    lambda: runs.set_tags({"a": "b"}),
    lambda: runs.log_json({"a": 1}, "a.json"),
])
def test_logging_without_an_active_run_raises(call: object, mlflow_store: str) -> None:
    with pytest.raises(TrackingError, match="no active MLflow run"):
        call()  # type: ignore[operator]


def test_metrics_are_flattened_and_batched_in_one_run(mlflow_store: str) -> None:
    import mlflow

    with runs.run("r") as run_id:
        runs.log_metrics({"t": {"val": {"macro_f1": 0.5, "auroc": float("nan")}}, "n@5": 3, "flag": True})
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert metrics == {"t.val.macro_f1": 0.5, "n_at_5": 3.0}  # NaN and booleans are not metrics


def test_expert_manifest_is_checked_on_save_and_load(tmp_path: Path) -> None:
    import torch

    from components.config import LoraParams
    from components.experts.io import load_expert, save_expert
    from components.experts.lora import attach_lora
    from components.nn.encoders import ImageEncoder
    from components.nn.foundation import Foundation

    encoder = ImageEncoder([4, 8]).eval().requires_grad_(False)
    found = Foundation("image", encoder, "f" * 64, {"config": encoder.config})
    lp = LoraParams(rank=2, alpha=4, image_targets=["conv"])
    head = torch.nn.Linear(8, 2)
    with pytest.raises(ArtifactError, match=r"expert manifest does not match its schema \(method"):
        save_expert(tmp_path / "bad", attach_lora(encoder, lp, "image"), head, head,
                    {"task": "t", "method": "qlora", "base_sha256": found.sha256, "lora": lp.model_dump()})
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    save_expert(tmp_path / "e", attach_lora(encoder, lp, "image"), head, head,
                {"task": "t", "method": "lora", "base_sha256": found.sha256, "lora": lp.model_dump()})
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    manifest["lora"]["rank"] = "two"
    (tmp_path / "e" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"expert manifest does not match its schema \(lora\.rank"):
        load_expert(tmp_path / "e", found)


def test_the_sources_of_the_full_profile_are_logged(mlflow_store: str, tmp_path: Path) -> None:
    """The sources stage tags every input "<task>:<raw path>"; the optional tasks' raw paths hold
    ``${MEDEXPERTS_SHARED_DATA:-../shared/data}``, characters MLflow refuses in a name (this stopped the full
    profile at its first stage): the names are made valid, the hashes kept."""
    import mlflow

    from components.config import load_params
    from components.stages.sources import SourcesInputs, source_hashes
    from flows.stage_logs import log_sources

    project = Path(__file__).resolve().parents[1]
    inp = SourcesInputs.from_params(load_params(project / "params", "full"))
    summary = source_hashes(inp, project)
    assert any("${" in name for name in summary.data)
    with runs.run("sources") as run_id:
        log_sources(None, inp, summary, tmp_path)  # type: ignore[arg-type]  (the context is not read)
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    assert {runs.metric_key(f"source.data.{n}"): h for n, h in summary.data.items()}.items() <= tags.items()


def test_the_package_build_ships_every_package_of_the_project() -> None:
    """A wheel (not only an editable install) must hold every package: flows.stage_impl was once left out."""
    import tomllib

    from setuptools import find_packages

    project = Path(__file__).resolve().parents[1]
    include = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(str(project), include=include["include"]))
    on_disk = {p.parent.relative_to(project).as_posix().replace("/", ".")
               for top in ("components", "flows") for p in (project / top).rglob("__init__.py")}
    assert on_disk <= shipped, sorted(on_disk - shipped)
