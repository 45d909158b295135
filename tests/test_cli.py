"""Bad input through the CLI: one line naming the problem, exit status 2, nothing damaged."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_unknown_profile(isolated_project: Path) -> None:
    code, output = invoke("run", "--profile", "nope", "--dry-run")
    assert code == 2
    assert "unknown profile 'nope'" in output and "Traceback" not in output


def test_bad_override_names_key(isolated_project: Path) -> None:
    code, output = invoke("run", "--dry-run", "--set", "experts.lora.rank=-1")
    assert code == 2 and "key 'lora.rank'" in output


def test_override_value_not_yaml(isolated_project: Path) -> None:
    code, output = invoke("run", "--dry-run", "--set", "data.active=[pubmedqa")
    assert code == 2 and "not valid YAML" in output


def test_dry_run_and_print_config(isolated_project: Path) -> None:
    code, output = invoke("run", "--dry-run", "--print-config", "--profile", "tiny")
    assert code == 0 and '"profile": "tiny"' in output and "params OK" in output


def test_unknown_stage(isolated_project: Path) -> None:
    code, output = invoke("stage", "train")
    assert code == 2 and "unknown stage 'train'" in output


def test_stage_needs_its_inputs(isolated_project: Path) -> None:
    code, output = invoke("stage", "experts", "--profile", "tiny")
    assert code == 2 and "needs the output of stage 'data'" in output
    assert not (isolated_project / "artifacts" / "experts").exists()


def test_missing_data_file_keeps_previous_output(isolated_project: Path, tmp_path: Path) -> None:
    assert invoke("stage", "data", "--profile", "tiny")[1].count("needs the output of stage 'sources'") == 1
    assert invoke("stage", "sources", "--profile", "tiny")[0] == 0
    assert invoke("stage", "data", "--profile", "tiny")[0] == 0
    manifest = (isolated_project / "artifacts" / "data" / "manifest.json").read_bytes()
    code, output = invoke("stage", "data", "--profile", "tiny", "--set",
                          "data.tasks.breastmnist.path=data/medmnist/missing.npz")
    assert code == 2 and "missing.npz" in output and "breastmnist" in output
    assert (isolated_project / "artifacts" / "data" / "manifest.json").read_bytes() == manifest


def test_unknown_registered_model(isolated_project: Path) -> None:
    code, output = invoke("promote", "--model", "nope", "--version", "1")
    assert code == 2 and "model 'nope' version 1 does not exist" in output


@pytest.mark.parametrize("content", [None, ""])
def test_predict_bad_input_file(isolated_project: Path, tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "inputs.txt"
    if content is not None:
        path.write_text(content)
    code, output = invoke("predict", "--model", "models:/x@champion", "--input", str(path))
    assert code == 2 and ("not found" in output or "no input lines" in output)


def test_predict_unknown_model(isolated_project: Path, tmp_path: Path) -> None:
    path = tmp_path / "inputs.txt"
    path.write_text("a question\n")
    code, output = invoke("predict", "--model", "models:/nope@champion", "--input", str(path))
    assert code == 2 and "cannot load 'models:/nope@champion'" in output


def test_serve_builds_a_scheduled_deployment(isolated_project: Path) -> None:
    from flows.retrain import deployment

    dep = deployment("weekly", "0 3 * * 0", "quick")
    assert dep.name == "weekly" and dep.parameters == {"profile": "quick"}
    assert dep.schedules[0].schedule.cron == "0 3 * * 0"
    # one run at a time: a run fired while the last still runs is cancelled, not started beside it
    assert dep.concurrency_limit == 1 and dep.concurrency_options.collision_strategy.value == "CANCEL_NEW"


def test_serve_rejects_bad_cron(isolated_project: Path) -> None:
    code, output = invoke("serve", "--cron", "every sunday")
    assert code == 2 and "not a valid cron expression" in output


def test_ui_serves_the_project_store(isolated_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **_: calls.append(cmd) or 0)
    code, output = invoke("ui", "--port", "5055")
    assert code == 0 and "http://127.0.0.1:5055" in output
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{isolated_project / 'mlflow.db'}"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_dry_run_and_stage_help_list_every_stage(isolated_project: Path) -> None:
    from flows.stages import ORDER

    code, output = invoke("run", "--dry-run", "--profile", "tiny")
    assert code == 0 and f"stages: {', '.join(ORDER)}" in output
    code, output = invoke("stage", "--help")
    assert code == 0 and all(name in output for name in ORDER)


@pytest.mark.parametrize("command", ["run", "stage", "dvc-yaml"])
def test_flags_render_as_flags(command: str) -> None:
    """On/off options take no value: the help must not show one (typer 0.29 printed `--force <bool>`)."""
    code, output = invoke(command, "--help")
    assert code == 0 and "--help" in output and "<bool>" not in output


def test_bad_set_value_is_blamed_on_set(isolated_project: Path) -> None:
    code, output = invoke("run", "--dry-run", "--set", "experts.lora.rank=0")
    assert code == 2 and "--set: key 'lora.rank'" in output and "experts.yaml" not in output


def test_flower_config_prints_the_sites_model_config(isolated_project: Path) -> None:
    """What a coordinator pipes into write_app(model_config=...): JSON of the client tasks and federated.client's
    settings, the text foundation as the sites have it; a bad override is one line, as for `run`."""
    import json

    code, output = invoke("flower-config", "--profile", "tiny", "--set", "data.active=[pneumoniamnist,pubmedqa]",
                          "--set", "federated.client.image_channels=[4,8]", "--text-foundation", "/sites/minilm")
    assert code == 0, output
    config = json.loads(output)
    assert set(config["tasks"]) == {"pneumoniamnist", "pubmedqa"} and config["image_channels"] == [4, 8]
    assert config["tasks"]["pubmedqa"][0] == "text" and config["text_foundation"] == "/sites/minilm"
    code, output = invoke("flower-config", "--set", "federated.client.embedding_rank=0")
    assert code == 2 and "embedding_rank" in output and "Traceback" not in output
