r"""
Strategy Training
^^^^^^^^^^^^^^^^^

The base of the callbacks that train an acquisition strategy's own networks beside the classifier:
:class:`~saal_lightning.callbacks.LossPredictionTraining` (LL4AL's loss-prediction module, trained on every
training batch) and :class:`~saal_lightning.callbacks.VAALTraining` (VAAL's VAE and discriminator, trained at every
round end). Like Lightning's ``StochasticWeightAveraging``, such a callback owns its networks: it builds them,
moves them to the model's device, trains them and keeps them in its :meth:`state_dict`, which Lightning writes
into every checkpoint and restores on resume.

How one gets into a run: the strategy returns it from
:meth:`~saal_lightning.acquisition.strategies.AcquisitionStrategy.training_callback`, and the
:class:`~saal_lightning.callbacks.AcquisitionCallback` attaches it at setup (:meth:`StrategyTraining.attach`):
it adds it to ``trainer.callbacks``, just after itself, when it is not there already. So ``strategy: ll4al`` (in
YAML, on the command line or ``AcquisitionCallback("ll4al")`` in Python) needs no callback added by hand.

What it learns of the rounds: Lightning's hooks, the acquisition callback's public ``current_round`` and
``reset_weights``, and one hook Lightning does not have, :meth:`StrategyTraining.on_acquisition_start`, which
the acquisition callback calls after a round's training, just before it scores the pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from saal_lightning.callbacks.resume_checks import ResumeMismatchError

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from saal_lightning.callbacks.acquisition_callback import AcquisitionCallback


class StrategyTraining(Callback):
    """A callback that trains an acquisition strategy's own networks, attached by the ``AcquisitionCallback``.

    Subclasses keep a non-empty :meth:`state_dict` from the start (Lightning does not save an empty one), so that
    a checkpoint without it is known to be one this run cannot resume exactly: resuming from it is refused in
    :meth:`on_load_checkpoint`, instead of silently training fresh networks.
    """

    def __init__(self) -> None:
        self._acquisition: AcquisitionCallback | None = None

    @property
    def acquisition(self) -> AcquisitionCallback:
        """The acquisition callback this callback serves (set by :meth:`attach`)."""
        if self._acquisition is None:
            raise MisconfigurationException(
                f"{type(self).__name__} trains the networks of an acquisition strategy and is added to the trainer "
                "by the AcquisitionCallback whose strategy owns it: pass the strategy to AcquisitionCallback "
                "instead of adding this callback yourself."
            )
        return self._acquisition

    def attach(self, trainer: pl.Trainer, acquisition: AcquisitionCallback) -> None:
        """Serve ``acquisition``: add this callback to ``trainer.callbacks`` just after it, unless it is there.

        Called by the acquisition callback in its ``setup`` hook, before Lightning restores callback states from
        a checkpoint; Lightning calls the hooks of every callback in ``trainer.callbacks`` from then on, in order.

        Raises:
            MisconfigurationException: when ``trainer.callbacks`` holds another callback of this class (its state
                would be mistaken for this one's in checkpoints).
        """
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set at run time
        if any(isinstance(callback, type(self)) and callback is not self for callback in callbacks):
            raise MisconfigurationException(
                f"trainer.callbacks holds a {type(self).__name__} of its own, but the acquisition strategy brings "
                "the one it scores with (the AcquisitionCallback adds it): remove yours from trainer.callbacks."
            )
        if self not in callbacks:
            callbacks.insert(callbacks.index(acquisition) + 1, self)
        self._acquisition = acquisition

    def on_acquisition_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: Any) -> None:
        """Called by the acquisition callback on every rank after a round's training, just before it scores the
        pool of that round (``datamodule`` holds the round's split). Nothing by default."""

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks", {})
        if self.state_key not in states:
            raise ResumeMismatchError(
                f"Refusing to resume from {trainer.ckpt_path}: it holds no {self.state_key} state (callback states "
                f"found: {sorted(states) or 'none'}), so what the acquisition strategy's own networks learned before "
                "it is lost, and the resumed run would train them afresh. Resume from a checkpoint written with "
                "this strategy by this version, or start a new run without ckpt_path."
            )
