"""What a kill, a second run or a crash leaves behind is found and put right by the next run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from components.core.lock import LOCK_FILE, ProjectBusy, clean_dead_temporaries, holder, project_lock

PROJECT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def hold_in_child(folder: Path) -> subprocess.Popen[str]:
    """Another process that takes the project lock and keeps it until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from components.core.lock import project_lock
        with project_lock({str(folder)!r}, what="retrain quick"):
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(ProjectBusy, match=rf"pid {child.pid} on .* \(retrain quick\), since"):
            with project_lock(tmp_path, wait=False):
                pass
    finally:
        child.communicate("")
    with project_lock(tmp_path, wait=False):  # free once the holder is gone
        assert holder(tmp_path / LOCK_FILE)["pid"] == os.getpid()
        with project_lock(tmp_path, wait=False):  # re-entrant in one process (the flow, then a stage)
            pass
    assert holder(tmp_path / LOCK_FILE) == {}


def test_a_second_run_waits_for_the_first(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    said: list[str] = []

    def release_soon(line: str) -> None:
        said.append(line)
        assert child.stdin is not None
        child.stdin.close()  # the holder finishes while we wait

    with project_lock(tmp_path, on_wait=release_soon):
        assert holder(tmp_path / LOCK_FILE)["pid"] == os.getpid()
    child.wait()
    assert len(said) == 1 and f"pid {child.pid}" in said[0]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    child.kill()
    child.wait()
    with project_lock(tmp_path, wait=False):
        pass


def test_temporaries_of_dead_runs_are_cleaned_and_a_half_swap_restored(tmp_path: Path) -> None:
    gone, alive = dead_pid(), os.getpid()
    (tmp_path / f".experts.tmp-{gone}-0123abcd" / "pubmedqa").mkdir(parents=True)  # a killed stage's temp folder
    (tmp_path / f".summary.json.tmp-{gone}-89abcdef").write_text("{")  # a killed atomic_file
    (tmp_path / f".fusion.tmp-{alive}-0123abcd").mkdir()  # ours: kept
    (tmp_path / "data").mkdir()
    (tmp_path / f".data.old-{gone}-0123abcd").mkdir()  # a swap that finished: the backup is garbage
    backup = tmp_path / f".decompose.old-{gone}-fedcba98"  # killed between the two renames: the only copy
    backup.mkdir()
    (backup / "summary.json").write_text("{}")
    touched = clean_dead_temporaries(tmp_path)
    assert len(touched) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["data", "decompose", f".fusion.tmp-{alive}-0123abcd"])
    assert (tmp_path / "decompose" / "summary.json").read_text() == "{}"


def test_runs_of_dead_processes_are_marked_failed(isolated_project: Path) -> None:
    import mlflow

    from components.tracking import runs

    exp = mlflow.get_experiment_by_name("tests").experiment_id
    client = mlflow.MlflowClient()
    orphan = client.create_run(exp, tags={runs.HOST_TAG: __import__("socket").gethostname(),
                                          runs.PID_TAG: str(dead_pid()), "mlflow.runName": "expert:pubmedqa"})
    other_host = client.create_run(exp, tags={runs.HOST_TAG: "elsewhere", runs.PID_TAG: "1"})
    with runs.run("live") as live:
        found = runs.fail_orphans(exp)
        assert list(found) == [orphan.info.run_id]
        assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"
    assert "is gone" in client.get_run(orphan.info.run_id).data.tags["medexperts.failed_reason"]
    assert client.get_run(other_host.info.run_id).info.status == "RUNNING"  # cannot be checked from here


def _run_until(cmd: list[str], env: dict[str, str], marker: str, sig: int) -> tuple[int, str]:
    """Start ``cmd``; when a line contains ``marker``, send ``sig`` to its process group; (exit status, output)."""
    import signal  # noqa: F401 -- the caller passes signal numbers

    proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            os.killpg(proc.pid, sig)
            break
    rest, _ = proc.communicate(timeout=600)  # bounded, generous: a stop request must end the run
    return proc.returncode, "".join(lines) + rest


@pytest.mark.slow
def test_kill_and_sigterm_mid_training_leave_nothing_half_done(tmp_path: Path, tiny_bert: Path,
                                                               prefect_server: str) -> None:
    import signal

    import mlflow

    env = {**os.environ, "MEDEXPERTS_PROJECT_DIR": str(PROJECT), "MEDEXPERTS_ARTIFACTS_DIR": str(tmp_path / "art"),
           "MEDEXPERTS_ARTIFACT_ROOT": (tmp_path / "mlruns").as_uri(),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [str(Path(sys.executable).parent / "medexperts"), "run", "--profile", "tiny",
           "--set", f"foundation.text.source={tiny_bert}", "--set", "registry.floor=0.0",
           "--set", "experts.trainer.text.max_epochs=3"]
    # kill -9 in the middle of an expert's training (after its first checkpoint: written right after the epoch line)
    code, out = _run_until(cmd, env, "[experts] pubmedqa LoRA: epoch 2/3", signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-2000:]
    assert list((tmp_path / "art").glob(".experts.tmp-*"))  # what the kill left
    again = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert not list((tmp_path / "art").glob(".*.tmp-*")) and not list((tmp_path / "art").glob(".*.old-*"))
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("medexperts").experiment_id
    every = client.search_runs([exp], max_results=500)
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    orphans = [r for r in every if "medexperts.failed_reason" in r.data.tags]
    assert {r.info.run_name for r in orphans} >= {"retrain:tiny", "stage:experts", "expert:pubmedqa"}
    resumed = [r for r in every if r.info.run_name == "expert:pubmedqa" and r.info.status == "FINISHED"]
    killed = next(r.info.run_id for r in orphans if r.info.run_name == "expert:pubmedqa")
    assert resumed[0].data.tags["resumed_from_run"] == killed  # the curve's first epoch is in the killed run

    # SIGTERM during forced re-runs, at several points (mid-training, at a stage start, during the federated
    # rounds): each run stops at its next safe point (components.core.stop) and ends by SIGTERM, its MLflow runs
    # FAILED, the previous outputs as they were. (Before safe points, a SIGTERM raised wherever it landed: once in
    # the federated rounds it left stage:federated and retrain RUNNING.)
    stage_files = {p: p.read_bytes() for p in (tmp_path / "art").glob("*/_stage.json")}
    assert len(stage_files) == 10
    for marker in ("[experts] medical_abstracts LoRA: epoch 1/3", "[decompose] started", "[federated] round 1/"):
        code, out = _run_until([*cmd, "--force"], env, marker, signal.SIGTERM)
        assert code == -signal.SIGTERM, (marker, out[-2000:])
        assert "[stop] stopped at" in out and "Traceback" not in out, (marker, out[-2000:])
        assert "Successfully registered" not in out.split(marker)[-1], marker
        every = client.search_runs([exp], max_results=1000)
        assert not [r.info.run_name for r in every if r.info.status == "RUNNING"], marker
        assert {p: p.read_bytes() for p in (tmp_path / "art").glob("*/_stage.json")} == stage_files, marker


@pytest.mark.parametrize(("code", "what"), [(28, "no space left"), (30, "read-only file system")])
def test_a_full_or_read_only_disk_is_one_line(isolated_project: Path, monkeypatch: pytest.MonkeyPatch,
                                              code: int, what: str) -> None:
    """ENOSPC / EROFS in the middle of a stage: one line naming the folder and the free space, exit 2; the
    stage's previous output untouched (the write goes to a temporary folder that is discarded)."""
    from typer.testing import CliRunner

    from components.core import artifacts
    from flows.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["stage", "sources"]).exit_code == 0
    out = isolated_project / "artifacts" / "sources"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(path: Path, obj: object) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(artifacts, "write_json", full)
    result = runner.invoke(app, ["stage", "sources", "--force"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and what in lines[0] and "MiB free there" in lines[0] and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(out.parent.glob(".sources.tmp-*"))


def test_an_experiment_created_meanwhile_by_another_run_is_used(isolated_project: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs on a fresh tracking server both look for the experiment, find none, and both create it: the
    second create fails; the run goes on with the experiment the other one made."""
    import mlflow

    from components.tracking import runs

    other = mlflow.create_experiment("shared")  # what the other run created between our look and our create
    real, calls = mlflow.get_experiment_by_name, []

    def look(name: str) -> object:  # the first look comes before the other run's create
        calls.append(name)
        return None if len(calls) == 1 else real(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", look)
    assert runs.ensure_experiment("shared") == other
