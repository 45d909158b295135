"""params/decompose.yaml: LoRKD students, expert rank, distillation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from components.config.base import Modality, PerModality, Strict
from components.config.training import ModalityTrainers, TrainerParams


class ImageStudentParams(Strict):
    widths: list[int] = Field(default_factory=lambda: [8, 16, 32], min_length=1,
                              description="Channels of each residual stage; every stage after the first halves "
                                          "the resolution (28 -> 14 -> 7).")
    blocks: int = Field(1, ge=1, description="Residual blocks per stage.")

    @field_validator("widths")
    @classmethod
    def _positive(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError("every width must be >= 1")
        return widths


class TextStudentParams(Strict):
    layers: list[int] = Field(default_factory=lambda: [0], min_length=1,
                              description="Teacher BertLayers copied into the student, in order (e.g. [0, 5]).")
    embedding_rank: int = Field(12, ge=1, description="k of the factorised word embedding (vocab x k, k x hidden), "
                                                      "initialised by truncated SVD of the teacher's table.")
    max_positions: int = Field(128, ge=8, description="Position embeddings kept; must be >= "
                                                      "foundation.text.max_length.")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: list[int]) -> list[int]:
        if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ValueError("layers must be distinct, non-negative teacher layer indices")
        return layers


class StudentParams(Strict):
    image: ImageStudentParams = Field(default_factory=ImageStudentParams, description="Image student (ResNet).")
    text: TextStudentParams = Field(default_factory=TextStudentParams, description="Text student (shallow BERT).")


TeacherKind = Literal["expert", "foundation"]


class TeacherParams(PerModality[TeacherKind]):
    """What each modality's student is distilled from: ``expert`` = the task's deployed expert (the experts
    stage's output, the strongest per-task model the pipeline has); ``foundation`` = the frozen foundation with
    its pre-training head for the task (image), or a linear probe fitted here as the experts stage fits its own."""

    image: TeacherKind = Field("foundation", description="Teacher of the image student (expert or foundation).")
    text: TeacherKind = Field("expert", description="Teacher of the text student (expert or foundation).")


def _default_trainers() -> ModalityTrainers:
    return ModalityTrainers(
        text=TrainerParams(max_epochs=3, batch_size=32, lr=5e-4, weight_decay=0.01),
        image=TrainerParams(max_epochs=10, batch_size=64, lr=2e-3, weight_decay=1e-4),
    )


class DecomposeParams(Strict):
    modalities: list[Modality] = Field(
        default_factory=lambda: ["image", "text"], min_length=1,
        description="Modalities decomposed; one student per modality serves all its active tasks.")
    student: StudentParams = Field(default_factory=StudentParams, description="Student backbone per modality.")
    teacher: TeacherParams = Field(default_factory=TeacherParams,
                                   description="Per modality: distil the deployed expert or the foundation + head.")
    rank: int = Field(4, ge=1, description="Rank r of every task expert (B_t A_t) in every conv/linear layer.")
    alpha: float = Field(8.0, gt=0, description="Expert scale alpha / r (LoRA convention).")
    head_init: Literal["auto", "teacher", "random"] = Field(
        "auto", description="Student task heads: copy the teacher's heads (teacher; feature dims must match), "
                            "random, or auto = copy where the dims match.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the KL(teacher || student) term.")
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T (the KL is scaled by T^2).")
    trainer: ModalityTrainers = Field(default_factory=_default_trainers, description="Distillation per modality.")
