"""params/pipeline.yaml: profile, MLflow experiment, global seed, the project's Prefect server."""

from __future__ import annotations

from pydantic import Field

from components.config.base import Strict


class PrefectServerParams(Strict):
    """The project's own Prefect server (``medexperts services status|down``), on 127.0.0.1."""

    port: int = Field(4200, ge=0, le=65535,
                      description="Port on 127.0.0.1; 0 picks a free one at first start (env MEDEXPERTS_PREFECT_PORT "
                                  "overrides).")
    startup_timeout_s: float = Field(300.0, gt=0, description="How long to wait for the server to answer at start.")


class PipelineParams(Strict):
    profile: str = Field("quick", description="Profile under params/profiles/ merged over these files.")
    experiment: str = Field("medexperts", description="MLflow experiment name.")
    seed: int = Field(42, description="Global seed for every stochastic step.")
    prefect: PrefectServerParams = Field(default_factory=PrefectServerParams)
