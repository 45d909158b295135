"""Fill the README's result tables from bench/results/*.json (never by hand): `medexperts bench readme`."""

from __future__ import annotations

import argparse
import json
import re

from bench.common import RESULTS, ROOT
from components.metrics.report import markdown_table


def pipeline_section(result: dict) -> str:
    fig, metric, m = result["figures"], result["params"]["metric"], result["machine"]
    rows = [{"task": t, "probe": v["probe"], "expert": v["expert"], "fused": v["fused"], "normalised": v["normalised"],
             "kb": v["expert_stored_bytes"] / 1024, "share": 100 * v["trainable_params"] / v["foundation_params"],
             "ms": v["latency_ms_per_sample"]["expert_merged"], "base_ms": v["latency_ms_per_sample"]["base"]}
            for t, v in result["tasks"].items()]
    table = markdown_table(rows, [("task", "task"), ("probe", f"probe {metric}"), ("expert", f"LoRA expert {metric}"),
                                  ("fused", f"fused {metric}"), ("normalised", "fused / expert"),
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
    rows = [{"task": r["task"], "method": r["method"], "test": r["test"][metric], "probe": r["probe_test"][metric],
             "acc": r["test"]["accuracy"], "auc": r["test"]["auroc"], "trainable": r["trainable_params"],
             "kb": r["stored_bytes"] / 1024, "s": r["train_seconds"], "rss": r["peak_rss_mb"],
             "beats": "yes" if r["test"][metric] > r["probe_test"][metric] else "**no**"} for r in result["runs"]]
    table = markdown_table(rows, [("task", "task"), ("method", "method"), ("test", f"test {metric}"),
                                  ("probe", f"probe {metric}"), ("beats", "beats probe"), ("acc", "accuracy"),
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


def decompose_section(result: dict) -> str:
    metric = result["params"]["primary_metric"]
    rows = []
    for task, r in result["quality"]["tasks"].items():
        if task.startswith("_"):
            continue
        t = r["test"]
        rows.append({"task": task, "teacher": t["teacher"][metric], "lorkd": t["lorkd"][metric],
                     "single": t["single_student"][metric], "params": r["parameters"],
                     "teacher_params": r["teacher_parameters"], "pct": 100 * r["parameter_fraction"],
                     "goal": ("yes" if t["lorkd"][metric] >= t["teacher"][metric] else "**no**") + " / " +
                             ("yes" if r["parameter_fraction"] <= 0.10 else "**no**")})
    table = markdown_table(rows, [("task", "task"), ("teacher", f"teacher {metric}"), ("lorkd", f"LoRKD expert {metric}"),
                                  ("single", f"single-task student {metric}"), ("params", "deployed params"),
                                  ("teacher_params", "teacher params"), ("pct", "% of teacher"),
                                  ("goal", "≥ teacher / ≤ 10 %")])
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
    return (f"Profile `{result['params']['profile']}`, {machine_line(result)}, "
            f"from `bench/results/decompose.json`; test split.\n\n{table}\n"
            f"Training step with {result['params']['step_tasks']} tasks (batch: "
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


def replace(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no <!-- results:{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    # no options; --help says what it does
    argparse.ArgumentParser(prog="medexperts bench readme", description=__doc__).parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = replace(text, "methods", methods_section())
    path = RESULTS / "pipeline.json"
    if path.is_file():
        text = replace(text, "pipeline", pipeline_section(json.loads(path.read_text())))
    path = RESULTS / "train_throughput.json"
    if path.is_file():
        text = replace(text, "throughput", throughput_section(json.loads(path.read_text())))
    for name, section in (("experts", experts_section), ("decompose", decompose_section), ("fusion", fusion_section),
                          ("architecture", architecture_section)):
        path = RESULTS / f"{name}.json"
        if path.is_file():
            text = replace(text, name, section(json.loads(path.read_text())))
    readme.write_text(text)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
