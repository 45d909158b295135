"""The root of the params tree: one section per params file, and the rules that span sections."""

from __future__ import annotations

from pydantic import BaseModel, model_validator

from components.config.base import Strict
from components.config.data import DataParams
from components.config.decompose import DecomposeParams
from components.config.evaluate import EvaluateParams
from components.config.experts import ExpertsParams
from components.config.federated import FederatedParams
from components.config.foundation import FoundationParams
from components.config.fusion import FusionParams
from components.config.pipeline import PipelineParams
from components.config.registry import RegistryParams
from components.config.routing import RoutingParams
from components.config.training import TrainerParams

SECTIONS: tuple[str, ...] = ("pipeline", "data", "foundation", "experts", "decompose", "federated", "routing", "fusion",
                             "evaluate", "registry")


# Last name component of the image encoders' convs (components/nn: ImageEncoder's blocks.N.conv; ResNet's blocks'
# conv1/conv2, its stem.0 and shortcut.0) and the LoRA targets that suit each.
_IMAGE_CONV_LEAVES = {"cnn": {"conv"}, "resnet": {"conv1", "conv2", "0"}}
_IMAGE_DEFAULT_TARGETS = {"cnn": ["conv"], "resnet": ["conv1", "conv2"]}


class Params(Strict):
    pipeline: PipelineParams
    data: DataParams
    foundation: FoundationParams
    experts: ExpertsParams
    decompose: DecomposeParams
    federated: FederatedParams
    routing: RoutingParams
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

    @model_validator(mode="after")
    def _image_targets_fit_the_arch(self) -> "Params":
        # The experts stage checks targets against the real modules; this catches the common slip (switching
        # foundation.image.arch and keeping the other arch's targets) before the foundation pre-trains for hours.
        arch = self.foundation.image.arch
        leaves = _IMAGE_CONV_LEAVES[arch]
        if self.data.active_tasks("image") and self.experts.method_for("image") in ("lora", "llora"):
            bad = [t for t in self.experts.lora.image_targets if t.rsplit(".", 1)[-1] not in leaves]
            if bad:
                raise ValueError(f"experts.lora.image_targets {bad} name no conv of the {arch!r} image foundation "
                                 f"(foundation.image.arch); its conv names end in {sorted(leaves)}: e.g. "
                                 f"experts.lora.image_targets: {_IMAGE_DEFAULT_TARGETS[arch]}")
        return self

    @model_validator(mode="after")
    def _routing_groups_name_tasks(self) -> "Params":
        grouped = {t for tasks in self.routing.groups.values() for t in tasks}
        unknown = sorted(grouped - set(self.data.tasks))
        if unknown:
            raise ValueError(f"routing.groups names {unknown}, which are not tasks in data.tasks (known: "
                             f"{sorted(self.data.tasks)})")
        loose = [t for t in self.data.active_tasks(self.routing.modality) if t not in grouped]
        if loose:
            raise ValueError(f"routing.groups: active {self.routing.modality} task(s) {loose} are in no group; add "
                             "each to one group")
        return self

    @model_validator(mode="after")
    def _federated_tasks(self) -> "Params":
        fp = self.federated
        loose = [t for t in fp.held_out if t not in self.data.active]
        if loose:
            raise ValueError(f"federated.held_out lists {loose}, which are not active tasks (data.active)")
        if fp.held_out and len(fp.held_out) == len(self.data.active):
            raise ValueError("federated.held_out holds out every active task: no client would train on any")
        if fp.min_clients is not None and fp.min_clients > self.data.federation.num_clients:
            raise ValueError(f"federated.min_clients ({fp.min_clients}) exceeds data.federation.num_clients "
                             f"({self.data.federation.num_clients})")
        return self

    @model_validator(mode="after")
    def _no_ddp_inside_dask(self) -> "Params":
        # Lightning's DDP launches its ranks by re-running the current command (or forking), which a Dask worker
        # process cannot do: refused here, before a cluster starts, rather than hanging or failing in a worker.
        if self.pipeline.runner.kind != "dask":
            return self
        multi = [f"{path} (strategy {tp.strategy}, devices {tp.devices}, num_nodes {tp.num_nodes})"
                 for section in ("experts", "decompose", "federated")
                 for path, tp in _trainers(getattr(self, section), section) if _multi_process(tp)]
        if multi:
            raise ValueError(f"pipeline.runner.kind 'dask' runs the experts, decompose and federated stages inside "
                             f"Dask workers, where Lightning DDP cannot start its processes; multi-process trainers: "
                             f"{multi}. Use runner.kind 'local' with DDP, or one device per trainer on Dask (Dask "
                             f"spreads the experts over the GPUs: cluster_class dask_cuda.LocalCUDACluster)")
        return self

    @model_validator(mode="after")
    def _student_reads_the_foundation_inputs(self) -> "Params":
        positions, length = self.decompose.student.text.max_positions, self.foundation.text.max_length
        if self.data.active_tasks("text") and "text" in self.decompose.modalities and positions < length:
            raise ValueError(f"decompose.student.text.max_positions ({positions}) is below foundation.text.max_length "
                             f"({length}): the LoRKD text student could not read the inputs the foundation reads")
        return self


def _trainers(node: object, path: str) -> list[tuple[str, TrainerParams]]:
    """Every TrainerParams under a params section, with its dotted path."""
    if isinstance(node, TrainerParams):
        return [(path, node)]
    if isinstance(node, BaseModel):
        return [hit for name in type(node).model_fields for hit in _trainers(getattr(node, name), f"{path}.{name}")]
    if isinstance(node, dict):
        return [hit for key, value in node.items() for hit in _trainers(value, f"{path}.{key}")]
    return []


def _multi_process(tp: TrainerParams) -> bool:
    return tp.strategy == "ddp" or tp.devices != 1 or tp.num_nodes > 1
