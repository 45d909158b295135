"""LoRKD: one-pass knowledge separation, exact gradient separation, fusion, save/load, bad inputs, a short run.

Tiny models on CPU. B is zero at init, so every equality check first sets B to random values (otherwise
the experts add nothing and the checks are vacuous).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from components.config import TrainerParams
from components.decompose.deploy import fuse, load_student, save_fused, save_student, student_hash
from components.decompose.layers import ExpertConv2d, ExpertLayer, ExpertLinear, TaskRuns, task_context
from components.decompose.loss import lorkd_loss
from components.decompose.module import DecomposeModule
from components.config import DecomposeParams
from components.decompose.student import LoRKDStudent, build_student
from components.decompose.teacher import mixed_dataset, teacher_logits
from components.core.errors import ArtifactError, DataError, ParamsError
from components.core.fingerprint import sha256_file
from components.bundle.format import load_bundle
from components.nn.classifier import make_head
from components.nn.encoders import ImageEncoder, TextEncoder, image_tensor
from components.training.data import loader
from components.training.trainer import build_trainer

PROJECT = Path(__file__).resolve().parents[1]
PARAMS = PROJECT / "params"
# Task order b, a (not sorted): task ids follow the teacher's head order through save/load.
KINDS = {"b": "multiclass", "a": "multilabel"}
LABELS = {"b": 3, "a": 2}


def small_params(**over: object) -> DecomposeParams:
    base = {"student": {"image": {"widths": [4, 8]}, "text": {"layers": [1], "embedding_rank": 8,
                                                             "max_positions": 16}},
            "rank": 2, "alpha": 4.0}
    return DecomposeParams.model_validate({**base, **over})


def randomise_b(module: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, ExpertLayer):
                layer.expert_b.copy_(torch.randn(layer.expert_b.shape, generator=gen) * 0.3)


def teacher_for(modality: str) -> tuple[nn.Module, dict[str, nn.Linear]]:
    torch.manual_seed(0)
    if modality == "image":
        encoder: nn.Module = ImageEncoder([8, 16])
    else:
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
        encoder = TextEncoder(BertModel(config))
    heads = {n: make_head(encoder.out_dim, k) for n, k in LABELS.items()}
    return encoder.eval(), heads


def inputs_for(modality: str, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if modality == "image":
        return {"pixels": torch.randn(n, 3, 28, 28, generator=gen)}
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[::2, 8:] = 0  # some padded rows: the mean pooling must ignore them
    return {"input_ids": torch.randint(1, 100, (n, 12), generator=gen), "attention_mask": mask}


def student_for(modality: str, **over: object) -> LoRKDStudent:
    encoder, heads = teacher_for(modality)
    student = build_student(small_params(**over), modality, encoder, heads, seed=0)
    randomise_b(student)
    return student.eval()  # dropout off: outputs and gradients compare exactly


def rows(inputs: dict[str, torch.Tensor], index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in inputs.items()}


MODALITIES = ["image", "text"]
TASK_IDS = torch.tensor([1, 0, 0, 1, 1, 0])


# --------------------------------------------------------------------------- expert layers
def layer_cases() -> list[tuple[str, nn.Module, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        ("linear", nn.Linear(6, 5), torch.randn(7, 4, 6, generator=gen)),
        ("conv", nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(7, 3, 9, 9, generator=gen)),
        ("conv_dilated", nn.Conv2d(3, 4, 3, padding=2, dilation=2), torch.randn(7, 3, 8, 8, generator=gen)),
    ]


@pytest.mark.parametrize("case", layer_cases(), ids=lambda c: c[0])
def test_layer_one_pass_equals_per_sample_loop_and_fold(case: tuple[str, nn.Module, torch.Tensor]) -> None:
    _, base, x = case
    cls = ExpertLinear if isinstance(base, nn.Linear) else ExpertConv2d
    layer = cls(base, num_tasks=3, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    randomise_b(layer)
    ids = torch.tensor([2, 0, 1, 1, 2, 0, 2])
    runs, order = TaskRuns.sort(ids, 3)
    assert runs.counts == (2, 2, 3) and ids[order].tolist() == [0, 0, 1, 1, 2, 2, 2]
    with torch.no_grad(), task_context([layer], runs):
        in_order = layer(x[order])
    mixed = torch.empty_like(in_order)
    mixed[order] = in_order  # back to the batch's own order
    for i, t in enumerate(ids.tolist()):
        with torch.no_grad(), task_context([layer], t):
            single = layer(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], single, rtol=1e-5, atol=1e-6)
        folded = layer.fold(t)
        assert type(folded) is type(base)
        torch.testing.assert_close(mixed[i:i + 1], folded(x[i:i + 1]), rtol=1e-5, atol=1e-6)


def test_layer_without_task_refuses() -> None:
    layer = ExpertLinear(nn.Linear(4, 4), num_tasks=2, rank=1)
    with pytest.raises(RuntimeError, match="no task selected"):
        layer(torch.randn(2, 4))
    with task_context([layer], TaskRuns((1, 2))), pytest.raises(ValueError, match=r"runs \[1, 2\] do not fit"):
        layer(torch.randn(2, 4))
    with task_context([layer], TaskRuns((0, 0))):
        assert layer(torch.randn(0, 4)).shape == (0, 4)  # an empty batch passes through


# --------------------------------------------------------------------------- whole students
@pytest.mark.parametrize("modality", MODALITIES)
def test_student_one_pass_equals_per_sample_loop(modality: str) -> None:
    student = student_for(modality)
    x = inputs_for(modality, len(TASK_IDS))
    with torch.no_grad():
        mixed = student(TASK_IDS, **x)
        assert mixed.shape == (len(TASK_IDS), max(LABELS.values()))
        for i, t in enumerate(TASK_IDS.tolist()):
            single = student(t, **rows(x, slice(i, i + 1)))
            width = LABELS[student.task_names[t]]
            torch.testing.assert_close(mixed[i:i + 1, :width], single, rtol=1e-4, atol=1e-5)
            assert torch.all(mixed[i, width:] == 0)


def targets(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N, max L: task 0 one-hot, task 1 multilabel) and teacher logits for a batch with ``ids``."""
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (len(ids), 3), generator=gen).float()
    labels[ids == 0] = nn.functional.one_hot(torch.randint(0, 3, (len(ids),), generator=gen), 3).float()[ids == 0]
    return labels, torch.randn(len(ids), 3, generator=gen)


def grads(student: LoRKDStudent, x: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor,
          teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the sum-reduced LoRKD loss (additive over samples, so sub-batch gradients add up)."""
    student.zero_grad(set_to_none=False)
    loss, _ = lorkd_loss(student(ids, **x), labels, teacher, ids, ["multiclass", "multilabel"], [3, 2],
                         kd_weight=0.5, temperature=2.0, reduction="sum")
    loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("modality", MODALITIES)
def test_gradient_separation(modality: str) -> None:
    student = student_for(modality)
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    x = inputs_for(modality, len(TASK_IDS))
    labels, teacher = targets(TASK_IDS)
    experts = [n for n, m in student.backbone.named_modules() if isinstance(m, ExpertLayer)]
    assert len(experts) > 3
    r = student.config["rank"]
    mixed = grads(student, x, TASK_IDS, labels, teacher)
    split = {}
    for s in (0, 1):
        mask = TASK_IDS == s
        split[s] = grads(student, rows(x, mask), TASK_IDS[mask], labels[mask], teacher[mask])
        other = 1 - s
        for name in experts:
            g_a, g_b = split[s][f"backbone.{name}.expert_a"], split[s][f"backbone.{name}.expert_b"]
            # Exactly zero, not approximately: the other task's expert never saw these samples.
            assert torch.all(g_b[other] == 0) and torch.all(g_a[other * r:(other + 1) * r] == 0), name
            assert g_b[s].abs().sum() > 0 and g_a[s * r:(s + 1) * r].abs().sum() > 0, name
            assert split[s][f"backbone.{name}.base.weight"].abs().sum() > 0, name  # shared W0 sees all
    # A mixed batch's gradients are the sum of its single-task sub-batches' (one pass, no interference).
    for name, value in mixed.items():
        torch.testing.assert_close(value, split[0][name] + split[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("modality", MODALITIES)
def test_fusion_equals_student_and_round_trips(modality: str, tmp_path: Path, tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert, local_files_only=True)
    student = student_for(modality)
    x = inputs_for(modality, 4)
    digest = student_hash(student)
    manifest = save_student(tmp_path / "student", student)
    assert manifest["sha256"] == digest == sha256_file(tmp_path / "student" / "student.safetensors")
    loaded = load_student(tmp_path / "student")
    for task in student.task_names:
        fused = fuse(student, task, expected_hash=digest)
        assert not any(isinstance(m, ExpertLayer) for m in fused.modules())
        with torch.no_grad():
            reference = student(task, **x)
            torch.testing.assert_close(fused(**x), reference, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(loaded(task, **x), reference)
        out = tmp_path / f"fused-{task}"
        labels = [f"l{i}" for i in range(student.num_labels[task])]
        man = save_fused(out, loaded, task, kind="multiclass", label_names=labels, expected_hash=digest,
                         tokenizer=tokenizer if modality == "text" else None)
        assert (man["task"], man["student_sha256"]) == (task, digest)
        assert man["parameters"] == sum(p.numel() for p in fused.parameters())
        bundle = load_bundle(out)  # a fused expert is an ordinary bundle: deploys and predicts like every model
        assert bundle.manifest["base"]["architecture"] == "lorkd_student" and bundle.tasks == [task]
        deployed = bundle.model.for_task(task)
        with torch.no_grad():
            torch.testing.assert_close(deployed(**x), reference, rtol=1e-4, atol=1e-5)
    # The fused model is smaller than the student with all its experts.
    assert man["parameters"] < sum(p.numel() for p in student.parameters())


def test_task_switching_and_names() -> None:
    student = student_for("image")
    x = inputs_for("image", 2)
    with torch.no_grad():
        b, a = student("b", **x), student(1, **x)
        assert b.shape == (2, 3) and a.shape == (2, 2)
        torch.testing.assert_close(student.features("a", **x), student.features(torch.tensor(1), **x))
        assert not torch.allclose(student.features(0, **x), student.features(1, **x))


# --------------------------------------------------------------------------- bad inputs
def test_task_id_outside_registered_tasks() -> None:
    student = student_for("image")
    x = inputs_for("image", 2)
    with pytest.raises(DataError, match=r"task id 5 is outside the registered tasks: the student has 2 tasks"):
        student(torch.tensor([0, 5]), **x)
    with pytest.raises(DataError, match=r"task id -1 is outside"):
        student(-1, **x)
    with pytest.raises(DataError, match=r"task_ids must be an integer tensor of shape \(2,\)"):
        student(torch.tensor([0, 1, 1]), **x)
    with pytest.raises(DataError, match=r"unknown task 'zz'"):
        student("zz", **x)


def test_rank_larger_than_layer() -> None:
    with pytest.raises(ParamsError, match=r"rank 5 exceeds min\(in_features, out_features\) = min\(6, 4\) = 4"):
        ExpertLinear(nn.Linear(6, 4), num_tasks=2, rank=5)
    with pytest.raises(ParamsError, match=r"'stem.0' .*rank 5 exceeds min\(in_channels\*kh\*kw, out_channels\) "
                                          r"= min\(27, 4\) = 4"):
        student_for("image", rank=5)
    with pytest.raises(ParamsError, match=r"'model.embeddings.word_embeddings.1' \(Linear 8->32\): rank 9"):
        student_for("text", rank=9)


def test_student_shapes_must_match_teacher() -> None:
    with pytest.raises(ParamsError, match=r"student head needs weight shape \(3, 8\) \(student feature dim 8\) "
                                          r"but the teacher head has \(3, 16\)"):
        student_for("image", head_init="teacher")
    with pytest.raises(ParamsError, match=r"layer\(s\) \[7\] do not exist; the teacher has 2 layers"):
        student_for("text", student={"text": {"layers": [0, 7]}})
    student = student_for("image")
    x = inputs_for("image", 4)
    inputs, labels = {"a": x, "b": x}, {"b": torch.zeros(4, dtype=torch.long), "a": torch.zeros(4, 2)}
    teacher = {"a": torch.zeros(4, 2), "b": torch.zeros(4, 2)}
    with pytest.raises(ArtifactError, match=r"task 'b': teacher logits have shape \(4, 2\) but the student head "
                                            r"outputs 3 labels \(head weight shape \(3, 8\)\)"):
        mixed_dataset(student, inputs, labels, teacher)


def test_fuse_refuses_unknown_task_and_other_run() -> None:
    student = student_for("image")
    with pytest.raises(ArtifactError, match=r"cannot fuse task 'nope': the student has experts for \['b', 'a'\]"):
        fuse(student, "nope")
    with pytest.raises(ArtifactError, match=r"differs from the expected decomposition run 000000000000"):
        fuse(student, "b", expected_hash="0" * 64)


# --------------------------------------------------------------------------- distillation
def test_short_distillation_reduces_loss(tmp_path: Path) -> None:
    encoder, heads = teacher_for("image")
    x = {n: inputs_for("image", 48, seed=i) for i, n in enumerate(LABELS)}
    gen = torch.Generator().manual_seed(0)
    labels = {"b": torch.randint(0, 3, (48,), generator=gen), "a": torch.randint(0, 2, (48, 2), generator=gen).float()}
    encoder.train()
    logits = {n: teacher_logits(encoder, heads[n], x[n], batch_size=16) for n in LABELS}
    assert encoder.training  # restored
    with torch.no_grad():
        torch.testing.assert_close(logits["b"], heads["b"](encoder.eval()(**x["b"])))
    student = build_student(small_params(), "image", encoder, heads, seed=0)
    ds = mixed_dataset(student, x, labels, logits)
    assert ds.labels.shape == (96, 3) and ds.inputs["teacher_logits"].shape == (96, 3)
    module = DecomposeModule(student, KINDS, kd_weight=1.0, temperature=2.0, lr=1e-2, weight_decay=1e-4)

    def full_loss() -> float:
        with torch.no_grad():
            batch = {**ds.inputs, "labels": ds.labels, "task_ids": ds.task_ids}
            return float(module._loss(batch, module.eval()(batch))[0])

    before = full_loss()
    module.train()
    tp = TrainerParams(max_epochs=4, batch_size=16, accelerator="cpu")
    trainer = build_trainer(tp, tmp_path, progress=False)
    trainer.fit(module, loader(ds, 16, shuffle=True), loader(ds, 32, shuffle=False))
    assert full_loss() < before
    assert {"val_macro_f1", "val_macro_f1_a", "val_macro_f1_b", "train_kd_loss"} <= set(trainer.callback_metrics)


# --------------------------------------------------------------------------- params
def test_params_file_validates() -> None:
    dp = DecomposeParams.model_validate(yaml.safe_load((PARAMS / "decompose.yaml").read_text()))
    assert dp == DecomposeParams()
    with pytest.raises(ValueError, match="layers must be distinct"):
        DecomposeParams.model_validate({"student": {"text": {"layers": [1, 1]}}})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        DecomposeParams.model_validate({"ranks": 2})
    assert (dp.teacher.of("text"), dp.teacher.of("image")) == ("expert", "foundation")
    with pytest.raises(ValueError, match="'expert' or 'foundation'"):
        DecomposeParams.model_validate({"teacher": {"text": "probe"}})


def test_an_expert_teacher_that_is_not_there_is_named(tmp_path: Path) -> None:
    """decompose.teacher = expert without the experts stage's output, or without the task's deployed expert: an
    error that says which and what to run (the foundation is not read before that)."""
    from types import SimpleNamespace

    from components.stages.decompose import expert_teachers

    found = SimpleNamespace(sha256="0" * 64, modality="text")
    with pytest.raises(ArtifactError, match="run the experts stage first"):
        expert_teachers(None, ["pubmedqa"], found)
    (tmp_path / "medical_abstracts").mkdir()
    with pytest.raises(ArtifactError, match="no deployed expert for task 'pubmedqa'"):
        expert_teachers(tmp_path, ["pubmedqa"], found)


def test_the_multilabel_task_loss_is_class_weighted_per_label() -> None:
    """A multilabel task's supervised part is the probe's and the experts' balanced BCE (rare labels are not
    learnt as "never"); a single-label task beside it is unchanged."""
    from torch.nn import functional as F

    from components.decompose.loss import lorkd_loss

    torch.manual_seed(0)
    logits, teacher = torch.randn(6, 3), torch.randn(6, 3)
    labels = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float)
    task_ids = torch.tensor([0, 0, 0, 0, 1, 1])
    weights = [torch.tensor([3.0, 3.0, 1.0]), None]
    _, parts = lorkd_loss(logits, labels, teacher, task_ids, ["multilabel", "multiclass"], [3, 3], 0.0, 1.0,
                          reduction="sum", loss_weights=weights)
    expected = (F.binary_cross_entropy_with_logits(logits[:4], labels[:4], pos_weight=weights[0]) * 4
                + F.cross_entropy(logits[4:], torch.tensor([2, 1])) * 2)  # one-hot rows of a mixed batch
    assert torch.allclose(parts["task"], expected)
    _, plain = lorkd_loss(logits, labels, teacher, task_ids, ["multilabel", "multiclass"], [3, 3], 0.0, 1.0,
                          reduction="sum")
    assert not torch.allclose(plain["task"], expected)


def test_multilabel_thresholds_are_picked_on_validation_and_folded_into_the_student_head() -> None:
    """The student's multilabel head gets per-label thresholds from its fused model's validation logits (the same
    ``best_thresholds`` as the probe and the experts), so the fused expert decides p >= t; the single-label head
    is untouched (``experts.probe.prior_shift`` off)."""
    from components.config import ProbeParams
    from components.stages.decompose import fold_val_decisions
    from components.training.inference import batched
    from components.training.multilabel import best_thresholds

    encoder, heads = teacher_for("image")
    student = build_student(small_params(), "image", encoder, heads, seed=0)
    x_va = {n: inputs_for("image", 200, seed=7 + i) for i, n in enumerate(LABELS)}
    with torch.no_grad():  # spread the probabilities (std ~0.003 at init) over (0, 1), centred on 0.5
        student.heads["a"].weight.mul_(100)
        student.heads["a"].bias.sub_(batched(fuse(student, "a"), x_va["a"]).median(dim=0).values)
        before = batched(fuse(student, "a"), x_va["a"])
    p = torch.sigmoid(before)
    y_va = {"a": (p >= 0.75).float(),  # 0.5 over-predicts: 0.75 is the better threshold
            "b": torch.zeros(200, dtype=torch.long)}
    expected = best_thresholds(before, y_va["a"])
    assert (expected != 0.5).any()  # the test means something: at least one label moves
    bias_a, head_b = student.heads["a"].bias.clone(), {k: v.clone() for k, v in student.heads["b"].state_dict().items()}
    fold_val_decisions(student, ["b", "a"], KINDS, x_va, y_va, y_va, ProbeParams(prior_shift=False))
    torch.testing.assert_close(student.heads["a"].bias, bias_a - torch.logit(expected))
    with torch.no_grad():
        after = batched(fuse(student, "a"), x_va["a"])
    assert torch.equal(after > 0, p >= expected)
    assert all(torch.equal(v, head_b[k]) for k, v in student.heads["b"].state_dict().items())


def test_a_single_label_head_gets_the_prior_shift_picked_on_its_fused_model() -> None:
    """With ``experts.probe.prior_shift`` the student's single-label head carries the prior shift picked on its fused
    model's validation logits (the same ``best_prior_shift`` as the probe and the experts)."""
    from components.config import ProbeParams
    from components.stages.decompose import fold_val_decisions
    from components.training.inference import batched
    from components.training.prior_shift import best_prior_shift, class_priors

    encoder, heads = teacher_for("image")
    student = build_student(small_params(), "image", encoder, heads, seed=0)
    x_va = {n: inputs_for("image", 400, seed=11 + i) for i, n in enumerate(LABELS)}
    with torch.no_grad():  # spread the logits (tiny at init), each class centred on 0
        student.heads["b"].weight.mul_(100)
        student.heads["b"].bias.sub_(batched(fuse(student, "b"), x_va["b"]).mean(dim=0))
        before = batched(fuse(student, "b"), x_va["b"])
    y_tr = {"b": torch.tensor([0] * 90 + [1] * 6 + [2] * 4), "a": torch.zeros(100, 2)}
    priors = class_priors(y_tr["b"], 3)
    y_va = {"b": (before + priors.log()).argmax(dim=1),  # the truth is the frequent-class-leaning decision
            "a": torch.zeros(400, 2)}
    tau = best_prior_shift(before, y_va["b"], priors)
    assert tau > 0  # the test means something: the head moves
    bias_b = student.heads["b"].bias.clone()
    fold_val_decisions(student, ["b", "a"], KINDS, x_va, y_va, y_tr, ProbeParams(prior_shift=True))
    torch.testing.assert_close(student.heads["b"].bias, bias_b + tau * priors.log())


def test_rgb_images_train_the_image_student() -> None:
    """RGB (N,H,W,3) images become contiguous NCHW tensors. A permuted channels-last view crashed the process
    (segfault / double free) in the 2-thread CPU backward of the LoRKD image student on a batch of 31, DermaMNIST's
    last batch: run in a child process, so a crash is this test failing rather than the test run dying."""
    rgb = np.random.default_rng(0).integers(0, 256, size=(31, 28, 28, 3), dtype=np.uint8)
    x = image_tensor(rgb)["pixels"]
    assert x.shape == (31, 3, 28, 28) and x.is_contiguous()
    assert torch.equal(x[:, 1], torch.from_numpy(rgb[..., 1]).float() / 127.5 - 1)
    code = (
        "import numpy as np, torch\n"
        "from components.config import load_params\n"
        "from components.decompose.student import build_student\n"
        "from components.nn.encoders import ImageEncoder, image_tensor\n"
        "torch.set_num_threads(2)\n"
        "p = load_params('params', 'quick')\n"
        "enc = ImageEncoder([32, 64, 128])\n"
        "s = build_student(p.decompose, 'image', enc, {'t': torch.nn.Linear(enc.out_dim, 7)}, 0).train()\n"
        "rgb = np.random.default_rng(0).integers(0, 256, size=(31, 28, 28, 3), dtype=np.uint8)\n"
        "s(torch.zeros(31, dtype=torch.long), **image_tensor(rgb)).sum().backward()\n"
        "print('trained')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True)
    assert done.returncode == 0 and "trained" in done.stdout, (done.returncode, done.stderr[-2000:])
