"""``ActiveClassifier``: a LightningModule that wraps any classifier and trains it with Adam, SGD or SAM.

Training always uses manual optimization with one ``optimizer.step(closure=...)`` per batch. For Adam/SGD the
closure runs once; for SAM (:class:`~saal_lightning.optim.sam.SAM`) it runs twice inside the same step, so
``global_step`` counts batches either way. In the SAM ascent pass:

* DDP gradient sync is skipped (``toggle_model(sync_grad=False)`` around forward *and* backward), so each
  rank perturbs by its own gradient as in Foret et al.; the second pass syncs as usual.
* BatchNorm running statistics are updated by the first pass only: the second pass still normalises with
  the batch statistics, but with ``track_running_stats`` off, so the buffers (and ``num_batches_tracked``)
  stay as the first pass left them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics.classification import MulticlassAccuracy

from saal_lightning.models.backbones import BACKBONES, build_backbone
from saal_lightning.optim.sam import SAM
from saal_lightning.option_checks import check_choice, check_float, check_int, did_you_mean

OptimizerName = Literal["adam", "sgd", "sam"]
SamBase = Literal["sgd", "adam"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SAM_BASES: tuple[str, ...] = get_args(SamBase)


def check_classifier_options(options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for the first invalid value among the :class:`ActiveClassifier` options given.

    Only the options present are checked, so that ``saal`` can check a parsed config before anything is built
    (``num_classes`` and ``in_channels`` come from the data module later).
    """
    checks = {
        "num_classes": lambda value: check_int("num_classes", value, minimum=2),
        "in_channels": lambda value: check_int("in_channels", value, minimum=1),
        "optimizer": lambda value: check_choice("optimizer", value, OPTIMIZERS),
        "sam_base": lambda value: check_choice("sam_base", value, SAM_BASES),
        "lr": lambda value: check_float("lr", value, minimum=0, strict=True),
        "rho": lambda value: check_float("rho", value, minimum=0, strict=True),
        "momentum": lambda value: check_float("momentum", value, minimum=0),
        "weight_decay": lambda value: check_float("weight_decay", value, minimum=0),
    }
    backbone = options.get("backbone")
    if isinstance(backbone, str) and backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(repr(name) for name in BACKBONES)} or an nn.Module, "
                         f"got {backbone!r}{did_you_mean(backbone, BACKBONES)}")
    for name, check in checks.items():
        if name in options:
            check(options[name])


@contextmanager
def frozen_batchnorm_statistics(module: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers normalise with batch statistics but do not update running ones."""
    batchnorms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for bn in batchnorms:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn in batchnorms:
            bn.track_running_stats = True


class ActiveClassifier(pl.LightningModule):
    """Image classifier trained on the labeled set with Adam, SGD or SAM.

    Args:
        backbone: a named backbone (``resnet18``: the CIFAR-style ResNet-18 of the paper; ``wide_cnn``: about
            420 k parameters; ``small_cnn``: about 40 k) or any ``nn.Module`` whose forward returns logits, given
            by ``class_path`` and ``init_args``.
        num_classes: number of classes (the CLI links it from the data module).
        in_channels: image channels, 1 or 3 (the CLI links it from the data module).
        optimizer: ``adam``, ``sgd`` or ``sam`` (SAM over ``sam_base``).
        lr: learning rate of the (base) optimizer, > 0.
        momentum: SGD momentum (also for SAM over SGD), >= 0.
        weight_decay: L2 penalty of the (base) optimizer, >= 0.
        rho: SAM's perturbation radius, > 0 (training only; acquisition has its own rho).
        adaptive: use the ASAM ball for SAM training.
        sam_base: base optimizer under SAM, ``sgd`` (the authors' choice) or ``adam``.

    Raises:
        ValueError: for an option out of its range or an unknown backbone name.

    Example::

        >>> model = ActiveClassifier("small_cnn", num_classes=10, in_channels=1, optimizer="sam", lr=1e-3)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        rho: float = 0.05,
        adaptive: bool = False,
        sam_base: SamBase = "sgd",
    ) -> None:
        super().__init__()
        check_classifier_options(
            {"backbone": backbone, "num_classes": num_classes, "in_channels": in_channels, "optimizer": optimizer,
             "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "rho": rho, "sam_base": sam_base}
        )
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.automatic_optimization = False
        self.backbone = backbone if isinstance(backbone, nn.Module) else build_backbone(backbone, num_classes,
                                                                                         in_channels)
        self.train_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.backbone(inputs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp["optimizer"] == "sam":
            precision = self._attached_precision()
            if precision.startswith("16"):
                raise MisconfigurationException(
                    f"SAM training does not support precision={precision!r}: the fp16 GradScaler steps the "
                    "optimizer without the closure SAM needs for its second pass. Use precision='32' or "
                    "'bf16-mixed'."
                )
            return SAM(self.parameters(), base_optimizer=hp["sam_base"], rho=hp["rho"], adaptive=hp["adaptive"],
                       **self._base_optimizer_kwargs(hp["sam_base"]))
        optimizer_class = torch.optim.Adam if hp["optimizer"] == "adam" else torch.optim.SGD
        return optimizer_class(self.parameters(), **self._base_optimizer_kwargs(hp["optimizer"]))

    def _attached_precision(self) -> str:
        """The attached trainer's precision, or ``"32-true"`` when no trainer is attached (a direct call)."""
        try:
            trainer = self.trainer
        except RuntimeError:  # LightningModule.trainer raises when the module is not attached to a Trainer
            return "32-true"
        return str(trainer.precision)

    def _base_optimizer_kwargs(self, name: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"lr": self.hparams["lr"], "weight_decay": self.hparams["weight_decay"]}
        if name == "sgd":
            kwargs["momentum"] = self.hparams["momentum"]
        return kwargs

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch[0], batch[1]
        optimizer = self.optimizers()
        if not isinstance(optimizer, LightningOptimizer):  # a list: configure_optimizers returns one optimizer
            raise MisconfigurationException(f"ActiveClassifier trains with one optimizer, got {len(optimizer)}")
        sam = optimizer.optimizer if isinstance(optimizer.optimizer, SAM) else None
        first_pass: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            ascent = sam is not None and sam.first_pass
            second = sam is not None and not sam.first_pass
            with (
                optimizer.toggle_model(sync_grad=False) if ascent else nullcontext(),
                frozen_batchnorm_statistics(self) if second else nullcontext(),
            ):
                logits = self(inputs)
                loss = F.cross_entropy(logits, targets)
                optimizer.zero_grad()
                self.manual_backward(loss)
            if not first_pass:
                first_pass.update(loss=loss.detach(), logits=logits.detach())
            return loss

        optimizer.step(closure=closure)
        self.train_accuracy(first_pass["logits"], targets)
        self.log("train_loss", first_pass["loss"], prog_bar=True, batch_size=len(targets))
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True, batch_size=len(targets))
        return first_pass["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_accuracy, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_accuracy, "test")

    def _evaluate(self, batch: Any, accuracy: MulticlassAccuracy, stage: str) -> None:
        inputs, targets = batch[0], batch[1]
        logits = self(inputs)
        accuracy(logits, targets)
        self.log(f"{stage}_loss", F.cross_entropy(logits, targets), batch_size=len(targets), sync_dist=True)
        self.log(f"{stage}_acc", accuracy, batch_size=len(targets))
