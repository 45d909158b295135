"""The routing stage (AT-MoE)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from components.stages import routing as routing_stage
from components.stages.routing import RoutingInputs, RoutingSummary
from components.tracking import runs

if TYPE_CHECKING:
    from flows.stages import StageContext


def run(ctx: StageContext, inp: RoutingInputs, out: Path) -> RoutingSummary:
    return routing_stage.run(inp, ctx.out("data"), ctx.out("foundation"), ctx.out("experts"), out,
                             logger=runs.lightning_logger(), checkpoint_dir=ctx.checkpoints("routing"))
