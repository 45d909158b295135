"""How long the test suite takes (what `make test` runs before the Flower parity test) in one process and in
pytest-xdist workers (`make test WORKERS=N`, default 2). `medexperts bench suite_time [--workers 0 2]`
-> bench/results/suite_time.json

Each variant is one whole `python -m pytest -q -n N --maxschedchunk 1` process in this checkout, one after the
other (the suite is long; run it on an otherwise idle machine). Recorded per variant: wall seconds, the CPU seconds
of pytest and everything it started (user + system, from the operating system's child-process accounting), the
outcome line and exit status, and the ten slowest tests (pytest's --durations). The ratio one process / N workers
is of wall time. The end-to-end tests wait on subprocesses and servers for much of their time; the workers fill
those waits with other tests, each with its share of the CPU threads (`tests/conftest.py`).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any

from bench.common import ROOT, write_result


def run_suite(workers: int, extra: list[str]) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "--maxschedchunk", "1",  # as `make test`
           "-p", "no:cacheprovider", "--durations=10", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = proc.stdout.splitlines()
    outcome = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), "")
    slowest, inside = [], False
    for line in lines:
        if "slowest" in line and "durations" in line:
            inside = True
        elif inside and re.match(r"^\d+\.\d+s ", line):
            seconds, phase, test = line.split(maxsplit=2)
            slowest.append({"seconds": float(seconds[:-1]), "phase": phase, "test": test})
        elif inside and slowest:
            break
    return {"workers": workers, "wall_seconds": wall, "exit_status": proc.returncode, "outcome": outcome,
            "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "slowest": slowest}


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench suite_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="xdist worker counts to time, in this order (0: one process)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after -- (e.g. -- -m 'not slow')")
    args = parser.parse_args()
    load_before = os.getloadavg()
    variants = []
    for workers in args.workers:
        result = run_suite(workers, args.pytest_args)
        print(f"workers {workers}: {result['wall_seconds'] / 60:.1f} min wall, {result['cpu_seconds'] / 60:.1f} min "
              f"CPU; {result['outcome']}", flush=True)
        variants.append(result)
    walls = {v["workers"]: v["wall_seconds"] for v in variants}
    write_result("suite_time", {
        "params": {"workers": args.workers, "pytest_args": args.pytest_args, "cpu_count": os.cpu_count()},
        "variants": variants,
        "one_process_over_workers": {str(w): walls[0] / s for w, s in walls.items() if w and 0 in walls},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    })


if __name__ == "__main__":
    main()
