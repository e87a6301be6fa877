"""Maximally perturbed losses with any labels, and what the perturbation does to the prediction (paper §3.2, §4.1).

For item x with label y (given, or the pseudo label yhat = argmax f_theta(x)) and g the gradient of
l(x, y; theta) = CE(f_theta(x), y) with respect to all trainable parameters *of that one item*, the maximal
perturbation is the SAM ascent step of the SAAL scorer:

* ``adaptive=False`` (the paper, eq. 3 with p = 2): eps = rho * g / (||g|| + 1e-12);
* ``adaptive=True`` (the authors' code, the ASAM ball): eps = rho * w^2 * g / (|| |w| * g || + 1e-12);

and the maximally perturbed loss is l(x, y; theta + eps). With ``targets=None`` that is exactly the SAAL score
(:func:`~saal_lightning.acquisition.saal_score.saal_scores`, which computes it); with the true labels it is the
quantity of the paper's Figure 3 and the right-hand side of Theorem 3.1.

Under the item's *own* perturbation eps_hat (the step for its pseudo label):

* ψ(ρ) (Figure 4a) is the fraction of items whose predicted class is unchanged: argmax f_{theta+eps_hat}(x) = yhat;
* the margin δ_x of Theorem 3.1 (Appendix A.2.1) is δ_x = [max_j f_{theta+eps_hat}(x)_j - f_{theta+eps_hat}(x)_yhat]_+
  on the perturbed **logits**. It is 0 exactly when the perturbed prediction is still yhat (Proposition 3.2), and
  it makes max l(x, yhat; theta + eps) <= max l(x, ybar; theta + eps) + δ_x hold for any true label ybar;
* the relative margin r(ρ) (Figure 4b) is the mean over items of δ_x / max l(x, ybar; theta + eps), which needs the
  true labels ybar.

The model is evaluated as the scorer does (eval mode, left exactly as it was). These functions use ``torch.func``
(per-item gradients and per-item perturbed weights, about 8 bytes per parameter per item of a chunk), so any model
works; :func:`perturbed_losses` without targets uses the scorer's faster engine.

Example::

    >>> from saal_lightning.models.backbones import build_backbone
    >>> model = build_backbone("small_cnn", num_classes=4, in_channels=1)
    >>> result = perturb(model, torch.randn(6, 1, 8, 8), rho=0.05)
    >>> result.perturbed_loss.shape, result.margins.shape, 0.0 <= result.kept_fraction <= 1.0
    (torch.Size([6]), torch.Size([6]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn import functional as F

from saal_lightning.acquisition.saal_score import saal_scores, validate_scoring_options
from saal_lightning.acquisition.scoring_common import DENOMINATOR_EPS, perturb_in_place
from saal_lightning.diagnostics._functional import (
    autograd_input,
    check_batch,
    chunk_size,
    evaluating,
    global_norm,
    item_logits,
    item_loss,
    logits_and_targets,
    split_state,
)


@dataclass(frozen=True)
class Perturbation:
    """Each item under its own maximal perturbation (one row per item, on the inputs' device).

    Attributes:
        targets: the class each item's loss was perturbed for (the given labels, or the pseudo labels).
        clean_logits: f_theta(x), ``[items, classes]``.
        perturbed_logits: f_{theta+eps}(x) with eps the item's own ascent step, ``[items, classes]``.
        clean_loss: l(x, y; theta).
        perturbed_loss: l(x, y; theta + eps), the maximally perturbed loss.
    """

    targets: torch.Tensor
    clean_logits: torch.Tensor
    perturbed_logits: torch.Tensor
    clean_loss: torch.Tensor
    perturbed_loss: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        """The clean predicted class argmax f_theta(x) (the pseudo label yhat)."""
        return self.clean_logits.argmax(dim=1)

    @property
    def kept(self) -> torch.Tensor:
        """Per item: whether the perturbed network still predicts the clean prediction yhat."""
        return self.perturbed_logits.argmax(dim=1) == self.predictions

    @property
    def kept_fraction(self) -> float:
        """ψ(ρ): the fraction of items whose prediction the perturbation leaves unchanged."""
        return float(self.kept.double().mean())

    @property
    def margins(self) -> torch.Tensor:
        """δ_x = [max_j f_{theta+eps}(x)_j - f_{theta+eps}(x)_yhat]_+ on the perturbed logits (Theorem 3.1).

        Meaningful as the paper's margin when the perturbation is the pseudo label's own (``targets=None``).
        """
        own = self.perturbed_logits.gather(1, self.predictions.unsqueeze(1)).squeeze(1)
        return (self.perturbed_logits.max(dim=1).values - own).clamp_min(0)


def _check_ball(rho: object, adaptive: object) -> None:
    validate_scoring_options(rho, adaptive, "max", None, "auto")


def _perturb_chunk(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None, rho: float,
                   adaptive: bool) -> Perturbation:
    trainable, fixed = split_state(model)
    clean_logits, labels = logits_and_targets(model, x, targets)
    grads = vmap(grad(item_loss(model, fixed)), in_dims=(None, 0, 0))(trainable, x, labels)
    scale = rho / (global_norm(grads, trainable, adaptive) + DENOMINATOR_EPS)
    perturb_in_place(grads, trainable, scale, adaptive)
    with torch.no_grad():
        perturbed_logits = vmap(item_logits(model, fixed))(grads, x)
    return Perturbation(
        targets=labels,
        clean_logits=clean_logits.detach(),
        perturbed_logits=perturbed_logits.detach(),
        clean_loss=F.cross_entropy(clean_logits, labels, reduction="none").detach(),
        perturbed_loss=F.cross_entropy(perturbed_logits, labels, reduction="none").detach(),
    )


def perturb(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    rho: float = 0.05,
    adaptive: bool = False,
    *,
    max_memory: int | None = None,
) -> Perturbation:
    """Every item under its own maximal perturbation for its label (``targets``, or ``None``: its pseudo label).

    Args:
        model: maps ``inputs`` to logits ``[items, classes]``, on the inputs' device.
        inputs: the items, batched along dim 0.
        targets: one class index per item, or ``None`` for the pseudo labels argmax f_theta(x).
        rho: radius of the perturbation ball.
        adaptive: ``False``: the paper's ball; ``True``: the authors' code (ASAM); see the module docstring.
        max_memory: working-memory budget in bytes that picks the chunk size (default 1 GiB); an estimate.

    Raises:
        TypeError, ValueError: for a bad argument, or a model without trainable parameters.
    """
    check_batch(model, inputs, targets)
    _check_ball(rho, adaptive)
    with evaluating(model):
        x_all = autograd_input(inputs)
        size = chunk_size(model, x_all[:1], len(x_all), copies=2, max_memory=max_memory)
        parts = [
            _perturb_chunk(model, x_all[start : start + size],
                           None if targets is None else targets[start : start + size], float(rho), adaptive)
            for start in range(0, len(x_all), size)
        ]
    return Perturbation(*(torch.cat([getattr(p, field) for p in parts]) for field in
                          ("targets", "clean_logits", "perturbed_logits", "clean_loss", "perturbed_loss")))


def perturbed_losses(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    rho: float = 0.05,
    adaptive: bool = False,
) -> torch.Tensor:
    """The maximally perturbed loss max_{||eps|| <= rho} l(x, y; theta + eps) of every item (1-D tensor).

    With ``targets=None`` (pseudo labels) this is the SAAL score, computed by
    :func:`~saal_lightning.acquisition.saal_score.saal_scores`; with given labels (e.g. the true ones, the paper's
    Figure 3) the same ascent step is taken for the given label, by :func:`perturb`.

    Example::

        >>> from saal_lightning.models.backbones import build_backbone
        >>> model = build_backbone("small_cnn", num_classes=4, in_channels=1)
        >>> perturbed_losses(model, torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 3])).shape
        torch.Size([3])
    """
    if targets is None:
        check_batch(model, inputs, None)
        return saal_scores(model, inputs, rho=rho, adaptive=adaptive)
    return perturb(model, inputs, targets, rho=rho, adaptive=adaptive).perturbed_loss


def prediction_kept_fraction(model: nn.Module, inputs: torch.Tensor, rho: float = 0.05,
                             adaptive: bool = False) -> float:
    """ψ(ρ) = (1/|X|) Σ_x 1[argmax_j f_{theta+eps_hat}(x)_j = yhat], eps_hat each item's own pseudo-label step."""
    return perturb(model, inputs, None, rho=rho, adaptive=adaptive).kept_fraction


def margins(model: nn.Module, inputs: torch.Tensor, rho: float = 0.05, adaptive: bool = False) -> torch.Tensor:
    """δ_x of Theorem 3.1 per item: [max_j f_{theta+eps_hat}(x)_j - f_{theta+eps_hat}(x)_yhat]_+ (logits).

    eps_hat is the item's own maximal perturbation for its pseudo label yhat = argmax f_theta(x) (Appendix A.2.1:
    the ε of the margin's definition maximises l(x, yhat; theta + eps)). No true label is needed; δ_x = 0 exactly
    when the perturbed prediction is still yhat.
    """
    return perturb(model, inputs, None, rho=rho, adaptive=adaptive).margins


def relative_margin(margin: torch.Tensor, true_label_losses: torch.Tensor) -> float:
    """r(ρ) of Figure 4b: the mean over items of δ_x / max l(x, ybar; theta + eps) (``nan`` for no items).

    An item with δ_x = 0 adds 0 (also when its loss is 0).

    Args:
        margin: δ_x per item (:func:`margins`).
        true_label_losses: the same items' maximally perturbed losses for their true labels
            (:func:`perturbed_losses` with ``targets``).
    """
    if margin.shape != true_label_losses.shape or margin.ndim != 1:
        raise ValueError(f"margin and true_label_losses must be 1-D of one shape, got {tuple(margin.shape)} and "
                         f"{tuple(true_label_losses.shape)}")
    if len(margin) == 0:
        return math.nan
    margin, losses = margin.double(), true_label_losses.double()
    # An item without a margin contributes 0, even where its loss underflowed to 0.
    return float(torch.where(margin == 0, 0.0, margin / losses).mean())
