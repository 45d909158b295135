"""One implementation per stage, two drivers: the Prefect retrain flow and `medexperts stage NAME` (DVC).

Each stage: fingerprint (params + upstream fingerprints + code) -> skip if its output already has it ->
else call the component into an atomic folder -> log a child MLflow run.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

import components
from components.core.artifacts import STAGE_FILE, SUMMARY_FILE, atomic_dir, mark_stage, read_json, stage_is_current, write_json
from components.config import Params, expand_env
from components.core.errors import ArtifactError
from components.core.fingerprint import code_hash, json_hash, sha256_file, tree_hash
from components.nn.encoders import resolve_text_source
from components.nn.foundation import text_weights_hash
from components.tracking.lineage import git_info
from flows import stage_impl as impl

log = logging.getLogger("medexperts")


@dataclass
class StageContext:
    root: Path
    artifacts: Path
    params: Params
    parent_run_id: str | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)  # of the stages run in this context

    def out(self, stage: str) -> Path:
        return self.artifacts / stage

    def checkpoints(self, stage: str) -> Path:
        """Training checkpoints of a stage, outside its atomic output folder so a killed run leaves them; keyed
        by the stage fingerprint, so a run with other params, data or code never resumes from them."""
        return self.artifacts / "checkpoints" / stage / self.fingerprints[stage][:16]


@dataclass(frozen=True)
class Stage:
    needs: tuple[str, ...]
    params: Callable[[Params], Any]
    run: Callable[[StageContext, Path], dict[str, Any]]
    log: Callable[[StageContext, Path, dict[str, Any]], None]


def _source_hashes(ctx: StageContext) -> dict[str, str]:
    out = {}
    for name, spec in ctx.params.data.active_tasks().items():
        for raw in filter(None, (spec.path, spec.test_ids_path)):
            path = Path(expand_env(raw))
            path = path if path.is_absolute() else ctx.root / path
            out[f"{name}:{raw}"] = tree_hash(path) if path.exists() else "missing"
    return out


def _foundation_sources(ctx: StageContext) -> dict[str, str]:
    """Hashes of the weights the foundation stage starts from (a new package version or checkpoint re-runs it)."""
    out = {}
    fp = ctx.params.foundation
    if ctx.params.data.active_tasks("text"):
        out["text_weights"] = text_weights_hash(resolve_text_source(fp.text.source, ctx.root))
    if ctx.params.data.active_tasks("image") and fp.image.source != "pretrain":
        path = ctx.root / fp.image.source
        out["image_checkpoint"] = tree_hash(path) if path.exists() else "missing"
    return out


def _code_hash() -> str:
    """Stage code: the library plus the stage table and implementations here."""
    here = Path(__file__).parent
    return json_hash([code_hash(Path(components.__file__).parent),
                      *(sha256_file(here / f) for f in ("stages.py", "stage_impl.py"))])


def fingerprint(name: str, ctx: StageContext) -> tuple[str, dict[str, str]]:
    """Hash of what decides a stage's output; and the upstream fingerprints it used."""
    inputs = {}
    for up in STAGES[name].needs:
        stage_file = ctx.out(up) / STAGE_FILE
        inputs[up] = read_json(stage_file, f"{up} stage output").get("fingerprint") if stage_file.is_file() else "missing"
    if name == "data":
        inputs.update(_source_hashes(ctx))
    if name == "foundation":
        inputs.update(_foundation_sources(ctx))
    payload = {"stage": name, "params": STAGES[name].params(ctx.params), "seed": ctx.params.pipeline.seed,
               "inputs": inputs, "code": _code_hash()}
    return json_hash(payload), inputs


def run_stage(name: str, ctx: StageContext, force: bool = False) -> dict[str, Any]:
    """Run (or skip) one stage inside a nested MLflow run; returns its summary."""
    stage = STAGES[name]
    fp, inputs = fingerprint(name, ctx)
    out = ctx.out(name)
    tags = {"stage": name, "fingerprint": fp, "profile": ctx.params.pipeline.profile, **git_info(ctx.root)}
    try:
        run = mlflow.start_run(run_name=f"stage:{name}", nested=True, parent_run_id=ctx.parent_run_id, tags=tags)
    except MlflowException as exc:
        raise ArtifactError(f"cannot start the MLflow run of stage {name!r} (parent {ctx.parent_run_id}): "
                            f"{exc.message.splitlines()[0]}") from None
    with run:
        if not force and stage_is_current(out, fp) and (out / SUMMARY_FILE).is_file():
            log.info("[%s] inputs, params and code unchanged: skipped (fingerprint %s)", name, fp[:12])
            mlflow.set_tag("skipped", "true")
            return read_json(out / SUMMARY_FILE)
        for up in stage.needs:
            if inputs.get(up) == "missing":
                raise ArtifactError(f"stage {name!r} needs the output of stage {up!r} ({ctx.out(up)}); run it first")
        mlflow.set_tag("skipped", "false")
        ctx.fingerprints[name] = fp
        with atomic_dir(out) as tmp:
            start = time.perf_counter()
            summary = stage.run(ctx, tmp)
            summary["compute_seconds"] = time.perf_counter() - start
            write_json(tmp / SUMMARY_FILE, summary)
            mark_stage(tmp, fp, inputs)
        shutil.rmtree(ctx.artifacts / "checkpoints" / name, ignore_errors=True)  # done: resume points obsolete
        stage.log(ctx, out, summary)
        return summary


# --------------------------------------------------------------------------- the stages
STAGES: dict[str, Stage] = {
    "data": Stage((), lambda p: p.data.model_dump(mode="json"), impl.run_data, impl.log_data),
    "foundation": Stage(("data",), lambda p: {"foundation": p.foundation.model_dump(mode="json"),
                                              "image_tasks": list(p.data.active_tasks("image"))},
                        impl.run_foundation, impl.log_foundation),
    "experts": Stage(("data", "foundation"), lambda p: {"experts": p.experts.model_dump(mode="json"),
                                                       "metric": p.evaluate.primary_metric,
                                                       "tasks": p.data.active},
                     impl.run_experts, impl.log_experts),
    "decompose": Stage(("data", "foundation"), lambda p: {"decompose": p.decompose.model_dump(mode="json"),
                                                       "metric": p.evaluate.primary_metric, "tasks": p.data.active,
                                                       "probe": p.experts.probe.model_dump(mode="json")},
                       impl.run_decompose, impl.log_decompose),
    "fusion": Stage(("data", "foundation", "experts"), lambda p: {"fusion": p.fusion.model_dump(mode="json"),
                                                                  "metric": p.evaluate.primary_metric},
                    impl.run_fusion, impl.log_fusion),
    "evaluate": Stage(("data", "foundation", "experts", "decompose", "fusion"), lambda p: p.evaluate.model_dump(mode="json"),
                      impl.run_evaluate, impl.log_evaluate),
    "promote": Stage(("experts", "decompose", "fusion", "evaluate"), lambda p: {"registry": p.registry.model_dump(mode="json"),
                                                                   "tracking_uri": mlflow.get_tracking_uri()},
                     impl.run_promote, impl.log_promote),
}
ORDER: tuple[str, ...] = tuple(STAGES)
