"""The experts stage with 2-process DDP on CPU (gloo): Lightning starts the processes from inside the stage (no
re-executed command line), the trained weights come back to the stage's process, and the validation metric the
ranks computed together (torchmetrics states gathered across ranks) is the one-process metric of those weights."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from components.config import TrainerParams
from components.training.trainer import strategy
from flows.cli import app

pytestmark = pytest.mark.slow


def test_ddp_without_an_external_launcher_is_started_from_inside_the_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS",
                "SLURM_JOB_NAME", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert strategy(TrainerParams(strategy="ddp", devices=2)) == "ddp_spawn"
    assert strategy(TrainerParams()) == "auto"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")  # torchrun started one process per device: stay ddp
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "GROUP_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    assert strategy(TrainerParams(strategy="ddp", devices=2)) == "ddp"


def test_experts_stage_with_two_process_ddp(isolated_project: Path, tiny_bert: Path) -> None:
    sets = ["--profile", "tiny", "--set", f"foundation.text.source={tiny_bert}",
            "--set", "data.active=[pubmedqa, breastmnist]"]
    for modality in ("text", "image"):
        sets += ["--set", f"experts.trainer.{modality}.strategy=ddp", "--set", f"experts.trainer.{modality}.devices=2",
                 "--set", f"experts.trainer.{modality}.accelerator=cpu"]
    runner = CliRunner()
    for stage in ("sources", "data", "foundation", "experts"):
        result = runner.invoke(app, ["stage", stage, *sets])
        assert result.exit_code == 0, (stage, result.output, result.exception)

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("medexperts").experiment_id
    for task in ("pubmedqa", "breastmnist"):
        manifest = json.loads((isolated_project / "artifacts" / "experts" / task / "manifest.json").read_text())
        run = client.search_runs([exp], f"attributes.run_name = 'expert:{task}'")[0]
        per_epoch = [m.value for m in client.get_metric_history(run.info.run_id, "val_macro_f1")]
        assert per_epoch, task
        # the best epoch's metric, computed by the two ranks together, is the stage's own one-process evaluation
        # of the weights that came back (so no rank's half of the split was scored alone, none counted twice)
        assert max(per_epoch) == pytest.approx(manifest["metrics"]["val"]["macro_f1"], abs=1e-6), task


def test_evaluation_loaders_score_every_row_once_on_any_number_of_ranks() -> None:
    import torch

    from components.training.data import EveryRowOnce, TensorDictDataset, loader

    ds = TensorDictDataset({"x": torch.arange(7.0)[:, None]}, torch.arange(7))
    assert [int(i) for b in loader(ds, 3, shuffle=False) for i in b["labels"]] == list(range(7))  # one process
    shards = [list(EveryRowOnce(7, rank, 2)) for rank in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(7))  # 7 rows on 2 ranks: none repeated, none left out
    assert [len(EveryRowOnce(7, rank, 2)) for rank in (0, 1)] == [4, 3]
