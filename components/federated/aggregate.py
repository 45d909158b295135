"""Server-side math as small pure functions: example-weighted FedAvg, update screening, the FedProx term."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from components.core.errors import ArtifactError, ParamsError
from components.federated.payload import Payload


def _names(n: int, names: Sequence[str] | None) -> list[str]:
    return [f"client {i}" for i in range(n)] if names is None else list(names)


def check_updates(updates: Sequence[Payload], names: Sequence[str] | None = None) -> None:
    """All updates must carry the same keys with the same shapes; the error names the two clients."""
    names = _names(len(updates), names)
    ref, ref_name = updates[0], names[0]
    for update, name in zip(updates[1:], names[1:], strict=True):
        if set(update) != set(ref):
            diff = sorted(set(update) ^ set(ref))[:3]
            raise ArtifactError(f"clients {ref_name!r} and {name!r} sent different keys (e.g. {diff}); "
                                "every client must train the same parameters")
        for key, t in update.items():
            if t.shape != ref[key].shape:
                raise ArtifactError(f"clients {ref_name!r} and {name!r} disagree on the shape of {key!r}: "
                                    f"{tuple(ref[key].shape)} vs {tuple(t.shape)}")


def fedavg(updates: Sequence[Payload], weights: Sequence[int], names: Sequence[str] | None = None) -> Payload:
    """FedAvg (McMahan et al., 2017): Σ_k (n_k / Σ n) w_k, key by key; ``weights`` are client example counts."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    if len(weights) != len(updates):
        raise ValueError(f"{len(weights)} weights for {len(updates)} updates")
    names = _names(len(updates), names)
    for w, name in zip(weights, names, strict=True):
        if not w > 0:
            raise ValueError(f"{name!r} has weight {w}; example counts must be positive")
    check_updates(updates, names)
    total = float(sum(weights))
    out: Payload = {}
    for key, first in updates[0].items():
        # float64 accumulator: the mean of many fp32 updates does not depend on client order beyond rounding
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for update, w in zip(updates, weights, strict=True):
            acc.add_(update[key].to(torch.float64), alpha=w / total)
        out[key] = acc.to(first.dtype)
    return out


def update_distance(update: Payload, reference: Payload) -> float:
    """L2 norm of ``update - reference`` over all keys together (both must carry the same keys)."""
    sq = sum(float((update[k].double() - reference[k].double()).pow(2).sum()) for k in reference)
    return math.sqrt(sq)


def screen(update: Payload, reference: Payload, max_norm: float | None) -> str | None:
    """Why ``update`` must not be averaged in, or None when it may: keys or shapes that differ from the
    global ``reference``, NaN/inf values, or an L2 distance from it beyond ``max_norm`` (None: no bound)."""
    if max_norm is not None and not max_norm > 0:
        raise ParamsError(f"max_norm={max_norm} must be positive (or None for no bound)")
    if set(update) != set(reference):
        missing, extra = sorted(set(reference) - set(update))[:3], sorted(set(update) - set(reference))[:3]
        return f"keys differ from the global weights (missing {missing}, unexpected {extra})"
    for key, t in update.items():
        if t.shape != reference[key].shape:
            return f"{key!r} has shape {tuple(t.shape)}; the global weights have {tuple(reference[key].shape)}"
        if not bool(torch.isfinite(t).all()):
            return f"non-finite values (NaN/inf) in {key!r}"
    if max_norm is not None:
        dist = update_distance(update, reference)
        if dist > max_norm:
            return f"L2 distance {dist:.4g} from the global weights exceeds max_norm={max_norm:g}"
    return None


def proximal_term(module: nn.Module, global_payload: Payload, mu: float) -> torch.Tensor:
    """FedProx (Li et al., 2020): (mu / 2) Σ ||w - w_global||² over the payload's keys, differentiable in w.

    ``global_payload`` should already be on the parameters' device (``client_update`` moves it once)."""
    if not mu >= 0:
        raise ParamsError(f"mu={mu} must be >= 0 (0 is plain FedAvg)")
    params = dict(module.named_parameters())
    unknown = [k for k in global_payload if k not in params]
    if unknown:
        raise ArtifactError(f"global payload key {unknown[0]!r} is not a parameter of {type(module).__name__}")
    device = next(iter(params.values())).device if params else torch.device("cpu")
    total = torch.zeros((), device=device)
    if mu == 0:
        return total
    for key, anchor in global_payload.items():
        w = params[key]
        total = total + (w - anchor.to(device=w.device, dtype=w.dtype)).pow(2).sum()
    return 0.5 * mu * total
