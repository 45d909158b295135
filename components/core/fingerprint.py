"""Content fingerprints: files, folders, arrays, code and params (for manifests and stage caching)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20


def sha256_bytes(b: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def array_content_hash(arrays: list[np.ndarray]) -> str:
    """sha256 over the raw C-order bytes of the arrays, in order.

    Zip timestamps make .npz bytes irreproducible, so the arrays (not the file) are hashed;
    this is the definition DATA.md uses for the MedMNIST files.
    """
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def tree_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's sorted relative paths with their file hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def code_hash(package_dir: str | Path) -> str:
    """sha256 over every *.py file under a folder (paths and contents), for stage caching."""
    root = Path(package_dir)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def json_hash(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal params give equal hashes."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return sha256_bytes(text.encode("utf-8"))
