"""LoRKD (Zhou et al., CVPR 2024): a small student with per-task low-rank experts, distilled from the frozen
foundation in mixed-task batches (one forward pass, knowledge separated by task), fused per task to deploy.

Parameters: ``components.config.DecomposeParams``. Modules: ``layers`` (expert layers, one-pass routing, folding), ``backbones``
(plain student networks), ``student`` (student + heads, build), ``teacher`` (teacher logits, mixed dataset),
``loss`` and ``module`` (distillation), ``deploy`` (save/load, fuse).
"""
