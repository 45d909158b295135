"""Read a task's source files (per `TaskSpec.format`) into labelled pools, checking them on the way."""

from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from components.config import TaskSpec, expand_env
from components.core.fingerprint import array_content_hash, sha256_bytes, sha256_file, tree_hash
from components.core.errors import DataError

Inputs = Union[np.ndarray, list[str]]
NPZ_SPLITS: tuple[str, ...] = ("train", "val", "test")
TSV_FILES: dict[str, str] = {"train": "train.tsv", "val": "dev.tsv", "test": "test.tsv"}


@dataclass
class Pool:
    """Inputs (uint8 images or texts), labels (int64 (N,) or float32 (N, L)) and ids, row-aligned."""

    inputs: Inputs
    labels: np.ndarray
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: np.ndarray) -> "Pool":
        """Rows at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        inputs = self.inputs[idx] if isinstance(self.inputs, np.ndarray) else [self.inputs[i] for i in idx]
        return Pool(inputs=inputs, labels=self.labels[idx], ids=[self.ids[i] for i in idx])


@dataclass
class RawTask:
    """A task's pools as found in its source, and a hash of that source's content."""

    pools: dict[str, Pool]
    source_hash: str


def resolve_path(name: str, spec: TaskSpec, raw_path: str, project_dir: Path) -> Path:
    """Expand ${VAR}s; relative paths are relative to the project folder. Missing -> DataError."""
    path = Path(expand_env(raw_path))
    if not path.is_absolute():
        path = project_dir / path
    if not path.exists():
        if spec.optional:
            raise DataError(
                f"optional task {name}: {path} not found; set MEDEXPERTS_SHARED_DATA or data.tasks.{name}.path"
            )
        raise DataError(f"task {name}: source {path} not found")
    return path


def load_source(name: str, spec: TaskSpec, project_dir: Path) -> RawTask:
    """Load task `name` from its source according to `spec.format`."""
    path = resolve_path(name, spec, spec.path, Path(project_dir))
    if spec.format == "medmnist_npz":
        return _load_npz(name, spec, path)
    if spec.format == "pubmedqa_json":
        return _load_pubmedqa(name, spec, path, Path(project_dir))
    return _load_table_task(name, spec, path)


# --------------------------------------------------------------------------- medmnist_npz
def _load_npz(name: str, spec: TaskSpec, path: Path) -> RawTask:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"task {name}: {path} is not a readable .npz file ({exc})") from None
    keys = [f"{s}_{part}" for s in NPZ_SPLITS for part in ("images", "labels")]
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"task {name}: {path} lacks array(s) {missing}")
    pools: dict[str, Pool] = {}
    image_shape: tuple[int, ...] | None = None
    for split in NPZ_SPLITS:
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        ok = x.ndim == 3 or (x.ndim == 4 and x.shape[3] == 3)
        if not ok or x.shape[1] != x.shape[2]:
            raise DataError(
                f"task {name}: {path}: {split}_images has shape {x.shape}; expected (N,H,H) or (N,H,H,3)"
            )
        if image_shape is not None and x.shape[1:] != image_shape:
            raise DataError(f"task {name}: {path}: {split}_images has shape {x.shape}, other splits {image_shape}")
        image_shape = x.shape[1:]
        if x.dtype != np.uint8:
            raise DataError(f"task {name}: {path}: {split}_images has dtype {x.dtype}; expected uint8")
        labels = _npz_labels(name, spec, path, split, y, len(x))
        pools[split] = Pool(inputs=x, labels=labels, ids=[f"{split}_{i}" for i in range(len(x))])
    return RawTask(pools=pools, source_hash=array_content_hash([arrays[k] for k in keys]))


def _npz_labels(name: str, spec: TaskSpec, path: Path, split: str, y: np.ndarray, n: int) -> np.ndarray:
    where = f"task {name}: {path}: {split}_labels"
    if len(y) != n:
        raise DataError(f"{where} has {len(y)} rows but {split}_images has {n}")
    if spec.kind == "multilabel":
        if y.ndim != 2 or y.shape[1] != spec.num_labels or not np.isin(y, (0, 1)).all():
            raise DataError(f"{where}: expected 0/1 values of shape (N, {spec.num_labels}), got {y.shape}")
        return y.astype(np.float32)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where} has shape {y.shape}; expected (N,) or (N,1)")
    if len(y) and (y.min() < 0 or y.max() >= spec.num_labels):
        raise DataError(f"{where}: label {int(y.max() if y.max() >= spec.num_labels else y.min())} "
                        f"out of range 0..{spec.num_labels - 1} ({spec.num_labels} label_names)")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- pubmedqa_json
def _read_json(name: str, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"task {name}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"task {name}: {path}: top level must be an object keyed by id")
    return data


def _load_pubmedqa(name: str, spec: TaskSpec, path: Path, project_dir: Path) -> RawTask:
    items = _read_json(name, path)
    if not spec.test_ids_path:
        raise DataError(f"task {name}: format pubmedqa_json needs test_ids_path")
    test_path = resolve_path(name, spec, spec.test_ids_path, project_dir)
    test_ids = set(_read_json(name, test_path))
    unknown = sorted(test_ids - set(items))
    if unknown:
        raise DataError(f"task {name}: {test_path} lists {len(unknown)} id(s) not in {path}, e.g. {unknown[0]}")
    rows: dict[str, tuple[list[str], list[int], list[str]]] = {"pool": ([], [], []), "test": ([], [], [])}
    for pid, item in items.items():
        if not isinstance(item, dict) or spec.label_key not in item:
            raise DataError(f"task {name}: {path}: item {pid} has no '{spec.label_key}'")
        parts = []
        for field in spec.text_fields:
            value = item.get(field)
            if value is None:
                raise DataError(f"task {name}: {path}: item {pid} has no '{field}'")
            parts.append(" ".join(map(str, value)) if isinstance(value, list) else str(value))
        label = item[spec.label_key]
        if label not in spec.label_names:
            raise DataError(f"task {name}: {path}: item {pid}: label {label!r} not in label_names {spec.label_names}")
        texts, labels, ids = rows["test" if pid in test_ids else "pool"]
        texts.append(" ".join(p.strip() for p in parts))
        labels.append(spec.label_names.index(label))
        ids.append(str(pid))
    pools = {k: Pool(inputs=t, labels=np.asarray(lab, dtype=np.int64), ids=i) for k, (t, lab, i) in rows.items()}
    return RawTask(pools=pools, source_hash=sha256_bytes((sha256_file(path) + sha256_file(test_path)).encode()))


# --------------------------------------------------------------------------- table
def _load_table_task(name: str, spec: TaskSpec, path: Path) -> RawTask:
    if spec.split.protocol == "files":
        if not path.is_dir():
            raise DataError(f"task {name}: split protocol 'files' needs a folder, {path} is a file")
        pools = {}
        for split, fname in TSV_FILES.items():
            f = path / fname
            if not f.is_file():
                raise DataError(f"task {name}: {f} not found (protocol 'files' needs {list(TSV_FILES.values())})")
            pools[split] = read_table(name, spec, f, prefix=split)
        return RawTask(pools=pools, source_hash=tree_hash(path))
    if not path.is_file():
        raise DataError(f"task {name}: {path} is a folder; format 'table' needs a file")
    return RawTask(pools={"pool": read_table(name, spec, path, prefix="row")}, source_hash=tree_hash(path))


def read_table(name: str, spec: TaskSpec, path: Path, prefix: str) -> Pool:
    """One delimited file -> Pool; every row is checked (text present, label known)."""
    if not spec.text_column or not spec.label_column:
        raise DataError(f"task {name}: format 'table' needs text_column and label_column")
    quoting = csv.QUOTE_NONE if spec.sep == "\t" else csv.QUOTE_MINIMAL
    try:
        # dtype=str and no NA parsing: labels stay raw strings, empty cells stay "" (checked below).
        df = pd.read_csv(path, sep=spec.sep, quoting=quoting, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"task {name}: {path} cannot be parsed as a table ({' '.join(str(exc).split())})") from None
    missing = [c for c in (spec.text_column, spec.label_column) if c not in df.columns]
    if missing:
        raise DataError(f"task {name}: {path} lacks column(s) {missing}; has {list(df.columns)}")
    texts: list[str] = []
    labels: list[Any] = []
    for i, (text, raw) in enumerate(zip(df[spec.text_column], df[spec.label_column]), start=1):
        where = f"task {name}: {path} row {i}"
        if not str(text).strip():
            raise DataError(f"{where}: empty text in column '{spec.text_column}'")
        labels.append(_parse_label(where, spec, str(raw).strip()))
        texts.append(str(text))
    if spec.label_format == "blurb_multilabel":
        y = np.asarray(labels, dtype=np.float32).reshape(len(labels), spec.num_labels)
    else:
        y = np.asarray(labels, dtype=np.int64)
    return Pool(inputs=texts, labels=y, ids=[f"{prefix}_{i}" for i in range(len(texts))])


def _parse_label(where: str, spec: TaskSpec, raw: str) -> int | list[float]:
    if raw == "":
        raise DataError(f"{where}: missing label in column '{spec.label_column}'")
    if spec.label_format == "value":
        if spec.kind == "multilabel":
            raise DataError(f"{where}: kind 'multilabel' needs label_format 'blurb_multilabel'")
        values = spec.label_values or spec.label_names
        if raw not in values:
            raise DataError(f"{where}: label {raw!r} not in label_values {values}")
        return values.index(raw)
    hot = [0.0] * spec.num_labels
    for part in raw.split(","):
        k, _, v = part.strip().partition("_")
        if not (k.isdigit() and int(k) < spec.num_labels and v in ("0", "1")):
            raise DataError(f"{where}: unparsable multilabel {raw!r} (expected '0_x,1_x,...' with x 0/1, "
                            f"index < {spec.num_labels})")
        hot[int(k)] = float(v)
    return hot
