"""Fan-out on an existing engine: Prefect's DaskTaskRunner (prefect-dask), chosen by ``pipeline.runner``.

``local`` (the default) runs every stage and every expert in turn in the flow's process. ``dask`` starts a Dask
cluster for the run (``cluster_class``, by default a ``LocalCluster`` of ``workers`` processes) or joins the scheduler
at ``address`` (workers on other machines that share the project folder), runs the stages that need only the data
and the foundation side by side, and maps the experts stage's per-task jobs onto the workers, one Prefect task each
(each visible in the Prefect UI). The runner is opened inside the flow, from the run's params, so a scheduled run
(`medexperts serve`, a worker) fans out exactly as `medexperts run` does. Before any work is sent, every worker
must run the code this process sees on disk (``check_workers``): a long-lived worker that imported the project
before a change, or one started from another checkout, would otherwise train with old code under a fingerprint
that names the new one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.futures import wait

import flows
from components.config.pipeline import RunnerParams
from components.core import stop
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
        kwargs: dict[str, Any] = {"threads_per_worker": rp.threads_per_worker, "dashboard_address": None}
        if rp.cluster_class == "distributed.LocalCluster":
            kwargs |= {"n_workers": rp.workers, "processes": True}  # others size themselves (one worker per GPU)
        try:
            runner = DaskTaskRunner(cluster_class=rp.cluster_class, cluster_kwargs=kwargs)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ParamsError(f"pipeline.runner.cluster_class={rp.cluster_class!r}: {exc}") from None
    with runner:
        check_workers(runner.client, rp.address)
        yield runner


def check_workers(client: Any, address: str | None, timeout: float = 60.0) -> None:
    """Refuse (ParamsError) a scheduler without workers, and workers whose code is not the code on disk here
    (``address``: the scheduler joined; None: the cluster started for this run)."""
    where = f"the Dask scheduler at {address}" if address else "the Dask cluster started for this run"
    restart = f"(`dask worker {address}`) from a checkout of this commit" if address else "(run again)"
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ParamsError(f"no worker joined {where} within {timeout:g} s: start them {restart}") from None

    def loaded_source() -> str:
        """Run on each worker (a nested function: Dask sends it by value, so a worker that holds an older
        ``flows`` in memory, or none that imports, still runs it): the digest of the project code it runs."""
        import importlib

        try:
            return importlib.import_module("flows").LOADED_SOURCE  # the module it imported first, if it did
        except Exception as exc:  # noqa: BLE001 -- an old flows without it, or no project at all: both refused
            return f"cannot tell ({type(exc).__name__}: {exc})"

    here = flows.source_digest()
    stale = sorted(worker for worker, digest in client.run(loaded_source, on_error="return").items()
                   if digest != here)
    if stale:
        raise ParamsError(
            f"{len(stale)} worker(s) of {where} run other code than this checkout's ({', '.join(stale[:5])}): "
            f"started before the project's files changed, or from another checkout. Restart them {restart}; "
            f"the stages' fingerprints hash the code on disk, not the code a worker runs")


def gather(futures: list[Any], what: str) -> list[Any]:
    """The futures' results in order. Waits in short slices, so a stop request (SIGTERM) is honoured here too
    (the work runs on the workers; this process only waits); on any failure or stop the futures still pending are
    cancelled before the error goes on, so nothing keeps writing into a folder that is being discarded."""
    try:
        while True:
            _, pending = wait(futures, timeout=0.5)
            stop.check(f"the wait for {what}")
            if not pending:
                return [f.result() for f in futures]
    except BaseException:
        cancel(futures)
        raise


def cancel(futures: list[Any]) -> None:
    """Cancel what has not finished (a finished future ignores it)."""
    for f in futures:
        with contextlib.suppress(Exception):
            f.wrapped_future.cancel()


def map_on(runner: Any, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """Each item one Prefect task on ``runner`` (named after ``fn``); the results in the items' order."""
    name = fn.__name__.removesuffix("_job")
    return gather(list(runner.map(task(fn, name=name, cache_policy=NONE), {"job": items})), f"the {name} tasks")
