"""Validation metrics are those of the whole validation split, not a mean of per-rank metrics.

Single process: the logged ``val_<metric>`` equals ``compute_metrics`` on the same data, for every task kind and
primary metric (nan included). Two processes (DDP on CPU, gloo): the logged value equals the global one, on a
split where the mean of the per-rank values differs from it.
"""

from __future__ import annotations

import json
import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from components.decompose.loss import task_targets
from components.decompose.module import DecomposeModule
from components.metrics.classification import PRIMARY_METRICS, compute_metrics
from components.training.data import TensorDictDataset, loader
from components.training.module import ClassifierModule

KINDS = ("binary", "multiclass", "multilabel")
WIDTHS = {"binary": 2, "multiclass": 3, "multilabel": 3}
# LoRKD tasks: ``d`` has no validation sample (never logged); task ids follow this order
TASKS = {"b": "multiclass", "a": "multilabel", "c": "binary", "d": "binary"}
TASK_WIDTHS = {"b": 3, "a": 2, "c": 2, "d": 2}
BATCH = 4


class Passthrough(nn.Module):
    """A model whose logits are its input (times a trainable 1): the test sets the logits exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class PassthroughStudent(Passthrough):
    """What DecomposeModule uses of a LoRKDStudent: task names, label counts, ``forward(task_ids, **inputs)``."""

    def __init__(self, tasks: dict[str, str]) -> None:
        super().__init__()
        self.task_names = list(tasks)
        self.num_labels = {t: TASK_WIDTHS[t] for t in tasks}

    def forward(self, task_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * self.scale


def split(kind: str, n: int, seed: int, degenerate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy logits that lean towards the labels; ``degenerate``: the last class (label) never occurs."""
    gen = torch.Generator().manual_seed(seed)
    width = WIDTHS[kind]
    if kind == "multilabel":
        labels = (torch.rand(n, width, generator=gen) < 0.4).float()
        if degenerate:
            labels[:, -1] = 0
        return labels - 0.5 + torch.randn(n, width, generator=gen), labels
    labels = torch.randint(0, width - 1 if degenerate else width, (n,), generator=gen)
    return nn.functional.one_hot(labels, width) + torch.randn(n, width, generator=gen), labels


def mixed_split(task_ids: torch.Tensor, seed: int, tasks: dict[str, str],
                degenerate: bool = False) -> TensorDictDataset:
    """A mixed-task split laid out as ``mixed_dataset`` makes it: logits padded to the widest head; labels
    (N, max L) floats (single-label rows one-hot) when a task is multilabel, else class ids (N,).
    ``degenerate``: task ``b`` never shows its last class (its auroc is undefined)."""
    gen = torch.Generator().manual_seed(seed)
    n, width = len(task_ids), max(TASK_WIDTHS[t] for t in tasks)
    multilabel = "multilabel" in tasks.values()
    x = torch.randn(n, width, generator=gen)
    labels = torch.zeros(n, width) if multilabel else torch.zeros(n, dtype=torch.long)
    for t, (name, kind) in enumerate(tasks.items()):
        rows = (task_ids == t).nonzero().flatten()
        w = TASK_WIDTHS[name]
        if kind == "multilabel":
            y = (torch.rand(len(rows), w, generator=gen) < 0.5).float()
            labels[rows, :w] = y
            x[rows, :w] += y - 0.5
            continue
        y = torch.randint(0, w - 1 if degenerate and name == "b" else w, (len(rows),), generator=gen)
        x[rows, :w] += nn.functional.one_hot(y, w)
        if multilabel:
            labels[rows, :w] = nn.functional.one_hot(y, w).float()
        else:
            labels[rows] = y
    return TensorDictDataset({"x": x, "teacher_logits": torch.zeros(n, width)}, labels, task_ids)


def expected_lorkd(ds: TensorDictDataset, tasks: dict[str, str], metric: str) -> dict[str, float]:
    """What DecomposeModule should log, from compute_metrics on the whole split."""
    x, labels, ids = ds.inputs["x"], ds.labels, ds.task_ids
    out, defined = {}, []
    for t, (name, kind) in enumerate(tasks.items()):
        mask, w = ids == t, TASK_WIDTHS[name]
        if mask.any():
            value = compute_metrics(kind, x[mask, :w], task_targets(labels[mask], kind, w), w)[metric]
            out[f"val_{metric}_{name}"] = value
            defined += [] if math.isnan(value) else [value]
    out[f"val_{metric}"] = sum(defined) / len(defined) if defined else math.nan
    return out


def validate(module: L.LightningModule, ds: TensorDictDataset, **trainer_kwargs: object) -> dict[str, float]:
    kwargs = {"accelerator": "cpu", "devices": 1, **trainer_kwargs}
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, **kwargs)
    (result,) = trainer.validate(module, loader(ds, BATCH, shuffle=False), verbose=False)
    return {k: float(v) for k, v in result.items()}


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-6, abs=1e-6, nan_ok=True)


# --------------------------------------------------------------------------- single process
@pytest.mark.parametrize("degenerate", [False, True], ids=["all-classes", "class-missing"])
@pytest.mark.parametrize("metric", PRIMARY_METRICS)
@pytest.mark.parametrize("kind", KINDS)
def test_classifier_logs_compute_metrics(kind: str, metric: str, degenerate: bool) -> None:
    module = ClassifierModule(Passthrough(), kind, WIDTHS[kind], 0.01, 0.0, metric)
    for seed in (0, 1):  # the second validation must not carry the first one's states
        logits, labels = split(kind, 30, seed, degenerate)  # 30 rows: batches of 4 with a short last one
        logged = validate(module, TensorDictDataset({"x": logits}, labels))
        expected = compute_metrics(kind, logits, labels, WIDTHS[kind])[metric]
        assert logged[f"val_{metric}"] == approx(expected)
    assert math.isnan(expected) == (metric == "auroc" and degenerate)  # the nan case is exercised


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "mcc"])
def test_multilabel_predictions_threshold_logits_not_probabilities(metric: str) -> None:
    # logits all in (0, 1): every label is predicted (logit > 0); read as probabilities they would not be
    gen = torch.Generator().manual_seed(3)
    logits = torch.rand(16, 3, generator=gen) * 0.9 + 0.05
    labels = (torch.rand(16, 3, generator=gen) < 0.5).float()
    module = ClassifierModule(Passthrough(), "multilabel", 3, 0.01, 0.0, metric)
    logged = validate(module, TensorDictDataset({"x": logits}, labels))[f"val_{metric}"]
    assert logged == approx(compute_metrics("multilabel", logits, labels, 3)[metric])
    if metric == "accuracy":
        assert logged == approx(float(labels.mean()))


@pytest.mark.parametrize("with_multilabel", [True, False], ids=["onehot-labels", "class-id-labels"])
@pytest.mark.parametrize("metric", PRIMARY_METRICS)
def test_decompose_logs_compute_metrics_per_task_and_mean(metric: str, with_multilabel: bool) -> None:
    tasks = TASKS if with_multilabel else {k: v for k, v in TASKS.items() if v != "multilabel"}
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, len(tasks) - 1, (40,), generator=gen)  # the last task, d, has no sample
    ds = mixed_split(ids, seed=6, tasks=tasks, degenerate=True)
    module = DecomposeModule(PassthroughStudent(tasks), tasks, kd_weight=1.0, temperature=2.0, lr=0.01,
                             weight_decay=0.0, metric=metric)
    logged = validate(module, ds)
    expected = expected_lorkd(ds, tasks, metric)
    assert set(logged) - {"val_loss"} == set(expected)  # no val_<metric>_d
    for key, value in expected.items():
        assert logged[key] == approx(value), key
    if metric == "auroc":  # task b lacks a class: nan, and left out of the mean
        assert math.isnan(logged["val_auroc_b"]) and not math.isnan(logged["val_auroc"])


@pytest.mark.parametrize("metric", PRIMARY_METRICS)
def test_metric_states_stay_out_of_checkpoints(metric: str) -> None:
    logits, labels = split("multiclass", 12, 0)
    module = ClassifierModule(Passthrough(), "multiclass", 3, 0.01, 0.0, metric)
    module.val_score.add(logits, labels)  # states hold data
    assert set(module.state_dict()) == {"model.scale"}
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)  # the trainable-weights comparison still holds

    ds = mixed_split(torch.arange(12) % 3, seed=0, tasks=TASKS)
    lorkd = DecomposeModule(PassthroughStudent(TASKS), TASKS, 1.0, 2.0, 0.01, 0.0, metric)
    for t, scores in enumerate(lorkd.val_scores):
        mask = ds.task_ids == t
        name = list(TASKS)[t]
        scores.add(ds.inputs["x"][mask, :TASK_WIDTHS[name]],
                   task_targets(ds.labels[mask], TASKS[name], TASK_WIDTHS[name]))
    assert set(lorkd.state_dict()) == {"student.scale"}


# --------------------------------------------------------------------------- two processes
# (kind, metric, a class missing from the whole split: the logged auroc is nan)
DDP_CASES = [("multiclass", "macro_f1", False), ("binary", "auroc", False), ("multilabel", "macro_f1", False),
             ("multiclass", "mcc", False), ("multiclass", "auroc", True)]
DDP_ROWS = 24  # even: DistributedSampler pads nothing, so the global split is exactly the data


def ddp_split(kind: str, degenerate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = split(kind, DDP_ROWS, seed=17, degenerate=degenerate)
    if kind == "binary":
        labels[1::2] = 0  # rank 1 sees one class only: its own auroc would be nan, the global one is not
    return logits, labels


def ddp_lorkd_split() -> TensorDictDataset:
    # task c (id 2) only in even rows, so only on rank 0; task d never
    ids = torch.tensor([[0, 1], [2, 0], [1, 1], [2, 0]]).repeat(DDP_ROWS // 8, 1).flatten()
    return mixed_split(ids, seed=17, tasks=TASKS)


def rank_rows(rank: int) -> slice:
    """Rows DistributedSampler(shuffle=False) gives ``rank`` of 2."""
    return slice(rank, None, 2)


def mixed_rows(ds: TensorDictDataset, rank: int) -> TensorDictDataset:
    rows = rank_rows(rank)
    return TensorDictDataset({k: v[rows] for k, v in ds.inputs.items()}, ds.labels[rows], ds.task_ids[rows])


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    # Lightning takes the processes as launched externally (LOCAL_RANK set) and the process group as given
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))
    try:
        ddp = {"devices": 2, "strategy": "ddp"}
        results = {}
        for kind, metric, degenerate in DDP_CASES:
            logits, labels = ddp_split(kind, degenerate)
            module = ClassifierModule(Passthrough(), kind, WIDTHS[kind], 0.01, 0.0, metric)
            results[f"{kind}-{metric}-{degenerate}"] = validate(module, TensorDictDataset({"x": logits}, labels), **ddp)
        for metric in ("macro_f1", "auroc"):
            module = DecomposeModule(PassthroughStudent(TASKS), TASKS, 1.0, 2.0, 0.01, 0.0, metric)
            results[f"lorkd-{metric}"] = validate(module, ddp_lorkd_split(), **ddp)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_ddp_validation_metric_is_global_not_mean_of_ranks(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for key in ranks[0]:  # every rank logs the same values (callbacks on every rank monitor them)
        metrics = [{k: v for k, v in rank[key].items() if k != "val_loss"} for rank in ranks]  # loss: per rank
        assert metrics[0] == approx(metrics[1]) and set(metrics[0]) == set(metrics[1]), key
    logged = ranks[0]

    for kind, metric, degenerate in DDP_CASES:
        logits, labels = ddp_split(kind, degenerate)
        value = logged[f"{kind}-{metric}-{degenerate}"][f"val_{metric}"]
        assert value == approx(compute_metrics(kind, logits, labels, WIDTHS[kind])[metric]), (kind, metric)
        assert math.isnan(value) == degenerate
        per_rank = [compute_metrics(kind, logits[rank_rows(r)], labels[rank_rows(r)], WIDTHS[kind])[metric]
                    for r in range(2)]
        mean = sum(per_rank) / 2
        # the split is one where the mean of the per-rank values (the old, wrong number) is another number
        assert math.isnan(mean) or abs(mean - value) > 1e-2, (kind, metric, per_rank, value)

    ds = ddp_lorkd_split()
    for metric in ("macro_f1", "auroc"):
        expected = expected_lorkd(ds, TASKS, metric)
        assert set(logged[f"lorkd-{metric}"]) - {"val_loss"} == set(expected)
        for key, value in expected.items():
            assert logged[f"lorkd-{metric}"][key] == approx(value), (metric, key)
        per_rank = [expected_lorkd(mixed_rows(ds, r), TASKS, metric)[f"val_{metric}"] for r in range(2)]
        assert abs(sum(per_rank) / 2 - expected[f"val_{metric}"]) > 1e-2, (metric, per_rank)

