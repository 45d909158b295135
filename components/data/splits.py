"""Train/val/test splits: dedup, leakage removal and seeded stratified draws, per `SplitSpec.protocol`."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from components.config import TaskSpec
from components.data.loaders import Pool, RawTask
from components.core.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")


def input_keys(pool: Pool) -> list[Hashable]:
    """Identity of each input for duplicate checks: stripped text, or the image's bytes."""
    if isinstance(pool.inputs, np.ndarray):
        return [np.ascontiguousarray(x).tobytes() for x in pool.inputs]
    return [t.strip() for t in pool.inputs]


def strat_keys(labels: np.ndarray) -> np.ndarray:
    """One class per row: the label, or for multilabel the first positive label (-1 when none)."""
    if labels.ndim == 1:
        return labels.astype(np.int64)
    positive = labels > 0.5
    return np.where(positive.any(axis=1), positive.argmax(axis=1), -1).astype(np.int64)


def dedup(pool: Pool) -> Pool:
    """Drop exact duplicate inputs, keeping the first occurrence.

    An input whose copies carry different labels is dropped altogether: keeping one copy would pick its
    label by file order (Medical Abstracts has 113 such abstracts).
    """
    labels_of: dict[Hashable, set[bytes]] = {}
    keys = input_keys(pool)
    for key, label in zip(keys, pool.labels):
        labels_of.setdefault(key, set()).add(np.asarray(label).tobytes())
    seen: set[Hashable] = set()
    keep = []
    for i, key in enumerate(keys):
        if key not in seen and len(labels_of[key]) == 1:
            keep.append(i)
        seen.add(key)
    return pool if len(keep) == len(pool) else pool.take(np.asarray(keep, dtype=np.int64))


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Seeded per-class shuffle, each class cut by cumulative `fractions`; indices sorted per split."""
    fracs = np.asarray(list(fractions.values()), dtype=np.float64)
    if (fracs < 0).any() or abs(fracs.sum() - 1.0) > 1e-6:
        raise DataError(f"split fractions {fractions} must be non-negative and sum to 1")
    rng = np.random.default_rng(seed)
    keys = strat_keys(np.asarray(labels))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fractions}
    for cls in np.unique(keys):
        idx = rng.permutation(np.flatnonzero(keys == cls))
        # Cumulative rounding: every index lands in exactly one split, shares stay close to `fractions`.
        bounds = np.rint(np.cumsum(fracs) * len(idx)).astype(int)
        bounds[-1] = len(idx)
        for name, chunk in zip(fractions, np.split(idx, bounds[:-1])):
            parts[name].append(chunk)
    return {
        name: np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.int64)
        for name, chunks in parts.items()
    }


def split_task(name: str, spec: TaskSpec, raw: RawTask, seed: int) -> tuple[dict[str, Pool], dict[str, int]]:
    """Splits per protocol, and counts {"removed_duplicates", "removed_leaks"}.

    Published splits (official, files) are kept verbatim so results stay comparable with the
    literature; dedup and leak removal apply only to the pools a split is drawn from.
    """
    sp = spec.split
    stats = {"removed_duplicates": 0, "removed_leaks": 0}
    needed = {"official": SPLITS, "files": SPLITS, "official_test": ("pool", "test"), "stratified": ("pool",)}
    missing = [p for p in needed[sp.protocol] if p not in raw.pools]
    if missing:
        raise DataError(f"task {name}: protocol '{sp.protocol}' needs pool(s) {missing} from format '{spec.format}'")
    if sp.protocol in ("official", "files"):
        splits = {s: raw.pools[s] for s in SPLITS}
    else:
        pool = raw.pools["pool"]
        if sp.dedup:
            deduped = dedup(pool)
            stats["removed_duplicates"] = len(pool) - len(deduped)
            pool = deduped
        if sp.protocol == "official_test":
            test = raw.pools["test"]
            if sp.dedup:
                # Nothing in train or val may also be a test input.
                test_keys = set(input_keys(test))
                clean = np.asarray([i for i, k in enumerate(input_keys(pool)) if k not in test_keys], dtype=np.int64)
                stats["removed_leaks"] = len(pool) - len(clean)
                pool = pool.take(clean)
            idx = stratified_split(pool.labels, {"train": 1 - sp.val_fraction, "val": sp.val_fraction}, seed)
            splits = {"train": pool.take(idx["train"]), "val": pool.take(idx["val"]), "test": test}
        else:
            train_frac = 1.0 - sp.val_fraction - sp.test_fraction
            if train_frac <= 0:
                raise DataError(f"task {name}: val_fraction + test_fraction must be below 1")
            fracs = {"train": train_frac, "val": sp.val_fraction, "test": sp.test_fraction}
            idx = stratified_split(pool.labels, fracs, seed)
            splits = {s: pool.take(idx[s]) for s in SPLITS}
    for s, p in splits.items():
        if len(p) == 0:
            raise DataError(f"task {name}: split '{s}' is empty (source {spec.path}, protocol '{sp.protocol}')")
    return splits, stats


def make_splits(name: str, spec: TaskSpec, raw: RawTask, seed: int) -> dict[str, Pool]:
    """train/val/test pools for task `name` (see `split_task` for the removal counts)."""
    return split_task(name, spec, raw, seed)[0]
