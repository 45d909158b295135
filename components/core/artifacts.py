"""Artifacts on disk: folders written atomically, manifests with file hashes, stage fingerprints.

A stage writes into a temporary sibling folder and swaps it in only when complete, so a failure never
leaves a half-written output nor damages the previous one. Every artifact folder carries
``manifest.json`` listing the sha256 of its files, verified on read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

from pydantic import BaseModel, ValidationError

from components.core.errors import ArtifactError
from components.core.fingerprint import sha256_file
from components.core.layout import MANIFEST, STAGE_FILE

M = TypeVar("M", bound=BaseModel)


def _sibling(out_dir: Path, tag: str) -> Path:
    """A fresh hidden path next to out_dir (same filesystem, so renames are atomic); its name matches layout.SIBLING."""
    return out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path``, on failure it is removed, so a reader
    never sees a half-written file. The temp file is made by whoever writes it with open(), not mkstemp, so the
    final file gets the usual umask permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)


def write_model(path: Path, model: BaseModel) -> None:
    """A typed record (summary, manifest) as JSON, atomically."""
    write_json(path, model.model_dump(mode="json"))


def check_record(cls: type[M], data: Any, where: Path, what: str) -> M:
    """``data`` as a typed record (summary, manifest); a wrong shape is an ArtifactError naming the file and key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ArtifactError(f"{where}: {what} does not match its schema ({key}: {first['msg']}); re-run the stage "
                            "that writes it") from None


def read_model(path: Path, cls: type[M], what: str) -> M:
    """A typed record back; a missing, corrupt or wrong-shaped file is an ArtifactError naming it."""
    return check_record(cls, read_json(path, what), path, what)


def read_json(path: Path, what: str = "file", expect: type[dict] | type[list] = dict) -> Any:
    """A JSON object (``expect=list``: an array) from ``path``; missing, unreadable or other content is an
    ArtifactError."""
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt {what} ({exc})") from None
    if not isinstance(obj, expect):
        raise ArtifactError(f"{path}: corrupt {what} (expected a JSON {'object' if expect is dict else 'array'})")
    return obj


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp; the previous output survives (and is restored) if the rename fails."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    backup = _sibling(out_dir, "old")
    os.replace(out_dir, backup)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``out_dir``, on failure it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    tmp.mkdir()  # plain mkdir (not mkdtemp) so the final folder gets the usual umask permissions
    try:
        yield tmp
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors as safetensors (which needs detached, contiguous tensors)."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the sha256 of every file in ``folder`` (recursively) and write ``manifest.json``."""
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, STAGE_FILE)
    }
    full = {**manifest, "files": files}
    write_json(folder / MANIFEST, full)
    return full


def read_manifest(folder: Path, kind: str | None = None, verify: bool = True) -> dict[str, Any]:
    """Read a manifest; check its kind and (optionally) every listed file's sha256."""
    manifest = read_json(Path(folder) / MANIFEST, "manifest")
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{folder}: expected a {kind!r} artifact, found {manifest.get('kind')!r}")
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            path = Path(folder) / rel
            if not path.is_file():
                raise ArtifactError(f"{path}: listed in the manifest but missing")
            if sha256_file(path) != digest:
                raise ArtifactError(
                    f"{path}: sha256 does not match its manifest (corrupt or modified); re-run its stage"
                )
    return manifest


def stage_is_current(out_dir: Path, fingerprint: str) -> bool:
    """True when ``out_dir`` was completed by a run with this exact fingerprint."""
    path = Path(out_dir) / STAGE_FILE
    try:
        return read_json(path).get("fingerprint") == fingerprint
    except ArtifactError:  # missing or corrupt: the stage runs again and rewrites it
        return False


def mark_stage(out_dir: Path, fingerprint: str, inputs: dict[str, str]) -> None:
    """Record the fingerprint (params + inputs + code) that produced ``out_dir``."""
    write_json(Path(out_dir) / STAGE_FILE, {"fingerprint": fingerprint, "inputs": inputs})
