"""The evaluate stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from components.stages import evaluate as evaluate_stage
from components.stages.evaluate import EvaluateInputs, EvaluateSummary

if TYPE_CHECKING:
    from flows.stages import StageContext


def run(ctx: StageContext, inp: EvaluateInputs, out: Path) -> EvaluateSummary:
    return evaluate_stage.evaluate_models(inp, ctx.out("data"), ctx.out("foundation"), ctx.out("experts"),
                                          ctx.out("fusion"), out, ctx.out("decompose"), ctx.out("routing"),
                                          ctx.out("federated"))
