"""How long the README's setup takes on a fresh clone. `medexperts bench install_time [--repeats 1]`
-> bench/results/install_time.json

Clones this project (its committed HEAD) into a temporary folder and times `make setup` there (a new venv, then
`pip install -e ".[test]"`: CPU torch 2.13.0 and the rest from the package registry, or from pip's cache when this
machine installed them before: the result records the cache's size so a reader can tell which case it measured),
then `medexperts --help` in it (the first import of the CLI in the new venv: bytecode compiled, what a user's first
command pays). The clone is removed afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, write_result


def _pip_cache_mib() -> float | None:
    out = subprocess.run(["python3", "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    folder = Path(out.stdout.strip()) if out.returncode == 0 else None
    if folder is None or not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def one_install() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="medexperts-bench-install-"))
    try:
        clone = root / "medexperts"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        setup = _timed(["make", "setup"], clone)
        first = _timed([str(clone / ".venv" / "bin" / "medexperts"), "--help"], clone)
        size = sum(f.stat().st_size for f in (clone / ".venv").rglob("*") if f.is_file()) / 2**20
        return {"setup_seconds": setup, "first_cli_seconds": first, "venv_mib": size}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench install_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    cache = _pip_cache_mib()
    runs = []
    for i in range(args.repeats):
        runs.append(one_install())
        print(f"install {i + 1}/{args.repeats}: make setup {runs[-1]['setup_seconds']:.0f} s, first CLI call "
              f"{runs[-1]['first_cli_seconds']:.1f} s, venv {runs[-1]['venv_mib']:.0f} MiB", flush=True)
    write_result("install_time", {
        "params": {"repeats": args.repeats, "command": "make setup", "pip_cache_mib_before": cache},
        "runs": runs,
        "median_setup_seconds": statistics.median(r["setup_seconds"] for r in runs),
        "median_first_cli_seconds": statistics.median(r["first_cli_seconds"] for r in runs),
    })


if __name__ == "__main__":
    main()
