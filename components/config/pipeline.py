"""params/pipeline.yaml: profile, MLflow experiment, global seed."""

from __future__ import annotations

from pydantic import Field

from components.config.base import Strict


class PipelineParams(Strict):
    profile: str = Field("quick", description="Profile under params/profiles/ merged over these files.")
    experiment: str = Field("medexperts", description="MLflow experiment name.")
    seed: int = Field(42, description="Global seed for every stochastic step.")
