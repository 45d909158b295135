"""Label-preserving random transforms of training image batches (``data.tasks.<name>.augment``).

Which transforms keep a label is a property of the task's images, so each task names its own: a dermatoscopic
lesion has no up or down (``[hflip, vflip, rot90]``: the eight symmetries of the square), an ultrasound image has a
depth axis (``[hflip]`` at most). Each training row draws its own transform at every step, on the device the batch
is on; validation and test rows are never transformed. torchvision's v2 transforms apply one draw to a whole batch
tensor, so a per-row draw (and per-task allowed sets in a mixed batch) is written here: flips and rot90 of tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TRANSFORMS = ("hflip", "vflip", "rot90")


class ImageAugment:
    """Random flips / quarter turns of ``batch[key]`` (N, C, H, W), each row drawn independently.

    ``allowed``: the transforms of every task, in task-id order (one entry: a single-task batch; several: a mixed
    batch, each row taking its task's set by ``batch["task_ids"]``). Draws come from a generator seeded with
    ``seed``, so a run is reproducible."""

    def __init__(self, allowed: Sequence[Sequence[str]], seed: int = 0, key: str = "pixels") -> None:
        for names in allowed:
            unknown = sorted(set(names) - set(TRANSFORMS))
            if unknown:
                raise ValueError(f"unknown image augmentation {unknown}; expected some of {list(TRANSFORMS)}")
        # (tasks, 3) bools: which transform each task allows
        self.table = torch.tensor([[t in names for t in TRANSFORMS] for names in allowed], dtype=torch.bool)
        self.key, self.generator = key, torch.Generator().manual_seed(seed)

    @property
    def active(self) -> bool:
        return bool(self.table.any())

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch[self.key]
        if x.dim() != 4:
            raise ValueError(f"image augmentation needs (N, C, H, W) tensors; {self.key!r} has shape {tuple(x.shape)}")
        n = len(x)
        ids = batch.get("task_ids")
        if ids is None:
            if len(self.table) != 1:
                raise ValueError(f"a mixed-task augmentation ({len(self.table)} tasks) needs the batch's task_ids")
            allowed = self.table[0].expand(n, -1)
        else:
            allowed = self.table[ids.cpu()]
        draw = torch.rand(n, 2, generator=self.generator) < 0.5
        quarter = torch.randint(0, 4, (n,), generator=self.generator)
        hflip = (draw[:, 0] & allowed[:, 0]).to(x.device)
        vflip = (draw[:, 1] & allowed[:, 1]).to(x.device)
        turns = torch.where(allowed[:, 2], quarter, 0)
        if allowed[:, 2].any() and x.shape[-1] != x.shape[-2]:  # refused whether or not this batch drew a turn
            raise ValueError(f"rot90 needs square images; {self.key!r} rows are {tuple(x.shape[-2:])}")
        x = torch.where(hflip[:, None, None, None], x.flip(-1), x)
        x = torch.where(vflip[:, None, None, None], x.flip(-2), x)
        if turns.any():
            x = x.clone()
            for k in (1, 2, 3):
                rows = (turns == k).nonzero().squeeze(1).to(x.device)
                if len(rows):
                    x[rows] = torch.rot90(x[rows], k, (-2, -1))
        return {**batch, self.key: x}


def task_augment(specs: Sequence[Sequence[str]], seed: int) -> ImageAugment | None:
    """An ``ImageAugment`` for tasks' ``augment`` lists (task-id order), or None where no task asks for one."""
    aug = ImageAugment(specs, seed)
    return aug if aug.active else None
