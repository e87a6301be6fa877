"""LL4AL: Learning Loss for Active Learning (Yoo & Kweon, CVPR 2019), as a drop-in strategy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.nn import functional as F

from saal_lightning.acquisition.strategies.base import AcquisitionStrategy
from saal_lightning.acquisition.strategies.feature_hooks import capture_outputs

if TYPE_CHECKING:
    import lightning.pytorch as pl

DEFAULT_FEATURE_LAYERS = ("layer1", "layer2", "layer3", "layer4")
OPTIMIZERS = ("adam", "sgd")


class LossPredictionModule(nn.Module):
    """Yoo & Kweon's loss-prediction module: per feature map GAP -> FC -> ReLU, then concat -> FC(1).

    Args:
        feature_dims: channels of each feature map (``[B, C, ...]``; maps with spatial dims are averaged over them).
        hidden_dim: width of each per-map FC layer (128 in the paper).

    Example::

        >>> module = LossPredictionModule([4, 8], hidden_dim=16)
        >>> module([torch.zeros(3, 4, 5, 5), torch.zeros(3, 8)]).shape
        torch.Size([3])
    """

    def __init__(self, feature_dims: Sequence[int], hidden_dim: int = 128) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(dim, hidden_dim) for dim in feature_dims)
        self.out = nn.Linear(hidden_dim * len(feature_dims), 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = [feature.flatten(2).mean(dim=2) if feature.ndim > 2 else feature for feature in features]
        hidden = [F.relu(branch(x)) for branch, x in zip(self.branches, pooled, strict=True)]
        return self.out(torch.cat(hidden, dim=1)).squeeze(1)


def loss_ranking_loss(predicted: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Yoo & Kweon's pairwise margin ranking loss, pairing item ``i`` of the batch with item ``B - 1 - i``.

    For each pair, ``max(0, margin - sign(l_i - l_j) * (lhat_i - lhat_j))`` with sign = +1 if ``l_i > l_j``
    else -1 (ties count as -1, as in the widely used re-implementation
    Mephisto405/Learning-Loss-for-Active-Learning), averaged over the ``B // 2`` pairs; the middle item of an
    odd batch is left out. A batch of one item has no pair and gives a zero loss that still depends on
    ``predicted`` (so a backward pass works the same on every rank).

    Example::

        >>> loss_ranking_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
        tensor(0.)
        >>> loss_ranking_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))
        tensor(1.)
    """
    pairs = predicted.shape[0] // 2
    if pairs == 0:
        return predicted.sum() * 0.0
    predicted_diff = (predicted - predicted.flip(0))[:pairs]
    target_diff = (target - target.flip(0))[:pairs].detach()
    sign = torch.where(target_diff > 0, 1.0, -1.0).to(predicted_diff.dtype)
    return torch.clamp(margin - sign * predicted_diff, min=0.0).mean()


def _resolve_module(named: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The module called ``name``, or else the only one whose qualified name ends in ``.name``."""
    if name in named:
        return named[name]
    matches = [module for qualified, module in named.items() if qualified.endswith("." + name)]
    return matches[0] if len(matches) == 1 else None


class LL4AL(AcquisitionStrategy):
    """Label the items whose loss a learned loss-prediction module predicts to be largest.

    A :class:`LossPredictionModule` reads intermediate feature maps of the classifier (captured with forward
    hooks that are removed after each use) and is trained with :func:`loss_ranking_loss` against the per-item
    cross-entropy. The pool score is the predicted loss.

    The module is trained in :meth:`on_train_batch_end`: the classifier is run again on the training batch, in
    eval mode and without gradients, and one step of the strategy's own optimizer is taken. Divergences from the
    paper, which are what make the strategy drop-in (the user's LightningModule stays untouched):

    * the features are detached: the ranking loss does not back-propagate into the backbone (the paper lets it
      until epoch 120 of 200, weighted by lambda = 1);
    * features and target losses come from an eval-mode forward (BatchNorm running statistics, no dropout), as
      at scoring time, so the extra forward neither updates the model's BatchNorm statistics nor draws from the
      training RNG.

    The module is created lazily from the first batch's feature shapes, initialised from ``seed`` (so every
    DDP rank starts alike; the global RNG is left untouched) and placed on the features' device. Under DDP its
    gradients are averaged across ranks before each step, so the ranks stay identical. Its weights and optimizer
    state are in :meth:`state_dict`.

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
        if feature_layers is not None and (not feature_layers or not all(isinstance(n, str) for n in feature_layers)):
            raise ValueError(f"feature_layers must be a non-empty list of module names or None, got {feature_layers}")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive integer, got {hidden_dim}")
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        self.feature_layers = list(feature_layers) if feature_layers is not None else None
        self.hidden_dim = hidden_dim
        self.margin = margin
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.seed = seed
        self.predictor: LossPredictionModule | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._feature_dims: list[int] = []
        # State loaded before the module exists (resume): applied when it is built on the right device.
        self._pending_state: dict[str, Any] = {}

    def feature_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules whose outputs feed the loss-prediction module, by name; ``ValueError`` if one is missing."""
        named = dict(model.named_modules())
        names = self.feature_layers or list(DEFAULT_FEATURE_LAYERS)
        resolved = {name: _resolve_module(named, name) for name in names}
        missing = [name for name, module in resolved.items() if module is None]
        if missing:
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
        return resolved  # type: ignore[return-value]

    def _features(self, model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        modules = self.feature_modules(model)
        with capture_outputs(modules) as captured:
            logits = model(inputs)
        return logits, [captured[name].detach().float() for name in modules]

    def _predictor_for(self, features: list[torch.Tensor]) -> tuple[LossPredictionModule, torch.optim.Optimizer]:
        """The module and its optimizer on the features' device, built (and given any loaded state) on first use."""
        device = features[0].device
        if self.predictor is not None and next(self.predictor.parameters()).device != device:
            # Moving through the state dict lets the optimizer cast its state to the new device as well.
            self._pending_state, self.predictor, self._optimizer = self.state_dict(), None, None
        dims = [feature.shape[1] for feature in features]
        if self.predictor is None:
            if self._pending_state and list(self._pending_state["feature_dims"]) != dims:
                raise ValueError(
                    f"the loaded LL4AL state was trained on feature maps with {self._pending_state['feature_dims']} "
                    f"channels, the model gives {dims}"
                )
            with isolate_rng():
                torch.manual_seed(self.seed)
                predictor = LossPredictionModule(dims, self.hidden_dim).to(device)
            if self.optimizer_name == "adam":
                optimizer: torch.optim.Optimizer = torch.optim.Adam(
                    predictor.parameters(), lr=self.lr, weight_decay=self.weight_decay
                )
            else:
                optimizer = torch.optim.SGD(
                    predictor.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
                )
            if self._pending_state:
                predictor.load_state_dict(self._pending_state["predictor"])
                optimizer.load_state_dict(self._pending_state["optimizer"])
                self._pending_state = {}
            self.predictor, self._optimizer, self._feature_dims = predictor, optimizer, dims
        elif dims != self._feature_dims:
            raise ValueError(f"LL4AL's module reads feature maps with {self._feature_dims} channels, got {dims}")
        assert self._optimizer is not None  # built together with the predictor
        return self.predictor, self._optimizer

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail at fit start, not after the first training batch.
        self.feature_modules(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        inputs, targets = batch[0], batch[1]
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                logits, features = self._features(pl_module, inputs)
        finally:
            # Per module, so that submodules the user keeps in eval mode (frozen BatchNorm) stay so.
            for module, training in modes.items():
                module.training = training
        target_loss = F.cross_entropy(logits.float(), targets, reduction="none")
        predictor, optimizer = self._predictor_for(features)
        optimizer.zero_grad()
        with torch.enable_grad():
            loss_ranking_loss(predictor(features), target_loss, self.margin).backward()
        if trainer.world_size > 1:
            # Every rank runs this on every batch (a batch without pairs gives zero gradients), so the collective
            # stays in lockstep and the ranks' modules stay identical.
            grads = [param.grad for param in predictor.parameters()]
            flat = trainer.strategy.reduce(torch.cat([grad.flatten() for grad in grads]), reduce_op="mean")
            for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
                grad.copy_(averaged.view_as(grad))
        optimizer.step()

    def on_weights_reset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The classifier starts again from its initial weights, so the loss predictor (which learned the old
        # model's losses) starts again too, from the same seeded initialisation, at the next training batch.
        self.predictor, self._optimizer, self._feature_dims, self._pending_state = None, None, [], {}

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if self.predictor is None and not self._pending_state:
            raise RuntimeError("LL4AL's loss-prediction module is untrained: it learns during training batches")
        _, features = self._features(model, inputs)
        predictor, _ = self._predictor_for(features)
        return predictor(features).detach()

    def state_dict(self) -> dict[str, Any]:
        if self.predictor is None or self._optimizer is None:
            return dict(self._pending_state)
        return {
            "feature_dims": list(self._feature_dims),
            "predictor": self.predictor.state_dict(),
            "optimizer": self._optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.predictor, self._optimizer, self._feature_dims = None, None, []
        self._pending_state = dict(state_dict)

    def __repr__(self) -> str:
        return (
            f"LL4AL(feature_layers={self.feature_layers}, hidden_dim={self.hidden_dim}, margin={self.margin}, "
            f"optimizer={self.optimizer_name!r}, lr={self.lr})"
        )
