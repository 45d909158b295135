"""`dvc repro` drives the same stages: a second repro does nothing; a changed param re-runs its dependents."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.common import tiny_project_copy

pytestmark = pytest.mark.slow


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def stage_fingerprints(repo: Path) -> dict[str, str]:
    out = {}
    for stage_file in sorted((repo / "artifacts").glob("*/_stage.json")):
        out[stage_file.parent.name] = json.loads(stage_file.read_text())["fingerprint"]
    return out


def test_prefect_and_dvc_agree(tmp_path: Path, tiny_bert: Path, prefect_server: str) -> None:
    """A Prefect run leaves DVC nothing to do; after a param change both drivers re-run exactly the same stages."""
    repo = tiny_project_copy(tmp_path / "repo", tiny_bert)
    base_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for key in ("MEDEXPERTS_PROJECT_DIR", "MEDEXPERTS_ARTIFACTS_DIR", "MLFLOW_TRACKING_URI", "MEDEXPERTS_ARTIFACT_ROOT"):
        base_env.pop(key, None)  # each copy keeps its tracking store in its own folder (the embedded default)

    def sh(where: Path, *cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=where, env=base_env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    dvc, medexperts = (str(Path(sys.executable).parent / n) for n in ("dvc", "medexperts"))
    sh(repo, medexperts, "run")  # the Prefect driver; it records its outputs in dvc.lock
    assert json.loads(sh(repo, dvc, "status", "--json")) == {"sources": ["always changed"]}
    # `sources` always runs under DVC (it hashes what DVC cannot watch); its output does not change, so nothing else runs
    assert [s for s in ran(sh(repo, dvc, "repro")) if s != "sources"] == []

    fusion = yaml.safe_load((repo / "params" / "fusion.yaml").read_text())
    fusion["methods"] = ["average", "ties"]  # (not one the tiny profile overrides)
    (repo / "params" / "fusion.yaml").write_text(yaml.safe_dump(fusion))
    twin = tmp_path / "twin"
    shutil.copytree(repo, twin, symlinks=True)  # same state, one driver each
    before = stage_fingerprints(repo)
    sh(repo, medexperts, "run")
    after = stage_fingerprints(repo)
    by_prefect = sorted(s for s in after if after[s] != before[s])
    by_dvc = sorted(s for s in ran(sh(twin, dvc, "repro")) if s != "sources")
    assert by_prefect == by_dvc == ["evaluate", "fusion", "promote"]

