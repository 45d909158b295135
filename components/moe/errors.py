"""The one error of a bad mixture-of-experts spec (routing groups, expert factors, weights, targets)."""

from __future__ import annotations

from components.core.errors import ParamsError


class MoEParamsError(ParamsError, ValueError):
    """A mixture spec the layers cannot run: bad groups, τ, expert factors, routing weights or targets.

    A ``ParamsError`` so the CLI prints it as one line, and a ``ValueError`` because callers of the library
    (notebooks, other stages) pass these values directly, not only through params.
    """
