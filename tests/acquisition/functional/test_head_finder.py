"""One head finder for every path: a model that registers its head first gets correct BADGE embeddings, coreset
features and ``method="last_layer"`` scores (each against a direct computation), and bad heads are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.reference_loop import reference_saal_scores  # the repository root is on sys.path (tests/conftest.py)
from saal_lightning.acquisition.functional import (
    forward_last_linear,
    gradient_embedding,
    penultimate_features,
    saal_scores,
    unpack_factors,
)
from saal_lightning.acquisition.strategies import BADGE, SAAL, Coreset

DTYPE = torch.float64


class HeadFirst(nn.Module):
    """The head is registered before the body, so the last *registered* nn.Linear is the body, not the head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.fixture
def head_first() -> tuple[HeadFirst, torch.Tensor]:
    torch.manual_seed(0)
    return HeadFirst().to(DTYPE).eval(), torch.randn(5, 4, dtype=DTYPE)


def head_gradients_by_autograd(model: HeadFirst, inputs: torch.Tensor) -> torch.Tensor:
    """Per item: d CE(logits, argmax logits) / d (head.weight, head.bias), one item at a time."""
    rows = []
    for item in inputs:
        logits = model(item.unsqueeze(0))
        grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), [model.head.weight, model.head.bias])
        rows.append(torch.cat([grad.flatten() for grad in grads]))
    return torch.stack(rows)


def test_the_head_is_the_last_linear_that_runs(head_first):
    model, inputs = head_first
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is model.body  # the trap
    found = forward_last_linear(model, inputs)
    assert found.layer is model.head and found.is_output
    torch.testing.assert_close(found.features, torch.tanh(model.body(inputs)), rtol=0, atol=0)
    assert not any(module._forward_hooks for module in model.modules())


def test_badge_and_coreset_use_the_head_that_runs(head_first):
    model, inputs = head_first
    expected = head_gradients_by_autograd(model, inputs)
    torch.testing.assert_close(gradient_embedding(model, inputs), expected.float(), rtol=1e-6, atol=1e-7)
    # BADGE's packed factors hold the same numbers: residual ⊗ [h, 1], with dL/dW = residual h^T, dL/db = residual.
    left, right = unpack_factors(BADGE().compute(model, inputs))
    torch.testing.assert_close(left, expected[:, 18:].float(), rtol=1e-6, atol=1e-7)
    outer = left.unsqueeze(2) * right.unsqueeze(1)
    torch.testing.assert_close(outer[:, :, :6].flatten(1), expected[:, :18].float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(Coreset().compute(model, inputs), torch.tanh(model.body(inputs)).float())
    torch.testing.assert_close(penultimate_features(model, inputs), torch.tanh(model.body(inputs)).float())


@pytest.mark.parametrize("mode", ["max", "diff"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_last_layer_perturbs_the_head_that_runs(head_first, adaptive, mode):
    # Before one head finder, method="last_layer" took the body here and refused the model.
    model, inputs = head_first
    rho = 0.5
    expected = reference_saal_scores(model, inputs, rho, adaptive, mode,
                                     perturb=lambda name, param: name.startswith("head."))
    scores = saal_scores(model, inputs, rho=rho, adaptive=adaptive, mode=mode, method="last_layer")
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
    strategy = SAAL(rho=rho, adaptive=adaptive, mode=mode, method="last_layer")
    torch.testing.assert_close(strategy.compute(model, inputs), expected, rtol=1e-10, atol=1e-12)


def test_every_path_refuses_a_head_whose_output_is_not_the_logits():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    inputs = torch.randn(2, 4)
    message = ("needs the logits to come straight out of the classifier head (the last nn.Linear that runs); the "
               "output of that layer of Sequential is not what the model returns")
    with pytest.raises(ValueError) as badge_error:
        BADGE().compute(model, inputs)
    assert str(badge_error.value) == "the gradient embedding " + message
    with pytest.raises(ValueError) as last_layer_error:
        saal_scores(model, inputs, method="last_layer")
    assert str(last_layer_error.value) == "method='last_layer' " + message
    # Coreset only reads the head's input, whatever follows the head.
    torch.testing.assert_close(Coreset().compute(model, inputs), inputs)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError) as no_linear:
        forward_last_linear(nn.Sequential(nn.Flatten()), torch.zeros(2, 3))
    assert str(no_linear.value) == ("Sequential has no nn.Linear module: the classifier head is the last nn.Linear "
                                    "that runs in the forward, and its input the penultimate features")
    with pytest.raises(ValueError, match=r"got an input of shape \(2, 5, 4\); expected \[batch, features\]"):
        forward_last_linear(nn.Linear(4, 3), torch.zeros(2, 5, 4))
    frozen = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    frozen[2].requires_grad_(False)
    with pytest.raises(ValueError) as frozen_head:
        saal_scores(frozen, torch.randn(2, 4), method="last_layer")
    assert str(frozen_head.value) == ("method='last_layer': the classifier head (the last nn.Linear that runs) has "
                                      "no trainable parameters")


def test_hooks_are_removed_when_the_forward_raises():
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.head(x)
            raise RuntimeError("out of memory (simulated)")

    model = Fails()
    with pytest.raises(RuntimeError, match="simulated"):
        forward_last_linear(model, torch.zeros(1, 3))
    assert not model.head._forward_hooks
