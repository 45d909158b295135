"""Size accounting: parameter counts, tensor bytes, on-disk bytes."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from components.core.errors import ArtifactError


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters; tied/shared parameters are counted once."""
    seen: set[int] = set()
    total = 0
    # Tied weights (e.g. embedding/decoder) are one Parameter reachable twice; count it once by
    # identity rather than relying on parameters()' default de-duplication.
    for _, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes held by the tensors' elements (numel × element size), excluding container overhead."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a file, or the total size of all files under a folder."""
    target = Path(path)
    if target.is_file():
        return target.stat().st_size
    if target.is_dir():
        return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    raise ArtifactError(f"cannot size {target}: no such file or folder")
