"""Coreset: k-center greedy against brute force, and the penultimate-feature embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saal_lightning.acquisition.functional.head import forward_last_linear
from saal_lightning.acquisition.selection import k_center_greedy
from saal_lightning.acquisition.strategies.coreset import Coreset
from saal_lightning.models.backbones import small_cnn


def brute_force_min_distances(pool: torch.Tensor, centres: list[torch.Tensor]) -> list[float]:
    """Distance of every pool item to its nearest centre, one pair at a time."""
    return [min(float(torch.sqrt(((item - centre) ** 2).sum())) for centre in centres) for item in pool]


@pytest.mark.parametrize("num_labeled", [0, 1, 6])
def test_greedy_pick_maximises_the_min_distance_at_every_step(num_labeled):
    generator = torch.Generator().manual_seed(num_labeled)
    pool = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    labeled = torch.randn(num_labeled, 3, generator=generator, dtype=torch.float64)
    picks = k_center_greedy(pool, 12, labeled).tolist()
    assert len(set(picks)) == 12
    centres = list(labeled)
    for step, pick in enumerate(picks):
        if centres:
            distances = brute_force_min_distances(pool, centres)
            assert distances[pick] == pytest.approx(max(distances), abs=1e-9), f"step {step}"
        else:
            # No centre yet: the first pick is the item farthest from the pool's mean.
            assert pick == int(torch.argmax(((pool - pool.mean(0)) ** 2).sum(1)))
        centres.append(pool[pick])


def test_greedy_on_a_line_is_exact():
    pool = torch.tensor([[0.0], [1.0], [5.0], [9.0], [10.0]])
    assert k_center_greedy(pool, 3, torch.tensor([[0.0]])).tolist() == [4, 2, 1]


def test_greedy_never_repeats_when_everything_is_covered():
    pool = torch.zeros(5, 2)
    assert sorted(k_center_greedy(pool, 5, torch.zeros(3, 2)).tolist()) == [0, 1, 2, 3, 4]


def test_greedy_chunking_does_not_change_the_result():
    generator = torch.Generator().manual_seed(0)
    pool, labeled = torch.randn(30, 4, generator=generator), torch.randn(17, 4, generator=generator)
    assert k_center_greedy(pool, 8, labeled, chunk_size=3).tolist() == k_center_greedy(pool, 8, labeled).tolist()


def test_greedy_validates_its_inputs():
    with pytest.raises(ValueError, match="cannot select 4 items from a pool of 3"):
        k_center_greedy(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="2 dimensions"):
        k_center_greedy(torch.zeros(3, 3), 1, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        k_center_greedy(torch.tensor([[float("nan")], [0.0]]), 1)


def test_coreset_embedding_is_the_input_of_the_head():
    torch.manual_seed(0)
    model = small_cnn(num_classes=5, in_channels=1).eval()
    inputs = torch.randn(3, 1, 28, 28)
    expected = torch.relu(model.hidden(model.features(inputs)))
    torch.testing.assert_close(Coreset().compute(model, inputs), expected)
    assert not any(module._forward_hooks for module in model.modules())


def test_last_linear_follows_execution_not_registration_order():
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(6, 2)
            self.body = nn.Linear(3, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.body(x)))

    model = HeadFirst()
    inputs = torch.randn(4, 3)
    last = forward_last_linear(model, inputs)
    assert last.layer is model.head and last.is_output
    torch.testing.assert_close(last.features, torch.tanh(model.body(inputs)))


def test_coreset_needs_a_linear_layer():
    with pytest.raises(ValueError, match="no nn.Linear"):
        Coreset().compute(nn.Sequential(nn.Flatten(), nn.Identity()), torch.zeros(2, 3))


def test_coreset_selects_the_uncovered_cluster(mlp):
    # Labeled items sit in one cluster; the greedy picks must come from the far one first.
    generator = torch.Generator().manual_seed(0)
    near, far = torch.randn(20, 4, generator=generator), torch.randn(5, 4, generator=generator) + 40.0
    strategy = Coreset()
    labeled = strategy.compute(mlp, torch.randn(10, 4, generator=generator))
    pool = strategy.compute(mlp, torch.cat([near, far]))
    picks = strategy.select(pool, 2, torch.Generator(), labeled)
    assert all(pick >= 20 for pick in picks.tolist())


def test_coreset_arguments():
    assert Coreset.needs_labeled
    with pytest.raises(ValueError, match="chunk_size"):
        Coreset(chunk_size=0)
