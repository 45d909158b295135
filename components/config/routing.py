"""params/routing.yaml: AT-MoE, the experts stage's frozen LoRA experts combined by a layer-wise grouped router."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from components.config.base import Strict
from components.config.training import TrainerParams

# The router registry (components/moe/routers.py) checks at import that it implements exactly these.
RouterName = Literal["grouped", "flat", "uniform"]


def _default_groups() -> dict[str, list[str]]:
    # Grouped by function: what the task asks (answer a question / classify a text / name a diagnosis).
    return {"question_answering": ["pubmedqa"], "classification": ["medical_abstracts", "hoc"],
            "diagnosis": ["symptom2disease"]}


def _default_trainer() -> TrainerParams:
    return TrainerParams(max_epochs=2, batch_size=32, lr=5e-3, max_train_samples=400)


def _default_general_trainer() -> TrainerParams:
    return TrainerParams(max_epochs=2, batch_size=16, lr=1e-3, max_train_samples=400)


class GeneralAdapterParams(Strict):
    """AT-MoE's optional general adapter: one LoRA trained on all routed tasks' data (the experts' heads frozen),
    then frozen and mixed in every adapted layer: y = W0 h + λ·routed + (1 − λ)·general."""

    enabled: bool = Field(True, description="Train a general adapter and mix it with the routed experts (the "
                          "configuration that was best on validation and met the goals in bench/results/routing.json).")
    rank: int = Field(8, ge=1, description="LoRA rank of the general adapter (its alpha is 2 × rank).")
    lam: float = Field(0.5, description="λ, the routed experts' share against the general adapter (its start "
                       "value when learned).")
    learn_lam: bool = Field(True, description="λ trains with the routers (a sigmoid per adapted layer, starting at "
                            "`lam`); false keeps `lam` fixed.")
    trainer: TrainerParams = Field(default_factory=_default_general_trainer, description="Training of the general "
                                   "adapter on the mixed training set, before the routers (the experts' heads and "
                                   "the foundation frozen).")

    @model_validator(mode="after")
    def _lam_range(self) -> GeneralAdapterParams:
        if self.learn_lam and not 0.0 < self.lam < 1.0:
            raise ValueError(f"lam={self.lam} must lie in (0, 1) when it is learned (learn_lam: a sigmoid)")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam={self.lam} must lie in [0, 1]")
        return self


class RoutingParams(Strict):
    modality: Literal["text"] = Field("text", description="Experts of this modality are routed (AT-MoE mixes Linear "
                                      "LoRA layers; the image experts adapt convolutions).")
    groups: dict[str, list[str]] = Field(default_factory=_default_groups, description="Expert groups: group name -> "
                                         "task names (each task's expert in exactly one group); tasks that are not "
                                         "active are left out of their group.")
    router: RouterName = Field("grouped", description="grouped (AT-MoE: softmax over groups × softmax within) | flat "
                               "(one softmax over all experts) | uniform (every expert 1/E, nothing trained).")
    static_within: bool = Field(False, description="Within-group weights static (the paper's notation: an ablation); "
                                "default: they depend on the input too.")
    tau: float = Field(1.0, gt=0, description="Temperature of the group softmax (and of the flat router).")
    trainer: TrainerParams = Field(default_factory=_default_trainer, description="Router training on the mixed "
                                   "training set of the routed tasks (only the routers train).")
    max_val_samples: int | None = Field(None, ge=1, description="Cap on validation samples per task.")
    general: GeneralAdapterParams = Field(default_factory=GeneralAdapterParams, description="The optional general "
                                          "adapter mixed with the routed experts.")

    @field_validator("groups")
    @classmethod
    def _partition(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        if not groups:
            raise ValueError("needs at least one group")
        seen: dict[str, str] = {}
        for name, tasks in groups.items():
            if not tasks:
                raise ValueError(f"group {name!r} is empty")
            for task in tasks:
                if task in seen:
                    raise ValueError(f"task {task!r} is in two groups ({seen[task]!r} and {name!r}); an expert "
                                     "belongs to one group")
                seen[task] = name
        return groups

    def active_groups(self, active: list[str]) -> dict[str, list[str]]:
        """The groups restricted to the active tasks (in ``active`` order); groups left empty are dropped."""
        out = {name: [t for t in active if t in tasks] for name, tasks in self.groups.items()}
        return {name: tasks for name, tasks in out.items() if tasks}
