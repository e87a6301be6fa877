"""VAAL: its VAE and discriminator learn a separable labeled/unlabeled split, deterministically, and resume."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from saal_lightning.acquisition.strategies.vaal import VAAL
from saal_lightning.callbacks import VAALTraining
from saal_lightning.models.vae import ConvVAE

SMALL = {"latent_dim": 4, "width": 4, "discriminator_hidden": 16, "batch_size": 16}


def images(count: int, brightness: float, seed: int, channels: int = 1, size: int = 28) -> torch.Tensor:
    noise = 0.3 * torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return noise + brightness


class FakeDataModule:
    """The part of ActiveDataModule that VAAL reads: the split and an un-augmented loader over indices."""

    def __init__(self, data: torch.Tensor, labeled: list[int]) -> None:
        self.data = data
        self.labeled_indices = labeled
        self.unlabeled_indices = [index for index in range(data.shape[0]) if index not in set(labeled)]
        self.loaded: list[list[int]] = []

    def pool_dataloader(self, indices: list[int]) -> DataLoader:
        self.loaded.append(list(indices))
        subset = self.data[indices]
        return DataLoader(TensorDataset(subset, torch.zeros(len(indices))), batch_size=8)


@pytest.fixture(scope="module")
def trained() -> VAAL:
    """VAAL trained on bright labeled vs dark unlabeled images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the autouse single_thread fixture does not cover module-scoped fixtures
    strategy = VAAL(steps=150, lr=2e-3, adversary_weight=1.0, seed=0, **SMALL)
    strategy.training_callback().fit(images(64, 1.0, seed=1), images(64, -1.0, seed=2), seed=0)
    torch.set_num_threads(threads)
    return strategy


def test_training_reduces_both_losses(trained):
    losses = trained.training_callback().train_losses
    vae, discriminator = (torch.tensor(losses[key]) for key in ("vae", "discriminator"))
    assert vae.shape == discriminator.shape == (150,)
    # Seeded run: VAE 3.4 -> 1.9, discriminator 1.28 -> 1.08 (it plays against the VAE's adversarial term).
    assert vae[-20:].mean() < 0.7 * vae[:20].mean()
    assert discriminator[-20:].mean() < 0.9 * discriminator[:20].mean()


def test_scores_are_the_probability_of_unlabeled(trained):
    with torch.no_grad():
        labeled_scores = trained.compute(nn.Identity(), images(32, 1.0, seed=3))
        unlabeled_scores = trained.compute(nn.Identity(), images(32, -1.0, seed=4))
    assert labeled_scores.shape == unlabeled_scores.shape == (32,)
    # Every held-out unlabeled-like item scores above every labeled-like one (seeded run: <= 0.33 vs >= 0.54).
    assert float(labeled_scores.max()) + 0.1 < float(unlabeled_scores.min())
    assert float(labeled_scores.min()) >= 0.0 and float(unlabeled_scores.max()) <= 1.0
    mixed = torch.cat([images(5, 1.0, seed=5), images(3, -1.0, seed=6)])
    with torch.no_grad():
        picks = trained.select(trained.compute(nn.Identity(), mixed), 3, torch.Generator())
    assert sorted(picks.tolist()) == [5, 6, 7]


def test_state_dict_round_trip_reproduces_scores(trained):
    buffer = io.BytesIO()
    torch.save(trained.training_callback().state_dict(), buffer)
    buffer.seek(0)
    rng = torch.get_rng_state()
    restored = VAAL(**SMALL)
    restored.training_callback().load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(torch.get_rng_state(), rng)  # building the networks on load drew no random numbers
    probe = images(6, 0.0, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(restored.compute(nn.Identity(), probe), trained.compute(nn.Identity(), probe))


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    labeled, unlabeled = images(8, 1.0, seed=1, channels=3, size=32), images(8, -1.0, seed=2, channels=3, size=32)
    first, second = VAALTraining(steps=3, **SMALL), VAALTraining(steps=3, **SMALL)
    rng = torch.get_rng_state()
    first.fit(labeled, unlabeled, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(999)  # a different global state must not change what a seeded fit learns
    second.fit(labeled, unlabeled, seed=5)
    for name, tensor in first.state_dict()["vae"].items():
        assert torch.equal(tensor, second.state_dict()["vae"][name]), name
    other = VAALTraining(steps=3, **SMALL)
    other.fit(labeled, unlabeled, seed=6)
    assert not torch.equal(other.state_dict()["vae"]["to_mu.weight"], first.state_dict()["vae"]["to_mu.weight"])


def test_round_end_trains_on_the_datamodule_split():
    data = torch.cat([images(10, 1.0, seed=1), images(30, -1.0, seed=2)])
    datamodule = FakeDataModule(data, labeled=list(range(10)))
    training = VAALTraining(steps=2, num_unlabeled=12, seed=3, **SMALL)
    pl_module = SimpleNamespace(device=torch.device("cpu"))
    rng = torch.get_rng_state()
    training.on_acquisition_start(None, pl_module, datamodule)
    assert torch.equal(torch.get_rng_state(), rng)  # DataLoader iteration included
    labeled, sample = datamodule.loaded
    assert labeled == list(range(10))
    assert len(sample) == len(set(sample)) == 12 and set(sample) <= set(datamodule.unlabeled_indices)
    assert training.rounds_trained == 1 and training.state_dict()["rounds_trained"] == 1
    # The next round draws another sample (seed + round) from the same split.
    training.on_acquisition_start(None, pl_module, datamodule)
    assert datamodule.loaded[3] != sample and training.rounds_trained == 2


def test_vae_shapes_for_the_paper_datasets():
    for channels, size in ((1, 28), (3, 32)):
        recon, mu, logvar = ConvVAE(channels, (size, size), latent_dim=6, width=4)(torch.zeros(2, channels, size, size))
        assert recon.shape == (2, channels, size, size) and mu.shape == logvar.shape == (2, 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvVAE(1, (30, 30))


def test_misuse_gives_clear_errors(trained):
    with pytest.raises(RuntimeError, match="untrained"):
        VAAL().compute(nn.Identity(), torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"trained on items of shape \[1, 28, 28\]"):
        trained.compute(nn.Identity(), torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="needs both"):
        VAALTraining().fit(torch.zeros(2, 1, 28, 28), torch.zeros(0, 1, 28, 28), seed=0)
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
        VAALTraining().fit(torch.zeros(2, 8), torch.zeros(2, 8), seed=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latent_dim": 0}, "latent_dim must be an integer >= 1, got 0"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ({"num_unlabeled": -1}, "num_unlabeled"),
        ({"seed": "0"}, "seed must be an integer, got '0'"),
        ({"lr": 0.0}, "lr"),
        ({"beta": -1.0}, "beta"),
    ],
)
def test_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VAAL(**kwargs)


def test_state_is_never_empty_so_that_a_checkpoint_without_it_is_refused():
    # Lightning leaves an empty state out of the checkpoint; a fresh callback's state counts its trainings.
    assert VAALTraining().state_dict() == {"rounds_trained": 0}
    with pytest.raises(MisconfigurationException, match="holds no VAALTraining state"):
        VAALTraining().on_load_checkpoint(SimpleNamespace(ckpt_path="last.ckpt"), None, {"callbacks": {}})
