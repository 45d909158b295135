"""What a whole run costs: the wall time of `medexperts run --profile P` on an empty project state (every stage
runs), each stage's own compute time, and the pipeline's overhead (wall minus the stages' compute: start-up, the
Prefect server, MLflow logging, registration, DVC). `medexperts bench wall_time [--profile quick] [--profile tiny]`
-> bench/results/wall_time.json

Each profile runs once in a temporary project state (artifacts, MLflow store, Prefect home), with the project's
Prefect server started by the run (so its start-up is in the wall time, as on a fresh machine) and stopped after.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, write_result
from bench.fixed_cost import medexperts, variant_env


def one(profile: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"medexperts-bench-wall-{profile}-") as tmp:
        state = Path(tmp)
        env = variant_env(ROOT, state)
        try:
            seconds, failure = medexperts(ROOT, env, "run", "--profile", profile)
        finally:
            medexperts(ROOT, env, "services", "down")
        if failure:
            return {"wall_seconds": seconds, "error": failure}
        stages = {}
        for summary in sorted((state / "artifacts").glob("*/_summary.json")):
            stages[summary.parent.name] = json.loads(summary.read_text()).get("compute_seconds")
        compute = sum(s for s in stages.values() if s)
        return {"wall_seconds": seconds, "stage_compute_seconds": stages, "compute_seconds": compute,
                "overhead_seconds": seconds - compute, "overhead_over_compute": (seconds - compute) / compute}


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench wall_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="append", help="repeatable; default: tiny and quick")
    args = parser.parse_args()
    profiles = args.profile or ["tiny", "quick"]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = {p: one(p) for p in profiles}
    write_result("wall_time", {"params": {"profiles": profiles, "what": "a whole `medexperts run --profile P` "
                                          "process on an empty project state"},
                               "profiles": results, "load_average_before": load_before,
                               "load_average_after": os.getloadavg(), "wall_seconds": time.perf_counter() - t0})
    for p, r in results.items():
        if "error" in r:
            print(f"{p}: failed after {r['wall_seconds']:.0f} s: {r['error']}")
        else:
            print(f"{p}: {r['wall_seconds'] / 60:.1f} min wall, stages {r['compute_seconds'] / 60:.1f} min, overhead "
                  f"{r['overhead_seconds']:.0f} s ({100 * r['overhead_over_compute']:.1f} % of the stages' compute)")


if __name__ == "__main__":
    main()
