"""FedKIM against its baselines over several seeds: is a difference between two models larger than what a new seed
moves? `medexperts bench federated_seeds [--seeds 42 43 44] [--work DIR]` -> bench/results/federated_seeds.json

Each seed is one whole `medexperts bench federated` run of both partitions (`bench.federated.run_partition`, the
same settings and defaults) with `pipeline.seed` set to it, which draws anew what a seed decides: the text tasks'
train / validation / test splits where the dataset has no official one, the client shards (IID, Dirichlet), the
server's split, every model's initialisation and batch order, and the test rows scored (at most --test-cap per
task). Per partition, client task and model: the test macro-F1 and AUROC of every seed, and their mean and sample
standard deviation. The goals of `bench federated` are checked on the seed means and per seed (in how many seeds
each holds), with the paired difference FedKIM − no injection per task (mean ± standard deviation over seeds).

With `--work DIR` a run longer than one sitting (three seeds: about 3 h on 2 CPU cores) can be stopped and started
again: each finished (seed, partition) run is kept in DIR/seed_S/PARTITION/result.json with the commit and settings
it ran with, and the same command reuses it when both match (a run of other code or settings is run again).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import git_commit, write_result
from bench.federated import MODELS, TASKS, add_common_arguments, run_partition, work_folder

KEYS = ("macro_f1", "auroc")


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One partition's per-seed runs (seed -> ``run_partition`` result) as per-model spreads and goal counts."""
    first = next(iter(runs.values()))
    tasks, held_out = first["client_tasks"], first["held_out"]
    models: dict[str, dict[str, dict[str, Any]]] = {}
    diffs: dict[str, dict[str, Any]] = {}
    for t in tasks:
        models[t] = {m: {k: {"per_seed": [r["table"][t][m][k] for r in runs.values()]} for k in KEYS}
                     for m in MODELS}
        models[t]["majority_class"] = {k: {"per_seed": [r["majority_class_test"][t][k] for r in runs.values()]}
                                       for k in KEYS}
        for per_key in models[t].values():
            for k in KEYS:
                per_key[k] |= spread(per_key[k]["per_seed"])
        diffs[t] = {}
        for other in ("no_injection", "local_only", "fedavg"):
            d = {k: [r["table"][t]["fedkim"][k] - r["table"][t][other][k] for r in runs.values()] for k in KEYS}
            diffs[t][other] = {k: {"per_seed": d[k], **spread(d[k]), "seeds_ahead": sum(v > 0 for v in d[k])}
                               for k in KEYS}
    held = {t: {k: [r["held_out_test"][t]["fedkim"][k] - r["held_out_test"][t]["no_injection"][k]
                    for r in runs.values()] for k in KEYS} for t in held_out}
    held_mean = {k: statistics.mean(statistics.mean(held[t][k]) for t in held_out) if held_out else None for k in KEYS}

    def on_means(other: str, key: str) -> dict[str, bool]:
        return {t: models[t]["fedkim"][key]["mean"] > models[t][other][key]["mean"] for t in tasks}

    goals = {}
    for key in KEYS:
        vs_none, vs_local = on_means("no_injection", key), on_means("local_only", key)
        goals[key] = {
            "fedkim_beats_no_injection_on_the_mean": vs_none,
            "fedkim_beats_no_injection_every_task_on_the_mean": all(vs_none.values()),
            "fedkim_beats_local_only_on_the_mean": vs_local,
            "fedkim_beats_local_only_every_task_on_the_mean": all(vs_local.values()),
            "seeds_where_fedkim_beats_no_injection_every_task": sum(
                all(r["table"][t]["fedkim"][key] > r["table"][t]["no_injection"][key] for t in tasks)
                for r in runs.values()),
            "held_out_mean_gain": held_mean[key],
            "held_out_injected_beats_not_injected_on_average": held_mean[key] is not None and held_mean[key] > 0,
        }
    return {"client_tasks": tasks, "held_out": held_out, "models": models, "fedkim_minus": diffs,
            "held_out_gain": {t: {k: {"per_seed": v, **spread(v)} for k, v in h.items()} for t, h in held.items()},
            "goals": goals, "seconds": {str(s): r["seconds"]["partition"] for s, r in runs.items()},
            "params": first["params"]}


def keep(path: Path, key: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Writes a finished (seed, partition) run with the commit and settings it ran with; returns it as read back
    (JSON), so a fresh run and a reused one are summarised alike."""
    from components.core.artifacts import write_json

    as_json = json.loads(json.dumps(result, default=str))
    write_json(path, {"key": key, "result": as_json})
    return as_json


def finished(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The run kept at ``path`` when it ran with ``key`` (the commit and settings); None when there is none, or it
    ran with other code or settings, or the file cannot be read (each said, and the run is made again)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        kept_key, result = record["key"], record["result"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"{path}: unreadable ({type(err).__name__}: {err}); running it again", flush=True)
        return None
    if kept_key != key:
        changed = sorted(k for k in key.keys() | kept_key.keys() if key.get(k) != kept_key.get(k))
        print(f"{path}: made with another {', '.join(changed)}; running it again", flush=True)
        return None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench federated_seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44],
                        help="pipeline.seed of each run (default: 42 43 44; 42 is the profile's)")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        parser.error(f"--seeds {args.seeds}: give at least two different seeds")
    work = work_folder(parser, args, "medexperts-bench-federated-seeds-")
    start = time.perf_counter()
    commit = git_commit()
    runs: dict[str, dict[int, dict[str, Any]]] = {p: {} for p in args.partitions}
    reused = []
    for seed in args.seeds:
        for p in args.partitions:
            key = {"git_commit": commit, "profile": args.profile, "partition": p, "seed": seed, "tasks": TASKS,
                   "held_out": args.held_out, "test_cap": args.test_cap}
            record = work / f"seed_{seed}" / p / "result.json"
            runs[p][seed] = finished(record, key)
            if runs[p][seed] is not None:
                print(f"=== seed {seed}, {p}: finished earlier ({record}), reused", flush=True)
                reused.append(f"{seed}/{p}")
                continue
            print(f"=== seed {seed}, {p}", flush=True)
            result = run_partition(work / f"seed_{seed}", args.profile, p, TASKS, args.held_out,
                                   {"pipeline.seed": seed, "federated.server_fraction": 0.8}, args.test_cap)
            runs[p][seed] = keep(record, key, result)
    # the runs' own time (a reused one took its time in an earlier invocation), and this invocation's
    wall = sum(r["seconds"]["partition"] for per_seed in runs.values() for r in per_seed.values())
    invocation = time.perf_counter() - start
    results = {p: summarise(r) for p, r in runs.items()}
    path = write_result("federated_seeds", {
        "params": {"profile": args.profile, "seeds": args.seeds, "tasks": TASKS, "held_out": args.held_out,
                   "partitions": args.partitions, "test_cap": args.test_cap, "models": list(MODELS),
                   "metrics": list(KEYS)},
        "partitions": results, "wall_seconds": wall, "invocation_wall_seconds": invocation,
        "reused_runs": reused,
    })
    for p, r in results.items():
        for t in r["client_tasks"]:
            m = r["models"][t]
            print(f"[{p}] {t:18s} " + "  ".join(f"{x} {m[x]['macro_f1']['mean']:.3f}±{m[x]['macro_f1']['sd']:.3f}"
                                              for x in MODELS), flush=True)
    print(f"runs {wall:.0f} s ({len(reused)} reused), this invocation {invocation:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
