"""Where state lives by default (all inside the project folder, all overridable by env variables),
and telemetry off. Called at CLI/flow entry, never at import."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

DEFAULTS_OFF = {
    "DO_NOT_TRACK": "true",  # MLflow and other tools honour this (MLflow wants 'true')
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",  # nothing may download weights at run time
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def project_dir() -> Path:
    """The project folder: MEDEXPERTS_PROJECT_DIR, else the current folder."""
    return Path(os.environ.get("MEDEXPERTS_PROJECT_DIR", os.getcwd())).resolve()


def artifacts_dir(root: Path) -> Path:
    return Path(os.environ.get("MEDEXPERTS_ARTIFACTS_DIR", root / "artifacts")).resolve()


def configure(root: Path) -> None:
    """Set defaults for tracking store, Prefect home and telemetry unless the user set them."""
    for key, value in DEFAULTS_OFF.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "medexperts")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # a loaded 2-core machine took 90 s
    # MLflow 3 logs INFO lines for every DB migration and model registration; keep the console readable.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # Bundles take texts or image arrays, so no signature is inferred; MLflow warns about it each time.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Lightning's banner lines ("GPU available", tips) say nothing a pipeline user needs.
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("medexperts").setLevel(logging.INFO)
    for pattern in (".*Model logged without a signature.*", ".*Add type hints to the `predict` method.*",
                    ".*The filesystem tracking backend.*", ".*is deprecated.*",
                    ".*module\\(s\\) in eval mode.*", ".*input example was not provided.*"):
        warnings.filterwarnings("ignore", message=pattern)


def mlruns_uri(root: Path) -> str | None:
    """Artifact root for experiments created here: MEDEXPERTS_ARTIFACT_ROOT, else the project's mlruns/; with a
    tracking server (http/https: team mode) None, so the server's own store holds them (proxied: clients upload
    through the server and need no access to its folder)."""
    if os.environ.get("MEDEXPERTS_ARTIFACT_ROOT"):
        return os.environ["MEDEXPERTS_ARTIFACT_ROOT"]
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        return None
    return (root / "mlruns").resolve().as_uri()


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not the stream at set-up, which a test
    runner or a daemon may have closed since)."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def console_logging() -> None:
    """Progress lines on stderr when no Prefect flow carries them (the `stage` command, DVC)."""
    log = logging.getLogger("medexperts")
    if not log.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
