"""Lineage: git commit and DVC lock hashes as MLflow tags; datasets as MLflow inputs (digest = content hash)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException


def git_info(project_dir: Path) -> dict[str, str]:
    """Commit and dirty flag of the project's git checkout ('unknown' outside git)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    return {"git.commit": commit, "git.dirty": dirty}


def dvc_lock_tags(project_dir: Path) -> dict[str, str]:
    """md5 of every stage output recorded in dvc.lock, as ``dvc.<stage>.<path>`` tags."""
    lock = project_dir / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    tags = {}
    for stage, info in (data.get("stages") or {}).items():
        for out in info.get("outs") or []:
            tags[f"dvc.{stage}.{out['path']}"] = str(out.get("md5", ""))
    return tags


class _PathSource(DatasetSource):
    """A local file as a dataset source (MLflow's own file sources need an artifact store URI)."""

    def __init__(self, uri: str) -> None:
        self._uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "local_path"

    def load(self, **_: Any) -> str:
        return self._uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> "_PathSource":
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self._uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "_PathSource":
        return cls(source_dict["uri"])


def log_datasets(manifest: dict[str, Any], data_dir: Path, context: str = "training") -> None:
    """One MLflow dataset input per task split; digest = the split's content sha256."""
    for task, info in manifest["tasks"].items():
        for split, s in info["splits"].items():
            ds = MetaDataset(source=_PathSource(str(data_dir / task / split)), name=f"{task}/{split}",
                             digest=s["sha256"][:36])
            _log_input(ds, context=f"{context}:{split}", tags={"task": task, "n": str(s["n"]),
                                                                 "sha256": s["sha256"]})


def _log_input(ds: MetaDataset, context: str, tags: dict[str, str], attempts: int = 5) -> None:
    """``mlflow.log_input``, again when a concurrent run created the same dataset (same experiment, name and digest)
    between the tracking server's check and its insert: PostgreSQL refuses the second insert (team mode, two
    pipelines at once; found by tests/test_team.py); the next try finds the dataset and links it."""
    for attempt in range(attempts):
        try:
            mlflow.log_input(ds, context=context, tags=tags)
            return
        except MlflowException as exc:
            if "UniqueViolation" not in str(exc) and "dataset_pk" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
