"""Spearman's rank correlation, with tied values given their average rank (as ``scipy.stats.spearmanr``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor (float64); tied values share the mean of the ranks they span.

    Example::

        >>> average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    values = torch.as_tensor(values).detach().double().flatten().cpu()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    start = 0
    n = len(values)
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman_correlation(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float]) -> float:
    """Spearman's rho of two equally long 1-D sequences: the Pearson correlation of their average ranks.

    ``nan`` when fewer than two items are given or either sequence is constant (no ranking to compare), or when a
    value is not finite.

    Example::

        >>> round(spearman_correlation([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 20.0, 40.0]), 6)  # a tie in the second
        0.948683
    """
    x, y = torch.as_tensor(a).detach().double().flatten(), torch.as_tensor(b).detach().double().flatten()
    if x.shape != y.shape:
        raise ValueError(f"spearman_correlation needs two sequences of one length, got {len(x)} and {len(y)}")
    if len(x) < 2 or not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.square().sum().sqrt() * ry.square().sum().sqrt())
    if denominator == 0:
        return math.nan
    return float((rx * ry).sum()) / denominator
