"""The sources stage: hashes of the inputs outside the project."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.stages import sources as sources_stage
from components.stages.sources import SourcesInputs, SourcesSummary

if TYPE_CHECKING:
    from flows.stages import StageContext


def source_hashes(ctx: StageContext, inp: SourcesInputs) -> dict[str, Any]:
    return sources_stage.source_hashes(inp, ctx.root).model_dump(mode="json")


def run(ctx: StageContext, inp: SourcesInputs, out: Path) -> SourcesSummary:
    return sources_stage.run(inp, ctx.root, out)
