"""FedKIM (Wang et al., EMNLP 2024) against its baselines, on test, for IID and Dirichlet (alpha 0.5) client shards.
`medexperts bench federated [--work DIR]` -> bench/results/federated.json

Per partition, the data stage's own code shards every task's train split across the clients
(`data.federation.partition` / `alpha`, into `<work>/<partition>/data`) and the federated stage's own code runs
(`components.stages.federated.run`; the profile's settings but for the caps below), with tasks held out
from the clients (default breastmnist, retinamnist, symptom2disease). While it runs, the bench keeps what the stage
builds: the initial client model and the client shards it trains on, the aggregated client model (FedAvg), the
injected foundation (FedKIM) and the foundation trained without injection (the stage trains both on the server's
split). Then, on TEST (capped per task, the same rows for every model), per client task:

1. no injection: the frozen foundation + heads trained on the server's split only (the stage's baseline);
2. local-only: each client's local model trained alone on its own shard, the same schedule (R rounds x E local
   epochs, no averaging), evaluated with its own heads; mean (and min / max) over the clients;
3. FedAvg: the aggregated client model after R rounds, with its heads;
4. FedKIM: the injected foundation;
5. centralized: one client model trained on all clients' shards pooled (same schedule): the upper bound of what the
   clients' data can teach a client model (centralized - FedAvg: what federating the clients' training costs);
6. FedKIM, centralized: that pooled client model injected by the stage's own server step (`inject_clients`, the same
   server rows, reference and settings): FedKIM's upper bound, so FedKIM, centralized - FedKIM is what federation
   costs the injected foundation (the issue's gap to centralized).

The profile's settings (all recorded in the result), unless changed: --client-cap rows per client and task, --rounds,
--server-epochs; the server trains the injection on at most --server-cap rows per task, out of the --server-fraction
of each validation split it holds (the rest is the stage's validation, scored after every server epoch);
--test-cap test rows per task.

Held-out tasks (no client trained on them): the stage's few-shot head (`fit_head_on`, `federated.held_out_shots`
training rows) on the injected and on the non-injected foundation. Cost, from the engine's per-round reports: client
compute, FedAvg, the per-round validation, and the engine's own overhead (payload copies, screening) as a share of
client compute (goal < 20 %); bytes sent to and from each client per round.

For reading ties: the majority-class score per task (always the training split's most frequent class; the
no-injection foundation sees only the task's description on an image task, so that is all it can do there), and
every goal is checked on AUROC too (threshold-free), next to the primary metric (evaluate.primary_metric).

Local-only and centralized reuse the stage's `train_clients` on one client (so optimiser resets per round are the
same as in the federation); 2 and 5 start from the same initial client model as the federation.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import ROOT, write_result

TASKS = ["pneumoniamnist", "breastmnist", "retinamnist", "pubmedqa", "medical_abstracts", "symptom2disease"]
# No client trains on these: two image tasks (ultrasound, fundus) and a text task, so "injected beats not injected on
# the held-out tasks on average" is a mean over more than one task and both modalities.
HELD_OUT = ["breastmnist", "retinamnist", "symptom2disease"]
PARTITIONS = {"iid": {"data.federation.partition": "iid"},
              "dirichlet": {"data.federation.partition": "dirichlet", "data.federation.alpha": 0.5}}
METRICS = ("accuracy", "macro_f1", "auroc", "mcc")
MODELS = ("no_injection", "local_only", "fedavg", "fedkim", "centralized", "fedkim_centralized")
OVERHEAD_GOAL = 0.20


def _params(profile: str, overrides: dict[str, Any]):  # noqa: ANN202
    from components.config import load_params

    return load_params(ROOT / "params", profile, overrides)


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in METRICS}


def per_task(flat: dict[str, float], tasks: list[str]) -> dict[str, dict[str, float]]:
    """A client evaluator's flat ``{"<task>_<metric>": value}`` as ``{task: {metric: value}}``."""
    return {t: {k: float(flat[f"{t}_{k}"]) for k in METRICS} for t in tasks}


def ensure_data(params: Any, out: Path) -> None:
    """The data stage's own code into ``out`` (reused when its manifest matches these params)."""
    from components.core.layout import MANIFEST
    from components.stages.data import params_hash, prepare_data

    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("params_hash") == params_hash(params.data):
        return
    shutil.rmtree(out, ignore_errors=True)
    prepare_data(params.data, ROOT, out, seed=params.pipeline.seed)


@contextlib.contextmanager
def capture_stage() -> Iterator[dict[str, Any]]:
    """Run the federated stage unchanged, keeping what it builds: the arguments and result of its
    ``train_clients`` call (with a copy of the initial client model), the model ``no_injection`` returns (the stage
    then fits it in place), and the arguments and result of ``inject_clients`` (FedKIM)."""
    import components.stages.federated as stage

    kept: dict[str, Any] = {}
    originals = {name: getattr(stage, name) for name in ("train_clients", "no_injection", "inject_clients")}

    def train_clients(global_model, shards, **kwargs):  # noqa: ANN001, ANN202
        kept["initial_model"] = copy.deepcopy(global_model)
        kept["shards"], kept["client_kwargs"] = shards, kwargs
        kept["federated"] = originals["train_clients"](global_model, shards, **kwargs)
        return kept["federated"]

    def no_injection(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        kept["no_injection"] = originals["no_injection"](*args, **kwargs)
        return kept["no_injection"]

    def inject_clients(inp, found, client_model, specs, train, val, **kwargs):  # noqa: ANN001, ANN003, ANN202
        kept["inject"] = {"inp": inp, "found": found, "specs": specs, "train": train, "val": val, **kwargs}
        kept["fedkim"] = originals["inject_clients"](inp, found, client_model, specs, train, val, **kwargs)
        return kept["fedkim"]

    for name, fn in (("train_clients", train_clients), ("no_injection", no_injection),
                     ("inject_clients", inject_clients)):
        setattr(stage, name, fn)
    try:
        yield kept
    finally:
        for name, fn in originals.items():
            setattr(stage, name, fn)


def pooled(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Every client's rows of each task in one shard (the centralized upper bound)."""
    import numpy as np

    from components.data.datasets import TaskData

    out = {}
    for task in shards[0]:
        parts = [s[task] for s in shards]
        first = parts[0]
        inputs = (np.concatenate([p.inputs for p in parts]) if isinstance(first.inputs, np.ndarray)
                  else [x for p in parts for x in p.inputs])
        out[task] = TaskData(first.name, first.modality, first.kind, list(first.label_names), inputs,
                             np.concatenate([p.labels for p in parts]))
    return out


def train_alone(kept: dict[str, Any], shard: dict[str, Any]) -> Any:
    """The stage's initial client model trained by the stage's ``train_clients`` on one shard as the only client:
    the federation's schedule (rounds x local epochs, optimiser reset each round), no averaging."""
    from components.federated.clients import train_clients

    kwargs = {k: v for k, v in kept["client_kwargs"].items()
              if k not in ("val", "on_round", "min_clients", "max_norm", "timeout_s", "workers")}
    return train_clients(copy.deepcopy(kept["initial_model"]), [shard], **kwargs).model


def inject_pooled(kept: dict[str, Any], client_model: Any) -> Any:
    """The stage's own server step (``inject_clients``: the same foundation, server rows, reference model and
    settings) on ``client_model`` instead of the aggregate."""
    from components.stages.federated import inject_clients

    k = kept["inject"]
    return inject_clients(k["inp"], k["found"], client_model, k["specs"], k["train"], k["val"],
                          reference=k["reference"])


def majority_class(train: Any, test: Any) -> dict[str, float]:
    """Test metrics of always answering the training split's most frequent class (what a model that ignores its
    input scores: the no-injection foundation on an image task sees only the task's description)."""
    import numpy as np
    import torch

    from components.metrics.classification import compute_metrics
    from components.training.data import labels_tensor

    top = int(np.bincount(np.asarray(train.labels), minlength=train.num_labels).argmax())
    logits = torch.zeros(len(test), test.num_labels)
    logits[:, top] = 1.0
    return _pick(compute_metrics(test.kind, logits, labels_tensor(test.labels, test.kind), test.num_labels))


def timing(reports: list[Any]) -> dict[str, Any]:
    rounds = []
    for r in reports:
        up = list(r.bytes_up.values())
        rounds.append({"round": r.round, **{f"seconds_{k}": v for k, v in r.seconds.items()},
                       "client_seconds": r.client_seconds, "bytes_down_per_client": r.bytes_down,
                       "bytes_up_per_client": statistics.mean(up) if up else 0,
                       "overhead_vs_client_compute": r.seconds["overhead"] / r.seconds["clients"]})
    total = {k: sum(x[f"seconds_{k}"] for x in rounds) for k in ("clients", "aggregate", "evaluate", "overhead",
                                                                   "total")}
    ratio = total["overhead"] / total["clients"]
    return {"rounds": rounds, "total_seconds": total, "overhead_vs_client_compute": ratio,
            "aggregate_vs_client_compute": total["aggregate"] / total["clients"],
            "overhead_below_20_percent": ratio < OVERHEAD_GOAL,
            "bytes_down_per_round_per_client": rounds[0]["bytes_down_per_client"] if rounds else 0,
            "bytes_up_per_round_per_client": statistics.mean(x["bytes_up_per_client"] for x in rounds) if rounds else 0}


def run_partition(work: Path, profile: str, partition: str, tasks: list[str], held_out: list[str],
                  overrides: dict[str, Any], test_cap: int) -> dict[str, Any]:
    from components.data.datasets import load_split
    from components.federated.clients import client_evaluator
    from components.federated.fedkim import evaluate_injected
    from components.nn.foundation import describe_text_foundation, load_foundation
    from components.core.layout import foundation_dir
    from components.stages.federated import FederatedInputs, _split_rows, run

    params = _params(profile, {"data.active": tasks, "federated.held_out": held_out, **overrides,
                               **PARTITIONS[partition]})
    seed = params.pipeline.seed
    base = work / partition
    data_dir, found_dir, out_dir = base / "data", work / "foundation", base / "federated"
    start = time.perf_counter()
    ensure_data(params, data_dir)
    if not (foundation_dir(found_dir, "text") / "manifest.json").is_file():
        describe_text_foundation(params.foundation, ROOT, foundation_dir(found_dir, "text"))
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    inp = FederatedInputs.from_params(params)

    def on_round(report: Any) -> None:
        print(f"[{partition}] round {report.round}: clients {report.seconds['clients']:.1f} s, aggregate "
              f"{report.seconds['aggregate']:.3f} s, overhead {report.seconds['overhead']:.3f} s; "
              + " ".join(f"{k} {v:.3f}" for k, v in report.metrics.items() if k.endswith("_macro_f1")), flush=True)

    t0 = time.perf_counter()
    with capture_stage() as kept:
        summary = run(inp, data_dir, found_dir, out_dir, on_round=on_round)
    stage_seconds = time.perf_counter() - t0
    if summary.skipped:
        raise SystemExit(f"the federated stage skipped: {summary.skipped}")
    print(f"[{partition}] stage {stage_seconds:.0f} s (clients {summary.client_seconds:.0f} s, server "
          f"{summary.server_seconds:.0f} s)", flush=True)

    found = load_foundation(found_dir, "text")
    client_tasks = list(summary.client_tasks)
    test = {t: load_split(data_dir, t, "test").subset(test_cap, seed) for t in tasks}
    client_test = {t: test[t] for t in client_tasks}
    evaluate_client = client_evaluator(client_test, tokenizer=found.tokenizer, max_length=found.max_length)

    t0 = time.perf_counter()
    scores: dict[str, dict[str, dict[str, float]]] = {
        "fedkim": {t: _pick(m) for t, m in evaluate_injected(kept["fedkim"], client_test).items()},
        "no_injection": {t: _pick(m) for t, m in evaluate_injected(kept["no_injection"], client_test).items()},
        "fedavg": per_task(evaluate_client(kept["federated"].model), client_tasks),
    }
    held = {t: {"fedkim": _pick(evaluate_injected(kept["fedkim"], {t: test[t]})[t]),
                "no_injection": _pick(evaluate_injected(kept["no_injection"], {t: test[t]})[t]),
                "val_fedkim": summary.held_out_val[t]["fedkim"], "val_no_injection": summary.held_out_val[t]["no_injection"]}
            for t in held_out}
    majority = {t: majority_class(load_split(data_dir, t, "train"), test[t]) for t in tasks}
    eval_seconds = time.perf_counter() - t0
    print(f"[{partition}] test evaluation {eval_seconds:.0f} s", flush=True)

    t0 = time.perf_counter()
    shards = kept["shards"]
    local = [per_task(evaluate_client(train_alone(kept, shard)), client_tasks) for shard in shards]
    local_seconds = time.perf_counter() - t0
    scores["local_only"] = {t: {k: statistics.mean(c[t][k] for c in local) for k in METRICS} for t in client_tasks}
    t0 = time.perf_counter()
    central = train_alone(kept, pooled(shards))
    scores["centralized"] = per_task(evaluate_client(central), client_tasks)
    central_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores["fedkim_centralized"] = {t: _pick(m) for t, m in evaluate_injected(inject_pooled(kept, central),
                                                                              client_test).items()}
    central_injection_seconds = time.perf_counter() - t0
    print(f"[{partition}] local-only {local_seconds:.0f} s, centralized {central_seconds:.0f} s, its injection "
          f"{central_injection_seconds:.0f} s", flush=True)

    metric = summary.metric or "macro_f1"
    table = {t: {m: scores[m][t] for m in MODELS} for t in client_tasks}
    for t in client_tasks:
        table[t]["local_only_per_client"] = [c[t] for c in local]
        print(f"[{partition}] {t:18s} " + "  ".join(f"{m} {table[t][m][metric]:.3f}" for m in MODELS), flush=True)

    def beats(a: str, b: str, key: str = metric) -> dict[str, bool]:
        return {t: table[t][a][key] > table[t][b][key] for t in client_tasks}

    def gap(upper: str, model: str, key: str = metric) -> dict[str, float]:
        return {t: table[t][upper][key] - table[t][model][key] for t in client_tasks}

    def held_gain_of(key: str) -> float | None:
        gains = [held[t]["fedkim"][key] - held[t]["no_injection"][key] for t in held_out]
        return statistics.mean(gains) if gains else None

    vs_none, vs_local = beats("fedkim", "no_injection"), beats("fedkim", "local_only")
    held_gain = [held[t]["fedkim"][metric] - held[t]["no_injection"][metric] for t in held_out]
    auc_none, auc_local, auc_held = beats("fedkim", "no_injection", "auroc"), beats("fedkim", "local_only", "auroc"), \
        held_gain_of("auroc")
    cost = timing(kept["federated"].reports)
    goals = {
        "metric": metric,
        "fedkim_beats_no_injection": vs_none, "fedkim_beats_no_injection_every_task": all(vs_none.values()),
        "fedkim_beats_local_only": vs_local, "fedkim_beats_local_only_every_task": all(vs_local.values()),
        "fedkim_beats_fedavg": beats("fedkim", "fedavg"),
        "held_out_mean_gain": statistics.mean(held_gain) if held_gain else None,
        "held_out_injected_beats_not_injected_on_average": bool(held_gain) and statistics.mean(held_gain) > 0,
        "held_out_gain": {t: held[t]["fedkim"][metric] - held[t]["no_injection"][metric] for t in held_out},
        # what federation costs: FedKIM on the pooled client model - FedKIM; and at the client level, pooled - FedAvg
        "gap_to_centralized": gap("fedkim_centralized", "fedkim"),
        "mean_gap_to_centralized": statistics.mean(gap("fedkim_centralized", "fedkim").values()),
        "client_gap_to_centralized": gap("centralized", "fedavg"),
        "mean_client_gap_to_centralized": statistics.mean(gap("centralized", "fedavg").values()),
        "overhead_vs_client_compute": cost["overhead_vs_client_compute"],
        "overhead_below_20_percent": cost["overhead_below_20_percent"],
        "by_auroc": {  # the same checks on AUROC (threshold-free), next to the primary metric's
            "fedkim_beats_no_injection": auc_none, "fedkim_beats_no_injection_every_task": all(auc_none.values()),
            "fedkim_beats_local_only": auc_local, "fedkim_beats_local_only_every_task": all(auc_local.values()),
            "held_out_mean_gain": auc_held,
            "held_out_injected_beats_not_injected_on_average": auc_held is not None and auc_held > 0,
            "mean_gap_to_centralized": statistics.mean(gap("fedkim_centralized", "fedkim", "auroc").values()),
            "mean_client_gap_to_centralized": statistics.mean(gap("centralized", "fedavg", "auroc").values())},
    }
    server_split = {t: tuple(map(len, _split_rows(load_split(data_dir, t, "val"), params.federated.server_fraction,
                                                  seed))) for t in tasks}  # the stage's (server train, server val)
    shard_sizes = [{t: len(d) for t, d in s.items()} for s in shards]
    label_counts = [{t: [int((d.labels == k).sum()) for k in range(d.num_labels)] for t, d in s.items()}
                    for s in shards]
    return {"client_tasks": client_tasks, "held_out": held_out, "table": table, "held_out_test": held,
            "majority_class_test": majority,
            "val": {"fedkim": summary.val, "no_injection": summary.val_no_injection},
            "test_samples": {t: len(d) for t, d in test.items()},
            "client_shards": {"rows": shard_sizes, "label_counts": label_counts},
            "timing": cost, "goals": goals,
            "seconds": {"partition": time.perf_counter() - start, "stage": stage_seconds,
                        "stage_clients": summary.client_seconds, "stage_server": summary.server_seconds,
                        "test_evaluation": eval_seconds, "local_only": local_seconds, "centralized": central_seconds,
                        "fedkim_centralized": central_injection_seconds},
            "params": {"rounds": params.federated.rounds, "local_epochs": params.federated.client.epochs,
                       "num_clients": params.data.federation.num_clients,
                       "partition": params.data.federation.partition,
                       "alpha": params.data.federation.alpha if partition == "dirichlet" else None,
                       "client_max_train_samples": params.federated.client.max_train_samples,
                       "client_class_weight": params.federated.client.class_weight,
                       "client_batch_size": params.federated.client.batch_size, "client_lr": params.federated.client.lr,
                       "client": params.federated.client.model_dump(mode="json"),
                       "server_fraction": params.federated.server_fraction,
                       "server_train_samples": {t: min(n, params.federated.injection.trainer.max_train_samples or n)
                                                for t, (n, _) in server_split.items() if t in client_tasks},
                       "server_val_samples": {t: v for t, (_, v) in server_split.items()},
                       "injection": params.federated.injection.model_dump(mode="json"),
                       "held_out_shots": params.federated.held_out_shots, "max_length": found.max_length}}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `bench federated` shares with `bench federated_seeds`."""
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--work", type=Path, help="folder for the data (per partition), the foundation record and the "
                                                   "stage outputs; default: a new temporary folder")
    parser.add_argument("--partitions", nargs="+", choices=list(PARTITIONS), default=list(PARTITIONS))
    parser.add_argument("--test-cap", type=int, default=300, help="test rows per task (the same for every model)")
    parser.add_argument("--held-out", nargs="+", default=HELD_OUT, metavar="TASK",
                        help=f"tasks no client trains on (default: {' '.join(HELD_OUT)})")


def work_folder(parser: argparse.ArgumentParser, args: argparse.Namespace, prefix: str) -> Path:
    """Checks ``--held-out``; the run's folder: ``--work``, or a new temporary one (printed)."""
    unknown = [t for t in args.held_out if t not in TASKS]
    if unknown:
        parser.error(f"--held-out {unknown}: not one of the shipped tasks {TASKS}")
    work = (args.work or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    print(f"work folder: {work}", flush=True)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench federated", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--rounds", type=int, help="federated rounds (default: the profile's federated.rounds)")
    parser.add_argument("--client-cap", type=int,
                        help="rows per client and task (federated.client.max_train_samples; default: the profile's)")
    parser.add_argument("--server-cap", type=int,
                        help="rows per task the server trains the injection on (federated.injection.trainer."
                             "max_train_samples; default: the profile's)")
    parser.add_argument("--server-epochs", type=int,
                        help="epochs of the server's injection training (federated.injection.trainer.max_epochs; "
                             "default: the profile's)")
    parser.add_argument("--server-fraction", type=float, default=0.8,
                        help="share of each validation split the server may train on (federated.server_fraction); "
                             "the rest is the stage's validation, scored after every server epoch")
    args = parser.parse_args()
    work = work_folder(parser, args, "medexperts-bench-federated-")
    start = time.perf_counter()
    overrides: dict[str, Any] = {"federated.server_fraction": args.server_fraction}
    if args.server_cap is not None:
        overrides["federated.injection.trainer.max_train_samples"] = args.server_cap
    if args.rounds is not None:
        overrides["federated.rounds"] = args.rounds
    if args.server_epochs is not None:
        overrides["federated.injection.trainer.max_epochs"] = args.server_epochs
    if args.client_cap is not None:
        overrides["federated.client.max_train_samples"] = args.client_cap
    results = {p: run_partition(work, args.profile, p, TASKS, args.held_out, overrides, args.test_cap)
               for p in args.partitions}
    wall = time.perf_counter() - start
    first = next(iter(results.values()))
    path = write_result("federated", {
        "params": {"profile": args.profile, "tasks": TASKS, "held_out": args.held_out, "partitions": args.partitions,
                   "test_cap": args.test_cap, "models": list(MODELS), "metrics": list(METRICS),
                   "overhead_goal": OVERHEAD_GOAL,
                   **{k: v for k, v in first["params"].items() if k not in ("partition", "alpha")}},
        "partitions": results, "wall_seconds": wall,
    })
    print(json.dumps({p: r["goals"] for p, r in results.items()}, indent=1))
    print(f"wall {wall:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
