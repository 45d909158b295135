"""The routing stage (AT-MoE; Li & Yao, arXiv 2410.10896): the experts stage's frozen text LoRA experts combined in
every adapted layer by a router trained on a mixed training set of the routed tasks; only the routers train. Each
request is answered by its task's head (the expert's own, frozen); which experts help is what the router decides.

Written: ``routed/`` (a bundle: foundation by hash + the experts and routers as its ``routing`` wrapper),
``routing_weights.json`` and one heatmap per task (mean router weight per layer and expert on validation).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

import components.plugins  # noqa: F401  the expert bundles it loads may be soft prompts (their wrapper)
from components.bundle.format import TaskHead, save_bundle
from components.config import PrimaryMetric, RoutingParams
from components.config.training import TrainerParams
from components.core.artifacts import write_json
from components.core.layout import expert_dir, routed_bundle, routing_heatmap, routing_weights
from components.data.datasets import load_split
from components.experts.io import expert_method, load_expert
from components.metrics.classification import compute_metrics
from components.metrics.counts import count_parameters
from components.metrics.plots import plot_heatmap
from components.moe.layers import general_only, molora_layers, peft_factors
from components.moe.routed import ROUTING, RoutedEncoder, add_general_adapter, build_routed, routing_tensors
from components.nn.classifier import MultiTaskClassifier
from components.nn.foundation import load_foundation
from components.stages.base import StageSummary, TaskInputs, param
from components.training.balance import loss_weight
from components.training.data import labels_tensor, loader, mixed_tasks
from components.training.inference import batched
from components.training.module import MultiTaskModule
from components.training.trainer import build_trainer, data_device, resume_from

log = logging.getLogger("medexperts")


class RoutingInputs(TaskInputs):
    routing: RoutingParams = param("routing")
    metric: PrimaryMetric = param("evaluate.primary_metric")
    seed: int = param("pipeline.seed")


class RoutingSummary(StageSummary):
    skipped: str | None = None  # why nothing was routed
    experts: list[str] = []  # routed tasks, in expert order
    groups: dict[str, list[str]] = {}
    router: str | None = None
    metric: str | None = None
    val: dict[str, dict[str, float]] = {}  # the routed model, per task
    val_oracle: dict[str, dict[str, float]] = {}  # each task's own expert (one-hot routing)
    val_uniform: dict[str, dict[str, float]] = {}  # every expert 1/E
    val_general: dict[str, dict[str, float]] = {}  # the general adapter alone (λ = 0), when there is one
    lam: float | None = None  # λ, the routed experts' share against the general adapter (mean over layers)
    trainable_params: int = 0
    train_seconds: float = 0.0

    def val_mean(self) -> float:
        return sum(m[self.metric] for m in self.val.values()) / len(self.val)


def _split(data_dir: Path, tasks: list[str], split: str, cap: int | None, seed: int, inputs: Any) -> dict[str, Any]:
    out = {}
    for t in tasks:
        d = load_split(data_dir, t, split).subset(cap, seed)
        out[t] = (inputs(d.inputs), labels_tensor(d.labels, d.kind), d)
    return out


def _scores(model: MultiTaskClassifier, data: dict[str, Any]) -> dict[str, dict[str, float]]:
    model.eval()
    return {t: compute_metrics(d.kind, batched(lambda **x: model(t, **x), x), y, d.num_labels)
            for t, (x, y, d) in data.items()}


@contextlib.contextmanager
def _fixed_routing(routed: RoutedEncoder, weights: torch.Tensor | None) -> Iterator[None]:
    previous, routed.fixed = routed.fixed, weights
    try:
        yield
    finally:
        routed.fixed = previous


def _with_fixed(routed: RoutedEncoder, weights: torch.Tensor | None, fn: Any) -> Any:
    with _fixed_routing(routed, weights):
        return fn()


def mean_weights(model: MultiTaskClassifier, data: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per task, per layer: the router's expert weights averaged over the task's validation inputs."""
    routed: RoutedEncoder = model.encoder
    out: dict[str, dict[str, list[float]]] = {}
    for t, (x, _, _) in data.items():
        sums: dict[str, torch.Tensor] = {}
        n = len(next(iter(x.values())))
        for i in range(0, n, 64):
            with torch.no_grad():
                routed(**{k: v[i:i + 64] for k, v in x.items()})
            for layer, w in routed.last_weights().items():
                sums[layer] = sums.get(layer, 0) + w.sum(0)
        out[t] = {layer: (s / n).tolist() for layer, s in sums.items()}
    return out


def run(inp: RoutingInputs, data_dir: Path, foundation_dir: Path, experts_dir: Path, out_dir: Path,
        logger: Any = False, checkpoint_dir: Path | None = None) -> RoutingSummary:
    """The stage: skipped (with the reason) below 2 routed experts or for experts that are not LoRA."""
    rp, metric, seed = inp.routing, inp.metric, inp.seed
    groups = rp.active_groups(inp.active)
    tasks = [t for g in groups.values() for t in g]
    if len(tasks) < 2:
        return RoutingSummary(skipped=f"fewer than 2 active {rp.modality} tasks to route ({tasks})")
    methods = {t: expert_method(expert_dir(experts_dir, t)) for t in tasks}
    if set(methods.values()) != {"lora"}:
        return RoutingSummary(skipped=f"AT-MoE routes LoRA experts; the experts are {methods}")
    found = load_foundation(foundation_dir, rp.modality)
    experts = {t: load_expert(expert_dir(experts_dir, t), found) for t in tasks}
    routed = build_routed(found.encoder, {t: peft_factors(e.encoder) for t, e in experts.items()},
                          experts[tasks[0]].info.targets, router=rp.router,
                          groups=list(groups.values()) if rp.router == "grouped" else None, tau=rp.tau,
                          static_within=rp.static_within, seed=seed)
    model = MultiTaskClassifier(routed, {t: e.head.requires_grad_(False) for t, e in experts.items()})
    tp = rp.trainer
    val = _split(data_dir, tasks, "val", rp.max_val_samples, seed, found.inputs)
    kinds = {t: d.kind for t, (_, _, d) in val.items()}
    widths = {t: d.num_labels for t, (_, _, d) in val.items()}

    def fit(trainer_params: TrainerParams, label: str, checkpoints: Path | None) -> None:
        """Train what requires grad in ``model`` on the mixed training set (capped per task by ``trainer_params``),
        the best epoch by validation loss kept."""
        train = _split(data_dir, tasks, "train", trainer_params.max_train_samples, seed, found.inputs)
        weights = {t: loss_weight(kinds[t], y, widths[t], trainer_params.class_weight) for t, (_, y, _) in
                   train.items()}
        module = MultiTaskModule(model, tasks, kinds, trainer_params.lr, trainer_params.weight_decay, weights,
                                 trainer_params.lr_schedule)
        device = data_device(trainer_params)
        mixed = {name: mixed_tasks({t: v[0] for t, v in split.items()}, {t: v[1] for t, v in split.items()}, kinds,
                                   widths).to(device) for name, split in (("train", train), ("val", val))}
        with tempfile.TemporaryDirectory() as root:
            trainer = build_trainer(trainer_params, Path(root), logger=logger, monitor="val_loss", mode="min",
                                    checkpoint_dir=checkpoints, label=label)
            trainer.fit(module, loader(mixed["train"], trainer_params.batch_size, shuffle=True, seed=seed,
                                       group_by_length=trainer_params.group_by_length),
                        loader(mixed["val"], trainer_params.batch_size * 2, shuffle=False),
                        ckpt_path=resume_from(checkpoints))
        model.cpu()

    n = len(tasks)  # the references, before anything trains (and before a general adapter joins the mix)
    oracle = {}
    for e, t in enumerate(tasks):
        one_hot = torch.nn.functional.one_hot(torch.tensor(e), n).float()
        oracle[t] = _with_fixed(routed, one_hot, lambda: _scores(model, {t: val[t]}))[t]
    uniform = _with_fixed(routed, torch.full((n,), 1.0 / n), lambda: _scores(model, val))

    start = time.perf_counter()
    layers = molora_layers(routed.encoder)
    routers = [layer.router for layer in layers.values()]
    general = rp.general
    if general.enabled:  # AT-MoE's general adapter: trained first on every task's data (λ = 0), then frozen
        add_general_adapter(routed, rank=general.rank, alpha=2.0 * general.rank, lam=general.lam,
                            learn_lam=general.learn_lam, seed=seed)
        mixes = [layer.mix_logit for layer in layers.values() if hasattr(layer, "mix_logit")]
        adapters = [p for layer in layers.values() for p in (layer.general_a, layer.general_b)]
        for module in [*routers, *mixes]:
            module.requires_grad_(False)
        with general_only(layers), _fixed_routing(routed, torch.full((n,), 1.0 / n)):
            fit(general.trainer, "[routing] general adapter",
                checkpoint_dir / "general" if checkpoint_dir is not None else None)
            general_scores = _scores(model, val)
        for p in adapters:
            p.requires_grad_(False)
        for module in [*routers, *mixes]:
            module.requires_grad_(True)
    if rp.router != "uniform" or (general.enabled and general.learn_lam):  # else nothing to train
        if rp.router == "uniform":
            for router in routers:
                router.requires_grad_(False)
        fit(tp, f"[routing] {rp.router} router", checkpoint_dir)
    train_seconds = time.perf_counter() - start

    scores = _scores(model, val)
    for t in tasks:
        log.info("[routing] %s: val %s routed %.3f, own expert %.3f, uniform %.3f", t, metric, scores[t][metric],
                 oracle[t][metric], uniform[t][metric])

    weights = mean_weights(model, val)
    write_json(routing_weights(out_dir), weights)
    for t, per_layer in weights.items():
        plot_heatmap([per_layer[layer] for layer in per_layer], list(per_layer), tasks,
                     f"{t}: {rp.router} router weight per layer (validation mean)", routing_heatmap(out_dir, t))
    heads = {t: TaskHead(e.head, e.info.task_kind, e.info.label_names) for t, e in experts.items()}
    trainable = sum(count_parameters(router) for router in routers)  # what the stage trained
    lam = None
    if general.enabled:
        trainable += sum(p.numel() for p in (*adapters, *mixes))
        lam = float(torch.stack([layer.mix.detach() for layer in layers.values()]).mean())
        log.info("[routing] general adapter: val %s %s; λ (routed share) %.3f", metric,
                 {t: round(m[metric], 3) for t, m in general_scores.items()}, lam)
    tensors = routing_tensors(routed)
    # deployed: the foundation, every expert (frozen buffers, not parameters) and router, the task heads
    deployed = (count_parameters(found.encoder) + sum(t.numel() for t in tensors.values())
                + sum(count_parameters(e.head) for e in experts.values()))
    save_bundle(routed_bundle(out_dir), found, {}, heads, name=f"routed-{rp.modality}",
                metadata={"method": f"atmoe_{rp.router}", "tasks_routed": tasks, "groups": groups, "metric": metric,
                          "val_metrics": scores, "parameters": deployed,
                          "general": {"rank": general.rank, "lam": lam} if general.enabled else None},
                wrappers={ROUTING: tensors}, wrapper_config={ROUTING: routed.config})
    return RoutingSummary(experts=tasks, groups=groups, router=rp.router, metric=metric, val=scores, val_oracle=oracle,
                          val_uniform=uniform, val_general=general_scores if general.enabled else {}, lam=lam,
                          trainable_params=trainable, train_seconds=train_seconds)
