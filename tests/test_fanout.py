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


def test_source_digest_names_the_code_on_disk(tmp_path: Path) -> None:
    import flows

    for rel, text in {"components/a.py": "x = 1\n", "flows/b.py": "y = 2\n", "components/notes.md": "-"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    before = flows.source_digest(tmp_path)
    (tmp_path / "components/notes.md").write_text("changed")  # not code
    (tmp_path / "components/.ipynb_checkpoints").mkdir()
    (tmp_path / "components/.ipynb_checkpoints/a-checkpoint.py").write_text("x = 0\n")  # not run either
    assert flows.source_digest(tmp_path) == before
    (tmp_path / "flows/b.py").write_text("y = 3\n")
    assert flows.source_digest(tmp_path) != before
    assert flows.LOADED_SOURCE == flows.source_digest()  # this process imported the checkout as it is


def test_workers_that_run_other_code_or_none_at_all_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    distributed = pytest.importorskip("distributed")
    import flows
    from components.core.errors import ParamsError
    from flows.fanout import check_workers

    with distributed.LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        check_workers(client, None)  # a fresh worker imports the code on disk: accepted

        def forget() -> None:  # on the worker: a flows module from before the check existed
            import sys

            del sys.modules["flows"].LOADED_SOURCE

        client.run(forget)
        with pytest.raises(ParamsError, match=r"1 worker\(s\) of the Dask cluster started for this run run other "
                                              r"code than this checkout's \(tcp://"):
            check_workers(client, None)
        client.restart()  # fresh worker processes
        check_workers(client, None)
        # the files change after the worker imported them (this process sees the new code on disk)
        monkeypatch.setattr(flows, "source_digest", lambda root=None: "0" * 64)
        with pytest.raises(ParamsError, match=r"1 worker\(s\) of the Dask cluster started for this run run other "
                                              r"code than this checkout's \(tcp://"):
            check_workers(client, None)
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with pytest.raises(ParamsError, match=r"no worker joined the Dask scheduler at tcp://x:8786 within 0.5 s: "
                                              r"start them \(`dask worker tcp://x:8786`\)"):
            check_workers(client, "tcp://x:8786", timeout=0.5)
