"""Uniform random acquisition: the baseline every strategy must beat."""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.selection import uniform_random
from saal_lightning.acquisition.strategies.base import AcquisitionStrategy


class RandomSampling(AcquisitionStrategy):
    """Pick ``query_size`` pool items uniformly at random (no model call).

    The draw uses the callback's own generator, so it is reproducible and leaves the training RNG alone.

    Example::

        >>> strategy = RandomSampling()
        >>> positions = strategy.select(torch.zeros(100), 10, torch.Generator().manual_seed(0))
        >>> len(set(positions.tolist()))
        10
    """

    name = "random"
    ranks_by_score = False

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        # Random sampling ignores the model; a zero score per item keeps the gather logic uniform.
        return torch.zeros(inputs.shape[0], device=inputs.device)

    def select(
        self,
        pool_outputs: torch.Tensor,
        query_size: int,
        generator: torch.Generator,
        labeled_outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return uniform_random(pool_outputs.shape[0], query_size, generator)
