"""`medexperts bench NAME [ARGS...]` runs `python -m bench.NAME ARGS...` in the project folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

PROJECT = Path(__file__).resolve().parents[1]
# Every benchmark module (bench/NAME.py with a main); bench/common.py is shared code, not a benchmark.
# every module of bench/ but the shared helpers is a benchmark the CLI must list and run
BENCHES = tuple(sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "bench").glob("*.py")
                       if p.stem not in ("common", "__init__")))

runner = CliRunner()


@pytest.fixture()
def in_project(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEDEXPERTS_PROJECT_DIR", str(PROJECT))
    return PROJECT


def test_unknown_benchmark_is_one_line_naming_the_benchmarks(in_project: Path) -> None:
    result = runner.invoke(app, ["bench", "nope"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "unknown benchmark 'nope'" in lines[0]
    listed = lines[0].split("benchmarks: ", 1)[1].rstrip(".").split(", ")
    assert listed == sorted(BENCHES)  # common is not a benchmark


def test_help_lists_the_benchmarks(in_project: Path) -> None:
    result = runner.invoke(app, ["bench", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert all(name in text for name in BENCHES)


def test_arguments_after_the_name_go_to_the_benchmark(in_project: Path) -> None:
    assert runner.invoke(app, ["bench", "track", "--help"]).exit_code == 0  # track's --help, not bench's
    # its exit status comes back: track exits 1 naming a result file that does not exist
    assert runner.invoke(app, ["bench", "track", "no_such_bench"]).exit_code == 1


def test_no_benchmark_edits_sys_path() -> None:
    for path in (PROJECT / "bench").glob("*.py"):
        assert "sys.path.insert" not in path.read_text(), path


@pytest.mark.parametrize("name", BENCHES)
def test_every_benchmark_runs_as_a_module(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # importable from the project folder alone
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=PROJECT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: medexperts bench {name}")
