"""Real multi-site runs on Flower (optional extra ``medexperts[flower]``): a thin ServerApp / ClientApp pair over
the same engine as the in-process simulator.

The ClientApp's train handler loads the global payload (fp32 arrays of Flower's ``ArrayRecord``), runs
``client_update`` on the SuperNode's own partition (read from ``--node-config``) and answers the new payload, its
example count and its mean loss. The ServerApp runs the rounds: it broadcasts the global payload to every connected
SuperNode at once, then hands the answers to the core's ``run_round`` (screening, missing clients, example-weighted
``fedavg`` in float64). Flower's own FedAvg strategy is not used: it averages in fp32 and screens nothing, so it
would be a second implementation that differs from the core in the last bits.

This module imports flwr at load time; nothing else in ``components`` imports it, so the library works without
flwr installed. It needs torch, numpy and the engine core (which reaches lightning and torchmetrics through
``components.training.module``), never Prefect, MLflow nor DVC: a site installs no orchestration stack.

What the run is set by (``[tool.flwr.app.config]`` of the Flower App, overridable by ``flwr run --run-config``):
``num-rounds``, ``local-epochs``, ``batch-size``, ``lr``, ``text-lr`` (FedKIM sites: the text tasks' local rate,
as ``federated.client.text_lr``; 0: ``lr``), ``weight-decay``, ``mu``, ``seed``, ``class-weight``
(FedKIM sites: ``balanced`` or ``none``, as ``federated.client.class_weight``), ``keys`` (comma-separated
fnmatch globs; empty: the parameters that require grad), ``task`` (binary / multiclass / multilabel), ``min-clients``,
``min-nodes`` (SuperNodes to wait for), ``max-norm`` (0: no bound), ``site-examples`` (a JSON object: each site's
client id -> the most examples it may report, as the hospitals declared them to the coordinator; empty: the counts
sites report are trusted), ``site-nodes`` (a JSON object: each site's client id -> the node id its key was
registered under, ``flwr supernode register``'s answer; empty: a site's ``client-id`` is its own claim),
``round-timeout`` and ``connect-timeout`` (seconds), ``model`` and ``data``
("module:callable" factories), ``model-config`` (a JSON object: the model factory's keyword arguments) and
``output-dir`` (where the server writes ``payload.pt`` and ``reports.json``; empty:
nothing is written). ``write_app`` writes such an App folder.

FedKIM's clients: ``model = "components.federated.flower:fedkim_model"`` with ``model-config = {"tasks": {task:
[modality, description, modality_description, num_labels, kind]}, ...}`` builds FedKIM's local model (one encoder
per modality, one head per task; ``medexperts flower-config`` prints the config that builds the federated stage's
own model, text foundation included) and ``data = "components.federated.flower:fedkim_npz_data"`` reads a hospital's
encoded shard (``write_site_shard``: one ``<task>.npz`` per task it holds); each SuperNode then trains its tasks one
after another exactly as the in-process simulator's FedKIM clients do (``client_updater``), and the server averages
whole local models. ``medexperts log-flower OUTPUT_DIR`` logs the finished run to MLflow, round by round.

Flower 1.41's SuperLink installs an App's dependencies with ``uv sync`` into a fresh environment by default, which
would lack this package: start it with ``--disable-runtime-dependency-installation`` (SuperNodes do not install).

A SuperNode's ``--node-config`` names its partition: ``partition-id`` (required: it seeds the client's local
shuffling exactly as client index ``i`` does in the simulator), optionally ``client-id`` (default
``client_<partition-id>``) and whatever the ``data`` factory reads (``data-path`` for ``npz_data``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, get_args

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from components.core.errors import ArtifactError, DataError, ParamsError
from components.federated.client import ClientResult, check_local, client_seed, client_update
from components.federated.clients import (CLIENT_DEFAULTS, ClientModel, LocalTask, client_updater,
                                         local_shard_digest, site_client_model)
from components.federated.payload import KeyFilter, Payload, to_payload
from components.federated.rounds import (FLOWER_PAYLOAD, FLOWER_REPORTS, Client, FederatedError, FederatedRun,
                                         RoundReport, flower_round_file, run_round)
from components.training.balance import ClassWeight
from components.training.data import TensorDictDataset

log = logging.getLogger("medexperts")

FLOWER_MINOR = "1.41"  # the one Flower minor version this adapter is written and tested against (pyproject extra)
KINDS = ("binary", "multiclass", "multilabel")
PAYLOAD, CONFIG, METRICS, CLIENT = "payload", "config", "metrics", "client"  # record names in a message


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FlowerSettings:
    """A run's settings, from the Flower run config (hyphenated keys, see the module docstring)."""

    num_rounds: int = 1
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    text_lr: float = CLIENT_DEFAULTS.text_lr or 0.0  # FedKIM sites: the text tasks' lr (0: lr), as federated.client
    weight_decay: float = 0.0
    mu: float = 0.0
    seed: int = 0
    class_weight: str = "balanced"  # FedKIM sites: each task's loss weighs its classes by the site's own shard
    keys: str = ""
    task: str = "binary"
    min_clients: int = 1
    min_nodes: int = 0  # 0: min_clients
    max_norm: float = 0.0
    site_examples: str = ""  # JSON object {client id: the most examples it may report}; "": counts are trusted
    site_nodes: str = ""  # JSON object {client id: its registered SuperNode's node id}; "": client ids are claims
    round_timeout: float = 600.0
    connect_timeout: float = 300.0
    model: str = "components.federated.flower:smoke_model"
    model_config: str = ""  # JSON object: keyword arguments of the model factory (e.g. fedkim_model's tasks)
    data: str = "components.federated.flower:smoke_data"
    output_dir: str = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowerSettings:
        """Known keys are type-checked; other keys are left to the model and data factories."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                continue
            value, kind = config[key], type(f.default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not kind:
                raise ParamsError(f"Flower run config {key}={value!r} must be a {kind.__name__}")
            values[f.name] = value
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        check_local(self.local_epochs, self.batch_size, self.lr, self.weight_decay, self.mu)
        if not self.text_lr >= 0:
            raise ParamsError(f"Flower run config text-lr={self.text_lr} must be >= 0 (0: lr)")
        if self.num_rounds < 1:
            raise ParamsError(f"Flower run config num-rounds={self.num_rounds} must be >= 1")
        if self.class_weight not in get_args(ClassWeight):
            raise ParamsError(f"Flower run config class-weight={self.class_weight!r} must be one of "
                              f"{list(get_args(ClassWeight))}")
        if self.task not in KINDS:
            raise ParamsError(f"Flower run config task={self.task!r} is not one of {list(KINDS)}")
        if self.min_clients < 1 or self.min_nodes < 0:
            raise ParamsError(f"Flower run config min-clients={self.min_clients} must be >= 1 and "
                              f"min-nodes={self.min_nodes} >= 0")
        for key, value in (("max-norm", self.max_norm), ("round-timeout", self.round_timeout),
                           ("connect-timeout", self.connect_timeout)):
            if not (value >= 0 if key == "max-norm" else value > 0):
                raise ParamsError(f"Flower run config {key}={value} is out of range")
        sizes, nodes = self.declared_examples, self.declared_nodes
        if sizes is not None and nodes is not None and set(sizes) != set(nodes):
            raise ParamsError("Flower run config site-examples and site-nodes must name the same sites; only in "
                              f"site-examples: {sorted(set(sizes) - set(nodes))}, only in site-nodes: "
                              f"{sorted(set(nodes) - set(sizes))}")

    @property
    def declared_examples(self) -> dict[str, int] | None:
        """``site-examples`` read: client id -> the most examples that site may report (None: no declaration)."""
        if not self.site_examples.strip():
            return None
        declared = config_object("site-examples", self.site_examples)
        if not declared or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                   for n in declared.values()):
            raise ParamsError("Flower run config site-examples must be a non-empty JSON object of client id -> "
                              f"example count >= 1, got {self.site_examples!r}")
        return {str(k): v for k, v in declared.items()}

    @property
    def declared_nodes(self) -> dict[str, int] | None:
        """``site-nodes`` read: client id -> the node id of the SuperNode registered for it (None: not bound)."""
        if not self.site_nodes.strip():
            return None
        declared = config_object("site-nodes", self.site_nodes)
        ids = list(declared.values())
        if not declared or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in ids) \
                or len(set(ids)) != len(ids):
            raise ParamsError("Flower run config site-nodes must be a non-empty JSON object of client id -> node id "
                              "(an integer >= 1, as `flwr supernode register` printed it; one per site), got "
                              f"{self.site_nodes!r}")
        return {str(k): v for k, v in declared.items()}

    @property
    def key_filter(self) -> KeyFilter:
        patterns = [p.strip() for p in self.keys.split(",") if p.strip()]
        return patterns or None

    @property
    def nodes_needed(self) -> int:
        return self.min_nodes or self.min_clients

    def as_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def config_object(key: str, text: str) -> dict[str, Any]:
    """A run-config value that holds a JSON object (``model-config``, ``site-examples``), read."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ParamsError(f"Flower run config {key} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ParamsError(f"Flower run config {key} must be a JSON object, got {type(value).__name__}")
    return value


def load_ref(ref: str) -> Callable[..., Any]:
    """``"package.module:attribute"`` -> the attribute (a model or data factory named in the run config)."""
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ParamsError(f"factory reference {ref!r} must look like 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ParamsError(f"cannot load factory {ref!r}: {exc}") from exc
    if not callable(obj):
        raise ParamsError(f"factory {ref!r} is not callable")
    return obj


def build_model(ref: str, seed: int, config: str = "") -> nn.Module:
    """The model every party builds alike: ``factory(**json.loads(config))`` under ``seed`` (as ``simulate``
    does), the global RNG left as it was. Frozen weights must agree across parties; real factories load them
    from disk."""
    kwargs = config_object("model-config", config) if config else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_ref(ref)(**kwargs)
    if not isinstance(model, nn.Module):
        raise ParamsError(f"model factory {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# --------------------------------------------------------------------------- payload <-> ArrayRecord
def to_record(payload: Payload) -> ArrayRecord:
    """The payload as fp32 numpy arrays, keys and order kept."""
    return ArrayRecord({k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in
                        payload.items()})


def from_record(record: ArrayRecord) -> Payload:
    """Back to a payload; anything but fp32 is refused (what travels is fp32 by contract)."""
    out: Payload = {}
    for key, array in record.items():
        value = array.numpy()
        if value.dtype != np.float32:
            raise ArtifactError(f"payload array {key!r} arrived as {value.dtype}; payloads travel as float32")
        out[key] = torch.from_numpy(np.array(value, copy=True))
    return out


# --------------------------------------------------------------------------- the client side
_MODELS: dict[tuple[str, int], nn.Module] = {}
_DATA: dict[tuple[str, str], TensorDictDataset] = {}
_DIGESTS: dict[tuple[str, str], str] = {}  # the same keys: local_shard_digest of each partition, reported each round


def _node_key(node_config: Mapping[str, Any]) -> str:
    return json.dumps(dict(node_config), sort_keys=True, default=str)


def partition_of(node_config: Mapping[str, Any]) -> tuple[int, str]:
    """(partition index, client id) from a SuperNode's ``--node-config``."""
    pid = node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ParamsError(f"SuperNode --node-config needs partition-id=<int >= 0>; got {pid!r}")
    client_id = node_config.get("client-id", f"client_{pid}")
    if not isinstance(client_id, str) or not client_id:
        raise ParamsError(f"SuperNode --node-config client-id={client_id!r} must be a non-empty string")
    return pid, client_id


def local_update(content: RecordDict, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> RecordDict:
    """The train handler's work, without Flower's transport: one ``client_update`` on this node's partition."""
    settings = FlowerSettings.from_config(run_config)
    pid, client_id = partition_of(node_config)
    cfg = content.config_records[CONFIG]
    round_ = int(cfg["round"])
    payload = from_record(content.array_records[PAYLOAD])
    model_key = (settings.model, settings.model_config, settings.seed)
    data_key = (settings.data, _node_key(node_config))
    if model_key not in _MODELS:  # one worker model per process: client_update trains only the payload's keys
        _MODELS[model_key] = build_model(settings.model, settings.seed, settings.model_config)
    if data_key not in _DATA:
        data = load_ref(settings.data)(dict(node_config))
        if not isinstance(data, (TensorDictDataset, Mapping)):
            raise ParamsError(f"data factory {settings.data!r} returned {type(data).__name__}, not a "
                              "TensorDictDataset (one task) or a mapping task -> LocalTask (FedKIM)")
        digest = local_shard_digest(data)  # before caching: a shard that cannot be hashed is refused every round
        _DATA[data_key], _DIGESTS[data_key] = data, digest
    data, worker = _DATA[data_key], _MODELS[model_key]
    common = dict(epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
                  weight_decay=float(cfg["weight-decay"]), mu=float(cfg["mu"]))
    if isinstance(data, Mapping):  # FedKIM: a hospital's tasks, one after another (as the in-process simulator)
        if not isinstance(worker, ClientModel):
            raise ParamsError(f"a multi-task (FedKIM) shard needs a ClientModel; model factory {settings.model!r} "
                              f"built {type(worker).__name__}")
        unknown = sorted(set(data) - set(worker.heads))
        if unknown:
            raise DataError(f"{client_id}: holds tasks {unknown} the federation's model has no head for "
                            f"(its tasks: {sorted(worker.heads)})")
        result = client_updater(worker, data, index=pid, seed=int(cfg["seed"]),
                                class_weight=str(cfg.get("class-weight", "balanced")),
                                text_lr=float(cfg.get("text-lr", 0.0)) or None, **common)(payload, round_)
    else:
        result = client_update(worker, payload, data, str(cfg["task"]), **common,
                               seed=client_seed(int(cfg["seed"]), round_, pid))
    return RecordDict({
        PAYLOAD: to_record(result.payload),
        METRICS: MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "seconds": result.seconds}),
        CLIENT: ConfigRecord({"client-id": client_id, "partition-id": pid, "shard-sha256": _DIGESTS[data_key]}),
    })


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return Message(local_update(msg.content, context.node_config, context.run_config), reply_to=msg)


# --------------------------------------------------------------------------- the server side
def wait_for_nodes(grid: Grid, needed: int, timeout_s: float) -> list[int]:
    """The connected SuperNodes once at least ``needed`` are there; ``FederatedError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() > deadline:
            raise FederatedError(f"{len(nodes)} SuperNodes connected after {timeout_s:g}s; the run needs {needed} "
                                 "(min-nodes / min-clients)")
        time.sleep(1.0)


class _Answer(NamedTuple):
    client_id: str | None
    partition: int
    result: ClientResult | None
    why: str  # why it is unusable ("" when it is)
    shard: str = ""  # the site's local_shard_digest ("" from a site that sends none)


def _answer(reply: Message) -> _Answer:
    """One reply, read."""
    if reply.has_error():
        return _Answer(None, -1, None, f"error reply: {reply.error.reason}")  # the ClientApp's, or the SuperLink's
    try:
        content = reply.content
        metrics, client = content.metric_records[METRICS], content.config_records[CLIENT]
        result = ClientResult(from_record(content.array_records[PAYLOAD]), int(metrics["num-examples"]),
                              float(metrics["loss"]), float(metrics["seconds"]))
        return _Answer(str(client["client-id"]), int(client["partition-id"]), result, "",
                       str(client.get("shard-sha256", "")))
    except (KeyError, TypeError, ValueError, ArtifactError) as exc:
        return _Answer(None, -1, None, f"malformed reply: {type(exc).__name__}: {exc}")


def _prefetched(client_id: str, result: ClientResult | None, why: str, declared: dict[str, int] | None) -> Client:
    """A core ``Client`` whose update is the answer already received (or the reason none was). Its shard size, what
    the core checks the reported count against, is the site's declared count (``site-examples``); without a
    declaration, the count it reports."""
    if result is not None and declared is not None and client_id not in declared:
        result, why = None, f"client id {client_id!r} is not in site-examples (the sites declared to the coordinator)"

    def update(_payload: Payload, _round: int) -> ClientResult:
        if result is None:
            raise FederatedError(why)
        return result

    if result is None:
        return Client(client_id, 1, update)
    return Client(client_id, declared[client_id] if declared is not None else result.num_examples, update)


def flower_round(grid: Grid, model: nn.Module, nodes: Sequence[int], round_: int,
                 settings: FlowerSettings) -> RoundReport:
    """Broadcast the global payload to ``nodes`` at once, wait up to ``round-timeout``, then the core's
    ``run_round`` screens and averages the answers (in partition order, as the simulator orders its clients)."""
    glob = to_payload(model, settings.key_filter)
    content = RecordDict({
        PAYLOAD: to_record(glob),
        CONFIG: ConfigRecord({"round": round_, "local-epochs": settings.local_epochs,
                              "batch-size": settings.batch_size, "lr": settings.lr, "text-lr": settings.text_lr,
                              "weight-decay": settings.weight_decay, "mu": settings.mu, "seed": settings.seed,
                              "class-weight": settings.class_weight, "task": settings.task}),
    })
    messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(round_))
                for node in nodes]
    t0 = time.perf_counter()
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
    wall = time.perf_counter() - t0
    # Whom a reply is from: the node its instruction went to. The SuperLink itself answers for a node that stopped
    # sending heartbeats ("Node Unavailable"), from its own node id, so src_node_id alone would count that site twice
    # (once under the SuperLink's id, once as silent). The grid sets each instruction's message id as it pushes it.
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    by_instruction = "" not in sent and len(sent) == len(messages)
    answers: dict[str, tuple[ClientResult | None, str]] = {}
    order: dict[str, tuple[int, int, str]] = {}  # usable answers by partition id first, then the rest
    replied, shards = set(), {}
    bound = settings.declared_nodes
    site_of = {node: cid for cid, node in (bound or {}).items()}  # a bound node's entry is filed under its site
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id) if by_instruction else \
            reply.metadata.src_node_id
        replied.add(node)
        client_id, pid, result, why, shard = _answer(reply)
        if bound is not None and client_id is not None and bound.get(client_id) != int(node):
            # Filed under the node, not the id it claims: the site registered for that id still answers as itself.
            why = (f"client id {client_id!r} is not in site-nodes" if client_id not in bound else
                   f"client id {client_id!r} belongs to SuperNode {bound[client_id]} (site-nodes), not to node {node}")
            client_id, result = None, None
        if client_id is None or client_id in answers:
            why = why or f"client id {client_id!r} is used by another SuperNode too (check --node-config)"
            client_id, result = site_of.get(int(node), f"node_{node}"), None
        elif shard:
            shards[client_id] = shard
        answers[client_id] = (result, why)
        order[client_id] = (0, pid, client_id) if result is not None else (1, node, client_id)
    for node in nodes:
        if node not in replied:
            name = site_of.get(int(node), f"node_{node}")
            answers[name] = (None, f"no reply within round-timeout={settings.round_timeout:g}s")
            order[name] = (1, node, name)
    declared = settings.declared_examples
    clients = [_prefetched(cid, *answers[cid], declared) for cid in sorted(answers, key=order.__getitem__)]
    max_norm = settings.max_norm or None
    report = run_round(model, clients, round_, min_clients=settings.min_clients, max_norm=max_norm, timeout_s=None,
                       keys=settings.key_filter, evaluate=None)
    # the core timed look-ups of answers already here: report the clients' own training time and the broadcast
    report.client_seconds = {cid: res.seconds for cid, (res, _) in answers.items() if res is not None}
    report.client_shards = {c: shards[c] for c in report.accepted if c in shards}  # the rows that trained the model
    report.seconds["clients"] = wall
    report.seconds["total"] += wall
    return report


def run_server(grid: Grid, settings: FlowerSettings,
               on_round: Callable[[RoundReport], None] | None = None) -> FederatedRun:
    """``num-rounds`` rounds over the connected SuperNodes. With ``output-dir`` set, each round's aggregate is kept
    as it ends (``rounds/round_0001.pt``, ...: the federated stage evaluates them for the per-round curve, and a run
    that stops half-way keeps its finished rounds), then the final payload and the reports. The output-dir must be
    new or empty: one holding another run's files is refused before any round starts (this run would overwrite or
    mix with them)."""
    out = Path(settings.output_dir) if settings.output_dir else None
    if out is not None and out.exists() and not out.is_dir():
        raise FederatedError(f"output-dir {out} is a file, not a folder")
    if out is not None and any(out.glob("*")):
        held = sorted(p.name for p in out.iterdir())
        raise FederatedError(f"output-dir {out} is not empty (it holds {', '.join(held[:5])}"
                             f"{', ...' if len(held) > 5 else ''}: another run's); give this run a new output-dir "
                             "(flwr run ... --run-config 'output-dir=\"/new/folder\"'), or move those files away")
    model = build_model(settings.model, settings.seed, settings.model_config)
    reports: list[RoundReport] = []
    for r in range(1, settings.num_rounds + 1):
        nodes = wait_for_nodes(grid, settings.nodes_needed, settings.connect_timeout)
        report = flower_round(grid, model, nodes, r, settings)
        log.info("[federated] flower round %d/%d: %d accepted, %d missing, %d rejected", r, settings.num_rounds,
                 len(report.accepted), len(report.missing), len(report.rejected))
        reports.append(report)
        if out is not None:
            _save(to_payload(model, settings.key_filter), flower_round_file(out, r))
        if on_round is not None:
            on_round(report)
    run = FederatedRun(to_payload(model, settings.key_filter), reports)
    if out is not None:
        save_run(run, out)
    return run


def _save(payload: Payload, path: Path) -> None:
    """``torch.save`` through a temporary file, so a reader never sees half a payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path.with_name(path.name + ".tmp"))
    path.with_name(path.name + ".tmp").replace(path)


def save_run(run: FederatedRun, folder: Path) -> None:
    """``payload.pt`` (the final global payload), then ``reports.json`` (one ``RoundReport`` per round): the reports
    last, as their presence is what marks the run finished."""
    folder.mkdir(parents=True, exist_ok=True)
    _save(run.payload, folder / FLOWER_PAYLOAD)
    (folder / f"{FLOWER_REPORTS}.tmp").write_text(json.dumps([dataclasses.asdict(r) for r in run.reports], indent=1))
    (folder / f"{FLOWER_REPORTS}.tmp").replace(folder / FLOWER_REPORTS)


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    run_server(grid, FlowerSettings.from_config(context.run_config))


# --------------------------------------------------------------------------- the Flower App folder
def write_app(folder: str | Path, name: str = "medexperts-federated", **config: Any) -> Path:
    """A Flower App folder (``pyproject.toml`` only): its components are this module's apps, found on the
    SuperLink's and SuperNodes' Python path (PYTHONPATH or an installed ``medexperts``); ``config`` overrides the
    run-config defaults (Python names or hyphenated keys)."""
    defaults = FlowerSettings().as_run_config()
    for key, value in config.items():
        key = key.replace("_", "-")
        defaults[key] = value
    FlowerSettings.from_config(defaults)  # fail here, not on the SuperLink
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[project]", f'name = "{name}"', 'version = "1.0.0"',
        'description = "MedExperts federated training (components.federated.flower)"',
        f'dependencies = ["flwr>={FLOWER_MINOR}.0,<{_next_minor(FLOWER_MINOR)}"]', "",
        "[tool.flwr.app]", 'publisher = "medexperts"', "",
        "[tool.flwr.app.components]", f'serverapp = "{__name__}:server_app"', f'clientapp = "{__name__}:client_app"',
        "", "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in defaults.items()]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def _next_minor(version: str) -> str:
    major, minor = version.split(".")
    return f"{major}.{int(minor) + 1}"


# --------------------------------------------------------------------------- data and model factories
def npz_data(node_config: Mapping[str, Any]) -> TensorDictDataset:
    """A site's encoded shard from ``data-path`` (an ``.npz``): ``labels`` plus one array per model input."""
    path = node_config.get("data-path")
    if not isinstance(path, str) or not path:
        raise ParamsError("SuperNode --node-config needs data-path=\"/path/to/shard.npz\" for the npz_data factory")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except OSError as exc:
        raise DataError(f"cannot read the shard {path}: {exc}") from exc
    if "labels" not in arrays:
        raise DataError(f"{path} has no 'labels' array (it has {sorted(arrays)})")
    labels = torch.as_tensor(arrays.pop("labels"))
    return TensorDictDataset({k: torch.as_tensor(v) for k, v in arrays.items()}, labels)


# FedKIM's local model from the run config's ``model-config`` (``clients.site_model_config`` writes one that builds
# the federated stage's own model): a factory every site imports as components.federated.flower:fedkim_model
fedkim_model = site_client_model


SITE_TASKS = "tasks.json"


def write_site_shard(folder: str | Path, tasks: Mapping[str, LocalTask]) -> Path:
    """A hospital's encoded shard for ``fedkim_npz_data``: ``<task>.npz`` (its model inputs and ``labels``) per task
    and ``tasks.json`` (modality and kind); ``encode_shard`` of the in-process path gives ``tasks``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task, local in tasks.items():
        arrays = {k: v.cpu().numpy() for k, v in local.data.inputs.items()}
        np.savez(folder / f"{task}.npz", labels=local.data.labels.cpu().numpy(), **arrays)
    (folder / SITE_TASKS).write_text(json.dumps({t: {"modality": lt.modality, "kind": lt.kind}
                                                 for t, lt in tasks.items()}, indent=1))
    return folder


def fedkim_npz_data(node_config: Mapping[str, Any]) -> dict[str, LocalTask]:
    """A hospital's FedKIM shard from ``data-path`` (a folder written by ``write_site_shard``)."""
    path = node_config.get("data-path")
    if not isinstance(path, str) or not path:
        raise ParamsError("SuperNode --node-config needs data-path=\"/path/to/site-folder\" for fedkim_npz_data")
    folder = Path(path)
    try:
        spec = json.loads((folder / SITE_TASKS).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / SITE_TASKS}: cannot read the site's task list ({exc})") from None
    out = {}
    for task, info in spec.items():
        data = npz_data({"data-path": str(folder / f"{task}.npz")})
        out[task] = LocalTask(info["modality"], info["kind"], data)
    if not out:
        raise DataError(f"{folder}: the site holds no task")
    return out


class SmokeMLP(nn.Module):
    """A frozen 'foundation' layer, a trainable body and a head: checks a deployment end to end in seconds."""

    def __init__(self, d: int = 4, h: int = 8, k: int = 2) -> None:
        super().__init__()
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.body = nn.Linear(d, h)
        self.head = nn.Linear(h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.frozen(x) + x)))


def smoke_model() -> nn.Module:
    return SmokeMLP()


def smoke_data(node_config: Mapping[str, Any]) -> TensorDictDataset:
    """Synthetic, linearly separable binary data for partition ``partition-id`` (``num-examples`` rows, default
    48 + 16 * partition-id, so example weights differ): no patient data needed to test a deployment."""
    pid, _ = partition_of(node_config)
    n = node_config.get("num-examples", 48 + 16 * pid)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParamsError(f"smoke_data: num-examples={n!r} must be an integer >= 1")
    w = np.random.default_rng(0).normal(size=4)
    x = np.random.default_rng(1000 + pid).normal(size=(n, 4)).astype(np.float32)
    y = (x @ w > 0).astype(np.int64)
    return TensorDictDataset({"x": torch.from_numpy(x)}, torch.from_numpy(y))

