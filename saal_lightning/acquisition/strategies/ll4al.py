"""LL4AL: Learning Loss for Active Learning (Yoo & Kweon, CVPR 2019), as a drop-in strategy."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from saal_lightning.acquisition.strategies.base import AcquisitionStrategy
from saal_lightning.callbacks.loss_prediction_training import LossPredictionTraining


class LL4AL(AcquisitionStrategy):
    """Label the items whose loss a learned loss-prediction module predicts to be largest.

    A :class:`~saal_lightning.models.loss_prediction.LossPredictionModule` reads intermediate feature maps of the
    classifier and is trained with :func:`~saal_lightning.models.loss_prediction.loss_ranking_loss` against the
    per-item cross-entropy; the pool score is the predicted loss. The module is trained by this strategy's
    :class:`~saal_lightning.callbacks.LossPredictionTraining` callback (:meth:`training_callback`), which the
    acquisition callback adds to the trainer: one step after every training batch, restarted with the classifier
    at every round that starts from the initial weights, saved in every checkpoint.

    Divergences from the paper, which are what make the strategy drop-in (the user's LightningModule stays
    untouched):

    * the features are detached: the ranking loss does not back-propagate into the backbone (the paper lets it
      until epoch 120 of 200, weighted by lambda = 1);
    * features and target losses come from an eval-mode forward (BatchNorm running statistics, no dropout), as
      at scoring time, so the extra forward neither updates the model's BatchNorm statistics nor draws from the
      training RNG.

    Reference: Yoo & Kweon, "Learning Loss for Active Learning" (CVPR 2019); the "LL4AL" baseline of the SAAL
    paper's Table 1.

    Args:
        feature_layers: qualified module names (as in ``model.named_modules()``, or a unique dotted suffix of one)
            whose outputs feed the module; default: the ``layer1``..``layer4`` stages of the ``resnet18``
            backbone.
        hidden_dim: width of each per-map FC layer (128 in the paper).
        margin: margin of the ranking loss (1.0 in the paper).
        optimizer: ``"adam"`` or ``"sgd"`` (the paper: SGD, lr 0.1, momentum 0.9, weight decay 5e-4, with the
            classifier).
        lr: learning rate of the module's optimizer.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: weight decay of the module's optimizer.
        seed: seed of the module's initial weights.

    Example::

        >>> strategy = LL4AL(feature_layers=["features.3", "features.7"], optimizer="sgd", lr=0.1)
    """

    name = "ll4al"

    def __init__(
        self,
        feature_layers: list[str] | None = None,
        hidden_dim: int = 128,
        margin: float = 1.0,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        self._training = LossPredictionTraining(feature_layers, hidden_dim, margin, optimizer, lr, momentum,
                                                weight_decay, seed)

    def training_callback(self) -> LossPredictionTraining:
        return self._training

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return self._training.predict(model, inputs)

    def __repr__(self) -> str:
        training = self._training
        return (
            f"LL4AL(feature_layers={training.feature_layers}, hidden_dim={training.hidden_dim}, "
            f"margin={training.margin}, optimizer={training.optimizer_name!r}, lr={training.lr})"
        )
