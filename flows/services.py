"""The project's own Prefect server: started on first use, reused by every later command, stopped by
``medexperts services down``.

One server per project (SQLite under ``$PREFECT_HOME``, 127.0.0.1, the port from ``params/pipeline.yaml``'s
``prefect.port`` or ``MEDEXPERTS_PREFECT_PORT``) instead of Prefect's temporary per-process server: that one costs
20-90 s at every command, dies with the process (so nothing shows scheduled or finished runs afterwards), and
several of them on one SQLite file lock each other out. The server runs in its own session, not as the run's
child: killing a run leaves no stray server, and the next command finds the project's server by the state file
``$PREFECT_HOME/server.json`` (pid, port, start time).

A ``PREFECT_API_URL`` already set by the user (a team server, Prefect Cloud) wins: nothing is started then.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from components.core.errors import MedExpertsError, ParamsError
from components.core.lock import pid_alive

HOST = "127.0.0.1"
STATE, LOG, LOCK = "server.json", "server.log", "server.lock"
PORT_ENV = "MEDEXPERTS_PREFECT_PORT"
OWNED_ENV = "MEDEXPERTS_PREFECT_OWNED"  # set when PREFECT_API_URL points at the project's own server


class ServiceError(MedExpertsError):
    """A project service (the Prefect server) cannot be started, reached or stopped."""


@dataclass(frozen=True)
class ServerState:
    pid: int
    port: int
    started: float  # unix time
    home: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def prefect_home(root: Path) -> Path:
    """``$PREFECT_HOME`` (``flows.environment.configure`` defaults it to ``<project>/.prefect``)."""
    return Path(os.environ.get("PREFECT_HOME", root / ".prefect")).expanduser().resolve()


def read_state(home: Path) -> ServerState | None:
    try:
        return ServerState(**json.loads((home / STATE).read_text()))
    except (OSError, ValueError, TypeError):
        return None  # no server started yet, or a state file from a crash mid-write: treated as no server


def _write_state(home: Path, state: ServerState) -> None:
    tmp = home / f".{STATE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(home / STATE)


def _alive(pid: int) -> bool:
    """A live process that is a Prefect server (its command line says so where /proc exists; an empty one is a
    process between fork and exec, just started)."""
    if not pid_alive(pid):
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no /proc (macOS): the pid answers, take it
    try:
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False  # exited, not yet reaped
        text = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, IndexError):
        return False
    return not text or (b"prefect" in text and b"server" in text)


def healthy(port: int, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/api/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def configured_port(port: int) -> int:
    """``MEDEXPERTS_PREFECT_PORT`` when set, else the params value."""
    raw = os.environ.get(PORT_ENV)
    if raw is None or raw == "":
        return port
    try:
        value = int(raw)
    except ValueError:
        raise ParamsError(f"{PORT_ENV}={raw!r} must be a port number (0: pick a free one)") from None
    if not 0 <= value <= 65535:
        raise ParamsError(f"{PORT_ENV}={raw!r} must be a port number in 0..65535")
    return value


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One process at a time decides whether to start the server (two runs started together share one)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def running(root: Path) -> ServerState | None:
    """The project's server when its process is alive (it may still be starting)."""
    state = read_state(prefect_home(root))
    return state if state is not None and _alive(state.pid) else None


def _log_tail(home: Path, lines: int = 5) -> str:
    try:
        text = (home / LOG).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def _wait_healthy(state: ServerState, home: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not healthy(state.port):
        if not _alive(state.pid):
            tail = _log_tail(home)
            raise ServiceError(f"the project's Prefect server (pid {state.pid}, port {state.port}) exited at start; "
                               f"its log {home / LOG} ends: {tail or '(empty)'}")
        if time.monotonic() > deadline:
            raise ServiceError(f"the project's Prefect server did not answer on {state.url} within {timeout_s:g} s "
                               f"(log: {home / LOG}); on a busy machine raise pipeline.prefect.startup_timeout_s "
                               "(--set pipeline.prefect.startup_timeout_s=600), or `medexperts services down` and "
                               "retry")
        time.sleep(0.5)


def _start(home: Path, port: int) -> ServerState:
    if port == 0:
        port = _free_port()
    elif not _port_free(port):
        what = "another Prefect server (another project's?)" if healthy(port) else "another program"
        raise ServiceError(f"port {HOST}:{port} is taken by {what}, not this project's Prefect server; give this "
                           f"project its own port: pipeline.prefect.port in params/pipeline.yaml or "
                           f"{PORT_ENV}=<port> (0: any free port)")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", OWNED_ENV)}
    env["PREFECT_HOME"] = str(home)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    with open(home / LOG, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own session: a killed run does not take it along
    state = ServerState(proc.pid, port, time.time(), str(home))
    _write_state(home, state)
    return state


def ensure_prefect_server(root: Path, port: int = 4200, startup_timeout_s: float = 300.0) -> str:
    """The API URL every Prefect call of this process uses (exported as ``PREFECT_API_URL``): the user's own when
    set, else the project's server, started when it is not running."""
    preset = os.environ.get("PREFECT_API_URL")
    if preset and not os.environ.get(OWNED_ENV):
        return preset
    home = prefect_home(root)
    with _locked(home):
        state = running(root)
        if state is None:
            state = _start(home, configured_port(port))
        _wait_healthy(state, home, startup_timeout_s)
    os.environ["PREFECT_API_URL"] = state.api_url
    os.environ[OWNED_ENV] = "1"
    _refresh_prefect_settings()
    return state.api_url


def _refresh_prefect_settings() -> None:
    """Prefect reads its settings from the environment once, at import; when it is already imported, make it
    read them again so that this process talks to the server just set (not to a temporary one)."""
    context = sys.modules.get("prefect.context")
    refresh = getattr(context, "refresh_global_settings_context", None)
    if refresh is not None:
        refresh()


def stop_prefect_server(root: Path, timeout_s: float = 30.0) -> ServerState | None:
    """Stop the project's server (SIGTERM to its session, SIGKILL after ``timeout_s``); None when none ran."""
    home = prefect_home(root)
    with _locked(home):
        state = read_state(home)
        if state is None:
            return None
        if _alive(state.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _alive(state.pid) and time.monotonic() < deadline:
                _reap(state.pid)
                time.sleep(0.2)
            if _alive(state.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(state.pid, signal.SIGKILL)
                _reap(state.pid)
            if _alive(state.pid):
                raise ServiceError(f"could not stop the Prefect server (pid {state.pid}); stop it by hand")
        (home / STATE).unlink(missing_ok=True)
        return state


def _reap(pid: int) -> None:
    """Collect the server's exit status when this process started it (else it would linger as a zombie)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def shell_exports(root: Path, api_url: str) -> str:
    """The line that points another shell's ``prefect`` CLI at this project's server."""
    return f"export PREFECT_HOME={prefect_home(root)} PREFECT_API_URL={api_url}"
