"""What DVC's YAML parser costs the pipeline: `dvc commit` (which every `medexperts run` in a DVC repo ends with, to
record its outputs in dvc.lock) and `dvc status`, with ruamel.yaml's C parser (ruamel.yaml.clib, a dependency of
the project) and without it (ruamel.yaml 0.19 falls back to pure Python when the extension is missing).
`medexperts bench dvc_yaml [--rounds 3]` -> bench/results/dvc_yaml.json

The project's tracked files are copied into a temporary git + DVC repo, set to the tiny profile with a tiny 2-layer
BERT as the text foundation, and `medexperts run` fills every stage's outputs and dvc.lock (not timed). Then, in
rounds in which the two variants alternate (a load change hits both), each DVC command is timed as a whole process.
"Without" hides the extension from the child process only: a folder on its PYTHONPATH holds an `_ruamel_yaml`
module that raises ImportError, which ruamel.yaml catches and then parses in Python. Medians and the ratio
without / with; the size of dvc.yaml and dvc.lock (each stage lists the code files it imports); machine load.
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

from bench.common import tiny_bert, tiny_project_copy, write_result

COMMITTED = ["foundation", "experts", "federated", "decompose", "routing", "fusion", "evaluate", "promote"]
COMMANDS = {"commit": ["commit", "--force", "--quiet", *COMMITTED], "status": ["status", "--quiet"]}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and cmd[1] != "status"):  # status exits 1 on changes
        raise SystemExit(f"{' '.join(cmd[:3])} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench dvc_yaml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import _ruamel_yaml  # noqa: F401
    except ImportError:
        raise SystemExit("ruamel.yaml.clib is not installed here: nothing to compare (make setup installs it)")

    t_all = time.perf_counter()
    load_before = os.getloadavg()
    dvc = str(Path(sys.executable).with_name("dvc"))
    with tempfile.TemporaryDirectory(prefix="medexperts-bench-dvc-") as tmp:
        root = Path(tmp)
        repo = root / "repo"
        tiny_project_copy(repo, tiny_bert(root / "tiny-bert"))
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("MEDEXPERTS_", "PREFECT_", "MLFLOW_"))}
        env = {**keep, "PREFECT_HOME": str(root / "prefect"), "MEDEXPERTS_PREFECT_PORT": "0"}
        hidden = root / "no-clib"
        hidden.mkdir()
        (hidden / "_ruamel_yaml.py").write_text("raise ImportError('hidden by bench dvc_yaml')\n")
        variants = {"with_clib": env, "without_clib": {**env, "PYTHONPATH": str(hidden)}}
        medexperts = str(Path(sys.executable).with_name("medexperts"))
        fill = subprocess.run([medexperts, "run"], cwd=repo, env=env, capture_output=True, text=True)
        if fill.returncode != 0:
            raise SystemExit(f"the tiny run failed: {(fill.stderr or fill.stdout).strip()[-500:]}")
        try:
            times: dict[str, dict[str, list[float]]] = {c: {v: [] for v in variants} for c in COMMANDS}
            for _ in range(args.rounds):
                for command, dvc_args in COMMANDS.items():
                    for name, variant_env in variants.items():
                        times[command][name].append(run([dvc, *dvc_args], repo, variant_env))
            sizes = {f: {"lines": len((repo / f).read_text().splitlines()), "bytes": (repo / f).stat().st_size}
                     for f in ("dvc.yaml", "dvc.lock")}
        finally:
            subprocess.run([medexperts, "services", "down"], cwd=repo, env=env, capture_output=True)
    med = {c: {v: statistics.median(t) for v, t in per.items()} for c, per in times.items()}
    result: dict[str, Any] = {
        "params": {"rounds": args.rounds, "profile": "tiny", "committed_stages": COMMITTED,
                   "what": "wall seconds of a whole dvc process on the tiny run's outputs"},
        "seconds": times, "median_seconds": med,
        "without_over_with": {c: m["without_clib"] / m["with_clib"] for c, m in med.items()},
        "files": sizes, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - t_all,
    }
    write_result("dvc_yaml", result)
    for command, m in med.items():
        print(f"dvc {command}, median of {args.rounds}: {m['with_clib']:.1f} s with ruamel.yaml.clib, "
              f"{m['without_clib']:.1f} s without ({m['without_clib'] / m['with_clib']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
