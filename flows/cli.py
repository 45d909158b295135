"""`medexperts`: run the pipeline, one stage (DVC's driver), serve on a schedule, promote, predict, UI."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from components.core.errors import MedExpertsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Wide enough for the results tables when the output is a log file, not a terminal.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

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

    return wrapper


def _setup() -> Path:
    from flows.environment import configure, project_dir

    root = project_dir()
    configure(root)
    return root


def _params(root: Path, profile: str | None, print_config: bool, sets: list[str] | None = None) -> Any:
    from components.config import load_params

    params = load_params(root / "params", profile, parse_sets(sets))
    if print_config:
        out.print_json(json.dumps(params.model_dump(mode="json")))
    return params


@app.command()
@user_errors
def run(profile: Profile = None, set_: Sets = None, force: Annotated[bool, typer.Option(help="Re-run unchanged stages.")] = False,
        print_config: Annotated[bool, typer.Option("--print-config", help="Print the merged params.")] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate params and stop.")] = False) -> None:
    """Run the retrain flow end to end (Prefect, MLflow, DVC) and print the results."""
    root = _setup()
    params = _params(root, profile, print_config, set_)
    if dry_run:
        out.print(f"params OK (profile {params.pipeline.profile}); stages: data, foundation, experts, fusion, "
                  "evaluate, promote")
        return
    from flows.report import print_results
    from flows.retrain import retrain

    results = retrain(profile=params.pipeline.profile, force=force, overrides=parse_sets(set_))
    print_results(out, root, results)


@app.command()
@user_errors
def stage(name: Annotated[str, typer.Argument(help="data | foundation | experts | fusion | evaluate | promote")],
          profile: Profile = None, set_: Sets = None, force: bool = False,
          print_config: Annotated[bool, typer.Option("--print-config")] = False) -> None:
    """Run one stage without Prefect (what `dvc repro` calls)."""
    root = _setup()
    import mlflow

    from components.core.errors import ParamsError
    from components.tracking.runs import ensure_experiment
    from flows.environment import artifacts_dir, console_logging, mlruns_uri
    from flows.stages import STAGES, StageContext, run_stage

    console_logging()
    if name not in STAGES:
        raise ParamsError(f"unknown stage {name!r}; stages: {list(STAGES)}")
    params = _params(root, profile, print_config, set_)
    mlflow.set_experiment(experiment_id=ensure_experiment(params.pipeline.experiment, mlruns_uri(root)))
    run_stage(name, StageContext(root, artifacts_dir(root), params, os.environ.get("MEDEXPERTS_PARENT_RUN_ID")),
              force=force)


@app.command()
@user_errors
def serve(cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * 0'.")] = "0 3 * * 0",
          name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled", profile: Profile = None) -> None:
    """Register a Prefect deployment of the retrain flow on CRON and serve it (Ctrl-C stops)."""
    root = _setup()
    from flows.retrain import deployment

    params = _params(root, profile, False)
    dep = deployment(name, cron, params.pipeline.profile)
    out.print(f"serving deployment [bold]retrain/{name}[/] on '{cron}'; trigger by hand with "
              f"`prefect deployment run 'retrain/{name}'`")
    from prefect import serve as prefect_serve

    prefect_serve(dep)


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
            task: Annotated[str | None, typer.Option(help="Task head of a multi-task model.")] = None) -> None:
    """Load a registered model and print predictions for raw inputs."""
    from flows.report import load_raw_inputs, print_predictions

    _setup()
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.core.errors import RegistryError

    raw = load_raw_inputs(input)
    try:
        loaded = mlflow.pyfunc.load_model(model)
    except MlflowException as exc:
        raise RegistryError(f"cannot load {model!r}: {exc.message.splitlines()[0]}") from None
    frame = loaded.predict(raw, params={"task": task} if task else None)
    print_predictions(out, frame)


@app.command()
def ui(port: int = 5000, host: str = "127.0.0.1") -> None:
    """Open the MLflow UI over the project's tracking store."""
    root = _setup()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    out.print(f"MLflow UI on http://{host}:{port} over {uri} (Ctrl-C stops)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd, cwd=root))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
