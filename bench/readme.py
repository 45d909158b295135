"""Fill the README's result tables from bench/results/*.json (never by hand): `python bench/readme.py`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.evaluation.report import markdown_table  # noqa: E402


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


def replace(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no <!-- results:{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = replace(text, "methods", methods_section())
    path = ROOT / "bench" / "results" / "pipeline.json"
    if path.is_file():
        text = replace(text, "pipeline", pipeline_section(json.loads(path.read_text())))
    path = ROOT / "bench" / "results" / "train_throughput.json"
    if path.is_file():
        text = replace(text, "throughput", throughput_section(json.loads(path.read_text())))
    readme.write_text(text)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
