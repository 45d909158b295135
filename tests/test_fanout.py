"""Fan-out on Prefect's DaskTaskRunner: the same experts, byte for byte, as the in-process run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from flows.retrain import waves
from flows.stages import ORDER

STAGES = ["sources", "data", "foundation", "experts", "federated"]


def test_waves_put_side_by_side_only_stages_that_do_not_need_each_other() -> None:
    assert waves(list(ORDER)) == [["sources"], ["data"], ["foundation"], ["experts", "federated"],
                                  ["decompose", "routing", "fusion"], ["evaluate"], ["promote"]]
    assert waves(["experts", "routing"]) == [["experts"], ["routing"]]


def _experts(artifacts: Path) -> dict[str, tuple[dict[str, str], dict[str, float]]]:
    """Per task: the sha256 of every file of the expert (adapter, heads, deployable bundle; from its manifest) and
    its validation metrics."""
    found = {}
    for manifest in sorted((artifacts / "experts").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        found[m["task"]] = (m["files"], m["metrics"]["val"])
    return found


def _differences(a: object, b: object, where: str = "") -> list[str]:
    """The paths at which two JSON trees differ (for the assertion message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _results(path: Path) -> object:
    """A stage summary without what differs between any two runs: timings (FedKIM's rounds: ``seconds_*``),
    memory peaks, MLflow run ids."""
    def strip(tree: object) -> object:
        if isinstance(tree, dict):
            return {k: strip(v) for k, v in tree.items()
                    if not (k.endswith(("seconds", "memory_mb")) or k.startswith("seconds_") or k == "run_id")}
        if isinstance(tree, list):
            return [strip(v) for v in tree]
        return tree

    return strip(json.loads(path.read_text()))


@pytest.mark.slow
def test_a_two_worker_local_cluster_gives_byte_identical_experts(isolated_project: Path, tiny_bert: Path,
                                                                 prefect_server: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("prefect_dask")
    from flows.retrain import retrain

    overrides = {"foundation.text.source": str(tiny_bert), "pipeline.runner.torch_threads": 1}
    monkeypatch.setenv("MEDEXPERTS_ARTIFACTS_DIR", str(isolated_project / "local"))
    retrain(profile="tiny", overrides=overrides, stages=STAGES)
    monkeypatch.setenv("MEDEXPERTS_ARTIFACTS_DIR", str(isolated_project / "dask"))
    results = retrain(profile="tiny", overrides={**overrides, "pipeline.runner.kind": "dask",
                                                 "pipeline.runner.workers": 2}, stages=STAGES)

    local, dask = _experts(isolated_project / "local"), _experts(isolated_project / "dask")
    assert len(local) == 4 and local == dask  # the same files (sha256) and the same validation metrics
    for name in ("federated", "experts"):  # federated ran on a worker beside the experts: the same summary
        a, b = (_results((isolated_project / side / name / "_summary.json")) for side in ("local", "dask"))
        assert a == b, (name, _differences(a, b))
    # the expert runs made on the workers are children of the dask run's experts stage, in the same experiment
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("medexperts").experiment_id
    parent = results["run_id"]
    stage_runs = {r.info.run_name: r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")}
    assert set(stage_runs) == {f"stage:{s}" for s in STAGES}
    experts = client.search_runs([exp], f"tags.mlflow.parentRunId = '{stage_runs['stage:experts'].info.run_id}'")
    assert sorted(r.info.run_name for r in experts) == sorted(f"expert:{t}" for t in local)
    assert all(r.info.status == "FINISHED" for r in [*experts, *stage_runs.values()])
