"""The one Trainer factory: precision, devices, strategy, checkpoints and callbacks all come from params."""

from __future__ import annotations

import logging
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from components.config import TrainerParams
from components.training.callbacks import EpochLog, RestoreBestTrainable, ResumableEarlyStopping, StopAtSafePoint

LAST = "last.ckpt"
log = logging.getLogger("medexperts")


def on_gpu(tp: TrainerParams) -> bool:
    return tp.accelerator == "gpu" or (tp.accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(tp: TrainerParams) -> str:
    """bf16-mixed on a GPU, 32-bit on CPU, unless params name one."""
    if tp.precision != "auto":
        return tp.precision
    return "bf16-mixed" if on_gpu(tp) else "32-true"


def data_device(tp: TrainerParams) -> torch.device:
    """Where in-memory training data should live: the GPU of a single-device run (moved there once, so no
    step copies tiny tensors from the host); the host otherwise (DDP ranks each take their own device)."""
    single = tp.devices == 1 and tp.num_nodes == 1 and tp.strategy == "auto"
    return torch.device("cuda", 0) if tp.data_on_device and single and on_gpu(tp) else torch.device("cpu")


def build_trainer(
    tp: TrainerParams,
    root_dir: Path,
    *,
    logger: Any = False,
    monitor: str | None = None,
    mode: str = "max",
    progress: bool | None = None,
    checkpoint_dir: Path | None = None,
    label: str = "train",
) -> L.Trainer:
    """A Lightning Trainer for ``tp``.

    With ``monitor``: the best epoch's trainable weights are restored at the end, and training stops early
    after ``early_stopping_patience`` epochs without gain. With ``checkpoint_dir`` and ``tp.resume``: a
    ``last.ckpt`` is written there after every epoch; pass ``resume_from(checkpoint_dir)`` to ``fit``.
    Progress: Lightning's bar on a terminal (stderr a TTY), else one ``label: epoch ...`` log line per epoch.
    """
    bar = sys.stderr.isatty() if progress is None else progress
    callbacks: list[L.Callback] = [StopAtSafePoint(label)] + ([] if bar else [EpochLog(label, monitor)])
    if monitor:
        callbacks.append(RestoreBestTrainable(monitor, mode))
    if tp.early_stopping_patience and monitor:
        callbacks.append(ResumableEarlyStopping(monitor=monitor, mode=mode, patience=tp.early_stopping_patience,
                                                check_finite=False))
    checkpointing = checkpoint_dir is not None and tp.resume
    if checkpointing:
        # monitor=None + top_k=1 keeps the latest epoch; one fixed name, overwritten (Lightning 2.6 only writes a
        # save_last file when a top-k file was written in the same step)
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename=LAST.removesuffix(".ckpt"), monitor=None,
                                         save_top_k=1, every_n_epochs=1, enable_version_counter=False))
    # Lightning's hints about dataloader workers and tiny logging intervals are noise for in-memory data.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # resuming
    # A frozen foundation is kept in eval mode on purpose (no dropout noise, fixed statistics).
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    return L.Trainer(
        max_epochs=tp.max_epochs,
        accelerator=tp.accelerator,
        devices=tp.devices,
        num_nodes=tp.num_nodes,
        strategy=strategy(tp),
        precision=resolve_precision(tp),
        accumulate_grad_batches=tp.accumulate_grad_batches,
        deterministic=tp.deterministic,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=checkpointing,
        enable_progress_bar=bar,
        enable_model_summary=False,
        default_root_dir=str(root_dir),
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )


def strategy(tp: TrainerParams) -> str:
    """Lightning's strategy for ``tp``. ``ddp`` under an external launcher (torchrun, SLURM, LSF, MPI: one
    process per device already started) stays ``ddp``; otherwise it becomes ``ddp_spawn``, which starts the device
    processes from inside the stage. (Lightning's own ``ddp`` launcher re-executes the command line once per
    device: here that is ``medexperts run`` itself, a second pipeline per rank that waits on the project lock
    held by the first: a hang.)"""
    if tp.strategy != "ddp":
        return tp.strategy
    from lightning.fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    launched = any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment,
                                            MPIEnvironment))
    if launched:
        return "ddp"
    # Spawned processes receive the module and the in-memory data by pickling; torch's default sharing of
    # tensors by file descriptor hands the same descriptor twice when two tensors share a storage, which
    # multiprocessing refuses ("bad value(s) in fds_to_keep"). Shared-memory files have no such limit.
    torch.multiprocessing.set_sharing_strategy("file_system")
    return "ddp_spawn"


def resume_from(checkpoint_dir: Path | None) -> str | None:
    """The checkpoint a killed run left behind, if any (``Trainer.fit(ckpt_path=...)``).

    Lightning writes checkpoints atomically (a temporary file moved into place); a file that still does not read
    back whole (a full disk, a copy cut short, a flipped byte: torch checkpoints are zip archives with a CRC per
    entry) is set aside as ``last.ckpt.corrupt`` with one warning line, and training starts from the beginning."""
    if checkpoint_dir is None:
        return None
    last = Path(checkpoint_dir) / LAST
    if not last.is_file():
        return None
    try:
        with zipfile.ZipFile(last) as archive:
            bad = archive.testzip()
        problem = f"entry {bad} fails its CRC" if bad is not None else ""
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if not problem:
        return str(last)
    aside = last.with_name(LAST + ".corrupt")
    last.replace(aside)
    log.warning("resume checkpoint %s is unreadable (%s); set aside as %s, training from the start", last, problem,
                aside.name)
    return None
