"""Read what the data stage wrote: manifest, hash-verified splits, client shards."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from components.core.artifacts import read_manifest
from components.core.errors import ArtifactError, DataError
from components.core.fingerprint import array_content_hash, sha256_bytes
from components.core.layout import MANIFEST, split_file
from components.data.splits import strat_keys

DATA_KIND = "data"  # the data stage's manifest kind

Inputs = Union[np.ndarray, list[str]]


@dataclass
class TaskData:
    """One split of one task: inputs (uint8 images or texts) and labels (int64 (N,) or float32 (N, L))."""

    name: str
    modality: str
    kind: str
    label_names: list[str]
    inputs: Inputs
    labels: np.ndarray

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int) -> "TaskData":
        """A seeded random subset of n rows with class shares kept close to the full split's."""
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        keys = strat_keys(self.labels)
        order = rng.permutation(len(self))
        # Rank within class / class size interleaves the classes proportionally; take the first n.
        score = np.empty(len(self))
        for cls in np.unique(keys):
            members = order[keys[order] == cls]
            score[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
        idx = np.sort(np.argsort(score, kind="stable")[:n])
        inputs = self.inputs[idx] if isinstance(self.inputs, np.ndarray) else [self.inputs[i] for i in idx]
        return TaskData(self.name, self.modality, self.kind, list(self.label_names), inputs, self.labels[idx])


def read_data_manifest(data_dir: Path) -> dict[str, Any]:
    """The data stage's manifest (``components.core.artifacts`` format, kind ``data``), checked to have a 'tasks'
    mapping. Split files are verified one by one when loaded (``load_split``), not all at every read."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found; run the data stage first")
    try:
        manifest = read_manifest(Path(data_dir), kind=DATA_KIND, verify=False)
    except ArtifactError as exc:
        raise DataError(f"{exc}; re-run the data stage") from None
    if not isinstance(manifest.get("tasks"), dict):
        raise DataError(f"{path} is corrupt (no 'tasks' mapping); re-run the data stage")
    return manifest


def _task_entry(data_dir: Path, task: str) -> dict[str, Any]:
    tasks = read_data_manifest(data_dir)["tasks"]
    if task not in tasks:
        raise DataError(f"unknown task {task!r} in {Path(data_dir) / MANIFEST}; known: {sorted(tasks)}")
    return tasks[task]


def load_split(data_dir: Path, task: str, split: str) -> TaskData:
    """One prepared split, its content hash verified against the manifest."""
    entry = _task_entry(data_dir, task)
    if split not in entry.get("splits", {}):
        raise DataError(f"task {task}: unknown split {split!r}; known: {sorted(entry.get('splits', {}))}")
    image = entry["modality"] == "image"
    path = split_file(data_dir, task, split, entry["modality"])
    if not path.is_file():
        raise DataError(f"task {task}: {path} not found; re-run the data stage")
    data = path.read_bytes()
    mismatch = DataError(f"task {task}: {path} hash mismatch with the manifest; re-run the data stage")
    if image:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                inputs, labels = npz["x"], npz["y"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            raise mismatch from None
        if array_content_hash([inputs, labels]) != entry["splits"][split]["sha256"]:
            raise mismatch
    else:
        if sha256_bytes(data) != entry["splits"][split]["sha256"]:
            raise mismatch
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
        inputs = [r["text"] for r in rows]
        dtype = np.float32 if entry["kind"] == "multilabel" else np.int64
        labels = np.asarray([r["label"] for r in rows], dtype=dtype)
        if entry["kind"] == "multilabel":
            labels = labels.reshape(len(rows), len(entry["label_names"]))
    return TaskData(task, entry["modality"], entry["kind"], list(entry["label_names"]), inputs, labels)
