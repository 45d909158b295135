"""Wall time of the stages that fan out (experts, decompose, federated) in one process vs on a Dask LocalCluster.
`medexperts bench fanout [--profile quick] [--workers 2] [--rounds 1]` -> bench/results/fanout.json

One project state in a temporary folder: sources, data and foundation are built once (`medexperts stage`, not
timed) and copied for every timed run. Then, in rounds in which the two variants alternate (a load change hits
both), a whole `medexperts run --stage experts --stage decompose --stage federated --force` process is timed:

- local: `pipeline.runner.kind=local`, the default (each stage and expert in turn; torch's default threads);
- dask: `pipeline.runner.kind=dask` on a LocalCluster of ``--workers`` processes, one thread each (the cluster's
  start-up counted).

Both variants train the same experts from the same seed; their validation metrics are recorded side by side (they
may differ in the last digits: CPU float sums depend on the thread count). Medians and the ratio local / dask.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, write_result
from bench.fixed_cost import CLI, medexperts, variant_env

STAGES = ("experts", "decompose", "federated")


def _val_metrics(artifacts: Path) -> dict[str, dict[str, float]]:
    summary = json.loads((artifacts / "experts" / "_summary.json").read_text())
    return {task: run["val"] for task, run in summary["tasks"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench fanout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    t_all = time.perf_counter()
    load_before = os.getloadavg()
    sets = ["--profile", args.profile, "--set", "registry.floor=0.0"]
    variants = {"local": ["--set", "pipeline.runner.kind=local"],
                "dask": ["--set", "pipeline.runner.kind=dask", "--set", f"pipeline.runner.workers={args.workers}",
                         "--set", "pipeline.runner.threads_per_worker=1"]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    failures: dict[str, list[str]] = {k: [] for k in variants}
    metrics: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medexperts-bench-fanout-") as tmp:
        state = Path(tmp)
        env = variant_env(ROOT, state)
        for stage in ("sources", "data", "foundation"):
            seconds, failure = medexperts(ROOT, env, "stage", stage, *sets)
            if failure:
                raise SystemExit(f"preparing stage {stage} failed: {failure}")
        prepared = state / "prepared"
        shutil.copytree(state / "artifacts", prepared)
        only = [arg for s in STAGES for arg in ("--stage", s)]
        try:
            for _ in range(args.rounds):
                for name, extra in variants.items():
                    artifacts = state / f"artifacts-{name}"
                    shutil.rmtree(artifacts, ignore_errors=True)
                    shutil.copytree(prepared, artifacts)
                    run_env = {**env, "MEDEXPERTS_ARTIFACTS_DIR": str(artifacts)}
                    seconds, failure = medexperts(ROOT, run_env, "run", *sets, *extra, *only, "--force")
                    if failure:
                        failures[name].append(failure)
                    else:
                        times[name].append(seconds)
                        metrics[name] = _val_metrics(artifacts)
        finally:
            import subprocess
            import sys

            subprocess.run([sys.executable, "-c", CLI, "services", "down"], cwd=ROOT, env=env, capture_output=True)
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    diff = None
    if len(metrics) == 2:
        diff = max(abs(metrics["local"][t][m] - metrics["dask"][t][m]) for t in metrics["local"]
                   for m in metrics["local"][t])
    result = {
        "params": {"profile": args.profile, "workers": args.workers, "threads_per_worker": 1, "rounds": args.rounds,
                   "stages": list(STAGES),
                   "what": "wall seconds of a whole `medexperts run --stage experts --stage decompose --stage "
                           "federated --force` process"},
        "seconds": times, "median_seconds": med, "failures": failures,
        "local_over_dask": med["local"] / med["dask"] if times["local"] and times["dask"] else None,
        "val_metrics": metrics, "max_abs_val_metric_difference": diff,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - t_all,
    }
    write_result("fanout", result)
    print(f"{args.profile}: local {med['local']:.1f} s, dask ({args.workers} workers) {med['dask']:.1f} s; "
          f"local/dask {result['local_over_dask']}; failures { {k: len(v) for k, v in failures.items()} }",
          flush=True)


if __name__ == "__main__":
    main()
