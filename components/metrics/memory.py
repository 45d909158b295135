"""Peak memory of a block of work: GPU memory allocated by torch on CUDA, the process's resident set on CPU.

On Linux the kernel's peak-RSS mark (VmHWM) can be reset (``/proc/self/clear_refs``, Linux >= 4.0), so the peak
of a block minus the RSS before it is what the block added, however high loading a model pushed the peak
earlier. Elsewhere the process's lifetime peak (``ru_maxrss``) is reported, flagged as such.
"""

from __future__ import annotations

import gc
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.added_mb`` (peak during the block minus before it) and
    ``m.peak_mb`` (the absolute peak); ``m.kind`` says what was measured."""

    device: str = "cpu"
    kind: str = ""
    base_mb: float = 0.0
    peak_mb: float = float("nan")

    @property
    def added_mb(self) -> float:
        return self.peak_mb - self.base_mb

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.kind, self.base_mb = "cuda_allocated", torch.cuda.memory_allocated() / 2**20
            return self
        try:
            _CLEAR.write_text("5")  # reset VmHWM to the current RSS
            self.kind, self.base_mb = "rss", _status_mb("VmRSS") or 0.0
        except OSError:
            self.kind, self.base_mb = "rss_lifetime_peak", 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.kind == "rss":
            self.peak_mb = _status_mb("VmHWM") or float("nan")
        else:
            per_mb = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb
