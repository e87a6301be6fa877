"""BADGE: k-means++ seeding on last-layer gradient embeddings (Ash et al., ICLR 2020)."""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.functional.gradient_embedding import (
    gradient_embedding_factors,
    pack_factors,
    unpack_factors,
)
from saal_lightning.acquisition.selection import kmeans_pp_seeding
from saal_lightning.acquisition.strategies.base import AcquisitionStrategy


class BADGE(AcquisitionStrategy):
    """Label a diverse set of uncertain items: k-means++ seeding on gradient embeddings.

    ``compute`` embeds each pool item as the gradient of its pseudo-label loss w.r.t. the classifier head
    (:func:`~saal_lightning.acquisition.functional.gradient_embedding`), kept as its two packed factors so that the
    pool needs ``C + D + 2`` numbers per item, not ``C * (D + 1)``; its norm grows with the model's uncertainty and
    its direction encodes the features. ``select`` is k-means++ seeding
    (:func:`~saal_lightning.acquisition.selection.kmeans_pp_seeding`): the first pick is the largest embedding,
    each later one is drawn with probability proportional to its squared distance to the nearest pick, using the
    callback's generator. No item is drawn twice: picked items get probability 0 (the first release of the
    reference code could repeat one, JordanAsh/badge#5; it later re-drew instead).

    Reference: Ash, Zhang, Krishnamurthy, Langford & Agarwal, "Deep Batch Active Learning by Diverse, Uncertain
    Gradient Lower Bounds" (ICLR 2020); the "BADGE" baseline of the SAAL paper's Table 1.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> strategy = BADGE()
        >>> embeddings = strategy.compute(model, torch.randn(50, 4))
        >>> strategy.select(embeddings, 10, torch.Generator().manual_seed(0)).unique().numel()
        10
    """

    name = "badge"

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return pack_factors(gradient_embedding_factors(model, inputs))

    def select(
        self,
        pool_outputs: torch.Tensor,
        query_size: int,
        generator: torch.Generator,
        labeled_outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kmeans_pp_seeding(unpack_factors(pool_outputs), query_size, generator)
