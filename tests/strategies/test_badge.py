"""BADGE: the closed-form gradient embedding against autograd, and k-means++ seeding's D² distribution."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from saal_lightning.acquisition.functional.gradient_embedding import (
    gradient_embedding,
    gradient_embedding_factors,
    pack_factors,
    unpack_factors,
)
from saal_lightning.acquisition.selection import OuterProducts, kmeans_pp_seeding
from saal_lightning.acquisition.strategies.badge import BADGE
from saal_lightning.models.backbones import small_cnn
from tests.strategies.embedding_layout import dense_in_embedding_order


def autograd_embedding(model: nn.Module, head: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """Per item: d CE(logits, argmax logits) / d (head.weight, head.bias), by autograd."""
    rows = []
    for item in inputs:
        logits = model(item.unsqueeze(0))
        loss = F.cross_entropy(logits, logits.argmax(dim=1))
        params = [head.weight] if head.bias is None else [head.weight, head.bias]
        rows.append(torch.cat([grad.flatten() for grad in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("bias", [True, False])
def test_embedding_matches_autograd_on_an_mlp(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=bias)).eval()
    inputs = torch.randn(6, 4)
    embedding = gradient_embedding(model, inputs)
    assert embedding.shape == (6, 3 * 8 + (3 if bias else 0))
    torch.testing.assert_close(embedding, autograd_embedding(model, model[2], inputs))
    # The same numbers as factors, which is what BADGE gathers and seeds on: C + D (+1) numbers per item.
    factors = gradient_embedding_factors(model, inputs)
    assert factors.left.shape == (6, 3) and factors.right.shape == (6, 8 + bias)
    torch.testing.assert_close(dense_in_embedding_order(factors, bias), embedding)
    packed = pack_factors(factors)
    assert packed.shape == (6, 1 + 3 + 8 + bias)  # 100 classes x 512 features: 614 numbers instead of 51,300
    torch.testing.assert_close(unpack_factors(packed), factors)


def test_embedding_matches_autograd_on_small_cnn():
    torch.manual_seed(0)
    model = small_cnn(num_classes=4, in_channels=1).eval()
    inputs = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(gradient_embedding(model, inputs), autograd_embedding(model, model.head, inputs))


def test_embedding_refuses_a_head_whose_output_is_not_the_logits():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * self.head(x)

    with pytest.raises(ValueError, match="logits to come straight out"):
        gradient_embedding(Scaled(), torch.zeros(2, 4))


def test_first_pick_is_the_largest_norm_and_second_follows_d2():
    # First centre: [3, 0]. Squared distances of the others: 9, 4, 10.
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    draws = 3000
    counts = torch.zeros(4)
    for seed in range(draws):
        first, second = kmeans_pp_seeding(points, 2, torch.Generator().manual_seed(seed)).tolist()
        assert first == 2
        counts[second] += 1
    expected = torch.tensor([9.0, 4.0, 0.0, 10.0]) / 23.0
    # 3 standard errors of a frequency over 3000 draws is below 0.03.
    torch.testing.assert_close(counts / draws, expected, atol=0.03, rtol=0.0)


def test_seeding_is_reproducible_and_never_repeats():
    points = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    first = kmeans_pp_seeding(points, 30, torch.Generator().manual_seed(7))
    second = kmeans_pp_seeding(points, 30, torch.Generator().manual_seed(7))
    assert first.tolist() == second.tolist()
    assert sorted(first.tolist()) == list(range(30))


def test_seeding_fills_by_norm_when_fewer_distinct_points_than_picks():
    # Two distinct points: after both are centres every D² is 0, and the rest follow decreasing norm.
    points = torch.tensor([[0.0], [2.0], [2.0], [0.0], [2.0]])
    picks = kmeans_pp_seeding(points, 5, torch.Generator().manual_seed(0)).tolist()
    assert picks[0] == 1 and picks[1] in (0, 3)
    assert picks[2:] == [2, 4, 3 if picks[1] == 0 else 0]


def test_seeding_with_an_explicit_fill_order():
    points = torch.zeros(4, 1)
    generator = torch.Generator()
    assert kmeans_pp_seeding(points, 3, generator, fill_order=torch.tensor([3, 0, 2, 1])).tolist() == [0, 3, 2]
    with pytest.raises(ValueError, match="permutation"):
        kmeans_pp_seeding(points, 3, generator, fill_order=torch.tensor([0, 0, 1, 2]))


def test_badge_selects_distinct_high_gradient_items(mlp):
    inputs = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    strategy = BADGE()
    picks = strategy.select(strategy.compute(mlp, inputs), 10, torch.Generator().manual_seed(0))
    assert len(set(picks.tolist())) == 10
    assert picks[0] == int(torch.argmax(gradient_embedding(mlp, inputs).norm(dim=1)))


# ------------------------------------------------------------------------- factored embeddings (memory)


def test_outer_product_distances_match_dense_and_duplicates_are_exactly_zero():
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    right = torch.randn(20, 7, generator=generator, dtype=torch.float64)
    left[3], right[3] = left[0], right[0]  # an exact duplicate of point 0
    points = OuterProducts(left, right)
    dense = (left.unsqueeze(2) * right.unsqueeze(1)).flatten(1)
    for position in (0, 5, 19):
        expected = ((dense - dense[position]) ** 2).sum(1)
        torch.testing.assert_close(points.sq_distances_to(position), expected, rtol=1e-12, atol=1e-12)
    assert points.sq_distances_to(0)[[0, 3]].tolist() == [0.0, 0.0]
    torch.testing.assert_close(points.norms(), dense.norm(dim=1))


def test_factored_seeding_draws_what_dense_seeding_draws_on_a_trained_cnn():
    torch.manual_seed(0)
    model = small_cnn(num_classes=4, in_channels=1).eval()
    inputs = torch.randn(60, 1, 28, 28)
    dense = gradient_embedding(model, inputs).double()
    factors = gradient_embedding_factors(model, inputs)
    factors = OuterProducts(factors.left.double(), factors.right.double())
    for seed in range(20):
        expected = kmeans_pp_seeding(dense, 15, torch.Generator().manual_seed(seed))
        assert kmeans_pp_seeding(factors, 15, torch.Generator().manual_seed(seed)).tolist() == expected.tolist()


def test_factored_seeding_fills_by_norm_when_points_repeat():
    # Two distinct points, each twice: after both are centres every D² is exactly 0, as in the dense case.
    left, right = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 2.0]]), torch.ones(4, 1)
    picks = kmeans_pp_seeding(OuterProducts(left, right), 4, torch.Generator().manual_seed(0)).tolist()
    assert picks[0] == 1 and picks[1] in (0, 2) and sorted(picks) == [0, 1, 2, 3] and picks[2] == 3


def test_unpacking_refuses_outputs_that_were_not_packed():
    with pytest.raises(ValueError, match="not made by pack_factors"):
        unpack_factors(torch.randn(5, 10))
    with pytest.raises(ValueError, match="expected packed"):
        unpack_factors(torch.randn(5))
    rows = pack_factors(OuterProducts(torch.ones(2, 3), torch.ones(2, 4)))
    rows[1, 0] = 2.0  # two rows that disagree on C
    with pytest.raises(ValueError, match="same number of classes"):
        unpack_factors(rows)
