"""MLflow runs: the one door through which the pipeline starts runs and logs params, metrics, tags and files.

Every helper that logs needs an active run and raises ``TrackingError`` without one (a silent no-op would hide
a run that was never started). Metrics go through ``mlflow.log_metrics``, which batches by itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from components.core.errors import TrackingError
from components.core.lock import pid_alive

HOST_TAG, PID_TAG = "medexperts.host", "medexperts.pid"  # the process that runs a run: a dead one is an orphan
MAX_PARAM = 500  # MLflow's limit on a param value's length (older servers)
MAX_KEY = 250  # MLflow's limit on a metric name's length
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # outside MLflow's allowed set for metric names


def metric_key(path: str) -> str:
    """A metric, param or tag name MLflow accepts for a flattened path: '@' -> '_at_', other refused characters
    -> '_' (a source path such as ``${MEDEXPERTS_SHARED_DATA:-../shared/data}/...`` in a tag name)."""
    return _BAD_KEY_CHARS.sub("_", path.replace("@", "_at_"))[:MAX_KEY]


def _first_line(exc: MlflowException) -> str:
    return exc.message.splitlines()[0] if exc.message else type(exc).__name__


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3's UI: the model-training view


def ensure_experiment(name: str, artifact_uri: str | None = None) -> str:
    """Id of experiment ``name``, created with ``artifact_uri`` as its artifact root if new, and marked as model
    training, so MLflow 3's UI shows its runs, datasets and models rather than its GenAI views."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_uri, tags=EXPERIMENT_KIND)
    except MlflowException as exc:  # another run created it since we looked (two runs on a fresh team server)
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def use_experiment(name: str, artifact_uri: str | None = None) -> str:
    """Make experiment ``name`` (created if new) the one runs start in; returns its id."""
    try:
        experiment_id = ensure_experiment(name, artifact_uri)
        mlflow.set_experiment(experiment_id=experiment_id)
    except MlflowException as exc:
        raise TrackingError(f"cannot open MLflow experiment {name!r} at {tracking_uri()}: {_first_line(exc)}") from None
    return experiment_id


@contextlib.contextmanager
def run(name: str, *, tags: dict[str, str] | None = None, nested: bool = False,
        parent_run_id: str | None = None) -> Iterator[str]:
    """Start (and on exit end) an MLflow run; yields its id. A failure to start is a TrackingError."""
    tags = {**(tags or {}), HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}  # for fail_orphans
    try:
        active = mlflow.start_run(run_name=name, nested=nested, parent_run_id=parent_run_id, tags=tags)
    except MlflowException as exc:
        raise TrackingError(f"cannot start the MLflow run {name!r} (parent {parent_run_id}): {_first_line(exc)}") from None
    with active:
        yield active.info.run_id


def fail_orphans(experiment_id: str) -> dict[str, dict[str, str]]:
    """Mark FAILED the runs of this experiment left RUNNING by a process of this host that is gone (a kill -9,
    a power cut); returns {run id: its tags}. Runs of other hosts are left alone (their processes cannot be
    checked)."""
    host = socket.gethostname()
    client = mlflow.MlflowClient()
    try:
        found = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    except MlflowException as exc:
        raise TrackingError(f"cannot list the running MLflow runs at {tracking_uri()}: {_first_line(exc)}") from None
    orphans: dict[str, dict[str, str]] = {}
    for r in found:
        tags = r.data.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        pid = int(tags[PID_TAG])
        if pid == os.getpid() or pid_alive(pid):
            continue
        client.set_tag(r.info.run_id, "medexperts.failed_reason", f"its process (pid {pid} on {host}) is gone")
        client.set_terminated(r.info.run_id, status="FAILED")
        orphans[r.info.run_id] = dict(tags)
    return orphans


def active_run_id() -> str:
    run_ = mlflow.active_run()
    if run_ is None:
        raise TrackingError("no active MLflow run: start one with components.tracking.runs.run()")
    return run_.info.run_id


def lightning_logger() -> Any:
    """A Lightning MLFlowLogger writing into the active run (epoch curves land beside the run's other metrics)."""
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(tracking_uri=tracking_uri(), run_id=active_run_id())


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
    active_run_id()
    flat = {metric_key(k): str(v)[:MAX_PARAM] for k, v in flatten(tree, prefix).items()}
    if flat:
        mlflow.log_params(flat)


def log_metrics(tree: dict[str, Any], prefix: str = "", step: int = 0) -> None:
    """Log every finite numeric leaf of a nested dict (one batched call); keys are the leaves' paths
    (``metric_key``)."""
    active_run_id()
    metrics = {metric_key(k): float(v) for k, v in flatten(tree, prefix).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if metrics:
        mlflow.log_metrics(metrics, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    active_run_id()
    if tags:
        mlflow.set_tags({metric_key(k): str(v) for k, v in tags.items()})


def log_file(path: Path, artifact_path: str | None = None) -> None:
    """Attach a file (or every file of a folder) to the active run."""
    active_run_id()
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_json(obj: Any, artifact_file: str) -> None:
    """A dict or list as a JSON artifact of the active run."""
    active_run_id()
    mlflow.log_dict(obj, artifact_file)
