"""Uncertainty scores of a softmax classifier, from its logits ``[B, C]``: higher means more uncertain.

Each is a function of ``softmax(logits)``, computed in float32 at least, so any shift of the logits gives the same
score. Ranking the scores (top-k) is uncertainty sampling, as baal's heuristics do.
"""

from __future__ import annotations

import torch


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def entropy_scores(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per row, in nats: ``-sum_j p_j log p_j`` (with ``0 log 0 = 0``).

    Reference: Shannon (1948).

    Example::

        >>> entropy_scores(torch.tensor([[0.0, 0.0], [10.0, 0.0]])).round(decimals=3)
        tensor([0.6930, 0.0000])
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def margin_scores(logits: torch.Tensor) -> torch.Tensor:
    """Minus the gap between the two largest probabilities, ``-(p_1 - p_2)``: the smallest margins score highest.

    Reference: Scheffer, Decomain & Wrobel, "Active hidden Markov models for information extraction" (IDA 2001).

    Raises:
        ValueError: for fewer than 2 classes.

    Example::

        >>> margin_scores(torch.tensor([[0.0, 0.0, -9.0], [4.0, 0.0, 0.0]])).round(decimals=3)
        tensor([ 0.0000, -0.9470])
    """
    if logits.shape[-1] < 2:
        raise ValueError(f"margin sampling needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
    top2 = _probabilities(logits).topk(2, dim=-1).values
    return top2[..., 1] - top2[..., 0]


def least_confidence_scores(logits: torch.Tensor) -> torch.Tensor:
    """The variation ratio ``1 - max_j p_j``: items whose most probable class is least probable score highest.

    Reference: Freeman, "Elementary Applied Statistics" (1965); Lewis & Gale (SIGIR 1994).

    Example::

        >>> least_confidence_scores(torch.tensor([[0.0, 0.0], [10.0, 0.0]])).round(decimals=3)
        tensor([0.5000, 0.0000])
    """
    return 1.0 - _probabilities(logits).amax(dim=-1)
