"""Prefect flows and the `medexperts` CLI: thin drivers over `components`."""

from __future__ import annotations

from pathlib import Path

from components.core.fingerprint import json_hash, sha256_file

_ROOT = Path(__file__).resolve().parent.parent


def source_digest(root: Path = _ROOT) -> str:
    """sha256 of the project's Python code as it is on disk now: every ``.py`` file under ``components/`` and
    ``flows/`` of ``root``, by path relative to it and content (hashed as the stages hash their code files)."""
    files = (p.relative_to(root) for package in ("components", "flows") for p in (root / package).rglob("*.py"))
    return json_hash({rel.as_posix(): sha256_file(root / rel) for rel in files
                      if not any(part.startswith(".") for part in rel.parts)})  # not run: .ipynb_checkpoints


# The code this process runs: read when it first imports the project (every task of the project imports this
# package first). A long-lived process, a Dask worker above all, keeps running it after the files change, while
# the stages' fingerprints hash the files: flows.fanout compares the two before it sends a worker any work.
LOADED_SOURCE = source_digest()
