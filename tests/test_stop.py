"""A SIGTERM is a stop request honoured at the next safe point, forced by a second one or after the grace time,
and never lost (not even when it lands in a finaliser, where a raising handler's exception is dropped)."""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from components.core import stop


def test_a_sigterm_waits_for_the_next_safe_point_then_stops() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(stop.StopRequested, match="stopped by SIGTERM at step 3") as info:  # noqa: PT012
        with stop.graceful():
            for step in range(1, 10):
                stop.check(f"step {step}")
                if step == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # between two safe points: the step finishes
                    assert stop.requested() == signal.SIGTERM
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers of before are back
    assert stop._state["timer"] is None  # no forced stop left armed


def test_a_second_sigterm_forces_the_stop() -> None:
    with pytest.raises(stop.StopRequested, match="a second stop request"), stop.graceful():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # no safe point here: only the second signal can end this
            pass
        pytest.fail("the second SIGTERM did not stop the block")


def test_without_a_safe_point_the_stop_is_forced_after_the_grace_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stop, "GRACE_S", 0.2)
    with pytest.raises(stop.StopRequested, match="none of the safe points came in time"), stop.graceful():
        os.kill(os.getpid(), signal.SIGTERM)
        while True:  # a long stretch without a safe point (bounded by the forced stop)
            time.sleep(0.01)


def test_lightnings_own_sigterm_exit_is_a_stop_not_a_clean_exit() -> None:
    """Lightning raises SystemExit (SIGTERMException, status 0) when it sees a SIGTERM at an epoch end: while a stop
    is pending that is our stop (`medexperts stage` would otherwise exit 0 with its output discarded)."""
    with pytest.raises(stop.StopRequested, match="end of a training epoch"), stop.graceful():
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit
    with pytest.raises(SystemExit), stop.graceful():  # without a stop request, an exit stays an exit
        raise SystemExit(3)


class _KilledInFinaliser:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # a raising handler's exception would be "ignored" here


def test_a_sigterm_in_a_finaliser_is_not_lost() -> None:
    with pytest.raises(stop.StopRequested), stop.graceful():
        obj = _KilledInFinaliser()
        del obj
        gc.collect()
        stop.check("after the finaliser")


def test_a_request_after_the_last_safe_point_lets_the_finished_work_stand() -> None:
    with stop.graceful():
        os.kill(os.getpid(), signal.SIGTERM)
    # no exception: the block's work was complete; nothing stays pending for later code
    assert stop.requested() is None
    stop.check("after the block")


def test_training_stops_after_the_batch_in_which_sigterm_arrives(tmp_path: Path) -> None:
    import lightning as L

    from components.config import TrainerParams
    from components.training.trainer import build_trainer

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.seen = torch.nn.Linear(4, 2), 0

        def training_step(self, batch: list[torch.Tensor], idx: int) -> torch.Tensor:
            self.seen += 1
            if self.seen == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    module = Tiny()
    trainer = build_trainer(TrainerParams(max_epochs=5, accelerator="cpu"), tmp_path, progress=False, label="tiny")
    with pytest.raises(stop.StopRequested, match="tiny: a training batch"), stop.graceful():
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert module.seen == 3  # the batch finished, no other started
