"""An MLflow pyfunc over a model bundle: raw texts or uint8 image arrays in, labels and probabilities out."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from components.core.errors import ArtifactError, DataError

DISTRIBUTION = "medexperts"
# Dependencies of the pipeline that a registered model never imports when it loads or predicts: the
# orchestrator (and FastAPI, pinned only for Prefect's server), DVC, the CLI, training (Lightning,
# torchmetrics) and reports (matplotlib, rich). MLflow is left to MLflow, which pins the version that
# wrote the model.
NOT_FOR_INFERENCE = frozenset({"prefect", "fastapi", "dvc", "typer", "rich", "lightning", "torchmetrics",
                               "matplotlib", "mlflow"})


def inference_requirements(needs: frozenset[str] = frozenset()) -> list[str]:
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
        if canonicalize_name(req.name) in NOT_FOR_INFERENCE - needs:
            continue
        out.append(str(req))
    return out


def to_raw(model_input: Any, modality: str) -> list[str] | np.ndarray:
    """Accept a DataFrame with a 'text' column, a list of strings, or an image array."""
    if modality == "text":
        if isinstance(model_input, np.ndarray) and model_input.dtype.kind not in "USO":
            raise DataError(f"this model takes text (a 'text' column, or one input per line of a text file); got a "
                            f"{model_input.dtype} array of shape {model_input.shape}")
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
    if bundle.manifest["base"]["modality"] == "image":
        from components.bundle.format import check_image_input

        check_image_input(raw, info.get("input"), task)
    inputs = bundle.inputs(raw)
    n = len(next(iter(inputs.values())))
    routes: list[dict[str, dict[str, float]]] = [{} for _ in range(n)]
    encoder = bundle.model.encoder
    if routing and not hasattr(encoder, "last_weights"):
        raise ArtifactError(f"routing weights were asked for, but {bundle.manifest['name']!r} is not a routed model")

    def forward(row: torch.Tensor, **x: torch.Tensor) -> torch.Tensor:
        logits = bundle.model(task, **x)
        if routing:  # by row number: batched runs texts shortest first, not in the request's order
            per_layer = encoder.last_weights()
            for i, r in enumerate(row.tolist()):
                routes[r] = {layer: dict(zip(encoder.experts, w[i].tolist())) for layer, w in per_layer.items()}
        return logits

    frame = frame_from_logits(batched(forward, {**inputs, "row": torch.arange(n)}, batch_size), info, task)
    if routing:
        frame["routing"] = [json.dumps(r) for r in routes]
    return frame


class InjectedBundle:
    """A FedKIM injected foundation behind the bundle interface the pyfunc serves (tasks, manifest, logits)."""

    def __init__(self, folder: Path) -> None:
        from components.stages.federated import load_deployable

        self.model, self.manifest = load_deployable(folder)
        self.tasks = list(self.model.tasks)

    def modality(self, task: str) -> str:
        return self.model.tasks[task].modality

    def modality_names(self, task: str) -> list[str]:
        """What a request may call ``task``'s modality: its kind and the description the gate reads."""
        spec = self.model.tasks[task]
        return [spec.modality, spec.modality_description]

    def task_info(self, task: str) -> dict[str, Any]:
        spec = self.model.tasks[task]
        return {"kind": spec.kind, "label_names": self.manifest["label_names"][task],
                "input": self.manifest.get("inputs", {}).get(task)}  # None in models saved before it was recorded

    def logits(self, raw: list[str] | np.ndarray, task: str) -> torch.Tensor:
        from components.data.datasets import TaskData
        from components.federated.fedkim import injected_logits

        info, n = self.task_info(task), len(raw)
        dummy = np.zeros((n, len(info["label_names"])), np.float32) if info["kind"] == "multilabel" else \
            np.zeros(n, np.int64)  # labels are not read for prediction; the split format wants them
        split = TaskData(task, self.modality(task), info["kind"], info["label_names"], raw, dummy)
        return injected_logits(self.model, task, split)


def frame_from_logits(logits: torch.Tensor, info: dict[str, Any], task: str) -> pd.DataFrame:
    if info["kind"] == "multilabel":
        probs = torch.sigmoid(logits)
        labels = [",".join(n for n, p in zip(info["label_names"], row) if p > 0.5) for row in probs.tolist()]
    else:
        probs = torch.softmax(logits, dim=-1)
        labels = [info["label_names"][i] for i in probs.argmax(-1).tolist()]
    frame = pd.DataFrame({"task": task, "label": labels})
    for i, name in enumerate(info["label_names"]):
        frame[f"p_{name}"] = probs[:, i].numpy()
    return frame


def check_modality(requested: str | None, task: str, names: list[str]) -> None:
    """A request may name its inputs' modality (``params={'modality': ...}``; empty: not checked). FedKIM's gate
    reads the task and the modality, and a request whose modality is not the one ``task`` was trained on (say, an
    ultrasound sent to a chest X-ray task) is refused rather than answered. ``names``: what the model calls it."""
    if requested and requested.strip().lower() not in {n.lower() for n in names}:
        raise DataError(f"modality {requested!r} is not the one task {task!r} was trained on: it takes "
                        f"{' / '.join(repr(n) for n in names)} inputs")


class BundleModel(mlflow.pyfunc.PythonModel):
    """Loads the bundle artifact (or a FedKIM injected model); ``params={'task': name}`` picks the head of a
    multi-task model."""

    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's context type
        import components.plugins  # noqa: F401  registers what bundles may carry
        from components.bundle.format import load_bundle
        from components.core.artifacts import read_json

        folder = Path(context.artifacts["bundle"])
        kind = read_json(folder / "manifest.json", "model manifest").get("kind")
        self.bundle = InjectedBundle(folder) if kind == "fedkim" else load_bundle(folder)

    def modality_names(self, task: str) -> list[str]:
        if isinstance(self.bundle, InjectedBundle):
            return self.bundle.modality_names(task)
        return [self.bundle.manifest["base"]["modality"]]

    # Inputs are texts (DataFrame/list) or image arrays: no single MLflow schema fits both, so type-hint
    # validation is off, and the hint is one MLflow knows not to build a schema from.
    _skip_type_hint_validation = True

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        tasks = self.bundle.tasks
        task = (params or {}).get("task") or (tasks[0] if len(tasks) == 1 else None)
        if task not in tasks:
            raise ArtifactError(f"choose a task with params={{'task': ...}}; this model serves {tasks}")
        check_modality((params or {}).get("modality"), task, self.modality_names(task))
        if isinstance(self.bundle, InjectedBundle):
            raw = to_raw(model_input, self.bundle.modality(task))
            if self.bundle.modality(task) == "image":
                from components.bundle.format import check_image_input

                check_image_input(raw, self.bundle.task_info(task)["input"], task)
            return frame_from_logits(self.bundle.logits(raw, task), self.bundle.task_info(task), task)
        return predict_frame(self.bundle, to_raw(model_input, self.bundle.manifest["base"]["modality"]), task,
                             routing=bool((params or {}).get("routing")))
