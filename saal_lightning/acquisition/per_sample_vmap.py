"""The generic SAAL engine: per-sample gradients and perturbed forwards with ``torch.func``.

Works for any model that ``torch.func`` can transform in eval mode (every layer type, weight tying, custom
modules). It materialises every sample's full gradient and its perturbed copy of the weights (about 2 x 4 bytes per
parameter per sample in float32), and runs the perturbed forward with per-sample weights, which PyTorch lowers to
grouped convolutions. The hook engine (:mod:`saal_lightning.acquisition.per_sample_hooks`) avoids both for the
layers it knows; this one is its fallback.

The model is never written to: ``functional_call`` swaps the given tensors into the modules' parameter and buffer
dicts and swaps the originals back in a ``finally`` block, and the per-sample gradients are new tensors (turned into
perturbed weights in place), never the parameters' storage or ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from saal_lightning.acquisition.scoring_common import (
    DENOMINATOR_EPS,
    activation_numel_per_sample,
    check_logits,
    element_size,
    perturb_in_place,
)


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Trainable parameters (what gets perturbed) and everything else the forward reads (frozen params, buffers)."""
    trainable: dict[str, torch.Tensor] = {}
    fixed: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else fixed)[name] = p.detach()
    fixed.update({name: b for name, b in model.named_buffers()})
    return trainable, fixed


_Loss = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # (loss, (loss, pseudo label)): grad's has_aux form


def _per_sample_loss(model: nn.Module, fixed: dict[str, torch.Tensor]) -> Callable[..., _Loss]:
    """``loss(params, x_i, y_i)`` for one item; ``y_i=None`` takes the item's own argmax as its pseudo label."""

    def loss(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor | None = None) -> _Loss:
        logits = functional_call(model, (params, fixed), (xi.unsqueeze(0),))
        check_logits(logits, xi.unsqueeze(0))
        pseudo = logits.argmax(dim=1) if yi is None else yi.unsqueeze(0)
        value = F.cross_entropy(logits, pseudo)
        return value, (value, pseudo.squeeze(0))

    return loss


def _per_sample_grads(
    model: nn.Module, x: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the pseudo-label loss, the clean loss and the pseudo labels (one batched pass)."""
    trainable, fixed = _split_state(model)
    with torch.enable_grad():
        grads, (clean, pseudo) = vmap(grad(_per_sample_loss(model, fixed), has_aux=True), in_dims=(None, 0))(
            trainable, x
        )
    return grads, clean.detach(), pseudo


def _global_norm(grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor], adaptive: bool) -> torch.Tensor:
    """Per-sample ``||g||`` (plain ball) or ``|| |w| * g ||`` (adaptive ball) over all trainable parameters."""
    squares = [
        ((params[name].abs() * g) if adaptive else g).flatten(1).square().sum(1) for name, g in grads.items()
    ]
    return torch.stack(squares).sum(0).sqrt()


def vmap_norms(model: nn.Module, x: torch.Tensor, adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean pseudo-label loss and per-sample gradient norm (the first-order approximation's inputs)."""
    grads, clean, _ = _per_sample_grads(model, x)
    trainable, _ = _split_state(model)
    return clean, _global_norm(grads, trainable, adaptive)


def vmap_losses(model: nn.Module, x: torch.Tensor, rho: float, adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and perturbed pseudo-label loss of every sample in ``x`` (exact SAAL, any model)."""
    grads, clean, pseudo = _per_sample_grads(model, x)
    trainable, fixed = _split_state(model)
    scale = rho / (_global_norm(grads, trainable, adaptive) + DENOMINATOR_EPS)
    perturb_in_place(grads, trainable, scale, adaptive)
    with torch.no_grad():
        perturbed, _ = vmap(_per_sample_loss(model, fixed))(grads, x, pseudo)
    return clean, perturbed


def vmap_bytes_per_sample(model: nn.Module, probe: torch.Tensor, adaptive: bool) -> int:
    """Rough peak working memory per sample: gradient + perturbed weights, and the activations of both passes."""
    trainable, _ = _split_state(model)
    n_params = sum(p.numel() for p in trainable.values())
    return element_size(probe) * (3 * n_params + 4 * activation_numel_per_sample(model, probe))
