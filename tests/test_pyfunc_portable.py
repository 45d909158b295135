"""A registered model loads and predicts where this checkout is invisible: the library ships in the model's
code/ folder and requirements.txt comes from the project's own pins."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from components.bundle.format import TaskHead, save_bundle
from components.nn.classifier import make_head
from components.nn.encoders import ImageEncoder
from components.nn.foundation import Foundation
from components.tracking.registry import register_bundle

PROJECT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: hide every way to reach the checkout (sys.path entries, the editable install's
# finder), prove `components` is gone, hide the packages the model does not list, then load and predict.
LOADER = textwrap.dedent("""
    import importlib, importlib.util, json, os, sys

    root, uri, inputs, out, blocked = sys.argv[1:6]
    root, blocked = os.path.realpath(root), set(filter(None, blocked.split(",")))
    venv = os.path.realpath(sys.prefix)  # the interpreter's own site-packages may live under the checkout

    def under(path, folder):
        return path == folder or path.startswith(folder + os.sep)

    def inside(path):
        path = os.path.realpath(path or os.getcwd())
        return under(path, root) and not under(path, venv)

    sys.path[:] = [p for p in sys.path if not inside(p)]
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    assert importlib.util.find_spec("components") is None, "the checkout is still importable"

    for name in blocked:  # as if not installed: `import` fails and importlib.util.find_spec says None
        sys.modules[name] = None

    import mlflow, numpy as np

    model = mlflow.pyfunc.load_model(uri)
    frame = model.predict(np.load(inputs))
    import components
    assert not inside(components.__file__), components.__file__
    frame.to_json(out, orient="split")
    print(json.dumps({"components": components.__file__}))
""")


def image_bundle(out: Path) -> Path:
    torch.manual_seed(0)
    enc = ImageEncoder([4]).eval()
    found = Foundation("image", enc, "a" * 64, {"config": enc.config})
    save_bundle(out, found, {}, {"t": TaskHead(make_head(4, 2), "binary", ["no", "yes"])}, "t", {})
    return out


def project_pin(package: str) -> str:
    deps = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if canonicalize_name(Requirement(d).name) == package]
    return str(Requirement(pin))


def import_names(distributions: set[str]) -> set[str]:
    """Top-level module names that the installed ``distributions`` provide."""
    return {module for module, dists in importlib.metadata.packages_distributions().items()
            if any(canonicalize_name(d) in distributions for d in dists)}


def dist_requirements(dist: str) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires(dist) or []
            if "extra" not in r}


def test_registered_model_loads_without_the_checkout(tmp_path: Path, mlflow_store: str) -> None:
    bundle = image_bundle(tmp_path / "bundle")
    with mlflow.start_run():
        version = register_bundle("portable", bundle, 0.7, {})
    uri = f"models:/portable/{version}"
    inputs = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "inputs.npy", inputs)
    expected = mlflow.pyfunc.load_model(uri).predict(inputs)

    # What was logged: the library's sources only, and the project's own pins.
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    code = local / "code" / "components"
    shipped = [p for p in code.rglob("*") if p.is_file()]
    assert (code / "tracking" / "pyfunc.py").is_file() and (code / "bundle" / "format.py").is_file()
    assert all(p.suffix == ".py" for p in shipped), [p for p in shipped if p.suffix != ".py"]
    assert not any(p.name == "__pycache__" for p in code.rglob("*"))
    assert sum(p.stat().st_size for p in shipped) < 5 * 2**20
    requirements = [line.strip() for line in (local / "requirements.txt").read_text().splitlines()]
    assert project_pin("torch") in requirements
    listed = {canonicalize_name(Requirement(r).name) for r in requirements if r and not r.startswith("-")}
    assert {"torch", "peft", "transformers", "safetensors", "pandas", "mlflow"} <= listed
    assert not listed & {"prefect", "dvc", "lightning", "torchmetrics", "typer"}

    # Packages the project depends on but the model does not list (and MLflow does not bring) must not load.
    mlflow_deps = set().union(*(dist_requirements(d) for d in ("mlflow", "mlflow-skinny", "mlflow-tracing")))
    unlisted = dist_requirements("medexperts") - listed - mlflow_deps
    assert {"prefect", "dvc", "lightning"} <= unlisted
    blocked = import_names(unlisted)

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONSAFEPATH="1", MLFLOW_TRACKING_URI=mlflow_store)
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, str(PROJECT), uri, str(tmp_path / "inputs.npy"),
         str(tmp_path / "out.json"), ",".join(sorted(blocked))],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    where = json.loads(result.stdout.strip().splitlines()[-1])["components"]
    assert "/code/components/" in where  # the shipped copy, not the checkout
    got = pd.read_json(tmp_path / "out.json", orient="split")
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-6)
