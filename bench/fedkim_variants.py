"""FedKIM's server step, varied on ONE federation: where does the injection help, where does the server's own
training hurt? `medexperts bench fedkim_variants [--partition iid] [--server-fraction 0.8] [--work DIR]`
-> bench/results/fedkim_variants.json (or --result NAME)

The federated stage's own code runs once (`components.stages.federated.run`, the profile's settings, the bench
federated tasks without a held-out task). The bench keeps the aggregated client model and the no-injection
foundation the stage builds, then re-runs the server step in several variants on the same clients and the same
server rows, each scored on the server's validation rows (what the stage can see when it picks an epoch) and on the
whole test split (what a user gets):

- no_injection: the frozen foundation, heads fitted as the experts' probe (the stage's baseline);
- stage: the stage's FedKIM (heads start from no_injection's, 10 server epochs, best epoch on validation);
- untrained_plain_heads: the injected model before the server trains it, with no_injection's heads;
- untrained_own_probe: the same, heads fitted as a probe on the injected model's own features;
- trained_own_probe: the stage's training, heads starting from that probe;
- frozen_heads_then_probe: the stage's training with the heads frozen, then the heads refitted as a probe;
- lr_x0.3 / lr_x0.1 / epochs_3: the stage's training with a lower learning rate or fewer epochs;
- preserve_1 / _3 / _10: the stage's training from no_injection's heads with that knowledge-preservation weight;
- untrained_probe_no_client_heads / untrained_probe_client_heads: untrained_own_probe with the heads reading the
  pooled feature alone / also the aggregated client heads' log-probabilities;
- stage_no_client_heads / stage_client_heads: the stage's server step (probe start, its preservation weight)
  without / with the client heads' log-probabilities;
- fedavg: the aggregated client model itself (its own encoders and heads): what the clients learned.

Every other injected variant reads the client heads as the params say (``federated.injection.client_heads``, off
by default: there `stage` is `stage_no_client_heads`; `--set federated.injection.client_heads=true` turns it on).

`--set KEY=VALUE` (repeatable, VALUE read as YAML) changes a parameter of the run, e.g.
`--set federated.client.text_layers=[0,1,2]`; the changes are recorded in the result.

One seed; test macro-F1 differences under about 0.03 are within the noise of a few hundred test rows.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, write_result
from bench.federated import HELD_OUT, PARTITIONS, TASKS, _params, _pick, capture_stage, ensure_data, per_task


# the tasks and held-out list are the bench's; the foundation and data of a reused --work are not rebuilt
FIXED = ("data.", "federated.held_out", "foundation.")


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench fedkim_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--partition", choices=sorted(PARTITIONS), default="iid")
    parser.add_argument("--server-fraction", type=float, default=0.8,
                        help="share of each validation split the server trains on (the rest: its validation)")
    parser.add_argument("--variants", nargs="*", help="run only these variants (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="changes",
                        help="a parameter change, VALUE read as YAML (repeatable)")
    parser.add_argument("--result", default="fedkim_variants")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()

    import yaml
    from torch import nn

    from components.core.layout import foundation_dir
    from components.data.datasets import load_split
    from components.federated.clients import client_evaluator
    from components.federated.fedkim import build_injected, evaluate_injected, fit_probe_heads, train_injected
    from components.nn.foundation import describe_text_foundation, load_foundation
    from components.stages.federated import FederatedInputs, _specs, _split_rows, run

    tasks = [t for t in TASKS if t not in HELD_OUT]
    changes = {}
    for change in args.changes:
        key, sep, value = change.partition("=")
        if not sep or not key:
            parser.error(f"--set takes KEY=VALUE, got {change!r}")
        if key.startswith(FIXED):  # what the bench itself decides, or what a reused --work would keep stale
            parser.error(f"--set {key}: the bench fixes {', '.join(FIXED)}")
        changes[key] = yaml.safe_load(value)
    if changes and args.result == parser.get_default("result"):
        parser.error("with --set, name the result (--result NAME): the default one is the unchanged run")
    params = _params(args.profile, {"data.active": tasks, "federated.held_out": [],
                                    "federated.server_fraction": args.server_fraction, **PARTITIONS[args.partition],
                                    **changes})
    seed, fp = params.pipeline.seed, params.federated
    ip = fp.injection
    work = (args.work or Path(tempfile.mkdtemp(prefix="medexperts-bench-fedkim-variants-"))).resolve()
    data_dir, found_dir, out_dir = work / "data", work / "foundation", work / "federated"
    ensure_data(params, data_dir)
    if not (foundation_dir(found_dir, "text") / "manifest.json").is_file():
        describe_text_foundation(params.foundation, ROOT, foundation_dir(found_dir, "text"))
    out_dir.mkdir(parents=True, exist_ok=True)
    inp = FederatedInputs.from_params(params)
    start = time.perf_counter()
    with capture_stage() as kept:
        run(inp, data_dir, found_dir, out_dir)
    found = load_foundation(found_dir, "text")
    specs = _specs(inp, tasks)
    server = {t: _split_rows(load_split(data_dir, t, "val"), fp.server_fraction, seed) for t in tasks}
    own_train = {t: server[t][0].subset(ip.trainer.max_train_samples, seed) for t in tasks}
    own_val = {t: server[t][1] for t in tasks}
    test = {t: load_split(data_dir, t, "test") for t in tasks}
    clients = kept["federated"].model
    plain_heads = kept["no_injection"].heads.state_dict()

    def fresh(heads: str, client_heads: bool = ip.client_heads) -> Any:
        model = build_injected(found, clients, specs, num_experts=ip.num_experts, rank=ip.rank, alpha=ip.alpha,
                               targets=ip.targets, extra_tokens=ip.extra_tokens, seed=seed,
                               client_heads={t: clients.heads[t] for t in specs} if client_heads else None)
        if heads == "plain":  # no_injection's heads; the client log-probabilities (if read) start at weight zero
            widen = model.feature_dim - kept["no_injection"].feature_dim
            model.heads.load_state_dict({k: nn.functional.pad(v, (0, widen)) if k.endswith(".weight") else v
                                         for k, v in plain_heads.items()})
        else:
            fit_probe_heads(model, own_train, own_val, inp.probe, inp.metric, seed)
        return model

    def trained(heads: str = "plain", freeze_heads: bool = False, preserve: float = 0.0,
                client_heads: bool = ip.client_heads, **change: Any) -> Any:
        model = fresh(heads, client_heads)
        model.heads.requires_grad_(not freeze_heads)
        train_injected(model, own_train, own_val, trainer=ip.trainer.model_copy(update=change), seed=seed,
                       monitor=inp.metric, preserve=preserve, reference=kept["no_injection"])
        if freeze_heads:
            model.heads.requires_grad_(True)
            fit_probe_heads(model, own_train, own_val, inp.probe, inp.metric, seed)
        return model

    variants = {
        "no_injection": lambda: kept["no_injection"],
        "stage": lambda: kept["fedkim"],
        "untrained_plain_heads": lambda: fresh("plain"),
        "untrained_own_probe": lambda: fresh("probe"),
        "trained_own_probe": lambda: trained("probe"),
        "frozen_heads_then_probe": lambda: trained(freeze_heads=True),
        "lr_x0.3": lambda: trained(lr=ip.trainer.lr * 0.3),
        "lr_x0.1": lambda: trained(lr=ip.trainer.lr * 0.1),
        "epochs_3": lambda: trained(max_epochs=3),
        "preserve_1": lambda: trained(preserve=1.0),
        "preserve_3": lambda: trained(preserve=3.0),
        "preserve_10": lambda: trained(preserve=10.0),
        "untrained_probe_no_client_heads": lambda: fresh("probe", client_heads=False),
        "untrained_probe_client_heads": lambda: fresh("probe", client_heads=True),
        "stage_no_client_heads": lambda: trained("probe", preserve=ip.preserve, client_heads=False),
        "stage_client_heads": lambda: trained("probe", preserve=ip.preserve, client_heads=True),
    }
    chosen = args.variants or list(variants)
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(variants)}")
    results: dict[str, dict[str, Any]] = {}

    def show(name: str) -> None:
        r = results[name]
        print(f"{name:24s} " + "  ".join(f"{t[:10]} val {r['val'][t]['macro_f1']:.3f} test {r['test'][t]['macro_f1']:.3f}/"
                                         f"{r['test'][t]['auroc']:.3f}" for t in tasks), flush=True)

    evaluate_val = client_evaluator(own_val, tokenizer=found.tokenizer, max_length=found.max_length)
    evaluate_test = client_evaluator(test, tokenizer=found.tokenizer, max_length=found.max_length)
    results["fedavg"] = {split: per_task(evaluate(clients), tasks)
                         for split, evaluate in (("val", evaluate_val), ("test", evaluate_test))}
    show("fedavg")
    for name in chosen:
        t0 = time.perf_counter()
        model = variants[name]()
        results[name] = {"val": {t: _pick(m) for t, m in evaluate_injected(model, own_val).items()},
                         "test": {t: _pick(m) for t, m in evaluate_injected(model, test).items()},
                         "seconds": time.perf_counter() - t0}
        show(name)
        del model
    write_result(args.result, {
        "params": {"profile": args.profile, "partition": params.data.federation.partition,
                   "server_fraction": fp.server_fraction,
                   "tasks": tasks, "seed": seed, "changes": changes, "injection": ip.model_dump(mode="json"),
                   "server_train_rows": {t: len(d) for t, d in own_train.items()},
                   "server_val_rows": {t: len(d) for t, d in own_val.items()},
                   "test_rows": {t: len(d) for t, d in test.items()}},
        "variants": results, "wall_seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()
