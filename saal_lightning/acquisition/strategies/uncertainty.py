"""Uncertainty sampling on the softmax output: entropy (Shannon 1948), margin and least confidence.

Each strategy is baal's heuristic: ``compute`` is a score of the logits from the functional layer
(:mod:`saal_lightning.acquisition.functional.uncertainty`), ``select`` the top-k of the scores.
"""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.functional.uncertainty import entropy_scores, least_confidence_scores, margin_scores
from saal_lightning.acquisition.strategies.base import AcquisitionStrategy


class Entropy(AcquisitionStrategy):
    """Label the items whose predictive distribution has the highest entropy (:func:`entropy_scores`).

    Reference: Shannon (1948); the "Entropy" baseline of the SAAL paper's Table 1.

    Example::

        >>> Entropy().compute(nn.Identity(), torch.tensor([[0.0, 0.0], [10.0, 0.0]])).round(decimals=3)
        tensor([0.6930, 0.0000])
    """

    name = "entropy"

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return entropy_scores(model(inputs))


class Margin(AcquisitionStrategy):
    """Label the items with the smallest gap between the two most probable classes (:func:`margin_scores`).

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
        return margin_scores(model(inputs))


class LeastConfidence(AcquisitionStrategy):
    """Label the items whose most probable class is least probable: the variation ratio ``1 - max_j p_j``
    (:func:`least_confidence_scores`).

    Reference: Freeman, "Elementary Applied Statistics" (1965) for the variation ratio; the SAAL paper's
    f_acq^Var (section 2.2); Lewis & Gale (SIGIR 1994) for least-confidence sampling.

    Example::

        >>> LeastConfidence().compute(nn.Identity(), torch.tensor([[0.0, 0.0], [10.0, 0.0]])).round(decimals=3)
        tensor([0.5000, 0.0000])
    """

    name = "least_confidence"

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return least_confidence_scores(model(inputs))
