"""The promote stage: register every candidate with its lineage, gate it into the registry's aliases."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core.artifacts import read_json
from components.core.layout import STAGE_FILE
from components.stages import promote as promote_stage
from components.stages.promote import PromoteInputs, PromoteSummary
from components.tracking import runs
from components.tracking.lineage import git_info
from components.tracking.registry import gate, register_bundle, registered, settle

if TYPE_CHECKING:
    from flows.stages import StageContext

logger = logging.getLogger("medexperts")


def registry_target(ctx: StageContext, inp: PromoteInputs) -> dict[str, Any]:
    """Promotion registers in the tracking server: another server is another registry, so the stage re-runs."""
    return {"tracking_uri": runs.tracking_uri()}


def run(ctx: StageContext, inp: PromoteInputs, out: Path) -> PromoteSummary:
    # Lineage: the fingerprint chain from raw data (source hashes) to this model, plus the git commit.
    lineage = {**git_info(ctx.root), "profile": inp.profile, "metric": inp.metric,
               **{f"fingerprint.{s}": read_json(ctx.out(s) / STAGE_FILE).get("fingerprint", "")
                  for s in ("sources", "data", "foundation", "experts", "decompose", "federated", "routing", "fusion",
                            "evaluate")}}
    decisions = []
    fp = ctx.fingerprints.get("promote", "")
    for c in promote_stage.candidates(inp, ctx.out("experts"), ctx.out("decompose"), ctx.out("fusion"),
                                      ctx.out("routing"), ctx.out("federated"), ctx.out("data")):
        # idempotent: a version this very promote (same fingerprint) created before a kill is reused, not duplicated
        found = registered(c.name, fp) if fp else None
        if found is not None and found[1] is not None:
            logger.info("[promote] %s v%s: registered and gated by an earlier, interrupted run; kept", c.name, found[0])
            decisions.append(found[1])
            continue
        if found is not None:
            logger.info("[promote] %s v%s: registered by an interrupted run, not gated yet; completing it", c.name,
                     found[0])
            version = found[0]
        else:
            version = register_bundle(c.name, c.bundle, c.metric, {**lineage, **c.tags}, needs=c.needs,
                                      registration=fp or None)
            if fp:  # another run promoting the same outputs at this moment (team mode): one version for both
                version = settle(c.name, fp, version)
        d = gate(c.name, version, c.metric, inp.registry.margin, inp.registry.floor_for(c.name))
        decisions.append(d)
    return PromoteSummary(decisions=decisions)
