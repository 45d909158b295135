"""Load a registered model (any MLflow model URI) for prediction."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from components.core.errors import RegistryError


def load_model(uri: str) -> Any:
    """The pyfunc model at ``uri`` (``models:/NAME@champion``, ``runs:/...``); a missing one is one clear line."""
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        raise RegistryError(f"cannot load {uri!r}: {exc.message.splitlines()[0]}") from None
