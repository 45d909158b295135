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

import _thread
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("medexperts")

GRACE_S = 15.0  # seconds a stop request waits for a safe point before it is forced (below Prefect's 30 s kill)


class StopRequested(BaseException):
    """A SIGTERM asked the run to stop (a BaseException, like KeyboardInterrupt: no ``except Exception`` keeps
    the run going)."""

    def __init__(self, signum: int, where: str) -> None:
        self.signum, self.where = signum, where
        super().__init__(f"stopped by {signal.Signals(signum).name} at {where}")


_state: dict[str, Any] = {"signum": None, "timer": None, "depth": 0}


def requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _state["signum"]


def _cancel_timer() -> None:
    timer = _state["timer"]
    if timer is not None:
        timer.cancel()
        _state["timer"] = None


def check(where: str) -> None:
    """A safe point: raise ``StopRequested`` if a stop was requested (a no-op outside a ``graceful`` block)."""
    signum = _state["signum"]
    if signum is not None and _state["depth"]:
        _cancel_timer()  # stopping cleanly now: no forced stop during the unwinding
        raise StopRequested(signum, where)


def _on_signal(signum: int, frame: Any) -> None:
    if _state["signum"] is None:
        _state["signum"] = signum
        name = signal.Signals(signum).name
        log.warning("[stop] %s received: stopping at the next safe point (a batch, a round, a stage); a second "
                    "%s or %.0f s without one forces it", name, name, GRACE_S)
        # the forced stop is a second request, delivered to the main thread by a timer thread (not SIGALRM: the
        # process's one alarm timer belongs to others, pytest-timeout among them)
        timer = threading.Timer(GRACE_S, _thread.interrupt_main, (signum,))
        timer.daemon = True
        _state["timer"] = timer
        timer.start()
        return
    _cancel_timer()
    raise StopRequested(signum, "a second stop request, or none of the safe points came in time (forced)")


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """Within this block SIGTERM requests a stop at the next safe point (see the module doc); the previous
    handler is restored after it. Outside the main thread signals cannot be handled: a no-op there."""
    if threading.current_thread() is not threading.main_thread() or _state["depth"]:
        yield  # not the main thread, or already inside a graceful block
        return
    previous = signal.getsignal(signal.SIGTERM)
    _state["signum"] = None
    signal.signal(signal.SIGTERM, _on_signal)
    _state["depth"] = 1
    try:
        yield
        if _state["signum"] is not None:  # after the last safe point: the work is whole, nothing to undo
            log.warning("[stop] the stop request came after the last safe point: the run had finished")
    except SystemExit as exc:
        # Lightning turns a SIGTERM it saw at an epoch end into SystemExit (SIGTERMException, exit status 0):
        # while a stop is pending, that is our stop, not a clean exit
        if _state["signum"] is None:
            raise
        raise StopRequested(_state["signum"], "the end of a training epoch") from exc
    finally:
        signal.signal(signal.SIGTERM, previous)  # first: a late SIGTERM goes to the previous handler
        _state["depth"] = 0
        _cancel_timer()
        _state["signum"] = None
