"""Load a registered model (any MLflow model URI) for prediction, refusing one whose files changed since it was
registered.

Trust model: a registered model is code (MLflow "models from code": ``pyfunc_entry.py`` and the ``components``
sources run at load), so write access to the MLflow store means code execution, as with pickles. The registry
records a digest of every file of a version at registration (``files.sha256``); ``load_model`` downloads the
version, checks the digest and only then loads it, so a file changed in the artifact store afterwards is refused.
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.core.errors import RegistryError
from components.tracking.registry import FILES_TAG, files_digest

log = logging.getLogger("medexperts")
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def load_model(uri: str, *, allow_unverified: bool = False) -> Any:
    """The pyfunc model at ``uri`` (``models:/NAME@champion``, ``models:/NAME/3``, ``runs:/...``); a missing one is
    one clear line; a registered version whose files differ from their digest at registration is refused, and so
    is one registered without a digest (before the digest was recorded) unless ``allow_unverified``."""
    try:
        m = _REGISTERED.match(uri)
        if m is None:
            return mlflow.pyfunc.load_model(uri)
        client = MlflowClient()
        mv = (client.get_model_version(m["name"], m["version"]) if m["version"] else
              client.get_model_version_by_alias(m["name"], m["alias"]))
        folder = Path(tempfile.mkdtemp(prefix="medexperts-model-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # code paths stay importable while in use
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{m['name']}/{mv.version}", dst_path=str(folder)))
        expected = mv.tags.get(FILES_TAG)
        if expected is None:
            if not allow_unverified:
                raise RegistryError(f"{uri} (version {mv.version}) was registered without a file digest (tag "
                                    f"{FILES_TAG}; registered by an older medexperts), so its files cannot be checked: "
                                    "not loading it. Re-register it (medexperts run --force), or load it unchecked "
                                    "with --allow-unverified if you trust the store")
            log.warning("%s (version %s) was registered without a file digest; loading it unchecked, as asked", uri,
                        mv.version)
        elif files_digest(local) != expected:
            raise RegistryError(f"{uri} (version {mv.version}): its files differ from what was registered "
                                f"(tag {FILES_TAG}); it was modified in the artifact store: not loading it. Re-register "
                                "it from its stage output (medexperts run --force) or restore the store")
        return mlflow.pyfunc.load_model(str(local))
    except MlflowException as exc:
        raise RegistryError(f"cannot load {uri!r}: {exc.message.splitlines()[0]}") from None
