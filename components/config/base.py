"""The base of every params model, and the value types several sections share."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Modality = Literal["image", "text"]
TaskKind = Literal["binary", "multiclass", "multilabel"]
PrimaryMetric = Literal["accuracy", "macro_f1", "auroc", "mcc"]


class Strict(BaseModel):
    """Base model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
