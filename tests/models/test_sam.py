"""The SAM step: ball radius, exact restore, the update itself, BatchNorm statistics, Lightning integration."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from saal_lightning.models.classifier import ActiveClassifier
from saal_lightning.optim.sam import SAM


def _regression_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return model, torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)


def _closure(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_lies_on_the_rho_sphere(adaptive: bool) -> None:
    model, x, y = _regression_problem()
    rho = 0.07
    optimizer = SAM(model.parameters(), base_optimizer="sgd", lr=0.1, rho=rho, adaptive=adaptive)
    theta = [p.detach().clone() for p in model.parameters()]
    _closure(model, optimizer, x, y)()
    optimizer.perturb()
    eps = [p.detach() - t for p, t in zip(model.parameters(), theta, strict=True)]
    if adaptive:  # ASAM's ball is || eps / |w| ||_2 = rho
        norm = torch.sqrt(sum(((e / t.abs()) ** 2).sum() for e, t in zip(eps, theta, strict=True)))
    else:
        norm = torch.sqrt(sum((e**2).sum() for e in eps))
    assert norm.item() == pytest.approx(rho, rel=1e-9)
    optimizer.restore()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta, strict=True))


def test_parameters_are_restored_exactly_before_the_base_step() -> None:
    model, x, y = _regression_problem()
    optimizer = SAM(model.parameters(), base_optimizer="sgd", lr=0.1, rho=0.5)
    theta = [p.detach().clone() for p in model.parameters()]
    seen_by_base_step = []
    base_step = optimizer.base_optimizer.step

    def recording_step(*args, **kwargs):
        seen_by_base_step.extend(p.detach().clone() for p in model.parameters())
        return base_step(*args, **kwargs)

    optimizer.base_optimizer.step = recording_step
    optimizer.step(_closure(model, optimizer, x, y))
    assert len(seen_by_base_step) == len(theta)
    assert all(torch.equal(s, t) for s, t in zip(seen_by_base_step, theta, strict=True))
    assert not any(torch.equal(p, t) for p, t in zip(model.parameters(), theta, strict=True))  # and it did step


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_the_two_pass_update_by_hand(adaptive: bool) -> None:
    model, x, y = _regression_problem()
    reference = copy.deepcopy(model)
    lr, rho = 0.1, 0.05
    optimizer = SAM(model.parameters(), base_optimizer="sgd", lr=lr, rho=rho, adaptive=adaptive)
    loss = optimizer.step(_closure(model, optimizer, x, y))

    params = list(reference.parameters())
    clean_loss = (reference(x) - y).pow(2).mean()
    grads = torch.autograd.grad(clean_loss, params)
    if adaptive:
        norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, grads, strict=True)))
        eps = [rho * p.detach() ** 2 * g / (norm + 1e-12) for p, g in zip(params, grads, strict=True)]
    else:
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        eps = [rho * g / (norm + 1e-12) for g in grads]
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
    perturbed_grads = torch.autograd.grad((reference(x) - y).pow(2).mean(), params)
    with torch.no_grad():
        for p, e, g in zip(params, eps, perturbed_grads, strict=True):
            p.sub_(e).sub_(lr * g)
    assert loss.item() == pytest.approx(clean_loss.item(), rel=1e-12)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_step_without_closure_is_refused_with_a_reason() -> None:
    model, _, _ = _regression_problem()
    with pytest.raises(RuntimeError, match="closure"):
        SAM(model.parameters(), lr=0.1).step()


def test_invalid_arguments_are_refused() -> None:
    model, _, _ = _regression_problem()
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), rho=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="base optimizer"):
        SAM(model.parameters(), base_optimizer="lbfgs", lr=0.1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ActiveClassifier("small_cnn", optimizer="rmsprop")


def _separable_loader(num: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(num) % 2
    inputs = torch.randn(num, 4, generator=generator) + 3.0 * targets[:, None].float()
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, shuffle=False)


def _bn_first_model() -> nn.Module:
    # BatchNorm first, so its input is the raw batch and the expected running mean is computable by hand.
    return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return pl.Trainer(**(defaults | kwargs))


def test_batchnorm_running_statistics_move_once_per_sam_step() -> None:
    model = ActiveClassifier(_bn_first_model(), num_classes=2, optimizer="sam", lr=0.1, rho=0.5)
    loader = _separable_loader(num=16, batch_size=16)
    batch_mean = next(iter(loader))[0].mean(dim=0)
    _trainer(max_steps=1).fit(model, loader)
    bn = model.backbone[0]
    assert int(bn.num_batches_tracked) == 1
    # One update with momentum 0.1 from zero; two passes would have given 0.19 * mean.
    torch.testing.assert_close(bn.running_mean, 0.1 * batch_mean)


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "sam"])
def test_training_reduces_the_loss_and_counts_one_step_per_batch(optimizer: str) -> None:
    torch.manual_seed(0)
    model = ActiveClassifier(_bn_first_model(), num_classes=2, optimizer=optimizer, lr=0.05, rho=0.05)
    loader = _separable_loader()

    def mean_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(sum(nn.functional.cross_entropy(model(x), y) for x, y in loader) / len(loader))
        model.train()
        return loss

    before = mean_loss()
    trainer = _trainer(max_epochs=5)
    trainer.fit(model, loader)
    assert trainer.global_step == 5 * len(loader)
    assert mean_loss() < 0.5 * before


def test_sam_trains_under_bf16_mixed_precision() -> None:
    torch.manual_seed(0)
    model = ActiveClassifier(_bn_first_model(), num_classes=2, optimizer="sam", lr=0.05)
    trainer = _trainer(max_epochs=2, precision="bf16-mixed")
    trainer.fit(model, _separable_loader())
    assert trainer.global_step == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sam_refuses_fp16_mixed_precision_with_a_clear_message() -> None:
    # fp16 AMP is GPU-only in Lightning, so the refusal is checked against the trainer attribute it reads.
    model = ActiveClassifier(_bn_first_model(), num_classes=2, optimizer="sam")
    model._trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(MisconfigurationException, match="bf16-mixed"):
        model.configure_optimizers()
    model.hparams.optimizer = "adam"  # the GradScaler is fine for single-pass optimizers
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)
