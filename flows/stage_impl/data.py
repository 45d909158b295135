"""The data stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from components.stages import data as data_stage
from components.stages.data import DataInputs, DataSummary

if TYPE_CHECKING:
    from flows.stages import StageContext


def run(ctx: StageContext, inp: DataInputs, out: Path) -> DataSummary:
    return data_stage.run(inp, ctx.root, out)
