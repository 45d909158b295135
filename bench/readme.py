"""Fill the README's result tables from bench/results/*.json (never by hand): `medexperts bench readme`."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable

from bench.common import RESULTS, ROOT
from components.metrics.report import markdown_table

# tasks whose pixels are not the published dataset's (DermaMNIST: decoded from JPEG-75 copies, DATA.md section 3):
# every README row of theirs says so, since their figures are not comparable to the published ones
NOT_OFFICIAL_PIXELS = {"dermamnist": "JPEG copy"}


def task_label(task: str) -> str:
    """A task's name as a README table row shows it."""
    note = NOT_OFFICIAL_PIXELS.get(task)
    return f"{task} ({note})" if note else task


def pipeline_section(result: dict) -> str:
    fig, metric, m = result["figures"], result["params"]["metric"], result["machine"]
    rows = [{"task": task_label(t), "probe": v["probe"], "expert": v["expert"], "fused": v["fused"],
             "normalised": v["normalised"],
             "kb": v["expert_stored_bytes"] / 1024, "share": 100 * v["trainable_params"] / v["foundation_params"],
             "ms": v["latency_ms_per_sample"]["expert_merged"], "base_ms": v["latency_ms_per_sample"]["base"],
             "baseline": strongest_baseline(t)}
            for t, v in result["tasks"].items()]
    table = markdown_table(rows, [("task", "task"), ("probe", f"probe {metric}"), ("expert", f"LoRA expert {metric}"),
                                  ("fused", f"fused {metric}"), ("normalised", "fused / expert"),
                                  ("baseline", "strongest simple baseline, same split, macro-F1"),
                                  ("kb", "expert size (KB)"), ("share", "trainable % of foundation"),
                                  ("ms", "deployed expert ms/sample"), ("base_ms", "foundation ms/sample")])
    beats = "yes" if fig["every_expert_beats_probe"] else "**no** (see the rows where expert ≤ probe)"
    return (
        f"Test-set {metric}, profile `{result['params']['profile']}`, from `bench/results/pipeline.json` "
        f"(commit {m['git_commit'][:8]}, {m['cpus']} CPUs, torch {m['torch']}, {m['date']}).\n\n{table}\n"
        f"- Every expert beats its probe: {beats}.\n"
        f"- Flow wall time {fig['flow_wall_seconds']:.0f} s, of which stage compute {fig['stage_compute_seconds']:.0f} s: "
        f"orchestration + tracking + versioning overhead {100 * fig['overhead_fraction']:.1f} % "
        f"(Prefect's temporary server start, MLflow logging and model registration, `dvc commit`).\n"
        f"- A second retrain with nothing changed, in the same process: {fig['unchanged_rerun_seconds']:.0f} s, every stage skipped, nothing registered (a new `medexperts run` adds ~10 s of imports and Prefect start-up).\n"
        f"- Fusion: best method `{result['fusion']['best_method']}`; λ chosen on validation.\n"
    )


def methods_section() -> str:
    from components.experts.methods import METHODS

    rows = [{"key": f"`{m.name}`", "method": m.pretty, "what": m.what, "paper": m.paper} for m in METHODS.values()]
    return markdown_table(rows, [("key", "`experts.method`"), ("method", "method"), ("what", "what it does"),
                                 ("paper", "paper")])


def throughput_section(result: dict) -> str:
    m = result["machine"]
    rows = [{"modality": k, "lit": v["lightning_samples_per_s"], "loop": v["loop_samples_per_s"], "ratio": v["ratio"],
             "n": v["samples"], "bs": v["batch_size"], "prec": v["precision"]} for k, v in result["figures"].items()]
    table = markdown_table(rows, [("modality", "expert (LoRA)"), ("lit", "Lightning samples/s"),
                                  ("loop", "hand loop samples/s"), ("ratio", "ratio"), ("n", "samples"),
                                  ("bs", "batch"), ("prec", "precision")])
    device = m["cuda"] or f"{m['cpus']} CPUs"
    return (f"Median of {result['params']['repeats']} alternating runs of one epoch each, on {device}, torch "
            f"{m['torch']} (commit {m['git_commit'][:8]}), from `bench/results/train_throughput.json`.\n\n{table}\n")


def machine_line(result: dict) -> str:
    """Where a result was measured: the GPU or the CPU count, torch, commit."""
    m = result["machine"]
    return f"{m['cuda'] or str(m['cpus']) + ' CPUs'}, torch {m['torch']}, commit {m['git_commit'][:8]}"


def experts_section(result: dict) -> str:
    metric = result["params"]["primary_metric"]
    baseline = {t: strongest_baseline(t) for t in {r["task"] for r in result["runs"]}}  # read once per task
    rows = [{"task": task_label(r["task"]), "method": r["method"], "test": r["test"][metric],
             "probe": r["probe_test"][metric],
             "acc": r["test"]["accuracy"], "auc": r["test"]["auroc"], "trainable": r["trainable_params"],
             "kb": r["stored_bytes"] / 1024, "s": r["train_seconds"], "rss": r["peak_rss_mb"],
             "beats": "yes" if r["test"][metric] > r["probe_test"][metric] else "**no**",
             "baseline": baseline[r["task"]]} for r in result["runs"]]
    table = markdown_table(rows, [("task", "task"), ("method", "method"), ("test", f"test {metric}"),
                                  ("probe", f"probe {metric}"), ("beats", "beats probe"),
                                  ("baseline", "strongest simple baseline, same split, macro-F1"), ("acc", "accuracy"),
                                  ("auc", "AUC"), ("trainable", "trainable params"), ("kb", "stored KB"),
                                  ("s", "train s"), ("rss", "peak RSS MB")])
    steps = result["step_cost"]
    base = {(s["modality"], s["method"], s["path"]): s for s in steps}
    srows = []
    for s in steps:
        lora = base[(s["modality"], "lora", "auto")]
        full = base.get((s["modality"], "full", "auto"))
        srows.append({"modality": s["modality"], "method": s["method"] + ("" if s["path"] == "auto" else f" ({s['path']})"),
                      "ms": s["step_ms"], "vs_lora": s["step_ms"] / lora["step_ms"], "mb": s["train_memory_mb"],
                      "vs_full": s["train_memory_mb"] / full["train_memory_mb"] if full and full["train_memory_mb"] > 0 else None,
                      "trainable": s["trainable_params"]})
    stable = markdown_table(srows, [("modality", "modality"), ("method", "method"), ("ms", "step ms (median)"),
                                    ("vs_lora", "× LoRA step"), ("mb", "step memory MB"), ("vs_full", "× full FT memory"),
                                    ("trainable", "trainable params")])
    return (f"Profile `{result['params']['profile']}`, {machine_line(result)}, "
            f"from `bench/results/experts.json`. Every run is the experts stage's own training in a fresh process; "
            f"test metrics of the deployed bundle.\n\n{table}\n"
            f"Cost of one training step on a fixed batch (text: 16 × 128 tokens on all-MiniLM-L6-v2; image: 64 "
            f"images on the pre-trained CNN), median over {result['params']['rounds']} rounds in which the methods "
            f"alternate, each in its own process. *Step memory* is what a training step adds to the built model "
            f"(gradients, optimiser state, activations; peak RSS on CPU).\n\n{stable}\n")


BASELINE_NAMES = {"majority": "majority class", "tfidf_lr": "TF-IDF + LR", "pixel_lr": "pixel LR",
                  "small_cnn": "small CNN"}


def strongest_of(rows: dict) -> str:
    """A baselines block's strongest baseline (picked on validation): its name and test macro-F1."""
    name = rows["strongest"]
    return f"{BASELINE_NAMES.get(name, name)} {rows[name]['test']['macro_f1']:.3f}"


def baselines_section(result: dict) -> str:
    """The strongest simple baseline of each task beside the pipeline's experts (test macro-F1)."""
    from bench.baselines import experts_beside

    # the experts as bench/results/experts.json has them now (re-joined here, so the two tables never drift apart)
    experts = (experts_beside(result["tasks"], result["params"].get("profile", "quick"))
               or result.get("experts_vs_baseline", {}))
    rows = []
    for task, t in result["tasks"].items():
        e = image_baselines(task) or t["expert_rows"]  # an image task: the one set every table shows
        a = t.get("all_rows")
        beside = experts.get(task, {})
        base = e[e["strongest"]]["test"]["macro_f1"]
        lora, best = beside.get("lora_test_macro_f1"), beside.get("best_method_test_macro_f1")
        rows.append({
            "task": task_label(task), "n": e["train_samples"], "majority": e["majority"]["test"]["macro_f1"],
            "strongest": strongest_of(e),
            "all": f"{strongest_of(a)} (n={a['train_samples']})" if a else "(same rows)",
            "probe": beside.get("probe_test_macro_f1"), "lora": lora,
            "best": f"{beside['best_method']} {best:.3f}" if best is not None else "",
            "verdict": ("" if lora is None else "yes" if lora > base else "**no**"),
        })
    table = markdown_table(rows, [("task", "task"), ("n", "train rows (expert's)"), ("majority", "majority"),
                                  ("strongest", "strongest baseline, same rows"), ("all", "strongest baseline, all rows"),
                                  ("probe", "probe"), ("lora", "LoRA expert"), ("best", "best expert method"),
                                  ("verdict", "LoRA beats baseline")])
    p = result["params"]
    return (f"Profile `{p['profile']}`, {machine_line(result)}, from `bench/results/baselines.json` (experts from "
            f"`bench/results/experts.json` as committed now, same splits). Test macro-F1; every baseline's "
            f"hyper-parameters picked on validation; the strongest is the best on validation; the small CNN is the "
            f"median of {p['cnn_seeds']} seeds. The image tasks' rows are `baselines_full.json`'s (the same rows and "
            f"splits in every profile: one set of image baselines in every table).\n\n{table}\n")


def baselines_all_data_section(result: dict, name: str = "baselines_full") -> str:
    """Every simple baseline of every task trained on all its training rows (the full profile's splits): test
    macro-F1 / AUROC, the strongest (picked on validation) in bold. ``name``: the results file, where the result
    does not record it."""
    rows = []
    for task, t in result["tasks"].items():
        r = t.get("all_rows") or t["expert_rows"]

        def cell(baseline: str) -> str:
            if baseline not in r:
                return ""
            test = r[baseline]["test"]
            text = f"{test['macro_f1']:.3f} / {test['auroc']:.3f}"
            return f"**{text}**" if baseline == r["strongest"] else text

        rows.append({"task": task_label(task), "n": r["train_samples"], "test_n": t["test_samples"],
                     "majority": f"{r['majority']['test']['macro_f1']:.3f}", "tfidf_lr": cell("tfidf_lr"),
                     "pixel_lr": cell("pixel_lr"), "small_cnn": cell("small_cnn")})
    table = markdown_table(rows, [("task", "task"), ("n", "train rows"), ("test_n", "test rows"),
                                  ("majority", "majority macro-F1"), ("tfidf_lr", "TF-IDF + LR"),
                                  ("pixel_lr", "pixel LR"), ("small_cnn", "small CNN (median of seeds)")])
    p = result["params"]
    name = p.get("result", name)
    return (f"Profile `{p['profile']}` (every training row), {machine_line(result)}, from `bench/results/{name}.json` "
            f"(wall time {result['wall_seconds'] / 60:.0f} min). Test macro-F1 / AUROC; hyper-parameters picked on "
            f"validation; **bold**: the task's strongest baseline (best validation macro-F1); the small CNN is the "
            f"median of {p['cnn_seeds']} seeds.\n\n{table}\n")


def committed(name: str) -> dict:
    """bench/results/NAME.json as committed; {} when there is none."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def acc_auc_f1(m: dict) -> str:
    """A model's accuracy / AUROC / macro-F1, the cells of the image tables (MedMNIST's two metrics, then ours)."""
    return f"{m['accuracy']:.3f} / {m['auroc']:.3f} / {m['macro_f1']:.3f}"


FULL_MODELS = (("probe", "probe"), ("expert", "deployed expert"), ("fused", "fused"), ("routed", "AT-MoE routed"),
               ("fedkim", "FedKIM"), ("teacher", "LoRKD teacher"), ("lorkd", "LoRKD expert"),
               ("single_student", "single-task student"))


def pipeline_full_section(result: dict, baselines_name: str = "baselines_full") -> str:
    """The full profile's measured run: every model's test metric per task beside the strongest simple baseline
    on all the data (bench/results/BASELINES_NAME.json, the same splits: test row counts are compared) and the quick
    profile's deployed expert (bench/results/pipeline.json), then the time it took, what the quick profile's caps
    cost per model, and LoRKD's goals."""
    metric, p = result["params"]["metric"], result["params"]
    baselines_result = committed(baselines_name)
    baselines = baselines_result.get("tasks", {})
    quick_result = committed("pipeline")
    quick = quick_result.get("tasks", {})
    scores = {task: model_scores(t) for task, t in result["tasks"].items()}
    present = [(k, label) for k, label in FULL_MODELS if any(s.get(k) is not None for s in scores.values())]
    rows, misses, other_split = [], [], []
    for task, t in result["tasks"].items():
        b = baselines.get(task)
        if b and b.get("test_samples") != t["test_samples"]:
            other_split.append(task)  # not the same test rows: no comparison
            b = None
        r = (b.get("all_rows") or b["expert_rows"]) if b else None
        base = r[r["strongest"]]["test"]["macro_f1"] if r and metric == "macro_f1" else None
        verdict = "" if base is None else "yes" if t["expert"] > base else "**no**"
        if verdict == "**no**":
            misses.append(task)
        rows.append({"task": task_label(task), "n": t["test_samples"], **{k: scores[task].get(k) for k, _ in present},
                     "baseline": strongest_of(r) if base is not None else "—",
                     "verdict": verdict, "quick": quick.get(task, {}).get("expert")})
    table = markdown_table(rows, [("task", "task"), ("n", "test rows"), *present,
                                  ("baseline", "strongest baseline, all rows"), ("verdict", "expert beats it"),
                                  ("quick", "quick-profile expert")])
    fig = result["figures"]

    def took(seconds: float) -> str:
        return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"

    per_stage = ", ".join(f"{s} {took(v)}" for s, v in fig["per_stage_compute_seconds"].items() if v >= 60)
    runs = len(result.get("invocations", []))
    compared = sum(r["verdict"] != "" for r in rows)
    verdict = ("no task compared" if not compared else
               f"the deployed expert beats it on every task compared ({compared} of {len(rows)})" if not misses else
               f"the deployed expert does **not** beat it on {', '.join(misses)}")
    lines = [f"- Against the strongest simple baseline: {verdict}."]
    if other_split:
        lines.append(f"- Not compared (the baselines file has other test rows): {', '.join(other_split)}.")
    lines.append(f"- Stage compute of the invocation that finished each stage: {per_stage}; the last invocation's "
                 f"flow wall time {took(fig['flow_wall_seconds'])}"
                 + (f"; {runs} invocations in all, each stop resumed by the next (the compute a stopped invocation "
                    f"spent is not counted)." if runs > 1 else "."))
    if fig.get("invocations_wall_seconds"):
        lines.append(f"- Wall time summed over the invocations (a stopped one up to its last heartbeat): "
                     f"{took(fig['invocations_wall_seconds'])}.")
    lines.append(commits_line(result, baselines_result, baselines_name))
    return (f"Profile `{p['profile']}`, test {metric}, {machine_line(result)}, from "
            f"`bench/results/{p.get('result', 'pipeline_full')}.json`; the strongest baseline from "
            f"`bench/results/{baselines_name}.json`.\n\n{table}\n" + "\n".join(lines) + "\n"
            + image_anchors(result, baselines) + quick_vs_full(quick_result, result) + lorkd_goals(result))


def image_anchors(result: dict, baselines: dict) -> str:
    """The run's image models beside MedMNIST v2's ResNet-18 (28) on test ACC / AUC: the deployed expert, the image
    foundation with its own pre-training heads (the LoRKD teacher) and the strongest image baseline."""
    from bench.common import MEDMNIST_ANCHORS, MEDMNIST_SOURCE

    rows = []
    for task, t in result["tasks"].items():
        if task not in MEDMNIST_ANCHORS:
            continue
        m, a = t.get("metrics", {}), MEDMNIST_ANCHORS[task]
        b = baselines.get(task) if baselines.get(task, {}).get("test_samples") == t["test_samples"] else None
        r = (b.get("all_rows") or b["expert_rows"]) if b else None

        def cell(scores: dict | None) -> str:
            return f"{scores['accuracy']:.3f} / {scores['auroc']:.3f}" if scores else "—"

        rows.append({"task": task_label(task), "expert": cell(m.get("expert")), "teacher": cell(m.get("teacher")),
                     "baseline": (f"{BASELINE_NAMES.get(r['strongest'], r['strongest'])}: "
                                  f"{cell(r[r['strongest']]['test'])}") if r else "—",
                     "anchor": cell(a)})
    if not rows:
        return ""
    table = markdown_table(rows, [("task", "task"), ("expert", "deployed expert"),
                                  ("teacher", "image foundation + its heads"),
                                  ("baseline", "strongest simple baseline"), ("anchor", "published anchor")])
    return (f"\nThe image tasks beside the published anchors (test ACC / AUC; anchor: {MEDMNIST_SOURCE}, trained 100 "
            f"epochs per task; DermaMNIST's anchor is for the original pixels, this copy's are decoded from JPEG-75, "
            f"so its row is not comparable):\n\n{table}\n")


def commits_line(result: dict, baselines: dict, baselines_name: str) -> str:
    """Whether a resumable run's invocations and its baselines ran one commit: a run resumed across sittings may
    span commits (each invocation records its own), and a code change between them mixes results."""
    invocations = result.get("invocations", [])
    commits = list(dict.fromkeys(i["git_commit"][:8] for i in invocations if i.get("git_commit")))
    unknown = sum(not i.get("git_commit") for i in invocations)
    base = (baselines.get("machine") or {}).get("git_commit")
    every = commits + ([base[:8]] if base else [])
    n = len(invocations)
    run = (f"the run's {n} invocation{'' if n == 1 else 's'} at {', '.join(commits) or 'an unrecorded commit'}"
           + (f" ({unknown} of them at an unrecorded commit)" if unknown else ""))
    both = f"{run}; `{baselines_name}` at {base[:8] if base else 'an unrecorded commit'}"
    if len(set(every)) == 1 and not unknown and base:
        return f"- One commit: {both}."
    return f"- **Not one commit**: {both}."


def model_scores(task: dict) -> dict:
    """A pipeline result's test scores per model for one task (results older than the per-model record: the three
    models they kept)."""
    return task.get("models") or {k: task.get(k) for k, _ in FULL_MODELS}


def quick_vs_full(quick: dict, full: dict) -> str:
    """What the quick profile's caps cost: every model both pipeline results scored, per task both ran on the same
    test rows, as 'quick → full'. Empty when they share no task."""
    if not quick.get("tasks") or quick["params"].get("metric") != full["params"]["metric"]:
        return ""

    shared = [task for task, t in full["tasks"].items()
              if task in quick["tasks"] and quick["tasks"][task]["test_samples"] == t["test_samples"]]
    models = [(k, label) for k, label in FULL_MODELS
              if any(model_scores(quick["tasks"][t]).get(k) is not None
                     and model_scores(full["tasks"][t]).get(k) is not None
                     for t in shared)]
    if not shared or not models:
        return ""
    rows = []
    for task in shared:
        q, f = model_scores(quick["tasks"][task]), model_scores(full["tasks"][task])
        rows.append({"task": task_label(task),
                     **{k: f"{q[k]:.3f} → {f[k]:.3f}" if q.get(k) is not None and f.get(k) is not None else "—"
                        for k, _ in models}})
    table = markdown_table(rows, [("task", "task"), *models])
    return (f"\nWhat the quick profile's caps cost (test {full['params']['metric']}, quick → full, the same test rows; "
            f"quick from `bench/results/pipeline.json`, commit {quick['machine']['git_commit'][:8]}):\n\n{table}\n")


def lorkd_goals(result: dict) -> str:
    """LoRKD's three goals per task from a pipeline result (the evaluate stage's test scores and parameter counts):
    the fused LoRKD expert >= its teacher, <= 10 % of the teacher's parameters, >= the same-size single-task student.
    Empty when the result predates the parameter counts or has no LoRKD models."""
    metric, rows = result["params"]["metric"], []
    for task, t in result["tasks"].items():
        models, sizes = model_scores(t), t.get("params", {})
        if models.get("lorkd") is None or models.get("teacher") is None or "lorkd_deployed" not in sizes:
            continue
        share = sizes["lorkd_deployed"] / sizes["teacher"]
        single = models.get("single_student")
        goals = (models["lorkd"] >= models["teacher"], share <= 0.10,
                 None if single is None else models["lorkd"] >= single)
        rows.append({"task": task_label(task), "teacher": models["teacher"], "lorkd": models["lorkd"], "single": single,
                     "params": sizes["lorkd_deployed"], "pct": 100 * share,
                     "goal": " / ".join("—" if ok is None else "yes" if ok else "**no**" for ok in goals)})
    if not rows:
        return ""
    table = markdown_table(rows, [("task", "task"), ("teacher", f"teacher {metric}"), ("lorkd", f"LoRKD expert {metric}"),
                                  ("single", f"single-task student {metric}"), ("params", "deployed params"),
                                  ("pct", "% of teacher"), ("goal", "≥ teacher / ≤ 10 % / ≥ single")])
    return f"\nLoRKD in the same run (test {metric}; its goals per task):\n\n{table}\n"


def fixed_cost_section(result: dict) -> str:
    """A skip-all run's wall time before and after the project's own Prefect server."""
    m, p = result["median_seconds"], result["params"]
    now = (f"{m['now_warm']:.1f} s with the project's server running, {m['now_cold']:.1f} s when the run has to "
           "start it")
    if result.get("before_could_run", True) and result.get("before_over_now_warm"):
        load = result["load_average_before"][0], result["load_average_after"][0]
        fails = sum(len(v) for v in result["failures"].values())
        before = (f"{m['before']:.1f} s before (commit {p['before_commit']}: Prefect's temporary server started and "
                  f"stopped by every command), {now}: {result['before_over_now_warm']:.2f}x faster with the server "
                  f"running, {result['before_over_now_cold']:.2f}x when the run starts it. 1-minute load average "
                  f"{load[0]:.1f} at the start and {load[1]:.1f} at the end (another benchmark shared the cores); "
                  f"failed runs: {fails}. The few seconds are the smaller gain: the temporary server is what timed "
                  f"out under load (the issue's failures), and the project's server is started once and reused")
    else:
        tries = result["fill_runs"]["before"]
        before = (f"{now}. No before/after ratio is claimed: the code before it (commit {p['before_commit']}) could "
                  f"not be timed, its run failed in {len(tries)} of {len(tries)} tries (`{tries[-1]['error']}`)")
    return (f"A `medexperts run` that skips every stage (tiny profile, a whole process, imports included), median of "
            f"{p['rounds']} rounds, {machine_line(result)} (`bench/results/fixed_cost.json`): {before}.\n")


def image_baselines(task: str) -> dict:
    """An image task's simple baselines (every training row: no profile caps the image tasks' rows) from
    bench/results/baselines_full.json, the file every table takes an image task's strongest baseline from; {} when
    it lacks the task. (`bench baselines` at the quick profile and `bench image_foundation` score them again on the
    same splits, in their own files; every comparison column in the README shows this one set, of one commit.)"""
    full = committed("baselines_full").get("tasks", {}).get(task)
    return full["expert_rows"] if full and full["modality"] == "image" else {}


def strongest_baseline(task: str, rows: str = "expert_rows") -> str:
    """The strongest simple baseline of ``task`` (picked on validation) and its test macro-F1, from
    ``rows``: "expert_rows" (a text task's quick-profile training rows: bench/results/baselines.json) or "all_rows"
    (the full profile: bench/results/baselines_full.json, the one-commit file, first). An image task has the same
    rows in every profile, so its baselines are always `image_baselines`' (one set in every table). "—" when no file
    has the task."""
    if image := image_baselines(task):
        return strongest_of(image)
    quick = committed("baselines").get("tasks", {}).get(task)
    full = committed("baselines_full").get("tasks", {}).get(task)
    for b in ((full, quick) if rows == "all_rows" else (quick,)):
        if b:
            return strongest_of(b.get(rows) or b["expert_rows"])
    return "—"


def _teacher_words(modality: str, kind: str, image_foundation: dict) -> str:
    """What LoRKD distilled a modality's student from, in words (the decompose result's ``teacher`` kind)."""
    if kind == "expert":
        return "each task's deployed LoRA expert (the experts stage's own training)."
    config = image_foundation.get("config")
    if modality == "image" and config:
        return (f"{config['arch']} {config.get('widths') or config.get('channels')} "
                f"({image_foundation['parameters'] / 1e6:.2f}M parameters) with its pre-training heads.")
    return "the frozen foundation with a linear probe."


def decompose_section(result: dict) -> str:
    metric = result["params"]["primary_metric"]
    rows = []
    for task, r in result["quality"]["tasks"].items():
        if task.startswith("_"):
            continue
        t = r["test"]
        rows.append({"task": task_label(task), "teacher": t["teacher"][metric], "lorkd": t["lorkd"][metric],
                     "single": t["single_student"][metric], "params": r["parameters"],
                     "teacher_params": r["teacher_parameters"], "pct": 100 * r["parameter_fraction"],
                     "baseline": strongest_baseline(task, "all_rows" if result["params"]["profile"] == "full"
                                                    else "expert_rows"),
                     "goal": " / ".join("yes" if ok else "**no**" for ok in (
                         t["lorkd"][metric] >= t["teacher"][metric], r["parameter_fraction"] <= 0.10,
                         t["lorkd"][metric] >= t["single_student"][metric]))})
    table = markdown_table(rows, [("task", "task"), ("teacher", f"teacher {metric}"), ("lorkd", f"LoRKD expert {metric}"),
                                  ("single", f"single-task student {metric}"),
                                  ("baseline", "strongest simple baseline, same split, macro-F1"),
                                  ("params", "deployed params"),
                                  ("teacher_params", "teacher params"), ("pct", "% of teacher"),
                                  ("goal", "≥ teacher / ≤ 10 % / ≥ single")])
    srows = []
    for modality, cases in result["step_cost"].items():
        fig = result["figures"][modality]
        srows.append({"modality": modality, "one": cases["one_pass"]["step_ms"], "plain": cases["plain"]["step_ms"],
                      "loop": cases["loop"]["step_ms"], "vs_plain": fig["one_pass_vs_plain"],
                      "speedup": fig["loop_vs_one_pass"], "mem": cases["one_pass"]["train_memory_mb"],
                      "teacher_mem": cases["teacher_full"]["train_memory_mb"], "switch": fig["switch_ms"]})
    stable = markdown_table(srows, [("modality", "student"), ("one", "one-pass mixed step ms"),
                                    ("plain", "(a) plain student ms"), ("loop", "(b) per-task loop ms"),
                                    ("vs_plain", "one-pass / (a)"), ("speedup", "(b) / one-pass"),
                                    ("mem", "step memory MB"), ("teacher_mem", "teacher full-FT step MB"),
                                    ("switch", "task switch ms")])
    name = result["params"].get("result", "decompose")
    kinds = {r["modality"]: r.get("teacher", "foundation") for t, r in result["quality"]["tasks"].items()
             if not t.startswith("_")}
    foundation = result["params"].get("image_foundation") or {}
    about = "".join(f" {m.capitalize()} teacher: {_teacher_words(m, kind, foundation)}"
                    for m, kind in sorted(kinds.items()))
    sets = result["params"].get("overrides") or {}
    changed = (" Params changed for this run (`--set`): " + ", ".join(f"`{k}={v}`" for k, v in sets.items()) + "."
               if sets else "")
    head = (f"Profile `{result['params']['profile']}`, {machine_line(result)}, from `bench/results/{name}.json`; test "
            f"split.{about}{changed}\n\n{table}\n") if rows else (
        f"Profile `{result['params']['profile']}` (its students), {machine_line(result)}, from "
        f"`bench/results/{name}.json`; step cost only (`--skip-quality`).\n\n")
    if not srows:
        return head
    return (head + f"Training step with {result['params']['step_tasks']} tasks (batch: "
            f"{', '.join(f'{n} {k}' for k, n in result['params']['batch'].items())}), median "
            f"over {result['params']['rounds']} alternating rounds, each case in its own process:\n\n{stable}\n")


FUSION_NAMES = {"full": "full fine-tuning", "lora": "LoRA (ΔW)", "lora_adapter": "LoRA (A, B)", "llora": "L-LoRA"}


def fusion_tables(result: dict) -> tuple[str, str, str]:
    """(all tasks merged, pairs, per task) markdown tables of bench/results/fusion.json."""
    table, methods, tasks = result["table"], result["params"]["merge_methods"], result["params"]["tasks"]
    all_key = "+".join(tasks)
    overall, pairs, per_task = [], [], []
    for variant, per in table.items():
        name = FUSION_NAMES.get(variant, variant)
        merged = result["results"][variant]["subsets"][all_key]
        # the fusion stage's own choice: the method with the best normalised validation score
        pick = max(methods, key=lambda m: merged[m]["val_normalised"])
        overall.append({"experts": name, "single": per["single_task_mean"],
                        **{m: f"{per[m]['all_tasks_normalised']:.3f} ({per[m]['all_tasks_absolute']:.3f})"
                           for m in methods},
                        "pick": f"{pick}: {merged[pick]['test_normalised']:.3f}"})
        pairs.append({"experts": name, **{m: per[m]["pairs_mean_normalised"] for m in methods}})
        single = result["results"][variant]["single_test"]
        ta = merged["task_arithmetic"]["test"]
        per_task.append({"experts": name, **{t: f"{ta[t]:.3f} / {single[t]:.3f}" for t in tasks}})
    head = [("experts", "experts"), ("single", "single-task macro-F1 (mean)")]
    t_all = markdown_table(overall, head + [(m, m) for m in methods] + [("pick", "stage's pick (by validation)")])
    t_pairs = markdown_table(pairs, [("experts", "experts")] + [(m, m) for m in methods])
    per_task.append({"experts": "strongest simple baseline (same split, all test rows)",
                     **{t: strongest_baseline(t) for t in tasks}})
    t_task = markdown_table(per_task, [("experts", "experts")] + [(t, t) for t in tasks])
    return t_all, t_pairs, t_task


def fusion_section(result: dict) -> str:
    t_all, t_pairs, t_task = fusion_tables(result)
    cost = result["merge_cost"]
    lat = result["latency_ms_per_sample"]
    p = result["paper"]
    tasks = ", ".join(result["params"]["tasks"])
    return (f"Tasks {tasks}; λ, k, p picked on validation ({result['params']['val_cap']} samples per task), scores on "
            f"test ({result['params']['test_cap']} per task); normalised = merged / the same method's single-task "
            f"expert, averaged over the merged tasks. {machine_line(result)}, "
            f"from `bench/results/fusion.json`.\n\n"
            f"All tasks merged into one model, normalised test score (mean absolute macro-F1 in brackets):\n\n{t_all}\n"
            f"Every pair of tasks merged, normalised test score averaged over the pairs:\n\n{t_pairs}\n"
            f"All tasks merged by task arithmetic, per task: merged / single-task expert test macro-F1:\n\n{t_task}\n"
            f"For orientation, {p['source']}, λ picked on test: normalised about "
            f"{p['normalised']['full']:.0%} (FFT), {p['normalised']['lora']:.0%} (LoRA), {p['normalised']['llora']:.0%} "
            f"(L-LoRA).\n\n"
            f"- Merge cost, all {cost['lora']['experts']} text experts: LoRA task vectors "
            f"{cost['lora']['task_vector_seconds']:.2f} s + task arithmetic {cost['lora']['task_arithmetic_seconds']:.3f} s "
            f"(TIES {cost['lora']['ties_seconds']:.2f} s), {cost['lora']['added_peak_mb']:.0f} MB added peak; full "
            f"fine-tuning task vectors {cost['full']['task_vector_seconds']:.2f} s + task arithmetic "
            f"{cost['full']['task_arithmetic_seconds']:.2f} s (TIES {cost['full']['ties_seconds']:.2f} s), "
            f"{cost['full']['added_peak_mb']:.0f} MB added peak for {cost['full']['task_vector_mb']:.0f} MB of task "
            f"vectors.\n"
            f"- Latency (batch 1, median of 3 alternating rounds): base {lat['base']:.2f} ms, LoRA merged into the "
            f"backbone {lat['merged']:.2f} ms ({lat['merged_vs_base']:.2f}× base), un-merged adapter "
            f"{lat['adapter']:.2f} ms ({lat['adapter_vs_base']:.2f}× base).\n")


def architecture_section(result: dict) -> str:
    rows = []
    for when in ("before", "after"):
        m = result[when]
        rows.append({"when": f"{when} ({result['params']['before_commit'] if when == 'before' else 'this commit'})",
                     "packages": m["n_packages"], "edges": m["n_edges"], "cycles": m["n_cycles"],
                     "which": "; ".join(" ⇄ ".join(c) for c in m["cycles"]) or "none",
                     "lines": sum(m["lines"].values())})
    graph = markdown_table(rows, [("when", "library"), ("packages", "packages"), ("edges", "package edges"),
                                  ("cycles", "cycles"), ("which", "cycles between"), ("lines", "lines")])
    after = result["after"]["lines"]
    lines = markdown_table([{"package": k, "lines": v} for k, v in after.items() if v],
                           [("package", "package (after)"), ("lines", "lines")])
    return f"{graph}\n{lines}\n{machine_line(result)}.\n"


TIE = 0.005  # test macro-F1: a model "≥" another by less than this is reported as a tie (one text of a few hundred)
FLAT = 0.02  # router weight: a change of D − F between the lower and upper layers below this reads as no change


def claim_reading(d: dict) -> str:
    """One task's reading of AT-MoE's layer claim from its domain-minus-function-peers weight (bench/routing.py)."""
    if d["lower"] > 0 > d["upper"]:
        return "yes"
    if abs(d["lower"] - d["upper"]) < FLAT:
        return "flat"
    return "trend only" if d["lower"] > d["upper"] else "no"


def general_lines(result: dict, goal_lines: Callable[[str, str], str]) -> str:
    """The grouped router with AT-MoE's general adapter: its goal line, the adapter alone and the λ it learned."""
    run = result["routing_runs"].get("grouped_general")
    if run is None:
        return ""
    alone = run["val_general"]
    mean_alone = sum(m["macro_f1"] for m in alone.values()) / len(alone)
    mean_routed = sum(m["macro_f1"] for m in run["val"].values()) / len(run["val"])
    return (goal_lines("grouped_general", "Grouped router + general adapter") +
            f"- The general adapter (rank {result['params']['general']['rank']}, trained first on the same mixed "
            f"training set with the experts' heads frozen) alone: validation mean macro-F1 {mean_alone:.3f}; mixed "
            f"with the routed experts {mean_routed:.3f}; the learned λ (routed share, mean over the adapted layers) "
            f"{run['lam']:.2f} from {result['params']['general']['lam_start']:.2f}.\n")


def routing_section(result: dict) -> str:
    p, test, goals = result["params"], result["test"], result["goals"]
    tasks = p["tasks"]
    models = [("oracle", "own expert (oracle)"), ("fused", f"best fused ({result['fusion']['best_method']})"),
              ("uniform", "uniform mixture"), ("flat", "flat router"), ("grouped", "grouped (function)"),
              ("grouped_domain", "grouped (domain)"), ("grouped_general", "grouped (function) + general adapter")]
    models = [(m, label) for m, label in models if m in result["test_mean_macro_f1"]]  # older results lack some
    judged = [(m, label) for m, label in (("grouped", "grouped ≥ fused"),
                                          ("grouped_general", "grouped + general ≥ fused")) if m in goals]
    rows = [{"task": task_label(t), **{m: test[t][m]["macro_f1"] for m, _ in models},
             **{f"ge_{m}": "yes" if goals[m]["ge_fused_per_task"][t] else "**no**" for m, _ in judged},
             "baseline": strongest_baseline(t)}
            for t in tasks]
    rows.append({"task": "**mean**", **{m: result["test_mean_macro_f1"][m] for m, _ in models}})
    table = markdown_table(rows, [("task", "task")] + models + [(f"ge_{m}", label) for m, label in judged]
                           + [("baseline", "strongest simple baseline (the quick profile's training rows, all test "
                                           "rows), macro-F1")])
    mean = result["test_mean_macro_f1"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    def goal_lines(name: str, label: str) -> str:
        r = goals[name]
        misses = [f"{t} {test[t][name]['macro_f1']:.3f} < {test[t]['fused']['macro_f1']:.3f}" for t in tasks
                  if not r["ge_fused_per_task"][t]]
        gap = r["oracle_gap_points"]
        ties = [f"{t} {test[t][name]['macro_f1']:.4f} vs {test[t]['fused']['macro_f1']:.4f}" for t in tasks
                if r["ge_fused_per_task"][t] and test[t][name]["macro_f1"] - test[t]["fused"]["macro_f1"] < TIE]
        tied = (f"; by less than {TIE} on {len(ties)} of {len(tasks)} tasks, a tie on this test set ("
                f"{'; '.join(ties)})" if ties else "")
        return (f"- {label} ≥ best fused on every task: {verdict(r['ge_fused_every_task'])}"
                f"{' (' + '; '.join(misses) + ')' if misses else ''}{tied}. Within 2 points of the oracle on average: "
                f"{verdict(r['within_2_points_of_oracle'])} (mean {mean[name]:.3f} vs oracle {mean['oracle']:.3f}: "
                f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'} it).\n")

    # layer analysis: domain peers minus function peers, lower vs upper half
    lrows = []
    for name, label in (("grouped", "grouped (function)"), ("grouped_domain", "grouped (domain)"), ("flat", "flat")):
        a = result["layer_analysis"].get(name)
        if not a:
            continue
        for t, rec in a["layers"].items():
            own = rec["own_expert"]
            low = [own[i] for i in sorted(own, key=int)[:len(own) // 2]]
            up = [own[i] for i in sorted(own, key=int)[len(own) // 2:]]
            d = rec.get("domain_minus_function")
            grp = rec["groups"]["domain" if name == "grouped_domain" else "function"]
            lrows.append({"router": label, "task": task_label(t), "own_low": sum(low) / len(low),
                          "own_up": sum(up) / len(up),
                          "top": f"{grp['top_lower']} ({grp['lower'][grp['top_lower']]:.2f}) → "
                                 f"{grp['top_upper']} ({grp['upper'][grp['top_upper']]:.2f})",
                          "dlow": d["lower"] if d else None, "dup": d["upper"] if d else None,
                          "holds": claim_reading(d) if d else "—"})
    ltable = markdown_table(lrows, [("router", "router"), ("task", "task"), ("own_low", "own expert, layers 0–2"),
                                    ("own_up", "own expert, layers 3–5"),
                                    ("top", "top group layers 0–2 → 3–5 (its grouping)"),
                                    ("dlow", "D − F, layers 0–2"), ("dup", "D − F, layers 3–5"),
                                    ("holds", "claim holds")])
    spread = []
    for name, label in (("grouped", "grouped (function)"), ("grouped_domain", "grouped (domain)"), ("flat", "flat")):
        run = result["routing_runs"].get(name)
        if run:
            ws = [x for per_task in run["weights"].values() for w in per_task.values() for x in w]
            e = len(run["experts"])
            spread.append(f"{label} mean |w − 1/{e}| {sum(abs(x - 1 / e) for x in ws) / len(ws):.3f}, "
                          f"weights {min(ws):.2f}–{max(ws):.2f}")
    counts = []
    for name, label in (("grouped", "grouped (function)"), ("grouped_domain", "grouped (domain)"), ("flat", "flat")):
        a = result["layer_analysis"].get(name)
        readings = [claim_reading(r["domain_minus_function"]) for r in (a or {}).get("layers", {}).values()
                    if "domain_minus_function" in r]
        if readings:
            shift = max(abs(r["domain_minus_function"]["lower"] - r["domain_minus_function"]["upper"])
                        for r in a["layers"].values() if "domain_minus_function" in r)
            n = len(readings)
            counts.append(f"{label}: holds {readings.count('yes')}/{n} tasks, weaker trend "
                          f"{readings.count('trend only')}/{n}, flat {readings.count('flat')}/{n} "
                          f"(largest change of D − F between the halves {shift:.3f})")
    claim = "; ".join(counts) or "no task has domain peers that differ from its function peers"

    held = result["held_out"]
    if "skipped" in held:
        held_text = f"Held-out task: skipped ({held['skipped']}).\n"
    else:
        hrows = [{"features": {"routed_grouped": "routed (grouped router over the other experts)",
                               "routed_uniform": "uniform mixture of the other experts",
                               "foundation": "frozen foundation"}.get(k, k.replace("expert:", "single expert: ")),
                  "val": r["val"]["macro_f1"], "test": r["test"]["macro_f1"], "acc": r["test"]["accuracy"]}
                 for k, r in held["heads"].items()]
        htable = markdown_table(hrows, [("features", "new head on"), ("val", "val macro-F1"),
                                        ("test", "test macro-F1"), ("acc", "test accuracy")])
        h = held["heads"]
        best = held["best_single_by_val"]
        diff = h["routed_grouped"]["test"]["macro_f1"] - h[best]["test"]["macro_f1"]
        beats = ("a tie" if abs(diff) < 0.005 else "**yes**" if diff > 0 else "**no**") + f" ({100 * diff:+.3f} points)"
        held_text = (
            f"Held-out task **{held['task']}**: router trained on {', '.join(held['routed_over'])} only (grouped, "
            f"function grouping); on {held['task']} only a new linear head is fitted ({held['train_samples']} "
            f"training texts, L2 by validation), test {held['test_samples']} texts.\n\n{htable}\n"
            f"- Routing beats the best single expert (picked on validation: {best.replace('expert:', '')}, test "
            f"{h[best]['test']['macro_f1']:.3f}): {beats}, routed {h['routed_grouped']['test']['macro_f1']:.3f}. "
            f"Versus the frozen foundation: "
            f"{'better' if held['routed_beats_foundation'] else 'not better'}. For reference, an expert trained on "
            f"{held['task']} itself: {held['own_expert_test']['macro_f1']:.3f}.\n")

    crows = []
    cpu = result["cost"]["cpu"]
    for name, label in (("routed_general", "routed (grouped + general adapter: the default)"),
                        ("routed", "routed (grouped, all experts)"), ("merged", "merged (best fused)"),
                        ("expert", "single expert (deployed)")):
        if name not in cpu["memory"]:  # results from before the general adapter
            continue
        mem = cpu["memory"][name]
        crows.append({"model": label, "b1": round(cpu["latency"]["batch_1"][name]["ms_per_batch"]),
                      "b64": round(cpu["latency"]["batch_64"][name]["ms_per_batch"]),
                      "b64s": cpu["latency"]["batch_64"][name]["ms_per_sample"], "w": round(mem["weights_mb"]),
                      "load": round(mem["load_added_mb"]), "m1": round(mem["batch_1"]["added_mb"]),
                      "m64": round(mem["batch_64"]["added_mb"])})
    ctable = markdown_table(crows, [("model", "model"), ("b1", "batch 1 ms"), ("b64", "batch 64 ms"),
                                    ("b64s", "batch 64 ms/sample"), ("w", "weights + buffers MB"),
                                    ("load", "load + RSS MB"), ("m1", "batch-1 forward + MB"),
                                    ("m64", "batch-64 forward + MB")])
    lat = cpu["latency"]
    routed = "routed_general" if "routed_general" in lat["batch_1"] else "routed"  # the stage's default
    ratio1 = lat["batch_1"][routed]["ms_per_batch"] / lat["batch_1"]["merged"]["ms_per_batch"]
    ratio64 = lat["batch_64"][routed]["ms_per_batch"] / lat["batch_64"]["merged"]["ms_per_batch"]
    gpu = ("" if "cuda" in result["cost"] else " No GPU was lent to this run, so CPU only.")
    reused = [t for t, e in result["experts"].items() if not e["trained_here"]]
    experts_note = (f"{'all' if len(reused) == len(tasks) else ', '.join(reused)} reused from the work folder "
                    f"(trained there earlier, {sum(result['experts'][t]['train_seconds'] for t in reused) / 60:.0f} "
                    f"min of training, not in the wall time)" if reused else "trained in this run")
    la = result.get("load_average")
    load = (f", with other jobs on the same 2 cores: 1-minute load average {la['start']:.1f} at the start, "
            f"{la['end']:.1f} at the end" if la and max(la.values()) > 2.5 else "")
    groupings = {name: "; ".join(f"{g}: {', '.join(m)}" for g, m in gs.items())
                 for name, gs in p["groupings"].items()}
    return (
        f"Text tasks {', '.join(tasks)}, profile `{p['profile']}`, {machine_line(result)}, from "
        f"`bench/results/routing.json` (wall time {result['wall_seconds'] / 60:.0f} min{load}). One LoRA expert per "
        f"task (the experts stage: {p['expert_train_cap']} training texts per task, {p['expert_epochs']} epochs, "
        f"{p['max_length']} tokens), frozen; {experts_note}. Capped for 2 CPU cores: routers trained on "
        f"{p['router_train_cap']} texts per task (mixed) for {p['router_epochs']} epochs, validation {p['val_cap']} "
        f"per task (fusion search, router monitoring, weights), test ≤ {p['test_cap']} per task (the same rows for "
        f"every model). Test macro-F1:\n\n"
        f"{table}\n"
        f"Groupings: function (the default in `params/routing.yaml`) = {groupings['function']}; domain = "
        f"{groupings['domain']} (see `bench/routing.py` for why).\n\n"
        f"{goal_lines('grouped', 'Grouped router (function grouping)')}"
        f"{goal_lines('grouped_domain', 'Grouped router (domain grouping)')}"
        f"{general_lines(result, goal_lines)}"
        f"- Fused: the fusion stage's best method by validation, `{result['fusion']['best_method']}` "
        f"({', '.join(f'{k} {v:g}' for k, v in result['fusion']['coefficients'].items())}).\n\n"
        f"Router weights per layer (validation mean; the 12 adapted query/value layers averaged into MiniLM's 6). "
        f"D − F = the weight on the task's domain peers minus its function peers (its own expert is in both groups "
        f"and cancels; only tasks whose peers differ). The paper's claim, lower layers prefer domain experts and upper "
        f"layers function experts, means D − F > 0 in layers 0–2 and < 0 in 3–5 (*yes*); *trend only*: D − F falls by "
        f"at least {FLAT:.2f} from the lower to the upper half without changing sign; *flat*: it changes by less than "
        f"{FLAT:.2f}:\n\n{ltable}\n"
        f"- How far the routers moved from the uniform mixture (every weight, task and adapted layer): "
        f"{'; '.join(spread)}.\n"
        f"- The claim, counted per task: {claim}. Heatmaps (layer × group, per task and grouping) are written to "
        f"the work folder, `routing-bench/plots/`.\n\n"
        f"{held_text}\n"
        f"Latency (median of {result['cost']['rounds']} rounds in which the models alternate; {result['cost']['task']} "
        f"texts at {p['max_length']} tokens) and memory (each model in a fresh process: RSS its load and one forward "
        f"add), CPU:\n\n{ctable}\n"
        f"- The routed model{' (the default, with the general adapter)' if routed == 'routed_general' else ''} costs "
        f"{ratio1:.2f}× the merged model at batch 1 and {ratio64:.2f}× at batch 64: it runs "
        f"the frozen foundation once more for the router input, and every adapted layer adds all experts' LoRA "
        f"products; the merged model and a deployed expert are plain MiniLM.{gpu}\n"
    )


FEDERATED_MODELS = (("no_injection", "no injection (server data only)"), ("local_only", "local-only (mean of clients)"),
                    ("fedavg", "FedAvg client model"), ("fedkim", "FedKIM (injected)"),
                    ("centralized", "centralized client model (pooled)"))
# bench federated also injects the pooled client model (FedKIM's centralized upper bound)
FEDKIM_CENTRALIZED = ("fedkim_centralized", "FedKIM on the pooled client model (centralized)")


def federated_seeds_section(result: dict) -> str:
    """``bench federated_seeds``: each model's test macro-F1 over seeds (mean ± sd) and FedKIM's paired gaps."""
    p = result["params"]
    seeds = ", ".join(map(str, p["seeds"]))
    # FedKIM on the pooled client model: in results written since commit da23798
    models = FEDERATED_MODELS + ((FEDKIM_CENTRALIZED,) if FEDKIM_CENTRALIZED[0] in p["models"] else ())

    def ms(x: dict) -> str:
        return f"{x['mean']:.3f} ± {x['sd']:.3f}"

    text = []
    for partition in p["partitions"]:
        r = result["partitions"][partition]
        name = "IID" if partition == "iid" else f"Dirichlet α = {r['params']['alpha']:g}"
        rows = []
        for t in r["client_tasks"]:
            m, d = r["models"][t], r["fedkim_minus"][t]
            rows.append({"task": task_label(t), "majority": ms(m["majority_class"]["macro_f1"]),
                         **{k: ms(m[k]["macro_f1"]) for k, _ in models},
                         **{f"d_{o}": f"{d[o]['macro_f1']['mean']:+.3f} ± {d[o]['macro_f1']['sd']:.3f} "
                                      f"({d[o]['macro_f1']['seeds_ahead']}/{len(p['seeds'])})"
                            for o in ("no_injection", "local_only")},
                         "auc": f"{d['no_injection']['auroc']['mean']:+.3f} "
                                f"({d['no_injection']['auroc']['seeds_ahead']}/{len(p['seeds'])})"})
        table = markdown_table(rows, [("task", "task"), ("majority", "majority class")] + list(models)
                               + [("d_no_injection", "FedKIM − no injection (seeds ahead)"),
                                  ("d_local_only", "FedKIM − local-only (seeds ahead)"),
                                  ("auc", "FedKIM − no injection, AUROC (seeds ahead)")])
        g, a = r["goals"]["macro_f1"], r["goals"]["auroc"]
        held = "; ".join(f"{t} {h['macro_f1']['mean']:+.3f} ± {h['macro_f1']['sd']:.3f}"
                         for t, h in r["held_out_gain"].items())

        def verdict(ok: bool) -> str:
            return "**met**" if ok else "**missed**"

        def misses(goal: dict, key: str) -> str:
            bad = [t for t, ok in goal[key].items() if not ok]
            return f" (not on {', '.join(bad)})" if bad else ""

        text.append(
            f"**{name}**, test macro-F1, mean ± sd over the seeds:\n\n{table}\n"
            f"- FedKIM beats no injection on every client task, on the seed means: macro-F1 "
            f"{verdict(g['fedkim_beats_no_injection_every_task_on_the_mean'])}"
            f"{misses(g, 'fedkim_beats_no_injection_on_the_mean')}, AUROC "
            f"{verdict(a['fedkim_beats_no_injection_every_task_on_the_mean'])}"
            f"{misses(a, 'fedkim_beats_no_injection_on_the_mean')}; on every task within one seed: "
            f"{g['seeds_where_fedkim_beats_no_injection_every_task']} of {len(p['seeds'])} seeds (macro-F1), "
            f"{a['seeds_where_fedkim_beats_no_injection_every_task']} (AUROC).\n"
            f"- FedKIM beats local-only on every client task, on the seed means: macro-F1 "
            f"{verdict(g['fedkim_beats_local_only_every_task_on_the_mean'])}"
            f"{misses(g, 'fedkim_beats_local_only_on_the_mean')}, AUROC "
            f"{verdict(a['fedkim_beats_local_only_every_task_on_the_mean'])}"
            f"{misses(a, 'fedkim_beats_local_only_on_the_mean')}.\n"
            f"- Held-out task, injected − not injected (macro-F1, mean ± sd): {held}: "
            f"{verdict(g['held_out_injected_beats_not_injected_on_average'])} (AUROC mean gain "
            f"{a['held_out_mean_gain']:+.3f}).\n")
    return (f"Seeds {seeds} (`pipeline.seed`: the text tasks' splits where the dataset has none, the client shards, "
            f"the server's split, every initialisation, the {p['test_cap']} test rows per task), {machine_line(result)}"
            f", from `bench/results/federated_seeds.json` (wall time {result['wall_seconds'] / 60:.0f} min). Each seed "
            f"is one `bench federated` run with its defaults; the differences are paired (the same seed's rows and "
            f"shards), \"seeds ahead\" counts the seeds where FedKIM scored higher.\n\n" + "\n".join(text))


def _client_encoders(result: dict[str, Any]) -> str:
    """The clients' encoders of a federated result: its recorded settings, or the defaults of its commit, named."""
    client = next(iter(result["partitions"].values()))["params"].get("client")
    if client is None:  # recorded since the ngram encoder became the default; the runs before used the BERT layer
        return "client text encoder: the foundation's layer 0 with a rank-32 word table"
    if client["text_encoder"] == "ngram":
        return (f"client text encoder: fastText (tokens and hashed {client['ngram_n']}-grams, "
                f"{client['ngram_buckets']} buckets, width {client['ngram_dim']}; local rate {client['text_lr']})")
    return (f"client text encoder: the foundation's layer(s) {client['text_layers']} with a rank-"
            f"{client['embedding_rank']} word table")


def _client_heads(injection: dict[str, Any]) -> str:
    """How the injected heads read the clients (recorded since ``injection.client_heads``; before: tokens only)."""
    return "; its heads also read the aggregated client heads' log-probabilities" \
        if injection.get("client_heads") else ""


def federated_section(result: dict) -> str:
    p = result["params"]
    parts = {k: result["partitions"][k] for k in p["partitions"]}  # the run's order (the JSON's keys are sorted)

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    def cell(m: dict) -> str:
        return f"{m['macro_f1']:.3f} / {m['auroc']:.3f}"

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    def name(partition: str) -> str:
        r = parts[partition]["params"]
        return "IID" if partition == "iid" else f"Dirichlet α = {r['alpha']:g}"

    models = FEDERATED_MODELS + (FEDKIM_CENTRALIZED,)
    text = []
    for partition, r in parts.items():
        rows = []
        for t in r["client_tasks"]:
            row = r["table"][t]
            f1s = [c["macro_f1"] for c in row["local_only_per_client"]]
            rows.append({"task": task_label(t), "majority": cell(r["majority_class_test"][t]),
                         **{m: cell(row[m]) for m, _ in models},
                         "range": f"{min(f1s):.3f}–{max(f1s):.3f}", "baseline": strongest_baseline(t),
                         "client_gap": row["centralized"]["macro_f1"] - row["fedavg"]["macro_f1"],
                         "gap": row["fedkim_centralized"]["macro_f1"] - row["fedkim"]["macro_f1"]})
        table = markdown_table(rows, [("task", "task"), ("majority", "majority class")] + list(models)
                               + [("range", "local-only macro-F1, client range"),
                                  ("client_gap", "pooled − FedAvg client model (macro-F1)"),
                                  ("gap", "FedKIM: pooled − federated (macro-F1)"),
                                  ("baseline", "strongest simple baseline, pooled (the quick profile's training "
                                               "rows, all test rows), macro-F1")])
        g = r["goals"]

        def misses(key: str, other: str) -> str:
            bad = [f"{t} {r['table'][t]['fedkim']['macro_f1']:.3f} vs {r['table'][t][other]['macro_f1']:.3f}"
                   for t, ok in g[key].items() if not ok]
            return f" (not on {'; '.join(bad)})" if bad else ""

        shards = [{"client": f"client_{i}",
                   **{t: f"{n} ({'/'.join(map(str, r['client_shards']['label_counts'][i][t]))})" for t, n in s.items()}}
                  for i, s in enumerate(r["client_shards"]["rows"])]
        stable = markdown_table(shards, [("client", "client")] + [(t, t) for t in r["client_tasks"]])
        held = [f"{t} {cell(h['fedkim'])} vs {cell(h['no_injection'])}" for t, h in r["held_out_test"].items()]
        a = g["by_auroc"]

        def auc_misses(key: str, other: str) -> str:
            bad = [f"{t} {r['table'][t]['fedkim']['auroc']:.3f} vs {r['table'][t][other]['auroc']:.3f}"
                   for t, ok in a[key].items() if not ok]
            return f" (not on {'; '.join(bad)})" if bad else ""

        text.append(
            f"**{name(partition)}**. Training rows per client and task (rows per class):\n\n{stable}\n"
            f"Test macro-F1 / AUROC:\n\n{table}\n"
            f"- FedKIM beats no injection on every client task, macro-F1 (the goal's metric): "
            f"{verdict(g['fedkim_beats_no_injection_every_task'])}{misses('fedkim_beats_no_injection', 'no_injection')}"
            f". On AUROC: {verdict(a['fedkim_beats_no_injection_every_task'])}"
            f"{auc_misses('fedkim_beats_no_injection', 'no_injection')}.\n"
            f"- FedKIM beats local-only on every client task, macro-F1: "
            f"{verdict(g['fedkim_beats_local_only_every_task'])}{misses('fedkim_beats_local_only', 'local_only')}. "
            f"On AUROC: {verdict(a['fedkim_beats_local_only_every_task'])}"
            f"{auc_misses('fedkim_beats_local_only', 'local_only')}.\n"
            f"- {'Held-out tasks' if len(held) > 1 else 'Held-out task'} ({'; '.join(held)}, injected vs not, "
            f"macro-F1 / AUROC): injected better on average, "
            f"macro-F1: {verdict(g['held_out_injected_beats_not_injected_on_average'])} (mean gain "
            f"{g['held_out_mean_gain']:+.3f}); AUROC: {verdict(a['held_out_injected_beats_not_injected_on_average'])} "
            f"(mean gain {a['held_out_mean_gain']:+.3f}).\n"
            f"- Gap to centralized (FedKIM on the pooled client model − FedKIM, macro-F1): "
            f"{', '.join(f'{t} {v:+.3f}' for t, v in g['gap_to_centralized'].items())}; mean "
            f"{g['mean_gap_to_centralized']:+.3f}; on AUROC, mean {a['mean_gap_to_centralized']:+.3f} (positive: "
            f"pooling the clients' rows would have given a better injected foundation). At the client level "
            f"(pooled − FedAvg client model): mean {g['mean_client_gap_to_centralized']:+.3f} macro-F1, "
            f"{a['mean_client_gap_to_centralized']:+.3f} AUROC.\n")

    crows = []
    for partition, r in parts.items():
        c = r["timing"]
        n = len(c["rounds"])
        tot = c["total_seconds"]
        crows.append({"partition": name(partition), "clients": tot["clients"] / n, "aggregate": tot["aggregate"] / n,
                      "evaluate": tot["evaluate"] / n, "overhead": tot["overhead"] / n,
                      "share": 100 * c["overhead_vs_client_compute"],
                      "down": c["bytes_down_per_round_per_client"] / 2**20,
                      "up": c["bytes_up_per_round_per_client"] / 2**20})
    ctable = markdown_table(crows, [("partition", "partition"), ("clients", "client compute s / round"),
                                    ("aggregate", "FedAvg s / round"), ("evaluate", "validation s / round"),
                                    ("overhead", "engine overhead s / round"),
                                    ("share", "overhead % of client compute"),
                                    ("down", "MiB to each client / round"), ("up", "MiB from each client / round")])
    overhead_ok = all(r["goals"]["overhead_below_20_percent"] for r in parts.values())
    shares = ", ".join(f"{name(k)} {100 * r['timing']['overhead_vs_client_compute']:.1f} %" for k, r in parts.items())
    first = next(iter(parts.values()))["params"]
    inj = first["injection"]
    runs = "both partitions" if len(parts) == 2 else plural(len(parts), "partition")
    server = ", ".join(f"{t} {n}" for t, n in first["server_train_samples"].items())
    return (
        f"Tasks {', '.join(p['tasks'])}, {first['num_clients']} clients, profile `{p['profile']}`, "
        f"{machine_line(result)}, from `bench/results/federated.json` (wall time {result['wall_seconds'] / 60:.0f} "
        f"min for {runs}). The federated stage's own run (`components.stages.federated.run`), "
        f"{plural(len(p['held_out']), 'held-out task')} ({', '.join(p['held_out'])}). "
        f"Settings (`medexperts bench federated --help`): "
        f"{plural(first['rounds'], 'round')} × "
        f"{plural(first['local_epochs'], 'local epoch')}, at most {first['client_max_train_samples']} training rows "
        f"per client and task; {_client_encoders(result)}; the server trains the injection "
        f"({inj['num_experts']} experts of rank {inj['rank']}, "
        f"{plural(inj['trainer']['max_epochs'], 'epoch')}{_client_heads(inj)}) on at most "
        f"{inj['trainer']['max_train_samples']} rows per "
        f"task out of {100 * first['server_fraction']:.0f} % of each validation split ({server}); held-out head on "
        f"{first['held_out_shots']} training rows; test ≤ {p['test_cap']} rows per task (the same rows for every "
        f"model); {first['max_length']} tokens; every loss class-balanced (`class_weight: "
        f"{first.get('client_class_weight', inj['trainer'].get('class_weight', 'none'))}`). "
        f"Local-only and the centralized client model train the same initial client model with the same schedule "
        f"(rounds × local epochs) on one shard (each client's own, or all pooled); the pooled client model is then "
        f"injected by the stage's own server step (the same server rows and settings) for FedKIM's upper bound. "
        f"The foundation is a text model: on an image task the no-injection model reads only the task's "
        f"description, the same for every image, so it can only answer one class (the *majority class* column; "
        f"AUROC 0.5); FedKIM adds the aggregated client image encoder's feature as an extra token.\n\n"
        + "\n".join(text) +
        f"\nRound cost (mean per round; the engine runs the clients one after another in one process):\n\n{ctable}\n"
        f"- Engine overhead (payload copies, screening) below 20 % of client compute: {verdict(overhead_ok)} "
        f"({shares}). *Validation* is the stage's per-round scoring of the aggregate on the server's validation rows.\n"
    )


def fedkim_variants_section(result: dict, name: str = "fedkim_variants") -> str:
    """FedKIM's server step varied on one federation (bench/results/NAME.json, and the other partition's run beside
    it when bench/results/NAME_dirichlet.json exists): test macro-F1 per task, and the validation macro-F1 of the
    text task the stage's epoch choice reads."""
    runs = [result]
    other = committed(f"{name}_dirichlet")
    if other and result["params"]["partition"] != "dirichlet":
        runs.append(other)
    tasks = result["params"]["tasks"]
    text = "medical_abstracts" if "medical_abstracts" in tasks else tasks[-1]  # the text task the README discusses
    columns, rows = [("variant", "server step")], {}
    for run in runs:
        part = run["params"]["partition"]
        columns += [(f"{part}:{t}", f"{part}: {t}") for t in tasks] + [(f"{part}:val", f"{part}: {text} val")]
        for variant, v in run["variants"].items():
            row = rows.setdefault(variant, {"variant": variant})
            row |= {f"{part}:{t}": v["test"][t]["macro_f1"] for t in tasks}
            row[f"{part}:val"] = v["val"][text]["macro_f1"]
    p = result["params"]
    files = f"`bench/results/{name}.json`" + (f" and `{name}_dirichlet.json`" if len(runs) > 1 else "")
    commits = sorted({r["machine"]["git_commit"][:8] for r in runs[1:]} - {result["machine"]["git_commit"][:8]})
    if commits:  # the other partition measured at another commit: say so
        files += f" (the Dirichlet run at commit {', '.join(commits)})"
    # the bench writes --result (default fedkim_variants) whatever the partition: the Dirichlet run names its own
    command = f"`medexperts bench fedkim_variants{'' if name == 'fedkim_variants' else f' --result {name}'}`" + (
        f" and `... --partition dirichlet --result {name}_dirichlet`" if len(runs) > 1 else "")
    return (f"Profile `{p['profile']}`, {machine_line(result)}, from {files} ({command}, variants as named). One "
            f"federation per partition, the server step "
            f"re-run in each variant on the same aggregated clients and server rows ({p['server_train_rows'][text]} "
            f"training, {p['server_val_rows'][text]} validation rows of {text}); test macro-F1 on the whole test "
            f"split ({', '.join(f'{t} {n}' for t, n in p['test_rows'].items())} rows); one seed.\n\n"
            f"{markdown_table([rows[n] for n in sorted(rows, key=_variant_order)], columns)}\n")


def _variant_order(name: str) -> tuple[int, str, float]:
    """The baseline and the stage first, then the untrained variants, then the trained ones (a number at the end of
    a name in numeric order: preserve_3 before preserve_10)."""
    first = ["no_injection", "fedavg", "stage", "stage_no_client_heads", "untrained_plain_heads",
             "untrained_own_probe", "untrained_probe_no_client_heads", "untrained_probe_client_heads"]
    if name in first:
        return first.index(name), name, 0.0
    stem, _, number = name.rpartition("_")
    return (len(first), stem, float(number)) if stem and number.isdigit() else (len(first), name, 0.0)


def fanout_section(result: dict) -> str:
    """The fan-out stages in one process vs on a Dask LocalCluster."""
    m, p = result["median_seconds"], result["params"]
    failed = {k: len(v) for k, v in result["failures"].items() if v}
    if failed or not result.get("local_over_dask"):
        return (f"Fan-out timing ({p['profile']} profile): a variant failed ({failed}); no figure "
                "(`bench/results/fanout.json`).\n")
    ratio = result["local_over_dask"]
    verdict = f"{ratio:.2f}x faster on the cluster" if ratio >= 1 else f"{1 / ratio:.2f}x slower on the cluster"
    return (f"The experts, decompose and federated stages of the {p['profile']} profile (a whole `medexperts run "
            f"--stage ... --force` process, median of {p['rounds']}), {machine_line(result)} "
            f"(`bench/results/fanout.json`): {m['local'] / 60:.1f} min in one process, {m['dask'] / 60:.1f} min on a "
            f"{p['workers']}-worker LocalCluster (one thread each, the cluster's start included): {verdict}. The "
            f"experts' validation metrics of the two runs differ by at most {result['max_abs_val_metric_difference']:.3g}"
            " (CPU sums depend on the thread count).\n")


def wall_time_section(result: dict) -> str:
    """Wall time per profile, stage compute and the pipeline's own overhead."""
    rows = ["| profile | wall time | stages' compute | pipeline overhead |", "|---|---|---|---|"]
    for name, r in result["profiles"].items():
        if "error" in r:
            rows.append(f"| {name} | failed after {r['wall_seconds'] / 60:.1f} min | | `{r['error']}` |")
        else:
            rows.append(f"| {name} | {r['wall_seconds'] / 60:.1f} min | {r['compute_seconds'] / 60:.1f} min | "
                        f"{r['overhead_seconds']:.0f} s ({100 * r['overhead_over_compute']:.1f} % of compute) |")
    return (f"A whole `medexperts run --profile P` on an empty project state (every stage runs; the project's Prefect "
            f"server started by the run), {machine_line(result)} (`bench/results/wall_time.json`); overhead = wall "
            f"time minus the stages' own compute (start-up, Prefect, MLflow logging, registration):\n\n"
            + "\n".join(rows) + "\n")


def full_profile_cross_checks(result: dict) -> list[str]:
    """The full estimate's image loops beside the real full-settings image runs other benchmarks recorded (other
    days and commits: bench/results/{image_foundation,experts_full_image,decompose_full_image}.json)."""
    profile = result["profiles"][result["params"]["profile"]]
    stages = profile["stages"]

    def est(stage: str, prefix: str) -> float:
        return sum(loop["seconds"] for loop in stages[stage]["loops"] if loop["cost"].startswith(prefix))

    image_train = sum(t["train"] for t in profile["sizes"].values() if t["modality"] == "image")

    def epochs(cost: str) -> float:  # the full profile's epochs of the loops of one cost, from their samples
        return sum(loop["samples"] for st in stages.values() for loop in st["loops"] if loop["cost"] == cost) / image_train

    lines = []
    if f := committed("image_foundation"):
        real, n = f["archs"]["resnet18"]["train_seconds"] / f["params"]["epochs"], epochs("image_pretrain_train")
        lines.append(f"ResNet-18 pre-training: {real / 60:.1f} min per epoch in `image_foundation.json` (commit "
                     f"{f['machine']['git_commit'][:8]}), so {n * real / 60:.0f} min for the profile's {n:.0f}; "
                     f"estimated here {est('foundation', 'image') / 60:.0f} min")
    if e := committed("experts_full_image"):
        ran, n = e["params"]["overrides"].get("experts.trainer.image.max_epochs"), epochs("image_lora_train")
        real = sum(r["train_seconds"] for r in e["runs"] if r["modality"] == "image") / ran
        lines.append(f"image LoRA experts: {real * ran / 60:.0f} min for {ran} epochs in `experts_full_image.json` "
                     f"(commit {e['machine']['git_commit'][:8]}), so {real * n / 60:.0f} min for the profile's "
                     f"{n:.0f}; estimated here {est('experts', 'image') / 60:.0f} min")
    if d := committed("decompose_full_image"):
        lines.append(f"image LoRKD (the full profile's students and epochs): {d['quality']['decompose_seconds'] / 60:.0f}"
                     f" min in `decompose_full_image.json` (commit {d['machine']['git_commit'][:8]}); estimated here "
                     f"{est('decompose', 'image') / 60:.0f} min")
    return lines


def full_profile_time_section(result: dict) -> str:
    """The full profile's expected time: per-stage estimates from measured per-sample costs, checked on a quick run."""
    full, check = result["params"]["profile"], result["params"]["check"]
    est, run = result["estimate"], result["check_run"]
    target, quick = result["profiles"][full], result["profiles"][check]
    rows = [f"| stage | {check}: measured | {check}: estimated | measured / estimated | {full}: estimated | "
            f"{full}: calibrated |", "|---|---:|---:|---:|---:|---:|"]
    for stage, cal in est["calibrated_stage_seconds"].items():
        ratio = result["ratio_measured_over_raw"].get(stage)
        real = run["stage_compute_seconds"].get(stage)
        rows.append(f"| {stage} | {real / 60:.1f} min | {quick['stages'][stage]['seconds'] / 60:.1f} min | "
                    + (f"{ratio:.2f} | " if ratio else "measured | ")
                    + f"{target['stages'][stage]['seconds'] / 60:.0f} min | {cal / 60:.0f} min |")
    loops = sorted(((stage, loop) for stage, s in target["stages"].items() for loop in s["loops"]),
                   key=lambda x: -x[1]["seconds"])[:4]
    top = "; ".join(f"{stage}, {loop['what']} ({loop['samples']:,.0f} samples, {loop['seconds'] / 3600:.1f} h)"
                    for stage, loop in loops)
    return (f"{machine_line(result)}, from `bench/results/full_profile_time.json`: the `{full}` profile's time "
            f"estimated from per-sample costs measured with the project's own models at its settings, times the "
            f"samples each stage's loops run (rows x epochs, validation passes, the fusion grid, ...); the same "
            f"estimator on the `{check}` profile beside a real `{check}` run (stages' compute "
            f"{run['compute_seconds'] / 60:.1f} min, estimated {quick['raw_seconds'] / 60:.1f} min) gives each "
            f"stage's measured / estimated ratio, which calibrates the `{full}` estimate:\n\n" + "\n".join(rows)
            + f"\n\n**Expected `{full}` profile on this machine: {est['calibrated_wall_seconds'] / 3600:.1f} h** "
            f"(uncalibrated {est['raw_wall_seconds'] / 3600:.1f} h; an upper bound for the experts, whose early "
            f"stopping can end a task before its last epoch). The largest loops (uncalibrated): {top}.\n"
            + "".join(f"\n- Cross-check, {line}." for line in full_profile_cross_checks(result)) + "\n")


def text_padding_section(result: dict) -> str:
    rows = [{"task": task_label(t), "width": f"{v['median_width']:g} of {v['max_length']}",
             "padded": v["padded_s_per_sample"] * 1e3, "trimmed": v["trimmed_s_per_sample"] * 1e3,
             "speedup": v["speedup"], "total": v["speedup_total"], "gap": f"{v['max_abs_feature_gap']:.1e}",
             **({"inf_padded": v["inference"]["s_per_sample"]["padded"] * 1e3,
                 "inf_order": v["inference"]["s_per_sample"]["trimmed_in_order"] * 1e3,
                 "inf_sorted": v["inference"]["s_per_sample"]["batched_by_length"] * 1e3,
                 "inf_speedup": v["inference"]["speedup_batched_by_length"]} if "inference" in v else {})}
            for t, v in result["figures"].items()]
    inference = [r for r in rows if "inf_padded" in r]
    table = markdown_table(rows, [("task", "task"), ("width", "batch width, tokens (median)"),
                                  ("padded", "padded: ms/sample"), ("trimmed", "trimmed: ms/sample"),
                                  ("speedup", "padded / trimmed (medians)"),
                                  ("total", "padded / trimmed (all steps' time)"), ("gap", "max feature difference")])
    v = next(iter(result["figures"].values()))
    if inference:
        inf = v["inference"]
        table += ("\n" + f"Inference (no grad) over {inf['rows']} training rows per task in batches of "
                  f"{inf['batch_size']}, median of {inf['repeats']} passes each:\n\n" + markdown_table(
                      inference, [("task", "task"), ("inf_padded", "padded: ms/sample"),
                                  ("inf_order", "cut, rows in order: ms/sample"),
                                  ("inf_sorted", "`batched`, shortest first: ms/sample"),
                                  ("inf_speedup", "padded / `batched`")]))
    return (f"A LoRA expert's training step (the experts stage's LoRA on MiniLM, batches of {v['batch_size']}, profile "
            f"`{result['params']['profile']}`: texts tokenised to {v['max_length']}), median of "
            f"{result['params']['batches']} alternating steps per path, {machine_line(result)}, from "
            f"`bench/results/text_padding.json`:\n\n{table}\n")


def length_grouping_section(result: dict) -> str:
    rows = []
    for task, v in result["figures"].items():
        a = v["arms"]
        rows.append({"task": task_label(task), "samples": v["train_samples"],
                     "random_s": a["random"]["train_seconds_median"], "grouped_s": a["grouped"]["train_seconds_median"],
                     "speedup": v["speedup"],
                     **{f"{arm}_{m}": f"{a[arm][f'test_{m}_mean']:.3f} ± {a[arm][f'test_{m}_sd']:.3f}"
                        for arm in ("random", "grouped") for m in ("macro_f1", "auroc")}})
    table = markdown_table(rows, [("task", "task"), ("samples", "training rows"), ("random_s", "random batches: s"),
                                  ("grouped_s", "grouped: s"), ("speedup", "random / grouped"),
                                  ("random_macro_f1", "random: test macro-F1"),
                                  ("grouped_macro_f1", "grouped: test macro-F1"),
                                  ("random_auroc", "random: test AUROC"), ("grouped_auroc", "grouped: test AUROC")])
    p = result["params"]
    return (f"The experts stage's {p['method']} expert (`train_expert`, profile `{p['profile']}`, up to "
            f"{p['max_train_samples']} training rows), random vs "
            f"length-grouped training batches, {p['seeds']} seeds each (training seconds: median; test metrics: mean ± "
            f"sd over the seeds), {machine_line(result)}, from `bench/results/length_grouping.json`:\n\n{table}\n")


# `bench image_foundation [--epochs N] --set ... --result NAME` files, each with what its overrides do not say: the
# profile's own settings at the file's commit when they differ from the main file's (that profile's augment).
IMAGE_FOUNDATION_VARIANTS = (("image_foundation_plain", ""), ("image_foundation_plain_augment", ""),
                             ("image_foundation_e30", "the full profile at its commit: one_cycle, plain cross-entropy, "
                                                      "DermaMNIST augmented"))


def image_foundation_section(result: dict) -> str:
    """Compact CNN vs ResNet-18 foundations (their own pre-training heads) beside baselines and MedMNIST v2; a
    variant's archs (another pre-training setting, same splits) as extra columns named by their overrides."""
    archs, anchors = dict(result["archs"]), result["anchors"]["tasks"]
    variants = []
    for name, profile in IMAGE_FOUNDATION_VARIANTS:
        if v := committed(name):
            changed = [f"{'.'.join(k.split('.')[-2:]) if k.startswith('data.') else k.rsplit('.', 1)[-1]}="
                       f"{'+'.join(val) if isinstance(val, list) else val}"
                       for k, val in v["params"].get("overrides", {}).items()]
            if v["params"]["epochs"] != result["params"]["epochs"]:
                changed.append(f"epochs={v['params']['epochs']}")
            changed = ", ".join(changed + [profile] if profile else changed)
            for arch, a in v["archs"].items():
                archs[f"{arch}, {changed}"] = a
            variants.append(f"`{name}.json` (commit {v['machine']['git_commit'][:8]}: {changed})")
    rows = []
    for task in result["params"]["tasks"]:
        row = {"task": task_label(task)}
        for arch, a in archs.items():
            m = a["tasks"][task]["test"]
            row[arch] = acc_auc_f1(m)
        b = image_baselines(task)
        if b:
            m = b[b["strongest"]]["test"]
            row["baseline"] = f"{BASELINE_NAMES[b['strongest']]} {acc_auc_f1(m)}"
        a = anchors.get(task)
        row["anchor"] = f"{a['accuracy']:.3f} / {a['auroc']:.3f}" if a else ""
        rows.append(row)
    cols = [("task", "task")] + [(arch, f"{arch} ({archs[arch]['parameters'] / 1e6:.2f}M) ACC / AUC / macro-F1")
                                 for arch in archs]
    cols += [("baseline", "strongest simple baseline, same split"), ("anchor", "MedMNIST v2 ResNet-18 (28) ACC / AUC")]
    times = ", ".join(f"{arch} {a['train_seconds'] / 60:.0f} min" for arch, a in archs.items())
    tr = next(iter(result["archs"].values()))["trainer"]
    how = (f" ({tr.get('lr_schedule', 'constant')} lr schedule, "
           f"{'plain cross-entropy' if tr.get('class_weight', 'none') == 'none' else 'class-balanced loss'})")
    p = result["params"]
    notes = "".join(f" Note: {n}." for n in result.get("notes", []))
    also = f" Extra column(s) from {'; '.join(variants)}, same splits." if variants else ""
    return (f"{machine_line(result)}, from `bench/results/image_foundation.json`: each foundation pre-trained "
            f"multi-task on the {len(p['tasks'])} tasks' whole training splits for {p['epochs']} epochs{how} (pre-training "
            f"time: {times}), scored on test with its own pre-training heads; the strongest simple baseline from "
            f"`bench/results/baselines_full.json`, same splits.{also}{notes}\n\n"
            + markdown_table(rows, cols) + "\n")


def lr_schedule_section(result: dict) -> str:
    """The foundation stage's pre-training, constant step size vs one_cycle, pre-training heads on test."""
    p, runs = result["params"], result["runs"]
    rows = []
    for task in p["tasks"]:
        for cw in p["class_weights"]:
            row = {"task": task_label(task), "loss": "class-balanced" if cw == "balanced" else "plain cross-entropy"}
            for schedule in p["schedules"]:
                m = runs[f"{cw}/{schedule}"]["tasks"][task]["test"]
                row[schedule] = acc_auc_f1(m)
            row["delta"] = f"{result['macro_f1_one_cycle_minus_constant'][cw][task]:+.3f}"
            rows.append(row)
    cols = [("task", "task"), ("loss", "pre-training loss")] + [(s, f"{s}: ACC / AUC / macro-F1")
                                                                for s in p["schedules"]]
    cols += [("delta", "macro-F1, one_cycle − constant")]
    notes = "".join(f" Note: {n}." for n in result.get("notes", []))
    params = next(iter(runs.values()))["parameters"]
    return (f"{machine_line(result)}, from `bench/results/lr_schedule.json`: the foundation stage's pre-training of a "
            f"ResNet of widths {p['widths']} ({params / 1e6:.2f}M parameters, GroupNorm), {p['epochs']} epochs, "
            f"lr {p['trainer']['lr']}, batch {p['trainer']['batch_size']}, the same seed for every run, the "
            f"checkpoint with the best validation loss; test, pre-training heads.{notes}\n\n"
            + markdown_table(rows, cols) + "\n")


def install_time_section(result: dict) -> str:
    """`make setup` on a fresh clone, with uv (the default) and with pip."""
    setup, first = result["median_setup_seconds"], result["median_first_cli_seconds"]
    n = sum(r["installer"] == "uv" for r in result["runs"])
    venv = next(r["venv_mib"] for r in result["runs"] if r["installer"] == "uv")
    imports = ""
    if "median_stage_import_seconds" in result:  # (results before the installers both compiled bytecode lack it)
        s = result["median_stage_import_seconds"]
        imports = (f" Both installers compile the venv's bytecode: a stage process's imports (torch, transformers, "
                   f"Prefect, MLflow) under `PYTHONDONTWRITEBYTECODE=1` take {s['compiled']:.1f} s, and "
                   f"{s['not_compiled']:.1f} s with nothing compiled ({s['not_compiled'] / s['compiled']:.1f}x; "
                   f"each process again, since none may write it).")
    return (f"`make setup` on a fresh clone, from pip's configured package sources and no package cache: "
            f"{setup['uv'] / 60:.1f} min with uv (the "
            f"default), {setup['pip'] / 60:.1f} min with pip (`MEDEXPERTS_INSTALLER=pip`), pip/uv = "
            f"{result['pip_over_uv_setup']:.1f}x (medians of {n}, alternating); the first `medexperts` call after it "
            f"{first['uv']:.1f} s; the venv {venv:.0f} MiB; {machine_line(result)} "
            f"(`bench/results/install_time.json`).{imports}\n")


def _versus_baseline(run: dict, block: dict) -> dict[str, str]:
    """An expert run's cells beside a baselines block (``strongest`` names the one picked on validation): the
    strongest baseline's ACC / AUC / macro-F1 and whether the expert beats it on macro-F1."""
    strongest = block.get("strongest")
    b = block[strongest]["test"] if strongest else None
    if not b:
        return {"base": "", "beats": ""}
    return {"base": f"{BASELINE_NAMES.get(strongest, strongest)} {acc_auc_f1(b)}",
            "beats": "yes" if run["test"]["macro_f1"] > b["macro_f1"] else "**no**"}


def _changed(params: dict) -> str:
    """The params a bench changed (``--set``), for its caption."""
    return ", ".join(f"`{k}={v}`" for k, v in (params.get("overrides") or {}).items()) or "none"


def experts_full_image_section(result: dict, name: str = "experts_full_image",
                               foundation: str = "image_foundation") -> str:
    """Image experts on the ResNet-18 foundation beside the probe, the strongest simple baseline and the anchor
    (``foundation``: the results file of the `bench image_foundation` run that pre-trained it)."""
    found = json.loads((RESULTS / "image_foundation.json").read_text()) if (RESULTS / "image_foundation.json").is_file() \
        else {"baselines": {}, "anchors": {}}
    rows = []
    for r in result["runs"]:
        anchor = found["anchors"].get("tasks", {}).get(r["task"], {})
        rows.append({"task": task_label(r["task"]), "method": r["method"],
                     "expert": acc_auc_f1(r["test"]),
                     "probe": acc_auc_f1(r["probe_test"]),
                     **_versus_baseline(r, image_baselines(r["task"])),
                     "anchor": f"{anchor['accuracy']:.3f} / {anchor['auroc']:.3f}" if anchor else "",
                     "s": f"{r['train_seconds'] / 60:.1f}", "trainable": f"{r['trainable_params']:,}"})
    table = markdown_table(rows, [("task", "task"), ("method", "method"),
                                  ("expert", "expert: ACC / AUC / macro-F1"), ("probe", "probe: ACC / AUC / macro-F1"),
                                  ("base", "strongest simple baseline: ACC / AUC / macro-F1"),
                                  ("anchor", "MedMNIST v2 ResNet-18: ACC / AUC"), ("beats", "expert beats baseline (macro-F1)"),
                                  ("trainable", "trainable params"), ("s", "train min")])
    p = result["params"]
    image = p.get("image_foundation") or {}
    return (f"Profile `{p['profile']}` (changed for 2 CPU cores: {_changed(p)}), {machine_line(result)}, from "
            f"`bench/results/{name}.json`: the experts stage's own training on the image foundation "
            f"`{image.get('arch', '?')}` (widths {image.get('widths', '?')}) that `bench image_foundation` pre-trained "
            f"(`bench/results/{foundation}.json`), "
            f"every training row; test. Baselines (hyper-parameters and class weighting picked on validation) from "
            f"`bench/results/baselines_full.json`, same splits.\n\n{table}\n")


# (experts results file(s), the foundation's results file, label): the files of one recipe are read together (the
# small tasks and DermaMNIST may come from separate `bench experts` runs on the same foundation)
IMAGE_RECIPES = ((("experts_full_image_constant",), "image_foundation_constant", "constant lr, plain cross-entropy"),
                 (("experts_full_image",), "image_foundation", "one_cycle, class-balanced"),
                 (("experts_full_image_plain",), "image_foundation_plain", "one_cycle, plain cross-entropy"),
                 (("experts_full_image_plain_onecycle",), "image_foundation_plain",
                  "one_cycle, plain cross-entropy; experts one_cycle too"),
                 (("experts_full_image_plain_augment", "experts_derma_augment_pretrained"),
                  "image_foundation_plain_augment", "one_cycle, plain cross-entropy; DermaMNIST augmented"),
                 (("experts_full_image_e30", "experts_derma_e30"), "image_foundation_e30",
                  "the same, 30 epochs"))


def _recipe_experts(names: tuple[str, ...]) -> dict:
    """One recipe's expert runs: the named results files' runs together (each task once), and their commits
    joined by "/"; {} while any file is missing."""
    results = [committed(n) for n in names]
    if not all(results):
        return {}
    runs = [r for res in results for r in res["runs"]]
    tasks = [r["task"] for r in runs]
    if len(set(tasks)) != len(tasks):
        raise SystemExit(f"image recipe {names}: a task appears in more than one file ({tasks})")
    commits = sorted({res["machine"]["git_commit"][:8] for res in results})
    return {"runs": runs, "machine": {"git_commit": "/".join(commits)}}


def image_recipes_section() -> str:
    """Test macro-F1 of the image LoRA experts, their probes and the foundation's own heads, per pre-training
    recipe of the ResNet-18 foundation, beside the strongest simple baseline."""
    loaded = [(e, f, label, _recipe_experts(e), committed(f)) for e, f, label in IMAGE_RECIPES]
    recipes = [(label, experts, found) for _, _, label, experts, found in loaded if experts and found]
    if not recipes:
        return "No results yet.\n"
    tasks = [r["task"] for r in recipes[0][1]["runs"]]
    rows = []
    for task in tasks:
        b = image_baselines(task)
        row = {"task": task_label(task), "base": strongest_of(b) if b else "—"}
        for i, (_, experts, found) in enumerate(recipes):
            run = next((r for r in experts["runs"] if r["task"] == task), None)
            head = found["archs"].get("resnet18", {}).get("tasks", {}).get(task, {}).get("test", {}).get("macro_f1")
            if run:
                row[str(i)] = (f"{run['test']['macro_f1']:.3f} / {run['probe_test']['macro_f1']:.3f} / "
                               + (f"{head:.3f}" if head is not None else "—"))
        rows.append(row)
    cols = [("task", "task")] + [(str(i), f"{label}: expert / probe / head") for i, (label, _, _) in
                                 enumerate(recipes)]
    cols += [("base", "strongest simple baseline, same split")]
    sources = "; ".join(f"{label}: {' + '.join(f'`{n}.json`' for n in e)} "
                        f"({experts['machine']['git_commit']}) on `{f}.json` ({found['machine']['git_commit'][:8]})"
                        for e, f, label, experts, found in loaded if experts and found)
    return (f"Test macro-F1 of the LoRA expert, its probe and the foundation's own pre-training head, per ResNet-18 "
            f"pre-training recipe (10 pre-training epochs unless the column says otherwise, 10 expert epochs, same "
            f"splits). Sources: {sources}.\n\n"
            + markdown_table(rows, cols) + "\n")


# DermaMNIST's expert under each change tried: (results file, the image foundation it trained on[, what the profile
# at the file's commit changed that its overrides do not record]). The earlier full run's foundation is `bench pipeline
# --profile full`'s (constant lr, early-stopped at epoch 14); the others are `bench image_foundation`'s ResNet-18s.
DERMA_RUNS = (("experts_derma_unweighted", "the full run at 33af2015 (constant lr, plain cross-entropy)"),
              ("experts_derma_augment_fullrun", "the full run at 33af2015 (constant lr, plain cross-entropy)"),
              ("experts_full_image_constant", "`image_foundation_constant` (constant lr, plain cross-entropy)"),
              ("experts_full_image", "`image_foundation` (one_cycle, class-balanced)"),
              ("experts_full_image_plain", "`image_foundation_plain` (one_cycle, plain cross-entropy)"),
              ("experts_full_image_plain_onecycle", "`image_foundation_plain` (one_cycle, plain cross-entropy)"),
              ("experts_derma_rank32", "`image_foundation_plain` (one_cycle, plain cross-entropy)"),
              ("experts_derma_augment", "`image_foundation_plain` (one_cycle, plain cross-entropy)"),
              ("experts_derma_augment_pretrained", "`image_foundation_plain_augment` (one_cycle, plain "
               "cross-entropy, DermaMNIST augmented in pre-training)"),
              ("experts_derma_augment_pretrained_only", "`image_foundation_plain_augment` (one_cycle, plain "
               "cross-entropy, DermaMNIST augmented in pre-training)"),
              # run at a commit whose full profile augments DermaMNIST: that is no override, so it is named here
              ("experts_derma_e30", "`image_foundation_e30` (the same recipe, 30 epochs)", "augmented by the profile"),
              ("experts_derma_e30_full", "`image_foundation_e30` (the same recipe, 30 epochs)",
               "augmented by the profile"))
_DERMA_CHANGES = {"experts.trainer.image.max_epochs": None, "experts.trainer.image.class_weight": "plain cross-entropy",
                  "experts.trainer.image.lr_schedule": "one_cycle", "experts.lora.rank": "rank {}",
                  "experts.lora.alpha": None, "data.tasks.dermamnist.augment": "augmented ({})"}


def _full_run_recipe(full: dict) -> str:
    """How the full run ``full`` (pipeline_full.json) pre-trained its image foundation, from the params it recorded
    (results written before bench/pipeline recorded them: that run's profile, constant lr and plain cross-entropy)."""
    resolved = full["params"].get("resolved")
    if not resolved:
        return "constant lr, plain cross-entropy"
    tr = resolved["foundation"]["image"]["trainer"]
    augment = resolved["data"]["tasks"].get("dermamnist", {}).get("augment")
    return (f"{tr['lr_schedule']} lr, {'plain cross-entropy' if tr['class_weight'] == 'none' else 'class-balanced'}, "
            f"{tr['max_epochs']} epochs" + ("; DermaMNIST augmented" if augment else ""))


def derma_section() -> str:
    """DermaMNIST's LoRA expert (test) under each foundation and expert change tried, beside the full run's expert
    and the small CNN baseline on the same split."""
    rows = []
    full = committed("pipeline_full")
    if derma := full.get("tasks", {}).get("dermamnist"):
        rows.append({"file": "`pipeline_full`", "foundation": f"the full run's ({_full_run_recipe(full)})",
                     "change": "the full profile's expert (30 epochs, early stopping)",
                     "test": acc_auc_f1(derma["metrics"]["expert"]), "val": "",
                     "commit": full["machine"]["git_commit"][:8]})
    for name, foundation, *profile_change in DERMA_RUNS:
        result = committed(name)
        run = next((r for r in result.get("runs", []) if r["task"] == "dermamnist"), None)
        if run is None:
            continue
        over = result["params"].get("overrides", {})
        epochs = over.get("experts.trainer.image.max_epochs")
        changes = [v.format(", ".join(over[k]) if isinstance(over[k], list) else over[k])
                   for k, v in _DERMA_CHANGES.items() if v and k in over]
        unknown = sorted(set(over) - set(_DERMA_CHANGES))
        if unknown:
            raise SystemExit(f"bench/results/{name}.json: derma_section cannot name the change(s) {unknown}")
        changes += profile_change
        if run["method"] != "lora":  # the same stage's other expert method, in place of the LoRA adapter
            from components.experts.methods import METHODS

            changes.insert(0, f"{METHODS[run['method']].pretty} instead of LoRA")
        rows.append({"file": f"`{name}`", "foundation": foundation,
                     "change": (", ".join(changes) or "none (rank 8, class-balanced)")
                     + (f"; {epochs} epochs" if epochs else ""),
                     "test": acc_auc_f1(run["test"]),
                     "val": f"{run['val']['macro_f1']:.3f}", "commit": result["machine"]["git_commit"][:8]})
    if not rows:
        return "No results yet.\n"
    cnn = committed("baselines_full").get("tasks", {}).get("dermamnist", {}).get("expert_rows", {}).get("small_cnn")
    base = (f"Small CNN on the same split (`baselines_full`, {cnn['choice']['seeds']} seeds): test macro-F1 "
            f"{cnn['test']['macro_f1']:.3f} (median; {cnn['test_macro_f1_min']:.3f}-{cnn['test_macro_f1_max']:.3f}), "
            f"validation {cnn['val_macro_f1']:.3f}. " if cnn else "")
    cols = [("file", "bench/results"), ("foundation", "image foundation"), ("change", "LoRA expert: change"),
            ("test", "test ACC / AUC / macro-F1"), ("val", "val macro-F1"), ("commit", "commit")]
    return (f"DermaMNIST (the JPEG-75 copy) experts, one seed each. {base}\n\n" + markdown_table(rows, cols) + "\n")


def prior_shift_section(result: dict, result_name: str = "prior_shift", baseline_rows: str = "all_rows") -> str:
    """The decision's prior shift on the same trained experts and probes (bench/prior_shift.py): tau picked on
    validation, test before and after, beside the strongest simple baseline on the same split (fitted on
    ``baseline_rows``, as ``strongest_baseline``: all training rows for the full profile's experts, the quick
    profile's for its)."""
    rows = []
    for run in result["runs"]:
        task = run["task"]
        row = {"task": task_label(task), "rows": f"{run['rows']['train']:,} / {run['rows']['val']:,}",
               "base": strongest_baseline(task, baseline_rows)}
        for name in ("expert", "probe"):
            r = run[name]
            row[name] = (f"{r['tau']:+.2f}: {r['test_before']['macro_f1']:.3f} → {r['test_after']['macro_f1']:.3f}"
                         f" (ACC {r['test_before']['accuracy']:.3f} → {r['test_after']['accuracy']:.3f})")
            row[f"{name}_best"] = f"{max(r['curve_test']):.3f}"
        rows.append(row)
    cols = [("task", "task"), ("rows", "train / val rows"),
            ("expert", "LoRA expert: tau picked, test macro-F1 before → after"),
            ("expert_best", "expert: best tau in hindsight (test)"),
            ("probe", "probe: tau picked, test macro-F1 before → after"), ("probe_best", "probe: best in hindsight"),
            ("base", "strongest simple baseline, same split")]
    return (f"{machine_line(result)}, from `bench/results/{result_name}.json`: the experts and probes of one `bench "
            f"experts --work` folder (`{result['work']}`), nothing retrained; tau from {result['taus'][0]:g} to "
            f"{result['taus'][-1]:g} in steps of {result['taus'][1] - result['taus'][0]:g}, picked on validation "
            "macro-F1 and kept only where a half split of validation confirms it (0: the head's own decision).\n\n"
            + markdown_table(rows, cols) + "\n")


def experts_full_text_section(result: dict) -> str:
    """Text experts trained on every row beside the quick profile's (capped) expert, the probe and the strongest
    simple baseline fitted on the same full splits."""
    baselines, quick = committed("baselines_full").get("tasks", {}), committed("experts")
    quick_runs = {(r["task"], r["method"]): r for r in quick.get("runs", [])}
    rows = []
    for r in result["runs"]:
        q = quick_runs.get((r["task"], r["method"]))
        rows.append({"task": task_label(r["task"]), "method": r["method"], "rows": f"{r['train_samples']:,}",
                     "quick": f"{q['test']['macro_f1']:.3f} ({q['train_samples']:,} rows)" if q else "",
                     "expert": acc_auc_f1(r["test"]),
                     "probe": f"{r['probe_test']['macro_f1']:.3f}",
                     **_versus_baseline(r, baselines.get(r["task"], {}).get("expert_rows", {})),
                     "s": f"{r['train_seconds'] / 60:.1f}"})
    table = markdown_table(rows, [("task", "task"), ("method", "method"), ("rows", "training rows"),
                                  ("quick", "quick profile expert: macro-F1"),
                                  ("expert", "full: expert ACC / AUC / macro-F1"), ("probe", "full: probe macro-F1"),
                                  ("base", "strongest simple baseline, all rows: ACC / AUC / macro-F1"),
                                  ("beats", "expert beats baseline (macro-F1)"), ("s", "train min")])
    p = result["params"]
    return (f"Profile `{p['profile']}` (changed: {_changed(p)}), {machine_line(result)}, from "
            f"`bench/results/experts_full_text.json`: the experts stage's own training on every training row; test. "
            f"Quick profile column: `bench/results/experts.json` (commit {quick.get('machine', {}).get('git_commit', '?')[:8]}); "
            f"baselines: `bench/results/baselines_full.json` (hyper-parameters and class weighting picked on "
            f"validation), same splits.\n\n{table}\n")


def class_weight_section(result: dict) -> str:
    """Probes with plain vs class-balanced losses, per task."""
    rows = []
    for task, r in result["tasks"].items():
        shares = r["train_class_shares"]
        rows.append({"task": task_label(task), "kind": r["kind"],
                     "rare": f"{min(shares):.1%}" if shares else "", "n": r["rows"]["train"],
                     **{f"{m}_{k}": r[m]["test"][k] for m in ("none", "balanced") for k in ("accuracy", "macro_f1")},
                     "change": f"{r['test_macro_f1_change']:+.3f}", "val": r["val_picks"]})
    table = markdown_table(rows, [("task", "task"), ("kind", "kind"), ("n", "train rows"),
                                  ("rare", "rarest class (label) share"),
                                  ("none_accuracy", "plain: accuracy"), ("none_macro_f1", "plain: macro-F1"),
                                  ("balanced_accuracy", "balanced: accuracy"),
                                  ("balanced_macro_f1", "balanced: macro-F1"), ("change", "macro-F1 change"),
                                  ("val", "validation prefers")])
    sm = result["summary"]
    image = result["params"].get("image_foundation") or {}
    arch = f"the image foundation `{image.get('arch', 'cnn')}`" if image else "no image foundation"
    return (f"{machine_line(result)}, from `bench/results/class_weight.json`: the experts stage's linear probe "
            f"(`fit_probe`, L2 by validation) on frozen features (text: all-MiniLM-L6-v2; image: {arch}, "
            f"pre-trained by `bench image_foundation`), every row of the full profile's splits, test; medians over "
            f"{len(result['params'].get('seeds', [0]))} probe seed(s) (the L2 picked on validation depends on the "
            f"probe's initialisation):\n\n{table}\n"
            f"- Balanced is better on {sm['tasks_better_balanced']} of {sm['tasks']} tasks; median macro-F1 change "
            f"{sm['median_test_macro_f1_change']:+.3f}, mean {sm['mean_test_macro_f1_change']:+.3f}. Validation "
            f"picked the weighting that was better on test for {sm['validation_picked_the_better_on_test']} of "
            f"{sm['tasks']} tasks.\n")


def suite_time_section(result: dict) -> str:
    """The test suite in one process and in pytest-xdist workers."""
    variants = {v["workers"]: v for v in result["variants"]}
    rows = ["| run | wall time | CPU time (all processes) | outcome | slowest test |", "|---|---:|---:|---|---|"]
    for workers, v in variants.items():
        name = "one process (`WORKERS=0`)" if workers == 0 else f"{workers} workers (`WORKERS={workers}`)"
        top = v["slowest"][0] if v["slowest"] else None
        slowest = f"`{top['test'].split('::')[-1]}` {top['seconds']:.0f} s" if top else "—"
        rows.append(f"| {name} | {v['wall_seconds'] / 60:.1f} min | {v['cpu_seconds'] / 60:.1f} min | "
                    f"{v['outcome'] or 'exit ' + str(v['exit_status'])} | {slowest} |")
    ratios = "; ".join(f"{r:.2f}x faster with {w} workers" for w, r in result["one_process_over_workers"].items())
    return (f"The suite (`pytest` as `make test` runs it, without the Flower parity test), {machine_line(result)} "
            f"(`bench/results/suite_time.json`){': ' + ratios if ratios else ''}:\n\n" + "\n".join(rows) + "\n")


def dvc_yaml_section(result: dict) -> str:
    """DVC's commands with and without ruamel.yaml's C parser."""
    m, r, lock = result["median_seconds"], result["without_over_with"], result["files"]["dvc.lock"]
    parts = [f"`dvc {c}` {m[c]['with_clib']:.1f} s with it, {m[c]['without_clib']:.1f} s without ({r[c]:.2f}x)"
             for c in m]
    return (f"DVC on the tiny run's outputs (dvc.lock: {lock['lines']:,} lines), median of "
            f"{result['params']['rounds']} alternating rounds of whole processes, {machine_line(result)} "
            f"(`bench/results/dvc_yaml.json`): " + "; ".join(parts) + ".\n")


def replace(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no <!-- results:{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench readme", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when README.md differs from what bench/results/ gives")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = render(text)
    if args.check:
        if new != text:
            raise SystemExit("README.md is out of date with bench/results/: run `medexperts bench readme`")
        print("README.md matches bench/results/")
        return
    readme.write_text(new)
    print(f"updated {readme}")


def render(text: str) -> str:
    """``text`` (README.md's) with every results section regenerated from bench/results/."""
    text = replace(text, "methods", methods_section())
    text = replace(text, "image_recipes", image_recipes_section())
    text = replace(text, "derma", derma_section())
    path = RESULTS / "pipeline.json"
    if path.is_file():
        text = replace(text, "pipeline", pipeline_section(json.loads(path.read_text())))
    path = RESULTS / "train_throughput.json"
    if path.is_file():
        text = replace(text, "throughput", throughput_section(json.loads(path.read_text())))
    for name, section in (("experts", experts_section), ("baselines", baselines_section),
                          ("decompose", decompose_section), ("fusion", fusion_section),
                          ("routing", routing_section), ("federated", federated_section),
                          ("federated_seeds", federated_seeds_section),
                          ("fixed_cost", fixed_cost_section), ("fanout", fanout_section),
                          ("wall_time", wall_time_section), ("install_time", install_time_section),
                          ("suite_time", suite_time_section), ("dvc_yaml", dvc_yaml_section),
                          ("full_profile_time", full_profile_time_section),
                          ("text_padding", text_padding_section),
                          ("length_grouping", length_grouping_section),
                          ("image_foundation", image_foundation_section),
                          ("lr_schedule", lr_schedule_section),
                          ("class_weight", class_weight_section),
                          ("experts_full_image", experts_full_image_section),
                          ("experts_full_image_plain",
                           lambda r: experts_full_image_section(r, "experts_full_image_plain",
                                                                "image_foundation_plain")),
                          ("experts_full_image_plain_onecycle",
                           lambda r: experts_full_image_section(r, "experts_full_image_plain_onecycle",
                                                                "image_foundation_plain")),
                          ("experts_full_text", experts_full_text_section),
                          ("prior_shift", prior_shift_section),
                          ("prior_shift_text_quick", lambda r: prior_shift_section(r, "prior_shift_text_quick", "expert_rows")),
                          ("decompose_full_image", decompose_section),
                          ("decompose_full_image_onecycle", decompose_section),
                          ("decompose_full_image_onecycle_e20", decompose_section),
                          ("decompose_step_full", decompose_section),
                          ("decompose_step_full_gather", decompose_section),
                          ("baselines_full", baselines_all_data_section),
                          ("pipeline_full", pipeline_full_section),
                          ("fedkim_variants", fedkim_variants_section),
                          ("fedkim_variants_preserve",
                           lambda r: fedkim_variants_section(r, "fedkim_variants_preserve")),
                          ("fedkim_variants_client_heads",
                           lambda r: fedkim_variants_section(r, "fedkim_variants_client_heads")),
                          ("architecture", architecture_section)):
        path = RESULTS / f"{name}.json"
        if path.is_file():
            text = replace(text, name, section(json.loads(path.read_text())))
    return text


if __name__ == "__main__":
    main()
