"""VAAL: Variational Adversarial Active Learning (Sinha, Ebrahimi & Darrell, ICCV 2019), as a drop-in strategy."""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.strategies.base import AcquisitionStrategy
from saal_lightning.callbacks.vaal_training import VAALTraining


class VAAL(AcquisitionStrategy):
    """Label the items a discriminator on a VAE's latent space finds least likely to be labeled.

    At the end of each round's training, just before the pool is scored, this strategy's
    :class:`~saal_lightning.callbacks.VAALTraining` callback (:meth:`training_callback`, added to the trainer by the
    acquisition callback) trains a fresh :class:`~saal_lightning.models.vae.ConvVAE` and discriminator on the
    labeled set against a random sample of the unlabeled set; see there for the training and where it differs
    from the released code. The pool score is ``1 - D(mu(x))``, the probability of "unlabeled". The classifier
    is not used.

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
        self._training = VAALTraining(latent_dim, width, discriminator_hidden, steps, batch_size, num_unlabeled, lr,
                                      beta, adversary_weight, seed)

    def training_callback(self) -> VAALTraining:
        return self._training

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return self._training.score(inputs)

    def __repr__(self) -> str:
        training = self._training
        return (
            f"VAAL(latent_dim={training.latent_dim}, width={training.width}, steps={training.steps}, "
            f"batch_size={training.batch_size}, num_unlabeled={training.num_unlabeled}, seed={training.seed})"
        )
