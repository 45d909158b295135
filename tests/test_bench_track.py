"""Benchmark results are logged to MLflow as runs: params, every number as a metric, the file, the figures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from bench.track import EXPERIMENT, log_result, main
from components.tracking.runs import metric_key

FUSION = {
    "params": {"tasks": ["pubmedqa", "hoc"], "val_cap": 40, "grids": {"fusion.lambdas": [0.3, 1.0]}},
    "results": {"llora": {"subsets": {"pubmedqa+hoc": {"ties": {"test_normalised": 1.02, "coefficients": {"lam": 0.6},
                                                                  "curve": [0.9, float("nan"), 1.0]}}}}},
    "table": {"lora": {"ties": {"all_tasks_normalised": 0.97}, "single_task_mean": 0.64},
              "llora": {"ties": {"all_tasks_normalised": 1.03}, "single_task_mean": 0.62}},
    "machine": {"git_commit": "abc123", "cpus": 2, "torch": "2.13.0+cpu"},
}


def test_metric_keys_keep_only_what_mlflow_accepts() -> None:
    assert metric_key("results.llora.subsets.pubmedqa+hoc.ties") == "results.llora.subsets.pubmedqa_hoc.ties"
    assert metric_key("ms@batch=1 (p50)") == "ms_at_batch_1 _p50_"


def test_log_result_records_params_metrics_file_and_figure(isolated_project: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    path = isolated_project / "fusion.json"
    path.write_text(json.dumps(FUSION))
    # As bench/pipeline.py leaves it: MLflow pointed at the flow's temporary store, the environment restored.
    store = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(f"sqlite:///{isolated_project / 'flow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run_id = log_result("fusion", FUSION, path)
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.data.params["val_cap"] == "40"
    assert run.data.params["grids.fusion.lambdas"] == "[0.3, 1.0]"
    metrics = run.data.metrics
    assert metrics["results.llora.subsets.pubmedqa_hoc.ties.test_normalised"] == pytest.approx(1.02)
    assert metrics["results.llora.subsets.pubmedqa_hoc.ties.curve.2"] == pytest.approx(1.0)
    assert "results.llora.subsets.pubmedqa_hoc.ties.curve.1" not in metrics  # NaN is not a number to log
    assert metrics["table.llora.ties.all_tasks_normalised"] == pytest.approx(1.03)
    assert not any(k.startswith(("machine", "params")) for k in metrics)
    assert run.data.tags["mlflow.source.git.commit"] == "abc123"
    assert run.data.tags["machine.cpus"] == "2"
    files = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"fusion.json", "plots/fusion_normalised.png"} <= files


def test_cli_names_a_missing_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["track.py", "no_such_bench"])
    with pytest.raises(SystemExit, match="no such benchmark result: .*no_such_bench.json"):
        main()
