"""The evaluate stage: test metrics of probe, expert and fused model per task, sizes, latency, plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from components.core.artifacts import read_json, write_json
from components.config import Params
from components.data.datasets import load_split
from components.metrics.counts import count_parameters
from components.metrics.latency import measure_latency
from components.metrics.classification import compute_metrics, confusion, normalised_score
from components.metrics.plots import plot_confusion
from components.metrics.report import markdown_table
from components.experts.io import load_expert, stored_bytes
import components.plugins  # noqa: F401  bundles of soft-prompt experts and LoRKD students
from components.bundle.format import LoadedBundle, load_bundle
from components.nn.classifier import Classifier, make_head
from components.nn.foundation import Foundation, load_foundation
from components.training.data import labels_tensor
from components.training.inference import batched

log = logging.getLogger("medexperts")

EQUALITY_SAMPLES = 64
COLUMNS = [("task", "task"), ("probe", "probe"), ("expert", "expert"), ("fused", "fused"),
           ("normalised", "fused / expert"), ("expert_stored_kb", "expert KB"),
           ("expert_ms", "expert ms/sample"), ("base_ms", "base ms/sample"), ("teacher", "LoRKD teacher"),
           ("lorkd", "LoRKD expert"), ("single_student", "single-task student"), ("lorkd_params_pct", "LoRKD params %")]


def _latency(model: torch.nn.Module, x: dict[str, torch.Tensor], batch: int, repeats: int) -> float:
    one = {k: v[:batch] for k, v in x.items()}
    return measure_latency(lambda: model(**one), n_samples=len(next(iter(one.values()))), repeats=repeats)["ms_per_sample"]


def _fused(fusion_dir: Path | None) -> tuple[LoadedBundle | None, dict[str, Any]]:
    if fusion_dir is None or not (fusion_dir / "summary.json").is_file():
        return None, {}
    summary = read_json(fusion_dir / "summary.json", "fusion summary")
    return load_bundle(fusion_dir / summary["best_method"]), summary


def _teacher_head(decompose_dir: Path, modality: str, task: str, in_dim: int) -> torch.nn.Module:
    tensors = load_file(decompose_dir / modality / "teacher_heads.safetensors")
    state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == task}
    head = make_head(in_dim, state["weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()


def evaluate_models(params: Params, data_dir: Path, foundation_dir: Path, experts_dir: Path,
                    fusion_dir: Path | None, out_dir: Path, decompose_dir: Path | None = None) -> dict[str, Any]:
    """Score every active task's probe, deployed expert, (if fused) the fused model and (if decomposed) the
    LoRKD teacher, fused LoRKD expert and same-size single-task student on test."""
    ep, metric, seed = params.evaluate, params.evaluate.primary_metric, params.pipeline.seed
    fused, fusion_summary = _fused(fusion_dir)
    foundations: dict[str, Foundation] = {}
    results: dict[str, Any] = {}
    for task, spec in params.data.active_tasks().items():
        if spec.modality not in foundations:
            foundations[spec.modality] = load_foundation(foundation_dir, spec.modality)
        found = foundations[spec.modality]
        test = load_split(data_dir, task, "test").subset(ep.max_test_samples, seed)
        x, y = found.inputs(test.inputs), labels_tensor(test.labels, test.kind)
        expert = load_expert(experts_dir / task, found)
        deployed = load_bundle(experts_dir / task / "bundle").model.for_task(task)
        probe_model = Classifier(found.encoder, expert.probe_head).eval()
        deployed_logits = batched(deployed, x)
        # The un-merged adapter model is only needed to check that merging did not move the outputs.
        check = {k: v[:EQUALITY_SAMPLES] for k, v in x.items()}
        merge_diff = float((batched(expert.classifier(), check) - deployed_logits[:EQUALITY_SAMPLES]).abs().max())
        scores = {"probe": compute_metrics(test.kind, batched(probe_model, x), y, test.num_labels),
                  "expert": compute_metrics(test.kind, deployed_logits, y, test.num_labels)}
        plots = {"expert": plot_confusion(confusion(test.kind, deployed_logits, y, test.num_labels),
                                          test.label_names, f"{task}: {expert.manifest['method']} expert (test)",
                                          out_dir / "plots" / f"confusion_{task}_expert.png")}
        if fused is not None and task in fused.tasks:
            fused_logits = batched(fused.model.for_task(task), x)
            scores["fused"] = compute_metrics(test.kind, fused_logits, y, test.num_labels)
            plots["fused"] = plot_confusion(confusion(test.kind, fused_logits, y, test.num_labels),
                                            test.label_names, f"{task}: fused {fusion_summary['best_method']} (test)",
                                            out_dir / "plots" / f"confusion_{task}_fused.png")
        lorkd = decompose_dir is not None and (decompose_dir / spec.modality / "fused" / task).is_dir()
        if lorkd:
            teacher = Classifier(found.encoder, _teacher_head(decompose_dir, spec.modality, task, found.encoder.out_dim))
            scores["teacher"] = compute_metrics(test.kind, batched(teacher, x), y, test.num_labels)
            for key, folder in (("lorkd", "fused"), ("single_student", "single")):
                b = load_bundle(decompose_dir / spec.modality / folder / task)
                scores[key] = compute_metrics(test.kind, batched(b.model.for_task(task), x), y, test.num_labels)
                if key == "lorkd":
                    lorkd_params = {"lorkd_deployed": b.manifest["parameters"], "teacher": b.manifest["teacher_parameters"]}
                    lorkd_ms = _latency(b.model.for_task(task), x, ep.latency_batch_size, ep.latency_repeats)
        results[task] = {
            "modality": spec.modality, "kind": test.kind, "test_samples": len(test), "metrics": scores,
            "normalised": normalised_score(scores["fused"][metric], scores["expert"][metric]) if "fused" in scores else None,
            # Merge-into-backbone must not move outputs (peft#1043): record the largest deviation.
            "merge_max_abs_diff": merge_diff,
            "params": {"foundation": count_parameters(found.encoder),
                       "trainable": expert.manifest["trainable_params"],
                       "stored_bytes": stored_bytes(experts_dir / task),
                       "deployed": count_parameters(deployed), **(lorkd_params if lorkd else {})},
            "latency_ms_per_sample": {
                "base": _latency(probe_model, x, ep.latency_batch_size, ep.latency_repeats),
                "expert_merged": _latency(deployed, x, ep.latency_batch_size, ep.latency_repeats),
                "expert_adapter": _latency(expert.classifier(), x, ep.latency_batch_size, ep.latency_repeats),
                **({"lorkd": lorkd_ms} if lorkd else {})},
            "plots": {k: str(Path(p).relative_to(out_dir)) for k, p in plots.items()},
        }
        log.info("[evaluate] %s: test %s probe=%.3f expert=%.3f%s", task, metric, scores["probe"][metric],
                 scores["expert"][metric], f" fused={scores['fused'][metric]:.3f}" if "fused" in scores else "")
    summary = {"metric": metric, "tasks": results, "fusion": {k: fusion_summary.get(k) for k in ("best_method", "tasks")}}
    write_json(out_dir / "metrics.json", summary)
    (out_dir / "report.md").write_text(markdown_table(report_rows(summary), COLUMNS) + "\n")
    return summary


def report_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: primary test metric of probe / expert / fused, size and latency."""
    metric, rows = summary["metric"], []
    for task, r in summary["tasks"].items():
        m = r["metrics"]
        rows.append({"task": task, "probe": m["probe"][metric], "expert": m["expert"][metric],
                     "fused": m.get("fused", {}).get(metric), "normalised": r["normalised"],
                     "expert_stored_kb": r["params"]["stored_bytes"] / 1024,
                     "expert_ms": r["latency_ms_per_sample"]["expert_merged"],
                     "base_ms": r["latency_ms_per_sample"]["base"],
                     "teacher": m.get("teacher", {}).get(metric), "lorkd": m.get("lorkd", {}).get(metric),
                     "single_student": m.get("single_student", {}).get(metric),
                     "lorkd_params_pct": 100 * r["params"]["lorkd_deployed"] / r["params"]["teacher"]
                     if "lorkd_deployed" in r["params"] else None})
    return rows
