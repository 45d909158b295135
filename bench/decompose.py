"""LoRKD: quality and size of the decomposed experts, and the cost of the one-pass mixed-batch step.
`medexperts bench decompose [--profile quick]` -> bench/results/decompose.json

At scale (the full profile's students, the ResNet-18 image foundation that `bench image_foundation` pre-trained
as teacher, quality only): `medexperts bench decompose --profile full --tasks pneumoniamnist breastmnist
retinamnist dermamnist --image-foundation WORK/resnet18/image --rounds 0 --result decompose_full_image`.

Quality: the decompose stage's own code (`components.stages.decompose.run`) on the image tasks and the text
tasks (shipped, plus Symptom2Disease and HoC when ../shared/data has them), then on each test split: the teacher
(`decompose.teacher`: by default the frozen image foundation + its heads, and each text task's deployed LoRA
expert, trained here by the experts stage's own `train_expert` unless `--work` already has it), the fused LoRKD
expert and the same-size single-task student; parameters of the deployed model vs the teacher.

Step cost (4 tasks, random data, the profile's students: `decompose.student`; the full profile's with `--profile
full --skip-quality --result decompose_step_full`): median time of one training step (forward, LoRKD
loss, backward, AdamW) for (1) the one-pass mixed batch, (a) the plain student without experts (the fused
architecture) on the same batch, (b) a loop that runs each task's sub-batch through its own expert
separately. Memory: what one training step adds (peak RSS on CPU, peak allocated on GPU) for the LoRKD
student vs full fine-tuning of the teacher on the same batch, each in its own process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, parse_sets, run_child, time_training_steps, write_result

TASKS_FOR_STEP = 4
BATCH = {"image": 64, "text": 32}


def _params(profile: str, overrides: dict[str, Any]):  # noqa: ANN202
    from components.config import load_params

    return load_params(ROOT / "params", profile, overrides)


# --------------------------------------------------------------------------- quality
def quality(work: Path, profile: str, tasks: list[str], params: Any) -> dict[str, Any]:
    """The decompose stage run with ``params`` (the profile's, ``data.active`` = ``tasks``, and any ``--set``), scored
    on each task's test split."""
    import torch

    from components.core.layout import lorkd_fused, lorkd_single
    from components.data.datasets import load_split
    from components.stages.decompose import DecomposeInputs, run
    from components.stages.decompose import lorkd_teacher
    from components.metrics.classification import compute_metrics
    import components.plugins  # noqa: F401
    from components.bundle.format import load_bundle
    from components.nn.foundation import load_foundation
    from components.training.data import labels_tensor
    from components.training.inference import batched

    experts = expert_teachers(work, profile, tasks)
    start = time.perf_counter()
    summary = run(DecomposeInputs.from_params(params), work / "data", work / "foundation", work / "decompose",
                  experts_dir=experts)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {}
    for modality, s in summary.modalities.items():
        found = load_foundation(work / "foundation", modality)
        for task, r in s.tasks.items():
            test = load_split(work / "data", task, "test")
            x, y = found.inputs(test.inputs), labels_tensor(test.labels, test.kind)
            teacher = lorkd_teacher(s.teacher, work / "decompose", experts, found, task)
            scores = {}
            with torch.no_grad():
                scores["teacher"] = compute_metrics(test.kind, batched(teacher, x), y, test.num_labels)
                for key, bundle in (("lorkd", lorkd_fused), ("single_student", lorkd_single)):
                    model = load_bundle(bundle(work / "decompose", modality, task)).model.for_task(task)
                    scores[key] = compute_metrics(test.kind, batched(model, x), y, test.num_labels)
            out[task] = {"modality": modality, "teacher": s.teacher, "test": scores,
                         "val": {"teacher": r.teacher_val, "lorkd": r.val, "single_student": r.single_val},
                         "parameters": r.parameters, "teacher_parameters": r.teacher_parameters,
                         "parameter_fraction": r.parameter_fraction, "test_samples": len(test)}
            m = scores
            print(f"{task:18s} macro-F1 teacher {m['teacher']['macro_f1']:.3f}  LoRKD {m['lorkd']['macro_f1']:.3f}  "
                  f"single {m['single_student']['macro_f1']:.3f}  params {100 * r.parameter_fraction:.1f}%",
                  flush=True)
        out[f"_{modality}"] = {"student_parameters": s.student_parameters, "train_seconds": s.train_seconds}
    return {"tasks": out, "decompose_seconds": seconds}


def expert_teachers(work: Path, profile: str, tasks: list[str]) -> Path | None:
    """A stage-layout experts folder with the deployed LoRA expert of every task of a modality whose teacher is
    `expert` (`work/experts/<task>-lora`, trained where missing, as the routing bench does); None when no
    modality distils an expert."""
    from bench.routing import ensure_experts, link_experts

    params = _params(profile, {"data.active": tasks})
    need = [t for t, spec in params.data.active_tasks().items()
            if params.decompose.teacher.of(spec.modality) == "expert"]
    if not need:
        return None
    ensure_experts(work, profile, need)
    return link_experts(work, need, "decompose-teachers")


# --------------------------------------------------------------------------- step cost (child process)
def _setup_student(work: Path, modality: str, profile: str):  # noqa: ANN202
    """The profile's LoRKD student (``decompose.student``) of ``modality`` over ``work``'s foundation, with
    ``TASKS_FOR_STEP`` task experts, and one random mixed batch."""
    import numpy as np
    import torch

    from components.decompose.student import build_student
    from components.nn.classifier import make_head
    from components.nn.foundation import load_foundation

    found = load_foundation(work / "foundation", modality)
    heads = {f"task{t}": make_head(found.encoder.out_dim, 3) for t in range(TASKS_FOR_STEP)}
    student = build_student(_params(profile, {}).decompose, modality, found.encoder, heads, seed=0)
    rng = np.random.default_rng(0)
    n = BATCH[modality]
    if modality == "text":
        words = "patient presents with fever cough chest pain and shortness of breath after surgery".split()
        x = found.inputs([" ".join(rng.choice(words, 200)) for _ in range(n)])
    else:
        x = found.inputs(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
    ids = torch.arange(n) % TASKS_FOR_STEP
    y = torch.as_tensor(rng.integers(0, 3, size=n))
    teacher = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    return found, student, x, ids, y, teacher


def one_step(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from components.decompose.deploy import fuse
    from components.decompose.loss import lorkd_loss
    from components.nn.classifier import Classifier, make_head
    from components.training.module import task_loss

    work, modality, case = Path(spec["work"]), spec["modality"], spec["case"]
    found, student, x, ids, y, teacher = _setup_student(work, modality, spec["profile"])
    kinds, widths = ["multiclass"] * TASKS_FOR_STEP, [3] * TASKS_FOR_STEP
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if case == "plain":  # the student's architecture without experts: the fused network, one head
        model = fuse(student, "task0").train()
    elif case == "teacher_full":  # full fine-tuning of the teacher, same batch
        model = Classifier(found.encoder, make_head(found.encoder.out_dim, 3)).requires_grad_(True).train()
    else:
        model = student.train()
    model.to(device)
    x, ids, y, teacher = {k: v.to(device) for k, v in x.items()}, ids.to(device), y.to(device), teacher.to(device)

    def loss_of() -> torch.Tensor:
        if case in ("plain", "teacher_full"):
            return task_loss("multiclass", model(**x), y)
        if case == "one_pass":
            return lorkd_loss(student(ids, **x), y, teacher, ids, kinds, widths, 1.0, 2.0)[0]
        total = 0.0  # loop: each task's sub-batch through the backbone with that task's expert
        for t in range(TASKS_FOR_STEP):
            mask = ids == t
            sub = {k: v[mask] for k, v in x.items()}
            total = total + lorkd_loss(student(t, **sub), y[mask], teacher[mask], torch.zeros_like(ids[mask]),
                                       kinds[:1], widths[:1], 1.0, 2.0, reduction="sum")[0]
        return total / len(ids)

    cost = time_training_steps(model, loss_of, device, spec["warmup"], spec["steps"])
    return {"modality": modality, "case": case, **cost, "batch": len(y), "device": device.type}


def switch_ms(work: Path, modality: str, profile: str) -> float:
    """Median time to serve one sample of task t right after another task: no reload, only the expert choice."""
    import torch

    _, student, x, _, _, _ = _setup_student(work, modality, profile)
    one = {k: v[:1] for k, v in x.items()}
    times = []
    with torch.no_grad():
        for i in range(40):
            start = time.perf_counter()
            student(i % TASKS_FOR_STEP, **one)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[8:])


def _foundation_record(work: Path) -> dict[str, Any]:
    """What the image teacher was: its arch config, size and training."""
    import json

    path = work / "foundation" / "image" / "manifest.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in ("config", "parameters", "tasks", "train_samples", "train_seconds", "sha256")}


def setup(work: Path, profile: str, tasks: list[str], image_foundation: Path | None = None) -> None:
    from bench.experts import setup as experts_setup

    experts_setup(work, profile, tasks, image_foundation)  # the same data and foundations


def main() -> None:
    import json

    from bench.experts import available_tasks

    parser = argparse.ArgumentParser(prog="medexperts bench decompose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--tasks", nargs="*", help="default: the shipped tasks + the optional ones found on disk")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="step-cost rounds (0: quality only)")
    parser.add_argument("--image-foundation", type=Path,
                        help="an image foundation folder the foundation stage wrote (default: pre-train one)")
    parser.add_argument("--result", default="decompose", help="bench/results/RESULT.json")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one); text experts "
                                                  "already in WORK/experts/<task>-lora are reused as teachers")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a parameter of the quality run's decompose stage (VALUE read as YAML), e.g. "
                             "decompose.trainer.image.lr_schedule=one_cycle; recorded in the result")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _, spec, out = args.child
        Path(out).write_text(json.dumps(one_step(json.loads(spec))))
        return

    tasks = args.tasks or available_tasks(args.profile)
    overrides = parse_sets(parser, args.overrides)  # a malformed --set stops here, before any setup
    params = _params(args.profile, {**overrides, "data.active": tasks})
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="medexperts-bench-decompose-"))
    setup(work, args.profile, tasks, args.image_foundation.resolve() if args.image_foundation else None)
    result = {"tasks": {}} if args.skip_quality else quality(work, args.profile, tasks, params)
    cases = ["one_pass", "plain", "loop", "teacher_full"]
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):  # cases alternate inside a round; medians over rounds
        for modality in ("image", "text"):
            for case in cases:
                r = run_child("bench.decompose", "step", {"work": str(work), "profile": args.profile,
                                                          "modality": modality, "case": case,
                                                          "warmup": 3, "steps": args.steps})
                rounds.setdefault((modality, case), []).append(r)
    steps = {}
    for (modality, case), rs in rounds.items():
        steps.setdefault(modality, {})[case] = {
            **rs[0], "step_ms": statistics.median(r["step_ms"] for r in rs),
            "train_memory_mb": statistics.median(r["train_memory_mb"] for r in rs),
            "step_ms_rounds": [r["step_ms"] for r in rs]}
        print(f"step {modality:5s} {case:12s} {steps[modality][case]['step_ms']:8.1f} ms  "
              f"+{steps[modality][case]['train_memory_mb']:.0f} MB", flush=True)
    figures = {m: {"one_pass_vs_plain": s["one_pass"]["step_ms"] / s["plain"]["step_ms"],
                   "loop_vs_one_pass": s["loop"]["step_ms"] / s["one_pass"]["step_ms"],
                   "memory_vs_teacher_full": s["one_pass"]["train_memory_mb"] / s["teacher_full"]["train_memory_mb"]
                   if s["teacher_full"]["train_memory_mb"] > 0 else None,
                   "switch_ms": switch_ms(work, m, args.profile)}
               for m, s in steps.items()}
    quality_tasks = {t: r for t, r in result["tasks"].items() if not t.startswith("_")}
    goals = {t: {"matches_teacher": r["test"]["lorkd"]["macro_f1"] >= r["test"]["teacher"]["macro_f1"],
                 "at_most_10pct_params": r["parameter_fraction"] <= 0.10,
                 "beats_single_student": r["test"]["lorkd"]["macro_f1"] >= r["test"]["single_student"]["macro_f1"]}
             for t, r in quality_tasks.items()}
    path = write_result(args.result, {
        "params": {"profile": args.profile, "tasks": tasks, "result": args.result, "step_tasks": TASKS_FOR_STEP,
                   "batch": BATCH, "timed_steps": args.steps, "rounds": args.rounds, "primary_metric": "macro_f1",
                   "overrides": overrides, "decompose": params.decompose.model_dump(mode="json"),
                   "image_foundation": _foundation_record(work)},
        "quality": result, "step_cost": steps, "figures": figures, "goals": goals,
    })
    print(json.dumps(figures, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
