"""params/pipeline.yaml: profile, MLflow experiment, global seed, the project's Prefect server."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from components.config.base import Strict


class PrefectServerParams(Strict):
    """The project's own Prefect server (``medexperts services status|down``), on 127.0.0.1."""

    port: int = Field(4200, ge=0, le=65535,
                      description="Port on 127.0.0.1; 0 picks a free one at first start (env MEDEXPERTS_PREFECT_PORT "
                                  "overrides).")
    startup_timeout_s: float = Field(300.0, gt=0, description="How long to wait for the server to answer at start.")


class TeamParams(Strict):
    """Team mode (``medexperts services up --team``): PostgreSQL, an MLflow tracking server and the Prefect server
    on it, on 127.0.0.1, data under ``<project>/.team`` (``MEDEXPERTS_TEAM_DIR``). Ports: 0 picks free ones."""

    postgres_port: int = Field(5433, ge=0, le=65535, description="PostgreSQL's port.")
    mlflow_port: int = Field(5050, ge=0, le=65535, description="The MLflow tracking server's port.")
    prefect_port: int = Field(4250, ge=0, le=65535, description="The team Prefect server's port.")
    startup_timeout_s: float = Field(300.0, gt=0, description="How long each server may take to answer at start.")


class RunnerParams(Strict):
    """Where the retrain flow's Prefect tasks run. ``local``: one after another in the flow's process. ``dask``:
    Prefect's DaskTaskRunner (prefect-dask): the stages that need only the data and the foundation (experts,
    decompose, federated) run side by side, and each task's expert is its own Prefect task; on a ``LocalCluster`` of
    ``workers`` processes, or on a running Dask scheduler at ``address`` (workers on several machines)."""

    kind: Literal["local", "dask"] = Field("local", description="local: in-process, one task at a time; dask: "
                                           "Prefect's DaskTaskRunner.")
    address: str | None = Field(None, description="A running Dask scheduler (tcp://host:8786); None: start a "
                                "LocalCluster for the run.")
    cluster_class: str = Field("distributed.LocalCluster", description="The cluster started when no address is "
                               "given; dask_cuda.LocalCUDACluster gives one worker per GPU, each pinned to its GPU.")
    workers: int = Field(2, ge=1, description="LocalCluster worker processes.")
    threads_per_worker: int = Field(1, ge=1, description="Dask threads per worker (1: one task at a time each).")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in every stage and expert "
                                      "task; CPU results are bit-identical across runners only at one thread count.")


class PipelineParams(Strict):
    profile: str = Field("quick", description="Profile under params/profiles/ merged over these files.")
    experiment: str = Field("medexperts", description="MLflow experiment name.")
    seed: int = Field(42, description="Global seed for every stochastic step.")
    prefect: PrefectServerParams = Field(default_factory=PrefectServerParams)
    runner: RunnerParams = Field(default_factory=RunnerParams)
    team: TeamParams = Field(default_factory=TeamParams)
