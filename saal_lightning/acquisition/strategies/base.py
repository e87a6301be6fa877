"""The interface every acquisition strategy implements.

A round's acquisition has two phases, so that it can be sharded across DDP ranks:

1. :meth:`AcquisitionStrategy.compute` runs on every rank over that rank's shard of the sampled pool (and, when
   :attr:`AcquisitionStrategy.needs_labeled` is set, over the labeled set), one batch at a time, with the model in
   eval mode. It returns one row per input: a score (shape ``[B]``) or a feature vector (shape ``[B, D]``).
2. :meth:`AcquisitionStrategy.select` runs on rank 0 over the outputs gathered from all ranks, in pool order, and
   returns the *positions* (into the sampled pool) of the items to label. The default picks the top-k scores.

A strategy that owns networks of its own (LL4AL's loss predictor, VAAL's VAE and discriminator) has them trained
by a Lightning callback, returned by :meth:`AcquisitionStrategy.training_callback`, which holds their state; the
acquisition callback adds that callback to the trainer (see :mod:`saal_lightning.callbacks.strategy_training`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from saal_lightning.acquisition.selection import top_k

if TYPE_CHECKING:
    from saal_lightning.callbacks.strategy_training import StrategyTraining


class AcquisitionStrategy:
    """Base class of acquisition strategies; subclasses implement :meth:`compute`.

    Attributes:
        name: the registry name, shown in logs and written to ``rounds.csv``.
        needs_labeled: whether :meth:`select` needs :meth:`compute`'s outputs on the labeled set as well.
        needs_grad: whether :meth:`compute` needs autograd (it is otherwise run under ``torch.no_grad()``).
        ranks_by_score: whether :meth:`compute`'s outputs are meant to rank the items (the callback warns when
            such scores are all equal); ``False`` for strategies that ignore them (random sampling).
    """

    name: str = "base"
    needs_labeled: bool = False
    needs_grad: bool = False
    ranks_by_score: bool = True

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Score (``[B]``) or embed (``[B, D]``) one batch of inputs; ``model`` is in eval mode."""
        raise NotImplementedError

    def select(
        self,
        pool_outputs: torch.Tensor,
        query_size: int,
        generator: torch.Generator,
        labeled_outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``query_size`` distinct positions into ``pool_outputs``; the default takes the top-k scores
        (ties broken at random with ``generator``)."""
        return top_k(pool_outputs, query_size, generator)

    def training_callback(self) -> StrategyTraining | None:
        """The callback that trains this strategy's own networks, or ``None`` (the default: the strategy reads the
        classifier only).

        The acquisition callback attaches it at setup, adding it to ``trainer.callbacks`` when it is not there;
        return the same instance every time, since it holds what the networks learned.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
