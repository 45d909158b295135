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
import functools
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
from components.config import Params
from components.core.artifacts import atomic_dir, mark_stage, read_json, read_model, stage_is_current, write_model
from components.core.errors import ArtifactError
from components.core.fingerprint import imported_files, json_hash, sha256_bytes, sha256_file
from components.core.layout import STAGE_FILE, SUMMARY_FILE, checkpoints_root, stage_checkpoints, stage_dir
from components.stages.base import StageInputs, StageSummary
from components.tracking import runs
from components.tracking.lineage import git_info
from flows import stage_impl as impl

log = logging.getLogger("medexperts")

# What a stage's fingerprint hashes as its code, and what dvc.yaml lists as its code deps (``stage_code``): the
# stage table and implementations here, plus the library modules the stage reaches by import.
FLOW_CODE: tuple[str, ...] = ("flows/stages.py", "flows/stage_impl.py")
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


@functools.cache
def _stage_code(name: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """(files, {definition in ``flows/stage_impl.py``: its source}) whose code decides stage ``name``'s output:
    ``flows/stages.py`` (the driver and the table); in ``stage_impl``, its ``run_<name>`` and the module-level
    definitions that uses, transitively (its ``log_<name>`` writes MLflow records, not the stage's output; the
    other stages' glue is not its code); and every ``components`` module reached by import from the stage's own
    module (``components/stages/<name>.py``), from the driver's library imports and from the library names those
    definitions use. A change in one of them re-runs the stage; a change elsewhere, say in a later stage's module,
    does not: a fix in fusion does not retrain the foundation. A docstring edit in one of them re-runs it:
    conservative and simple."""
    roots = [f"components.stages.{name}", *_library_imports(ROOT / FLOW_CODE[0])]
    impl_imports = _library_imports(ROOT / FLOW_CODE[1], by_name=True)
    source = (ROOT / FLOW_CODE[1]).read_text()
    definitions = _definitions(source)
    todo, seen = [f"run_{name}"], set()
    while todo:  # run_<name> and what it uses, for the library names they use
        used = todo.pop()
        if used in seen or used not in definitions:
            continue
        seen.add(used)
        for node in ast.walk(definitions[used]):
            if isinstance(node, ast.Name):
                todo.append(node.id)
                roots += impl_imports.get(node.id, [])
    lines = source.splitlines()
    segments = {}
    for used in sorted(seen):  # a definition's lines, its decorators included
        node = definitions[used]
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        segments[used] = "\n".join(lines[first - 1:node.end_lineno])
    return (FLOW_CODE[0], *imported_files(roots, ROOT, "components")), segments


def _definitions(source: str) -> dict[str, ast.stmt]:
    """A module's top-level functions, classes and assigned names."""
    out: dict[str, ast.stmt] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    out[target.id] = node
    return out


def _library_imports(path: Path, by_name: bool = False) -> Any:
    """The ``components`` modules a file imports at its top level: a list, or (``by_name``) local name -> modules
    (``from a import b`` gives ``a`` and ``a.b``: ``b`` is a module or a name in ``a``)."""
    names: dict[str, list[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components"):
            for alias in node.names:
                names[alias.asname or alias.name] = [node.module, f"{node.module}.{alias.name}"]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("components"):
                    names[alias.asname or alias.name.split(".")[0]] = [alias.name]
    return names if by_name else [m for modules in names.values() for m in modules]


def stage_code(name: str) -> tuple[str, ...]:
    """The files stage ``name``'s code lives in (``_stage_code``), ``flows/stage_impl.py`` whole: dvc.yaml's code
    deps. DVC sees files, not definitions, so it re-runs a stage on an edit of another stage's glue there; the
    stage's own fingerprint then finds its code unchanged and skips it."""
    return (*FLOW_CODE, *_stage_code(name)[0][1:])


def _code_hash(name: str) -> str:
    files, segments = _stage_code(name)
    return json_hash({f: sha256_file(ROOT / f) for f in files}
                     | {f"{FLOW_CODE[1]}:{n}": sha256_bytes(text.encode()) for n, text in segments.items()})


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
    "sources": Stage(impl.SourcesInputs, impl.SourcesSummary, (), impl.run_sources, impl.log_sources,
                     extra=impl.source_hashes, always_changed=True),
    "data": Stage(impl.DataInputs, impl.DataSummary, ("sources/data.json",), impl.run_data, impl.log_data),
    "foundation": Stage(impl.FoundationInputs, impl.FoundationSummary, ("data", "sources/foundation.json"),
                        impl.run_foundation, impl.log_foundation),
    "experts": Stage(impl.ExpertsInputs, impl.ExpertsSummary, ("data", "foundation"), impl.run_experts,
                     impl.log_experts),
    "federated": Stage(impl.FederatedInputs, impl.FederatedSummary, ("data", "foundation"), impl.run_federated,
                       impl.log_federated, extra=impl.flower_run_inputs),
    # after the experts: a modality whose decompose.teacher is `expert` distils the deployed experts
    "decompose": Stage(impl.DecomposeInputs, impl.DecomposeSummary, ("data", "foundation", "experts"),
                       impl.run_decompose, impl.log_decompose),
    "routing": Stage(impl.RoutingInputs, impl.RoutingSummary, ("data", "foundation", "experts"), impl.run_routing,
                     impl.log_routing),
    "fusion": Stage(impl.FusionInputs, impl.FusionSummary, ("data", "foundation", "experts"), impl.run_fusion,
                    impl.log_fusion),
    "evaluate": Stage(impl.EvaluateInputs, impl.EvaluateSummary,
                      ("data", "foundation", "experts", "decompose", "federated", "routing", "fusion"),
                      impl.run_evaluate, impl.log_evaluate),
    "promote": Stage(impl.PromoteInputs, impl.PromoteSummary,
                     ("data", "experts", "decompose", "federated", "routing", "fusion", "evaluate"),
                     impl.run_promote, impl.log_promote, extra=impl.registry_target, cache=False),
}
ORDER: tuple[str, ...] = tuple(STAGES)
