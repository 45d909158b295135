"""Training throughput of the Lightning experts path vs a minimal hand-written PyTorch loop.

Same model (LoRA expert on the frozen foundation), data, batch size, optimiser and precision; no validation.
Runs alternate (Lightning, loop, Lightning, ...) and the median samples/s of each is reported with the ratio.
`medexperts bench train_throughput [--repeats 3]` -> bench/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT, write_result


def setup(modality: str, n: int) -> tuple:
    from components.config import LoraParams, TrainerParams, load_params
    from components.data.datasets import load_split
    from components.stages.data import prepare_data
    from components.experts.lora import attach_lora
    from components.nn.classifier import Classifier, make_head
    from components.nn.encoders import ImageEncoder, encoder_inputs, load_text_encoder, resolve_text_source
    from components.training.data import TensorDictDataset, labels_tensor

    task = "pneumoniamnist" if modality == "image" else "medical_abstracts"
    params = load_params(ROOT / "params", "quick", {"data.active": [task]})
    data_dir = Path(tempfile.mkdtemp()) / "data"
    prepare_data(params.data, ROOT, data_dir, seed=0)
    train = load_split(data_dir, task, "train").subset(n, 0)
    if modality == "image":
        encoder, tokenizer = ImageEncoder([32, 64, 128]), None
        batch = 64
    else:
        encoder, tokenizer = load_text_encoder(resolve_text_source("packaged"))
        batch = 16
    encoder.eval().requires_grad_(False)
    x = encoder_inputs(train.inputs, modality, tokenizer=tokenizer, max_length=128)
    ds = TensorDictDataset(x, labels_tensor(train.labels, train.kind))

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return Classifier(attach_lora(encoder, LoraParams(), modality), make_head(encoder.out_dim, train.num_labels))

    tp = TrainerParams(max_epochs=1, batch_size=batch, lr=1e-3, accelerator="auto", precision="auto")
    return ds, model, tp, train


def run_lightning(ds, make_model, tp, train) -> float:  # noqa: ANN001
    from components.training.data import loader
    from components.training.module import ClassifierModule
    from components.training.trainer import build_trainer

    module = ClassifierModule(make_model(), train.kind, train.num_labels, tp.lr, tp.weight_decay, "macro_f1")
    with tempfile.TemporaryDirectory() as root:
        trainer = build_trainer(tp, Path(root), progress=False)
        start = time.perf_counter()
        trainer.fit(module, loader(ds, tp.batch_size, shuffle=True, seed=0))
        return len(ds) * tp.max_epochs / (time.perf_counter() - start)


def run_loop(ds, make_model, tp, train) -> float:  # noqa: ANN001
    from components.training.data import loader
    from components.training.module import task_loss
    from components.training.trainer import resolve_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model().to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tp.lr)
    autocast = resolve_precision(tp) == "bf16-mixed"
    start = time.perf_counter()
    for _ in range(tp.max_epochs):
        for batch in loader(ds, tp.batch_size, shuffle=True, seed=0):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = task_loss(train.kind, model(**batch), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return len(ds) * tp.max_epochs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench train_throughput", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from flows.environment import configure

    configure(ROOT)
    figures = {}
    for modality, n in (("image", 2048), ("text", 160)):
        ds, make_model, tp, train = setup(modality, n)
        lit, loop = [], []
        for _ in range(args.repeats):  # alternate so drift on a noisy machine hits both alike
            lit.append(run_lightning(ds, make_model, tp, train))
            loop.append(run_loop(ds, make_model, tp, train))
        ratio = statistics.median(lit) / statistics.median(loop)
        figures[modality] = {"lightning_samples_per_s": statistics.median(lit), "loop_samples_per_s": statistics.median(loop),
                             "ratio": ratio, "runs_lightning": lit, "runs_loop": loop, "samples": len(ds),
                             "batch_size": tp.batch_size, "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"}
        print(f"{modality}: Lightning {statistics.median(lit):.1f} samples/s, loop {statistics.median(loop):.1f} "
              f"samples/s, ratio {ratio:.3f}")
    path = write_result("train_throughput", {"params": {"repeats": args.repeats, "method": "lora"}, "figures": figures})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
