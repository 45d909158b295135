"""The end-to-end Prefect flow: every stage of ``flows.stages.ORDER`` (sources -> data -> foundation -> experts,
federated -> decompose, routing, fusion -> evaluate -> promote), then the outputs versioned with DVC."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from components.config import load_params
from components.core import stop
from components.core.fingerprint import json_hash
from components.core.lock import clean_dead_temporaries, project_lock
from components.tracking.lineage import git_info
from components.tracking import runs
from flows.environment import artifacts_dir, configure, mlruns_uri, project_dir
from flows.fanout import cancel, fan_out, gather, map_on
from flows.stages import ORDER, STAGES, StageContext, run_stage
from flows.versioning import dvc_commit

log = logging.getLogger("medexperts")


# Tasks take a context of paths and typed params, never tensors: nothing unpicklable reaches
# Prefect's cache machinery (prefect#17547); our own fingerprints decide what is skipped.
@task(name="stage", cache_policy=NONE)
def stage_task(name: str, ctx: StageContext, force: bool) -> dict[str, Any]:
    return run_stage(name, ctx, force=force).model_dump(mode="json")


@task(name="dvc-commit", cache_policy=NONE)
def version_task(ctx: StageContext, stages: list[str], as_dvc_would: bool) -> dict[str, str]:
    # dvc.yaml describes the default artifacts folder and the params files as they are: outputs made
    # with --profile/--set overrides must not be recorded as if dvc.yaml had produced them.
    if ctx.artifacts != ctx.root / "artifacts" or not as_dvc_would:
        return {}
    return dvc_commit(ctx.root, stages)


@flow(name="retrain", log_prints=True)
def retrain(profile: str | None = None, force: bool = False, stages: list[str] | None = None,
            overrides: dict[str, Any] | None = None, wait: bool = True) -> dict[str, Any]:
    """Run every stage (or ``stages``); unchanged stages are skipped; the data is versioned first.

    ``overrides`` maps dotted keys (``experts.lora.rank``) to values, applied over the profile. One run at a time
    per project: a second one waits for the first (``wait=False``: fails at once, naming the holder).
    """
    root = project_dir()
    configure(root)
    params = load_params(root / "params", profile, overrides)
    ctx = StageContext(root, artifacts_dir(root), params)
    with stopping_as_prefect_expects(), project_lock(ctx.artifacts, wait=wait,
                                                     what=f"retrain {params.pipeline.profile}"):
        clean_dead_temporaries(ctx.artifacts)
        return _retrain(root, ctx, params, force, stages, overrides)


@contextlib.contextmanager
def stopping_as_prefect_expects() -> Iterator[None]:
    """SIGTERM stops the run at its next safe point (``components.core.stop``); the stop then reaches Prefect as
    its own ``TerminationSignal``, so the flow run ends Crashed (or Cancelled, when Prefect's runner asked) and the
    process ends by SIGTERM, as a terminated process should."""
    from prefect.exceptions import TerminationSignal

    try:
        with stop.graceful():  # which also turns Lightning's own SIGTERM exit at an epoch end into StopRequested
            yield
    except stop.StopRequested as exc:
        log.warning("[stop] stopped at %s: this run's MLflow runs are FAILED, the previous outputs unchanged; "
                    "`medexperts run` again resumes", exc.where)
        raise TerminationSignal(exc.signum) from exc


def _retrain(root: Path, ctx: StageContext, params: Any, force: bool, stages: list[str] | None,
             overrides: dict[str, Any] | None) -> dict[str, Any]:
    experiment_id = runs.use_experiment(params.pipeline.experiment, mlruns_uri(root))
    for run_id, tags in runs.fail_orphans(experiment_id).items():  # RUNNING runs whose process is gone
        log.warning("marked MLflow run %s (%s) FAILED: the process that ran it is gone", run_id,
                    tags.get("mlflow.runName", "?"))
        if tags.get("prefect.flow_run_id"):
            _crash_flow_run(tags["prefect.flow_run_id"], run_id)
    selected = [s for s in ORDER if stages is None or s in stages]
    as_dvc_would = not overrides and params.pipeline.profile == load_params(root / "params").pipeline.profile
    tags = {**git_info(root), "profile": params.pipeline.profile, "driver": "prefect",
            "params_hash": json_hash(params.model_dump(mode="json")), **_prefect_tags()}
    results: dict[str, Any] = {}
    with runs.run(f"retrain:{params.pipeline.profile}", tags=tags) as parent_run_id, \
            fan_out(params.pipeline.runner) as runner:
        runs.log_params(params.pipeline.model_dump(exclude={"prefect", "team"}))  # where the server listens is not a run input
        ctx.parent_run_id = parent_run_id
        for wave in waves(selected) if runner else [[name] for name in selected]:
            results |= _run_wave(wave, ctx, force, runner)
            if "data" in wave:
                runs.set_tags(version_task(ctx, ["sources", "data"], as_dvc_would))
        runs.set_tags(version_task(ctx, selected, as_dvc_would))
        results["run_id"] = parent_run_id
    return results


def waves(selected: list[str]) -> list[list[str]]:
    """``selected`` (in ORDER) cut into groups that may run side by side: a stage joins the current group when it
    needs none of the group's stages (experts and federated need only the data and the foundation; decompose, routing
    and fusion read the experts as well)."""
    groups: list[list[str]] = []
    for name in selected:
        owners = {need.split("/")[0] for need in STAGES[name].needs}
        if groups and not owners & set(groups[-1]):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _run_wave(wave: list[str], ctx: StageContext, force: bool, runner: Any) -> dict[str, Any]:
    """One stage after another in this process; with a ``runner`` (Dask), the experts stage in this process with
    its per-task jobs mapped onto the runner, and the other stages of the wave submitted to it first, so they run
    beside it."""
    if runner is None:
        return {name: stage_task.with_options(name=f"stage:{name}")(name, ctx, force) for name in wave}
    here = "experts" if "experts" in wave else wave[0]
    futures = {name: runner.submit(stage_task.with_options(name=f"stage:{name}"),
                                   {"name": name, "ctx": ctx, "force": force}) for name in wave if name != here}
    try:
        if here == "experts":  # called from the flow itself: Prefect cannot send tasks submitted inside a task run
            mapped = dataclasses.replace(ctx, map=functools.partial(map_on, runner))
            results = {here: run_stage(here, mapped, force=force).model_dump(mode="json")}
        else:
            results = {here: stage_task.with_options(name=f"stage:{here}")(here, ctx, force)}
    except BaseException:
        cancel(list(futures.values()))  # the stages beside it stop too: the run has failed or was stopped
        raise
    return results | dict(zip(futures, gather(list(futures.values()), "the stages beside it"), strict=True))


def _crash_flow_run(flow_run_id: str, mlflow_run_id: str) -> None:
    """The Prefect flow run of a dead process, left Running: set it Crashed (its MLflow run was just failed)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=f"its process is gone (found by a later run; "
                                                                       f"MLflow run {mlflow_run_id})"), force=True)
                log.warning("marked Prefect flow run %s Crashed", flow_run_id)
    except Exception as exc:  # noqa: BLE001 -- another server, a deleted run: the MLflow side is what matters
        log.warning("could not mark Prefect flow run %s Crashed: %s", flow_run_id, exc)


def _prefect_tags() -> dict[str, str]:
    """The Prefect flow run (and deployment, for a scheduled run) behind this MLflow run: each UI links to the
    other's id."""
    from prefect.runtime import deployment as dep
    from prefect.runtime import flow_run

    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    if dep.id:
        tags |= {"prefect.deployment": f"retrain/{dep.name}", "prefect.deployment_id": str(dep.id)}
    return tags


def deployment(name: str, cron: str, profile: str, overrides: dict[str, Any] | None = None,
               interval: float | None = None) -> Any:
    """A Prefect deployment of ``retrain`` on ``cron`` (validated here, so a typo is one clear line), or every
    ``interval`` seconds; ``overrides`` (``--set``) are the runs' parameters too. One run at a time: a run the
    schedule fires while the previous one is still running is cancelled (Prefect's deployment concurrency limit,
    CANCEL_NEW), not started beside it (the runs would share one project and pile up: a 5 s schedule of a
    minute-long retrain once started 80 processes and ran a machine out of memory)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule

    from components.core.errors import ParamsError

    parameters: dict[str, Any] = {"profile": profile, **({"overrides": overrides} if overrides else {})}
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    if interval is not None:
        if not interval > 0:
            raise ParamsError(f"--interval {interval:g} must be a positive number of seconds")
        return retrain.to_deployment(name=name, interval=interval, parameters=parameters,
                                     concurrency_limit=one_at_a_time)
    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise ParamsError(f"--cron {cron!r} is not a valid cron expression (e.g. '0 3 * * 0')") from None
    return retrain.to_deployment(name=name, cron=cron, parameters=parameters, concurrency_limit=one_at_a_time)
