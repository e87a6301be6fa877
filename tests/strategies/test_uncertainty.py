"""Margin and least-confidence sampling: scores pinned on hand-computed probabilities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saal_lightning.acquisition.strategies.uncertainty import LeastConfidence, Margin

PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.9, 0.05, 0.05], [0.1, 0.6, 0.3]])
LOGITS = PROBS.log() + 7.0  # softmax is shift-invariant: the strategies must recover PROBS


def test_margin_is_minus_the_top2_gap():
    scores = Margin().compute(nn.Identity(), LOGITS)
    torch.testing.assert_close(scores, torch.tensor([-0.2, 0.0, -0.85, -0.3]))


def test_margin_selects_smallest_gaps_first():
    strategy = Margin()
    positions = strategy.select(strategy.compute(nn.Identity(), LOGITS), 3, torch.Generator())
    assert positions.tolist() == [1, 0, 3]


def test_margin_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        Margin().compute(nn.Identity(), torch.zeros(3, 1))


def test_least_confidence_is_the_variation_ratio():
    scores = LeastConfidence().compute(nn.Identity(), LOGITS)
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.6, 0.1, 0.4]))


def test_least_confidence_selects_least_confident_first():
    strategy = LeastConfidence()
    positions = strategy.select(strategy.compute(nn.Identity(), LOGITS), 2, torch.Generator())
    assert positions.tolist() == [1, 0]


def test_uncertainty_scores_run_through_a_model(mlp):
    inputs = torch.randn(7, 4)
    probs = torch.softmax(mlp(inputs), dim=1)
    top2 = probs.sort(dim=1, descending=True).values[:, :2]
    torch.testing.assert_close(Margin().compute(mlp, inputs), top2[:, 1] - top2[:, 0])
    torch.testing.assert_close(LeastConfidence().compute(mlp, inputs), 1 - top2[:, 0])
