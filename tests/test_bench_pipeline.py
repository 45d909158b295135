"""The full-profile bench spans several sittings: its invocations' time is kept even when one is killed, and its
README table checks LoRKD's goals from the run's own scores and parameter counts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench import pipeline
from bench.readme import commits_line, lorkd_goals


def test_wall_time_sums_finished_and_stopped_invocations() -> None:
    invocations = [
        {"started": "2026-12-05T10:00:00Z", "last_seen": "2026-12-05T12:30:00Z"},  # killed: up to its heartbeat
        {"started": "2026-12-05T20:00:00Z"},  # killed before its first heartbeat: unknown, counts nothing
        {"started": "2026-12-06T00:00:00Z", "last_seen": "2026-12-06T00:59:00Z", "finished": "2026-12-06T01:00:00Z"},
    ]
    assert pipeline.invocations_wall_seconds(invocations) == 2.5 * 3600 + 3600


def test_heartbeat_records_the_running_invocation_and_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "HEARTBEAT_SECONDS", 0.01)
    invocations = [{"started": "2026-12-05T10:00:00Z", "finished": "2026-12-05T11:00:00Z"},
                   {"started": "2026-12-06T00:00:00Z"}]
    beaten = threading.Event()
    save = pipeline._save_invocations

    def saved_and_told(work: Path, records: list[dict]) -> None:
        save(work, records)
        beaten.set()

    monkeypatch.setattr(pipeline, "_save_invocations", saved_and_told)
    beat = pipeline._Heartbeat(tmp_path, invocations)
    beat.start()
    assert beaten.wait(600), "no heartbeat was written"  # generous: the beat comes every 10 ms
    record = tmp_path / "invocations.json"
    saved = json.loads(record.read_text())
    assert "last_seen" in saved[-1] and "last_seen" not in saved[0]
    beat.stop({"finished": "2026-12-06T01:00:00Z"})
    saved = json.loads(record.read_text())
    assert saved[-1]["finished"] == "2026-12-06T01:00:00Z" and saved[0] == invocations[0]
    assert not beat.thread.is_alive()


def _task(teacher: float, lorkd: float, single: float | None, deployed: int, teacher_params: int) -> dict:
    return {"models": {"expert": 0.8, "teacher": teacher, "lorkd": lorkd, "single_student": single},
            "params": {"lorkd_deployed": deployed, "teacher": teacher_params}}


def test_lorkd_goals_are_checked_from_the_runs_scores_and_sizes() -> None:
    result = {"params": {"metric": "macro_f1"},
              "tasks": {"pneumoniamnist": _task(0.85, 0.87, 0.86, 700, 11_000),  # every goal met
                        "breastmnist": _task(0.80, 0.78, 0.79, 2_000, 11_000),  # below the teacher, 18 %, below single
                        "hoc": _task(0.60, 0.61, None, 500, 22_000),  # no single-task student scored: not judged
                        "pubmedqa": {"models": {"expert": 0.4}, "params": {}}}}  # no LoRKD model: no row
    text = lorkd_goals(result)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["pneumoniamnist"].rstrip(" |").endswith("yes / yes / yes")
    assert rows["breastmnist"].rstrip(" |").endswith("**no** / **no** / **no**")
    assert rows["hoc"].rstrip(" |").endswith("yes / yes / —")
    assert "pubmedqa" not in rows
    assert lorkd_goals({"params": {"metric": "macro_f1"}, "tasks": {"pubmedqa": {"models": {}}}}) == ""


def test_a_second_invocation_on_the_same_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the first invocation is another process holding DIR (a lock this process held would be re-entered)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from pathlib import Path\n"
                               "from components.core.lock import project_lock\n"
                               "with project_lock(Path(sys.argv[1]), wait=False, what='the first invocation'):\n"
                               "    print('held', flush=True); time.sleep(600)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr("sys.argv", ["bench.pipeline", "--profile", "tiny", "--work", str(tmp_path)])
        with pytest.raises(SystemExit) as refused:
            pipeline.main()
    finally:
        holder.kill()
        holder.wait()
    assert str(tmp_path) in str(refused.value) and "the first invocation" in str(refused.value)
    assert not (tmp_path / "invocations.json").exists()  # nothing recorded for the refused one


def test_bad_overrides_fail_in_one_line_before_anything_is_recorded(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["bench.pipeline", "--profile", "tiny", "--work", str(work),
                                     "--set", "data.active=[nosuch_task]"])
    with pytest.raises(SystemExit) as refused:
        pipeline.main()
    assert "nosuch_task" in str(refused.value) and "known:" in str(refused.value)
    assert not work.exists()


def test_quick_vs_full_pairs_the_models_both_runs_scored_on_the_same_rows() -> None:
    from bench.readme import quick_vs_full

    quick = {"params": {"metric": "macro_f1"}, "machine": {"git_commit": "abcdef123"},
             "tasks": {"hoc": {"test_samples": 3547, "probe": 0.38, "expert": 0.43, "fused": 0.40},  # older: no models
                       "pubmedqa": {"test_samples": 48, "models": {"expert": 0.3}}}}  # other test rows: left out
    full = {"params": {"metric": "macro_f1"},
            "tasks": {"hoc": {"test_samples": 3547, "models": {"probe": 0.43, "expert": 0.63, "lorkd": 0.5}},
                      "pubmedqa": {"test_samples": 500, "models": {"expert": 0.41}},
                      "retinamnist": {"test_samples": 400, "models": {"expert": 0.4}}}}  # not in quick
    text = quick_vs_full(quick, full)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].split("|")[2:4] == [" probe ", " deployed expert "] and "LoRKD" not in rows[0]
    assert rows[2].startswith("| hoc | 0.380 → 0.430 | 0.430 → 0.630 |") and len(rows) == 3
    assert quick_vs_full({"params": {"metric": "accuracy"}, "tasks": quick["tasks"]}, full) == ""


def test_readme_tables_match_the_committed_results() -> None:
    """README.md's generated sections are what bench/results/ gives (a results file left out of a commit, or a table
    edited by hand, fails here); an edited cell is put back."""
    from bench.readme import render

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert render(readme) == readme, "README.md is out of date with bench/results/: run `medexperts bench readme`"
    start = readme.index("<!-- results:derma -->")
    edited = readme[:start] + readme[start:].replace("| 0.", "| 9.", 1)
    assert edited != readme and render(edited) == readme


def test_commits_line_says_whether_the_run_and_its_baselines_are_of_one_commit() -> None:
    """A run resumed across sittings records each invocation's commit: the README says when they differ."""
    one, two = "a" * 40, "b" * 40
    run = {"invocations": [{"git_commit": one}, {"git_commit": one}]}
    assert commits_line(run, {"machine": {"git_commit": one}}, "base").startswith("- One commit: the run's 2 "
                                                                                 "invocations at aaaaaaaa;")
    assert "**Not one commit**" in commits_line(run, {"machine": {"git_commit": two}}, "base")
    mixed = {"invocations": [{}, {"git_commit": one}, {"git_commit": two}]}
    line = commits_line(mixed, {"machine": {"git_commit": two}}, "base")
    assert "**Not one commit**" in line and "aaaaaaaa, bbbbbbbb (1 of them at an unrecorded commit)" in line
    assert "**Not one commit**" in commits_line(run, {}, "base")  # no baselines file: nothing shows they match
