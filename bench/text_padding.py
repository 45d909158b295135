"""Text batches without their unused padding: a LoRA expert's training step on each text task, batch padded to
``max_length`` (what every text stage ran before ``trim_padding``) vs cut back to its longest text (now).

The same model (the frozen encoder in eval mode, as the experts stage trains it), batches, optimiser and
step; the two are timed alternately, batch by batch, so drift on a noisy
machine hits both alike; medians per task and their ratio. Then inference over the same task's rows, three
ways (padded; cut, rows in order; ``batched``: shortest first, then cut). Also the pooled features of both paths on the same
batch (eval mode): they must agree up to float rounding, since the attention mask gives padding zero weight.
`medexperts bench text_padding [--profile full] [--batches 6]` -> bench/results/text_padding.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, write_result


def padded_features(encoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """What TextEncoder computed before ``trim_padding``: every column of the batch through the model, then the
    same masked mean."""
    hidden = encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


INFERENCE_ROWS = 512  # rows of the task's training split scored by each inference path


@torch.no_grad()
def time_inference(model: Any, x: dict[str, torch.Tensor], batch_size: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Median seconds per sample of three inference passes over the same rows, in batches of ``batch_size`` (what
    ``batched`` uses): every batch padded to max_length (before), each batch cut to its longest text in the rows'
    order, and ``batched`` itself (shortest first, then cut); the largest difference between the outputs."""
    from components.training.inference import batched

    model.eval()

    def in_order(fn: Any) -> torch.Tensor:
        n = len(x["input_ids"])
        return torch.cat([fn(**{k: v[i:i + batch_size] for k, v in x.items()}) for i in range(0, n, batch_size)])

    paths = {"padded": lambda: in_order(lambda **b: padded_features(model, **b)),
             "trimmed_in_order": lambda: in_order(model), "batched_by_length": lambda: batched(model, x, batch_size)}
    runs: dict[str, list[float]] = {name: [] for name in paths}
    outs = {}
    for r in range(repeats):  # the paths in turn, the order reversed every other repeat: drift hits all alike
        for name in list(paths)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            outs[name] = paths[name]()
            runs[name].append((time.perf_counter() - start) / len(x["input_ids"]))
    seconds = {name: statistics.median(v) for name, v in runs.items()}
    gap = max(float((outs[name] - outs["padded"]).abs().max()) for name in outs)
    print("  inference, per sample: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items()))
    return {"rows": len(x["input_ids"]), "batch_size": batch_size, "repeats": repeats, "s_per_sample": seconds,
            "runs": runs,
            "speedup_batched_by_length": seconds["padded"] / seconds["batched_by_length"],
            "max_abs_output_gap": gap}


def measure(task: str, split: Any, params: Any, batches: int, batch_size: int) -> dict[str, Any]:
    from components.experts.lora import attach_lora
    from components.nn.encoders import encoder_inputs, load_text_encoder, resolve_text_source, trim_padding
    from components.training.data import labels_tensor
    from components.training.module import task_loss

    max_length = params.foundation.text.max_length
    encoder, tokenizer = load_text_encoder(resolve_text_source(params.foundation.text.source, ROOT))
    encoder.eval().requires_grad_(False)
    rows = split.subset(batches * batch_size, 0)
    x = encoder_inputs(rows.inputs, "text", tokenizer=tokenizer, max_length=max_length)
    y = labels_tensor(rows.labels, rows.kind)
    torch.manual_seed(0)
    model = attach_lora(encoder, params.experts.lora, "text").get_base_model()  # the TextEncoder, LoRA inside
    head = torch.nn.Linear(model.out_dim, rows.num_labels)
    trainable = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    with torch.no_grad():
        one = {k: v[:batch_size] for k, v in x.items()}
        gap = float((padded_features(model, **one) - model(**one)).abs().max())
    times: dict[str, list[float]] = {"padded": [], "trimmed": []}
    widths = []
    for b in range(batches):
        batch = {k: v[b * batch_size:(b + 1) * batch_size] for k, v in x.items()}
        labels = y[b * batch_size:(b + 1) * batch_size]
        widths.append(trim_padding(batch["input_ids"], batch["attention_mask"])[1].shape[1])
        for path in ("padded", "trimmed") if b % 2 == 0 else ("trimmed", "padded"):
            features = padded_features if path == "padded" else (lambda m, **kw: m(**kw))
            start = time.perf_counter()
            loss = task_loss(rows.kind, head(features(model, **batch)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times[path].append((time.perf_counter() - start) / len(labels))
    inference = time_inference(model, encoder_inputs(split.subset(INFERENCE_ROWS, 0).inputs, "text",
                                                      tokenizer=tokenizer, max_length=max_length))
    padded, trimmed = statistics.median(times["padded"]), statistics.median(times["trimmed"])
    total = sum(times["padded"]) / sum(times["trimmed"])  # what an epoch's time follows (the mean, not the median)
    print(f"{task}: {padded * 1e3:.1f} ms/sample padded to {max_length}, {trimmed * 1e3:.1f} trimmed "
          f"(median width {statistics.median(widths)} tokens): {padded / trimmed:.2f}x (all steps: {total:.2f}x); "
          f"feature gap {gap:.1e}")
    return {"max_length": max_length, "batch_size": batch_size, "batches": batches,
            "median_width": statistics.median(widths), "widths": widths,
            "padded_s_per_sample": padded, "trimmed_s_per_sample": trimmed, "speedup": padded / trimmed,
            "speedup_total": total,
            "runs": times, "max_abs_feature_gap": gap, "inference": inference}


def main() -> None:
    parser = argparse.ArgumentParser(prog="medexperts bench text_padding", description=__doc__)
    parser.add_argument("--profile", default="full")
    parser.add_argument("--batches", type=int, default=6, help="training steps per path and task")
    args = parser.parse_args()
    from components.config import load_params
    from components.data.datasets import load_split
    from components.stages.data import prepare_data
    from flows.environment import configure

    configure(ROOT)
    params = load_params(ROOT / "params", args.profile)
    tasks = [t for t in params.data.active if params.data.tasks[t].modality == "text"]
    batch_size = params.experts.trainer.text.batch_size
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        prepare_data(params.data.model_copy(update={"active": tasks}), ROOT, data_dir, seed=params.pipeline.seed)
        for task in tasks:
            figures[task] = measure(task, load_split(data_dir, task, "train"), params, args.batches, batch_size)
    path = write_result("text_padding", {"params": {"profile": args.profile, "batches": args.batches,
                                                    "tasks": tasks, "method": "lora"}, "figures": figures})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
