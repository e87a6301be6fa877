"""Uncertainty sampling on the softmax output: entropy (Shannon 1948), margin and least confidence."""

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


class Margin(AcquisitionStrategy):
    """Label the items with the smallest gap between the two most probable classes.

    score(x) = -(p_1 - p_2), with p_1 >= p_2 the two largest softmax probabilities, so that the top-k scores are
    the smallest margins.

    Reference: Scheffer, Decomain & Wrobel, "Active hidden Markov models for information extraction" (IDA 2001);
    the ``MarginSampling`` baseline of DeepAL, DISTIL and baal.

    Example::

        >>> Margin().compute(nn.Identity(), torch.tensor([[0.0, 0.0, -9.0], [4.0, 0.0, 0.0]])).round(decimals=3)
        tensor([ 0.0000, -0.9470])
    """

    name = "margin"

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        if logits.shape[-1] < 2:
            raise ValueError(f"margin sampling needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
        top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
        return top2[:, 1] - top2[:, 0]


class LeastConfidence(AcquisitionStrategy):
    """Label the items whose most probable class is least probable: the variation ratio ``1 - max_j p_j``.

    Reference: Freeman, "Elementary Applied Statistics" (1965) for the variation ratio; the SAAL paper's
    f_acq^Var (section 2.2); Lewis & Gale (SIGIR 1994) for least-confidence sampling.

    Example::

        >>> LeastConfidence().compute(nn.Identity(), torch.tensor([[0.0, 0.0], [10.0, 0.0]])).round(decimals=3)
        tensor([0.5000, 0.0000])
    """

    name = "least_confidence"

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.softmax(model(inputs).float(), dim=-1).amax(dim=-1)
