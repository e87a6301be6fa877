"""Faults injected into a real ``saal fit`` subprocess at a chosen point: a signal to its own process.

The callbacks are given to the CLI in the run's config, like any callback. Each fires once per ``marker`` file
(it creates the file before signalling), so the resumed run, started from the same config, goes through.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback, Checkpoint


def _fire(marker: str, signal_name: str) -> None:
    path = Path(marker)
    if path.exists():
        return
    path.write_text(f"{signal_name} at {time.time()}\n")
    os.kill(os.getpid(), getattr(signal, signal_name))


class SignalDuringTraining(Callback):
    """Signal the process after the first training batch of ``epoch``."""

    def __init__(self, epoch: int, marker: str, signal_name: str = "SIGKILL") -> None:
        self.epoch, self.marker, self.signal_name = epoch, marker, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            _fire(self.marker, self.signal_name)


class SignalDuringAcquisition(Callback):
    """Signal the process while the pool of acquisition number ``acquisition`` (0-based) is being scored."""

    def __init__(self, acquisition: int, marker: str, signal_name: str = "SIGKILL") -> None:
        self.acquisition, self.marker, self.signal_name = acquisition, marker, signal_name
        self._calls = 0

    def setup(self, trainer, pl_module, stage):
        datamodule = trainer.datamodule
        make_loader = datamodule.pool_dataloader

        def pool_dataloader(indices):
            if self._calls == self.acquisition:
                _fire(self.marker, self.signal_name)
            self._calls += 1
            return make_loader(indices)

        datamodule.pool_dataloader = pool_dataloader


class SignalBeforeCheckpoint(Checkpoint):
    """Signal the process at the end of ``epoch``, after the round's records, before ModelCheckpoint saves.

    A ``Checkpoint`` subclass, so Lightning runs it after all other callbacks, in list order among checkpoint
    callbacks: put it before the ``ModelCheckpoint`` in ``trainer.callbacks``.
    """

    def __init__(self, epoch: int, marker: str, signal_name: str = "SIGKILL") -> None:
        self.epoch, self.marker, self.signal_name = epoch, marker, signal_name

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            _fire(self.marker, self.signal_name)


class Throttle(Callback):
    """Sleep after every training batch, so that an outside signal finds the run still going."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)
