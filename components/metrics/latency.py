"""Wall-clock inference latency of a zero-argument callable."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch


def _sync() -> None:
    # CUDA kernels run asynchronously; without a sync the timer would stop before the work is done.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_latency(
    fn: Callable[[], object], n_samples: int, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Time `fn` (one batch of `n_samples`): median and p90 ms per call, ms per sample, repeats."""
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if repeats <= 0 or warmup < 0:
        raise ValueError(f"need repeats > 0 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    timings: list[float] = []
    with torch.inference_mode():
        # Warm-up absorbs one-off costs (allocator growth, kernel selection, lazy init).
        for _ in range(warmup):
            fn()
        _sync()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync()
            timings.append((time.perf_counter() - start) * 1000.0)
    median = statistics.median(timings)
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(timings, 90)),
        "ms_per_sample": median / n_samples,
        "repeats": float(repeats),
    }
