"""What each stage runs (one component call) and what it records in MLflow (through components.tracking)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core.artifacts import read_json
from components.core.layout import (MANIFEST, STAGE_FILE, evaluation_plots, evaluation_report, expert_dir,
                                    federated_curve, foundation_dir, fusion_curve, lorkd_student, routing_heatmap,
                                    routing_weights)
from components.stages import data as data_stage
from components.stages import decompose as decompose_stage
from components.stages import evaluate as evaluate_stage
from components.stages import federated as federated_stage
from components.stages import experts as experts_stage
from components.stages import foundation as foundation_stage
from components.stages import fusion as fusion_stage
from components.stages import promote as promote_stage
from components.stages import routing as routing_stage
from components.stages import sources as sources_stage
from components.stages.data import DataInputs, DataSummary
from components.stages.decompose import DecomposeInputs, DecomposeSummary
from components.stages.evaluate import EvaluateInputs, EvaluateSummary
from components.stages.experts import ExpertsInputs, ExpertsSummary
from components.stages.federated import FederatedInputs, FederatedSummary
from components.stages.foundation import FoundationInputs, FoundationSummary
from components.stages.fusion import FusionInputs, FusionSummary
from components.stages.promote import PromoteInputs, PromoteSummary
from components.stages.routing import RoutingInputs, RoutingSummary
from components.stages.sources import SourcesInputs, SourcesSummary
from components.tracking import runs
from components.training.trainer import LAST
from components.tracking.lineage import git_info, log_datasets
from components.tracking.registry import gate, register_bundle, register_foundation, registered, settle

if TYPE_CHECKING:
    from flows.stages import StageContext

__all__ = ["DataInputs", "DataSummary", "DecomposeInputs", "DecomposeSummary", "EvaluateInputs", "EvaluateSummary",
           "ExpertsInputs", "ExpertsSummary", "FederatedInputs", "FederatedSummary", "FoundationInputs", "FoundationSummary", "FusionInputs",
           "FusionSummary", "PromoteInputs", "PromoteSummary", "RoutingInputs", "RoutingSummary", "SourcesInputs",
           "SourcesSummary"]

log = logging.getLogger("medexperts")


# --------------------------------------------------------------------------- sources
def source_hashes(ctx: StageContext, inp: SourcesInputs) -> dict[str, Any]:
    return sources_stage.source_hashes(inp, ctx.root).model_dump(mode="json")


def run_sources(ctx: StageContext, inp: SourcesInputs, out: Path) -> SourcesSummary:
    return sources_stage.run(inp, ctx.root, out)


def log_sources(ctx: StageContext, inp: SourcesInputs, summary: SourcesSummary, out: Path) -> None:
    runs.set_tags({f"source.{consumer}.{name}": digest for consumer, hashes in summary.model_dump().items()
                   if isinstance(hashes, dict) for name, digest in hashes.items()})


# --------------------------------------------------------------------------- data
def run_data(ctx: StageContext, inp: DataInputs, out: Path) -> DataSummary:
    return data_stage.run(inp, ctx.root, out)


def log_data(ctx: StageContext, inp: DataInputs, summary: DataSummary, out: Path) -> None:
    runs.log_params({"active": ",".join(inp.data.active), "federation": inp.data.federation.model_dump()})
    log_datasets(read_json(out / MANIFEST, "data manifest"), out)
    runs.log_metrics(summary.tasks, prefix="n.")
    runs.log_file(out / MANIFEST)


# --------------------------------------------------------------------------- foundation
def run_foundation(ctx: StageContext, inp: FoundationInputs, out: Path) -> FoundationSummary:
    return foundation_stage.run(inp, ctx.root, ctx.out("data"), out, checkpoint_dir=ctx.checkpoints("foundation"))


def log_foundation(ctx: StageContext, inp: FoundationInputs, summary: FoundationSummary, out: Path) -> None:
    runs.log_params(inp.foundation.model_dump(mode="json"))
    for modality, info in (("text", summary.text), ("image", summary.image)):
        if info is None:
            continue
        version = register_foundation(f"{ctx.params.registry.prefix}-foundation-{modality}",
                                      foundation_dir(out, modality), info.sha256)
        runs.set_tags({f"foundation.{modality}.sha256": info.sha256, f"foundation.{modality}.version": version})
        runs.log_metrics({f"foundation.{modality}.parameters": info.parameters})


# --------------------------------------------------------------------------- experts
@dataclass(frozen=True)
class ExpertJob:
    """One task's expert: what a task-runner worker needs to train it (picklable; the folders must be reachable
    from the worker: the same machine, or a shared file system)."""

    ctx: StageContext
    inp: ExpertsInputs
    task: str
    index: int
    total: int
    out_dir: Path  # the expert's folder inside the stage's temporary output
    checkpoint_dir: Path
    stage_run_id: str  # the MLflow run of the stage: the expert's run is its child


def run_experts(ctx: StageContext, inp: ExpertsInputs, out: Path) -> ExpertsSummary:
    jobs = [ExpertJob(ctx, inp, task, i, len(inp.active), expert_dir(out, task), ctx.checkpoints("experts") / task,
                      runs.active_run_id()) for i, task in enumerate(inp.active, 1)]
    return ExpertsSummary(tasks=dict(zip(inp.active, ctx.map(train_expert_job, jobs), strict=True)))


def train_expert_job(job: ExpertJob) -> experts_stage.ExpertRun:
    """Train one task's expert in its own MLflow run (a child of the stage's), here or on a worker."""
    from flows.stages import task_environment

    task, inp = job.task, job.inp
    with task_environment(job.ctx):
        log.info("[experts] %s (%d/%d): starting", task, job.index, job.total)
        with runs.run(f"expert:{task}", nested=True, parent_run_id=job.stage_run_id,
                      tags={"task": task, "stage": "experts"}) as run_id:
            _note_resume(job.checkpoint_dir, run_id)
            m = experts_stage.train_expert(task, inp, job.ctx.out("data"), job.ctx.out("foundation"), job.out_dir,
                                           logger=runs.lightning_logger(), checkpoint_dir=job.checkpoint_dir)
            runs.log_params({"task": task, "method": m["method"], "lora": m["lora"], "targets": ",".join(m["targets"]),
                             "trainer": inp.experts.trainer.of(m["modality"]).model_dump(),
                             "train_samples": m["train_samples"]})
            runs.log_metrics({"val": m["metrics"]["val"], "probe_val": m["metrics"]["probe_val"],
                              "trainable_params": m["trainable_params"], "train_seconds": m["train_seconds"],
                              "train_peak_memory_mb": m["train_peak_memory_mb"]})
            runs.log_file(job.out_dir / MANIFEST)
            return experts_stage.expert_run(m, run_id)


def _note_resume(checkpoint_dir: Path, run_id: str) -> None:
    """A run that resumes a killed one's checkpoint names the MLflow run it continues (``resumed_from_run``: the
    epochs before the kill are logged there); this run becomes the one a later resume names."""
    record = checkpoint_dir / "mlflow_run_id"
    if (checkpoint_dir / LAST).is_file() and record.is_file():
        previous = record.read_text().strip()
        runs.set_tags({"resumed_from_run": previous})
        log.info("[experts] resuming the checkpoint of MLflow run %s", previous)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(run_id)


def log_experts(ctx: StageContext, inp: ExpertsInputs, summary: ExpertsSummary, out: Path) -> None:
    runs.log_params(inp.experts.model_dump(mode="json"))
    runs.log_metrics({t: {"val": s.val, "probe_val": s.probe_val} for t, s in summary.tasks.items()})


# --------------------------------------------------------------------------- decompose (LoRKD)
def run_decompose(ctx: StageContext, inp: DecomposeInputs, out: Path) -> DecomposeSummary:
    return decompose_stage.run(inp, ctx.out("data"), ctx.out("foundation"), out, logger=runs.lightning_logger(),
                               checkpoint_dir=ctx.checkpoints("decompose"), experts_dir=ctx.out("experts"))


def log_decompose(ctx: StageContext, inp: DecomposeInputs, summary: DecomposeSummary, out: Path) -> None:
    runs.log_params(inp.decompose.model_dump(mode="json"))
    metric = inp.metric
    for modality, s in summary.modalities.items():
        runs.set_tags({f"decompose.{modality}.student_sha256": s.student_sha256})
        runs.log_metrics({f"{modality}.student_parameters": s.student_parameters,
                          f"{modality}.train_seconds": s.train_seconds,
                          f"{modality}.train_peak_memory_mb": s.train_peak_memory_mb})
        runs.log_metrics({t: {"val_lorkd": r.val[metric], "val_teacher": r.teacher_val[metric],
                              "val_single_student": r.single_val[metric], "parameters": r.parameters,
                              "parameter_fraction": r.parameter_fraction} for t, r in s.tasks.items()})
        runs.log_file(lorkd_student(out, modality) / MANIFEST, artifact_path=f"{modality}/student")


# --------------------------------------------------------------------------- federated (FedKIM)
def flower_run_inputs(ctx: StageContext, inp: FederatedInputs) -> dict[str, Any]:
    """With ``federated.clients_from``: the Flower run's files are an input, so a new run there re-runs the stage."""
    return federated_stage.flower_run_inputs(inp)


def run_federated(ctx: StageContext, inp: FederatedInputs, out: Path) -> FederatedSummary:
    def log_step(metrics: dict[str, float], step: int) -> None:
        runs.log_metrics(metrics, prefix="round.", step=step)

    return federated_stage.run(inp, ctx.out("data"), ctx.out("foundation"), out,
                               on_round=federated_stage.round_logger(log_step))


def log_federated(ctx: StageContext, inp: FederatedInputs, summary: FederatedSummary, out: Path) -> None:
    params = inp.federated.model_dump(mode="json")
    if inp.federated.clients_from:  # the Flower run set its own rounds and local training: not these params
        params = {k: v for k, v in params.items() if k not in ("rounds", "client", "min_clients", "max_norm",
                                                                "timeout_s")}
    runs.log_params(params)
    if summary.skipped:
        runs.set_tags({"federated.skipped": summary.skipped})
        return
    runs.set_tags({"federated.clients": ",".join(summary.clients), "federated.rounds": str(len(summary.rounds)),
                   **{f"federated.flower.{k}": v for k, v in summary.flower_run.items()}})
    runs.log_metrics({t: {"val_fedkim": summary.val[t], "val_no_injection": summary.val_no_injection[t]}
                      for t in summary.client_tasks})
    runs.log_metrics({f"held_out.{t}": v for t, v in summary.held_out_val.items()})
    runs.log_metrics({"client_seconds": summary.client_seconds, "server_seconds": summary.server_seconds})
    if federated_curve(out).is_file():
        runs.log_file(federated_curve(out))
    runs.log_json(summary.model_dump(mode="json"), "federated_summary.json")


# --------------------------------------------------------------------------- routing (AT-MoE)
def run_routing(ctx: StageContext, inp: RoutingInputs, out: Path) -> RoutingSummary:
    return routing_stage.run(inp, ctx.out("data"), ctx.out("foundation"), ctx.out("experts"), out,
                             logger=runs.lightning_logger(), checkpoint_dir=ctx.checkpoints("routing"))


def log_routing(ctx: StageContext, inp: RoutingInputs, summary: RoutingSummary, out: Path) -> None:
    runs.log_params(inp.routing.model_dump(mode="json"))
    if summary.skipped:
        runs.set_tags({"routing.skipped": summary.skipped})
        return
    runs.log_metrics({t: {"val_routed": summary.val[t], "val_own_expert": summary.val_oracle[t],
                          "val_uniform": summary.val_uniform[t]} for t in summary.experts})
    if summary.val_general:
        runs.log_metrics({t: {"val_general_adapter": summary.val_general[t]} for t in summary.experts})
        runs.log_metrics({"general_lambda": summary.lam})
    runs.log_metrics({"trainable_params": summary.trainable_params, "train_seconds": summary.train_seconds})
    runs.log_file(routing_weights(out))
    for task in summary.experts:
        runs.log_file(routing_heatmap(out, task), artifact_path="plots")


# --------------------------------------------------------------------------- fusion
def run_fusion(ctx: StageContext, inp: FusionInputs, out: Path) -> FusionSummary:
    return fusion_stage.run(inp, ctx.out("data"), ctx.out("foundation"), ctx.out("experts"), out)


def log_fusion(ctx: StageContext, inp: FusionInputs, summary: FusionSummary, out: Path) -> None:
    runs.log_params(inp.fusion.model_dump(mode="json"))
    if summary.skipped:
        runs.set_tags({"fusion.skipped": summary.skipped})
        return
    for method, r in summary.methods.items():
        runs.log_metrics({f"{method}.val_normalised": r.val_normalised, f"{method}.lambda": r.lam or 0.0,
                          **{f"{method}.{c}": v for c, v in r.coefficients.items() if c != "lam"}})
    # every point each method's search tried, with its validation score (the curve shows only the best per λ)
    runs.log_json({m: {"chosen": r.coefficients, "seed": r.seed, "grid": r.grid} for m, r in summary.methods.items()},
                  "fusion_grid.json")
    for method, curve in summary.curves.items():
        for step, (lam, score) in enumerate(curve):
            runs.log_metrics({f"{method}.curve_val_normalised": score, f"{method}.curve_lambda": lam}, step=step)
    runs.set_tags({"fusion.best_method": summary.best_method, "fusion.lora_space": summary.lora_space})
    runs.log_file(fusion_curve(out))


# --------------------------------------------------------------------------- evaluate
def run_evaluate(ctx: StageContext, inp: EvaluateInputs, out: Path) -> EvaluateSummary:
    return evaluate_stage.evaluate_models(inp, ctx.out("data"), ctx.out("foundation"), ctx.out("experts"),
                                          ctx.out("fusion"), out, ctx.out("decompose"), ctx.out("routing"),
                                          ctx.out("federated"))


def log_evaluate(ctx: StageContext, inp: EvaluateInputs, summary: EvaluateSummary, out: Path) -> None:
    runs.log_params(inp.evaluate.model_dump(mode="json"))
    runs.log_metrics({t: {"metrics": r.metrics, "normalised": r.normalised, "params": r.params,
                          "latency_ms_per_sample": r.latency_ms_per_sample,
                          "merge_max_abs_diff": r.merge_max_abs_diff} for t, r in summary.tasks.items()})
    runs.log_file(evaluation_plots(out), artifact_path="plots")
    runs.log_file(evaluation_report(out))
    runs.log_json(summary.model_dump(mode="json"), "metrics.json")


# --------------------------------------------------------------------------- promote
def registry_target(ctx: StageContext, inp: PromoteInputs) -> dict[str, Any]:
    """Promotion registers in the tracking server: another server is another registry, so the stage re-runs."""
    return {"tracking_uri": runs.tracking_uri()}


def run_promote(ctx: StageContext, inp: PromoteInputs, out: Path) -> PromoteSummary:
    # Lineage: the fingerprint chain from raw data (source hashes) to this model, plus the git commit.
    lineage = {**git_info(ctx.root), "profile": inp.profile, "metric": inp.metric,
               **{f"fingerprint.{s}": read_json(ctx.out(s) / STAGE_FILE).get("fingerprint", "")
                  for s in ("sources", "data", "foundation", "experts", "decompose", "federated", "routing", "fusion",
                            "evaluate")}}
    decisions = []
    fp = ctx.fingerprints.get("promote", "")
    for c in promote_stage.candidates(inp, ctx.out("experts"), ctx.out("decompose"), ctx.out("fusion"),
                                      ctx.out("routing"), ctx.out("federated"), ctx.out("data")):
        # idempotent: a version this very promote (same fingerprint) created before a kill is reused, not duplicated
        found = registered(c.name, fp) if fp else None
        if found is not None and found[1] is not None:
            log.info("[promote] %s v%s: registered and gated by an earlier, interrupted run; kept", c.name, found[0])
            decisions.append(found[1])
            continue
        if found is not None:
            log.info("[promote] %s v%s: registered by an interrupted run, not gated yet; completing it", c.name,
                     found[0])
            version = found[0]
        else:
            version = register_bundle(c.name, c.bundle, c.metric, {**lineage, **c.tags}, needs=c.needs,
                                      registration=fp or None)
            if fp:  # another run promoting the same outputs at this moment (team mode): one version for both
                version = settle(c.name, fp, version)
        d = gate(c.name, version, c.metric, inp.registry.margin, inp.registry.floor_for(c.name))
        decisions.append(d)
    return PromoteSummary(decisions=decisions)


def log_promote(ctx: StageContext, inp: PromoteInputs, summary: PromoteSummary, out: Path) -> None:
    runs.log_params(inp.registry.model_dump(mode="json"))
    runs.log_json(summary.model_dump(mode="json"), "decisions.json")
    runs.log_metrics({d.model: {"val_metric": d.metric, "promoted": int(d.promoted)} for d in summary.decisions})
