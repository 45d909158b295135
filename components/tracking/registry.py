"""Model registry: register foundations and bundles, the champion/challenger gate, manual promotion, alias history.

Only "does not exist" (``RESOURCE_DOES_NOT_EXIST``) is read as absence; any other registry failure (a locked
SQLite store, a 5xx from a server) raises :class:`RegistryError`, so a transient error never looks like
"no champion yet" and never moves an alias.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.types import ParamSchema, ParamSpec
from mlflow.tracking import MlflowClient

from components.core.artifacts import read_manifest
from components.core.errors import RegistryError
from components.stages.promote import Decision
from components.tracking.pyfunc import inference_requirements
from components.tracking.runs import metric_key

CHAMPION, CHALLENGER = "champion", "challenger"
# Only the params are declared (MLflow drops undeclared predict params); inputs are texts or image arrays.
SIGNATURE = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("task", "string", ""),
                                                          ParamSpec("modality", "string", ""),
                                                          ParamSpec("routing", "boolean", False)]))
METRIC_TAG = "val_metric"
REGISTRATION_TAG = "registration.fingerprint"  # the promote stage fingerprint that created the version
FILES_TAG = "files.sha256"  # every file of the registered model (code, MLmodel, bundle), recorded at registration
LIBRARY = Path(__file__).resolve().parents[1]  # the components package, shipped with every model (code_paths)
LIBRARY_MAX_BYTES = 20 * 2**20  # the library's sources are well under this; more means something else got in




def decide(metric: float, champion_metric: float | None, margin: float, floor: float) -> tuple[bool, str]:
    """Pure gate: beat the champion by ``margin``; with no champion, clear ``floor``."""
    if champion_metric is None or math.isnan(champion_metric):  # a champion without a metric cannot block
        if metric > floor:
            return True, f"first model: {metric:.4f} > floor {floor:.4f}"
        return False, f"first model: {metric:.4f} <= floor {floor:.4f}"
    if metric > champion_metric + margin:
        return True, f"{metric:.4f} > champion {champion_metric:.4f} + margin {margin:.4f}"
    return False, f"{metric:.4f} <= champion {champion_metric:.4f} + margin {margin:.4f}"


def _is(error: MlflowException, code: int) -> bool:
    return error.error_code == ErrorCode.Name(code)


def _failure(what: str, error: MlflowException) -> RegistryError:
    """One line naming what failed and MLflow's error code (its messages can span lines)."""
    detail = " ".join(str(error.message).split())
    return RegistryError(f"{what}: {error.error_code}: {detail[:300]}")


def register_foundation(name: str, folder: Path, sha256: str) -> str:
    """Register ``folder`` (frozen foundation weights) as a version of ``name`` in the active run, only when
    no version carries the tag ``sha256=<sha256>``; returns that version or the new one."""
    run = mlflow.active_run()
    if run is None:
        raise RegistryError(f"registering foundation {name!r} needs an active MLflow run (mlflow.start_run())")
    client = MlflowClient()
    try:
        client.create_registered_model(name, description="MedExperts foundation model (frozen)")
    except MlflowException as e:
        if not _is(e, RESOURCE_ALREADY_EXISTS):
            raise _failure(f"cannot create registered model {name!r}", e) from e
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get("sha256") == sha256:
            return str(mv.version)
    mlflow.log_artifacts(str(folder), artifact_path=name)
    source = mlflow.get_artifact_uri(name)
    return str(client.create_model_version(name, source, run_id=run.info.run_id, tags={"sha256": sha256}).version)


def _copy_library(dest: Path) -> Path:
    """A clean copy of the ``components`` package: its ``.py`` files only (no ``__pycache__``, data or
    stray large files), for MLflow to ship in the model's ``code/`` and put on ``sys.path`` at load."""
    out, total = dest / LIBRARY.name, 0
    for src in sorted(LIBRARY.rglob("*.py")):
        rel = src.relative_to(LIBRARY)
        if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        total += src.stat().st_size
        if total > LIBRARY_MAX_BYTES:
            raise RegistryError(f"{LIBRARY} holds over {LIBRARY_MAX_BYTES >> 20} MiB of .py files; "
                                "refusing to ship that with a model")
        (out / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / rel)
    return out


def register_bundle(name: str, bundle_dir: Path, metric: float, tags: dict[str, str],
                    needs: frozenset[str] = frozenset(), registration: str | None = None) -> str:
    """Log the bundle as a pyfunc model in the active run and register it; returns the version.

    The model is self-contained: the ``components`` library travels in its ``code/`` folder and its
    requirements are the installed distribution's own (see :func:`inference_requirements`). The version is created
    with its tags (lineage, metric and ``registration``: the promote fingerprint that made it, so a run killed
    before the version was finished is found and completed by the next one, see :func:`registered`); the digest of
    its files (``FILES_TAG``) is added last, so its presence means the registration is whole.
    """
    read_manifest(bundle_dir)  # every file against its sha256: a bundle modified since its stage wrote it is refused
    requirements = inference_requirements(needs)
    # Models from code: the logged model is this small script plus the bundle, no pickled object.
    with tempfile.TemporaryDirectory(prefix="medexperts-code-") as tmp:
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={"bundle": str(bundle_dir)}, code_paths=[str(_copy_library(Path(tmp)))],
            pip_requirements=requirements, signature=SIGNATURE,
        )
    # tag names MLflow accepts: a lineage tag may carry a site's own name (federated.shard.<Flower client-id>)
    created = {**{metric_key(k): str(v) for k, v in tags.items()}, METRIC_TAG: f"{metric:.6f}",
               **({REGISTRATION_TAG: registration} if registration else {})}
    mv = mlflow.register_model(info.model_uri, name, tags=created)
    version = str(mv.version)
    finish_registration(name, version)
    return version


def finish_registration(name: str, version: str) -> None:
    """Record the digest of every file of the version (the last step of a registration)."""
    with tempfile.TemporaryDirectory(prefix="medexperts-registered-") as tmp:
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp)
        digest = files_digest(Path(local))
    _set_tag(MlflowClient().set_model_version_tag, name, version, FILES_TAG, digest)


def registered(name: str, registration: str) -> tuple[str, Decision | None] | None:
    """The version of ``name`` a promote with fingerprint ``registration`` created, if any: (version, its gate
    decision, or None when the run that created it died before gating). A version left without its file digest
    is finished here first. None when no such version exists (register it)."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as e:
        if _is(e, RESOURCE_DOES_NOT_EXIST):
            return None
        raise _failure(f"cannot list the versions of registered model {name!r}", e) from e
    mine = [v for v in versions if v.tags.get(REGISTRATION_TAG) == registration]
    if not mine:
        return None
    mv = min(mine, key=lambda v: int(v.version))  # the oldest stands for the fingerprint (see settle)
    version = str(mv.version)
    if FILES_TAG not in mv.tags:
        finish_registration(name, version)
    if "promotion.decision" not in mv.tags:
        return version, None
    model_tags = client.get_registered_model(name).tags
    recorded = [json.loads(v) for k, v in sorted(model_tags.items())
                if k.startswith("promotion.") and k.endswith(f".v{version}")]
    gated = [r for r in recorded if r.get("reason") != "manual promotion"]
    if not gated:
        return version, None
    last = gated[-1]
    return version, Decision(**{f: last[f] for f in Decision.model_fields})


def settle(name: str, registration: str, version: str) -> str:
    """The version that stands for promote fingerprint ``registration``: two runs that promoted the same outputs at
    once (team mode: two pipelines on one tracking server) each created a version, with the same files, lineage and
    fingerprint; the oldest stands for both, and a newer duplicate (``version``) is deleted."""
    client = MlflowClient()
    try:
        same = sorted((int(v.version), v) for v in client.search_model_versions(f"name='{name}'")
                      if v.tags.get(REGISTRATION_TAG) == registration)
    except MlflowException as e:
        raise _failure(f"cannot list the versions of registered model {name!r}", e) from e
    if not same or str(same[0][0]) == version:
        return version
    oldest, mv = str(same[0][0]), same[0][1]
    if FILES_TAG not in mv.tags:  # its run may have died before the last step: finish it (as `registered` does)
        finish_registration(name, oldest)
    with contextlib.suppress(MlflowException):  # the other run may have deleted it already: same outcome
        client.delete_model_version(name, version)
    return oldest


def files_digest(folder: Path) -> str:
    """sha256 over every file of a model folder (relative path and content hash, in path order): what
    ``FILES_TAG`` records at registration and ``components.tracking.serving.load_model`` checks at load."""
    import hashlib

    from components.core.fingerprint import sha256_file

    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def champion(client: MlflowClient, name: str) -> tuple[str, float] | None:
    """(version, metric) of the champion; ``None`` only when ``name`` has no champion alias (or no model).

    The alias map is read rather than ``get_model_version_by_alias`` caught: a missing alias there is
    ``INVALID_PARAMETER_VALUE``, a code other failures share. Any other error raises ``RegistryError``.
    """
    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as e:
        if _is(e, RESOURCE_DOES_NOT_EXIST):
            return None
        raise _failure(f"cannot read the champion of registered model {name!r}", e) from e
    if version is None:
        return None
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as e:
        raise _failure(f"cannot read champion version {version} of registered model {name!r}", e) from e
    return str(mv.version), float(mv.tags.get(METRIC_TAG, "nan"))


def live_champions(names: list[str]) -> dict[str, str | None]:
    """The champion version of each registered model as the registry holds it now (None: no champion)."""
    client = MlflowClient()
    out: dict[str, str | None] = {}
    for name in names:
        current = champion(client, name)
        out[name] = current[0] if current else None
    return out


def gate(name: str, version: str, metric: float, margin: float, floor: float) -> Decision:
    """New version -> challenger; champion only if it passes ``decide``. Every move is recorded.

    The champion is read before any alias moves: if it cannot be read, ``RegistryError`` and nothing moves.
    """
    client = MlflowClient()
    current = champion(client, name)
    if current is not None and current[0] == str(version):  # gated already (a concurrent run of the same promote)
        decision = Decision(model=name, version=str(version), metric=metric, champion_version=None,
                            champion_metric=None, promoted=True, reason="already champion")
        if "promotion.decision" not in client.get_model_version(name, str(version)).tags:
            record_decision(client, decision)  # its gate died between the alias and the record: record it now
        return decision
    promoted, reason = decide(metric, current[1] if current else None, margin, floor)
    client.set_registered_model_alias(name, CHALLENGER, version)
    decision = Decision(model=name, version=version, metric=metric, champion_version=current[0] if current else None,
                        champion_metric=current[1] if current else None, promoted=promoted, reason=reason)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    record_decision(client, decision)
    return decision


def _lost_insert_race(error: MlflowException) -> bool:
    """A tag write that lost to a concurrent write of the same key: MLflow's SQL store upserts a tag by reading,
    then inserting, so two writers of one key at once (team mode: two runs gating the same version) make the second
    insert break the primary key (PostgreSQL "duplicate key value violates unique constraint")."""
    text = str(error.message).lower()
    return "unique constraint" in text or "uniqueviolation" in text


def _set_tag(write: Any, *args: str) -> None:
    """``write(*args)`` (a client's tag setter); once more if it lost an insert race: the key now exists, so the
    second write updates it, and the tag holds this writer's value either way."""
    try:
        write(*args)
    except MlflowException as e:
        if not _lost_insert_race(e):
            raise
        write(*args)


def record_decision(client: MlflowClient, decision: Decision) -> None:
    """Keep the alias history MLflow lacks (mlflow#2169): tags on the version and on the model."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload = json.dumps({**decision.model_dump(), "at": stamp})
    _set_tag(client.set_model_version_tag, decision.model, decision.version, "promotion.decision",
             "champion" if decision.promoted else "challenger")
    _set_tag(client.set_model_version_tag, decision.model, decision.version, "promotion.reason", decision.reason)
    _set_tag(client.set_registered_model_tag, decision.model, f"promotion.{stamp}.v{decision.version}", payload)


def promote_manual(name: str, version: str) -> Decision:
    """Force ``version`` of ``name`` to champion (an operator's decision, recorded like the gate's)."""
    client = MlflowClient()
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as e:
        if not _is(e, RESOURCE_DOES_NOT_EXIST):
            raise _failure(f"cannot read model {name!r} version {version}", e) from e
        known = [m.name for m in client.search_registered_models()]
        raise RegistryError(f"model {name!r} version {version} does not exist; registered models: {known}") from None
    current = champion(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(mv.version))
    decision = Decision(model=name, version=str(mv.version), metric=float(mv.tags.get(METRIC_TAG, "nan")),
                        champion_version=current[0] if current else None,
                        champion_metric=current[1] if current else None, promoted=True, reason="manual promotion")
    record_decision(client, decision)
    return decision


def aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model."""
    try:
        return {alias: str(v) for alias, v in MlflowClient().get_registered_model(name).aliases.items()}
    except MlflowException as e:
        if not _is(e, RESOURCE_DOES_NOT_EXIST):
            raise _failure(f"cannot read the aliases of registered model {name!r}", e) from e
        raise RegistryError(f"registered model {name!r} does not exist") from None


def decision_rows(decisions: list[Decision]) -> list[dict[str, Any]]:
    return [d.model_dump() for d in decisions]
