"""Model registry: register bundles, the champion/challenger gate, manual promotion, alias history."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec
from mlflow.tracking import MlflowClient

from components.core.errors import RegistryError
from components.tracking.pyfunc import REQUIREMENTS

CHAMPION, CHALLENGER = "champion", "challenger"
# Only the params are declared (MLflow drops undeclared predict params); inputs are texts or image arrays.
SIGNATURE = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("task", "string", "")]))
METRIC_TAG = "val_metric"


@dataclass
class Decision:
    model: str
    version: str
    metric: float
    champion_version: str | None
    champion_metric: float | None
    promoted: bool
    reason: str


def decide(metric: float, champion_metric: float | None, margin: float, floor: float) -> tuple[bool, str]:
    """Pure gate: beat the champion by ``margin``; with no champion, clear ``floor``."""
    if champion_metric is None or math.isnan(champion_metric):  # a champion without a metric cannot block
        if metric > floor:
            return True, f"first model: {metric:.4f} > floor {floor:.4f}"
        return False, f"first model: {metric:.4f} <= floor {floor:.4f}"
    if metric > champion_metric + margin:
        return True, f"{metric:.4f} > champion {champion_metric:.4f} + margin {margin:.4f}"
    return False, f"{metric:.4f} <= champion {champion_metric:.4f} + margin {margin:.4f}"


def register_bundle(name: str, bundle_dir: Path, metric: float, tags: dict[str, str]) -> str:
    """Log the bundle as a pyfunc model in the active run and register it; returns the version."""
    # Models from code: the logged model is this small script plus the bundle, no pickled object.
    info = mlflow.pyfunc.log_model(
        name=name, python_model=str(Path(__file__).with_name("pyfunc_entry.py")), artifacts={"bundle": str(bundle_dir)},
        pip_requirements=REQUIREMENTS, registered_model_name=name, signature=SIGNATURE,
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in {**tags, METRIC_TAG: f"{metric:.6f}"}.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def champion(client: MlflowClient, name: str) -> tuple[str, float] | None:
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(mv.version), float(mv.tags.get(METRIC_TAG, "nan"))


def gate(name: str, version: str, metric: float, margin: float, floor: float) -> Decision:
    """New version -> challenger; champion only if it passes ``decide``. Every move is recorded."""
    client = MlflowClient()
    current = champion(client, name)
    promoted, reason = decide(metric, current[1] if current else None, margin, floor)
    client.set_registered_model_alias(name, CHALLENGER, version)
    decision = Decision(name, version, metric, current[0] if current else None,
                        current[1] if current else None, promoted, reason)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    record_decision(client, decision)
    return decision


def record_decision(client: MlflowClient, decision: Decision) -> None:
    """Keep the alias history MLflow lacks (mlflow#2169): tags on the version and on the model."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload = json.dumps({**asdict(decision), "at": stamp})
    client.set_model_version_tag(decision.model, decision.version, "promotion.decision",
                                 "champion" if decision.promoted else "challenger")
    client.set_model_version_tag(decision.model, decision.version, "promotion.reason", decision.reason)
    client.set_registered_model_tag(decision.model, f"promotion.{stamp}.v{decision.version}", payload)


def promote_manual(name: str, version: str) -> Decision:
    """Force ``version`` of ``name`` to champion (an operator's decision, recorded like the gate's)."""
    client = MlflowClient()
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        known = [m.name for m in client.search_registered_models()]
        raise RegistryError(f"model {name!r} version {version} does not exist; registered models: {known}") from None
    current = champion(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(mv.version))
    decision = Decision(name, str(mv.version), float(mv.tags.get(METRIC_TAG, "nan")), current[0] if current else None,
                        current[1] if current else None, True, "manual promotion")
    record_decision(client, decision)
    return decision


def aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model."""
    try:
        return {alias: str(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}
    except MlflowException:
        raise RegistryError(f"registered model {name!r} does not exist") from None


def decision_rows(decisions: list[Decision]) -> list[dict[str, Any]]:
    return [asdict(d) for d in decisions]
