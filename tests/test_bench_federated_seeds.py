"""bench/federated_seeds: a run stopped after some (seed, partition) runs resumes from them, and only from runs of the
same commit and settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import federated_seeds
from bench.federated import MODELS


def fake_partition(calls: list):  # noqa: ANN201
    """A stand-in for run_partition with its result's shape: FedKIM 0.1 above every other model, per seed."""

    def run(work: Path, profile: str, partition: str, tasks: list, held_out: list, overrides: dict,
            test_cap: int) -> dict:
        calls.append((overrides["pipeline.seed"], partition))
        seed = overrides["pipeline.seed"]
        score = {"macro_f1": 0.5 + seed / 1000, "auroc": 0.6}
        up = {k: v + 0.1 for k, v in score.items()}
        return {"client_tasks": ["a"], "held_out": ["h"], "params": {"partition": partition},
                "table": {"a": {m: (up if m == "fedkim" else score) for m in MODELS}},
                "majority_class_test": {"a": score}, "held_out_test": {"h": {"fedkim": up, "no_injection": score}},
                "seconds": {"partition": 10.0}}

    return run


def run_main(monkeypatch: pytest.MonkeyPatch, work: Path, commit: str, *extra: str) -> dict:
    monkeypatch.setattr(federated_seeds, "git_commit", lambda: commit)
    written = {}
    monkeypatch.setattr(federated_seeds, "write_result", lambda name, payload: written.setdefault(name, payload))
    monkeypatch.setattr(sys, "argv", ["federated_seeds", "--work", str(work), "--seeds", "1", "2", *extra])
    federated_seeds.main()
    return written["federated_seeds"]


def test_finished_runs_are_reused_only_at_the_same_commit_and_settings(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setattr(federated_seeds, "run_partition", fake_partition(calls))
    first = run_main(monkeypatch, tmp_path, "c1")
    assert len(calls) == 4 and first["reused_runs"] == [] and first["wall_seconds"] == 40.0
    models = first["partitions"]["iid"]["models"]["a"]
    assert models["fedkim"]["macro_f1"]["per_seed"] == pytest.approx([0.601, 0.602])

    # a stop after three of the four runs: the next invocation makes the fourth only, and reports all four
    (tmp_path / "seed_2" / "dirichlet" / "result.json").unlink()
    calls.clear()
    second = run_main(monkeypatch, tmp_path, "c1")
    assert calls == [(2, "dirichlet")] and len(second["reused_runs"]) == 3 and second["wall_seconds"] == 40.0
    assert second["partitions"] == first["partitions"]

    # other code, or other settings: nothing is reused
    calls.clear()
    run_main(monkeypatch, tmp_path, "c2")
    assert len(calls) == 4
    calls.clear()
    run_main(monkeypatch, tmp_path, "c2", "--test-cap", "50")
    assert len(calls) == 4

    # a record cut short (a kill while writing, a full disk) is said and made again, not a crash
    record = tmp_path / "seed_1" / "iid" / "result.json"
    record.write_text(record.read_text()[:40])
    calls.clear()
    run_main(monkeypatch, tmp_path, "c2", "--test-cap", "50")
    assert calls == [(1, "iid")]
    assert json.loads(record.read_text())["key"]["seed"] == 1
