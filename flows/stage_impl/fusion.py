"""The fusion stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from components.stages import fusion as fusion_stage
from components.stages.fusion import FusionInputs, FusionSummary

if TYPE_CHECKING:
    from flows.stages import StageContext


def run(ctx: StageContext, inp: FusionInputs, out: Path) -> FusionSummary:
    return fusion_stage.run(inp, ctx.out("data"), ctx.out("foundation"), ctx.out("experts"), out)
