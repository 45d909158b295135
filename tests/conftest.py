"""Shared fixtures: the project folder, a tiny 2-layer BERT, an isolated MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_dir() -> Path:
    return PROJECT


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT saved as a local HF folder, with MiniLM's tokenizer."""
    from bench.common import tiny_bert as build

    return build(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store and artifact folder for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    # An experiment of this store, artifacts under tmp_path (also forgets an id cached from another store).
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("tests", (tmp_path / "mlruns").as_uri()))
    return uri


@pytest.fixture()
def tiny_params(tiny_bert: Path):  # noqa: ANN201
    from components.config import load_params

    return load_params(PROJECT / "params", "tiny", {"foundation.text.source": str(tiny_bert)})


_CREATED_PREFECT_HOME = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Isolate Prefect's home and MLflow's defaults from the developer's before anything imports them."""
    import os
    import tempfile

    # A developer's own PREFECT_HOME is theirs: used, never removed. A worker of `pytest -n` gets its own home, so its
    # own Prefect server: each worker stops its server when its share of the tests ends, under the others otherwise.
    if "PREFECT_HOME" not in os.environ or os.environ.get("PYTEST_XDIST_WORKER"):
        home = config.stash[_CREATED_PREFECT_HOME] = tempfile.mkdtemp(prefix="medexperts-prefect-")
        os.environ["PREFECT_HOME"] = home
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers:  # the workers share the cores: each gets its share of threads (and so does what it spawns), or the
        # OpenMP threads of one worker spin on the core where the other works
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, threads)
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MEDEXPERTS_PREFECT_PORT", "0")  # the suite's Prefect server takes any free port
    os.environ.setdefault("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "5")  # schedules fire within seconds


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the Prefect home this session created (its server database and logs); the session fixtures have
    stopped the server by now."""
    import shutil

    home = config.stash.get(_CREATED_PREFECT_HOME, None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server() -> str:
    """The suite's one Prefect server (the project's server code, under the session's PREFECT_HOME): flows run in
    this process and `medexperts run` subprocesses (which inherit PREFECT_HOME) all use it."""
    from flows.services import ensure_prefect_server

    return ensure_prefect_server(PROJECT, 0, 900)


@pytest.fixture()
def isolated_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the project's params and code, but write artifacts and tracking state under tmp_path."""
    monkeypatch.setenv("MEDEXPERTS_PROJECT_DIR", str(PROJECT))
    monkeypatch.setenv("MEDEXPERTS_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MEDEXPERTS_ARTIFACT_ROOT", (tmp_path / "mlruns").as_uri())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("tests", (tmp_path / "mlruns").as_uri()))
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_server() -> object:
    """Stop the suite's Prefect server, and Prefect's temporary one while pytest's streams are still open (its
    atexit hook logs)."""
    yield
    import sys

    from flows.services import stop_prefect_server

    stop_prefect_server(PROJECT)

    if "prefect.server.api.server" in sys.modules:
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        APILogWorker.drain_all(timeout=10)  # send queued flow logs while the server still answers

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n``: the end-to-end (slow) tests first. ``make test`` has xdist hand the tests out one at a
    time as workers free up (``--maxschedchunk 1``), so the long ones start first, on every worker, and none of them
    starts last on one worker while the others idle."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
