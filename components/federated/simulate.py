"""In-process simulation: per-client data -> clients -> ``run_rounds`` on one machine (tests, CI, the stage).

Clients run one after another on one shared worker model (a copy of the global model): ``client_update`` loads
the global payload first and trains only the payload's parameters, so nothing carries over from one client to
the next. With ``timeout_s`` each client gets its own copy: an update that outlives the limit is left running
(``run_rounds``) and must not train the model the next client uses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from components.core.errors import DataError
from components.data.datasets import Inputs, TaskData
from components.federated.client import ClientResult, client_seed, client_update
from components.federated.payload import KeyFilter, Payload
from components.federated.rounds import Client, Evaluate, RoundReport, run_rounds
from components.metrics.classification import compute_metrics
from components.training.data import TensorDictDataset, labels_tensor
from components.training.inference import batched

Encode = Callable[[Inputs], dict[str, torch.Tensor]]  # raw inputs -> model inputs (e.g. ``Foundation.inputs``)


@dataclass
class Simulation:
    model: nn.Module  # the global model, holding the final aggregate
    payload: Payload
    reports: list[RoundReport]


def evaluator(val: TaskData, encode: Encode, batch_size: int = 256) -> Evaluate:
    """``model -> compute_metrics`` on ``val`` (encoded once), in eval mode; the model's mode is restored."""
    x, y = encode(val.inputs), labels_tensor(val.labels, val.kind)

    def evaluate(model: nn.Module) -> dict[str, float]:
        mode = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            logits = batched(model, {k: v.to(device) for k, v in x.items()}, batch_size).cpu()
        finally:
            model.train(mode)
        return compute_metrics(val.kind, logits, y, val.num_labels)

    return evaluate


def simulated_clients(worker: nn.Module | Sequence[nn.Module], data: Sequence[TaskData], encode: Encode, *,
                      epochs: int, batch_size: int, lr: float, weight_decay: float, mu: float,
                      seed: int) -> list[Client]:
    """One ``Client`` per shard, ids ``client_0``...; each encodes its shard once and updates ``worker`` (one
    model shared by all, or one per shard)."""
    workers = [worker] * len(data) if isinstance(worker, nn.Module) else list(worker)
    if len(workers) != len(data):
        raise DataError(f"{len(workers)} worker models for {len(data)} shards; give one per shard or one shared")
    kinds = {d.kind for d in data}
    if len(kinds) > 1:
        raise DataError(f"simulated clients must share one task kind; got {sorted(kinds)}")
    kind = kinds.pop() if kinds else "multiclass"  # no data: run_rounds refuses zero clients
    clients = []
    for i, (part, mine) in enumerate(zip(data, workers, strict=True)):
        ds = TensorDictDataset(encode(part.inputs), labels_tensor(part.labels, part.kind))

        def update(payload: Payload, round_: int, ds: TensorDictDataset = ds, i: int = i,
                   mine: nn.Module = mine) -> ClientResult:
            return client_update(mine, payload, ds, kind, epochs=epochs, batch_size=batch_size, lr=lr,
                                 weight_decay=weight_decay, mu=mu, seed=client_seed(seed, round_, i))

        clients.append(Client(f"client_{i}", len(part), update))
    return clients


def simulate(
    model_factory: Callable[[], nn.Module],
    data: Sequence[TaskData],
    encode: Encode,
    *,
    rounds: int,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    keys: KeyFilter = None,
    min_clients: int | None = None,
    max_norm: float | None = None,
    timeout_s: float | None = None,
    seed: int = 0,
    val: TaskData | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
) -> Simulation:
    """Federated training of ``model_factory()`` over one client per entry of ``data`` (e.g. ``shard_data``).

    The model is built under ``seed``; ``min_clients`` defaults to all clients; with ``val`` each round reports
    the aggregated model's validation metrics.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_factory()
    # same frozen weights as the global model, whatever the factory's randomness; one per client with timeout_s
    worker = copy.deepcopy(model) if timeout_s is None else [copy.deepcopy(model) for _ in data]
    clients = simulated_clients(worker, data, encode, epochs=epochs, batch_size=batch_size, lr=lr,
                                weight_decay=weight_decay, mu=mu, seed=seed)
    run = run_rounds(model, clients, rounds, min_clients=len(clients) if min_clients is None else min_clients,
                     max_norm=max_norm, timeout_s=timeout_s, keys=keys, on_round=on_round,
                     evaluate=None if val is None else evaluator(val, encode))
    return Simulation(model, run.payload, run.reports)
