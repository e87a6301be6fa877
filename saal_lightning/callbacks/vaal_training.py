r"""
VAAL Training
^^^^^^^^^^^^^

Trains VAAL's VAE and discriminator (:mod:`saal_lightning.models.vae`) at the end of every round's training, on
the labeled set against a sample of the unlabeled set, for the :class:`~saal_lightning.acquisition.strategies.VAAL`
strategy, which scores the pool with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.nn import functional as F
from typing_extensions import override

from saal_lightning.callbacks.strategy_training import StrategyTraining
from saal_lightning.models.vae import ConvVAE, latent_discriminator, vae_loss
from saal_lightning.option_checks import check_int

if TYPE_CHECKING:
    import lightning.pytorch as pl


def _index_tensor(indices: Any) -> torch.Tensor:
    """Dataset indices (a tensor, array or sequence of ints) as a 1-D long tensor."""
    if isinstance(indices, torch.Tensor):
        return indices.long().flatten().cpu()
    return torch.as_tensor(list(indices), dtype=torch.long)


class VAALTraining(StrategyTraining):
    """Train a fresh VAE and discriminator at the end of every round, just before the pool is scored.

    Called by the acquisition callback (:meth:`on_acquisition_start`), it trains them on the labeled set against
    a random sample of ``num_unlabeled`` unlabeled items, as in the paper: the VAE minimises its negative ELBO on
    both sets plus ``adversary_weight`` times the BCE of the discriminator calling both "labeled"; the
    discriminator minimises the BCE of labeled = 1, unlabeled = 0 on the (detached) latent means. The classifier
    is not used.

    Where this differs from the released code (sinhasam/vaal ``solver.py``, ``model.py``):

    * its VAE step uses the target 0 for the unlabeled set, i.e. the discriminator's own objective; here the VAE
      plays against the discriminator, as the paper's adversarial VAE loss states;
    * one VAE step and one discriminator step alternate on each batch pair (its ``num_vae_steps`` /
      ``num_adv_steps`` loops allow several);
    * the two batches go through the VAE as one, so that its BatchNorm layers normalise both sets alike (it
      normalises each separately, which erases a shift in mean between the sets);
    * the KL term is per input element like the MSE (it adds the KL summed over batch and latent dimensions to a
      per-element MSE, which makes the KL dominate).

    Determinism and DDP: the ``r``-th training is seeded with ``seed + r`` (unlabeled sample, batches, initial
    weights, VAE noise), and runs inside :func:`~lightning.pytorch.utilities.seed.isolate_rng`, so the training
    RNG stream is left as it was and every DDP rank trains the same networks on the same data, on the model's
    device. The trained weights and the count of trainings are in :meth:`state_dict` (tensors and primitives);
    the optimizers live only inside a training.

    The :class:`~saal_lightning.acquisition.strategies.VAAL` strategy builds this callback from its options
    (documented there) and the acquisition callback adds it to the trainer.

    Example::

        >>> training = VAALTraining(steps=100, num_unlabeled=500, seed=0)
    """

    def __init__(
        self,
        latent_dim: int = 32,
        width: int = 32,
        discriminator_hidden: int = 128,
        steps: int = 200,
        batch_size: int = 32,
        num_unlabeled: int = 2000,
        lr: float = 5e-4,
        beta: float = 1.0,
        adversary_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("latent_dim", latent_dim),
            ("width", width),
            ("discriminator_hidden", discriminator_hidden),
            ("steps", steps),
            ("batch_size", batch_size),
            ("num_unlabeled", num_unlabeled),
        ):
            check_int(arg, value, minimum=1)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if beta < 0 or adversary_weight < 0:
            raise ValueError(f"beta and adversary_weight must be non-negative, got {beta} and {adversary_weight}")
        check_int("seed", seed)
        self.latent_dim = latent_dim
        self.width = width
        self.discriminator_hidden = discriminator_hidden
        self.steps = steps
        self.batch_size = batch_size
        self.num_unlabeled = num_unlabeled
        self.lr = lr
        self.beta = beta
        self.adversary_weight = adversary_weight
        self.seed = seed
        self.vae: ConvVAE | None = None
        self.discriminator: nn.Sequential | None = None
        self.input_shape: list[int] = []
        self.rounds_trained = 0
        # Per step of the last training: the VAE's total loss and the discriminator's BCE.
        self.train_losses: dict[str, list[float]] = {"vae": [], "discriminator": []}

    def _build(self, input_shape: Sequence[int]) -> tuple[ConvVAE, nn.Sequential]:
        if len(input_shape) != 3:
            raise ValueError(f"VAAL needs image inputs [batch, channels, height, width], got items of {input_shape}")
        channels, height, width_px = input_shape
        self.vae = ConvVAE(channels, (height, width_px), self.latent_dim, self.width)
        self.discriminator = latent_discriminator(self.latent_dim, self.discriminator_hidden)
        self.input_shape = list(input_shape)
        return self.vae, self.discriminator

    def fit(self, labeled: torch.Tensor, unlabeled: torch.Tensor, seed: int) -> None:
        """Train a fresh VAE and discriminator on ``labeled`` vs ``unlabeled`` images, on their device.

        Everything random (initial weights, batches, VAE noise) comes from ``seed``; the global RNG state is
        restored afterwards.
        """
        if labeled.shape[0] == 0 or unlabeled.shape[0] == 0:
            raise ValueError(
                f"VAAL trains on labeled vs unlabeled items and needs both, got {labeled.shape[0]} labeled and "
                f"{unlabeled.shape[0]} unlabeled"
            )
        if labeled.shape[1:] != unlabeled.shape[1:]:
            raise ValueError(f"labeled items {tuple(labeled.shape[1:])} and unlabeled {tuple(unlabeled.shape[1:])}")
        device = labeled.device
        with isolate_rng():
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            vae, discriminator = self._build(labeled.shape[1:])
            vae, discriminator = vae.to(device), discriminator.to(device)
            vae_optimizer = torch.optim.Adam(vae.parameters(), lr=self.lr)
            discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=self.lr)
            vae.train()
            discriminator.train()
            is_labeled = torch.ones(self.batch_size, device=device)
            is_unlabeled = torch.zeros(self.batch_size, device=device)
            vae_losses, discriminator_losses = [], []
            for _ in range(self.steps):
                x_labeled = labeled[torch.randint(labeled.shape[0], (self.batch_size,), generator=generator)]
                x_unlabeled = unlabeled[torch.randint(unlabeled.shape[0], (self.batch_size,), generator=generator)]

                # One joint batch, so that BatchNorm normalises both sets with the same statistics (two separate
                # batches would each be normalised to their own mean, hiding a shift between the sets).
                x_both = torch.cat([x_labeled, x_unlabeled])
                recon, mu, logvar = vae(x_both)
                mu_labeled, mu_unlabeled = mu.split(self.batch_size)
                # The VAE learns to make both sets look labeled to the discriminator.
                adversarial = F.binary_cross_entropy_with_logits(
                    discriminator(mu_labeled), is_labeled
                ) + F.binary_cross_entropy_with_logits(discriminator(mu_unlabeled), is_labeled)
                loss = 2 * vae_loss(x_both, recon, mu, logvar, self.beta) + self.adversary_weight * adversarial
                vae_optimizer.zero_grad()
                loss.backward()
                vae_optimizer.step()

                discriminator_loss = F.binary_cross_entropy_with_logits(
                    discriminator(mu_labeled.detach()), is_labeled
                ) + F.binary_cross_entropy_with_logits(discriminator(mu_unlabeled.detach()), is_unlabeled)
                # zero_grad also drops what the VAE's loss left on the discriminator's parameters.
                discriminator_optimizer.zero_grad()
                discriminator_loss.backward()
                discriminator_optimizer.step()
                vae_losses.append(loss.detach())
                discriminator_losses.append(discriminator_loss.detach())
        vae.eval()
        discriminator.eval()
        self.train_losses = {
            "vae": torch.stack(vae_losses).tolist(),
            "discriminator": torch.stack(discriminator_losses).tolist(),
        }

    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        """``1 - D(mu(x))`` for each item of ``inputs``: the discriminator's probability of "unlabeled"."""
        if self.vae is None or self.discriminator is None:
            raise RuntimeError("VAAL's networks are untrained: they are trained at the end of each round")
        if list(inputs.shape[1:]) != self.input_shape:
            raise ValueError(f"VAAL was trained on items of shape {self.input_shape}, got {list(inputs.shape[1:])}")
        mu, _ = self.vae.encode(inputs)
        return 1.0 - torch.sigmoid(self.discriminator(mu))

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.vae is not None and self.discriminator is not None:
            self.vae.to(pl_module.device)
            self.discriminator.to(pl_module.device)

    @override
    def on_acquisition_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: Any) -> None:
        seed = self.seed + self.rounds_trained
        # Iterating a DataLoader draws its base seed from the global RNG: isolate that too.
        with isolate_rng():
            unlabeled_indices = _index_tensor(datamodule.unlabeled_indices)
            order = torch.randperm(unlabeled_indices.numel(), generator=torch.Generator().manual_seed(seed))
            sample = unlabeled_indices[order[: self.num_unlabeled]]
            labeled, unlabeled = (
                torch.cat([batch[0] for batch in datamodule.pool_dataloader(indices)]).to(pl_module.device)
                for indices in (_index_tensor(datamodule.labeled_indices).tolist(), sample.tolist())
            )
        self.fit(labeled, unlabeled, seed)
        self.rounds_trained += 1

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rounds_trained": self.rounds_trained}
        if self.vae is not None and self.discriminator is not None:
            state.update(
                input_shape=list(self.input_shape),
                vae=self.vae.state_dict(),
                discriminator=self.discriminator.state_dict(),
            )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds_trained = int(state_dict["rounds_trained"])
        self.vae = self.discriminator = None
        self.input_shape = []
        if "vae" in state_dict:
            # Building initialises weights from the global RNG, which must not move on resume. Built on the CPU;
            # on_fit_start moves them to the model's device.
            with isolate_rng():
                vae, discriminator = self._build(state_dict["input_shape"])
            vae.load_state_dict(state_dict["vae"])
            discriminator.load_state_dict(state_dict["discriminator"])
            vae.eval()
            discriminator.eval()
