"""In-memory tensor datasets: inputs are tokenised or converted once, then batched by index."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors, plus labels and (optionally) a task index.

    ``augment`` (training sets only): applied to every batch ``__getitems__`` builds, e.g.
    ``components.training.augment.ImageAugment``."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, task_ids: torch.Tensor | None = None,
                 augment: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None):
        n = len(labels)
        for name, t in inputs.items():
            if len(t) != n:
                raise ValueError(f"input {name!r} has {len(t)} rows; labels have {n}")
        self.inputs, self.labels, self.task_ids, self.augment = inputs, labels, task_ids, augment

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "TensorDictDataset":
        """The same rows on ``device`` (moved once; batches are then sliced there)."""
        ids = None if self.task_ids is None else self.task_ids.to(device)
        return TensorDictDataset({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device), ids,
                                 self.augment)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch by one index operation per tensor (DataLoader uses this instead of per-row stacking)."""
        idx = torch.as_tensor(indices, device=self.labels.device)
        batch = {k: v[idx] for k, v in self.inputs.items()}
        batch["labels"] = self.labels[idx]
        if self.task_ids is not None:
            batch["task_ids"] = self.task_ids[idx]
        return self.augment(batch) if self.augment is not None else batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {k: v[i] for k, v in self.inputs.items()}
        row["labels"] = self.labels[i]
        if self.task_ids is not None:
            row["task_ids"] = self.task_ids[i]
        return row


def loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0, group_by_length: bool = False) -> DataLoader:
    """A DataLoader with a seeded generator (reproducible order) and no worker processes
    (the data is already in memory; workers would only add start-up time on small tasks). Unshuffled (evaluation)
    loaders score every row exactly once under DDP too (``EveryRowOnce``).

    ``group_by_length`` (shuffled text rows): batches of like lengths (``LengthGroupedBatches``), so a batch of short
    texts runs at its own width (``trim_padding``) instead of the longest text a random batch happens to hold. Rows
    without an attention mask (images) are shuffled as usual."""
    gen = torch.Generator().manual_seed(seed)
    collate = _as_is if isinstance(ds, TensorDictDataset) else None  # __getitems__ already built the batch
    mask = ds.inputs.get("attention_mask") if group_by_length and isinstance(ds, TensorDictDataset) else None
    if not shuffle:
        sampler: Sampler[int] = EveryRowOnce(len(ds))
    elif mask is None:
        sampler = RandomSampler(ds, generator=gen)
    else:
        sampler = LengthGroupedBatches(mask.sum(1).tolist(), batch_size, gen)
    # the generator: iterating draws no number from the global RNG
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, generator=gen, num_workers=0, collate_fn=collate)


class LengthGroupedBatches(Sampler[int]):
    """Row order for batches of like lengths: transformers' length grouping (each random chunk of up to 50 batches
    sorted by length), then the batches in a random order. transformers' own ``LengthGroupedSampler`` yields each
    chunk's batches longest to shortest, so consecutive steps see ever shorter texts (and, where labels follow
    length, ever other labels); shuffling whole batches keeps what grouping saves without that drift. The one short
    batch (``len % batch_size`` rows) stays last, so the DataLoader cuts batches where they were formed."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator) -> None:  # noqa: D107
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices  # lazy: a heavy import

        order = get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator)
        full = len(order) // self.batch_size * self.batch_size
        batches = [order[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield from batches[b]
        yield from order[full:]

    def __len__(self) -> int:
        return len(self.lengths)


class EveryRowOnce(DistributedSampler):
    """Evaluation order for one process or many: rank r of w takes rows r, r+w, r+2w, ... (all rows, in order,
    in one process). Lightning would give a DDP validation loader a ``DistributedSampler``, which pads the split
    with repeated rows up to a multiple of the ranks, so some rows would count twice in the gathered metric; a
    ``DistributedSampler`` of ours is left as it is. Rank and world size are read when iterating (in the rank's
    own process), or given."""

    def __init__(self, n: int, rank: int | None = None, world: int | None = None) -> None:  # noqa: D107
        # DistributedSampler.__init__ needs an initialised process group; this one reads it lazily.
        self.n, self._rank, self._world, self.epoch = n, rank, world, 0

    def _where(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[int]:
        rank, world = self._where()
        if self.n < world:  # a rank without rows would skip the epoch's collective calls and hang the others
            raise ValueError(f"{self.n} evaluation rows for {world} DDP ranks: every rank needs at least one row; "
                             "use fewer devices")
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._where()
        return len(range(rank, self.n, world))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def _as_is(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def labels_tensor(labels, kind: str) -> torch.Tensor:  # noqa: ANN001 - numpy array
    t = torch.as_tensor(labels)
    return t.float() if kind == "multilabel" else t.long()


def mixed_tasks(inputs: dict[str, dict[str, torch.Tensor]], labels: dict[str, torch.Tensor],
                kinds: dict[str, str], widths: dict[str, int]) -> TensorDictDataset:
    """Every task's rows in one dataset (task id = position in ``inputs``), so batches mix tasks. Labels stay class
    ids when every task is single-label; with a multilabel task they become (N, max width) floats, single-label rows
    one-hot (``components.training.module.task_labels`` takes a task's own back out)."""
    names = list(inputs)
    multilabel = any(kinds[n] == "multilabel" for n in names)
    width = max(widths[n] for n in names)
    ys = []
    for n in names:
        y = labels[n]
        if multilabel:
            y = y.float() if kinds[n] == "multilabel" else torch.nn.functional.one_hot(y.long(), widths[n]).float()
            y = torch.nn.functional.pad(y, (0, width - y.shape[1]))
        ys.append(y)
    keys = list(inputs[names[0]])
    data = {k: torch.cat([inputs[n][k] for n in names]) for k in keys}
    ids = torch.cat([torch.full((len(labels[n]),), i, dtype=torch.long) for i, n in enumerate(names)])
    return TensorDictDataset(data, torch.cat(ys), ids)
