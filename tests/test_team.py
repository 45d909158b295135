"""Team mode: PostgreSQL + an MLflow tracking server with proxied artifacts + the Prefect server on PostgreSQL;
the tiny pipeline against them, checked through MLflow's REST API; then two pipelines at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flows.team import postgres_bin, start_team, stop_team

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]
MODELS = ("medexperts-pubmedqa", "medexperts-fused-text")


def _api(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


def _run(env: dict[str, str], artifacts: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [str(Path(sys.executable).parent / "medexperts"), "run", "--profile", "tiny", *extra]
    return subprocess.Popen(cmd, cwd=PROJECT, env={**env, "MEDEXPERTS_ARTIFACTS_DIR": str(artifacts)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_team_mode_runs_pipelines_against_postgres_backed_servers(tmp_path: Path, tiny_bert: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        postgres_bin()
    except Exception as exc:  # noqa: BLE001 -- no PostgreSQL on this machine: say so, visibly
        pytest.skip(str(exc))
    # not under pytest's private tmp folder: started by root, PostgreSQL runs as `postgres`, which must reach it
    team = Path(tempfile.mkdtemp(prefix="medexperts-team-", dir="/tmp" if os.geteuid() == 0 else None))
    monkeypatch.setenv("MEDEXPERTS_TEAM_DIR", str(team))
    started: list[subprocess.Popen[str]] = []
    try:
        state = start_team(PROJECT, 0, 0, 0)
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("MEDEXPERTS_", "PREFECT_", "MLFLOW_"))}
        env = {**keep, "MEDEXPERTS_PROJECT_DIR": str(PROJECT), "MLFLOW_TRACKING_URI": state.tracking_uri,
               "PREFECT_API_URL": state.prefect_api_url, "PREFECT_HOME": str(tmp_path / "prefect-client")}
        sets = ["--set", f"foundation.text.source={tiny_bert}", "--set", "registry.floor=0.0"]

        first = _run(env, tmp_path / "a", *sets)
        started.append(first)
        out, _ = first.communicate(timeout=1800)
        assert first.returncode == 0, out[-3000:]
        base = state.tracking_uri
        exp = _api(base, "experiments/get-by-name?experiment_name=medexperts")["experiment"]
        assert exp["artifact_location"].startswith("mlflow-artifacts:")  # proxied: stored by the server
        found = _api(base, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 500})["runs"]
        names = {r["info"]["run_name"]: r for r in found}
        assert {"retrain:tiny", "stage:experts", "expert:pubmedqa", "stage:promote"} <= set(names)
        assert all(r["info"]["status"] == "FINISHED" for r in found)
        datasets = names["stage:data"]["inputs"]["dataset_inputs"]
        assert any(d["dataset"]["name"] == "pubmedqa/test" for d in datasets)
        assert list((team / "artifacts").rglob("MLmodel"))  # the models' files went through the server
        for model in MODELS:
            q = urllib.parse.urlencode({"name": model, "alias": "champion"})
            assert _api(base, f"registered-models/alias?{q}")["model_version"]["status"] == "READY"

        # two pipelines at once (two checkouts' artifacts, one team), on other outputs than the first (another seed)
        # and the same as each other: both promote the same models at the same moment; both finish, and the
        # registry keeps one version per promoted output, every alias on a live version
        both = [_run(env, tmp_path / side, *sets, "--set", "pipeline.seed=7") for side in ("b", "c")]
        started += both
        outs = [p.communicate(timeout=1800)[0] for p in both]
        for proc, text in zip(both, outs, strict=True):
            assert proc.returncode == 0, text[-3000:]
        for model in MODELS:
            q = urllib.parse.urlencode({"filter": f"name='{model}'"})
            versions = _api(base, f"model-versions/search?{q}")["model_versions"]
            fingerprints = [next((t["value"] for t in v.get("tags", []) if t["key"] == "registration.fingerprint"),
                                 None) for v in versions]
            assert len(fingerprints) == len(set(fingerprints)), (model, fingerprints)  # no duplicate version
            live = {v["version"] for v in versions}
            aliases = _api(base, f"registered-models/get?{urllib.parse.urlencode({'name': model})}")[
                "registered_model"].get("aliases", [])
            assert aliases and all(a["version"] in live for a in aliases), (model, aliases, live)

        # Prefect kept its flow runs in PostgreSQL
        import psycopg2

        from flows.team import database_url

        with psycopg2.connect(database_url(state, team, "prefect")) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")
            assert cur.fetchone()[0] >= 3
    finally:
        for proc in started:  # a run still going after a failure or a time-out must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stop_team(PROJECT)
        shutil.rmtree(team, ignore_errors=True)
