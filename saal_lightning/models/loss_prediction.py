"""LL4AL's loss-prediction module and its ranking loss (Yoo & Kweon, "Learning Loss for Active Learning", CVPR 2019).

The module reads intermediate feature maps of a classifier and predicts each item's loss; it is trained, beside
the classifier, by :class:`~saal_lightning.callbacks.LossPredictionTraining`, and scores the pool for the
:class:`~saal_lightning.acquisition.strategies.LL4AL` strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class LossPredictionModule(nn.Module):
    """Yoo & Kweon's loss-prediction module: per feature map GAP -> FC -> ReLU, then concat -> FC(1).

    Args:
        feature_dims: channels of each feature map (``[B, C, ...]``; maps with spatial dims are averaged over them).
        hidden_dim: width of each per-map FC layer (128 in the paper).

    Example::

        >>> module = LossPredictionModule([4, 8], hidden_dim=16)
        >>> module([torch.zeros(3, 4, 5, 5), torch.zeros(3, 8)]).shape
        torch.Size([3])
    """

    def __init__(self, feature_dims: Sequence[int], hidden_dim: int = 128) -> None:
        super().__init__()
        self.feature_dims = list(feature_dims)
        self.branches = nn.ModuleList(nn.Linear(dim, hidden_dim) for dim in feature_dims)
        self.out = nn.Linear(hidden_dim * len(feature_dims), 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = [feature.flatten(2).mean(dim=2) if feature.ndim > 2 else feature for feature in features]
        hidden = [F.relu(branch(x)) for branch, x in zip(self.branches, pooled, strict=True)]
        return self.out(torch.cat(hidden, dim=1)).squeeze(1)


def loss_ranking_loss(predicted: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Yoo & Kweon's pairwise margin ranking loss, pairing item ``i`` of the batch with item ``B - 1 - i``.

    For each pair, ``max(0, margin - sign(l_i - l_j) * (lhat_i - lhat_j))`` with sign = +1 if ``l_i > l_j``
    else -1 (ties count as -1, as in the widely used re-implementation
    Mephisto405/Learning-Loss-for-Active-Learning), averaged over the ``B // 2`` pairs; the middle item of an
    odd batch is left out. A batch of one item has no pair and gives a zero loss that still depends on
    ``predicted`` (so a backward pass works the same on every rank).

    Example::

        >>> loss_ranking_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
        tensor(0.)
        >>> loss_ranking_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))
        tensor(1.)
    """
    pairs = predicted.shape[0] // 2
    if pairs == 0:
        return predicted.sum() * 0.0
    predicted_diff = (predicted - predicted.flip(0))[:pairs]
    target_diff = (target - target.flip(0))[:pairs].detach()
    sign = torch.where(target_diff > 0, 1.0, -1.0).to(predicted_diff.dtype)
    return torch.clamp(margin - sign * predicted_diff, min=0.0).mean()
