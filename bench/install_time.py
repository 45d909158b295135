"""How long the README's setup takes on a fresh clone, by installer. `medexperts bench install_time [--repeats 1]`
-> bench/results/install_time.json

Clones this project (its committed HEAD) into a temporary folder and times `make setup` there: a new venv, then
`.ci/install .venv -e ".[test]"` (CPU torch 2.13.0 and the rest from the package registry; neither installer keeps a
package cache), once with uv (the default) and once with pip (`MEDEXPERTS_INSTALLER=pip`), alternating so that both
see the same machine and registry; then `medexperts --help` in it (the first import of the CLI in the new venv:
bytecode compiled, what a user's first command pays). Then what a stage process pays for its imports (`import
flows.stages, components.stages.federated`: torch, transformers, Prefect, MLflow) under PYTHONDONTWRITEBYTECODE=1,
where Python writes no bytecode at import: with the venv as installed (both installers compile it) and with every
`__pycache__` of the venv removed (what each process paid when uv compiled nothing). Each clone is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, write_result


def _timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def one_install(installer: str) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="medexperts-bench-install-"))
    try:
        clone = root / "medexperts"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        setup = _timed(["make", "setup"], clone, {**os.environ, "MEDEXPERTS_INSTALLER": installer})
        first = _timed([str(clone / ".venv" / "bin" / "medexperts"), "--help"], clone)
        size = sum(f.stat().st_size for f in (clone / ".venv").rglob("*") if f.is_file()) / 2**20
        imports = {"compiled": _stage_imports(clone)}
        for cache in list((clone / ".venv").rglob("__pycache__")):
            shutil.rmtree(cache)
        imports["not_compiled"] = _stage_imports(clone)
        return {"installer": installer, "setup_seconds": setup, "first_cli_seconds": first, "venv_mib": size,
                "stage_import_seconds": imports}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stage_imports(clone: Path) -> float:
    """Median of 3 fresh processes importing what a stage process imports, none allowed to write bytecode."""
    cmd = [str(clone / ".venv" / "bin" / "python"), "-c", "import flows.stages, components.stages.federated"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return statistics.median(_timed(cmd, clone, env) for _ in range(3))


INSTALLERS = ("uv", "pip")


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench install_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs = []
    for i in range(args.repeats):
        for installer in INSTALLERS:
            runs.append(one_install(installer))
            print(f"install {i + 1}/{args.repeats} ({installer}): make setup {runs[-1]['setup_seconds']:.0f} s, "
                  f"first CLI call {runs[-1]['first_cli_seconds']:.1f} s, venv {runs[-1]['venv_mib']:.0f} MiB",
                  flush=True)
    median = {k: {i: statistics.median(r[k] for r in runs if r["installer"] == i) for i in INSTALLERS}
              for k in ("setup_seconds", "first_cli_seconds")}
    write_result("install_time", {
        "params": {"repeats": args.repeats, "command": "make setup", "installers": list(INSTALLERS)},
        "runs": runs,
        "median_setup_seconds": median["setup_seconds"],
        "median_first_cli_seconds": median["first_cli_seconds"],
        "pip_over_uv_setup": median["setup_seconds"]["pip"] / median["setup_seconds"]["uv"],
        "median_stage_import_seconds": {
            case: statistics.median(r["stage_import_seconds"][case] for r in runs)
            for case in ("compiled", "not_compiled")},
    })


if __name__ == "__main__":
    main()
