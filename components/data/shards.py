"""Split a train set across federated clients: IID or Dirichlet label skew."""

from __future__ import annotations

from typing import Literal

import numpy as np

from components.data.splits import strat_keys
from components.core.errors import DataError

MAX_DRAWS = 100


def partition(
    labels: np.ndarray,
    num_clients: int,
    mode: Literal["iid", "dirichlet"],
    alpha: float,
    seed: int,
) -> list[np.ndarray]:
    """Train indices per client; every index in exactly one shard, each shard sorted and non-empty."""
    n = len(labels)
    if num_clients < 1 or n < num_clients:
        raise DataError(f"cannot shard {n} train samples across {num_clients} clients")
    rng = np.random.default_rng(seed)
    if mode == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_clients)]
    if mode != "dirichlet":
        raise DataError(f"unknown partition mode {mode!r}; use 'iid' or 'dirichlet'")
    keys = strat_keys(np.asarray(labels))
    classes = np.unique(keys)
    for _ in range(MAX_DRAWS):
        # Per class, client shares ~ Dir(alpha); small alpha concentrates a class on few clients.
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(keys == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                shards[client].append(chunk)
        out = [np.sort(np.concatenate(parts)) for parts in shards]
        if min(len(s) for s in out) > 0:
            return out
    raise DataError(
        f"Dirichlet partition (alpha={alpha}) left a client empty in {MAX_DRAWS} draws "
        f"({n} train samples, {num_clients} clients); raise alpha or lower num_clients"
    )
