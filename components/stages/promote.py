"""The promote stage's domain half: which models this run offers to the registry, with their validation metric.

Registration and the champion/challenger gate are MLflow work (``components.tracking.registry``); the driver
calls them for every candidate listed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from components.bundle.format import check_bundle_manifest
from components.config import PrimaryMetric, RegistryParams
from components.core.artifacts import read_manifest, read_model
from components.core.layout import (SUMMARY_FILE, expert_bundle, expert_dir, fused_bundle, injected_model, lorkd_fused,
                                    routed_bundle)
from components.stages.base import StageSummary, StageInputs, param
from components.stages.decompose import DecomposeSummary
from components.stages.experts import ExpertsSummary
from components.stages.fusion import FusionSummary
from components.stages.federated import FederatedSummary
from components.stages.routing import RoutingSummary

FEDKIM_SERVING = frozenset({"lightning", "torchmetrics", "matplotlib"})  # see components.tracking.pyfunc


class PromoteInputs(StageInputs):
    registry: RegistryParams = param("registry")
    active: list[str] = param("data.active")
    metric: PrimaryMetric = param("evaluate.primary_metric")
    profile: str = param("pipeline.profile", "recorded on every registered version")
    routing_modality: str = param("routing.modality", "names the registered routed model")


class Decision(StageSummary):
    model: str
    version: str
    metric: float
    champion_version: str | None
    champion_metric: float | None
    promoted: bool
    reason: str


class PromoteSummary(StageSummary):
    decisions: list[Decision]


@dataclass
class Candidate:
    """A deployable bundle offered to the registry under ``name``, judged by ``metric`` (validation)."""

    name: str
    bundle: Path
    metric: float
    tags: dict[str, str] = field(default_factory=dict)
    needs: frozenset[str] = frozenset()  # packages its serving needs beyond a bundle's (FedKIM: its training code)


def candidates(inp: PromoteInputs, experts: Path, decompose: Path, fusion: Path, routing: Path, federated: Path,
               data: Path) -> list[Candidate]:
    """Every model this run offers: each task's expert, each fused LoRKD expert, the best fused model, the routed
    (AT-MoE) model, the FedKIM injected foundation."""
    prefix, metric, out = inp.registry.prefix, inp.metric, []
    runs = read_model(experts / SUMMARY_FILE, ExpertsSummary, "experts summary").tasks
    for task in inp.active:
        bundle = expert_bundle(expert_dir(experts, task))
        out.append(Candidate(f"{prefix}-{task}", bundle, float(runs[task].val[metric]),
                             {"method": runs[task].method, **_run_tag(runs[task].run_id), **_size(bundle)}))
    decomposed = read_model(decompose / SUMMARY_FILE, DecomposeSummary, "decompose summary")
    for modality, s in decomposed.modalities.items():
        for task, r in s.tasks.items():
            bundle = lorkd_fused(decompose, modality, task)
            out.append(Candidate(f"{prefix}-{task}-lorkd", bundle, float(r.val[metric]),
                                 {"method": "lorkd", **_size(bundle)}))
    fused = read_model(fusion / SUMMARY_FILE, FusionSummary, "fusion summary")
    if fused.best_method is not None:
        bundle = fused_bundle(fusion, fused.best_method)
        out.append(Candidate(f"{prefix}-fused-{fused.modality}", bundle, fused.best_val_mean(),
                             {"method": fused.best_method, **_size(bundle)}))
    routed = read_model(routing / SUMMARY_FILE, RoutingSummary, "routing summary")
    if routed.skipped is None:
        bundle = routed_bundle(routing)
        out.append(Candidate(f"{prefix}-routed-{inp.routing_modality}", bundle, routed.val_mean(),
                             {"method": f"atmoe_{routed.router}", **_size(bundle)}))
    fed = read_model(federated / SUMMARY_FILE, FederatedSummary, "federated summary")
    if fed.skipped is None:
        # lineage: the rounds, the clients that took part and the hash of the rows each of them trained on (a
        # Flower site hashes its own: its rows never left it), with the hashes of every shard file (simulated) or of
        # the Flower run's aggregate and reports
        took_part = sorted({c for r in fed.rounds_accepted for c in r})
        if fed.flower_run:
            trained_on = {f"federated.flower.{k}": v for k, v in fed.flower_run.items()}
        else:
            shards = read_manifest(data, kind="data", verify=False)["files"]
            trained_on = {f"federated.shards.{t}": shards[f"{t}/shards.json"] for t in fed.client_tasks}
        trained_on |= {f"federated.shard.{c}": fed.client_shards[c] for c in took_part if c in fed.client_shards}
        mean = sum(v[inp.metric] for v in fed.val.values()) / len(fed.val)
        out.append(Candidate(f"{prefix}-fedkim", injected_model(federated), mean, {
            "method": "fedkim", "federated.rounds": str(len(fed.rounds)), "federated.clients": ",".join(took_part),
            **trained_on}, needs=FEDKIM_SERVING))
    return out


def _run_tag(run_id: str | None) -> dict[str, str]:
    return {"training_run_id": run_id} if run_id else {}


def _size(bundle: Path) -> dict[str, str]:
    """The deployed parameter count, where the bundle records it (LoRKD students)."""
    manifest = check_bundle_manifest(read_manifest(bundle, kind="bundle", verify=False), bundle)
    return {"parameters": str(manifest.parameters)} if manifest.parameters is not None else {}
