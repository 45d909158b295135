"""Prefect flows and the `medexperts` CLI: thin drivers over `components`."""

from __future__ import annotations

import hashlib
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def source_digest(root: Path = _ROOT) -> str:
    """sha256 of the project's Python code as it is on disk now: every ``.py`` file under ``components/`` and
    ``flows/`` of ``root``, by path relative to it and content."""
    h = hashlib.sha256()
    for path in sorted(p for package in ("components", "flows") for p in (root / package).rglob("*.py")):
        rel = path.relative_to(root)
        if not any(part.startswith(".") for part in rel.parts):  # not code the project runs: .ipynb_checkpoints
            h.update(rel.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


# The code this process runs: read when it first imports the project (every task of the project imports this
# package first). A long-lived process, a Dask worker above all, keeps running it after the files change, while
# the stages' fingerprints hash the files: flows.fanout compares the two before it sends a worker any work.
LOADED_SOURCE = source_digest()
