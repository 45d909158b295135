"""params/experts.yaml: the expert method, LoRA / prompt settings, the probe, training per modality."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from components.config.base import Modality, Strict
from components.config.training import ClassWeight, ModalityTrainers


class LoraParams(Strict):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    text_targets: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1,
                                    description="Module names adapted in the text encoder.")
    image_targets: list[str] = Field(default_factory=lambda: ["conv"], min_length=1,
                                     description="Module-name suffixes adapted in the image CNN.")


class ProbeParams(Strict):
    epochs: int = Field(1000, ge=1, description="Full-batch steps of the linear probe (to convergence).")
    lr: float = Field(3e-2, gt=0, description="Probe learning rate.")
    l2_grid: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2], min_length=1,
                                 description="L2 strengths tried; the best on validation is kept.")
    multilabel_thresholds: bool = Field(
        True, description="Multilabel: per-label decision thresholds picked on validation (kept only where they beat "
                          "0.5 across a half split of it) and folded into the head: the probe, the expert, the fused "
                          "model (picked again on the merged model) and the LoRKD students and their fused experts. "
                          "bench/results/multilabel_probe.json measures them on HoC.")
    prior_shift: bool = Field(
        False, description="Binary / multiclass: post-hoc logit adjustment, bias += tau * log(class frequency), tau "
                           "picked on validation for macro-F1 (kept only where it beats the head's own decision across "
                           "a half split of it): the probe and the expert (components/training/prior_shift.py).")
    class_weight: ClassWeight = Field(
        "balanced", description="balanced: class-weighted loss (scikit-learn's class_weight='balanced'; multilabel: "
                                "per-label positive weights); none: unweighted.")

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
    method_lr: dict[ExpertMethodName, dict[Modality, Annotated[float, Field(gt=0)]]] = Field(
        default_factory=dict, description="Learning rate per method and modality where it differs from "
        "trainer.<modality>.lr (prompt tuning needs a larger step, full fine-tuning of a pre-trained "
        "transformer a much smaller one).")

    def method_for(self, modality: Modality) -> ExpertMethodName:
        return self.image_method or self.method if modality == "image" else self.method

    def lr_for(self, method: ExpertMethodName, modality: Modality) -> float:
        return self.method_lr.get(method, {}).get(modality, self.trainer.of(modality).lr)
