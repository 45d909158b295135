"""The data stage: load, split and shard every active task, write it with a manifest (kind ``data``)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from components.config import DataParams, TaskSpec, expand_env
from components.core.artifacts import write_manifest
from components.core.errors import DataError
from components.core.fingerprint import array_content_hash, json_hash, sha256_bytes
from components.core.layout import shards_file, split_file
from components.data.datasets import DATA_KIND
from components.data.loaders import Pool, load_source
from components.data.shards import partition
from components.data.splits import split_task
from components.stages.base import StageInputs, StageSummary, param


class DataInputs(StageInputs):
    data: DataParams = param("data")
    seed: int = param("pipeline.seed")


class DataSummary(StageSummary):
    tasks: dict[str, dict[str, int]]  # task -> split -> rows


def class_counts(labels: np.ndarray, label_names: list[str]) -> dict[str, int]:
    """Rows per class (multilabel: positives per label)."""
    if labels.ndim == 2:
        counts = (labels > 0.5).sum(axis=0)
    else:
        counts = np.bincount(labels, minlength=len(label_names))
    return {n: int(c) for n, c in zip(label_names, counts)}


def encode_split(pool: Pool) -> tuple[bytes, str, str]:
    """(file bytes, file suffix, content sha256) for one split."""
    if isinstance(pool.inputs, np.ndarray):
        x, y = np.ascontiguousarray(pool.inputs, dtype=np.uint8), pool.labels
        buf = io.BytesIO()
        np.savez_compressed(buf, x=x, y=y)
        return buf.getvalue(), ".npz", array_content_hash([x, y])
    lines = []
    for i, text, label in zip(pool.ids, pool.inputs, pool.labels):
        lab: Any = [int(v) for v in label] if np.ndim(label) else int(label)
        lines.append(json.dumps({"id": i, "text": text, "label": lab}, ensure_ascii=False) + "\n")
    data = "".join(lines).encode("utf-8")
    return data, ".jsonl", sha256_bytes(data)


def _prepare_task(name: str, spec: TaskSpec, params: DataParams, project_dir: Path, task_dir: Path,
                  seed: int) -> dict[str, Any]:
    raw = load_source(name, spec, project_dir)
    splits, stats = split_task(name, spec, raw, seed)
    task_dir.mkdir(parents=True)
    entry: dict[str, Any] = {
        "modality": spec.modality,
        "kind": spec.kind,
        "label_names": list(spec.label_names),
        "description": spec.description,
        "source_path": expand_env(spec.path),
        "source_hash": raw.source_hash,
        "splits": {},
        **stats,
    }
    for split, pool in splits.items():
        data, _, digest = encode_split(pool)
        split_file(task_dir.parent, name, split, spec.modality).write_bytes(data)
        entry["splits"][split] = {
            "n": len(pool),
            "class_counts": class_counts(pool.labels, spec.label_names),
            "sha256": digest,
        }
    fed = params.federation
    try:
        clients = partition(splits["train"].labels, fed.num_clients, fed.partition, fed.alpha, seed)
    except DataError as exc:
        raise DataError(f"task {name}: {exc}") from None
    shards = {"mode": fed.partition, "alpha": fed.alpha, "clients": [c.tolist() for c in clients]}
    shards_file(task_dir.parent, name).write_text(json.dumps(shards))
    return entry


def params_hash(params: DataParams) -> str:
    """Hash of what shapes the output: active tasks' specs and the federation settings."""
    active = params.active_tasks()
    return json_hash({
        "active": list(active),
        "tasks": {n: s.model_dump(mode="json") for n, s in active.items()},
        "federation": params.federation.model_dump(mode="json"),
    })


def prepare_data(params: DataParams, project_dir: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    """Write out_dir/<task>/{split files, shards.json} and out_dir/manifest.json; return the manifest.

    Callers write into ``components.core.artifacts.atomic_dir`` so a failure never damages a previous output.
    """
    project_dir, out_dir = Path(project_dir), Path(out_dir)
    tasks = {
        name: _prepare_task(name, spec, params, project_dir, out_dir / name, seed)
        for name, spec in params.active_tasks().items()
    }
    return write_manifest(out_dir, {"kind": DATA_KIND, "tasks": tasks, "seed": seed, "params_hash": params_hash(params)})


def run(inp: DataInputs, project_dir: Path, out_dir: Path) -> DataSummary:
    """The stage: every active task prepared into ``out_dir``; the summary counts rows per split."""
    manifest = prepare_data(inp.data, project_dir, out_dir, inp.seed)
    return DataSummary(tasks={t: {s: v["n"] for s, v in i["splits"].items()} for t, i in manifest["tasks"].items()})
