"""What each stage runs (a component call) and what it records in MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.core.artifacts import STAGE_FILE, SUMMARY_FILE, read_json, read_manifest
from components.stages.data import prepare_data
from components.stages.decompose import decompose
from components.stages.evaluate import evaluate_models
from components.experts.methods import get_method
from components.stages.experts import train_expert
from components.stages.fusion import fuse_experts
from components.nn.foundation import describe_text_foundation
from components.stages.foundation import copy_image_checkpoint, pretrain_image_foundation
from components.tracking.lineage import git_info, log_datasets
from components.tracking.registry import gate, register_bundle
from components.tracking.runs import log_metrics, log_params


def _ctx_paths(ctx: Any) -> tuple[Path, Path, Path]:
    return ctx.out("data"), ctx.out("foundation"), ctx.out("experts")


# --------------------------------------------------------------------------- data
def run_data(ctx: Any, out: Path) -> dict[str, Any]:
    manifest = prepare_data(ctx.params.data, ctx.root, out, ctx.params.pipeline.seed)
    return {"tasks": {t: {s: v["n"] for s, v in i["splits"].items()} for t, i in manifest["tasks"].items()}}


def log_data(ctx: Any, out: Path, summary: dict[str, Any]) -> None:
    manifest = read_json(out / "manifest.json", "data manifest")
    log_params({"active": ",".join(ctx.params.data.active), "federation": ctx.params.data.federation.model_dump()})
    log_datasets(manifest, out)
    log_metrics(summary["tasks"], prefix="n.")
    mlflow.log_artifact(str(out / "manifest.json"))


# --------------------------------------------------------------------------- foundation
def run_foundation(ctx: Any, out: Path) -> dict[str, Any]:
    p, summary = ctx.params, {}
    if p.data.active_tasks("text"):
        m = describe_text_foundation(p.foundation, ctx.root, out / "text")
        summary["text"] = {"sha256": m["sha256"], "parameters": m["parameters"], "source": m["source"]}
    if p.data.active_tasks("image"):
        if p.foundation.image.source == "pretrain":
            m = pretrain_image_foundation(p, ctx.out("data"), out / "image",
                                          checkpoint_dir=ctx.checkpoints("foundation") / "image")
        else:
            m = copy_image_checkpoint(ctx.root / p.foundation.image.source, out / "image")
        summary["image"] = {"sha256": m["sha256"], "parameters": m["parameters"], "source": m["source"]}
    return summary


def _register_foundation(name: str, folder: Path, sha256: str) -> str:
    """Register a new foundation version only when its weights changed (hash tag)."""
    client = MlflowClient()
    try:
        client.create_registered_model(name, description="MedExperts foundation model (frozen)")
    except MlflowException:
        pass  # exists already
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get("sha256") == sha256:
            return mv.version
    mlflow.log_artifacts(str(folder), artifact_path=name)
    source = f"{mlflow.get_artifact_uri(name)}"
    run_id = mlflow.active_run().info.run_id
    return client.create_model_version(name, source, run_id=run_id, tags={"sha256": sha256}).version


def log_foundation(ctx: Any, out: Path, summary: dict[str, Any]) -> None:
    log_params(ctx.params.foundation.model_dump(mode="json"))
    for modality in ("text", "image"):
        if modality not in summary:
            continue
        info = summary[modality]
        version = _register_foundation(f"{ctx.params.registry.prefix}-foundation-{modality}", out / modality,
                                       info["sha256"])
        mlflow.set_tags({f"foundation.{modality}.sha256": info["sha256"],
                         f"foundation.{modality}.version": version})
        log_metrics({f"foundation.{modality}.parameters": info["parameters"]})


# --------------------------------------------------------------------------- experts
def run_experts(ctx: Any, out: Path) -> dict[str, Any]:
    from lightning.pytorch.loggers import MLFlowLogger

    data, foundation, _ = _ctx_paths(ctx)
    summary = {}
    for task in ctx.params.data.active:
        with mlflow.start_run(run_name=f"expert:{task}", nested=True, tags={"task": task, "stage": "experts"}) as run:
            logger = MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run.info.run_id)
            m = train_expert(task, ctx.params, data, foundation, out / task, logger=logger,
                             checkpoint_dir=ctx.checkpoints("experts") / task)
            log_params({"task": task, "method": m["method"], "lora": m["lora"], "targets": ",".join(m["targets"]),
                        "trainer": ctx.params.experts.trainer.of(m["modality"]).model_dump(), "train_samples": m["train_samples"]})
            log_metrics({"val": m["metrics"]["val"], "probe_val": m["metrics"]["probe_val"],
                         "trainable_params": m["trainable_params"], "train_seconds": m["train_seconds"],
                         "train_peak_memory_mb": m["train_peak_memory_mb"]})
            mlflow.log_artifact(str(out / task / "manifest.json"))
            summary[task] = {"val": m["metrics"]["val"], "probe_val": m["metrics"]["probe_val"],
                             "trainable_params": m["trainable_params"], "train_seconds": m["train_seconds"],
                             "run_id": run.info.run_id}
    return {"tasks": summary}


def log_experts(ctx: Any, out: Path, summary: dict[str, Any]) -> None:
    log_params(ctx.params.experts.model_dump(mode="json"))
    log_metrics({t: {"val": s["val"], "probe_val": s["probe_val"]} for t, s in summary["tasks"].items()})


# --------------------------------------------------------------------------- decompose (LoRKD)
def run_decompose(ctx: Any, out: Path) -> dict[str, Any]:
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=mlflow.active_run().info.run_id)
    return decompose(ctx.params, ctx.out("data"), ctx.out("foundation"), out, logger=logger,
                     checkpoint_dir=ctx.checkpoints("decompose"))


def log_decompose(ctx: Any, out: Path, summary: dict[str, Any]) -> None:
    log_params(ctx.params.decompose.model_dump(mode="json"))
    metric = ctx.params.evaluate.primary_metric
    for modality, s in summary["modalities"].items():
        mlflow.set_tag(f"decompose.{modality}.student_sha256", s["student_sha256"])
        log_metrics({f"{modality}.student_parameters": s["student_parameters"],
                     f"{modality}.train_seconds": s["train_seconds"],
                     f"{modality}.train_peak_memory_mb": s["train_peak_memory_mb"]})
        log_metrics({t: {"val_lorkd": r["val"][metric], "val_teacher": r["teacher_val"][metric],
                         "val_single_student": r["single_val"][metric], "parameters": r["parameters"],
                         "parameter_fraction": r["parameter_fraction"]} for t, r in s["tasks"].items()})
        mlflow.log_artifact(str(out / modality / "student" / "manifest.json"), artifact_path=f"{modality}/student")


# --------------------------------------------------------------------------- fusion
def run_fusion(ctx: Any, out: Path) -> dict[str, Any]:
    tasks = list(ctx.params.data.active_tasks(ctx.params.fusion.modality))
    if len(tasks) < 2:
        return {"skipped": f"fewer than 2 active {ctx.params.fusion.modality} tasks ({tasks})"}
    method = get_method(ctx.params.experts.method_for(ctx.params.fusion.modality))
    if method.delta is None:
        return {"skipped": f"{method.pretty} experts change no weight: nothing to merge in weight space"}
    data, foundation, experts = _ctx_paths(ctx)
    return fuse_experts(ctx.params, data, foundation, experts, out)


def log_fusion(ctx: Any, out: Path, summary: dict[str, Any]) -> None:
    log_params(ctx.params.fusion.model_dump(mode="json"))
    if "skipped" in summary:
        mlflow.set_tag("fusion.skipped", summary["skipped"])
        return
    for method, r in summary["methods"].items():
        log_metrics({f"{method}.val_normalised": r["val_normalised"], f"{method}.lambda": r["lambda"] or 0.0,
                     **{f"{method}.{c}": v for c, v in r["coefficients"].items() if c != "lam"}})
    # every point each method's search tried, with its validation score (the curve shows only the best per λ)
    mlflow.log_dict({m: {"chosen": r["coefficients"], "seed": r.get("seed"), "grid": r["grid"]}
                     for m, r in summary["methods"].items()}, "fusion_grid.json")
    for method, curve in summary["curves"].items():
        for step, (lam, score) in enumerate(curve):
            log_metrics({f"{method}.curve_val_normalised": score, f"{method}.curve_lambda": lam}, step=step)
    mlflow.set_tag("fusion.best_method", summary["best_method"])
    mlflow.set_tag("fusion.lora_space", summary["lora_space"])
    for name in ("fusion_curve.png", "summary.json"):
        if (out / name).is_file():
            mlflow.log_artifact(str(out / name))


# --------------------------------------------------------------------------- evaluate
def run_evaluate(ctx: Any, out: Path) -> dict[str, Any]:
    data, foundation, experts = _ctx_paths(ctx)
    return evaluate_models(ctx.params, data, foundation, experts, ctx.out("fusion"), out, ctx.out("decompose"))


def log_evaluate(ctx: Any, out: Path, summary: dict[str, Any]) -> None:
    log_params(ctx.params.evaluate.model_dump(mode="json"))
    log_metrics({t: {k: r[k] for k in ("metrics", "normalised", "params", "latency_ms_per_sample",
                                       "merge_max_abs_diff")} for t, r in summary["tasks"].items()})
    mlflow.log_artifacts(str(out / "plots"), artifact_path="plots")
    mlflow.log_artifact(str(out / "report.md"))
    mlflow.log_artifact(str(out / "metrics.json"))


# --------------------------------------------------------------------------- promote
def _candidates(ctx: Any) -> list[tuple[str, Path, float]]:
    """(registered name, bundle folder, validation metric) of every model this run offers."""
    p, metric = ctx.params, ctx.params.evaluate.primary_metric
    out = []
    for task in p.data.active:
        folder = ctx.out("experts") / task
        m = read_manifest(folder, kind="expert", verify=False)
        out.append((f"{p.registry.prefix}-{task}", folder / "bundle", float(m["metrics"]["val"][metric])))
    decomposed = read_json(ctx.out("decompose") / SUMMARY_FILE, "decompose summary")
    for modality, s in decomposed["modalities"].items():
        for task, r in s["tasks"].items():
            out.append((f"{p.registry.prefix}-{task}-lorkd", ctx.out("decompose") / modality / "fused" / task,
                        float(r["val"][metric])))
    fusion = read_json(ctx.out("fusion") / SUMMARY_FILE, "fusion summary")
    if "best_method" in fusion:
        best = fusion["methods"][fusion["best_method"]]
        mean = sum(v[metric] for v in best["val_metrics"].values()) / len(best["val_metrics"])
        out.append((f"{p.registry.prefix}-fused-{fusion['modality']}", ctx.out("fusion") / fusion["best_method"],
                    float(mean)))
    return out


def run_promote(ctx: Any, out: Path) -> dict[str, Any]:
    rp, decisions = ctx.params.registry, []
    # Lineage: the fingerprint chain from raw data (source hashes) to this model, plus the git commit.
    tags = {**git_info(ctx.root), "profile": ctx.params.pipeline.profile, "metric": ctx.params.evaluate.primary_metric,
            "method": ctx.params.experts.method, "image_method": ctx.params.experts.method_for("image"),
            **{f"fingerprint.{s}": read_json(ctx.out(s) / STAGE_FILE).get("fingerprint", "")
               for s in ("data", "foundation", "experts", "decompose", "fusion", "evaluate")}}
    expert_runs = read_json(ctx.out("experts") / SUMMARY_FILE, "experts summary")["tasks"]
    for name, bundle, metric in _candidates(ctx):
        task = name.removeprefix(f"{rp.prefix}-")
        run_tag = {"training_run_id": expert_runs[task]["run_id"]} if task in expert_runs else {}
        bundle_manifest = read_manifest(bundle, kind="bundle", verify=False)
        size = {"parameters": bundle_manifest["parameters"]} if "parameters" in bundle_manifest else {}
        version = register_bundle(name, bundle, metric, {**tags, **run_tag, **size})
        decisions.append(gate(name, version, metric, rp.margin, rp.floor_for(name)).__dict__)
    return {"decisions": decisions}


def log_promote(ctx: Any, out: Path, summary: dict[str, Any]) -> None:
    log_params(ctx.params.registry.model_dump(mode="json"))
    mlflow.log_dict(summary, "decisions.json")
    log_metrics({d["model"]: {"val_metric": d["metric"], "promoted": int(d["promoted"])} for d in summary["decisions"]})
