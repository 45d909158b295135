"""The Flower path (a real SuperLink and two SuperNodes on 127.0.0.1) aggregates exactly what the in-process core does.

Needs the optional extra (``flwr``): the main environment skips this file; ``.ci/flower`` builds a second
environment with the extra and without the orchestration stack, and runs it there.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REQUIRED = os.environ.get("MEDEXPERTS_REQUIRE_FLOWER") == "1"  # set by .ci/flower: there a skip would hide a failure
if not REQUIRED:
    pytest.importorskip("flwr", reason="Flower is an optional extra (pip install '.[flower]'); .ci/flower runs "
                                       "this test in an environment that has it")

import torch  # noqa: E402

from components.core.errors import ArtifactError, ParamsError  # noqa: E402
from components.federated import flower  # noqa: E402
from components.federated.client import client_seed, client_update  # noqa: E402
from components.federated.clients import local_shard_digest  # noqa: E402
from components.federated.payload import to_payload  # noqa: E402
from components.federated.rounds import Client, FederatedError, run_rounds  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr and flower-superexec live beside python
SETTINGS = dict(num_rounds=1, local_epochs=2, batch_size=16, lr=0.05, seed=7, min_clients=2,
                connect_timeout=60.0, round_timeout=120.0)


def in_process(settings: flower.FlowerSettings, partitions: int = 2):
    """The reference: the core's ``run_rounds`` over the same model, shards and seeds, all in this process."""
    model = flower.build_model(settings.model, settings.seed)
    worker = copy.deepcopy(model)
    clients = []
    for pid in range(partitions):
        data = flower.smoke_data({"partition-id": pid})

        def update(payload, round_, data=data, pid=pid):  # noqa: ANN001, ANN202
            return client_update(worker, payload, data, settings.task, epochs=settings.local_epochs,
                                 batch_size=settings.batch_size, lr=settings.lr, weight_decay=settings.weight_decay,
                                 mu=settings.mu, seed=client_seed(settings.seed, round_, pid))

        clients.append(Client(f"client_{pid}", len(data), update))
    return run_rounds(model, clients, settings.num_rounds, min_clients=settings.min_clients,
                      keys=settings.key_filter)


# --------------------------------------------------------------------------- without a deployment
def test_payload_travels_as_fp32_and_back() -> None:
    payload = to_payload(flower.smoke_model())
    back = flower.from_record(flower.to_record(payload))
    assert list(back) == list(payload)
    for k, v in payload.items():
        assert back[k].dtype == torch.float32
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    wide = flower.to_record({"w": torch.zeros(2, dtype=torch.float64)})
    assert wide["w"].dtype == "float32"  # sent as fp32 whatever the model's dtype
    from flwr.app import Array, ArrayRecord

    with pytest.raises(ArtifactError, match="float64"):
        flower.from_record(ArrayRecord({"w": Array(torch.zeros(2, dtype=torch.float64).numpy())}))


def test_settings_and_node_config_are_checked() -> None:
    with pytest.raises(ParamsError, match="lr"):
        flower.FlowerSettings.from_config({"lr": -1.0})
    with pytest.raises(ParamsError, match="num-rounds=.*int"):
        flower.FlowerSettings.from_config({"num-rounds": "3"})
    with pytest.raises(ParamsError, match="partition-id"):
        flower.partition_of({"data-path": "/x.npz"})
    assert flower.partition_of({"partition-id": 3}) == (3, "client_3")
    s = flower.FlowerSettings.from_config({"lr": 1, "keys": "head.*, body.weight", "other-key": "kept for factories"})
    assert s.lr == 1.0 and s.key_filter == ["head.*", "body.weight"]
    assert s.declared_examples is None  # no declaration: the counts sites report are trusted
    for bad in ('{"client_0": 48', '["client_0"]', '{}', '{"client_0": 0}', '{"client_0": 4.5}'):
        with pytest.raises(ParamsError, match="site-examples"):
            flower.FlowerSettings.from_config({"site-examples": bad})
    assert s.declared_nodes is None  # no binding: a site's client-id is its own claim
    for bad in ('{"client_0": "7"}', '{"client_0": 7, "client_1": 7}', '{}', '{"client_0": true}'):
        with pytest.raises(ParamsError, match="site-nodes"):
            flower.FlowerSettings.from_config({"site-nodes": bad})
    with pytest.raises(ParamsError, match=r"same sites; only in site-examples: \['client_1'\]"):
        flower.FlowerSettings.from_config({"site-examples": '{"client_0": 4, "client_1": 4}',
                                           "site-nodes": '{"client_0": 7}'})


def test_train_handler_is_client_update(tmp_path: Path) -> None:
    """The ClientApp's work on one message equals ``client_update`` with the simulator's seed for that client."""
    from flwr.app import ConfigRecord, RecordDict

    s = flower.FlowerSettings(**SETTINGS)
    model = flower.build_model(s.model, s.seed)
    glob = to_payload(model)
    cfg = {"round": 2, "local-epochs": s.local_epochs, "batch-size": s.batch_size, "lr": s.lr,
           "weight-decay": s.weight_decay, "mu": s.mu, "seed": s.seed, "task": s.task}
    reply = flower.local_update(RecordDict({"payload": flower.to_record(glob), "config": ConfigRecord(cfg)}),
                                {"partition-id": 1}, s.as_run_config())
    ref = client_update(copy.deepcopy(model), glob, flower.smoke_data({"partition-id": 1}), "binary",
                        epochs=s.local_epochs, batch_size=s.batch_size, lr=s.lr, seed=client_seed(s.seed, 2, 1))
    got = flower.from_record(reply.array_records["payload"])
    for k in glob:
        torch.testing.assert_close(got[k], ref.payload[k], rtol=0, atol=0)
    assert reply.metric_records["metrics"]["num-examples"] == 64
    assert reply.metric_records["metrics"]["loss"] == pytest.approx(ref.loss)
    assert reply.config_records["client"]["client-id"] == "client_1"
    # the site names its rows by their hash (the registered model's lineage), not by sending them
    assert reply.config_records["client"]["shard-sha256"] == local_shard_digest(flower.smoke_data({"partition-id": 1}))


def test_write_app_is_a_valid_flower_app(tmp_path: Path) -> None:
    from flwr.cli.config_utils import load_and_validate

    app = flower.write_app(tmp_path / "app", num_rounds=3, output_dir=str(tmp_path / "out"))
    config, _ = load_and_validate(app / "pyproject.toml")  # also finds the components on the Python path
    assert config["tool"]["flwr"]["app"]["config"]["num-rounds"] == 3
    with pytest.raises(ParamsError, match="task"):
        flower.write_app(tmp_path / "bad", task="regression")
    assert config["tool"]["flwr"]["app"]["config"]["class-weight"] == "balanced"  # as federated.client's default
    with pytest.raises(ParamsError, match="class-weight"):
        flower.write_app(tmp_path / "bad", class_weight="inverse")


# --------------------------------------------------------------------------- a real deployment on loopback
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout_s:g}s")


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries this test's marker: ours and the ones Flower started for us (its
    SuperExec and app processes run in sessions of their own)."""
    pids = []
    needle = f"MEDEXPERTS_FLOWER_TEST={marker}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                zombie = (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z"  # dead, not yet reaped
                if not zombie and needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return pids


def _stop(procs: list[subprocess.Popen], marker: str) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # each was started in a session (process group) of its own
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
    deadline = time.monotonic() + 10
    while (left := _marked_pids(marker)) and time.monotonic() < deadline:  # SuperExecs, app processes: ours only
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _require_cli() -> None:
    if not shutil.which("flower-superlink", path=str(BIN)) or not sys.platform.startswith("linux"):
        why = "needs Flower's CLI beside this Python and Linux (/proc) to bound every process"
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)


def _tails(logs: dict[str, Path]) -> str:
    return "\n".join(f"--- {n}\n{p.read_text(errors='replace')[-2000:]}" for n, p in logs.items())


def _readme_tls(folder: Path) -> Path:
    """The README's coordinator commands, read from the README itself (its openssl and printf lines before
    `flower-superlink`): a CA, and the SuperLink's certificate for 127.0.0.1 signed by it."""
    readme = (PROJECT / "README.md").read_text()
    block = readme[readme.index("Coordinator: one CA"):]
    block = block[block.index("```bash") + len("```bash"):block.index("flower-superlink")]
    steps = [line for line in block.splitlines() if line.startswith(("openssl ", "printf "))]
    assert len(steps) == 4, f"the README's coordinator block changed: {steps}"
    folder.mkdir()
    for step in steps:
        subprocess.run(step, shell=True, cwd=folder, check=True, capture_output=True)
    return folder


@contextlib.contextmanager
def _loopback(tmp_path: Path, node_configs: list[str], pythonpath: tuple[Path, ...] = (),  # noqa: ANN202
              registered: int | None = None, node_ids: list[int] | None = None):
    """A SuperLink and one SuperNode per ``--node-config`` on 127.0.0.1; yields (the environment ``flwr run``
    needs, each process's log file, each process by name). Every process it started, and every SuperExec and app
    process they started, is gone when it exits. ``registered``: the README's deployment instead of
    ``--insecure``: TLS with a certificate from its openssl commands and SuperNode authentication, each SuperNode
    with its own key pair (ssh-keygen), the first ``registered`` of them registered at the coordinator (``flwr
    supernode register``), the rest not; ``node_ids`` gets the node id each registration printed."""
    secure = registered is not None
    tls = _readme_tls(tmp_path / "tls") if secure else None  # certificates and keys first: the ports stay free
    for pid in range(len(node_configs) if tls else 0):
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tls / f"hospital_{pid}")],
                       check=True, capture_output=True)
    link_port, *node_ports = _free_ports(1 + len(node_configs))
    marker = uuid.uuid4().hex
    path = [*map(str, pythonpath), str(PROJECT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path).rstrip(":"),
               PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]), FLWR_HOME=str(tmp_path / "home"),
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", MEDEXPERTS_FLOWER_TEST=marker)
    (tmp_path / "home").mkdir()
    connection = f'root-certificates = "{tls / "ca.crt"}"' if tls else "insecure = true"
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        f"{connection}\n")
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def start(name: str, cmd: list[str], **extra: str) -> subprocess.Popen:
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as out:
            procs[name] = subprocess.Popen(cmd, env=dict(env, **extra), stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True, cwd=tmp_path)
        return procs[name]

    try:
        link_security = (["--ssl-ca-certfile", str(tls / "ca.crt"), "--ssl-certfile", str(tls / "server.pem"),
                          "--ssl-keyfile", str(tls / "server.key"), "--enable-supernode-auth"] if tls
                         else ["--insecure"])
        link = start("superlink", [str(BIN / "flower-superlink"), *link_security, "--host", "127.0.0.1",
                                   "--port", str(link_port), "--disable-runtime-dependency-installation"])
        node_security: list[list[str]] = [["--insecure"]] * len(node_configs)
        if tls:
            _wait_port(link_port, link, timeout_s=60)  # the keys are registered before any SuperNode connects
            node_security = []
            for pid in range(len(node_configs)):
                key = tls / f"hospital_{pid}"
                if pid < registered:
                    done = subprocess.run([str(BIN / "flwr"), "supernode", "register", f"{key}.pub", "loopback",
                                           "--name", f"hospital-{pid}"], env=env, cwd=tmp_path, capture_output=True,
                                          text=True, timeout=60, stdin=subprocess.DEVNULL)
                    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
                    if node_ids is not None:  # the coordinator's record of whom it registered (site-nodes)
                        answer = re.search(r"SuperNode (\d+) registered", done.stdout)
                        assert answer, f"flwr supernode register printed no node id: {done.stdout[-2000:]}"
                        node_ids.append(int(answer.group(1)))
                node_security.append(["--root-certificates", str(tls / "ca.crt"), "--auth-supernode-private-key",
                                      str(key)])
        for pid, (port, config) in enumerate(zip(node_ports, node_configs, strict=True)):
            start(f"supernode{pid}", [str(BIN / "flower-supernode"), *node_security[pid],
                                      "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
                                      "--max-wait-time", "120", "--node-config", config],
                  FLWR_HOME=str(tmp_path / f"home{pid}"))
        _wait_port(link_port, link, timeout_s=60)
        yield env, logs, procs
    finally:
        _stop(list(procs.values()), marker)
    assert not _marked_pids(marker), "a Flower process outlived the test"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_superlink_and_two_supernodes_match_the_in_process_core(tmp_path: Path) -> None:
    _require_cli()
    settings = flower.FlowerSettings(**SETTINGS, output_dir=str(tmp_path / "out"))
    app = flower.write_app(tmp_path / "app", **settings.as_run_config())
    with _loopback(tmp_path, ["partition-id=0", "partition-id=1"]) as (env, logs, _):
        t0 = time.monotonic()
        run = subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback", "--stream"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=200, stdin=subprocess.DEVNULL)
        seconds = time.monotonic() - t0
        done = tmp_path / "out" / "reports.json"
        assert run.returncode == 0 and done.exists(), (
            f"flwr run exited {run.returncode} after {seconds:.0f}s without results\n{run.stdout[-3000:]}\n"
            f"{run.stderr[-3000:]}\n" + _tails(logs))

    reports = json.loads(done.read_text())
    payload = torch.load(tmp_path / "out" / "payload.pt", weights_only=True)
    ref = in_process(settings)
    assert len(reports) == 1 and reports[0]["accepted"] == ["client_0", "client_1"]
    assert reports[0]["num_examples"] == ref.reports[0].num_examples == {"client_0": 48, "client_1": 64}
    assert not reports[0]["missing"] and not reports[0]["rejected"]
    for cid, loss in ref.reports[0].client_losses.items():
        assert reports[0]["client_losses"][cid] == pytest.approx(loss, rel=1e-6)
    assert list(payload) == list(ref.payload)
    for k, v in ref.payload.items():
        assert payload[k].dtype == torch.float32
        torch.testing.assert_close(payload[k], v, rtol=1e-6, atol=1e-6)
    start_weights = to_payload(flower.build_model(settings.model, settings.seed))
    assert any(not torch.equal(payload[k], start_weights[k]) for k in payload)  # the round did train
    diff = max(float((payload[k] - v).abs().max()) for k, v in ref.payload.items())
    print(f"\nflower round: flwr run took {seconds:.1f}s (round phase {reports[0]['seconds']['clients']:.1f}s); "
          f"max |flower - in-process| = {diff:.3g}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readmes_deployment_tls_and_supernode_auth(tmp_path: Path) -> None:
    """The README's coordinator and site commands on 127.0.0.1: TLS with a certificate signed by the project's own
    CA, SuperNode authentication on; the two registered hospitals train the round (the in-process weights, as
    without TLS) and a third SuperNode whose key the coordinator never registered takes no part."""
    _require_cli()
    missing = [tool for tool in ("openssl", "ssh-keygen") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"the README's deployment commands need {missing} on PATH")
    settings = flower.FlowerSettings(**SETTINGS, output_dir=str(tmp_path / "out"))
    app = flower.write_app(tmp_path / "app", **settings.as_run_config())
    nodes = ["partition-id=0", "partition-id=1", 'partition-id=2 client-id="intruder"']
    registered: list[int] = []
    with _loopback(tmp_path, nodes, registered=2, node_ids=registered) as (env, logs, procs):
        # each client id bound to the node id its registration printed (the README's site-nodes)
        site_nodes = json.dumps({f"client_{pid}": node for pid, node in enumerate(registered)})
        run = subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback", "--stream", "--run-config",
                              f"site-nodes='{site_nodes}'"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=200, stdin=subprocess.DEVNULL)
        try:  # the unregistered SuperNode gives up, logging flwr 1.41's error 305, "Failed to activate SuperNode"
            intruder = procs["supernode2"].wait(timeout=60)
        except subprocess.TimeoutExpired:
            intruder = None
        done = tmp_path / "out" / "reports.json"
        assert run.returncode == 0 and done.exists(), (
            f"flwr run exited {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n" + _tails(logs))
        listed = subprocess.run([str(BIN / "flwr"), "supernode", "list", "loopback", "--format", "json"], env=env,
                                cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    reports = json.loads(done.read_text())
    assert reports[0]["accepted"] == ["client_0", "client_1"]
    assert "intruder" not in json.dumps(reports) and not reports[0]["missing"]
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    assert [n["status"] for n in json.loads(listed.stdout)["nodes"]] == ["online", "online"]  # the registered two
    refused = "Failed to activate SuperNode" in logs["supernode2"].read_text(errors="replace")
    assert intruder not in (None, 0) and refused, f"the unregistered SuperNode: exit {intruder}\n" + _tails(logs)
    payload = torch.load(tmp_path / "out" / "payload.pt", weights_only=True)
    for k, v in in_process(settings).payload.items():
        torch.testing.assert_close(payload[k], v, rtol=1e-6, atol=1e-6)


HANGING_SITE = '''"""A test site: the partition whose --node-config names a hang-file stops mid-round."""
import os
import time
from pathlib import Path

from components.federated.flower import smoke_data


def data(node_config):
    if node_config.get("hang-file"):  # after the round's message arrived, before any answer
        hang = Path(node_config["hang-file"])
        hang.with_suffix(".tmp").write_text(str(os.getpid()))
        hang.with_suffix(".tmp").replace(hang)
        time.sleep(600)
    return smoke_data(node_config)
'''


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_site_killed_mid_round_is_missing_and_the_round_completes_over_the_others(tmp_path: Path) -> None:
    """Three SuperNodes; one site's training process is killed (SIGKILL, its SuperNode with it) after it took the
    round's message. The round completes over the two others (min-clients=2), with the aggregate the core computes
    over those two, and the killed site is recorded as missing."""
    _require_cli()
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "hanging_site.py").write_text(HANGING_SITE)
    hang = tmp_path / "hung.pid"
    # round-timeout as the parity test's: the SuperLink usually reports the dead node long before it
    settings = flower.FlowerSettings(**dict(SETTINGS, min_nodes=3), data="hanging_site:data",
                                     output_dir=str(tmp_path / "out"))
    app = flower.write_app(tmp_path / "app", **settings.as_run_config())
    configs = ["partition-id=0", "partition-id=1", f'partition-id=2 hang-file="{hang}"']
    with _loopback(tmp_path, configs, pythonpath=(tmp_path / "sites",)) as (env, logs, procs):
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "loopback", "--stream"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 150
            while not hang.exists():
                assert run.poll() is None and time.monotonic() < deadline, (
                    f"site 2 never started its round (flwr run: {run.returncode})\n" + _tails(logs))
                time.sleep(0.2)
            os.kill(int(hang.read_text()), signal.SIGKILL)  # the site's training process dies mid-round,
            os.killpg(procs["supernode2"].pid, signal.SIGKILL)  # and its SuperNode with it
            out, _ = run.communicate(timeout=240)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        done = tmp_path / "out" / "reports.json"
        assert run.returncode == 0 and done.exists(), (
            f"flwr run exited {run.returncode} without results\n{out[-3000:]}\n" + _tails(logs))

    (report,) = json.loads(done.read_text())
    assert report["accepted"] == ["client_0", "client_1"] and not report["rejected"], report
    assert len(report["missing"]) == 1, report["missing"]
    (why,) = report["missing"].values()  # the killed site, by its node id: it never said who it was
    assert "Node Unavailable" in why or "round-timeout" in why, why  # the SuperLink's word on it, or the timeout
    ref = in_process(settings)  # the core's round over the two sites that answered (partitions 0 and 1)
    payload = torch.load(tmp_path / "out" / "payload.pt", weights_only=True)
    assert report["num_examples"] == ref.reports[0].num_examples
    for k, v in ref.payload.items():
        torch.testing.assert_close(payload[k], v, rtol=1e-6, atol=1e-6)


class LoopbackGrid:
    """A Grid without a SuperLink: node ``n`` answers as partition ``n - 1``; some nodes fail or stay silent."""

    def __init__(self, settings: flower.FlowerSettings, nodes: int, failing: int = 0, silent: int = 0,
                 node_config=None) -> None:  # noqa: ANN001
        self.settings, self.nodes, self.failing, self.silent = settings, nodes, failing, silent
        self.node_config = node_config or (lambda node: {"partition-id": node - 1})

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        from flwr.app import Error, Message

        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == self.silent:
                continue
            if node == self.failing:
                yield Message(Error(code=0, reason="hospital offline"), reply_to=msg)
                continue
            content = flower.local_update(msg.content, self.node_config(node), self.settings.as_run_config())
            yield Message(content, reply_to=msg)


def test_server_rounds_match_the_core_and_record_missing_clients(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The ServerApp's loop without a deployment: two rounds equal ``run_rounds``; a failing and a silent node are
    recorded as missing and the round goes on with the rest."""
    from flwr.supercore.task_identity import TaskIdentity  # set by Flower in a ServerApp process (1.41 internals)

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    s = flower.FlowerSettings(**dict(SETTINGS, num_rounds=2), output_dir=str(tmp_path / "out"))
    run = flower.run_server(LoopbackGrid(s, nodes=2), s)
    ref = in_process(s)
    for k, v in ref.payload.items():
        torch.testing.assert_close(run.payload[k], v, rtol=1e-6, atol=1e-6)
    for got, want in zip(run.reports, ref.reports, strict=True):
        assert got.client_losses == pytest.approx(want.client_losses, rel=1e-6)
        assert got.num_examples == want.num_examples and got.accepted == want.accepted
    saved = json.loads((tmp_path / "out" / "reports.json").read_text())
    assert [r["round"] for r in saved] == [1, 2]
    # each round's aggregate is kept as the round ends (the stage scores them for the per-round curve)
    kept = {r: torch.load(tmp_path / "out" / "rounds" / f"round_{r:04d}.pt", weights_only=True) for r in (1, 2)}
    first = in_process(flower.FlowerSettings(**dict(SETTINGS, num_rounds=1)))
    for k, v in first.payload.items():
        torch.testing.assert_close(kept[1][k], v, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(kept[2][k], v) for k, v in run.payload.items())
    with pytest.raises(FederatedError, match="output-dir .* is not empty"):  # a second run would overwrite this one
        flower.run_server(LoopbackGrid(s, nodes=2), s)
    assert json.loads((tmp_path / "out" / "reports.json").read_text()) == saved

    s3 = flower.FlowerSettings(**dict(SETTINGS, min_clients=1))
    report = flower.run_server(LoopbackGrid(s3, nodes=3, failing=2, silent=3), s3).reports[0]
    assert report.accepted == ["client_0"] and list(report.client_shards) == ["client_0"]
    assert report.missing == {"node_2": "FederatedError: error reply: hospital offline",
                              "node_3": f"FederatedError: no reply within round-timeout={s3.round_timeout:g}s"}


def test_declared_site_sizes_bound_the_counts_sites_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``site-examples`` the server checks each reported count against the site's declared size, as the
    simulator checks it against the shard: an over-report is rejected, not averaged in with its weight, and a site
    the coordinator was not told of is not averaged in either. The smoke sites hold 48 and 64 rows."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    honest = flower.FlowerSettings(**dict(SETTINGS, site_examples='{"client_0": 48, "client_1": 64}'))
    assert flower.run_server(LoopbackGrid(honest, nodes=2), honest).reports[0].num_examples == {
        "client_0": 48, "client_1": 64}
    low = flower.FlowerSettings(**dict(SETTINGS, min_clients=1, site_examples='{"client_0": 48, "client_1": 40}'))
    report = flower.run_server(LoopbackGrid(low, nodes=2), low).reports[0]
    assert report.accepted == ["client_0"]
    assert report.rejected == {"client_1": "reported 64 examples; its shard has 40"}
    unlisted = flower.FlowerSettings(**dict(SETTINGS, min_clients=1, site_examples='{"client_0": 48}'))
    report = flower.run_server(LoopbackGrid(unlisted, nodes=2), unlisted).reports[0]
    assert report.accepted == ["client_0"] and list(report.missing) == ["client_1"]
    assert "not in site-examples" in report.missing["client_1"]
    # the README's command line, as the shell and then flwr's own --run-config parser read it
    from flwr.common.config import parse_config_args

    line = re.search(r"`(--run-config \"site-examples=[^`]*)`", (PROJECT / "README.md").read_text()).group(1)
    config = parse_config_args(shlex.split(line)[1:])
    assert flower.FlowerSettings.from_config(config).declared_examples == {"hospital_a": 4000, "hospital_b": 2500}


def test_site_nodes_bind_client_ids_to_registered_supernodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``site-nodes`` a client id counts only from the SuperNode registered for it: a node that claims
    another site's id (first, so it would take the id) is filed under its own node id as missing, and the real
    site's update is averaged in as if the impostor were not there."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    configs = {1: {"partition-id": 1, "client-id": "client_0"}, 2: {"partition-id": 0}, 3: {"partition-id": 1}}
    bound = flower.FlowerSettings(**dict(SETTINGS, site_nodes='{"client_0": 2, "client_1": 3}'))
    report = flower.run_server(LoopbackGrid(bound, nodes=3, node_config=configs.__getitem__), bound).reports[0]
    assert report.accepted == ["client_0", "client_1"]
    assert report.missing == {"node_1": "FederatedError: client id 'client_0' belongs to SuperNode 2 (site-nodes), "
                                        "not to node 1"}
    honest = flower.FlowerSettings(**SETTINGS)
    ref = flower.run_server(LoopbackGrid(honest, nodes=2), honest)
    assert report.num_examples == ref.reports[0].num_examples
    assert report.client_losses == pytest.approx(ref.reports[0].client_losses, rel=1e-6)
    unbound = flower.FlowerSettings(**dict(SETTINGS, min_clients=1, site_nodes='{"client_0": 1}'))
    report = flower.run_server(LoopbackGrid(unbound, nodes=2), unbound).reports[0]
    assert report.accepted == ["client_0"] and report.missing == {
        "node_2": "FederatedError: client id 'client_1' is not in site-nodes"}
    # a bound site that fails or stays silent is named by its client id, not its node's
    quiet = flower.FlowerSettings(**dict(SETTINGS, min_clients=1, site_nodes='{"client_0": 1, "client_1": 2}'))
    report = flower.run_server(LoopbackGrid(quiet, nodes=2, silent=2), quiet).reports[0]
    assert report.accepted == ["client_0"] and list(report.missing) == ["client_1"]


# --------------------------------------------------------------------------- FedKIM's multi-task clients on Flower
FEDKIM_TASKS = {"chest": ["image", "Chest X-ray: pneumonia or normal.", "chest X-ray image", 2, "binary"],
                "retina": ["image", "Diabetic retinopathy grade.", "retinal fundus image", 3, "multiclass"]}


def fedkim_sites(tmp_path: Path, model) -> list[Path]:  # noqa: ANN001
    """Two hospitals' encoded shards (synthetic images): site 0 holds both tasks, site 1 only the chest task."""
    from components.federated.clients import LocalTask
    from components.training.data import TensorDictDataset

    g = torch.Generator().manual_seed(3)
    folders = []
    for pid, (tasks, n) in enumerate(((("chest", "retina"), 40), (("chest",), 24))):
        local = {}
        for t in tasks:
            width = FEDKIM_TASKS[t][3]
            x = torch.randn(n, 3, 12, 12, generator=g)
            y = torch.randint(0, width, (n,), generator=g)
            x[:, 0] += y.view(-1, 1, 1).float()  # learnable
            local[t] = LocalTask("image", FEDKIM_TASKS[t][4], TensorDictDataset({"pixels": x}, y))
        folders.append(flower.write_site_shard(tmp_path / f"site{pid}", local))
    return folders


def fedkim_in_process(settings: flower.FlowerSettings, sites: list[Path]):  # noqa: ANN201
    """The reference for FedKIM's sites: the in-process engine's rounds over the same site folders and model."""
    from components.federated.clients import client_updater

    model = flower.build_model(settings.model, settings.seed, settings.model_config)
    worker = copy.deepcopy(model)
    clients = []
    for pid, folder in enumerate(sites):
        tasks = flower.fedkim_npz_data({"data-path": str(folder)})
        clients.append(Client(f"client_{pid}", sum(len(t.data) for t in tasks.values()),
                              client_updater(worker, tasks, index=pid, epochs=settings.local_epochs,
                                             batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                                             text_lr=settings.text_lr or None)))
    return run_rounds(model, clients, settings.num_rounds, min_clients=2)


def test_fedkim_clients_on_flower_match_the_in_process_federation(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The ServerApp's rounds over FedKIM's multi-task local model (a hospital trains its tasks one after another)
    equal the in-process engine over the same shards: the Flower path runs FedKIM's clients, not a one-task stand-in."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    config = json.dumps({"tasks": FEDKIM_TASKS, "image_channels": [4, 8]})
    s = flower.FlowerSettings(**dict(SETTINGS, num_rounds=2, lr=0.01), model="components.federated.flower:fedkim_model",
                              model_config=config, data="components.federated.flower:fedkim_npz_data")
    sites = fedkim_sites(tmp_path, None)
    grid = LoopbackGrid(s, nodes=2, node_config=lambda node: {"partition-id": node - 1,
                                                               "data-path": str(sites[node - 1])})
    run = flower.run_server(grid, s)

    ref = fedkim_in_process(s, sites)
    assert set(run.payload) == set(ref.payload) and any(k.startswith("heads.retina") for k in run.payload)
    for k, v in ref.payload.items():
        torch.testing.assert_close(run.payload[k], v, rtol=1e-6, atol=1e-6)
    hashes = {f"client_{pid}": local_shard_digest(flower.fedkim_npz_data({"data-path": str(folder)}))
              for pid, folder in enumerate(sites)}
    for got, want in zip(run.reports, ref.reports, strict=True):
        assert got.num_examples == want.num_examples == {"client_0": 80, "client_1": 24}
        assert got.client_losses == pytest.approx(want.client_losses, rel=1e-6)
        assert got.client_shards == hashes  # each site's rows, hashed at the site, every round
    start = to_payload(flower.build_model(s.model, s.seed, s.model_config))
    assert not torch.equal(run.payload["heads.retina.weight"], start["heads.retina.weight"])  # site 0 trained it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fedkim_image_and_text_sites_on_a_real_superlink(tmp_path: Path) -> None:
    """FedKIM's multi-task, multi-modal sites on a real SuperLink and two SuperNodes: each builds the client model
    from the App's model-config (the text student copied from the foundation folder the sites hold, as README's
    text sites do), trains its tasks from its `write_site_shard` folder; one round equals the in-process engine."""
    _require_cli()
    try:
        import transformers  # noqa: F401 -- a site that holds a text task installs it (README)
    except ImportError:
        if REQUIRED:
            pytest.fail("the site environment lacks transformers (.ci/flower installs it)")
        pytest.skip("a site that holds a text task needs transformers")
    from bench.common import tiny_bert
    from components.federated.clients import LocalTask
    from components.nn.encoders import load_text_encoder, tokenize
    from components.training.data import TensorDictDataset

    bert = tiny_bert(tmp_path / "bert")
    tasks = {"chest": FEDKIM_TASKS["chest"],
             "abstracts": ["text", "Topic of an abstract.", "clinical abstract text", 3, "multiclass"]}
    config = {"tasks": tasks, "image_channels": [4, 8], "text_foundation": str(bert), "max_positions": 16,
              "embedding_rank": 8}
    _, tokenizer = load_text_encoder(bert)
    g = torch.Generator().manual_seed(5)
    words = ["fever", "tumour", "cough", "insulin", "fracture", "rash", "lesion", "stroke", "renal", "cardiac"]
    sites = []
    for pid, (held, n) in enumerate(((("chest", "abstracts"), 24), (("abstracts",), 16))):
        local = {}
        for t in held:
            y = torch.randint(0, tasks[t][3], (n,), generator=g)
            if t == "chest":
                x = torch.randn(n, 3, 12, 12, generator=g)
                x[:, 0] += y.view(-1, 1, 1).float()
                local[t] = LocalTask("image", "binary", TensorDictDataset({"pixels": x}, y))
            else:
                texts = [" ".join(words[(int(label) * 3 + i) % len(words)] for i in range(4)) for label in y]
                local[t] = LocalTask("text", "multiclass", TensorDictDataset(tokenize(tokenizer, texts, 16), y))
        sites.append(flower.write_site_shard(tmp_path / f"site{pid}", local))
    settings = flower.FlowerSettings(**dict(SETTINGS, lr=0.01), model="components.federated.flower:fedkim_model",
                                     model_config=json.dumps(config),
                                     data="components.federated.flower:fedkim_npz_data",
                                     output_dir=str(tmp_path / "out"))
    app = flower.write_app(tmp_path / "app", **settings.as_run_config())
    nodes = [f'partition-id={pid} data-path="{folder}"' for pid, folder in enumerate(sites)]
    with _loopback(tmp_path, nodes) as (env, logs, _):
        run = subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback", "--stream"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=200, stdin=subprocess.DEVNULL)
        done = tmp_path / "out" / "reports.json"
        assert run.returncode == 0 and done.exists(), (
            f"flwr run exited {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n" + _tails(logs))
    reports = json.loads(done.read_text())
    assert reports[0]["accepted"] == ["client_0", "client_1"] and not reports[0]["missing"]
    assert reports[0]["num_examples"] == {"client_0": 48, "client_1": 16}
    # each site's rows, hashed at the site, came back through the SuperLink
    assert reports[0]["client_shards"] == {f"client_{pid}": local_shard_digest(flower.fedkim_npz_data(
        {"data-path": str(folder)})) for pid, folder in enumerate(sites)}

    ref = fedkim_in_process(settings, sites)
    payload = torch.load(tmp_path / "out" / "payload.pt", weights_only=True)
    assert any(k.startswith("encoders.text.") for k in payload)
    assert any(k.startswith("heads.abstracts") for k in payload)
    for cid, loss in ref.reports[0].client_losses.items():
        assert reports[0]["client_losses"][cid] == pytest.approx(loss, rel=1e-6)
    for k, v in ref.payload.items():
        torch.testing.assert_close(payload[k], v, rtol=1e-6, atol=1e-6)


def test_fedkim_site_errors_are_clear(tmp_path: Path) -> None:
    from components.core.errors import DataError

    with pytest.raises(ParamsError, match="model-config is not JSON"):
        flower.build_model("components.federated.flower:fedkim_model", 0, "{tasks")
    with pytest.raises(DataError, match="task list"):
        flower.fedkim_npz_data({"data-path": str(tmp_path / "nowhere")})
