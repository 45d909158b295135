"""What every benchmark records next to its figures: machine, versions, commit, date."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=RESULTS.parent, capture_output=True, text=True).stdout.strip()
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(), "git_commit": commit or "unknown",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**payload, "machine": machine()}, indent=2, sort_keys=True) + "\n")
    return path


def run_child(script: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --child KIND SPEC OUT`` in a fresh interpreter (clean memory) and return its JSON result."""
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        subprocess.run([sys.executable, script, "--child", kind, json.dumps(spec), f.name], check=True,
                       env={**os.environ, "DO_NOT_TRACK": "true"})
        return json.loads(Path(f.name).read_text())
