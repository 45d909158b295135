"""One client's local update: load the global payload, train E epochs on the private shard, send back parameters.

Raw data never leaves the client: a ``ClientResult`` carries the payload's parameters, an example count, a mean
loss and a duration, nothing else.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from components.core import stop
from components.core.errors import DataError, ParamsError
from components.federated.aggregate import proximal_term
from components.federated.payload import Payload, load_payload, to_payload
from components.training.data import TensorDictDataset, loader
from components.training.module import task_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> scalar loss


@dataclass(frozen=True)
class ClientResult:
    """What a client sends back: the trained payload, the examples it trained on, its mean task loss
    (without the proximal term) over the local epochs, and the seconds the update took."""

    payload: Payload
    num_examples: int
    loss: float
    seconds: float


def client_seed(seed: int, round_: int, index: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client): each round reshuffles each shard."""
    return int(np.random.SeedSequence([seed, round_, index]).generate_state(1)[0])


def check_local(epochs: int, batch_size: int, lr: float, weight_decay: float, mu: float) -> None:
    """Local training settings in range (NaN fails every test and is refused)."""
    for name, value, ok in (("epochs", epochs, epochs >= 1), ("batch_size", batch_size, batch_size >= 1),
                            ("lr", lr, lr > 0), ("weight_decay", weight_decay, weight_decay >= 0),
                            ("mu", mu, mu >= 0)):
        if not ok:
            raise ParamsError(f"federated local training: {name}={value} is out of range "
                              "(epochs, batch_size >= 1; lr > 0; weight_decay, mu >= 0)")


@contextlib.contextmanager
def _train_only(model: nn.Module, names: set[str]) -> Iterator[list[nn.Parameter]]:
    """Exactly the payload's parameters require grad (no stray .grad on frozen weights); flags and the
    train/eval mode are restored afterwards, so a simulated worker model can be shared by clients."""
    params = dict(model.named_parameters())
    flags, mode = {n: p.requires_grad for n, p in params.items()}, model.training
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        model.train()
        yield [params[n] for n in params if n in names]
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(mode)


def client_update(
    model: nn.Module,
    payload: Payload,
    data: TensorDictDataset,
    loss: str | LossFn,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    seed: int = 0,
) -> ClientResult:
    """Load ``payload`` into ``model``, train its parameters (only those) for ``epochs`` with AdamW on ``data``,
    plus the FedProx term when ``mu > 0``; return the new payload (same keys).

    ``loss`` is a task kind ("binary", "multiclass", "multilabel": the training loss of the experts) or a
    callable. Deterministic for a given ``seed`` (batch order and any dropout); the global RNG is left as is.
    """
    check_local(epochs, batch_size, lr, weight_decay, mu)
    if len(data) == 0:
        raise DataError("federated client has no training examples")
    loss_fn = partial(task_loss, loss) if isinstance(loss, str) else loss
    t0 = time.perf_counter()
    load_payload(model, payload)
    with _train_only(model, set(payload)) as trained:
        device = trained[0].device
        params = dict(model.named_parameters())
        anchor = {k: v.to(device=params[k].device, dtype=params[k].dtype) for k, v in payload.items()} if mu else {}
        opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
        batches = loader(data, batch_size, shuffle=True, seed=seed)  # one generator: a new order every epoch
        total, seen = torch.zeros((), device=device), 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for _ in range(epochs):
                for batch in batches:
                    stop.check("a federated client's batch")
                    batch = {k: v.to(device) for k, v in batch.items()}
                    labels = batch.pop("labels")
                    batch.pop("task_ids", None)
                    task = loss_fn(model(**batch), labels)
                    objective = task + proximal_term(model, anchor, mu) if mu else task
                    opt.zero_grad(set_to_none=True)
                    objective.backward()
                    opt.step()
                    total += task.detach() * len(labels)  # on device: no host sync per step
                    seen += len(labels)
        new = to_payload(model, set(payload).__contains__)
    return ClientResult(new, len(data), float(total) / seen, time.perf_counter() - t0)
