"""`medexperts`: run the pipeline, one stage (DVC's driver), serve on a schedule, promote, predict, UI."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from components.core.errors import MedExpertsError
from components.core.stop import StopRequested

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _flag_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """Typer 0.29's help shows a `<bool>` value for on/off flags (`--dry-run <bool>`), as if they took one."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]
# Wide enough for the results tables when the output is a log file, not a terminal.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

# The stage names, for help texts (kept in step with flows.stages.STAGES by a test; importing the table here
# would load torch for every command).
STAGE_NAMES = ("sources", "data", "foundation", "experts", "federated", "decompose", "routing", "fusion", "evaluate",
               "promote")
Profile = Annotated[str | None, typer.Option(help="Profile under params/profiles/ (default: pipeline.yaml's).")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a param: --set experts.lora.rank=16 (YAML value).")]


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE pairs -> {dotted key: YAML-parsed value}."""
    import yaml

    from components.core.errors import ParamsError

    out_: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. experts.lora.rank=16")
        try:
            out_[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParamsError(f"--set {item!r}: the value is not valid YAML") from None
    return out_


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user error is one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MedExpertsError as exc:
            err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except StopRequested as exc:  # SIGTERM, honoured at a safe point (`medexperts stage`; a flow re-raises it)
            err.print(f"[bold red]stopped:[/] {exc}; this run's MLflow runs are FAILED, the previous outputs "
                      "unchanged", highlight=False, soft_wrap=True)
            raise typer.Exit(128 + exc.signum) from None
        except OSError as exc:
            line = storage_error(exc)
            if line is None:
                raise
            err.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


STORAGE_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system"}


def storage_error(exc: OSError) -> str | None:
    """One line for a full or read-only disk (naming the folder, what is free there and the fix); None for any
    other OSError. What was written before stays: every output is swapped in whole or not at all."""
    what = STORAGE_ERRNOS.get(exc.errno or -1)
    if what is None:
        return None
    path = Path(exc.filename) if exc.filename else None
    folder = path.parent if path is not None else Path.cwd()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
        room = f"{free / 2**20:.0f} MiB free there"
    except OSError:
        room = "free space unknown"
    fix = ("free some space (or point MEDEXPERTS_ARTIFACTS_DIR / MLFLOW_TRACKING_URI at a larger disk)"
           if exc.errno != errno.EROFS else "make it writable, or point MEDEXPERTS_ARTIFACTS_DIR at a writable folder")
    return (f"StorageError: {what} writing {path or 'a file'} (folder {folder}, {room}); {fix}, then re-run: "
            "finished outputs were kept, the unfinished one was discarded")


def _setup() -> Path:
    from flows.environment import configure, project_dir

    root = project_dir()
    configure(root)
    return root


def _params(root: Path, profile: str | None, print_config: bool, overrides: dict[str, Any] | None = None) -> Any:
    from components.config import load_params

    params = load_params(root / "params", profile, overrides)
    if print_config:
        out.print_json(json.dumps(params.model_dump(mode="json")))
    return params


def _prefect_server(root: Path, params: Any) -> str:
    """Point this process's Prefect client at the project's server (started on first use)."""
    from flows.services import ensure_prefect_server

    cfg = params.pipeline.prefect
    return ensure_prefect_server(root, cfg.port, cfg.startup_timeout_s)


def _check_free(root: Path) -> None:
    """--no-wait: fail before the flow starts (a ProjectBusy raised inside a Prefect flow would come back as a
    crashed flow run and a traceback)."""
    from components.core.lock import project_lock
    from flows.environment import artifacts_dir

    with project_lock(artifacts_dir(root), wait=False):
        pass


@app.command()
@user_errors
def run(profile: Profile = None, set_: Sets = None, force: Annotated[bool, typer.Option(help="Re-run unchanged stages.")] = False,
        print_config: Annotated[bool, typer.Option("--print-config", help="Print the merged params.")] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate params and stop.")] = False,
        no_wait: Annotated[bool, typer.Option("--no-wait", help="Exit (status 2) instead of waiting when another "
                                              "run holds the project.")] = False,
        only: Annotated[list[str] | None, typer.Option("--stage", help="Run only this stage (repeatable); its "
                                                       "inputs must exist.")] = None) -> None:
    """Run the retrain flow end to end (Prefect, MLflow, DVC) and print the results."""
    root = _setup()
    overrides = parse_sets(set_)
    params = _params(root, profile, print_config, overrides)
    if dry_run:
        from flows.stages import ORDER

        out.print(f"params OK (profile {params.pipeline.profile}); stages: {', '.join(ORDER)}")
        return
    _prefect_server(root, params)
    from flows.report import print_results
    from flows.retrain import retrain

    if no_wait:
        _check_free(root)
    if only:
        from components.core.errors import ParamsError

        unknown = sorted(set(only) - set(STAGE_NAMES))
        if unknown:
            raise ParamsError(f"--stage {unknown[0]!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
    results = retrain(profile=params.pipeline.profile, force=force, overrides=overrides, wait=not no_wait,
                      stages=only or None)
    print_results(out, root, results)


@app.command()
@user_errors
def stage(name: Annotated[str, typer.Argument(help=f"One of: {' | '.join(STAGE_NAMES)}.")],
          profile: Profile = None, set_: Sets = None,
          force: Annotated[bool, typer.Option("--force", help="Re-run even if unchanged.")] = False,
          print_config: Annotated[bool, typer.Option("--print-config", help="Print the merged params.")] = False) -> None:
    """Run one stage without Prefect (what `dvc repro` calls)."""
    root = _setup()
    from components.core.errors import ParamsError
    from components.tracking import runs
    from flows.environment import artifacts_dir, console_logging, mlruns_uri
    from flows.stages import STAGES, StageContext, run_stage

    console_logging()
    if name not in STAGES:
        raise ParamsError(f"unknown stage {name!r}; stages: {list(STAGES)}")
    from components.core import stop
    from components.core.lock import clean_dead_temporaries, project_lock

    params = _params(root, profile, print_config, parse_sets(set_))
    with stop.graceful(), project_lock(artifacts_dir(root), what=f"stage {name}"):
        clean_dead_temporaries(artifacts_dir(root))
        runs.use_experiment(params.pipeline.experiment, mlruns_uri(root))
        run_stage(name, StageContext(root, artifacts_dir(root), params, os.environ.get("MEDEXPERTS_PARENT_RUN_ID")),
                  force=force)


@app.command("dvc-yaml")
@user_errors
def dvc_yaml(check: Annotated[bool, typer.Option("--check", help="Exit 1 if dvc.yaml differs from the table.")] = False
             ) -> None:
    """Write dvc.yaml from the stage table (flows/stages.py), or check that the committed one equals it."""
    from flows.dvc_yaml import render

    root = _setup()
    text, path = render(), root / "dvc.yaml"
    if check:
        if not path.is_file() or path.read_text() != text:
            err.print(f"{path} differs from the stage table; run `medexperts dvc-yaml` and commit it")
            raise typer.Exit(1)
        out.print(f"{path} matches the stage table")
        return
    path.write_text(text)
    out.print(f"wrote {path}")


@app.command()
@user_errors
def serve(cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * 0'.")] = "0 3 * * 0",
          interval: Annotated[float | None, typer.Option(help="Run every SECONDS instead of on --cron.")] = None,
          name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled", profile: Profile = None,
          set_: Sets = None) -> None:
    """Register a Prefect deployment of the retrain flow on a schedule and serve it (Ctrl-C stops serving)."""
    root = _setup()
    from flows.retrain import deployment
    from flows.services import shell_exports

    overrides = parse_sets(set_)
    params = _params(root, profile, False, overrides)
    dep = deployment(name, cron, params.pipeline.profile, overrides=overrides, interval=interval)
    api = _prefect_server(root, params)
    when = f"every {interval:g} s" if interval else f"on '{cron}'"
    out.print(f"serving deployment [bold]retrain/{name}[/] {when} against {api} (Ctrl-C stops serving; the "
              f"server keeps running). Its runs: {api.removesuffix('/api')}/deployments. Trigger one by hand from "
              f"another shell:\n  {shell_exports(root, api)}\n  prefect deployment run 'retrain/{name}'",
              soft_wrap=True)
    from prefect import serve as prefect_serve

    prefect_serve(dep, limit=1)  # and this process starts at most one run at a time whatever the server says


@app.command()
@user_errors
def promote(model: Annotated[str, typer.Option(help="Registered model name.")],
            version: Annotated[str, typer.Option(help="Version to make champion.")]) -> None:
    """Make VERSION of MODEL the champion (recorded with the previous champion and metrics)."""
    from components.tracking.registry import promote_manual

    _setup()
    d = promote_manual(model, version)
    out.print(f"{d.model} v{d.version} is champion (was v{d.champion_version}); recorded: {d.reason}")


@app.command()
@user_errors
def predict(model: Annotated[str, typer.Option(help="Model URI, e.g. models:/medexperts-pubmedqa@champion.")],
            input: Annotated[Path, typer.Option("--input", help="Text file (one input per line) or .npy/.npz images.")],
            task: Annotated[str | None, typer.Option(help="Task head of a multi-task model.")] = None,
            modality: Annotated[str | None, typer.Option(
                help="The inputs' modality, checked against the task's ('image' / 'text', or a FedKIM model's "
                "modality description, e.g. 'chest X-ray image'): a mismatch is refused.")] = None,
            routing: Annotated[bool, typer.Option("--routing", help="A routed model: also print each input's "
                                                  "expert weights per layer.")] = False,
            allow_unverified: Annotated[bool, typer.Option(
                "--allow-unverified", help="Load a version registered without a file digest (by an older "
                "medexperts) unchecked.")] = False) -> None:
    """Load a registered model and print predictions for raw inputs."""
    from components.tracking.serving import load_model
    from flows.report import load_raw_inputs, print_predictions

    _setup()
    from components.core.errors import ParamsError

    raw = load_raw_inputs(input)
    loaded = load_model(model, allow_unverified=allow_unverified)
    served = getattr(getattr(loaded.unwrap_python_model(), "bundle", None), "tasks", None)
    if served is not None and task is not None and task not in served:
        raise ParamsError(f"--task {task!r} is not a task of {model}; it serves {served}")
    if served is not None and task is None and len(served) > 1:
        raise ParamsError(f"{model} serves several tasks; choose one with --task (one of {served})")
    params = {**({"task": task} if task else {}), **({"modality": modality} if modality else {}),
              **({"routing": True} if routing else {})}
    frame = loaded.predict(raw, params=params or None)
    print_predictions(out, frame)


@app.command()
@user_errors
def ui(port: int = 5000, host: str = "127.0.0.1",
       prefect: Annotated[bool, typer.Option("--prefect", help="Show the Prefect UI's address instead (flow runs, "
                                             "deployments, schedules); starts the project's server if needed."
                                             )] = False) -> None:
    """Open the MLflow UI over the project's tracking store (or, with --prefect, print the Prefect UI's address)."""
    root = _setup()
    if prefect:
        api = _prefect_server(root, _params(root, None, False))
        out.print(f"Prefect UI: {api.removesuffix('/api')} (the project's server; `medexperts services down` stops "
                  "it)")
        return
    uri = os.environ["MLFLOW_TRACKING_URI"]
    out.print(f"MLflow UI on http://{host}:{port} over {uri} (Ctrl-C stops)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd, cwd=root))


@app.command("log-flower")
@user_errors
def log_flower(folder: Annotated[Path, typer.Argument(help="The Flower server's output-dir (reports.json, "
                                                       "payload.pt).")],
               name: Annotated[str | None, typer.Option(help="MLflow run name (default: flower:<folder name>).")]
               = None) -> None:
    """Log a finished Flower run into the project's MLflow store: one step per round (client losses, accepted /
    missing / rejected sites, bytes, seconds; the ServerApp scores nothing, so a round's validation of the aggregate
    comes from `medexperts run --set federated.clients_from=FOLDER`, which scores each kept round on the server's
    rows), the reports and the final weights."""
    from components.federated.rounds import FLOWER_PAYLOAD, FLOWER_REPORTS, read_reports
    from components.tracking import runs
    from flows.environment import mlruns_uri

    root = _setup()
    reports = read_reports(folder / FLOWER_REPORTS)
    params = _params(root, None, False)
    runs.use_experiment(params.pipeline.experiment, mlruns_uri(root))
    sites = sorted({c for r in reports for c in r.accepted})
    with runs.run(name or f"flower:{folder.resolve().name}", tags={"driver": "flower", "federated.rounds":
                                                                   str(len(reports)),
                                                                   "federated.clients": ",".join(sites)}) as run_id:
        for report in reports:
            runs.log_metrics(report.as_metrics(), prefix="round.", step=report.round)
        runs.log_file(folder / FLOWER_REPORTS)
        if (folder / FLOWER_PAYLOAD).is_file():
            runs.log_file(folder / FLOWER_PAYLOAD)
    missing = sum(len(r.missing) for r in reports)
    out.print(f"logged {len(reports)} Flower round(s) from {folder} as MLflow run {run_id} (sites {sites}; "
              f"{missing} missing answer(s))")


@app.command("flower-config")
@user_errors
def flower_config(profile: Profile = None, set_: Sets = None,
                  text_foundation: Annotated[str | None, typer.Option(
                      help="The text foundation as every site has it: a folder there, or 'packaged' (default: "
                           "foundation.text.source).")] = None) -> None:
    """Print the Flower App's model-config (JSON) with which every hospital's `fedkim_model` builds this project's
    FedKIM client model (its client tasks, federated.client's settings, the text foundation): the config that makes
    `--set federated.clients_from=OUTPUT_DIR` accept the hospitals' aggregate. Pass it to `write_app(...,
    model_config=...)` in the coordinator's Flower environment."""
    from components.stages.federated import FederatedInputs, sites_model_config

    root = _setup()
    params = _params(root, profile, False, parse_sets(set_))
    config = sites_model_config(FederatedInputs.from_params(params),
                                text_foundation=text_foundation or params.foundation.text.source,
                                max_positions=params.foundation.text.max_length)
    sys.stdout.write(json.dumps(config) + "\n")  # plain JSON on stdout, for a file


services_app = typer.Typer(no_args_is_help=True, help="The project's Prefect server (127.0.0.1, SQLite under "
                           "$PREFECT_HOME): started by the first command that needs it, reused by the next ones.")
app.add_typer(services_app, name="services")


@services_app.command("up")
@user_errors
def services_up(team: Annotated[bool, typer.Option("--team", help="Team mode: PostgreSQL, an MLflow tracking "
                                                  "server and a Prefect server on it (pipeline.team).")] = False,
                set_: Sets = None) -> None:
    """Start the project's Prefect server (or find it running) and print how other shells reach it."""
    from flows.services import shell_exports

    root = _setup()
    params = _params(root, None, False, parse_sets(set_))
    if team:
        from flows.team import start_team, team_dir

        tp = params.pipeline.team
        state = start_team(root, tp.postgres_port, tp.mlflow_port, tp.prefect_port, tp.startup_timeout_s)
        out.print(f"team servers under {team_dir(root)}: PostgreSQL 127.0.0.1:{state.postgres_port}, MLflow "
                  f"{state.tracking_uri} (UI, API, proxied artifacts), Prefect {state.prefect_api_url.removesuffix('/api')}"
                  "\npoint a shell (runs, UIs, the `prefect` and `mlflow` CLIs) at them:\n"
                  f"  {state.exports()}",
                  soft_wrap=True)
        return
    api = _prefect_server(root, params)
    out.print(f"Prefect server: {api.removesuffix('/api')} (UI and API)\nfor the `prefect` CLI in another shell:\n"
              f"  {shell_exports(root, api)}", soft_wrap=True)


@services_app.command("status")
@user_errors
def services_status(team: Annotated[bool, typer.Option("--team", help="The team servers instead.")] = False
                    ) -> None:
    """Whether the project's Prefect server runs (pid, address, since when, healthy); exit 1 when it does not."""
    import datetime

    from flows.services import healthy, prefect_home, running, shell_exports

    root = _setup()
    if team:
        from flows.team import running as team_running
        from flows.team import team_dir

        found = team_running(root)
        if found is None:
            out.print(f"team servers: not running (state in {team_dir(root)}); `medexperts services up --team`")
            raise typer.Exit(1)
        out.print(f"team servers: PostgreSQL pid {found.postgres_pid} port {found.postgres_port}, MLflow pid "
                  f"{found.mlflow_pid} {found.tracking_uri}, Prefect pid {found.prefect_pid} "
                  f"{found.prefect_api_url}\n  {found.exports()}", soft_wrap=True)
        return
    state = running(root)
    if state is None:
        out.print(f"Prefect server: not running (state in {prefect_home(root)}); the next `medexperts run` or "
                  "`medexperts services up` starts it")
        raise typer.Exit(1)
    since = datetime.datetime.fromtimestamp(state.started).strftime("%Y-%m-%d %H:%M:%S")
    health = "healthy" if healthy(state.port) else "not answering yet"
    out.print(f"Prefect server: running, pid {state.pid}, {state.url} since {since}, {health}\n"
              f"  {shell_exports(root, state.api_url)}", soft_wrap=True)


@services_app.command("down")
@user_errors
def services_down(team: Annotated[bool, typer.Option("--team", help="Stop the team servers instead.")] = False
                  ) -> None:
    """Stop the project's Prefect server (its database stays: runs and deployments are kept)."""
    from flows.services import stop_prefect_server

    root = _setup()
    if team:
        from flows.team import stop_team

        stopped = stop_team(root)
        out.print("team servers: were not running" if stopped is None else
                  "team servers: stopped (PostgreSQL, MLflow, Prefect; their data stays)")
        return
    state = stop_prefect_server(root)
    out.print("Prefect server: was not running" if state is None else
              f"Prefect server: stopped (pid {state.pid}, port {state.port})")


def _bench_names() -> list[str]:
    """The benchmarks: the modules of the project's bench/ that define a `main` (not the shared `common`), read as
    text so that listing them imports nothing."""
    from flows.environment import project_dir

    return sorted(p.stem for p in (project_dir() / "bench").glob("*.py")
                  if p.stem not in ("__init__", "common") and "\ndef main(" in p.read_text())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False},
             help="Run benchmark NAME: `python -m bench.NAME ARGS...` in the project folder, its exit status passed "
                  "through; everything after NAME goes to the benchmark (`medexperts bench track --help`). "
                  f"Benchmarks: {', '.join(_bench_names()) or 'none in this folder'}.")
@user_errors
def bench(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The benchmark (bench/NAME.py).")]) -> None:
    from components.core.errors import ParamsError
    from flows.environment import project_dir

    names = _bench_names()
    if name not in names:
        raise ParamsError(f"unknown benchmark {name!r}; benchmarks: {', '.join(names) or 'none in this folder'}")
    raise typer.Exit(subprocess.call([sys.executable, "-m", f"bench.{name}", *ctx.args], cwd=project_dir()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
