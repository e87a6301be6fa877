"""Uncertainty sampling on the softmax output: entropy (Shannon 1948)."""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.strategies.base import AcquisitionStrategy


def predictive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per row, in nats (``-sum p log p``, with ``0 log 0 = 0``)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


class Entropy(AcquisitionStrategy):
    """Label the items whose predictive distribution has the highest entropy.

    Reference: Shannon (1948); the "Entropy" baseline of the SAAL paper's Table 1.

    Example::

        >>> Entropy().compute(nn.Identity(), torch.tensor([[0.0, 0.0], [10.0, 0.0]])).round(decimals=3)
        tensor([0.6930, 0.0000])
    """

    name = "entropy"

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return predictive_entropy(model(inputs))
