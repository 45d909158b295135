"""MLflow run helpers: experiments in the project store, flattened params, batched metrics."""

from __future__ import annotations

import math
import re
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

MAX_PARAM = 500  # MLflow's limit on a param value's length (older servers)
MAX_KEY = 250  # MLflow's limit on a metric name's length
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # outside MLflow's allowed set for metric names


def metric_key(path: str) -> str:
    """A metric name MLflow accepts for a flattened path: '@' -> '_at_', other refused characters -> '_'."""
    return _BAD_KEY_CHARS.sub("_", path.replace("@", "_at_"))[:MAX_KEY]


def ensure_experiment(name: str, artifact_uri: str | None = None) -> str:
    """Id of experiment ``name``, created with ``artifact_uri`` as its artifact root if new."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_uri)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a.b.c': leaf}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def log_params(tree: dict[str, Any], prefix: str = "") -> None:
    """Log a nested params tree in one batch (values cut to MLflow's length limit)."""
    flat = {k: str(v)[:MAX_PARAM] for k, v in flatten(tree, prefix).items()}
    run = mlflow.active_run()
    if run and flat:
        MlflowClient().log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat.items()])


def log_metrics(tree: dict[str, Any], prefix: str = "", step: int = 0) -> None:
    """Log every finite numeric leaf of a nested dict in batches (~4 ms per single call on SQLite); keys are the
    leaves' paths (metric_key)."""
    import time

    now = int(time.time() * 1000)
    metrics = [
        Metric(metric_key(k), float(v), now, step)
        for k, v in flatten(tree, prefix).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    run = mlflow.active_run()
    for i in range(0, len(metrics), 1000):  # MLflow's per-batch limit
        if run:
            MlflowClient().log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
