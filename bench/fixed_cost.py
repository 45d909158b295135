"""The fixed cost of a `medexperts run` that skips every stage: before the project's own Prefect server (every
command started Prefect's temporary server) and now (the project's server, warm or started by the command).
`medexperts bench fixed_cost [--before COMMIT] [--rounds 3]` -> bench/results/fixed_cost.json

The code of COMMIT (default cebe6f9, the last commit with per-command temporary servers) is exported with `git
archive` into a temporary folder and run from there with this environment's Python (same packages); the current code
is this checkout. Each variant gets its own project state (artifacts, MLflow store, Prefect home) in a temporary
folder, runs the tiny profile once with a tiny 2-layer BERT as the text foundation (not timed: it fills the stage
outputs), then, in rounds in which the variants alternate (a load change hits all of them), a run that skips every
stage is timed as a whole process (wall seconds, imports included):

- before: the old code, Prefect's temporary server started and stopped by the run;
- now, warm: the project's server already running (every run after the first);
- now, cold: the project's server stopped first (`medexperts services down`), so the run starts it.

Medians over the rounds (of the runs that succeeded; a failed run, e.g. the old temporary server timing out, is
recorded with its error line) and the ratio before / now-warm. Machine load is recorded before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, tiny_bert, write_result

CLI = "from flows.cli import main; main()"


def export(commit: str, out: Path) -> Path:
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def variant_env(code: Path, state: Path) -> dict[str, str]:
    # Prefect creates its home folder but not the folders above it; the old code's temporary server then failed on
    # "unable to open database file" (the reason the first committed run recorded no "before" figure)
    (state / "prefect").mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("MEDEXPERTS_", "PREFECT_", "MLFLOW_"))}
    return {**keep, "PYTHONPATH": str(code), "MEDEXPERTS_PROJECT_DIR": str(code),
            "MEDEXPERTS_ARTIFACTS_DIR": str(state / "artifacts"),
            "MEDEXPERTS_ARTIFACT_ROOT": (state / "mlruns").as_uri(),
            "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}", "PREFECT_HOME": str(state / "prefect"),
            "MEDEXPERTS_PREFECT_PORT": "0", "MEDEXPERTS_BENCH_MLFLOW": "0"}


def medexperts(code: Path, env: dict[str, str], *args: str) -> tuple[float, str | None]:
    """Run the CLI of ``code`` as a whole process: (wall seconds, None) or (seconds, the last line of a failure)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, *args], cwd=code, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return seconds, None
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("error")]
    return seconds, (errors or lines or ["(no output)"])[-1][:300]


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench fixed_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="cebe6f9", help="commit with per-command temporary Prefect servers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before-timeout", type=float, default=120.0,
                        help="the old code's temporary-server start-up limit, seconds (its default: 300)")
    args = parser.parse_args()

    t_all = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medexperts-bench-fixed-") as tmp:
        root = Path(tmp)
        bert = tiny_bert(root / "tiny-bert")
        sets = ["--profile", "tiny", "--set", f"foundation.text.source={bert}", "--set", "registry.floor=0.0"]
        before_code = export(args.before, root / "before-code")
        before_env = {**variant_env(before_code, root / "before"),
                      "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(args.before_timeout)}
        variants = {"before": (before_code, before_env), "now": (ROOT, variant_env(ROOT, root / "now"))}
        fill: dict[str, list[tuple[float, str | None]]] = {}
        for name, (code, env) in variants.items():  # a failed fill (the old temporary server) is retried once
            fill[name] = [medexperts(code, env, "run", *sets)]
            if fill[name][-1][1] is not None:
                fill[name].append(medexperts(code, env, "run", *sets))
        usable = [name for name, tries in fill.items() if tries[-1][1] is None]
        if "now" not in usable:
            raise SystemExit(f"the current code's tiny run failed twice: {fill['now'][-1][1]}")
        times: dict[str, list[float]] = {"before": [], "now_warm": [], "now_cold": []}
        failures: dict[str, list[str]] = {k: [] for k in times}
        now_code, now_env = variants["now"]

        def timed(key: str, code: Path, env: dict[str, str]) -> None:
            seconds, failure = medexperts(code, env, "run", *sets)
            (failures[key].append(failure) if failure else times[key].append(seconds))

        try:
            for _ in range(args.rounds):
                if "before" in usable:  # else the old code could not run at all here: recorded in fill_runs
                    timed("before", *variants["before"])
                timed("now_warm", now_code, now_env)
                medexperts(now_code, now_env, "services", "down")
                timed("now_cold", now_code, now_env)
        finally:
            subprocess.run([sys.executable, "-c", CLI, "services", "down"], cwd=now_code, env=now_env,
                           capture_output=True)
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    result = {
        "params": {"before_commit": args.before, "rounds": args.rounds, "profile": "tiny",
                   "what": "wall seconds of a whole `medexperts run` process in which every stage is skipped"},
        "seconds": times, "median_seconds": med, "failures": failures,
        "before_over_now_warm": med["before"] / med["now_warm"] if times["before"] else None,
        "before_over_now_cold": med["before"] / med["now_cold"] if times["before"] else None,
        "fill_runs": {k: [{"seconds": t, "error": e} for t, e in v] for k, v in fill.items()},
        "before_could_run": "before" in usable, "before_startup_timeout_s": args.before_timeout,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "wall_seconds": time.perf_counter() - t_all,
    }
    write_result("fixed_cost", result)
    print(f"skip-all run, median of {args.rounds}: before {med['before']:.1f} s, now (server warm) "
          f"{med['now_warm']:.1f} s, now (server started by the run) {med['now_cold']:.1f} s; failed runs: "
          f"{ {k: len(v) for k, v in failures.items()} }", flush=True)


if __name__ == "__main__":
    main()
