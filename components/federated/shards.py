"""Read the client shards the data stage wrote (``shards.json``) and cut a split into per-client data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.core.errors import DataError
from components.core.layout import MANIFEST, shards_file
from components.data.datasets import TaskData, read_data_manifest


def check_shards(clients: Sequence[np.ndarray], train_size: int, where: str) -> None:
    """Every shard non-empty, every index inside the train split, no index in two shards."""
    if not clients:
        raise DataError(f"{where}: no clients; re-run the data stage with federation.num_clients >= 1")
    for i, shard in enumerate(clients):
        if len(shard) == 0:
            raise DataError(f"{where}: client {i} has an empty shard; re-run the data stage")
        bad = shard[(shard < 0) | (shard >= train_size)]
        if len(bad):
            raise DataError(f"{where}: client {i} has train index {int(bad[0])} outside the train split "
                            f"({train_size} samples); re-run the data stage")
    flat = np.concatenate(clients)
    owner = np.repeat(np.arange(len(clients)), [len(c) for c in clients])
    order = np.argsort(flat, kind="stable")
    dup = np.flatnonzero(np.diff(flat[order]) == 0)
    if len(dup):
        a, b = owner[order[dup[0]]], owner[order[dup[0] + 1]]
        who = f"client {a} lists" if a == b else f"clients {a} and {b} share"
        raise DataError(f"{where}: {who} train index {int(flat[order[dup[0]]])} (shards must be disjoint); "
                        "re-run the data stage")


def _as_indices(raw: object, i: int, where: str) -> np.ndarray:
    arr = np.asarray(raw) if isinstance(raw, list) else None
    # bool is an int subtype in numpy too; a shard of True/False is a corrupt file, not indices 0/1
    if arr is None or (len(arr) and (arr.ndim != 1 or arr.dtype.kind not in "iu")):
        raise DataError(f"{where}: client {i} is not a list of integer train indices; re-run the data stage")
    return arr.astype(np.int64)


def _train_size(data_dir: Path, task: str) -> int:
    tasks = read_data_manifest(data_dir)["tasks"]
    if task not in tasks:
        raise DataError(f"unknown task {task!r} in {Path(data_dir) / MANIFEST}; known: {sorted(tasks)}")
    try:
        return int(tasks[task]["splits"]["train"]["n"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{Path(data_dir) / MANIFEST}: task {task} has no train split size; "
                        "re-run the data stage") from None


def read_shards(data_dir: Path, task: str, train_size: int | None = None) -> list[np.ndarray]:
    """Train indices per client from ``<data_dir>/<task>/shards.json``, checked against the train split.

    ``train_size`` defaults to the train split size in the data stage's manifest.
    """
    path = shards_file(data_dir, task)
    if not path.is_file():
        raise DataError(f"{path} not found; run the data stage first")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is corrupt ({exc}); re-run the data stage") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("clients"), list):
        raise DataError(f"{path} is corrupt (no 'clients' list); re-run the data stage")
    clients = [_as_indices(raw, i, str(path)) for i, raw in enumerate(doc["clients"])]
    size = _train_size(data_dir, task) if train_size is None else train_size
    check_shards(clients, size, str(path))
    return clients


def shard_data(train: TaskData, shards: Sequence[np.ndarray]) -> list[TaskData]:
    """One TaskData per client: the rows of ``train`` its shard lists (a client sees only its own rows)."""
    check_shards(shards, len(train), f"task {train.name}")
    out = []
    for idx in shards:
        inputs = train.inputs[idx] if isinstance(train.inputs, np.ndarray) else [train.inputs[i] for i in idx]
        out.append(TaskData(train.name, train.modality, train.kind, list(train.label_names), inputs,
                            train.labels[idx]))
    return out


def shard_digest(shard: dict[str, TaskData]) -> str:
    """sha256 of what one client trains on: per task (in name order) its name, labels and inputs (image bytes or
    texts), so the lineage names each hospital's exact rows, cap included."""
    import hashlib

    h = hashlib.sha256()
    for task in sorted(shard):
        data = shard[task]
        h.update(f"{task}\0{data.labels.dtype}{data.labels.shape}\0".encode())
        h.update(np.ascontiguousarray(data.labels).tobytes())
        if isinstance(data.inputs, np.ndarray):
            h.update(f"{data.inputs.dtype}{data.inputs.shape}\0".encode())
            h.update(np.ascontiguousarray(data.inputs).tobytes())
        else:  # texts
            for text in data.inputs:
                h.update(str(text).encode() + b"\0")
    return h.hexdigest()
