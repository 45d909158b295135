"""Benchmark results in MLflow: one run per result file in the experiment `medexperts-bench` of the project's
store (the same SQLite store `medexperts ui` opens), so figures sit beside the pipeline's runs.

`write_result` calls `log_result` after writing the JSON; to (re)log committed files, e.g. after a `git pull`:
`medexperts bench track [NAME ...]` (default: every file in bench/results).

A run holds: the result's `params` as params, every finite number elsewhere as a metric (keys are the JSON path,
with the characters MLflow refuses replaced by '_'), the machine and commit as tags, the JSON file itself, and
for the fusion experiment a bar chart of the normalised scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT

EXPERIMENT = "medexperts-bench"


def _lists_as_dicts(tree: Any) -> Any:
    """JSON lists become {"0": ..., "1": ...} so log_metrics keys their numbers by position too."""
    if isinstance(tree, dict):
        return {k: _lists_as_dicts(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return {str(i): _lists_as_dicts(v) for i, v in enumerate(tree)}
    return tree


def _figures(name: str, payload: dict[str, Any], folder: Path) -> list[Path]:
    from components.metrics.plots import plot_grouped_bars

    if name == "fusion" and "table" in payload:
        scores = {variant: {m: v["all_tasks_normalised"] for m, v in methods.items() if isinstance(v, dict)}
                  for variant, methods in payload["table"].items()}
        tasks = ", ".join(payload.get("params", {}).get("tasks", []))
        return [plot_grouped_bars(scores, "normalised test score, all tasks merged", folder / "fusion_normalised.png",
                                  title=tasks, reference=1.0)]
    return []


def log_result(name: str, payload: dict[str, Any], path: Path) -> str:
    """Log one benchmark result as an MLflow run; returns the run id. Params and metrics are logged inside that
    run (components.tracking.runs raises TrackingError when no run is active)."""
    import mlflow

    from components.tracking.runs import ensure_experiment, log_metrics, log_params, run
    from flows.environment import configure, mlruns_uri

    configure(ROOT)
    # The store named by the environment (default: the project's mlflow.db), even if this process pointed MLflow
    # elsewhere before (bench/pipeline.py runs its flow against a temporary store).
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(experiment_id=ensure_experiment(EXPERIMENT, mlruns_uri(ROOT)))
    machine = payload.get("machine", {})
    tags = {"bench": name, **{f"machine.{k}": str(v) for k, v in machine.items()}}
    if "git_commit" in machine:
        tags["mlflow.source.git.commit"] = str(machine["git_commit"])
    with run(f"bench-{name}", tags=tags) as run_id:
        log_params(payload.get("params", {}))
        log_metrics(_lists_as_dicts({k: v for k, v in payload.items() if k not in ("params", "machine")}))
        mlflow.log_artifact(str(path))
        with tempfile.TemporaryDirectory() as tmp:
            for figure in _figures(name, payload, Path(tmp)):
                mlflow.log_artifact(str(figure), artifact_path="plots")
        return run_id


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench track", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="result names (bench/results/NAME.json); default: all")
    args = parser.parse_args()
    paths = [RESULTS / f"{n}.json" for n in args.names] or sorted(RESULTS.glob("*.json"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"no such benchmark result: {', '.join(missing)}")
    for path in paths:
        run_id = log_result(path.stem, json.loads(path.read_text()), path)
        print(f"{path.stem}: run {run_id} in experiment {EXPERIMENT}")


if __name__ == "__main__":
    main()
