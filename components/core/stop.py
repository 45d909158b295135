"""A stop request (SIGTERM) ends a run at its next safe point, never in the middle of a write.

Python runs a signal handler between two bytecodes of the main thread: a handler that raises (Prefect's does)
can land inside an MLflow/SQLite commit, a checkpoint write or a finaliser, where the exception is lost
(``Exception ignored in: ... __del__``) or leaves a library's state half-changed so that the runs it should close
stay RUNNING. Here the first SIGTERM only records the request; the pipeline's loops look at it where stopping is
safe (every training and validation batch, every federated round and client, every stage start) and raise
``StopRequested`` there, which unwinds like any error: MLflow runs end FAILED, temporary outputs are discarded,
the project lock is released. If no safe point comes within ``GRACE_S`` seconds, or a second SIGTERM arrives,
the stop is forced at once (the old behaviour, now only a fallback).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("medexperts")

GRACE_S = 30.0  # seconds a stop request waits for a safe point before it is forced


class StopRequested(BaseException):
    """A SIGTERM asked the run to stop (a BaseException, like KeyboardInterrupt: no ``except Exception`` keeps
    the run going)."""

    def __init__(self, signum: int, where: str) -> None:
        self.signum, self.where = signum, where
        super().__init__(f"stopped by {signal.Signals(signum).name} at {where}")


_state: dict[str, Any] = {"signum": None, "since": None}


def requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _state["signum"]


def check(where: str) -> None:
    """A safe point: raise ``StopRequested`` if a stop was requested."""
    signum = _state["signum"]
    if signum is not None:
        if threading.current_thread() is threading.main_thread():
            signal.setitimer(signal.ITIMER_REAL, 0)  # stopping cleanly now: no forced stop during the unwinding
        raise StopRequested(signum, where)


def _on_signal(signum: int, frame: Any) -> None:
    if _state["signum"] is None:
        _state["signum"], _state["since"] = signum, time.monotonic()
        log.warning("[stop] %s received: stopping at the next safe point (a batch, a round, a stage); a second "
                    "%s or %.0f s without one forces it", signal.Signals(signum).name, signal.Signals(signum).name,
                    GRACE_S)
        signal.setitimer(signal.ITIMER_REAL, GRACE_S)
        return
    raise StopRequested(signum, "a second stop request (forced)")


def _on_grace_over(signum: int, frame: Any) -> None:
    if _state["signum"] is not None:
        raise StopRequested(_state["signum"], f"no safe point within {GRACE_S:.0f} s (forced)")


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """Within this block SIGTERM requests a stop at the next safe point (see the module doc); the previous
    handlers are restored after it. Outside the main thread signals cannot be handled: a no-op there."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _on_signal:
        yield  # not the main thread, or already inside a graceful block
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGALRM)}
    _state["signum"] = _state["since"] = None
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_grace_over)
    try:
        yield
        if _state["signum"] is not None:  # after the last safe point: the work is whole, nothing to undo
            log.warning("[stop] the stop request came after the last safe point: the run had finished")
    finally:
        _state["signum"] = _state["since"] = None  # outside the block nothing is pending: check() is a no-op
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)
