"""params/fusion.yaml: merge methods and their coefficient grids."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from components.config.base import Modality, Strict

# The merge registry (components/fusion/merge.py) checks at import that it implements exactly these.
MergeMethodName = Literal["average", "task_arithmetic", "ties", "dare_linear", "dare_ties"]


class FusionParams(Strict):
    modality: Modality = Field("text", description="Experts of this modality are merged.")
    methods: list[MergeMethodName] = Field(
        default_factory=lambda: ["average", "task_arithmetic", "ties", "dare_ties"], min_length=1,
        description="Merge methods run, each with its coefficients searched on validation: average | "
        "task_arithmetic | ties | dare_linear | dare_ties (the registry in components/fusion/merge.py)."
    )
    lambdas: list[float] = Field(
        default_factory=lambda: [0.2, 0.6, 1.0], min_length=1,
        description="λ grid (scale of the merged update) of every method but average, each in (0, 2]."
    )
    ks: list[float] = Field(
        default_factory=lambda: [0.2, 0.5], min_length=1,
        description="TIES top-k fractions searched (ties, dare_ties), each in (0, 1]; 1 keeps every entry."
    )
    ps: list[float] = Field(
        default_factory=lambda: [0.5], min_length=1,
        description="DARE drop probabilities searched (dare_linear, dare_ties), each in [0, 1); masks seeded "
        "by pipeline.seed."
    )
    lora_space: Literal["delta_w", "adapter"] = Field(
        "delta_w", description="Space LoRA task vectors are merged in: delta_w = the dense update s·B·A per layer "
        "(any expert method); adapter = A and B merged separately, ΔW = s·B_merged·A_merged (plain lora only)."
    )
    max_val_samples: int | None = Field(None, ge=1, description="Cap on validation samples per task.")

    @field_validator("methods")
    @classmethod
    def _distinct(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError("lists a merge method twice")
        return methods

    @field_validator("lambdas", "ks", "ps")
    @classmethod
    def _in_range(cls, grid: list[float], info: Any) -> list[float]:  # info: pydantic's ValidationInfo
        # merge() takes any λ > 0; past 2 the summed update overshoots every expert, not worth a grid point.
        name, low, high, closed_low = {"lambdas": ("λ", 0, 2, False), "ks": ("k", 0, 1, False),
                                       "ps": ("p", 0, 1, True)}[info.field_name]
        for x in grid:
            inside = (low <= x if closed_low else low < x) and (x <= high if name != "p" else x < high)
            if not inside:
                interval = ("[" if closed_low else "(") + f"{low}, {high}" + (")" if name == "p" else "]")
                raise ValueError(f"every {name} must lie in {interval}; got {x}")
        if len(set(grid)) != len(grid):
            raise ValueError(f"lists a {name} value twice")
        return grid
