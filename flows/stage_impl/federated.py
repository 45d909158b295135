"""The federated stage (FedKIM)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.stages import federated as federated_stage
from components.stages.federated import FederatedInputs, FederatedSummary
from components.tracking import runs

if TYPE_CHECKING:
    from flows.stages import StageContext


def flower_run_inputs(ctx: StageContext, inp: FederatedInputs) -> dict[str, Any]:
    """With ``federated.clients_from``: the Flower run's files are an input, so a new run there re-runs the stage."""
    return federated_stage.flower_run_inputs(inp)


def run(ctx: StageContext, inp: FederatedInputs, out: Path) -> FederatedSummary:
    def log_step(metrics: dict[str, float], step: int) -> None:
        runs.log_metrics(metrics, prefix="round.", step=step)

    return federated_stage.run(inp, ctx.out("data"), ctx.out("foundation"), out,
                               on_round=federated_stage.round_logger(log_step))
