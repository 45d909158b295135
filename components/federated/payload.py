"""What travels between server and clients: fp32 CPU copies of selected parameters, never the frozen rest.

A payload is ``{parameter name: tensor}``. The key filter decides what is federated (adapters, a local
encoder, heads); the frozen foundation weights every party already holds are never sent.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import nn

from components.core.errors import ArtifactError, ParamsError

Payload = dict[str, torch.Tensor]
# None: the parameters that require grad; patterns: fnmatch globs on names ("*lora_*", "head.*"); or a predicate.
KeyFilter = Union[None, Sequence[str], Callable[[str], bool]]


def _predicate(keys: KeyFilter, module: nn.Module) -> Callable[[str], bool]:
    if keys is None:
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        return trainable.__contains__
    if callable(keys):
        return keys
    patterns = [keys] if isinstance(keys, str) else list(keys)  # one pattern given as a bare string
    return lambda name: any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def select_names(module: nn.Module, keys: KeyFilter = None) -> list[str]:
    """Names of the parameters ``keys`` selects, in the module's order; selecting none is an error."""
    accept = _predicate(keys, module)
    names = [n for n, _ in module.named_parameters() if accept(n)]
    if not names:
        shown = "requires_grad" if keys is None else keys
        raise ParamsError(f"the federated key filter {shown!r} selects no parameter of {type(module).__name__}; "
                          f"its parameters are e.g. {[n for n, _ in module.named_parameters()][:5]}")
    return names


def to_payload(module: nn.Module, keys: KeyFilter = None) -> Payload:
    """fp32 CPU copies of the selected parameters (copies: later training does not change a sent payload)."""
    params = dict(module.named_parameters())
    return {n: params[n].detach().to(device="cpu", dtype=torch.float32, copy=True)
            for n in select_names(module, keys)}


def load_payload(module: nn.Module, payload: Payload) -> None:
    """Copy ``payload`` into the module's parameters (cast to their dtype and device); all keys are checked
    before any is written, so a bad payload leaves the module untouched."""
    params = dict(module.named_parameters())
    unknown = [k for k in payload if k not in params]
    if unknown:
        raise ArtifactError(f"payload key {unknown[0]!r} is not a parameter of {type(module).__name__} "
                            f"({len(unknown)} unknown keys); server and client must build the same model")
    for key, value in payload.items():
        if value.shape != params[key].shape:
            raise ArtifactError(f"payload key {key!r} has shape {tuple(value.shape)}; the model's parameter has "
                                f"shape {tuple(params[key].shape)}")
    with torch.no_grad():
        for key, value in payload.items():
            params[key].copy_(value)


def payload_bytes(payload: Payload) -> int:
    """Bytes on the wire for the tensors' data (what a round costs each client in each direction)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def clone_payload(payload: Payload) -> Payload:
    return {k: v.clone() for k, v in payload.items()}
