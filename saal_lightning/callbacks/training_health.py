"""Stop an active-learning run whose training diverged, before it spends labels on a broken model.

A diverged model still produces scores: a plain-ball SAAL score of ``-0.0`` for every item, or NaN, and a top-k
over them labels whatever sorts first. Both checks here run on every rank and reduce across ranks, so under DDP
every rank stops together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl


class TrainingDivergedError(RuntimeError):
    """The training loss or the model's parameters are no longer finite."""


def batch_loss(outputs: Any) -> torch.Tensor | None:
    """The loss a ``training_step`` returned: a tensor, or the ``"loss"`` entry of a dict; ``None`` otherwise."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs.detach() if isinstance(outputs, torch.Tensor) else None


class NonFiniteLossCounter:
    """Counts the training batches of an epoch whose loss was NaN or infinite, without a device sync per batch."""

    def __init__(self) -> None:
        self._bad: torch.Tensor | None = None
        self._batches = 0

    def update(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss)).sum()
        self._bad = bad if self._bad is None else self._bad + bad
        self._batches += 1

    def check(self, trainer: pl.Trainer, round_index: int) -> None:
        """Raise :class:`TrainingDivergedError` when any rank saw a non-finite loss this epoch; then reset."""
        bad = self._bad if self._bad is not None else torch.zeros((), device=trainer.strategy.root_device)
        bad_total = int(trainer.strategy.reduce(bad.float(), reduce_op="sum"))
        batches = self._batches
        self._bad, self._batches = None, 0
        if bad_total:
            raise TrainingDivergedError(
                f"Training diverged in round {round_index}, epoch {trainer.current_epoch}: the training loss was "
                f"NaN or infinite in {bad_total} batch(es) (of {batches} on this rank). No labels were acquired "
                "from this model. Lower the learning rate (or use gradient clipping) and start the run again."
            )


def check_finite_parameters(model: nn.Module, round_index: int) -> None:
    """Raise :class:`TrainingDivergedError` when a parameter or buffer of ``model`` holds NaN or infinity."""
    broken = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        listed = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise TrainingDivergedError(
            f"Training diverged in round {round_index}: the model's {listed} hold NaN or infinite values after "
            "training, so its acquisition scores would mean nothing. Lower the learning rate and start again."
        )
