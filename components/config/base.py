"""The base of every params model, and the value types several sections share."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

Modality = Literal["image", "text"]
TaskKind = Literal["binary", "multiclass", "multilabel"]
PrimaryMetric = Literal["accuracy", "macro_f1", "auroc", "mcc"]


class Strict(BaseModel):
    """Base model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


T = TypeVar("T")


class PerModality(Strict, Generic[T]):
    """A setting given once per modality: subclasses declare the fields ``text`` and ``image``; ``of`` reads one."""

    def of(self, modality: Modality) -> T:
        if modality not in ("text", "image"):
            raise ValueError(f"unknown modality {modality!r}; expected 'text' or 'image'")
        return getattr(self, modality)
