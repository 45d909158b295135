"""The experts stage: one job per task, run here or fanned out to task-runner workers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from components.core.layout import MANIFEST, expert_dir
from components.stages import experts as experts_stage
from components.stages.experts import ExpertsInputs, ExpertsSummary
from components.tracking import runs
from components.training.trainer import LAST

if TYPE_CHECKING:
    from flows.stages import StageContext

logger = logging.getLogger("medexperts")


@dataclass(frozen=True)
class ExpertJob:
    """One task's expert: what a task-runner worker needs to train it (picklable; the folders must be reachable
    from the worker: the same machine, or a shared file system)."""

    ctx: StageContext
    inp: ExpertsInputs
    task: str
    index: int
    total: int
    out_dir: Path  # the expert's folder inside the stage's temporary output
    checkpoint_dir: Path
    stage_run_id: str  # the MLflow run of the stage: the expert's run is its child


def run(ctx: StageContext, inp: ExpertsInputs, out: Path) -> ExpertsSummary:
    jobs = [ExpertJob(ctx, inp, task, i, len(inp.active), expert_dir(out, task), ctx.checkpoints("experts") / task,
                      runs.active_run_id()) for i, task in enumerate(inp.active, 1)]
    return ExpertsSummary(tasks=dict(zip(inp.active, ctx.map(train_expert_job, jobs), strict=True)))


def train_expert_job(job: ExpertJob) -> experts_stage.ExpertRun:
    """Train one task's expert in its own MLflow run (a child of the stage's), here or on a worker."""
    from flows.stages import task_environment

    task, inp = job.task, job.inp
    with task_environment(job.ctx):
        logger.info("[experts] %s (%d/%d): starting", task, job.index, job.total)
        with runs.run(f"expert:{task}", nested=True, parent_run_id=job.stage_run_id,
                      tags={"task": task, "stage": "experts"}) as run_id:
            _note_resume(job.checkpoint_dir, run_id)
            m = experts_stage.train_expert(task, inp, job.ctx.out("data"), job.ctx.out("foundation"), job.out_dir,
                                           logger=runs.lightning_logger(), checkpoint_dir=job.checkpoint_dir)
            runs.log_params({"task": task, "method": m["method"], "lora": m["lora"], "targets": ",".join(m["targets"]),
                             "trainer": inp.experts.trainer.of(m["modality"]).model_dump(),
                             "train_samples": m["train_samples"]})
            runs.log_metrics({"val": m["metrics"]["val"], "probe_val": m["metrics"]["probe_val"],
                              "trainable_params": m["trainable_params"], "train_seconds": m["train_seconds"],
                              "train_peak_memory_mb": m["train_peak_memory_mb"]})
            runs.log_file(job.out_dir / MANIFEST)
            return experts_stage.expert_run(m, run_id)


def _note_resume(checkpoint_dir: Path, run_id: str) -> None:
    """A run that resumes a killed one's checkpoint names the MLflow run it continues (``resumed_from_run``: the
    epochs before the kill are logged there); this run becomes the one a later resume names."""
    record = checkpoint_dir / "mlflow_run_id"
    if (checkpoint_dir / LAST).is_file() and record.is_file():
        previous = record.read_text().strip()
        runs.set_tags({"resumed_from_run": previous})
        logger.info("[experts] resuming the checkpoint of MLflow run %s", previous)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(run_id)
