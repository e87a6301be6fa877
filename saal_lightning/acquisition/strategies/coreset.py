"""Coreset: k-center greedy on penultimate-layer embeddings (Sener & Savarese, ICLR 2018)."""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.functional.features import penultimate_features
from saal_lightning.acquisition.selection import k_center_greedy
from saal_lightning.acquisition.strategies.base import AcquisitionStrategy
from saal_lightning.option_checks import check_int


class Coreset(AcquisitionStrategy):
    """Label the pool items that best cover the labeled ∪ pool set in the model's penultimate-feature space.

    ``compute`` embeds an item as the input of the classifier head
    (:func:`~saal_lightning.acquisition.functional.penultimate_features`, so any classifier with a linear head
    works). ``select`` is the greedy k-center 2-approximation (the paper's Algorithm 1,
    :func:`~saal_lightning.acquisition.selection.k_center_greedy`): repeatedly take the pool item farthest from its
    nearest labeled-or-picked item. The paper's robust mixed-integer refinement (which needs a MIP solver) is not
    implemented.

    Reference: Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set Approach"
    (ICLR 2018); the "Coreset" baseline of the SAAL paper's Table 1.

    Args:
        chunk_size: labeled items compared with the whole pool at once in :func:`k_center_greedy`.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> strategy = Coreset()
        >>> pool, labeled = strategy.compute(model, torch.randn(50, 4)), strategy.compute(model, torch.randn(5, 4))
        >>> strategy.select(pool, 10, torch.Generator(), labeled).shape
        torch.Size([10])
    """

    name = "coreset"
    needs_labeled = True

    def __init__(self, chunk_size: int = 1024) -> None:
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return penultimate_features(model, inputs)

    def select(
        self,
        pool_outputs: torch.Tensor,
        query_size: int,
        generator: torch.Generator,
        labeled_outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return k_center_greedy(pool_outputs, query_size, labeled_outputs, chunk_size=self.chunk_size)

    def __repr__(self) -> str:
        return f"Coreset(chunk_size={self.chunk_size})"
