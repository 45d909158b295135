"""Every file name the stages write or read, in one place: one function (or constant) per path.

A stage writes one folder, ``<artifacts>/<stage>/``; what lies inside is named here so a reader of another stage
(evaluate reads fusion's bundles, promote reads every deployable model) never spells a path itself.
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "manifest.json"  # every artifact folder: kind + sha256 of each file (components.core.artifacts)
# ``.<name>.<tag>-<pid>-<hex8>``: the temporary siblings of components.core.artifacts (tag "tmp" for a write in
# progress, "old" for the output it replaces); components.core.lock finds the ones of dead processes by it.
SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
STAGE_FILE = "_stage.json"  # the fingerprint that produced a stage folder
SUMMARY_FILE = "_summary.json"  # the stage's typed summary (components.stages.*.Summary)


# --------------------------------------------------------------------------- the artifacts folder
def stage_dir(artifacts: Path, stage: str) -> Path:
    return Path(artifacts) / stage


def checkpoints_root(artifacts: Path) -> Path:
    """Resume checkpoints, outside the atomic stage folders so a killed run leaves them."""
    return Path(artifacts) / "checkpoints"


def stage_checkpoints(artifacts: Path, stage: str, fingerprint: str) -> Path:
    """Keyed by the stage fingerprint: a run with other params, data or code never resumes from them."""
    return checkpoints_root(artifacts) / stage / fingerprint[:16]


# --------------------------------------------------------------------------- sources (hashes of out-of-project inputs)
def sources_file(sources_dir: Path, consumer: str) -> Path:
    """``sources/<consumer>.json``: the hashes of the inputs stage ``consumer`` reads from outside the project."""
    return Path(sources_dir) / f"{consumer}.json"


# --------------------------------------------------------------------------- data
def split_file(data_dir: Path, task: str, split: str, modality: str) -> Path:
    return Path(data_dir) / task / f"{split}{'.npz' if modality == 'image' else '.jsonl'}"


def shards_file(data_dir: Path, task: str) -> Path:
    return Path(data_dir) / task / "shards.json"


# --------------------------------------------------------------------------- foundation
def foundation_dir(foundation: Path, modality: str) -> Path:
    return Path(foundation) / modality


IMAGE_ENCODER = "encoder.safetensors"
IMAGE_HEADS = "heads.safetensors"  # the image foundation's pre-training heads (LoRKD's image teacher heads)


# --------------------------------------------------------------------------- experts
def expert_dir(experts: Path, task: str) -> Path:
    return Path(experts) / task


def expert_bundle(expert: Path) -> Path:
    """An expert folder's deployable form (ΔW folded into the foundation)."""
    return Path(expert) / "bundle"


# --------------------------------------------------------------------------- decompose (LoRKD)
def lorkd_dir(decompose: Path, modality: str) -> Path:
    return Path(decompose) / modality


def teacher_heads(decompose: Path, modality: str) -> Path:
    return lorkd_dir(decompose, modality) / "teacher_heads.safetensors"


def lorkd_student(decompose: Path, modality: str) -> Path:
    return lorkd_dir(decompose, modality) / "student"


def lorkd_fused(decompose: Path, modality: str, task: str) -> Path:
    """Task ``task`` fused out of the decomposed student: a deployable bundle."""
    return lorkd_dir(decompose, modality) / "fused" / task


def lorkd_single(decompose: Path, modality: str, task: str) -> Path:
    """The same-size single-task student (the no-decomposition baseline): a bundle."""
    return lorkd_dir(decompose, modality) / "single" / task


# --------------------------------------------------------------------------- fusion
def fused_bundle(fusion: Path, method: str) -> Path:
    return Path(fusion) / method


def fusion_curve(fusion: Path) -> Path:
    return Path(fusion) / "fusion_curve.png"


# --------------------------------------------------------------------------- federated (FedKIM)
def injected_model(federated: Path) -> Path:
    """The foundation with the federated knowledge injected (trainable state, client encoders, config)."""
    return Path(federated) / "injected"


def federated_curve(federated: Path) -> Path:
    return Path(federated) / "rounds.png"


# --------------------------------------------------------------------------- routing (AT-MoE)
def routed_bundle(routing: Path) -> Path:
    return Path(routing) / "routed"


def routing_weights(routing: Path) -> Path:
    """Mean router weight per task, layer and expert on validation (JSON)."""
    return Path(routing) / "routing_weights.json"


def routing_heatmap(routing: Path, task: str) -> Path:
    return Path(routing) / "plots" / f"routing_{task}.png"


# --------------------------------------------------------------------------- evaluate
def evaluation_metrics(evaluate: Path) -> Path:
    return Path(evaluate) / "metrics.json"


def evaluation_report(evaluate: Path) -> Path:
    return Path(evaluate) / "report.md"


def evaluation_plots(evaluate: Path) -> Path:
    return Path(evaluate) / "plots"
