"""Per-task image augmentation (``data.tasks.<name>.augment``): each row gets one of the allowed symmetries, a task
that allows none is never touched, draws are seeded, bad settings are refused, and the foundation and experts stages
augment their training batches only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from components.config import TaskSpec, load_params
from components.training.augment import ImageAugment, task_augment
from components.training.data import TensorDictDataset, loader

PROJECT = Path(__file__).resolve().parents[1]


def _batch(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(0))  # no symmetric image by chance


def test_each_row_gets_one_of_its_symmetries_and_all_eight_occur() -> None:
    x = _batch(400)
    out = ImageAugment([["hflip", "vflip", "rot90"]], seed=3)({"pixels": x})["pixels"]
    which = []
    for o, i in zip(out, x):
        square = [torch.rot90(i, k, (-2, -1)).flip(-1) if h else torch.rot90(i, k, (-2, -1))
                  for k in range(4) for h in (False, True)]  # the 8 symmetries of the square, all distinct here
        matches = [j for j, s in enumerate(square) if torch.equal(o, s)]
        assert len(matches) == 1, "an augmented row is not a flip / quarter turn of its input"
        which.append(matches[0])
    counts = torch.bincount(torch.tensor(which), minlength=8)
    assert bool((counts > 20).all()), counts  # every symmetry drawn (400 rows: ~50 each)


def test_mixed_batch_follows_each_rows_task() -> None:
    x = _batch(200)
    ids = torch.arange(200) % 2
    out = ImageAugment([[], ["hflip"]], seed=0)({"pixels": x, "task_ids": ids})["pixels"]
    assert torch.equal(out[ids == 0], x[ids == 0])  # task 0 allows nothing
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out[ids == 1], x[ids == 1])])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out[ids == 1], x[ids == 1])])
    assert bool((flipped | kept).all()) and 20 < int(flipped.sum()) < 80


def test_draws_are_seeded() -> None:
    x = _batch(64)
    a = ImageAugment([["hflip", "rot90"]], seed=7)({"pixels": x})["pixels"]
    b = ImageAugment([["hflip", "rot90"]], seed=7)({"pixels": x})["pixels"]
    c = ImageAugment([["hflip", "rot90"]], seed=8)({"pixels": x})["pixels"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown image augmentation \\['shear'\\]"):
        ImageAugment([["hflip", "shear"]])
    with pytest.raises(ValueError, match="rot90 needs square images"):
        ImageAugment([["rot90"]], seed=1)({"pixels": torch.randn(1, 1, 4, 6)})  # even where no turn is drawn
    with pytest.raises(ValueError, match="needs the batch's task_ids"):
        ImageAugment([["hflip"], []])({"pixels": _batch(4)})
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageAugment([["hflip"]])({"pixels": torch.randn(4, 25)})
    assert task_augment([[], []], seed=0) is None  # nothing asked: no per-batch work at all
    base = dict(format="table", path="x.csv", kind="multiclass", label_names=["a", "b"], split={"protocol": "files"})
    with pytest.raises(ValidationError, match="applies to image tasks"):
        TaskSpec(modality="text", augment=["hflip"], **base)
    with pytest.raises(ValidationError, match="augment"):
        TaskSpec(modality="image", augment=["blur"], **{**base, "format": "medmnist_npz"})


def test_only_training_batches_are_augmented() -> None:
    x, y = _batch(10), torch.zeros(10, dtype=torch.long)
    train = TensorDictDataset({"pixels": x}, y, augment=ImageAugment([["vflip"]], seed=0))
    got = torch.cat([b["pixels"] for b in loader(train, 10, shuffle=False)])
    assert not torch.equal(got, x)
    val = TensorDictDataset({"pixels": x}, y)
    assert torch.equal(torch.cat([b["pixels"] for b in loader(val, 4, shuffle=False)]), x)
    assert train.to(torch.device("cpu")).augment is train.augment  # moving the rows keeps the augmentation


def test_stages_augment_training_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The foundation's mixed batches and an expert's batches go through the task's augmentation; validation
    batches do not (the spy counts rows: every training row once per epoch, nothing more)."""
    from components.core.layout import foundation_dir
    from components.stages.data import prepare_data
    from components.stages.experts import ExpertsInputs, train_expert
    from components.stages.foundation import FoundationInputs, pretrain_image_foundation

    rows: list[tuple[int, bool]] = []
    call = ImageAugment.__call__

    def spy(self: ImageAugment, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows.append((len(batch["pixels"]), "task_ids" in batch))
        return call(self, batch)

    monkeypatch.setattr(ImageAugment, "__call__", spy)
    p = load_params(PROJECT / "params", "tiny", {"data.active": ["breastmnist", "retinamnist"],
                                                 "data.tasks.retinamnist.augment": ["hflip", "vflip", "rot90"]})
    prepare_data(p.data, PROJECT, tmp_path / "data", p.pipeline.seed)
    found = FoundationInputs.from_params(p)
    pretrain_image_foundation(found, tmp_path / "data", foundation_dir(tmp_path / "foundation", "image"))
    epochs, cap = found.foundation.image.trainer.max_epochs, found.foundation.image.trainer.max_train_samples
    mixed = [r for r in rows if r[1]]
    assert mixed and sum(n for n, _ in mixed) == epochs * 2 * cap  # both tasks' rows, one batch stream
    rows.clear()
    ex = ExpertsInputs.from_params(p)
    train_expert("breastmnist", ex, tmp_path / "data", tmp_path / "foundation", tmp_path / "e_breast")
    assert rows == []  # breastmnist asks for no augmentation
    m = train_expert("retinamnist", ex, tmp_path / "data", tmp_path / "foundation", tmp_path / "e_retina")
    assert sum(n for n, _ in rows) == ex.experts.trainer.image.max_epochs * m["train_samples"]
