"""One implementation per stage, two drivers: the Prefect retrain flow and `medexperts stage NAME` (DVC).

``STAGES`` is the one table of the pipeline: per stage, its typed inputs (exactly the params it reads), what it
needs from upstream, its component call and what it records in MLflow. The stage fingerprint hashes exactly
those inputs, the upstream fingerprints and the code; ``dvc.yaml`` is generated from the same table
(``flows/dvc_yaml.py``), so the two drivers cannot disagree on what a stage depends on.

Each stage: fingerprint -> skip if its output already has it -> else call the component into an atomic
folder -> log a child MLflow run.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import components
from components.core import stop
from components.config import SECTIONS, Params
from components.core.artifacts import atomic_dir, mark_stage, read_json, read_model, stage_is_current, write_model
from components.core.errors import ArtifactError
from components.core.fingerprint import imported_files, json_hash, sha256_file
from components.core.layout import STAGE_FILE, SUMMARY_FILE, checkpoints_root, stage_checkpoints, stage_dir
from components.stages.base import StageInputs, StageSummary
from components.tracking import runs
from components.tracking.lineage import git_info
from components.stages.data import DataInputs, DataSummary
from components.stages.decompose import DecomposeInputs, DecomposeSummary
from components.stages.evaluate import EvaluateInputs, EvaluateSummary
from components.stages.experts import ExpertsInputs, ExpertsSummary
from components.stages.federated import FederatedInputs, FederatedSummary
from components.stages.foundation import FoundationInputs, FoundationSummary
from components.stages.fusion import FusionInputs, FusionSummary
from components.stages.promote import PromoteInputs, PromoteSummary
from components.stages.routing import RoutingInputs, RoutingSummary
from components.stages.sources import SourcesInputs, SourcesSummary
from flows import stage_logs
from flows.stage_impl import (data, decompose, evaluate, experts, federated, foundation, fusion, promote, routing,
                              sources)

log = logging.getLogger("medexperts")

# The driver and the stage table: part of every stage's code (``stage_code``).
DRIVER = "flows/stages.py"
ROOT = Path(components.__file__).parent.parent


Mapper = Callable[[Callable[[Any], Any], list[Any]], list[Any]]


def run_in_turn(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """The default mapper: one item after another, in this process."""
    return [fn(item) for item in items]


@dataclass
class StageContext:
    root: Path
    artifacts: Path
    params: Params
    parent_run_id: str | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)  # of the stages run in this context
    # How a stage runs its independent jobs (the experts stage: one per task): in turn here, or fanned out by the
    # flow's task runner (flows.fanout). Not pickled with the context (a stage task sent to a worker runs in turn).
    map: Mapper = field(default=run_in_turn, compare=False)
    driver_pid: int = field(default_factory=os.getpid)  # the flow's process; any other is a task-runner worker

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "map": run_in_turn}

    def out(self, stage: str) -> Path:
        return stage_dir(self.artifacts, stage)

    def checkpoints(self, stage: str) -> Path:
        """Training checkpoints of a stage, outside its atomic output folder so a killed run leaves them; keyed
        by the stage fingerprint, so a run with other params, data or code never resumes from them."""
        return stage_checkpoints(self.artifacts, stage, self.fingerprints[stage])


@contextlib.contextmanager
def task_environment(ctx: StageContext) -> Iterator[None]:
    """What a stage or an expert job needs wherever the task runner put it: in a worker process (Dask), the
    project's tracking store and MLflow experiment; everywhere, ``pipeline.runner.torch_threads``."""
    import torch

    from flows.environment import configure, mlruns_uri

    if os.getpid() != ctx.driver_pid:
        configure(ctx.root)
        runs.use_experiment(ctx.params.pipeline.experiment, mlruns_uri(ctx.root))
    threads, before = ctx.params.pipeline.runner.torch_threads, torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Stage:
    inputs: type[StageInputs]
    summary: type[StageSummary]
    # Upstream, relative to the artifacts folder: a stage folder (its fingerprint counts) or a file (its sha256).
    needs: tuple[str, ...]
    run: Callable[[StageContext, Any, Path], StageSummary]
    log: Callable[[StageContext, Any, Any, Path], None]
    # Fingerprinted besides the inputs: what no params file holds (hashes of files outside the project, the
    # tracking server a promotion registers in). DVC cannot see these: such a stage is `always_changed` there.
    extra: Callable[[StageContext, Any], dict[str, Any]] | None = None
    cache: bool = True  # DVC caches the output (promote's output is a record of registry calls: not cached)
    always_changed: bool = False  # DVC runs it at every `dvc repro` (it reads what DVC cannot watch)
    code_dirs: tuple[str, ...] = ()  # folders whose every .py file is its code, besides what its glue imports


def stage_code(name: str) -> tuple[str, ...]:
    """The project files whose code decides stage ``name``'s output: what its fingerprint hashes and what dvc.yaml
    lists as its code deps. The driver and table (``flows/stages.py``), and every file of ``components`` and
    ``flows.stage_impl`` reached by import from the stage's glue module (``flows/stage_impl/<name>.py``, the module
    of its ``run``) and from the driver's library imports. Not followed: imports under ``TYPE_CHECKING`` (they never
    run); the table's imports of every stage's Inputs / Summary types (each stage reaches its own through its glue);
    ``flows/stage_logs.py`` (a stage's MLflow records are made after its output is complete). Plus every file under
    the stage's ``code_dirs`` (promote copies the whole library into each model it registers). A change elsewhere,
    say in a later stage's module, does not re-run it: a fix in fusion does not retrain the foundation."""
    stage = STAGES[name]
    roots = [stage.run.__module__]
    for node in ast.parse((ROOT / DRIVER).read_text()).body:  # the driver's library imports, less the stages' own
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components"):
            roots += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            roots += [a.name for a in node.names if a.name.startswith("components")]
    stage_modules = {f"components.stages.{other}" for other in STAGES}  # the table's Inputs / Summary types
    roots = [roots[0], *(m for m in roots[1:] if not m.startswith(tuple(stage_modules)))]
    # The params package imports every section's model (components/config/__init__.py, params.py): that import
    # alone does not make a section's model the stage's code (or adding a FedKIM param would retrain the
    # foundation); the values the stage reads are hashed as its inputs. Its code does use the models it imports by
    # name (`from components.config import LoraParams` counts components/config/experts.py: imported_files follows
    # the package's re-exports).
    read = {key.split(".")[0] for key in stage.inputs.param_keys().values()}
    unread = {f"components.config.{s}" for s in SECTIONS if s not in read}

    def skip(importer: str, module: str) -> bool:
        return importer in ("components.config", "components.config.params") and module in unread

    files = set(imported_files(roots, ROOT, ("components", "flows.stage_impl"), skip))
    for folder in stage.code_dirs:
        files |= {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts}
    return (DRIVER, *sorted(files))


def _code_hash(name: str) -> str:
    return json_hash({f: sha256_file(ROOT / f) for f in stage_code(name)})


def _upstream(ctx: StageContext, need: str) -> str:
    path = ctx.artifacts / need
    if path.is_dir():
        stage_file = path / STAGE_FILE
        return read_json(stage_file, f"{need} stage output").get("fingerprint", "missing") if stage_file.is_file() \
            else "missing"
    return sha256_file(path) if path.is_file() else "missing"


def fingerprint(name: str, ctx: StageContext) -> tuple[str, dict[str, str], StageInputs]:
    """Hash of what decides a stage's output; the upstream fingerprints it used; its inputs."""
    stage = STAGES[name]
    inp = stage.inputs.from_params(ctx.params)
    upstream = {need: _upstream(ctx, need) for need in stage.needs}
    payload = {"stage": name, "inputs": inp.model_dump(mode="json"), "upstream": upstream, "code": _code_hash(name),
               "extra": stage.extra(ctx, inp) if stage.extra else {}}
    return json_hash(payload), upstream, inp


def run_stage(name: str, ctx: StageContext, force: bool = False) -> StageSummary:
    """Run (or skip) one stage inside a nested MLflow run; returns its summary."""
    stop.check(f"the start of stage {name}")
    with task_environment(ctx):
        return _run_stage(name, ctx, force)


def _run_stage(name: str, ctx: StageContext, force: bool) -> StageSummary:
    stage = STAGES[name]
    fp, upstream, inp = fingerprint(name, ctx)
    out = ctx.out(name)
    tags = {"stage": name, "fingerprint": fp, "profile": ctx.params.pipeline.profile, **git_info(ctx.root)}
    with runs.run(f"stage:{name}", nested=True, parent_run_id=ctx.parent_run_id, tags=tags):
        if not force and stage_is_current(out, fp) and (out / SUMMARY_FILE).is_file():
            log.info("[%s] inputs, params and code unchanged: skipped (fingerprint %s)", name, fp[:12])
            runs.set_tags({"skipped": "true"})
            cached = read_model(out / SUMMARY_FILE, stage.summary, f"{name} summary")
            return cached.model_copy(update={"cached": True})
        for need, value in upstream.items():
            if value == "missing":
                owner = need.split("/")[0]  # a need is a stage folder or a file inside one
                raise ArtifactError(f"stage {name!r} needs the output of stage {owner!r} ({ctx.artifacts / need}); "
                                    "run it first")
        runs.set_tags({"skipped": "false"})
        ctx.fingerprints[name] = fp
        log.info("[%s] started%s", name, _last_time(out))
        with atomic_dir(out) as tmp:
            start = time.perf_counter()
            summary = stage.run(ctx, inp, tmp)
            summary.compute_seconds = time.perf_counter() - start
            write_model(tmp / SUMMARY_FILE, summary)
            mark_stage(tmp, fp, upstream)
        shutil.rmtree(checkpoints_root(ctx.artifacts) / name, ignore_errors=True)  # done: resume points obsolete
        stage.log(ctx, inp, summary, out)
        log.info("[%s] done in %.1f s", name, summary.compute_seconds)
        return summary


def _last_time(out: Path) -> str:
    """' (last run: N s)' from the output being replaced: the best ETA there is for a stage."""
    try:
        seconds = json.loads((out / SUMMARY_FILE).read_text()).get("compute_seconds")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (last run took {seconds:.0f} s)" if isinstance(seconds, (int, float)) and seconds > 0 else ""


# --------------------------------------------------------------------------- the stages
STAGES: dict[str, Stage] = {
    "sources": Stage(SourcesInputs, SourcesSummary, (), sources.run, stage_logs.log_sources,
                     extra=sources.source_hashes, always_changed=True),
    "data": Stage(DataInputs, DataSummary, ("sources/data.json",), data.run, stage_logs.log_data),
    "foundation": Stage(FoundationInputs, FoundationSummary, ("data", "sources/foundation.json"), foundation.run,
                        stage_logs.log_foundation),
    "experts": Stage(ExpertsInputs, ExpertsSummary, ("data", "foundation"), experts.run, stage_logs.log_experts),
    "federated": Stage(FederatedInputs, FederatedSummary, ("data", "foundation"), federated.run,
                       stage_logs.log_federated, extra=federated.flower_run_inputs),
    # after the experts: a modality whose decompose.teacher is `expert` distils the deployed experts
    "decompose": Stage(DecomposeInputs, DecomposeSummary, ("data", "foundation", "experts"), decompose.run,
                       stage_logs.log_decompose),
    "routing": Stage(RoutingInputs, RoutingSummary, ("data", "foundation", "experts"), routing.run,
                     stage_logs.log_routing),
    "fusion": Stage(FusionInputs, FusionSummary, ("data", "foundation", "experts"), fusion.run, stage_logs.log_fusion),
    "evaluate": Stage(EvaluateInputs, EvaluateSummary,
                      ("data", "foundation", "experts", "decompose", "federated", "routing", "fusion"),
                      evaluate.run, stage_logs.log_evaluate),
    # its models carry a copy of the whole library (components.tracking.registry): all of it is its code
    "promote": Stage(PromoteInputs, PromoteSummary,
                     ("data", "experts", "decompose", "federated", "routing", "fusion", "evaluate"),
                     promote.run, stage_logs.log_promote, extra=promote.registry_target, cache=False,
                     code_dirs=("components",)),
}
ORDER: tuple[str, ...] = tuple(STAGES)
