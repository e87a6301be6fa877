"""The pure diagnostics against direct computations on tiny models: full Hessians, per-item autograd loops."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from saal_lightning import saal_scores
from saal_lightning.diagnostics import (
    average_ranks,
    bound_terms,
    gradient_norms,
    margins,
    perturb,
    perturbed_losses,
    prediction_kept_fraction,
    relative_margin,
    spearman_correlation,
    top_hessian_eigenvalue,
)


def _mlp(seed: int = 0, scale: float = 1.0) -> nn.Module:
    """4 -> 5 -> 3 with tanh: 43 parameters, float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _conv(seed: int = 0) -> nn.Module:
    """Conv + eval-mode BatchNorm (non-trivial running statistics) + linear: 81 parameters, float64 (5x5 inputs)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


def _full_hessians(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Each item's Hessian of CE(f(x_i), y_i) over all parameters, by torch.autograd.functional.hessian."""
    model = copy.deepcopy(model).eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    buffers = dict(model.named_buffers())

    def loss_of(flat: torch.Tensor, i: int) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return F.cross_entropy(functional_call(model, (params, buffers), (x[i : i + 1],)), y[i : i + 1])

    return [torch.autograd.functional.hessian(lambda f, i=i: loss_of(f, i), flat0, vectorize=True)
            for i in range(len(x))]


def _snapshot(model: nn.Module) -> tuple:
    return ({m: m.training for m in model.modules()}, copy.deepcopy(model.state_dict()),
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def _assert_untouched(model: nn.Module, before: tuple) -> None:
    flags, state, grads = before
    assert {m: m.training for m in model.modules()} == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters()) and all(g is None for g in grads)


@pytest.mark.parametrize("make", [_mlp, _conv], ids=["mlp-43", "conv-bn-81"])
def test_top_eigenvalue_matches_eigvalsh_of_the_full_hessian(make) -> None:
    model = make()
    x = torch.randn(5, 4, dtype=torch.float64) if make is _mlp else torch.randn(5, 1, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1])
    hessians = _full_hessians(model, x, y)
    spectra = [torch.linalg.eigvalsh(h) for h in hessians]
    expected = torch.stack([s[-1] for s in spectra])
    size = hessians[0].shape[0]
    model.train()
    before = _snapshot(model)
    # As many Lanczos steps as parameters: the Krylov space is the whole space, the estimate exact to rounding.
    exact = top_hessian_eigenvalue(model, x, y, iterations=size, tolerance=0)
    torch.testing.assert_close(exact, expected, rtol=1e-9, atol=1e-10)
    # The defaults: 20 products at most, stopping at a relative residual of 1e-3.
    default = top_hessian_eigenvalue(model, x, y)
    assert ((default - expected).abs() / expected.abs()).max() < 1e-3
    assert (default <= expected + 1e-9).all()  # a Ritz value never exceeds the top eigenvalue
    _assert_untouched(model, before)


def test_top_eigenvalue_is_the_largest_even_when_a_negative_one_dominates() -> None:
    # Large weights and wrong labels give Hessians whose most negative eigenvalue is larger in magnitude than the
    # largest one, where power iteration would return the negative one.
    model = _mlp(seed=3, scale=4.0)
    torch.manual_seed(1)
    x = torch.randn(12, 4, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmin(dim=1)
    spectra = [torch.linalg.eigvalsh(h) for h in _full_hessians(model, x, y)]
    dominated = [i for i, s in enumerate(spectra) if -s[0] > s[-1]]
    assert dominated, "the case this test is about did not occur"
    estimate = top_hessian_eigenvalue(model, x, y, iterations=43, tolerance=0)
    torch.testing.assert_close(estimate, torch.stack([s[-1] for s in spectra]), rtol=1e-9, atol=1e-10)


def test_adaptive_top_eigenvalue_is_that_of_the_rescaled_hessian_and_pseudo_labels_are_the_argmax() -> None:
    model = _mlp(seed=1)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        pseudo = model(x).argmax(dim=1)
    scale = torch.cat([p.detach().abs().flatten() for p in model.parameters()])
    expected = torch.stack([torch.linalg.eigvalsh(scale[:, None] * h * scale[None, :])[-1]
                            for h in _full_hessians(model, x, pseudo)])
    got = top_hessian_eigenvalue(model, x, None, iterations=43, tolerance=0, adaptive=True)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(top_hessian_eigenvalue(model, x, None, iterations=43, tolerance=0),
                               top_hessian_eigenvalue(model, x, pseudo, iterations=43, tolerance=0))


def _loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    model = copy.deepcopy(model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    return [list(torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params))
            for i in range(len(x))]


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_gradient_norms_match_per_item_autograd(adaptive: bool) -> None:
    model = _conv(seed=2)
    x = torch.randn(7, 1, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    weights = [p.detach().abs() for p in model.parameters()]
    expected = torch.stack([
        torch.sqrt(sum(((w * g) if adaptive else g).square().sum() for w, g in zip(weights, grads, strict=True)))
        for grads in _loop_gradients(model, x, y)
    ])
    model.train()
    before = _snapshot(model)
    torch.testing.assert_close(gradient_norms(model, x, y, adaptive=adaptive), expected, rtol=1e-10, atol=1e-12)
    _assert_untouched(model, before)
    with torch.no_grad():
        pseudo = model.eval()(x).argmax(dim=1)
    torch.testing.assert_close(gradient_norms(model, x, None, adaptive=adaptive),
                               gradient_norms(model, x, pseudo, adaptive=adaptive))


def _loop_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, rho: float, adaptive: bool):
    """The slow, obvious way: per item, its gradient, its own perturbed copy of the model, its perturbed logits."""
    model = copy.deepcopy(model).eval()
    losses, kept, margin = [], [], []
    for i in range(len(x)):
        xi = x[i : i + 1]
        with torch.no_grad():
            clean = model(xi)
        predicted = clean.argmax(dim=1)
        label = predicted if y is None else y[i : i + 1]
        params = list(model.parameters())
        grads = torch.autograd.grad(F.cross_entropy(model(xi), label), params)
        if adaptive:
            norm = torch.sqrt(sum((p.detach().abs() * g).square().sum() for p, g in zip(params, grads, strict=True)))
        else:
            norm = torch.sqrt(sum(g.square().sum() for g in grads))
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip(shifted.parameters(), grads, strict=True):
                p.add_(rho * (p.square() if adaptive else 1) * g / (norm + 1e-12))
            logits = shifted(xi)[0]
        losses.append(F.cross_entropy(logits[None], label).item())
        kept.append(bool(logits.argmax() == predicted[0]))
        margin.append(max(float(logits.max() - logits[predicted[0]]), 0.0))
    return torch.tensor(losses, dtype=x.dtype), torch.tensor(kept), torch.tensor(margin, dtype=x.dtype)


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_psi_margins_and_perturbed_losses_match_a_per_item_loop(adaptive: bool) -> None:
    model = _conv(seed=4)
    torch.manual_seed(5)
    x = torch.randn(24, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    model.train()
    before = _snapshot(model)
    strictly_between = False
    for rho in (0.05, 0.5, 2.0):
        loss_pseudo, kept, margin = _loop_perturbation(model, x, None, rho, adaptive)
        own = perturb(model, x, None, rho=rho, adaptive=adaptive)
        torch.testing.assert_close(own.perturbed_loss, loss_pseudo, rtol=1e-9, atol=1e-12)
        assert torch.equal(own.kept.cpu(), kept)
        torch.testing.assert_close(own.margins, margin, rtol=1e-9, atol=1e-12)
        assert prediction_kept_fraction(model, x, rho, adaptive) == pytest.approx(kept.double().mean().item())
        torch.testing.assert_close(margins(model, x, rho, adaptive), margin, rtol=1e-9, atol=1e-12)
        assert torch.equal(margin > 0, ~kept)  # δ_x > 0 exactly where the prediction changed (Proposition 3.2)
        strictly_between |= 0 < kept.double().mean() < 1
        loss_true, _, _ = _loop_perturbation(model, x, y, rho, adaptive)
        torch.testing.assert_close(perturbed_losses(model, x, y, rho, adaptive), loss_true, rtol=1e-9, atol=1e-12)
    assert strictly_between, "no rho changed some predictions but not all: the comparison was trivial"
    _assert_untouched(model, before)


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_perturbed_losses_with_pseudo_labels_are_the_saal_scores(adaptive: bool) -> None:
    from saal_lightning.models.backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone("small_cnn", num_classes=4, in_channels=1)
    x = torch.randn(9, 1, 8, 8)
    scores = saal_scores(model, x, rho=0.05, adaptive=adaptive)
    torch.testing.assert_close(perturbed_losses(model, x, None, 0.05, adaptive), scores)
    with torch.no_grad():
        pseudo = model.eval()(x).argmax(dim=1)
    # The torch.func path with the pseudo labels given agrees with the scorer's engine.
    torch.testing.assert_close(perturb(model, x, pseudo, 0.05, adaptive).perturbed_loss, scores, rtol=1e-4,
                               atol=1e-5)


def test_bound_terms_assemble_loss_gradient_and_curvature() -> None:
    model = _mlp(seed=6)
    x = torch.randn(4, 4, dtype=torch.float64)
    terms = bound_terms(model, x, None, rho=0.1, iterations=43, tolerance=0)
    with torch.no_grad():
        logits = model.eval()(x)
    pseudo = logits.argmax(dim=1)
    torch.testing.assert_close(terms.loss, F.cross_entropy(logits, pseudo, reduction="none"))
    torch.testing.assert_close(terms.gradient_term, 0.1 * gradient_norms(model, x, pseudo))
    torch.testing.assert_close(terms.curvature_term,
                               0.005 * top_hessian_eigenvalue(model, x, pseudo, iterations=43, tolerance=0))
    torch.testing.assert_close(terms.bound, terms.loss + terms.gradient_term + terms.curvature_term)
    # Theorem 3.3 to second order: for a small ball the SAAL score stays below the bound plus a rho^3 remainder.
    score = perturbed_losses(model, x, None, rho=0.1)
    assert (score <= terms.bound + 1e-2).all()


def test_relative_margin_is_the_mean_ratio() -> None:
    assert relative_margin(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([2.0, 1.0, 4.0])) == pytest.approx(0.25)
    assert relative_margin(torch.tensor([0.0]), torch.tensor([0.0])) == 0.0  # no margin: 0, even for a 0 loss
    assert math.isnan(relative_margin(torch.tensor([]), torch.tensor([])))
    with pytest.raises(ValueError, match="1-D of one shape"):
        relative_margin(torch.tensor([1.0]), torch.tensor([1.0, 2.0]))


def test_spearman_matches_a_hand_computation_with_ties() -> None:
    # ranks of b = [2, 1, 4, 4, 5]: 2, 1, 3.5, 3.5, 5 (the tie shares ranks 3 and 4); a's ranks are 1..5.
    # deviations from the mean rank 3: a (-2, -1, 0, 1, 2), b (-1, -2, 0.5, 0.5, 2): sum of products 8.5,
    # sums of squares 10 and 9.5.
    assert average_ranks(torch.tensor([2.0, 1.0, 4.0, 4.0, 5.0])).tolist() == [2.0, 1.0, 3.5, 3.5, 5.0]
    assert spearman_correlation([1, 2, 3, 4, 5], [2, 1, 4, 4, 5]) == pytest.approx(8.5 / math.sqrt(95), abs=1e-15)
    assert spearman_correlation(torch.arange(6.0), -torch.arange(6.0).exp()) == pytest.approx(-1.0)
    assert math.isnan(spearman_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # constant: no ranking
    assert math.isnan(spearman_correlation([1.0], [2.0]))
    with pytest.raises(ValueError, match="one length"):
        spearman_correlation([1.0, 2.0], [1.0])
    scipy_stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 5, (50,), generator=generator), torch.randint(0, 7, (50,), generator=generator)
    assert spearman_correlation(a, b) == pytest.approx(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic,
                                                       abs=1e-12)


def test_bad_arguments_are_refused() -> None:
    model = _mlp()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        perturb(model, x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        gradient_norms(model, x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="class indices in \\[0, 3\\)"):
        top_hessian_eigenvalue(model, x, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        top_hessian_eigenvalue(model, x, iterations=0)
    with pytest.raises(ValueError, match="rho must be positive"):
        perturb(model, x, rho=-1.0)
    with pytest.raises(ValueError, match="at least one item"):
        gradient_norms(model, x[:0])
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradient_norms(frozen, x)
