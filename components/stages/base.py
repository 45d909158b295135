"""What every stage has: typed inputs (exactly the params it reads) and a typed summary (what later stages read).

A stage's inputs model is frozen and names, per field, the params key it comes from (``param("fusion")``,
``param("evaluate.primary_metric")``). The driver builds it from the params tree with ``from_params``, the
stage's fingerprint hashes exactly it, and ``dvc.yaml``'s ``params:`` are generated from the same keys, so a
param a stage reads but its fingerprint misses cannot exist.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import Self

from pydantic import BaseModel, ConfigDict, Field

from components.config import Modality, Params, TaskSpec
from components.config.data import select_tasks

_PARAM = "param"


def param(key: str, description: str = "") -> Any:
    """A stage input read from the params tree at dotted ``key`` (``section`` or ``section.key.sub``)."""
    return Field(description=description or f"params {key}", json_schema_extra={_PARAM: key})


def _resolve(params: Params, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        node = getattr(node, part)
    return node


class StageInputs(BaseModel):
    """Base of every stage's inputs: frozen, no unknown fields, each field sourced from one params key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def param_keys(cls) -> dict[str, str]:
        """field -> dotted params key it is read from."""
        out = {}
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra
            if not isinstance(extra, dict) or _PARAM not in extra:
                raise TypeError(f"{cls.__name__}.{name}: every stage input must be declared with param('<key>')")
            out[name] = str(extra[_PARAM])
        return out

    @classmethod
    def from_params(cls, params: Params) -> Self:
        return cls(**{name: _resolve(params, key) for name, key in cls.param_keys().items()})


class TaskInputs(StageInputs):
    """Inputs of a stage that works on the active tasks (their specs: modality, kind, description, labels)."""

    tasks: dict[str, TaskSpec] = param("data.tasks")
    active: list[str] = param("data.active")

    def active_tasks(self, modality: Modality | None = None) -> dict[str, TaskSpec]:
        """Active task specs in declared order, optionally of one modality."""
        return select_tasks(self.tasks, self.active, modality)


class StageSummary(BaseModel):
    """Base of every stage's summary (``_summary.json``): unknown fields are errors, NaN stays NaN in JSON."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    compute_seconds: float | None = Field(None, description="Wall time of the stage's component (set by the driver).")
    cached: bool = Field(False, description="True when the driver skipped the stage and returned this summary "
                                            "from its last run (never True on disk).")
