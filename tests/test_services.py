"""The project's own Prefect server: started once, reused, stopped; bad ports and slow starts are one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from components.core.errors import MedExpertsError
from flows import services

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project Prefect home of this test's own (not the suite's server)."""
    home = tmp_path / "prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("MEDEXPERTS_PREFECT_PORT", "0")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv(services.OWNED_ENV, raising=False)
    yield home
    services.stop_prefect_server(PROJECT)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", services.OWNED_ENV)}
    medexperts = str(Path(sys.executable).parent / "medexperts")
    return subprocess.run([medexperts, *args], cwd=PROJECT, env=env, capture_output=True, text=True)


def test_one_server_per_project_started_reused_stopped(own_home: Path) -> None:
    first = cli("services", "up")
    assert first.returncode == 0, first.stderr
    state = services.read_state(own_home)
    assert state is not None and services.healthy(state.port)
    assert f"PREFECT_API_URL={state.api_url}" in first.stdout  # the line another shell exports
    # the server is not the CLI's child: the CLI has exited and the server still answers
    assert services.running(PROJECT) == state
    again = cli("services", "up")
    assert again.returncode == 0 and services.read_state(own_home) == state  # reused, not a second server
    status = cli("services", "status")
    assert status.returncode == 0 and f"pid {state.pid}" in status.stdout and "healthy" in status.stdout
    down = cli("services", "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not services.healthy(state.port) and services.running(PROJECT) is None
    after = cli("services", "status")
    assert after.returncode == 1 and "not running" in after.stdout


def test_port_taken_by_another_program_is_one_line(own_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv("MEDEXPERTS_PREFECT_PORT", str(s.getsockname()[1]))
        proc = cli("services", "up")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is taken by another program" in lines[0] and "MEDEXPERTS_PREFECT_PORT" in lines[0]
    assert services.read_state(own_home) is None  # nothing started


def test_startup_timeout_names_the_fix(own_home: Path) -> None:
    with pytest.raises(services.ServiceError, match="startup_timeout_s") as caught:
        services.ensure_prefect_server(PROJECT, 0, startup_timeout_s=0.01)
    assert isinstance(caught.value, MedExpertsError)  # the CLI prints it as one line, exit 2
    assert "PREFECT_API_URL" not in os.environ or os.environ.get(services.OWNED_ENV) is None


def test_a_users_own_prefect_api_wins(own_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    assert services.ensure_prefect_server(PROJECT, 0) == "http://prefect.example:4200/api"
    assert services.read_state(own_home) is None  # nothing started


def test_bad_port_variable(own_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDEXPERTS_PREFECT_PORT", "http")
    proc = cli("services", "up")
    assert proc.returncode == 2 and "MEDEXPERTS_PREFECT_PORT" in proc.stderr
