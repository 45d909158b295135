"""Mixtures of LoRA experts inside a frozen network: batched expert application and the gates that weight them
(M3OE: task- and modality-aware, one weight vector per sample; AT-MoE: layer-wise grouped router).

Modules: ``mixing`` (pure math: stacked factors, the batched mixture, ΔW of a fixed routing), ``layers``
(``MoLoRALinear``, ``attach_molora``, ``routing_context``, per-layer routers, folding, reading PEFT experts),
``m3oe`` (FedKIM's M3OE gate and ``describe``), ``routers`` (AT-MoE's grouped router, flat and uniform
baselines, the router registry), ``errors`` (``MoEParamsError``, a ``ParamsError`` and a ``ValueError``).
"""
