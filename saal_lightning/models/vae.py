"""VAAL's networks (Sinha, Ebrahimi & Darrell, "Variational Adversarial Active Learning", ICCV 2019).

A VAE for small images and a discriminator on its latent means; they are trained at the end of every round by
:class:`~saal_lightning.callbacks.VAALTraining` and score the pool for the
:class:`~saal_lightning.acquisition.strategies.VAAL` strategy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


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
