"""Task vectors of a set of experts, and the checks that they can be merged.

Two spaces (``fusion.lora_space``):
- ``delta_w``: the dense update ΔW of every adapted weight (Expert.delta()), for every method with weights.
- ``adapter``: plain LoRA experts' adapter parameters, τ_t = (A_t − A0, B_t − B0) per layer, merged as the L-LoRA
  paper merges PEFT parameters; the merged model's ΔW per layer is s·B_merged·A_merged. Not linear in the task
  vectors (cross terms B_s·A_t; weight −1 does not negate, peft#3004): the comparison is the point of offering it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from components.config import LoraParams
from components.core.errors import ArtifactError, ParamsError
from components.experts.io import Expert
from components.experts.lora import ADAPTER, attach_lora, delta_weights, lora_layers, lora_targets
from components.fusion.merge import TaskVector
from components.nn.foundation import Foundation

ToDelta = Callable[[TaskVector], TaskVector]  # a merged task vector -> the ΔW the merged model adds


# --------------------------------------------------------------------------- checks
def _who(values: dict[str, Any]) -> str:
    """'a, b: x; c: y': which experts share which value, for the messages of conflicts."""
    groups: dict[str, list[str]] = {}
    for task, value in values.items():
        groups.setdefault(str(value), []).append(task)
    return "; ".join(f"{', '.join(tasks)}: {value}" for value, tasks in groups.items())


def check_same_start(experts: dict[str, Expert]) -> None:
    """Task vectors only add when the experts share a method and (L-LoRA) the same initial adapter φ0."""
    if not experts:
        raise ArtifactError("no experts to merge (empty expert list)")
    methods = {t: e.manifest["method"] for t, e in experts.items()}
    if len(set(methods.values())) > 1:
        raise ArtifactError(f"experts of different methods cannot be merged ({_who(methods)}); "
                            "train them with one experts.method")
    inits = {t: e.manifest.get("init_sha256") for t, e in experts.items()}
    if len(set(inits.values())) > 1:
        short = {t: (h or "none")[:12] for t, h in inits.items()}
        raise ArtifactError(f"L-LoRA experts start from different initialisations φ0 (hashes {_who(short)}); "
                            "train them with the same seed and LoRA settings")


def check_adapter_space(experts: dict[str, Expert], modality: str) -> None:
    """Adapter-space merging adds A and B entry by entry: plain LoRA experts with one rank, scale and target set,
    trained from the same seed (their shared A0 is rebuilt from it)."""
    other = {t: e.manifest["method"] for t, e in experts.items() if e.manifest["method"] != "lora"}
    if other:
        why = ("L-LoRA is linear in its adapter parameters, so its ΔW-space merge already is the merge in the "
               "linearized form" if set(other.values()) == {"llora"} else "they have no LoRA adapter")
        raise ParamsError(f"fusion.lora_space 'adapter' merges plain LoRA adapters (method 'lora'), but the experts "
                          f"are {_who(other)}: {why}; set fusion.lora_space: delta_w")
    def targets(e: Expert) -> list[str]:
        return sorted(e.manifest.get("targets") or lora_targets(LoraParams(**e.manifest["lora"]), modality))

    settings = {
        "rank": {t: e.manifest["lora"]["rank"] for t, e in experts.items()},
        "alpha": {t: e.manifest["lora"]["alpha"] for t, e in experts.items()},
        "target modules": {t: targets(e) for t, e in experts.items()},
        "seed (the initial A0)": {t: e.manifest.get("seed") for t, e in experts.items()},
    }
    unseeded = [t for t, s in settings["seed (the initial A0)"].items() if s is None]
    if unseeded:
        raise ArtifactError(f"experts {unseeded} record no seed, so their initial A0 cannot be rebuilt for "
                            "adapter-space merging; set fusion.lora_space: delta_w")
    for what, values in settings.items():
        if len(set(map(str, values.values()))) > 1:
            raise ArtifactError(f"adapter-space merging needs every LoRA expert to share its {what}, but they differ "
                                f"({_who(values)}); retrain them with the same experts.lora and pipeline.seed, or set "
                                "fusion.lora_space: delta_w (ΔW space allows different ranks)")


# --------------------------------------------------------------------------- task vector spaces
def _identity(delta: TaskVector) -> TaskVector:
    return delta


@torch.no_grad()
def shared_start_delta(expert: Expert) -> TaskVector:
    """ΔW(φ0) = s·B0·A0 of an L-LoRA expert's start, a constant in every expert's ΔW (φ0 is shared; checked).

    Only the jvp path can start from B0 ≠ 0 (continuing from a trained adapter); PEFT's init B0 = 0 makes it
    vanish, and then it is left out ({}). On the jvp path the wrapped layer's own A, B stay at φ0.
    """
    if expert.manifest["method"] != "llora" or expert.manifest.get("llora_path") != "jvp":
        return {}
    start = {k: layer.get_delta_weight(ADAPTER).detach().clone() for k, layer in lora_layers(expert.encoder).items()}
    return start if any(bool(v.any()) for v in start.values()) else {}


def delta_w_space(experts: dict[str, Expert]) -> tuple[list[TaskVector], ToDelta]:
    """ΔW task vectors (and how a merged one becomes the model's ΔW).

    L-LoRA: a linearized layer is exactly linear in δ = φ − φ0, ΔW_lin(δ) = ΔW(φ0) + J·δ, so merging
    ΔW_lin − ΔW(φ0) IS merging the linearized models' task vectors (exactly, for the linear methods; TIES and DARE
    trim or drop entries of ΔW, as they do for every expert method here). The constant ΔW(φ0) is taken out before
    merging and added once after, else λ·Σ would count it T·λ times.
    """
    vectors = [e.delta() for e in experts.values()]
    start = shared_start_delta(next(iter(experts.values())))
    if not start:
        return vectors, _identity
    vectors = [{k: v - start[k] for k, v in tv.items()} for tv in vectors]
    return vectors, lambda merged: {k: v + start[k] for k, v in merged.items()}


class AdapterSpace:
    """Plain LoRA experts in adapter space: τ_t = φ_t − φ0 with φ = (A, B) of every layer; ``to_delta`` maps a
    merged τ to ΔW(φ0 + τ) = s·B·A per layer (PEFT's get_delta_weight reshapes a conv's A (r, in, k, k) and
    B (out, r, 1, 1)).

    A plain LoRA expert does not store φ0: it is rebuilt as training built it, the foundation's LoRA at the
    experts' shared seed (train_expert seeds right before building, so every task starts from this φ0; B0 = 0).
    """

    def __init__(self, foundation: Foundation, manifest: dict[str, Any]) -> None:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
            torch.manual_seed(manifest["seed"])
            self.model = attach_lora(foundation.encoder, LoraParams(**manifest["lora"]), foundation.modality).eval()
        self.init = {k: p.detach().clone() for k, p in self.params(self.model).items()}

    @staticmethod
    def params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """A and B of every LoRA layer, named after the weight they adapt."""
        return {f"{key.removesuffix('.weight')}.lora_{ab}.weight": getattr(layer, f"lora_{ab}")[ADAPTER].weight
                for key, layer in lora_layers(model).items() for ab in ("A", "B")}

    def task_vector(self, expert: Expert) -> TaskVector:
        mine = self.params(expert.encoder)
        if mine.keys() != self.init.keys():
            raise ArtifactError(f"expert {expert.task!r} adapts other layers than its manifest's LoRA settings build")
        return {k: (p.detach() - self.init[k]).clone() for k, p in mine.items()}

    @torch.no_grad()
    def to_delta(self, merged: TaskVector) -> TaskVector:
        for k, p in self.params(self.model).items():
            p.copy_(self.init[k] + merged[k])
        return delta_weights(self.model)


def task_vectors(experts: dict[str, Expert], foundation: Foundation, space: str) -> tuple[list[TaskVector], ToDelta]:
    """The experts' task vectors in ``space`` (fusion.lora_space) and the map from a merged one to ΔW."""
    if space == "delta_w":
        return delta_w_space(experts)
    check_adapter_space(experts, foundation.modality)
    adapter = AdapterSpace(foundation, next(iter(experts.values())).manifest)
    return [adapter.task_vector(e) for e in experts.values()], adapter.to_delta
