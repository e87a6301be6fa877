from saal_lightning.models.backbones import BACKBONES, build_backbone
from saal_lightning.models.classifier import ActiveClassifier
from saal_lightning.models.loss_prediction import LossPredictionModule, loss_ranking_loss
from saal_lightning.models.vae import ConvVAE, latent_discriminator, vae_loss

__all__ = [
    "BACKBONES",
    "ActiveClassifier",
    "ConvVAE",
    "LossPredictionModule",
    "build_backbone",
    "latent_discriminator",
    "loss_ranking_loss",
    "vae_loss",
]
