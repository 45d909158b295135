"""What every benchmark records next to its figures: machine, versions, commit, date."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the project folder: `python -m bench.NAME` runs from here
RESULTS = ROOT / "bench" / "results"


# MedMNIST v2 (Yang et al., Scientific Data 2023), ResNet-18 (28): test ACC and AUC, the published anchors of the
# four image tasks (their ResNet trains 100 epochs per task; DermaMNIST's are for the original pixels, not the JPEG
# copy of the shared folder).
MEDMNIST_SOURCE = "MedMNIST v2 (Yang et al., Scientific Data 2023), ResNet-18 (28)"
MEDMNIST_ANCHORS = {"pneumoniamnist": {"accuracy": 0.854, "auroc": 0.944},
                    "breastmnist": {"accuracy": 0.863, "auroc": 0.901},
                    "retinamnist": {"accuracy": 0.524, "auroc": 0.717},
                    "dermamnist": {"accuracy": 0.735, "auroc": 0.917}}


def git_commit() -> str:
    """The project's checked-out commit ('unknown' outside a git checkout)."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(), "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/results/NAME.json (with the machine) and log it as a run of MLflow experiment
    `medexperts-bench` (bench.track.log_result, inside its own run). MEDEXPERTS_BENCH_MLFLOW=0 skips the MLflow run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    full = {**payload, "machine": machine()}
    path.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    if os.environ.get("MEDEXPERTS_BENCH_MLFLOW", "1") != "0":
        from bench.track import log_result

        log_result(name, full, path)
    return path


def run_child(module: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``python -m MODULE --child KIND SPEC OUT`` (MODULE: ``bench.experts``, ...) from the project folder in a
    fresh interpreter (clean memory) and return its JSON result."""
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        subprocess.run([sys.executable, "-m", module, "--child", kind, json.dumps(spec), f.name], check=True,
                       cwd=ROOT, env={**os.environ, "DO_NOT_TRACK": "true"})
        return json.loads(Path(f.name).read_text())


def time_training_steps(model: Any, loss_of: Any, device: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Time AdamW training steps of ``model`` on ``loss_of()`` (bf16 autocast on CUDA): median ms over ``steps``
    after ``warmup``, the memory those steps added (components.metrics.memory.PeakMemory), trainable params."""
    import statistics

    import torch

    from components.metrics.memory import PeakMemory

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    with PeakMemory(device.type) as mem:
        for i in range(warmup + steps):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_of()
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return {"step_ms": 1000 * statistics.median(times), "train_memory_mb": mem.added_mb, "memory_kind": mem.kind,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def tiny_bert(folder: Path) -> Path:
    """A randomly initialised 2-layer BERT saved as a local HF folder, with MiniLM's tokenizer: the text foundation of
    the tiny profile in tests and smoke benchmarks (`--set foundation.text.source=<folder>`)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from components.nn.encoders import resolve_text_source

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    packaged = resolve_text_source("packaged")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(packaged / name, folder / name)
    return folder


def tiny_project_copy(repo: Path, bert: Path) -> Path:
    """The project's files (tracked and not ignored) copied into ``repo``, set to the tiny profile with ``bert`` as
    the text foundation: a project of its own (its own dvc.lock, artifacts and tracking store), committed to a git
    repository of its own (DVC's home), for tests and benchmarks that run the DVC driver."""
    import shutil

    import yaml

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in files:
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    (repo / "params" / "pipeline.yaml").write_text("profile: tiny\nexperiment: medexperts\nseed: 42\n")
    foundation = yaml.safe_load((repo / "params" / "foundation.yaml").read_text())
    foundation["text"]["source"] = str(bert)
    (repo / "params" / "foundation.yaml").write_text(yaml.safe_dump(foundation))
    who = ["-c", "user.name=medexperts", "-c", "user.email=medexperts@localhost"]  # no global git identity needed
    for cmd in (["init", "-q"], ["add", "-A"], [*who, "commit", "-qm", "tiny project copy"]):
        subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, check=True)
    return repo


def parse_sets(parser: Any, items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options (VALUE read as YAML) as params overrides; a malformed one is a usage error."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides
