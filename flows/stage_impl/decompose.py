"""The decompose stage (LoRKD)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from components.stages import decompose as decompose_stage
from components.stages.decompose import DecomposeInputs, DecomposeSummary
from components.tracking import runs

if TYPE_CHECKING:
    from flows.stages import StageContext


def run(ctx: StageContext, inp: DecomposeInputs, out: Path) -> DecomposeSummary:
    return decompose_stage.run(inp, ctx.out("data"), ctx.out("foundation"), out, logger=runs.lightning_logger(),
                               checkpoint_dir=ctx.checkpoints("decompose"), experts_dir=ctx.out("experts"))
