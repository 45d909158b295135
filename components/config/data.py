"""params/data.yaml: the task registry, the active tasks, federated shards."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from components.config.base import Modality, Strict, TaskKind


class SplitSpec(Strict):
    protocol: Literal["official", "official_test", "stratified", "files"] = Field(
        description="official: splits stored in the source; official_test: official test ids, "
        "train/val drawn from the rest; stratified: seeded stratified split; files: train/dev/test files."
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Validation share where the split is drawn.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Test share (stratified protocol only).")
    dedup: bool = Field(True, description="Drop exact duplicate inputs before drawing a split (no leakage).")


class TaskSpec(Strict):
    modality: Modality = Field(description="Input modality.")
    format: Literal["medmnist_npz", "pubmedqa_json", "table"] = Field(description="Loader to use.")
    path: str = Field(description="Source file or folder; ${VAR} and ${VAR:-default} are expanded.")
    kind: TaskKind = Field(description="Label structure.")
    label_names: list[str] = Field(min_length=2, description="Class names, in label-index order.")
    description: str = Field("", description="One sentence saying what the task asks.")
    split: SplitSpec = Field(description="How train/val/test are obtained.")
    augment: list[Literal["hflip", "vflip", "rot90"]] = Field(
        default_factory=list, description="Image tasks: label-preserving random transforms of the foundation's and "
        "the experts' training batches (each row its own draw; components/training/augment.py): hflip, vflip, rot90 "
        "(a random quarter turn; square images). Only what keeps the label: a skin lesion has no up or down, an "
        "ultrasound has depth. LoRKD distils from teacher logits of the untransformed images, so it does not augment.")
    optional: bool = Field(False, description="Licence-restricted: read from its path, never shipped.")
    caveat: str = Field("", description="Shown beside the task's name wherever its results are reported (e.g. a copy "
                        "whose figures are not comparable to the published dataset's).")
    text_column: str | None = Field(None, description="table: column holding the text.")
    label_column: str | None = Field(None, description="table: column holding the label.")
    label_values: list[str] | None = Field(
        None, description="table: raw label values in label-index order (default: label_names)."
    )
    label_format: Literal["value", "blurb_multilabel"] = Field(
        "value", description="table: 'value' = one class per row; 'blurb_multilabel' = '0_1,1_0,...'."
    )
    sep: str = Field(",", description="table: field separator.")
    test_ids_path: str | None = Field(None, description="official_test: JSON file whose keys are test ids.")
    text_fields: list[str] = Field(
        default_factory=lambda: ["QUESTION", "CONTEXTS"], description="pubmedqa_json: fields joined into the text."
    )
    label_key: str = Field("final_decision", description="pubmedqa_json: key of the label.")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        if self.format == "table" and (not self.text_column or not self.label_column) and self.split.protocol != "files":
            raise ValueError("format 'table' needs text_column and label_column")
        if self.split.protocol == "official_test" and not self.test_ids_path:
            raise ValueError("split.protocol 'official_test' needs test_ids_path")
        if self.label_values is not None and len(self.label_values) != len(self.label_names):
            raise ValueError("label_values must list one raw value per entry of label_names")
        if self.kind == "binary" and len(self.label_names) != 2:
            raise ValueError("kind 'binary' needs exactly 2 label_names")
        if self.augment and self.modality != "image":
            raise ValueError(f"augment {self.augment} applies to image tasks; this task is {self.modality}")
        return self


class FederationSpec(Strict):
    num_clients: int = Field(4, ge=1, description="Clients (hospitals) the train split is sharded across.")
    partition: Literal["iid", "dirichlet"] = Field("dirichlet", description="IID or Dirichlet label skew.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller = more skew.")


class DataParams(Strict):
    tasks: dict[str, TaskSpec] = Field(description="Task registry: name -> spec.")
    active: list[str] = Field(description="Tasks the pipeline runs (names from `tasks`).")
    federation: FederationSpec = Field(default_factory=FederationSpec, description="Per-client shards.")

    @field_validator("tasks")
    @classmethod
    def _names(cls, tasks: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
        for name in tasks:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"task name {name!r} must be lower_snake_case")
        return tasks

    @model_validator(mode="after")
    def _active_known(self) -> "DataParams":
        unknown = [t for t in self.active if t not in self.tasks]
        if unknown:
            raise ValueError(f"active lists unknown task(s) {unknown}; known: {sorted(self.tasks)}")
        if len(set(self.active)) != len(self.active):
            raise ValueError("active lists a task twice")
        if not self.active:
            raise ValueError("active must list at least one task")
        return self

    def active_tasks(self, modality: Modality | None = None) -> dict[str, TaskSpec]:
        """Active task specs in declared order, optionally of one modality."""
        return select_tasks(self.tasks, self.active, modality)


def select_tasks(tasks: dict[str, TaskSpec], active: list[str], modality: Modality | None = None) -> dict[str, TaskSpec]:
    """The specs of ``active`` (in that order), optionally only those of one modality."""
    return {n: tasks[n] for n in active if modality is None or tasks[n].modality == modality}
