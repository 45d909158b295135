"""The evaluate stage: test metrics of probe, expert and fused model per task, sizes, latency, plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

import components.plugins  # noqa: F401  bundles of soft-prompt experts and LoRKD students
from components.bundle.format import LoadedBundle, load_bundle
from components.config import EvaluateParams
from components.core.artifacts import read_model
from components.core.layout import (SUMMARY_FILE, evaluation_plots, evaluation_report, expert_bundle, expert_dir,
                                    fused_bundle, lorkd_fused, lorkd_single, routed_bundle)
from components.data.datasets import load_split
from components.experts.io import load_expert, stored_bytes
from components.metrics.classification import compute_metrics, confusion, normalised_score
from components.metrics.counts import count_parameters
from components.metrics.latency import measure_latency
from components.metrics.plots import plot_confusion
from components.metrics.report import markdown_table
from components.nn.classifier import Classifier
from components.nn.foundation import Foundation, load_foundation
from components.stages.base import StageSummary, TaskInputs, param
from components.federated.fedkim import evaluate_injected
from components.stages.decompose import lorkd_teacher
from components.stages.federated import FederatedSummary, load_for_evaluation
from components.stages.fusion import FusionSummary
from components.stages.routing import RoutingSummary
from components.training.data import labels_tensor
from components.training.inference import batched

log = logging.getLogger("medexperts")


class EvaluateInputs(TaskInputs):
    evaluate: EvaluateParams = param("evaluate")
    seed: int = param("pipeline.seed")


class TaskEvaluation(StageSummary):
    modality: str
    kind: str
    caveat: str = ""  # data.tasks.<task>.caveat: shown beside the task's name in the report
    test_samples: int
    metrics: dict[str, dict[str, float]]  # model (probe, expert, fused, teacher, lorkd, single_student) -> metrics
    normalised: float | None  # fused / expert on the primary metric
    merge_max_abs_diff: float
    params: dict[str, int]
    latency_ms_per_sample: dict[str, float]
    plots: dict[str, str]  # relative to the stage folder


class EvaluateSummary(StageSummary):
    metric: str
    tasks: dict[str, TaskEvaluation]
    fusion: dict[str, Any]  # which fused model was scored: best_method, tasks

EQUALITY_SAMPLES = 64
COLUMNS = [("task", "task"), ("probe", "probe"), ("expert", "expert"), ("fused", "fused"), ("routed", "routed"),
           ("fedkim", "FedKIM"),
           ("normalised", "fused / expert"), ("expert_stored_kb", "expert KB"),
           ("expert_ms", "expert ms/sample"), ("base_ms", "base ms/sample"), ("teacher", "LoRKD teacher"),
           ("lorkd", "LoRKD expert"), ("single_student", "single-task student"), ("lorkd_params_pct", "LoRKD params %")]


def _latency(model: torch.nn.Module, x: dict[str, torch.Tensor], batch: int, repeats: int) -> float:
    one = {k: v[:batch] for k, v in x.items()}
    return measure_latency(lambda: model(**one), n_samples=len(next(iter(one.values()))), repeats=repeats)["ms_per_sample"]


def _fused(fusion_dir: Path | None) -> tuple[LoadedBundle | None, FusionSummary]:
    if fusion_dir is None or not (fusion_dir / SUMMARY_FILE).is_file():
        return None, FusionSummary(skipped="no fusion stage output")
    summary = read_model(fusion_dir / SUMMARY_FILE, FusionSummary, "fusion summary")
    if summary.best_method is None:
        return None, summary
    return load_bundle(fused_bundle(fusion_dir, summary.best_method)), summary


def _routed(routing_dir: Path | None) -> LoadedBundle | None:
    if routing_dir is None or not (routing_dir / SUMMARY_FILE).is_file():
        return None
    if read_model(routing_dir / SUMMARY_FILE, RoutingSummary, "routing summary").skipped is not None:
        return None
    return load_bundle(routed_bundle(routing_dir))


def _injected(federated_dir: Path | None, foundation_dir: Path) -> tuple[Any, FederatedSummary]:
    if federated_dir is None or not (federated_dir / SUMMARY_FILE).is_file():
        return None, FederatedSummary(skipped="no federated stage output")
    summary = read_model(federated_dir / SUMMARY_FILE, FederatedSummary, "federated summary")
    if summary.skipped is not None:
        return None, summary
    return load_for_evaluation(federated_dir, foundation_dir), summary


def evaluate_models(inp: EvaluateInputs, data_dir: Path, foundation_dir: Path, experts_dir: Path,
                    fusion_dir: Path | None, out_dir: Path, decompose_dir: Path | None = None,
                    routing_dir: Path | None = None, federated_dir: Path | None = None) -> EvaluateSummary:
    """Score every active task's probe, deployed expert, (if fused) the fused model and (if decomposed) the
    LoRKD teacher, fused LoRKD expert and same-size single-task student on test."""
    ep, metric, seed = inp.evaluate, inp.evaluate.primary_metric, inp.seed
    fused, fusion_summary = _fused(fusion_dir)
    routed = _routed(routing_dir)
    injected, federated = _injected(federated_dir, foundation_dir)
    plots_dir = evaluation_plots(out_dir)
    foundations: dict[str, Foundation] = {}
    results: dict[str, TaskEvaluation] = {}

    def latency(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> float:
        return _latency(model, x, ep.latency_batch_size, ep.latency_repeats)

    for task, spec in inp.active_tasks().items():
        if spec.modality not in foundations:
            foundations[spec.modality] = load_foundation(foundation_dir, spec.modality)
        found = foundations[spec.modality]
        test = load_split(data_dir, task, "test").subset(ep.max_test_samples, seed)
        x, y = found.inputs(test.inputs), labels_tensor(test.labels, test.kind)

        def score_and_plot(key: str, logits: torch.Tensor, title: str) -> dict[str, float]:
            plots[key] = plot_confusion(confusion(test.kind, logits, y, test.num_labels), test.label_names,
                                        f"{task}: {title} (test)", plots_dir / f"confusion_{task}_{key}.png")
            return compute_metrics(test.kind, logits, y, test.num_labels)

        plots: dict[str, Path] = {}
        expert = load_expert(expert_dir(experts_dir, task), found)
        deployed = load_bundle(expert_bundle(expert_dir(experts_dir, task))).model.for_task(task)
        probe_model = Classifier(found.encoder, expert.probe_head).eval()
        deployed_logits = batched(deployed, x)
        # The un-merged adapter model is only needed to check that merging did not move the outputs.
        check = {k: v[:EQUALITY_SAMPLES] for k, v in x.items()}
        merge_diff = float((batched(expert.classifier(), check) - batched(deployed, check)).abs().max())  # same rows
        scores = {"probe": compute_metrics(test.kind, batched(probe_model, x), y, test.num_labels),
                  "expert": score_and_plot("expert", deployed_logits, f"{expert.info.method} expert")}
        sizes = {"foundation": count_parameters(found.encoder), "trainable": expert.info.trainable_params or 0,
                 "stored_bytes": stored_bytes(expert_dir(experts_dir, task)), "deployed": count_parameters(deployed)}
        latencies = {"base": latency(probe_model, x), "expert_merged": latency(deployed, x),
                     "expert_adapter": latency(expert.classifier(), x)}
        if fused is not None and task in fused.tasks:
            scores["fused"] = score_and_plot("fused", batched(fused.model.for_task(task), x),
                                             f"fused {fusion_summary.best_method}")
        if routed is not None and task in routed.tasks:
            routed_task = routed.model.for_task(task)
            scores["routed"] = score_and_plot("routed", batched(routed_task, x), "AT-MoE routed experts")
            latencies["routed"] = latency(routed_task, x)
        if injected is not None and task in federated.client_tasks + federated.held_out:
            scores["fedkim"] = evaluate_injected(injected, {task: test})[task]
        if decompose_dir is not None and lorkd_fused(decompose_dir, spec.modality, task).is_dir():
            lorkd = load_bundle(lorkd_fused(decompose_dir, spec.modality, task))
            teacher = lorkd.info.teacher or "foundation"
            teacher_logits = deployed_logits if teacher == "expert" else \
                batched(lorkd_teacher(teacher, decompose_dir, experts_dir, found, task), x)  # the expert teacher is `deployed`
            scores["teacher"] = compute_metrics(test.kind, teacher_logits, y, test.num_labels)
            single = load_bundle(lorkd_single(decompose_dir, spec.modality, task))
            scores["lorkd"] = compute_metrics(test.kind, batched(lorkd.model.for_task(task), x), y, test.num_labels)
            scores["single_student"] = compute_metrics(test.kind, batched(single.model.for_task(task), x), y,
                                                       test.num_labels)
            sizes.update(lorkd_deployed=lorkd.info.parameters, teacher=lorkd.info.teacher_parameters)
            latencies["lorkd"] = latency(lorkd.model.for_task(task), x)
        results[task] = TaskEvaluation(
            modality=spec.modality, kind=test.kind, caveat=spec.caveat, test_samples=len(test), metrics=scores,
            normalised=normalised_score(scores["fused"][metric], scores["expert"][metric]) if "fused" in scores else None,
            # Merge-into-backbone must not move outputs (peft#1043): record the largest deviation.
            merge_max_abs_diff=merge_diff, params=sizes, latency_ms_per_sample=latencies,
            plots={k: str(Path(p).relative_to(out_dir)) for k, p in plots.items()})
        log.info("[evaluate] %s: test %s probe=%.3f expert=%.3f%s", task, metric, scores["probe"][metric],
                 scores["expert"][metric], f" fused={scores['fused'][metric]:.3f}" if "fused" in scores else "")
    summary = EvaluateSummary(metric=metric, tasks=results,
                              fusion={"best_method": fusion_summary.best_method, "tasks": fusion_summary.tasks})
    evaluation_report(out_dir).write_text(markdown_table(report_rows(summary.model_dump(mode="json")), COLUMNS) + "\n")
    return summary


def report_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: primary test metric of probe / expert / fused, size and latency."""
    metric, rows = summary["metric"], []
    for task, r in summary["tasks"].items():
        m = r["metrics"]
        rows.append({"task": f"{task} ({r['caveat']})" if r.get("caveat") else task,
                     "probe": m["probe"][metric], "expert": m["expert"][metric],
                     "fused": m.get("fused", {}).get(metric), "routed": m.get("routed", {}).get(metric),
                     "fedkim": m.get("fedkim", {}).get(metric),
                     "normalised": r["normalised"],
                     "expert_stored_kb": r["params"]["stored_bytes"] / 1024,
                     "expert_ms": r["latency_ms_per_sample"]["expert_merged"],
                     "base_ms": r["latency_ms_per_sample"]["base"],
                     "teacher": m.get("teacher", {}).get(metric), "lorkd": m.get("lorkd", {}).get(metric),
                     "single_student": m.get("single_student", {}).get(metric),
                     "lorkd_params_pct": 100 * r["params"]["lorkd_deployed"] / r["params"]["teacher"]
                     if "lorkd_deployed" in r["params"] else None})
    return rows
