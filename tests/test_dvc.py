"""`dvc repro` drives the same stages: a second repro does nothing; a changed param re-runs its dependents."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (PROJECT / f).is_file()]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_dvc_repro_incremental(tmp_path: Path, tiny_bert: Path) -> None:
    repo = tmp_path / "repo"
    for rel in tracked_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, repo / rel)
    (repo / "params" / "pipeline.yaml").write_text("profile: tiny\nexperiment: medexperts\nseed: 42\n")
    foundation = yaml.safe_load((repo / "params" / "foundation.yaml").read_text())
    foundation["text"]["source"] = str(tiny_bert)
    (repo / "params" / "foundation.yaml").write_text(yaml.safe_dump(foundation))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MEDEXPERTS_ARTIFACT_ROOT": (tmp_path / "mlruns").as_uri(),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MEDEXPERTS_PROJECT_DIR", None)
    env.pop("MEDEXPERTS_ARTIFACTS_DIR", None)

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "copy")
    dvc = str(Path(sys.executable).parent / "dvc")
    first = ran(sh(dvc, "repro"))
    assert sorted(first) == sorted(["data", "foundation", "experts", "decompose", "fusion", "evaluate", "promote"])
    assert first[:2] == ["data", "foundation"] and first[-2:] == ["evaluate", "promote"]
    assert ran(sh(dvc, "repro")) == []  # nothing changed: no work
    fusion = yaml.safe_load((repo / "params" / "fusion.yaml").read_text())
    fusion["lambdas"] = [0.3, 0.9]
    (repo / "params" / "fusion.yaml").write_text(yaml.safe_dump(fusion))
    assert ran(sh(dvc, "repro")) == ["fusion", "evaluate", "promote"]
