"""The interface every acquisition strategy implements.

A round's acquisition has two phases, so that it can be sharded across DDP ranks:

1. :meth:`AcquisitionStrategy.compute` runs on every rank over that rank's shard of the sampled pool (and, when
   :attr:`AcquisitionStrategy.needs_labeled` is set, over the labeled set), one batch at a time, with the model in
   eval mode. It returns one row per input: a score (shape ``[B]``) or a feature vector (shape ``[B, D]``).
2. :meth:`AcquisitionStrategy.select` runs on rank 0 over the outputs gathered from all ranks, in pool order, and
   returns the *positions* (into the sampled pool) of the items to label. The default picks the top-k scores.

Strategies that own extra networks (LL4AL, VAAL) use the lifecycle hooks :meth:`setup`,
:meth:`on_train_batch_end`, :meth:`on_round_end` and :meth:`on_weights_reset`, and keep their state in
:meth:`state_dict`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from saal_lightning.acquisition.selection import top_k

if TYPE_CHECKING:
    import lightning.pytorch as pl


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

    # Lifecycle hooks for strategies that own networks; the AcquisitionCallback forwards them.
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called once per fit, before training starts."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Called after every training batch (LL4AL trains its loss predictor here)."""

    def on_round_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: Any) -> None:
        """Called at the end of a round's training, before the pool is scored (VAAL trains here)."""

    def on_weights_reset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after the callback restored the model's initial weights (``reset_weights=True``); a strategy
        whose networks learn from the model's features (LL4AL) restarts them here too."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only: checkpoints load with ``weights_only=True``."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
