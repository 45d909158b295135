"""Fan-out on an existing engine: Prefect's DaskTaskRunner (prefect-dask), chosen by ``pipeline.runner``.

``local`` (the default) runs every stage and every expert in turn in the flow's process. ``dask`` starts a Dask
cluster for the run (``cluster_class``, by default a ``LocalCluster`` of ``workers`` processes) or joins the scheduler
at ``address`` (workers on other machines that share the project folder), runs the stages that need only the data
and the foundation side by side, and maps the experts stage's per-task jobs onto the workers, one Prefect task each
(each visible in the Prefect UI). The runner is opened inside the flow, from the run's params, so a scheduled run
(`medexperts serve`, a worker) fans out exactly as `medexperts run` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from components.config.pipeline import RunnerParams
from components.core.errors import ParamsError


@contextlib.contextmanager
def fan_out(rp: RunnerParams) -> Iterator[Any]:
    """The started task runner for ``rp`` (shut down after the block); None for ``local``."""
    if rp.kind == "local":
        yield None
        return
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ParamsError("pipeline.runner.kind=dask needs prefect-dask: pip install 'medexperts[dask]'") from None
    if rp.address:
        runner = DaskTaskRunner(address=rp.address)
    else:
        runner = DaskTaskRunner(cluster_class=rp.cluster_class, cluster_kwargs={
            "n_workers": rp.workers, "threads_per_worker": rp.threads_per_worker, "processes": True,
            "dashboard_address": None})
    with runner:
        yield runner


def map_on(runner: Any, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """Each item one Prefect task on ``runner`` (named after ``fn``); the results in the items' order."""
    futures = runner.map(task(fn, name=fn.__name__.removesuffix("_job"), cache_policy=NONE), {"job": items})
    return [f.result() for f in futures]
