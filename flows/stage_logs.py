"""What each stage records in MLflow once its output is complete (through components.tracking): its params, metrics,
tags, files, registrations. None of it writes the stage's output, so this module is no stage's code in the
fingerprint sense (``flows.stages.stage_code``): a logging change re-runs nothing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from components.core.artifacts import read_json
from components.core.layout import (MANIFEST, evaluation_plots, evaluation_report, federated_curve, foundation_dir,
                                    fusion_curve, lorkd_student, routing_heatmap, routing_weights)
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
from components.tracking.lineage import log_datasets
from components.tracking.registry import register_foundation

if TYPE_CHECKING:
    from flows.stages import StageContext


def log_sources(ctx: StageContext, inp: SourcesInputs, summary: SourcesSummary, out: Path) -> None:
    runs.set_tags({f"source.{consumer}.{name}": digest for consumer, hashes in summary.model_dump().items()
                   if isinstance(hashes, dict) for name, digest in hashes.items()})


def log_data(ctx: StageContext, inp: DataInputs, summary: DataSummary, out: Path) -> None:
    runs.log_params({"active": ",".join(inp.data.active), "federation": inp.data.federation.model_dump()})
    log_datasets(read_json(out / MANIFEST, "data manifest"), out)
    runs.log_metrics(summary.tasks, prefix="n.")
    runs.log_file(out / MANIFEST)


def log_foundation(ctx: StageContext, inp: FoundationInputs, summary: FoundationSummary, out: Path) -> None:
    runs.log_params(inp.foundation.model_dump(mode="json"))
    for modality, info in (("text", summary.text), ("image", summary.image)):
        if info is None:
            continue
        version = register_foundation(f"{ctx.params.registry.prefix}-foundation-{modality}",
                                      foundation_dir(out, modality), info.sha256)
        runs.set_tags({f"foundation.{modality}.sha256": info.sha256, f"foundation.{modality}.version": version})
        runs.log_metrics({f"foundation.{modality}.parameters": info.parameters})


def log_experts(ctx: StageContext, inp: ExpertsInputs, summary: ExpertsSummary, out: Path) -> None:
    runs.log_params(inp.experts.model_dump(mode="json"))
    runs.log_metrics({t: {"val": s.val, "probe_val": s.probe_val} for t, s in summary.tasks.items()})


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


def log_evaluate(ctx: StageContext, inp: EvaluateInputs, summary: EvaluateSummary, out: Path) -> None:
    runs.log_params(inp.evaluate.model_dump(mode="json"))
    runs.log_metrics({t: {"metrics": r.metrics, "normalised": r.normalised, "params": r.params,
                          "latency_ms_per_sample": r.latency_ms_per_sample,
                          "merge_max_abs_diff": r.merge_max_abs_diff} for t, r in summary.tasks.items()})
    runs.log_file(evaluation_plots(out), artifact_path="plots")
    runs.log_file(evaluation_report(out))
    runs.log_json(summary.model_dump(mode="json"), "metrics.json")


def log_promote(ctx: StageContext, inp: PromoteInputs, summary: PromoteSummary, out: Path) -> None:
    runs.log_params(inp.registry.model_dump(mode="json"))
    runs.log_json(summary.model_dump(mode="json"), "decisions.json")
    runs.log_metrics({d.model: {"val_metric": d.metric, "promoted": int(d.promoted)} for d in summary.decisions})
