"""An MLflow pyfunc over a model bundle: raw texts or uint8 image arrays in, labels and probabilities out."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from components.core.errors import ArtifactError

DISTRIBUTION = "medexperts"
# Dependencies of the pipeline that a registered model never imports when it loads or predicts: the
# orchestrator (and FastAPI, pinned only for Prefect's server), DVC, the CLI, training (Lightning,
# torchmetrics) and reports (matplotlib, rich). MLflow is left to MLflow, which pins the version that
# wrote the model.
NOT_FOR_INFERENCE = frozenset({"prefect", "fastapi", "dvc", "typer", "rich", "lightning", "torchmetrics",
                               "matplotlib", "mlflow"})


def inference_requirements() -> list[str]:
    """pip requirements of a registered model: the installed ``medexperts`` distribution's own dependencies
    (pyproject.toml is the one place versions are pinned), less extras and :data:`NOT_FOR_INFERENCE`."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        declared = requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        raise ArtifactError(f"the {DISTRIBUTION!r} distribution is not installed (run `pip install -e .`); "
                            "its metadata lists the requirements a registered model is logged with") from None
    out = []
    for line in declared:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue  # an optional extra (test tools); platform markers stay, for pip on the serving host
        if canonicalize_name(req.name) in NOT_FOR_INFERENCE:
            continue
        out.append(str(req))
    return out


def to_raw(model_input: Any, modality: str) -> list[str] | np.ndarray:
    """Accept a DataFrame with a 'text' column, a list of strings, or an image array."""
    if modality == "text":
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ArtifactError(f"text model input needs a 'text' column; got {list(model_input.columns)}")
            return model_input["text"].astype(str).tolist()
        if isinstance(model_input, str):
            return [model_input]
        return [str(t) for t in model_input]
    return np.asarray(model_input)


def predict_frame(bundle: Any, raw: list[str] | np.ndarray, task: str, batch_size: int = 64,
                  routing: bool = False) -> pd.DataFrame:
    """Predicted label and per-class probability for each input; with ``routing`` (a routed model only), the
    router's expert weights per layer for each input, as JSON ({layer: {expert: weight}})."""
    from components.training.inference import batched

    info = bundle.manifest["tasks"][task]
    inputs = bundle.inputs(raw)
    routes: list[dict[str, dict[str, float]]] = []
    encoder = bundle.model.encoder
    if routing and not hasattr(encoder, "last_weights"):
        raise ArtifactError(f"routing weights were asked for, but {bundle.manifest['name']!r} is not a routed model")

    def forward(**x: torch.Tensor) -> torch.Tensor:
        logits = bundle.model(task, **x)
        if routing:
            per_layer = encoder.last_weights()
            for i in range(len(logits)):
                routes.append({layer: dict(zip(encoder.experts, w[i].tolist())) for layer, w in per_layer.items()})
        return logits

    logits = batched(forward, inputs, batch_size)
    if info["kind"] == "multilabel":
        probs = torch.sigmoid(logits)
        labels = [",".join(n for n, p in zip(info["label_names"], row) if p > 0.5) for row in probs.tolist()]
    else:
        probs = torch.softmax(logits, dim=-1)
        labels = [info["label_names"][i] for i in probs.argmax(-1).tolist()]
    frame = pd.DataFrame({"task": task, "label": labels})
    for i, name in enumerate(info["label_names"]):
        frame[f"p_{name}"] = probs[:, i].numpy()
    if routing:
        frame["routing"] = [json.dumps(r) for r in routes]
    return frame


class BundleModel(mlflow.pyfunc.PythonModel):
    """Loads the bundle artifact; ``params={'task': name}`` picks the head of a multi-task model."""

    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's context type
        import components.plugins  # noqa: F401  registers what bundles may carry
        from components.bundle.format import load_bundle

        self.bundle = load_bundle(Path(context.artifacts["bundle"]))

    # Inputs are texts (DataFrame/list) or image arrays: no single MLflow schema fits both, so type-hint
    # validation is off, and the hint is one MLflow knows not to build a schema from.
    _skip_type_hint_validation = True

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        tasks = self.bundle.tasks
        task = (params or {}).get("task") or (tasks[0] if len(tasks) == 1 else None)
        if task not in tasks:
            raise ArtifactError(f"choose a task with params={{'task': ...}}; this model serves {tasks}")
        return predict_frame(self.bundle, to_raw(model_input, self.bundle.manifest["base"]["modality"]), task,
                             routing=bool((params or {}).get("routing")))
