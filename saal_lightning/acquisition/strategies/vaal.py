"""VAAL: Variational Adversarial Active Learning (Sinha, Ebrahimi & Darrell, ICCV 2019), as a drop-in strategy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.nn import functional as F

from saal_lightning.acquisition.strategies.base import AcquisitionStrategy

if TYPE_CHECKING:
    import lightning.pytorch as pl


class ConvVAE(nn.Module):
    """A two-stage convolutional VAE for small images (``H`` and ``W`` divisible by 4: 28 or 32 px).

    Encoder: two stride-2 4x4 convolutions (``width``, ``2 * width`` channels) with BatchNorm and ReLU, then
    linear maps to the latent mean and log-variance; the decoder mirrors it with transposed convolutions and a
    linear output (inputs are normalised images, reconstructed under MSE).

    Example::

        >>> vae = ConvVAE(in_channels=1, image_size=(28, 28), latent_dim=8, width=4)
        >>> recon, mu, logvar = vae(torch.zeros(2, 1, 28, 28))
        >>> recon.shape, mu.shape
        (torch.Size([2, 1, 28, 28]), torch.Size([2, 8]))
    """

    def __init__(self, in_channels: int, image_size: tuple[int, int], latent_dim: int = 32, width: int = 32) -> None:
        super().__init__()
        height, width_px = image_size
        if height % 4 or width_px % 4:
            raise ValueError(f"ConvVAE needs an image height and width divisible by 4, got {image_size}")
        hidden_shape = (2 * width, height // 4, width_px // 4)
        hidden_size = hidden_shape[0] * hidden_shape[1] * hidden_shape[2]
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, kernel_size=4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.to_mu = nn.Linear(hidden_size, latent_dim)
        self.to_logvar = nn.Linear(hidden_size, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_size),
            nn.Unflatten(1, hidden_shape),
            nn.ConvTranspose2d(2 * width, width, kernel_size=4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, in_channels, kernel_size=4, stride=2, padding=1),
        )

    def encode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(inputs)
        return self.to_mu(hidden), self.to_logvar(hidden)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(inputs)
        latent = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decoder(latent), mu, logvar


def latent_discriminator(latent_dim: int, hidden_dim: int) -> nn.Sequential:
    """VAAL's discriminator: an MLP from the latent mean to one logit of "labeled"."""
    return nn.Sequential(
        nn.Linear(latent_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, 1),
        nn.Flatten(0),
    )


def vae_loss(
    inputs: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float
) -> torch.Tensor:
    """Negative ELBO per input element: MSE reconstruction + beta * KL(q(z|x) || N(0, I)) / (C * H * W)."""
    kl_per_item = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    return F.mse_loss(recon, inputs) + beta * kl_per_item.mean() / inputs[0].numel()


def _index_tensor(indices: Any) -> torch.Tensor:
    """Dataset indices (a tensor, array or sequence of ints) as a 1-D long tensor."""
    if isinstance(indices, torch.Tensor):
        return indices.long().flatten().cpu()
    return torch.as_tensor(list(indices), dtype=torch.long)


class VAAL(AcquisitionStrategy):
    """Label the items a discriminator on a VAE's latent space finds least likely to be labeled.

    At the end of each round's training (:meth:`on_round_end`) a fresh VAE and discriminator are trained on the
    labeled set against a random sample of the unlabeled set, as in the paper: the VAE minimises its
    negative ELBO on both sets plus ``adversary_weight`` times the BCE of the discriminator calling both
    "labeled"; the discriminator minimises the BCE of labeled = 1, unlabeled = 0 on the (detached) latent means.
    The pool score is ``1 - D(mu(x))``, the probability of "unlabeled". The classifier is not used.

    Where this differs from the released code (sinhasam/vaal ``solver.py``, ``model.py``):

    * its VAE step uses the target 0 for the unlabeled set, i.e. the discriminator's own objective; here the VAE
      plays against the discriminator, as the paper's adversarial VAE loss states;
    * one VAE step and one discriminator step alternate on each batch pair (its ``num_vae_steps`` /
      ``num_adv_steps`` loops allow several);
    * the two batches go through the VAE as one, so that its BatchNorm layers normalise both sets alike (it
      normalises each separately, which erases a shift in mean between the sets);
    * the KL term is per input element like the MSE (it adds the KL summed over batch and latent dimensions to a
      per-element MSE, which makes the KL dominate).

    Determinism and DDP: round ``r`` is seeded with ``seed + r`` (unlabeled sample, batches, initial weights,
    VAE noise), and training runs inside :func:`~lightning.pytorch.utilities.seed.isolate_rng`, so the training
    RNG stream is left as it was and every DDP rank trains the same networks on the same data. The trained
    weights and the round counter are in :meth:`state_dict`; the optimizers live only inside a round's training.

    Defaults are small (a 32/64-channel VAE, a few hundred steps) so that a round costs seconds on a CPU. The
    released networks are larger (a 4-stage 128..1024-channel VAE, a discriminator with four 512-wide hidden
    layers) and train for tens of thousands of iterations per round; raise ``width``, ``discriminator_hidden``
    and ``steps`` to approach them.

    Reference: Sinha, Ebrahimi & Darrell, "Variational Adversarial Active Learning" (ICCV 2019); the "VAAL"
    baseline of the SAAL paper's Table 1.

    Args:
        latent_dim: VAE latent size (32 in the paper).
        width: channels of the VAE's first convolution (the second has twice as many).
        discriminator_hidden: width of the discriminator's two hidden layers.
        steps: training steps per round, each on one labeled and one unlabeled batch.
        batch_size: items per batch, drawn with replacement.
        num_unlabeled: unlabeled items sampled per round to train against.
        lr: Adam learning rate of both networks (5e-4 in the paper).
        beta: weight of the KL term (1 in the paper).
        adversary_weight: weight of the VAE's adversarial term (1 in the paper).
        seed: base seed; round ``r`` uses ``seed + r``.

    Example::

        >>> strategy = VAAL(steps=100, num_unlabeled=500, seed=0)
    """

    name = "vaal"

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
        for arg, value in (
            ("latent_dim", latent_dim),
            ("width", width),
            ("discriminator_hidden", discriminator_hidden),
            ("steps", steps),
            ("batch_size", batch_size),
            ("num_unlabeled", num_unlabeled),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if beta < 0 or adversary_weight < 0:
            raise ValueError(f"beta and adversary_weight must be non-negative, got {beta} and {adversary_weight}")
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

    def _build(self, input_shape: Sequence[int]) -> None:
        if len(input_shape) != 3:
            raise ValueError(f"VAAL needs image inputs [batch, channels, height, width], got items of {input_shape}")
        channels, height, width_px = input_shape
        self.vae = ConvVAE(channels, (height, width_px), self.latent_dim, self.width)
        self.discriminator = latent_discriminator(self.latent_dim, self.discriminator_hidden)
        self.input_shape = list(input_shape)

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
            self._build(labeled.shape[1:])
            vae, discriminator = self.vae.to(device), self.discriminator.to(device)
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
        self.train_losses = {
            "vae": torch.stack(vae_losses).tolist(),
            "discriminator": torch.stack(discriminator_losses).tolist(),
        }

    def on_round_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: Any) -> None:
        seed = self.seed + self.rounds_trained
        device = next(pl_module.parameters()).device
        # Iterating a DataLoader draws its base seed from the global RNG: isolate that too.
        with isolate_rng():
            unlabeled_indices = _index_tensor(datamodule.unlabeled_indices)
            order = torch.randperm(unlabeled_indices.numel(), generator=torch.Generator().manual_seed(seed))
            sample = unlabeled_indices[order[: self.num_unlabeled]]
            labeled, unlabeled = (
                torch.cat([batch[0] for batch in datamodule.pool_dataloader(indices)]).to(device)
                for indices in (_index_tensor(datamodule.labeled_indices).tolist(), sample.tolist())
            )
        self.fit(labeled, unlabeled, seed)
        self.rounds_trained += 1

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if self.vae is None or self.discriminator is None:
            raise RuntimeError("VAAL's networks are untrained: they are trained in on_round_end")
        if list(inputs.shape[1:]) != self.input_shape:
            raise ValueError(f"VAAL was trained on items of shape {self.input_shape}, got {list(inputs.shape[1:])}")
        vae = self.vae.to(inputs.device).eval()
        discriminator = self.discriminator.to(inputs.device).eval()
        mu, _ = vae.encode(inputs)
        return 1.0 - torch.sigmoid(discriminator(mu))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rounds_trained": self.rounds_trained}
        if self.vae is not None and self.discriminator is not None:
            state.update(
                input_shape=list(self.input_shape),
                vae=self.vae.state_dict(),
                discriminator=self.discriminator.state_dict(),
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rounds_trained = int(state_dict.get("rounds_trained", 0))
        self.vae = self.discriminator = None
        self.input_shape = []
        if "vae" in state_dict:
            # Building initialises weights from the global RNG, which must not move on resume.
            with isolate_rng():
                self._build(state_dict["input_shape"])
            self.vae.load_state_dict(state_dict["vae"])
            self.discriminator.load_state_dict(state_dict["discriminator"])

    def __repr__(self) -> str:
        return (
            f"VAAL(latent_dim={self.latent_dim}, width={self.width}, steps={self.steps}, "
            f"batch_size={self.batch_size}, num_unlabeled={self.num_unlabeled}, seed={self.seed})"
        )
