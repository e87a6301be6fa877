"""SAAL with diversity: 1-D k-means++ on the scores (the authors' variant, fixed) and the gradient option."""

from __future__ import annotations

import pytest
import torch

from saal_lightning.acquisition.functional.gradient_embedding import gradient_embedding, pack_factors, unpack_factors
from saal_lightning.acquisition.selection import OuterProducts
from saal_lightning.acquisition.strategies.saal import SAAL
from saal_lightning.acquisition.strategies.saal_diverse import SAALDiverse
from tests.strategies.embedding_layout import dense_in_embedding_order


def second_pick_frequencies(strategy: SAALDiverse, outputs: torch.Tensor, first: int, draws: int = 3000):
    counts = torch.zeros(outputs.shape[0])
    for seed in range(draws):
        picks = strategy.select(outputs, 2, torch.Generator().manual_seed(seed)).tolist()
        assert picks[0] == first
        counts[picks[1]] += 1
    return counts / draws


def test_score_space_first_pick_is_the_largest_absolute_score():
    # A "diff" score can be negative; the authors' seeding starts from the largest |score|.
    picks = SAALDiverse().select(torch.tensor([0.1, -5.0, 2.0, 1.0]), 1, torch.Generator())
    assert picks.tolist() == [1]


def test_score_space_second_pick_follows_squared_score_gaps():
    # First centre 3.0; squared gaps of the others to it: 9, 4, 1.
    frequencies = second_pick_frequencies(SAALDiverse(), torch.tensor([3.0, 0.0, 1.0, 2.0]), first=0)
    torch.testing.assert_close(frequencies, torch.tensor([0.0, 9.0, 4.0, 1.0]) / 14.0, atol=0.03, rtol=0.0)


def test_score_space_falls_back_to_top_k_when_scores_run_out():
    # Two distinct values for four picks: after both are centres, the highest remaining scores fill in order.
    scores = torch.tensor([5.0, 5.0, 1.0, 5.0, 1.0])
    for seed in range(20):
        picks = SAALDiverse().select(scores, 4, torch.Generator().manual_seed(seed)).tolist()
        assert picks[0] == 0 and picks[1] in (2, 4)
        assert picks[2:] == [1, 3]


def test_score_space_picks_all_items_without_repeats():
    scores = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 7.0])
    picks = SAALDiverse().select(scores, 6, torch.Generator().manual_seed(0)).tolist()
    assert sorted(picks) == list(range(6))


def test_gradient_space_weights_embeddings_by_the_score():
    # Embeddings are unit vectors, scores [2, 0, 1, -3]: points 2*e0, origin, e2, origin (clamped).
    # First centre 2*e0; squared distances of the others: 4, 5, 4.
    unit_vectors = pack_factors(OuterProducts(torch.eye(4), torch.ones(4, 1)))  # e_i ⊗ [1] = e_i
    outputs = torch.cat([torch.tensor([[2.0], [0.0], [1.0], [-3.0]]), unit_vectors], dim=1)
    frequencies = second_pick_frequencies(SAALDiverse(space="gradient"), outputs, first=0)
    torch.testing.assert_close(frequencies, torch.tensor([0.0, 4.0, 5.0, 4.0]) / 13.0, atol=0.03, rtol=0.0)


def test_gradient_space_compute_is_score_then_embedding(mlp):
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    outputs = SAALDiverse(rho=0.05, adaptive=True, space="gradient").compute(mlp, inputs)
    torch.testing.assert_close(outputs[:, 0], SAAL(rho=0.05, adaptive=True).compute(mlp, inputs))
    embedding = dense_in_embedding_order(unpack_factors(outputs[:, 1:]))
    torch.testing.assert_close(embedding, gradient_embedding(mlp, inputs))
    picks = SAALDiverse(space="gradient").select(outputs, 3, torch.Generator().manual_seed(0))
    assert len(set(picks.tolist())) == 3


def test_score_space_compute_is_the_saal_score(mlp):
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(SAALDiverse(mode="diff").compute(mlp, inputs), SAAL(mode="diff").compute(mlp, inputs))


def test_select_checks_the_output_shape():
    with pytest.raises(ValueError, match="expects 2-D outputs"):
        SAALDiverse(space="gradient").select(torch.zeros(4), 2, torch.Generator())
    with pytest.raises(ValueError, match="expects 1-D outputs"):
        SAALDiverse().select(torch.zeros(4, 3), 2, torch.Generator())
    with pytest.raises(ValueError, match="NaN"):
        SAALDiverse().select(torch.tensor([1.0, float("nan")]), 1, torch.Generator())


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="space must be one of"):
        SAALDiverse(space="embedding")
    with pytest.raises(ValueError, match="rho must be positive"):
        SAALDiverse(rho=0.0)
    strategy = SAALDiverse(rho=0.1, adaptive=True, mode="diff", space="gradient")
    assert strategy.needs_grad and strategy.name == "saal_diverse"
    assert repr(strategy) == "SAALDiverse(rho=0.1, adaptive=True, mode='diff', space='gradient')"


def test_saal_strategy_passes_its_method_to_the_scorer(monkeypatch) -> None:
    import saal_lightning.acquisition.strategies.saal as saal_module

    seen = {}

    def fake_scores(model, inputs, **kwargs):
        seen.update(kwargs)
        return torch.zeros(len(inputs))

    monkeypatch.setattr(saal_module, "saal_scores", fake_scores)
    SAALDiverse(rho=0.1, adaptive=True, mode="diff", chunk_size=7, method="first_order").compute(
        torch.nn.Identity(), torch.zeros(3, 2))
    assert seen == {"rho": 0.1, "adaptive": True, "mode": "diff", "chunk_size": 7, "method": "first_order"}
    with pytest.raises(ValueError, match="method must be one of"):
        SAAL(method="loop")
