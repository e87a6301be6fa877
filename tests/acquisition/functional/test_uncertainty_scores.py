"""The functional uncertainty scores, pinned on hand-computed probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from saal_lightning.acquisition.functional import entropy_scores, least_confidence_scores, margin_scores

PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])
LOGITS = PROBS.log() - 3.0  # softmax is shift-invariant: every score must recover PROBS


def test_entropy_in_nats():
    expected = [-sum(p * math.log(p) for p in row) for row in PROBS.tolist()]
    torch.testing.assert_close(entropy_scores(LOGITS), torch.tensor(expected))
    assert entropy_scores(LOGITS)[3].item() == pytest.approx(math.log(3), rel=1e-6)  # uniform: log C
    assert entropy_scores(torch.tensor([[50.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-19)


def test_margin_is_minus_the_top2_gap():
    torch.testing.assert_close(margin_scores(LOGITS), torch.tensor([-0.2, 0.0, -0.85, 0.0]))
    with pytest.raises(ValueError) as error:
        margin_scores(torch.zeros(3, 1))
    assert str(error.value) == "margin sampling needs at least 2 classes, got logits of shape (3, 1)"


def test_least_confidence_is_the_variation_ratio():
    torch.testing.assert_close(least_confidence_scores(LOGITS), torch.tensor([0.5, 0.6, 0.1, 2 / 3]))


def test_half_precision_logits_are_scored_in_float32():
    scores = entropy_scores(LOGITS.to(torch.bfloat16))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, entropy_scores(LOGITS), rtol=0.02, atol=0.0)
