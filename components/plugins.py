"""Import every module that registers a plug-in with a lower layer (the role PEFT's ``tuners/__init__.py`` plays).

The bundle format starts with empty registries; loading a bundle of a soft-prompt expert or a fused LoRKD
student needs their registrations. Whatever loads bundles it did not write (evaluation, the MLflow pyfunc,
benchmarks) imports this module first.
"""

from __future__ import annotations

import components.decompose.deploy  # noqa: F401  registers the "lorkd_student" bundle architecture
import components.experts.methods  # noqa: F401  registers the expert methods (and, via prompt, the prompt wrapper)
import components.moe.routed  # noqa: F401  registers the "routing" bundle wrapper (AT-MoE routed experts)
