"""How long the full profile takes on this machine: an estimate from measured per-sample costs, checked against a
measured quick run. `medexperts bench full_profile_time` -> bench/results/full_profile_time.json

Why an estimate: a whole full-profile run (8 tasks, every row, 256-token texts, a ResNet-18 image foundation, 30
image epochs) is most of a day on 2 CPU cores, longer than a working session here. What it costs is known in
advance, though: every stage's work is a count (rows x epochs of each training loop, validation passes, the fusion
grid, the routed model's two encoder passes, FedKIM's rounds) that follows from the params and the split sizes,
times the cost of one sample through the model of that loop. So:

1. The data stage runs for real (`prepare_data` on the profile's tasks: its time is measured, and it gives the
   split and shard sizes the counts need).
2. Per-sample costs are measured here with the project's own models at each profile's settings (sequence length,
   image architecture, batch sizes, LoRA targets, LoRKD students): AdamW training steps (`bench.common.
   time_training_steps`) and batch-64 no-grad forwards, medians of a few steps after a warm-up.
3. `work(profile, sizes)` lists each stage's loops (the counts the stage code runs) as
   (what, samples, cost key); the raw estimate of a stage is the sum of samples x seconds per sample.
4. The same estimator runs on the quick profile beside a measured `medexperts run --profile quick` (the stages'
   own compute from their summaries, as `bench wall_time`). Its per-stage ratio measured / raw is the estimator's
   error on this machine (what it leaves out: per-batch overheads, Lightning's loop, metric passes, the probes'
   full-batch fits, the FedKIM gate); the calibrated full estimate multiplies each stage's raw estimate by it.

Upper bound in one respect: the full profile's experts stop early (patience 3 text, 5 image epochs) and the estimate
counts every epoch. CPU only: on a GPU the training loops move there, the `batched()` inference passes stay on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, time_training_steps, write_result

STAGES = ("data", "foundation", "experts", "decompose", "fusion", "routing", "federated", "evaluate")
DECOMPOSE_TASKS = 4  # tasks per mixed LoRKD batch when timing a student step (the full profile's per modality)


def _params(profile: str):  # noqa: ANN202
    from components.config import load_params

    return load_params(ROOT / "params", profile)


# --------------------------------------------------------------------------- sizes
def prepare(profile: str, work: Path) -> tuple[dict[str, dict[str, Any]], float]:
    """Run the data stage for the profile's tasks; return per task its modality, kind, split sizes and client shard
    sizes, and the stage's seconds."""
    from components.core.layout import shards_file
    from components.data.datasets import load_split
    from components.stages.data import prepare_data

    params = _params(profile)
    start = time.perf_counter()
    prepare_data(params.data, ROOT, work, seed=params.pipeline.seed)
    seconds = time.perf_counter() - start
    sizes = {}
    for task in params.data.active:
        splits = {s: load_split(work, task, s) for s in ("train", "val", "test")}
        shards = json.loads(shards_file(work, task).read_text())
        sizes[task] = {"modality": splits["train"].modality, "kind": splits["train"].kind,
                       **{s: len(d) for s, d in splits.items()}, "shards": [len(c) for c in shards["clients"]]}
    return sizes, seconds


# --------------------------------------------------------------------------- per-sample costs
def _infer_seconds(fn: Any, x: dict[str, Any], steps: int = 3) -> float:
    """Seconds per sample of a batch-64 no-grad forward (what `components.training.inference.batched` runs)."""
    import torch

    batch = {k: v[:64] for k, v in x.items()}
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            start = time.perf_counter()
            fn(**batch)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times) / len(next(iter(batch.values())))


def _train_seconds(model: Any, loss_of: Any, batch: int, steps: int) -> float:
    import torch

    return time_training_steps(model, loss_of, torch.device("cpu"), warmup=1, steps=steps)["step_ms"] / 1000 / batch


def measure(profile: str, steps: int) -> dict[str, float]:
    """Seconds per sample of every loop kind the stages run, with the profile's models and settings."""
    import numpy as np
    import torch

    from components.decompose.loss import lorkd_loss
    from components.decompose.student import build_student
    from components.experts.lora import attach_lora
    from components.nn.classifier import Classifier, make_head
    from components.nn.encoders import ImageEncoder, encoder_inputs, resolve_text_source
    from components.nn.foundation import new_image_encoder, text_foundation
    from components.training.module import task_loss

    torch.manual_seed(0)
    params = _params(profile)
    rng = np.random.default_rng(0)
    n = 128
    found = text_foundation(resolve_text_source(params.foundation.text.source), params.foundation.text.max_length)
    words = "patient presents with fever cough chest pain and shortness of breath after surgery".split()
    text_x = found.inputs([" ".join(rng.choice(words, 400)) for _ in range(n)])  # padded to max_length anyway
    ip = params.foundation.image
    image = new_image_encoder(ip)
    image_x = encoder_inputs(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), "image", in_channels=3)
    y = torch.as_tensor(rng.integers(0, 3, size=n))
    ids = torch.arange(n) % DECOMPOSE_TASKS
    teacher = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))

    def cut(x: dict[str, Any], b: int) -> dict[str, Any]:
        return {k: v[:b] for k, v in x.items()}

    def classifier_train(encoder: Any, out_dim: int, x: dict[str, Any], b: int) -> float:
        model = Classifier(encoder, make_head(out_dim, 3)).train()
        xb = cut(x, b)
        return _train_seconds(model, lambda: task_loss("multiclass", model(**xb), y[:b]), b, steps)

    def student(modality: str, encoder: Any, x: dict[str, Any], b: int) -> tuple[float, float]:
        heads = {f"task{t}": make_head(encoder.out_dim, 3) for t in range(DECOMPOSE_TASKS)}
        s = build_student(params.decompose, modality, encoder, heads, seed=0).train()
        xb = cut(x, b)
        kinds, widths = ["multiclass"] * DECOMPOSE_TASKS, [3] * DECOMPOSE_TASKS
        train = _train_seconds(s, lambda: lorkd_loss(s(ids[:b], **xb), y[:b], teacher[:b], ids[:b], kinds, widths,
                                                      params.decompose.kd_weight, params.decompose.temperature)[0],
                               b, steps)
        s.eval()
        return train, _infer_seconds(lambda **x_: s(ids[:64], **x_), x)

    text_encoder = found.encoder.eval().requires_grad_(False)
    image.eval().requires_grad_(False)
    costs: dict[str, float] = {}
    costs["text_infer"] = _infer_seconds(text_encoder, text_x)
    costs["image_infer"] = _infer_seconds(image, image_x)
    lp = params.experts.lora
    costs["text_lora_train"] = classifier_train(attach_lora(text_encoder, lp, "text"), text_encoder.out_dim, text_x,
                                                params.experts.trainer.text.batch_size)
    costs["image_lora_train"] = classifier_train(attach_lora(image, lp, "image"), image.out_dim, image_x,
                                                 params.experts.trainer.image.batch_size)
    pre = new_image_encoder(ip)
    costs["image_pretrain_train"] = classifier_train(pre, pre.out_dim, image_x, ip.trainer.batch_size)
    costs["text_student_train"], costs["text_student_infer"] = student(
        "text", text_encoder, text_x, params.decompose.trainer.text.batch_size)
    costs["image_student_train"], costs["image_student_infer"] = student(
        "image", image, image_x, params.decompose.trainer.image.batch_size)
    client = params.federated.client
    small = ImageEncoder(client.image_channels)
    costs["image_client_train"] = classifier_train(small, small.out_dim, image_x, client.batch_size)
    return costs


# --------------------------------------------------------------------------- work
def _cap(n: int, cap: int | None) -> int:
    return n if cap is None else min(n, cap)


def fusion_grid(fp: Any) -> int:
    """Merged models the fusion search scores: the stage's own coefficient grid of every method in params."""
    from components.fusion.merge import coefficient_grid

    grids = {"lam": fp.lambdas, "k": fp.ks, "p": fp.ps}
    return sum(len(coefficient_grid(m, grids)) for m in fp.methods)


def work(profile: str, sizes: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, float, str]]]:
    """Each stage's loops as (what, samples, cost key): the counts the stage code runs."""
    p = _params(profile)
    text = [t for t, s in sizes.items() if s["modality"] == "text"]
    image = [t for t, s in sizes.items() if s["modality"] == "image"]
    out: dict[str, list[tuple[str, float, str]]] = {s: [] for s in STAGES if s != "data"}

    ft = p.foundation.image.trainer  # foundation: the image foundation pre-trained multi-task, every weight trains
    if image:
        out["foundation"] += [
            ("pre-training steps", sum(_cap(sizes[t]["train"], ft.max_train_samples) for t in image) * ft.max_epochs,
             "image_pretrain_train"),
            ("validation each epoch", sum(sizes[t]["val"] for t in image) * ft.max_epochs, "image_infer")]

    for t, s in sizes.items():  # experts: probe features, the LoRA fit with a validation pass per epoch
        m, tp = s["modality"], p.experts.trainer.of(s["modality"])
        n = _cap(s["train"], tp.max_train_samples)
        out["experts"] += [(f"{t}: probe features", n + s["val"], f"{m}_infer"),
                           (f"{t}: LoRA steps", n * tp.max_epochs, f"{m}_lora_train"),
                           (f"{t}: validation each epoch + final", s["val"] * (tp.max_epochs + 1 +
                                                                              (s["kind"] == "multilabel")),
                            f"{m}_infer")]

    for m, tasks in (("text", text), ("image", image)):  # decompose: multi-task student + one single per task
        if not tasks:
            continue
        tp = p.decompose.trainer.of(m)
        n = sum(_cap(sizes[t]["train"], tp.max_train_samples) for t in tasks)
        v = sum(sizes[t]["val"] for t in tasks)
        out["decompose"] += [(f"{m}: teacher features (train + val) and teacher val pass", n + 2 * v, f"{m}_infer"),
                             (f"{m}: student steps (multi-task + single-task)", 2 * n * tp.max_epochs,
                              f"{m}_student_train"),
                             (f"{m}: student validation", 2 * v * (tp.max_epochs + 1), f"{m}_student_infer")]

    fp = p.fusion
    if len(text) >= 2:
        vc = sum(_cap(sizes[t]["val"], fp.max_val_samples) for t in text)
        grid = fusion_grid(fp)
        out["fusion"] += [("experts on their own validation", vc, "text_infer"),
                          (f"{grid} merged models on every text task's validation", grid * vc, "text_infer")]
        multilabel = [t for t in text if sizes[t]["kind"] == "multilabel"]
        if multilabel:
            out["fusion"].append(("threshold passes per method", len(fp.methods) * (
                vc + sum(_cap(sizes[t]["val"], fp.max_val_samples) for t in multilabel)), "text_infer"))

    rp = p.routing
    routed = [t for t in text if any(t in members for members in rp.groups.values())]
    if routed:
        v = sum(_cap(sizes[t]["val"], rp.max_val_samples) for t in routed)
        nr = sum(_cap(sizes[t]["train"], rp.trainer.max_train_samples) for t in routed)
        out["routing"] += [("oracle and uniform scores (fixed routing: 1 encoder pass each)", 2 * v, "text_infer"),
                           ("router steps: the router's foundation pass", nr * rp.trainer.max_epochs, "text_infer"),
                           ("router steps: the routed pass", nr * rp.trainer.max_epochs, "text_lora_train"),
                           ("validation each epoch + final scores and weights (2 passes)",
                            2 * v * (rp.trainer.max_epochs + 2), "text_infer")]
        if rp.general.enabled:
            g = rp.general.trainer
            ng = sum(_cap(sizes[t]["train"], g.max_train_samples) for t in routed)
            out["routing"] += [("general adapter steps", ng * g.max_epochs, "text_lora_train"),
                               ("general adapter validation", v * (g.max_epochs + 1), "text_infer")]

    fed = p.federated
    if text:  # FedKIM: clients on their shards each round, then the server's injection on its split of val
        rows = {t: sum(_cap(k, fed.client.max_train_samples) for k in s["shards"]) for t, s in sizes.items()}
        own_train = {t: _cap(round(fed.server_fraction * s["val"]), fed.injection.trainer.max_train_samples)
                     for t, s in sizes.items()}
        own_val = {t: s["val"] - round(fed.server_fraction * s["val"]) for t, s in sizes.items()}
        it, local = fed.injection.trainer, fed.rounds * fed.client.epochs
        out["federated"] += [
            ("text clients' steps (a 1-layer student of MiniLM; cost of the LoRKD text student)",
             local * sum(rows[t] for t in text), "text_student_train"),
            ("image clients' steps", local * sum(rows[t] for t in image), "image_client_train"),
            ("aggregated text client on the server's validation each round",
             fed.rounds * sum(own_val[t] for t in text), "text_student_infer"),
            ("aggregated image client on the server's validation each round",
             fed.rounds * sum(own_val[t] for t in image), "image_student_infer"),
            ("no-injection features (MiniLM)", sum(own_train.values()) + sum(own_val.values()), "text_infer"),
            ("injection steps (MiniLM + M3OE experts; cost of a LoRA step)", sum(own_train.values()) * it.max_epochs,
             "text_lora_train"),
            ("injected validation each epoch + final, plain final", sum(own_val.values()) * (it.max_epochs + 2),
             "text_infer")]

    for t, s in sizes.items():  # evaluate: every model on every (capped) test row
        n = _cap(s["test"], p.evaluate.max_test_samples)
        if s["modality"] == "text":  # merged expert, probe, fused, routed (2 passes), FedKIM, teacher
            out["evaluate"] += [(f"{t}: 7 MiniLM passes", 7 * n, "text_infer"),
                                (f"{t}: LoRKD and single students", 2 * n, "text_student_infer")]
        else:  # merged expert, probe, teacher; FedKIM reads the task description through MiniLM
            out["evaluate"] += [(f"{t}: 3 image-foundation passes", 3 * n, "image_infer"),
                                (f"{t}: FedKIM (MiniLM over the description)", n, "text_infer"),
                                (f"{t}: LoRKD and single students", 2 * n, "image_student_infer")]
    return out


def estimate(loops: dict[str, list[tuple[str, float, str]]], costs: dict[str, float]) -> dict[str, Any]:
    stages = {}
    for stage, items in loops.items():
        rows = [{"what": w, "samples": n, "cost": k, "seconds": n * costs[k]} for w, n, k in items]
        stages[stage] = {"seconds": sum(r["seconds"] for r in rows), "loops": rows}
    return stages


# --------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench full_profile_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps / forwards per cost (median)")
    parser.add_argument("--profile", default="full", help="the profile to estimate")
    parser.add_argument("--check", default="quick", help="the profile that is run for real to check the estimator")
    args = parser.parse_args()
    from bench.wall_time import one
    from flows.environment import configure

    configure(ROOT)
    started = time.perf_counter()
    profiles: dict[str, Any] = {}
    for profile in (args.check, args.profile):
        with tempfile.TemporaryDirectory(prefix=f"medexperts-bench-fpt-{profile}-") as tmp:
            sizes, data_seconds = prepare(profile, Path(tmp) / "data")
        costs = measure(profile, args.steps)
        stages = estimate(work(profile, sizes), costs)
        stages["data"] = {"seconds": data_seconds, "loops": [], "measured": True}
        profiles[profile] = {"sizes": sizes, "costs_s_per_sample": costs, "stages": stages,
                             "raw_seconds": sum(s["seconds"] for s in stages.values())}
        print(f"{profile}: raw estimate {profiles[profile]['raw_seconds'] / 60:.1f} min; per-sample costs "
              + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in costs.items()), flush=True)

    measured = one(args.check)  # the check profile, run for real
    if "error" in measured:
        raise SystemExit(f"the {args.check} run failed: {measured['error']}")
    check, target = profiles[args.check], profiles[args.profile]
    ratios = {}
    for stage in STAGES:
        if stage == "data":
            continue
        raw, real = check["stages"][stage]["seconds"], measured["stage_compute_seconds"].get(stage)
        ratios[stage] = real / raw if raw and real else None
    calibrated = {stage: target["stages"][stage]["seconds"] * (ratios.get(stage) or 1.0) for stage in STAGES}
    other = {k: v for k, v in measured["stage_compute_seconds"].items() if k not in STAGES}  # sources, promote
    fixed = sum(v or 0 for v in other.values()) + measured["overhead_seconds"]  # taken from the check run as is
    calibrated_total = sum(calibrated.values()) + fixed
    check_total = check["raw_seconds"]
    result = {
        "params": {"profile": args.profile, "check": args.check, "steps": args.steps},
        "profiles": profiles,
        "check_run": measured,
        "ratio_measured_over_raw": ratios,
        "check_total_ratio": measured["compute_seconds"] / check_total,
        "estimate": {"calibrated_stage_seconds": calibrated, "other_stages_seconds": other,
                     "overhead_seconds": measured["overhead_seconds"], "calibrated_wall_seconds": calibrated_total,
                     "raw_wall_seconds": target["raw_seconds"] + fixed},
        "wall_seconds": time.perf_counter() - started,
    }
    print(f"{args.check}: measured {measured['compute_seconds'] / 60:.1f} min of stage compute, raw estimate "
          f"{check_total / 60:.1f} min; {args.profile}: calibrated {calibrated_total / 3600:.1f} h, raw "
          f"{result['estimate']['raw_wall_seconds'] / 3600:.1f} h")
    print(f"wrote {write_result('full_profile_time', result)}")


if __name__ == "__main__":
    main()
