"""Callbacks that compare metrics across epochs, in an experiment whose rounds must not be compared.

Each round trains on a different labeled set, usually from re-initialised weights, so "the best val_loss so far"
or "no improvement for 3 epochs" across a round boundary compares two different models: an ``EarlyStopping``
would end the whole experiment after round 0, a ``ModelCheckpoint(monitor=...)`` would keep a round-0 model as
"best", and ``ReduceLROnPlateau`` would lower the learning rate of round 5 for round 4's plateau.

* One round per fit: ``EarlyStopping`` restarts at every round (its state is reset to the state it had when
  first seen); a monitoring ``ModelCheckpoint`` must be a new one per fit; a plateau scheduler is new with every
  fit anyway.
* Rounds inside one fit: ``EarlyStopping`` and a monitoring ``ModelCheckpoint`` are refused (the fit is the whole
  experiment); a plateau scheduler restarts with the weight reset, and is refused without one.
"""

from __future__ import annotations

from copy import deepcopy
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim.lr_scheduler import ReduceLROnPlateau

if TYPE_CHECKING:
    import lightning.pytorch as pl

PER_FIT_HINT = ("use one fit per round (AcquisitionCallback(epochs_per_round=None) in your own loop of "
                "trainer.fit calls), where every round's training is a fit of its own")


def refuse_watchers_in_one_fit(trainer: pl.Trainer) -> None:
    """Rounds inside one fit: refuse callbacks that would compare or stop across rounds."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's callback connector
        if isinstance(callback, EarlyStopping):
            raise MisconfigurationException(
                f"EarlyStopping(monitor={callback.monitor!r}) cannot be used with the AcquisitionCallback's "
                "rounds inside one fit: it would stop the whole experiment when one round stops improving. "
                f"Remove it, or {PER_FIT_HINT}: the callback restarts EarlyStopping at every round."
            )
        if isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
            raise MisconfigurationException(
                f"ModelCheckpoint(monitor={callback.monitor!r}) would rank checkpoints of different rounds "
                "(different labeled sets, reset weights) against each other. Use ModelCheckpoint(save_last=True) "
                f"without monitor for resumable round checkpoints, or {PER_FIT_HINT}, with a new ModelCheckpoint "
                "per fit."
            )


def refuse_plateau_schedulers_without_reset(trainer: pl.Trainer) -> None:
    """Rounds inside one fit without weight reset: nothing would restart a plateau scheduler between rounds."""
    for config in trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, ReduceLROnPlateau):
            raise MisconfigurationException(
                "ReduceLROnPlateau compares a monitored metric across epochs; with the AcquisitionCallback's "
                "rounds inside one fit and reset_weights=False nothing restarts it between rounds, so it would "
                f"compare rounds with different labeled sets. Use reset_weights=True (it restarts the scheduler "
                f"too), or {PER_FIT_HINT}."
            )


class PerRoundWatchers:
    """One round per fit: restart ``EarlyStopping`` at every round; refuse a reused monitoring checkpoint."""

    def __init__(self) -> None:
        # The state each EarlyStopping had when first seen (before it watched any round), by object identity. The
        # object is kept too: a freed one's id could be reused by a new EarlyStopping, which would then get the
        # old one's state (patience included).
        self._fresh_states: dict[int, tuple[EarlyStopping, dict[str, Any]]] = {}

    def start_round(self, trainer: pl.Trainer, round_index: int) -> None:
        for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's callback connector
            if isinstance(callback, EarlyStopping):
                _, fresh = self._fresh_states.setdefault(id(callback), (callback, deepcopy(callback.state_dict())))
                callback.load_state_dict(deepcopy(fresh))
            elif isinstance(callback, ModelCheckpoint) and callback.monitor is not None and callback.best_k_models:
                raise MisconfigurationException(
                    f"ModelCheckpoint(monitor={callback.monitor!r}) still ranks the checkpoints of an earlier "
                    f"round, so round {round_index} would compete with models trained on other labeled sets. "
                    "Create a new ModelCheckpoint for every fit (with a dirpath per round)."
                )
