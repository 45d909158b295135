"""params/evaluate.yaml: the primary metric and test-time measurements."""

from __future__ import annotations

from pydantic import Field

from components.config.base import PrimaryMetric, Strict


class EvaluateParams(Strict):
    primary_metric: PrimaryMetric = Field(
        "macro_f1", description="Metric used for normalised scores, λ search and promotion."
    )
    max_test_samples: int | None = Field(None, ge=1, description="Cap on test samples per task.")
    latency_batch_size: int = Field(1, ge=1, description="Batch size of the latency measurement.")
    latency_repeats: int = Field(20, ge=1, description="Timed repeats (median reported).")
