"""Save/load the decomposed student, and fuse one task into a plain deployable model (and save/load that).

Fusion folds every expert of task t into its layer (W = W0 + s·B_t A_t, conv factors into one kxk
kernel), giving the student architecture with plain nn.Linear / nn.Conv2d / BertLayer modules and no
expert code; its outputs equal the student's for task t. The student's hash is the sha256 of its
safetensors bytes (the same bytes ``student.safetensors`` holds), so a fused model names the exact
decomposition it came from and ``fuse`` can refuse any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save
from torch import nn

from components.core.artifacts import read_manifest, save_tensors, write_manifest
from components.decompose.backbones import backbone_from_config
from components.decompose.layers import fold_experts
from components.decompose.student import LoRKDStudent, student_from_config
from components.core.errors import ArtifactError
from components.metrics.counts import count_parameters
from components.core.fingerprint import sha256_bytes
from components.bundle.format import ARCHITECTURES, TaskHead, save_backbone_bundle
from components.nn.classifier import Classifier, make_head

STUDENT_FILE = "student.safetensors"
ARCHITECTURE = "lorkd_student"  # the bundle architecture name (components.bundle.format.ARCHITECTURES)


def _state(module: nn.Module) -> dict[str, Any]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def student_hash(student: LoRKDStudent) -> str:
    """sha256 of the student's weights as safetensors bytes (equals the sha256 of its saved file)."""
    return sha256_bytes(save(_state(student)))


def _load_state(module: nn.Module, state: dict[str, Any], where: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches: name them
        raise ArtifactError(f"{where}: weights do not match the recorded config ({exc})") from None


def save_student(out_dir: Path, student: LoRKDStudent, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the whole decomposed student (backbone, experts, heads) and a manifest carrying its hash."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(student.state_dict(), out_dir / STUDENT_FILE)
    manifest = {
        "kind": "lorkd_student",
        "config": student.config,
        "sha256": student_hash(student),
        "parameters": count_parameters(student),
        **(metadata or {}),
    }
    return write_manifest(out_dir, manifest)


def load_student(folder: Path) -> LoRKDStudent:
    """Rebuild a saved student (eval mode); every file is verified against the manifest first."""
    manifest = read_manifest(folder, kind="lorkd_student")
    student = student_from_config(manifest["config"])
    _load_state(student, load_file(Path(folder) / STUDENT_FILE), Path(folder))
    return student.eval()


def fuse(student: LoRKDStudent, task: str, expected_hash: str | None = None) -> Classifier:
    """Task ``task``'s deployable model: the backbone with its experts folded in, plus its head (eval mode).

    ``expected_hash``: the decomposition run's student hash; a student with other weights is refused.
    """
    if expected_hash is not None:
        actual = student_hash(student)
        if actual != expected_hash:
            raise ArtifactError(f"student weights hash {actual[:12]} differs from the expected decomposition "
                                f"run {expected_hash[:12]}; fuse the student that run saved")
    if task not in student.task_names:
        raise ArtifactError(f"cannot fuse task {task!r}: the student has experts for {student.task_names}")
    index = student.task_names.index(task)
    backbone = fold_experts(student.backbone, index)
    head = make_head(student.heads[task].in_features, student.heads[task].out_features)
    head.load_state_dict(student.heads[task].state_dict())
    return Classifier(backbone, head).eval()


def save_fused(out_dir: Path, student: LoRKDStudent, task: str, *, kind: str, label_names: list[str],
               expected_hash: str | None = None, tokenizer: Any = None, max_length: int = 128,
               metadata: dict[str, Any] | None = None, input_spec: dict[str, int] | None = None) -> dict[str, Any]:
    """Fuse ``task`` and write it as a model bundle (``components.bundle.format``): the plain network's weights,
    its config, the head and (text) the tokenizer, so it deploys, registers and predicts like every other model;
    ``load_bundle(out_dir).model.for_task(task)`` is the fused network. The manifest records the deployed size
    and the hash of the decomposition it came from."""
    model = fuse(student, task, expected_hash)
    if student.config["modality"] == "text" and tokenizer is None:
        raise ArtifactError(f"fused text model {task!r}: a tokenizer is needed so the bundle can read raw text")
    return save_backbone_bundle(
        out_dir, model.encoder, ARCHITECTURE, student.config["modality"], expected_hash or student_hash(student),
        {task: TaskHead(model.head, kind, label_names, input_spec)}, name=f"{task}-lorkd",
        metadata={"task": task, "parameters": count_parameters(model),
                  "student_sha256": expected_hash or student_hash(student), **(metadata or {})},
        tokenizer=tokenizer, max_length=max_length)


# A fused student deploys as a bundle of its plain (expert-free) backbone, rebuilt from the recorded config.
ARCHITECTURES.add(ARCHITECTURE, lambda base: backbone_from_config(base["modality"], base["config"]))
