"""The foundation stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from components.stages import foundation as foundation_stage
from components.stages.foundation import FoundationInputs, FoundationSummary

if TYPE_CHECKING:
    from flows.stages import StageContext


def run(ctx: StageContext, inp: FoundationInputs, out: Path) -> FoundationSummary:
    return foundation_stage.run(inp, ctx.root, ctx.out("data"), out, checkpoint_dir=ctx.checkpoints("foundation"))
