"""The server's round loop: broadcast the global payload, collect client updates, screen, FedAvg, evaluate.

Clients are plain callables, so the in-process simulator and a Flower adapter plug into the same loop. In the
simulator clients run one after another; with ``timeout_s`` each runs in a thread the round waits on for at most
that long. A client with no answer by then is missing and the round goes on over the others; Python cannot kill a
thread, so its update is left running (a daemon thread, on its own model copy) and the client takes no new round
until it ends, and whatever it then returns is discarded. Such a run is not reproducible from its seed: the update
left running shares torch's global random generator (dropout) and the cores with what runs after it. A client that
answers in time but whose own clock says it took longer is dropped too. The Flower path enforces the budget on
the SuperLink (round timeout).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import NamedTuple

import torch
from torch import nn

from components.core import stop
from components.core.errors import ArtifactError, MedExpertsError, ParamsError
from components.core.fingerprint import sha256_file, tree_hash
from components.federated.aggregate import fedavg, screen
from components.federated.client import ClientResult
from components.federated.payload import KeyFilter, Payload, clone_payload, load_payload, payload_bytes, to_payload

log = logging.getLogger("medexperts")

UpdateFn = Callable[[Payload, int], ClientResult]  # (global payload, round number) -> the client's result
Evaluate = Callable[[nn.Module], dict[str, float]]


class FederatedError(MedExpertsError):
    """A federated round cannot complete: too few clients answered or passed screening."""


@dataclass(frozen=True)
class Client:
    """A federated participant: its id (lower_snake, used in metric names), its shard size, its update."""

    id: str
    num_examples: int
    update: UpdateFn


@dataclass
class RoundReport:
    """One round, as the stage logs it (MLflow step = ``round``)."""

    round: int
    client_losses: dict[str, float]  # accepted and rejected clients' mean local loss
    num_examples: dict[str, int]  # accepted clients' FedAvg weights
    accepted: list[str]
    missing: dict[str, str]  # client id -> why no update arrived (exception, timeout)
    rejected: dict[str, str]  # client id -> why its update was screened out
    metrics: dict[str, float]  # evaluate() of the aggregated model
    # clients (sum of client wall times), aggregate (FedAvg + load), evaluate, overhead (payload copies,
    # screening), total
    seconds: dict[str, float]
    client_seconds: dict[str, float]
    bytes_down: int  # global payload sent to each client
    bytes_up: dict[str, int] = field(default_factory=dict)  # payload received from each answering client
    # answering client -> sha256 of the rows it trained on, as the client reports it (Flower sites:
    # clients.local_shard_digest); the simulator's clients are hashed by the stage (shards.shard_digest)
    client_shards: dict[str, str] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        """Flat name -> value for step-wise logging."""
        out: dict[str, float] = {f"val_{k}": v for k, v in self.metrics.items()}
        out |= {"clients_accepted": len(self.accepted), "clients_missing": len(self.missing),
                "clients_rejected": len(self.rejected), "bytes_down_per_client": self.bytes_down,
                "bytes_up_total": sum(self.bytes_up.values())}
        out |= {f"seconds_{k}": v for k, v in self.seconds.items()}
        out |= {f"loss_{c}": v for c, v in self.client_losses.items()}
        if self.client_losses and self.num_examples:
            n = sum(self.num_examples.values())
            out["train_loss"] = sum(self.client_losses[c] * k for c, k in self.num_examples.items()) / n
        return out


def read_reports(path: Path) -> list[RoundReport]:
    """The ``RoundReport``s a Flower ServerApp wrote (``reports.json`` of its ``output-dir``); a missing or malformed
    file is an ``ArtifactError`` naming it."""
    import json

    try:
        raw = json.loads(Path(path).read_text())
        reports = [RoundReport(**r) for r in raw]
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no round reports (the Flower server writes reports.json to its output-dir when "
                            "its run is done)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: not a list of round reports ({type(exc).__name__}: {exc})") from None
    if not reports:
        raise ArtifactError(f"{path}: holds no rounds")
    return reports


class FederatedRun(NamedTuple):
    payload: Payload  # the final global payload
    reports: list[RoundReport]


def reported_shards(reports: Sequence[RoundReport]) -> dict[str, str]:
    """Each client's shard hash as it reported it over the rounds; a client whose hash changed between rounds (its
    rows changed mid-run) keeps every hash it sent, in round order, joined by ","."""
    seen: dict[str, list[str]] = {}
    for report in reports:
        for client, digest in report.client_shards.items():
            if digest not in seen.setdefault(client, []):
                seen[client].append(digest)
    return {client: ",".join(digests) for client, digests in sorted(seen.items())}


FLOWER_PAYLOAD, FLOWER_REPORTS = "payload.pt", "reports.json"  # what a Flower ServerApp writes to its output-dir
FLOWER_ROUNDS = "rounds"  # ... and, as each round ends, that round's aggregate: rounds/round_0001.pt, ...


def flower_round_file(folder: Path, round_: int) -> Path:
    """Where a Flower ServerApp keeps round ``round_``'s aggregate inside its output-dir."""
    return Path(folder) / FLOWER_ROUNDS / f"round_{round_:04d}.pt"


def flower_run_hashes(folder: Path) -> dict[str, str]:
    """``<file>_sha256`` of a Flower run's two files ("missing" for an absent one) and ``rounds_sha256``, one hash of
    its per-round aggregates (the ``rounds/`` folder's names and contents; "missing" when empty): the run's identity,
    for the stage fingerprint and the model's lineage."""
    folder = Path(folder)
    paths = {name: folder / name for name in (FLOWER_PAYLOAD, FLOWER_REPORTS)}
    out = {f"{name}_sha256": sha256_file(path) if path.is_file() else "missing" for name, path in paths.items()}
    rounds = folder / FLOWER_ROUNDS
    out["rounds_sha256"] = tree_hash(rounds) if rounds.is_dir() and any(rounds.iterdir()) else "missing"
    return out


def read_payload_file(path: Path) -> Payload:
    """A payload saved with ``torch.save`` (parameter name -> tensor); a missing, unreadable or malformed file is an
    ``ArtifactError`` naming it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such payload file") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise ArtifactError(f"{path}: not a payload (a non-empty mapping of parameter names to tensors)")
    return payload


def read_flower_run(folder: Path) -> FederatedRun:
    """A finished Flower run from its server's output-dir: the final aggregate and the round reports (a missing
    folder, an unfinished run or an unreadable payload is an ``ArtifactError`` naming the file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such Flower output-dir (the ServerApp's output-dir run-config)")
    reports = read_reports(folder / FLOWER_REPORTS)  # written last: its presence means the run finished
    path = folder / FLOWER_PAYLOAD
    if not path.is_file():
        raise ArtifactError(f"{path}: missing beside {FLOWER_REPORTS}; the Flower run's output is incomplete")
    return FederatedRun(read_payload_file(path), reports)


def _check_run(clients: Sequence[Client], rounds: int, min_clients: int, max_norm: float | None,
               timeout_s: float | None) -> None:
    if not clients:
        raise ParamsError("federated training needs at least one client; got none (check federation.num_clients)")
    ids = [c.id for c in clients]
    if len(set(ids)) != len(ids):
        raise ParamsError(f"client ids must be unique; got {ids}")
    if rounds < 1:
        raise ParamsError(f"rounds={rounds} must be >= 1")
    if not 1 <= min_clients <= len(clients):
        raise ParamsError(f"min_clients={min_clients} must be between 1 and the number of clients ({len(clients)})")
    if max_norm is not None and not max_norm > 0:
        raise ParamsError(f"max_norm={max_norm} must be positive (or None for no bound)")
    if timeout_s is not None and not timeout_s > 0:
        raise ParamsError(f"timeout_s={timeout_s} must be positive (or None for no limit)")


Answer = tuple[ClientResult | None, str, float]  # (result, why it is missing, wall seconds)
Busy = dict[str, tuple[threading.Thread, int]]  # client id -> (its update left running, the round it was for)


def _call(client: Client, payload: Payload, round_: int, timeout_s: float | None, busy: Busy) -> Answer:
    """Any exception of the client is its failure, not the round's; a stop request (``StopRequested``, a
    BaseException) raised in the client is the run's and is raised here. With ``timeout_s`` the update runs in a
    thread and a client still busy with an earlier round's update (``busy``) is not called."""
    running = busy.get(client.id)
    if running is not None:
        if running[0].is_alive():
            return None, f"still running its round-{running[1]} update, abandoned after timeout_s={timeout_s:g}", 0.0
        del busy[client.id]
    box: dict[str, object] = {}
    # The broadcast: a clone per client (the global copy stays intact), made before the clock starts so that it
    # counts as the engine's overhead, not as the client's compute (on Flower it is the send).
    sent = clone_payload(payload)

    def work() -> None:
        try:
            box["result"] = client.update(sent, round_)
        except BaseException as exc:  # noqa: BLE001 - handed to the round below
            box["error"] = exc

    t0 = perf_counter()
    if timeout_s is None:
        work()
    else:
        thread = threading.Thread(target=work, name=f"federated-{client.id}-round-{round_}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            busy[client.id] = (thread, round_)
            return None, (f"no answer within timeout_s={timeout_s:g}; its update is left running and the client "
                          f"takes no round until it ends"), perf_counter() - t0
    seconds = perf_counter() - t0
    error = box.get("error")
    if isinstance(error, Exception):  # a failing client is recorded, the round goes on
        return None, f"{type(error).__name__}: {error}", seconds
    if isinstance(error, BaseException):
        raise error
    if timeout_s is not None and seconds > timeout_s:
        return None, f"took {seconds:.1f}s, over timeout_s={timeout_s:g}", seconds
    return box["result"], "", seconds  # type: ignore[return-value]


def run_round(global_model: nn.Module, clients: Sequence[Client], round_: int, *, min_clients: int,
              max_norm: float | None, timeout_s: float | None, keys: KeyFilter, evaluate: Evaluate | None,
              busy: Busy | None = None) -> RoundReport:
    """One round; on failure (too few usable updates) the global model is left as it was. ``busy`` carries the
    clients whose update outlived ``timeout_s`` from one round to the next (``run_rounds`` keeps it)."""
    busy = {} if busy is None else busy
    t_round = perf_counter()
    glob = to_payload(global_model, keys)
    losses: dict[str, float] = {}
    seconds: dict[str, float] = {}
    weights: dict[str, int] = {}
    up: dict[str, int] = {}
    updates: dict[str, Payload] = {}
    missing: dict[str, str] = {}
    rejected: dict[str, str] = {}
    for client in clients:
        result, why, seconds[client.id] = _call(client, glob, round_, timeout_s, busy)
        if result is None:
            missing[client.id] = why
            log.warning("[federated] round %d: client %s missing: %s", round_, client.id, why)
            continue
        losses[client.id], up[client.id] = result.loss, payload_bytes(result.payload)
        reason = screen(result.payload, glob, max_norm)
        if reason is None and not 0 < result.num_examples <= client.num_examples:
            reason = f"reported {result.num_examples} examples; its shard has {client.num_examples}"
        if reason is not None:
            rejected[client.id] = reason
            log.warning("[federated] round %d: client %s rejected: %s", round_, client.id, reason)
            continue
        updates[client.id], weights[client.id] = result.payload, result.num_examples
    t_agg = perf_counter()
    if len(updates) < min_clients:
        raise FederatedError(
            f"round {round_}: {len(updates)} of {len(clients)} clients sent a usable update, fewer than "
            f"min_clients={min_clients}; missing: {missing or 'none'}; rejected: {rejected or 'none'}")
    ids = list(updates)
    load_payload(global_model, fedavg([updates[c] for c in ids], [weights[c] for c in ids], ids))
    t_eval = perf_counter()
    metrics = evaluate(global_model) if evaluate is not None else {}
    t_end = perf_counter()
    clients_s = sum(seconds.values())
    timing = {"clients": clients_s, "aggregate": t_eval - t_agg, "evaluate": t_end - t_eval,
              "overhead": t_agg - t_round - clients_s, "total": t_end - t_round}
    return RoundReport(round_, losses, weights, ids, missing, rejected, metrics, timing, seconds,
                       payload_bytes(glob), up)


def run_rounds(
    global_model: nn.Module,
    clients: Sequence[Client],
    rounds: int,
    *,
    min_clients: int = 1,
    max_norm: float | None = None,
    timeout_s: float | None = None,
    keys: KeyFilter = None,
    on_round: Callable[[RoundReport], None] | None = None,
    evaluate: Evaluate | None = None,
) -> FederatedRun:
    """``rounds`` rounds of FedAvg over ``clients``; the aggregate is loaded into ``global_model`` each round.

    Every client trains from the same global payload (``keys`` selects what is federated). A client that raises
    or runs past ``timeout_s`` is missing (one with no answer by then is left running in its thread and skipped
    until it ends: give each such client its own model, as the simulators do when ``timeout_s`` is set); an
    update with NaN/inf or farther than ``max_norm`` (L2) from the global weights is rejected. Fewer than
    ``min_clients`` usable updates fail the run with ``FederatedError`` and no partial aggregate is applied. After
    each round ``evaluate(global_model)`` fills the report's metrics and ``on_round(report)`` is called (the stage
    logs it).
    """
    _check_run(clients, rounds, min_clients, max_norm, timeout_s)
    reports = []
    busy: Busy = {}
    for r in range(1, rounds + 1):
        stop.check(f"the start of federated round {r}")
        report = run_round(global_model, clients, r, min_clients=min_clients, max_norm=max_norm,
                           timeout_s=timeout_s, keys=keys, evaluate=evaluate, busy=busy)
        log.info("[federated] round %d/%d: %d accepted, %d missing, %d rejected, %.1f s", r, rounds,
                 len(report.accepted), len(report.missing), len(report.rejected), report.seconds.get("total", 0.0))
        log.debug("[federated] round %d metrics: %s", r, report.metrics)
        reports.append(report)
        if on_round is not None:
            on_round(report)
    running = sorted(cid for cid, (thread, _) in busy.items() if thread.is_alive())
    if running:
        # they share torch's global random generator (dropout; client_update's fork_rng restores it when they
        # end) and the CPU with what runs next: the run stays correct, but is no longer reproducible from its seed
        log.warning("[federated] updates still running after the last round, results discarded: %s; they share "
                    "the process's random generator and cores with what follows, so this run will not repeat "
                    "exactly from its seed", ", ".join(running))
    return FederatedRun(to_payload(global_model, keys), reports)
