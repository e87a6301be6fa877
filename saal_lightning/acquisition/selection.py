"""Pure selection rules: turn gathered pool scores or embeddings into positions to label."""

from __future__ import annotations

import torch


def _check_query_size(num_items: int, query_size: int) -> None:
    if query_size < 1:
        raise ValueError(f"query_size must be a positive integer, got {query_size}")
    if query_size > num_items:
        raise ValueError(f"cannot select {query_size} items from a pool of {num_items}")


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest scores, highest first.

    Ties go to the lower position (a stable sort), so the choice is reproducible. NaN scores are refused: a
    NaN would silently sort first or last depending on the backend.

    Example::

        >>> top_k(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2)
        tensor([1, 3])
    """
    if scores.ndim != 1:
        raise ValueError(f"top_k expects one score per item (a 1-D tensor), got shape {tuple(scores.shape)}")
    _check_query_size(scores.numel(), k)
    if torch.isnan(scores).any():
        raise ValueError(f"{int(torch.isnan(scores).sum())} acquisition scores are NaN; refusing to select")
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    return order[:k]
