r"""
Loss Prediction Training
^^^^^^^^^^^^^^^^^^^^^^^^

Trains LL4AL's :class:`~saal_lightning.models.loss_prediction.LossPredictionModule` beside the classifier, one
step after every training batch, for the :class:`~saal_lightning.acquisition.strategies.LL4AL` strategy, which
scores the pool with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.nn import functional as F
from typing_extensions import override

from saal_lightning.acquisition.functional import capture_outputs
from saal_lightning.callbacks.strategy_training import StrategyTraining
from saal_lightning.models.loss_prediction import LossPredictionModule, loss_ranking_loss
from saal_lightning.option_checks import check_choice, check_int

if TYPE_CHECKING:
    import lightning.pytorch as pl

DEFAULT_FEATURE_LAYERS = ("layer1", "layer2", "layer3", "layer4")
OptimizerName = Literal["adam", "sgd"]


def _resolve_module(named: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The module called ``name``, or else the only one whose qualified name ends in ``.name``."""
    if name in named:
        return named[name]
    matches = [module for qualified, module in named.items() if qualified.endswith("." + name)]
    return matches[0] if len(matches) == 1 else None


def _check_feature_dims(predictor: LossPredictionModule, features: list[torch.Tensor]) -> None:
    dims = [feature.shape[1] for feature in features]
    if dims != predictor.feature_dims:
        raise ValueError(
            f"LL4AL's loss-prediction module reads feature maps with {predictor.feature_dims} channels, the model "
            f"gives {dims}"
        )


class LossPredictionTraining(StrategyTraining):
    """Train a loss-prediction module on the classifier's feature maps after every training batch.

    The classifier is run again on the training batch, in eval mode and without gradients, its feature maps
    (the outputs of ``feature_layers``) are captured with forward hooks that are removed after each use, and one
    step of this callback's own optimizer trains the module with
    :func:`~saal_lightning.models.loss_prediction.loss_ranking_loss` against the per-item cross-entropy. The
    user's LightningModule is left untouched: its modes, weights, BatchNorm statistics and RNG stream.

    The module is built at the first training batch from the feature maps' shapes, initialised from ``seed``
    (the global RNG is left untouched, so every DDP rank starts alike) and placed on the model's device. Under
    DDP its gradients are averaged across ranks before each step, so the ranks stay identical. When the
    acquisition callback restores the classifier's initial weights for a new round (``reset_weights=True``), the
    module starts again too, from the same initialisation: it sees the new round (the acquisition callback's
    ``current_round``) at the round's first epoch start. Its weights, its optimizer's state and the round it
    follows are in :meth:`state_dict` (tensors and primitives, so checkpoints load with ``weights_only=True``).

    The :class:`~saal_lightning.acquisition.strategies.LL4AL` strategy builds this callback from its options
    (documented there) and the acquisition callback adds it to the trainer.

    Example::

        >>> training = LossPredictionTraining(feature_layers=["features.3", "features.7"], hidden_dim=64)
    """

    def __init__(
        self,
        feature_layers: list[str] | None = None,
        hidden_dim: int = 128,
        margin: float = 1.0,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if feature_layers is not None and (not feature_layers or not all(isinstance(n, str) for n in feature_layers)):
            raise ValueError(f"feature_layers must be a non-empty list of module names or None, got {feature_layers}")
        check_int("hidden_dim", hidden_dim, minimum=1)
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        check_choice("optimizer", optimizer, get_args(OptimizerName))
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        check_int("seed", seed)
        self.feature_layers = list(feature_layers) if feature_layers is not None else None
        self.hidden_dim = hidden_dim
        self.margin = margin
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.seed = seed
        self.predictor: LossPredictionModule | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # The acquisition round the module has learned in (-1: none yet).
        self._round = -1

    # ------------------------------------------------------------------ the classifier's features
    def feature_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules whose outputs feed the loss-prediction module, by name; ``ValueError`` if one is missing."""
        named = dict(model.named_modules())
        names = self.feature_layers or list(DEFAULT_FEATURE_LAYERS)
        resolved = {name: _resolve_module(named, name) for name in names}
        found = {name: module for name, module in resolved.items() if module is not None}
        if len(found) == len(resolved):
            return found
        missing = [name for name in resolved if name not in found]
        if self.feature_layers is None:
            raise ValueError(
                f"LL4AL could not find the modules {missing} in {type(model).__name__}: by default it reads the "
                "outputs of the modules named layer1..layer4 (the resnet18 backbone's stages). For another "
                "backbone pass feature_layers=[...], the names (from model.named_modules(), or a unique dotted "
                "suffix) of the modules whose outputs are the feature maps, each a tensor [batch, channels, ...]"
            )
        known = [name for name in named if name][:12]
        raise ValueError(
            f"feature_layers {missing} match no module (or more than one) of {type(model).__name__}; use names "
            f"from model.named_modules() (such as {known}) or a unique dotted suffix of one"
        )

    def features(self, model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The model's logits for ``inputs`` and its feature maps (detached, float32), in ``feature_layers`` order."""
        modules = self.feature_modules(model)
        with capture_outputs(modules) as captured:
            logits = model(inputs)
        return logits, [captured[name].detach().float() for name in modules]

    def predict(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The predicted loss of each item of ``inputs`` (``[B]``), read from ``model``'s feature maps."""
        if self.predictor is None:
            raise RuntimeError("LL4AL's loss-prediction module is untrained: it learns during training batches")
        _, features = self.features(model, inputs)
        _check_feature_dims(self.predictor, features)
        return self.predictor(features).detach()

    # ------------------------------------------------------------------ the module
    def _build(
        self, feature_dims: list[int], device: torch.device
    ) -> tuple[LossPredictionModule, torch.optim.Optimizer]:
        with isolate_rng():
            torch.manual_seed(self.seed)
            predictor = LossPredictionModule(feature_dims, self.hidden_dim).to(device)
        if self.optimizer_name == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(
                predictor.parameters(), lr=self.lr, weight_decay=self.weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                predictor.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        self.predictor, self.optimizer = predictor, optimizer
        return predictor, optimizer

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail at fit start, not after the first training batch.
        self.feature_modules(pl_module)
        if self.predictor is not None and self.optimizer is not None:
            self.predictor.to(pl_module.device)
            # Loading casts the optimizer's state to its parameters' new device.
            self.optimizer.load_state_dict(self.optimizer.state_dict())

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        round_index = self.acquisition.current_round
        if round_index != self._round:
            if self.acquisition.reset_weights:
                # The classifier starts this round from its initial weights, so the module (which learned the
                # old model's losses) starts again too, at the next training batch.
                self.predictor = self.optimizer = None
            self._round = round_index

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        inputs, targets = batch[0], batch[1]
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                logits, features = self.features(pl_module, inputs)
        finally:
            # Per module, so that submodules the user keeps in eval mode (frozen BatchNorm) stay so.
            for module, training in modes.items():
                module.training = training
        target_loss = F.cross_entropy(logits.float(), targets, reduction="none")
        if self.predictor is None or self.optimizer is None:
            predictor, optimizer = self._build([feature.shape[1] for feature in features], features[0].device)
        else:
            predictor, optimizer = self.predictor, self.optimizer
            _check_feature_dims(predictor, features)
        optimizer.zero_grad()
        with torch.enable_grad():
            loss_ranking_loss(predictor(features), target_loss, self.margin).backward()
        if trainer.world_size > 1:
            # Every rank runs this on every batch (a batch without pairs gives zero gradients), so the collective
            # stays in lockstep and the ranks' modules stay identical.
            grads = [param.grad for param in predictor.parameters() if param.grad is not None]
            flat = trainer.strategy.reduce(torch.cat([grad.flatten() for grad in grads]), reduce_op="mean")
            for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
                grad.copy_(averaged.view_as(grad))
        optimizer.step()

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"round": self._round}
        if self.predictor is not None and self.optimizer is not None:
            state.update(
                feature_dims=list(self.predictor.feature_dims),
                predictor=self.predictor.state_dict(),
                optimizer=self.optimizer.state_dict(),
            )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._round = int(state_dict["round"])
        self.predictor = self.optimizer = None
        if "predictor" in state_dict:
            # Built on the CPU; on_fit_start moves it to the model's device.
            predictor, optimizer = self._build(list(state_dict["feature_dims"]), torch.device("cpu"))
            predictor.load_state_dict(state_dict["predictor"])
            optimizer.load_state_dict(state_dict["optimizer"])
