"""DVC: record stage outputs in dvc.lock and the cache after a Prefect run, so `dvc repro` agrees."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from components.tracking.lineage import dvc_lock_tags

log = logging.getLogger("medexperts")


def dvc_commit(root: Path, stages: list[str]) -> dict[str, str]:
    """`dvc commit -f STAGES` when the project is a DVC repo; returns the dvc.lock hashes as tags."""
    beside = Path(sys.executable).with_name("dvc")  # the venv's dvc, also when .venv/bin is not on PATH
    dvc = str(beside) if beside.is_file() else shutil.which("dvc")
    if dvc is None or not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        log.info("[dvc] not a DVC repo (or dvc missing): outputs not versioned by DVC")
        return {}
    proc = subprocess.run([dvc, "commit", "--force", "--quiet", *stages], cwd=root, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        # Versioning must not fail a finished training run; say what happened instead.
        log.warning("[dvc] commit failed: %s", (proc.stderr or proc.stdout).strip().splitlines()[-1:])
        return {}
    return dvc_lock_tags(root)
