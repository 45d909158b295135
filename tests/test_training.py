"""The Trainer factory: checkpoint-resume of a killed run, trainable-only checkpoints, batched data access."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from components.config import TrainerParams
from components.core.errors import ArtifactError
from components.nn.classifier import Classifier
from components.training.data import TensorDictDataset, loader
from components.training.module import ClassifierModule
from components.training.schedule import optimizer_config
from components.training.trainer import LAST, build_trainer, data_device, resume_from


class Encoder(nn.Module):
    """A frozen 'foundation' layer plus a trainable one, so checkpoints can be checked for what they hold."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(6, 8).requires_grad_(False)
        self.adapter = nn.Linear(8, 8)
        self.out_dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(torch.relu(self.frozen(x)))


def data() -> TensorDictDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen)
    return TensorDictDataset({"x": x}, (x[:, 0] > 0).long())


def module(lr_schedule: str = "constant") -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(Classifier(Encoder(), nn.Linear(8, 2)), "binary", 2, 0.05, 0.0, "accuracy",
                            lr_schedule=lr_schedule)  # type: ignore[arg-type]


class Killed(RuntimeError):
    pass


class KillAt(L.Callback):
    """Simulates a crash (OOM, pre-emption) when epoch ``epoch`` starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed at epoch {self.epoch}")


class Epochs(L.Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append(trainer.current_epoch)


def fit(tp: TrainerParams, ckpt: Path | None, root: Path, extra: list[L.Callback]) -> tuple[L.Trainer, ClassifierModule]:
    mod = module(tp.lr_schedule)
    trainer = build_trainer(tp, root, monitor="val_accuracy", checkpoint_dir=ckpt, progress=False)
    trainer.callbacks.extend(extra)
    ds = data()
    trainer.fit(mod, loader(ds, 16, shuffle=True, seed=1), loader(ds, 32, shuffle=False), ckpt_path=resume_from(ckpt))
    return trainer, mod


def test_killed_run_resumes_from_its_last_epoch(tmp_path: Path) -> None:
    tp = TrainerParams(max_epochs=4, accelerator="cpu")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        fit(tp, ckpt, tmp_path, [KillAt(2)])
    assert (ckpt / LAST).is_file()
    stored = torch.load(ckpt / LAST, weights_only=False)
    assert stored["epoch"] == 1 and stored["global_step"] == 8  # 2 epochs of 4 steps done
    # only what trains is checkpointed: the frozen foundation layer is not stored again
    assert set(stored["state_dict"]) == {"model.encoder.adapter.weight", "model.encoder.adapter.bias",
                                         "model.head.weight", "model.head.bias"}
    assert "RestoreBestTrainable" in "".join(stored["callbacks"])  # the best epoch survives the crash

    epochs = Epochs()
    trainer, _ = fit(tp, ckpt, tmp_path, [epochs])
    assert epochs.seen == [2, 3]  # resumed, not restarted
    assert trainer.global_step == 16
    assert resume_from(tmp_path / "nothing-here") is None


class StepLrs(L.Callback):
    """The learning rate each optimizer step ran with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, i: int) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_one_cycle_schedule_warms_up_anneals_and_resumes_on_its_curve(tmp_path: Path) -> None:
    tp = TrainerParams(max_epochs=4, accelerator="cpu", lr_schedule="one_cycle")
    straight = StepLrs()
    fit(tp, None, tmp_path / "a", [straight])
    lrs = straight.lrs
    assert len(lrs) == 16  # 4 epochs of 4 steps
    peak = max(range(16), key=lambda i: lrs[i])
    assert 0 < peak < 8 and lrs[peak] == pytest.approx(0.05, rel=0.05)  # warm-up to the configured lr, early
    assert lrs[0] < 0.01 and lrs[-1] < 0.005  # starts low, anneals towards zero
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # then only decreases

    killed, resumed = StepLrs(), StepLrs()  # killed at epoch 2 and resumed: the same curve, not a restart
    with pytest.raises(Killed):
        fit(tp, tmp_path / "ckpt", tmp_path / "b", [KillAt(2), killed])
    fit(tp, tmp_path / "ckpt", tmp_path / "b", [resumed])
    assert killed.lrs + resumed.lrs == pytest.approx(lrs)

    constant = StepLrs()
    fit(TrainerParams(max_epochs=2, accelerator="cpu"), None, tmp_path / "c", [constant])
    assert constant.lrs == [0.05] * 8


def test_an_unknown_lr_schedule_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainerParams(lr_schedule="cosine")  # type: ignore[arg-type]
    mod = module()  # a module built directly, without params
    with pytest.raises(ValueError, match="unknown lr_schedule 'cosine'"):
        optimizer_config(mod, torch.optim.AdamW(mod.parameters()), "cosine")  # type: ignore[arg-type]


def test_a_run_that_stopped_early_stays_stopped_when_resumed(tmp_path: Path) -> None:
    """A stage killed after this task had finished re-runs it from its last checkpoint: nothing more may train (it
    did train one more epoch per resume: another model than a run straight through)."""
    tp = TrainerParams(max_epochs=60, accelerator="cpu", early_stopping_patience=2)
    ckpt = tmp_path / "ckpt"
    first_epochs = Epochs()
    trainer, first = fit(tp, ckpt, tmp_path, [first_epochs])
    assert trainer.should_stop and len(first_epochs.seen) < tp.max_epochs  # it stopped early, by patience
    again_epochs = Epochs()
    trainer, again = fit(tp, ckpt, tmp_path, [again_epochs])
    assert again_epochs.seen == []  # not one more epoch
    trained = {n: p for n, p in first.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, trained[n]) for n, p in again.named_parameters() if p.requires_grad)  # the same best


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    tp = TrainerParams(max_epochs=1, accelerator="cpu")
    fit(tp, tmp_path / "ckpt", tmp_path, [])
    other = ClassifierModule(Classifier(Encoder(), nn.Linear(8, 3)), "multiclass", 3, 0.05, 0.0, "accuracy")
    other.model.encoder.adapter.requires_grad_(False)  # a different set of trainable weights
    trainer = build_trainer(TrainerParams(max_epochs=2, accelerator="cpu"), tmp_path, checkpoint_dir=tmp_path / "ckpt",
                            progress=False)
    ds = data()
    with pytest.raises(ArtifactError, match="checkpoint does not match"):
        trainer.fit(other, loader(ds, 16, shuffle=True), ckpt_path=resume_from(tmp_path / "ckpt"))


def test_no_checkpoints_when_resume_is_off(tmp_path: Path) -> None:
    fit(TrainerParams(max_epochs=1, accelerator="cpu", resume=False), tmp_path / "ckpt", tmp_path, [])
    assert not (tmp_path / "ckpt").exists()


def test_batches_are_sliced_in_one_step_and_match_rows() -> None:
    ds = data()
    batch = next(iter(loader(ds, 16, shuffle=True, seed=3)))
    assert batch["x"].shape == (16, 6) and batch["labels"].shape == (16,)
    # every row of the batch is a row of the dataset with its own label
    for x, y in zip(batch["x"], batch["labels"], strict=True):
        i = int((ds.inputs["x"] == x).all(1).nonzero())
        assert ds.labels[i] == y
    # on CPU (and in DDP) the data stays on the host; a single-GPU run moves it to the GPU once
    assert data_device(TrainerParams(accelerator="cpu")).type == "cpu"
    assert data_device(TrainerParams(accelerator="gpu", devices=2, strategy="ddp")).type == "cpu"
    assert data_device(TrainerParams(accelerator="gpu")).type == "cuda"
    assert data_device(TrainerParams(accelerator="gpu", data_on_device=False)).type == "cpu"


def test_peak_memory_sees_what_a_block_allocates() -> None:
    from components.metrics.memory import PeakMemory

    with PeakMemory("cpu") as m:
        big = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        big.add_(1)
        del big
    assert m.kind in ("rss", "rss_lifetime_peak")
    if m.kind == "rss":
        assert m.added_mb > 48  # the block's 64 MB show up in its peak, then are freed
    assert m.peak_mb >= m.added_mb


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_resume_checkpoint_is_set_aside(tmp_path: Path, damage: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint cut short (a kill or a full disk during its write) or with a flipped byte: one warning line,
    the file kept aside, training from the start instead of a traceback on every later run."""
    tp = TrainerParams(max_epochs=2, accelerator="cpu")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        fit(tp, ckpt, tmp_path, [KillAt(1)])
    raw = (ckpt / LAST).read_bytes()
    if damage == "truncate":
        (ckpt / LAST).write_bytes(raw[: len(raw) // 2])
    else:
        i = raw.index(b"PK\x03\x04", 100) - 200  # inside an entry's data, not a header
        (ckpt / LAST).write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    with caplog.at_level("WARNING", logger="medexperts"):
        epochs = Epochs()
        fit(tp, ckpt, tmp_path, [epochs])
    assert epochs.seen == [0, 1]  # from the start
    assert (ckpt / (LAST + ".corrupt")).read_bytes() != raw
    assert [r.message for r in caplog.records if "set aside" in r.message]


def test_epoch_lines_when_there_is_no_progress_bar(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mod = module()
    trainer = build_trainer(TrainerParams(max_epochs=2, accelerator="cpu"), tmp_path, monitor="val_accuracy",
                            progress=False, label="[experts] toy")
    ds = data()
    with caplog.at_level("INFO", logger="medexperts"):
        trainer.fit(mod, loader(ds, 16, shuffle=True, seed=1), loader(ds, 32, shuffle=False))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[experts] toy: epoch")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("[experts] toy: epoch 1/2 train_loss ") and "val_accuracy" in lines[0]
    assert "ETA" in lines[0] and "ETA" not in lines[1]


def test_task_heads_round_trip_and_a_bad_heads_file_names_the_problem(tmp_path: Path) -> None:
    """One file format for task heads (bundles, the image foundation, LoRKD teachers): saved and loaded back
    equal; a missing task, a head of another width or label count, or a damaged file is an ArtifactError naming it."""
    from components.nn.classifier import load_heads, make_head, save_heads

    torch.manual_seed(0)
    heads = {"pneumoniamnist": make_head(8, 2), "derma.v2": make_head(8, 7)}  # a dot in a name survives
    path = tmp_path / "heads.safetensors"
    save_heads(heads, path)
    loaded = load_heads(path, 8)
    assert sorted(loaded) == sorted(heads)
    for task, head in heads.items():
        assert loaded[task].out_features == head.out_features
        assert torch.equal(loaded[task].weight, head.weight) and torch.equal(loaded[task].bias, head.bias)
    assert list(load_heads(path, 8, ["pneumoniamnist"])) == ["pneumoniamnist"]
    with pytest.raises(ArtifactError, match="no head for task 'hoc'"):
        load_heads(path, 8, ["hoc"])
    with pytest.raises(ArtifactError, match="reads 8 features; the encoder gives 16"):
        load_heads(path, 16)
    assert sorted(load_heads(path, 8, num_labels={"pneumoniamnist": 2, "hoc": 10})) == sorted(heads)
    with pytest.raises(ArtifactError, match="'derma.v2' has 7 outputs; the task has 9 labels: re-run the stage"):
        load_heads(path, 8, num_labels={"derma.v2": 9}, remedy="re-run the stage")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ArtifactError, match="cannot read the task heads"):
        load_heads(path, 8)


def test_a_text_batch_runs_without_the_padding_no_text_uses(tiny_bert: Path) -> None:
    from components.core.errors import DataError
    from components.nn.encoders import load_text_encoder, tokenize, trim_padding

    encoder, tokenizer = load_text_encoder(tiny_bert)
    encoder.eval()
    texts = ["Pneumonia.", "Bilateral infiltrates on the chest X-ray, worse at the bases."]
    padded = tokenize(tokenizer, texts, max_length=64)
    ids, mask = trim_padding(padded["input_ids"], padded["attention_mask"])
    assert mask.shape[1] == int(padded["attention_mask"].sum(1).max()) < 64  # the longest text's tokens only
    assert torch.equal(ids, padded["input_ids"][:, : mask.shape[1]])
    with torch.no_grad():  # the same pooled features as each text run alone at its own length
        batch = encoder(**padded)
        alone = torch.cat([encoder(**tokenize(tokenizer, [t], max_length=64)) for t in texts])
        seen = {}
        hook = encoder.model.register_forward_pre_hook(lambda m, a, kw: seen.update(width=kw["input_ids"].shape[1]),
                                                       with_kwargs=True)
        encoder(**padded)
        hook.remove()
    assert seen["width"] == mask.shape[1]  # the encoder ran on the trimmed batch
    assert torch.allclose(batch, alone, atol=1e-5)
    full = torch.ones(2, 5, dtype=torch.long)
    assert trim_padding(full, full)[1] is full  # nothing to cut: the same tensors
    with pytest.raises(DataError, match=r"input_ids \(2, 5\) and attention_mask \(2, 4\) must be the same"):
        trim_padding(full, full[:, :4])
    holes = torch.tensor([[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]])  # kept up to the last column any row attends to
    assert trim_padding(full, holes)[1].tolist() == [[0, 1], [1, 0]]
    assert trim_padding(full, torch.zeros_like(full))[1].shape == (2, 1)  # no token at all: one column, not none
    assert trim_padding(full[:, :0], full[:, :0])[1].shape == (2, 0)  # no column to cut


def test_grouped_training_batches_hold_like_lengths_and_every_row_once_an_epoch() -> None:
    lengths = torch.tensor([3, 60, 5, 58, 4, 61, 6, 59] * 25)  # short and long texts, interleaved
    mask = (torch.arange(64) < lengths[:, None]).long()
    ds = TensorDictDataset({"input_ids": mask.clone(), "attention_mask": mask}, torch.arange(len(lengths)))

    def epochs(group: bool, seed: int = 0) -> list[list[torch.Tensor]]:
        batches = loader(ds, 8, shuffle=True, seed=seed, group_by_length=group)
        return [[b["labels"] for b in batches] for _ in range(2)]

    def mixed(batches: list[torch.Tensor]) -> float:  # share of batches holding a short and a long text
        return sum(bool((lengths[b] < 10).any() and (lengths[b] > 50).any()) for b in batches) / len(batches)

    state = torch.get_rng_state()
    grouped, plain = epochs(True), epochs(False)
    assert torch.equal(torch.get_rng_state(), state)  # the loaders' own generators: no global draw
    for epoch in grouped:
        assert sorted(torch.cat(epoch).tolist()) == list(range(len(lengths)))  # every row once
    assert not torch.equal(torch.cat(grouped[0]), torch.cat(grouped[1]))  # a new order every epoch
    assert torch.equal(torch.cat(epochs(True)[0]), torch.cat(grouped[0]))  # seeded: the same order again
    assert mixed(grouped[0]) <= 0.25 < 0.9 < mixed(plain[0])  # at most one mixed batch per sorted chunk of 6
    widths = [int(lengths[b].max()) for b in grouped[0]]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # batches in random order
    odd = TensorDictDataset({"attention_mask": mask[:21]}, torch.arange(21))  # the short batch comes last
    batches = [b["labels"] for b in loader(odd, 4, True, group_by_length=True)]
    assert [len(b) for b in batches] == [4] * 5 + [1] and sorted(torch.cat(batches).tolist()) == list(range(21))
    images = TensorDictDataset({"pixels": torch.zeros(10, 1, 2, 2)}, torch.arange(10))  # no mask: plain shuffle
    assert sorted(torch.cat([b["labels"] for b in loader(images, 4, True, group_by_length=True)]).tolist()) == \
        list(range(10))


def test_batched_text_inference_groups_like_lengths_and_keeps_the_row_order(tiny_bert: Path) -> None:
    from components.nn.encoders import load_text_encoder, tokenize
    from components.training.inference import batched

    encoder, tokenizer = load_text_encoder(tiny_bert)
    encoder.eval()
    texts = ["short", "a much longer clinical note about a chest X-ray with bilateral infiltrates at the bases",
             "mid length text here", "ok"] * 3
    x = tokenize(tokenizer, texts, max_length=48)
    widths: list[int] = []
    hook = encoder.model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                                   with_kwargs=True)
    out = batched(encoder, x, batch_size=4)
    hook.remove()
    with torch.no_grad():
        one_by_one = torch.cat([encoder(**{k: v[i:i + 1] for k, v in x.items()}) for i in range(len(texts))])
    assert torch.allclose(out, one_by_one, atol=1e-5)  # row i is text i's output
    lengths = sorted(x["attention_mask"].sum(1).tolist())
    assert widths == [max(lengths[i:i + 4]) for i in range(0, len(texts), 4)]  # shortest first, like with like
    assert widths[0] < widths[-1] == max(lengths)
