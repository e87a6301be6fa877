"""Approximate SAAL scores that skip the per-sample perturbed forward of the whole network.

``last_layer``: only the classifier head (the last ``nn.Linear`` that runs, found by
:func:`~saal_lightning.acquisition.functional.head.forward_output_head`; its output must be the model's output) is
perturbed, with the ascent step taken from the head's own per-sample gradient. For logits z = W h + b and
delta = softmax(z) - onehot(yhat), the head's gradient is (delta h^T, delta), so the perturbed logits have a closed
form in the penultimate features h and one clean forward is all it costs:

* plain ball: z' = z + c delta (||h||^2 + 1), with c = rho / (||delta|| sqrt(||h||^2 + 1));
* adaptive ball: z' = z + c (delta * (W^2 h^2) + b^2 * delta), with c = rho / sqrt(delta^2 . W^2 h^2 + b^2 . delta^2).

(Terms for a frozen weight or bias drop out.) The first-order approximation lives with the exact engines, as it
only needs their per-sample gradient norms.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from saal_lightning.acquisition.functional.head import forward_output_head
from saal_lightning.acquisition.scoring_common import (
    DENOMINATOR_EPS,
    activation_numel_per_sample,
    element_size,
)


def last_layer_losses(model: nn.Module, x: torch.Tensor, rho: float, adaptive: bool) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Clean loss and the loss with only the classifier head perturbed, for every item in ``x``."""
    with torch.no_grad():
        found = forward_output_head(model, x, "method='last_layer'")  # its features are [batch, features]
    head, logits, features = found.layer, found.logits, found.features
    if not any(p.requires_grad for p in head.parameters()):
        raise ValueError("method='last_layer': the classifier head (the last nn.Linear that runs) has no trainable "
                         "parameters")
    pseudo = logits.argmax(dim=1)
    clean = F.cross_entropy(logits, pseudo, reduction="none")
    delta = torch.softmax(logits, dim=1) - F.one_hot(pseudo, logits.shape[1]).to(logits.dtype)
    sq_norm = torch.zeros_like(clean)
    direction = torch.zeros_like(logits)  # eps applied to the features, before the scale c
    if head.weight.requires_grad:
        if adaptive:
            spread = features.square() @ head.weight.square().T  # W^2 h^2, [N, classes]
            sq_norm += (delta.square() * spread).sum(1)
            direction += delta * spread
        else:
            h2 = features.square().sum(1, keepdim=True)
            sq_norm += delta.square().sum(1) * h2.squeeze(1)
            direction += delta * h2
    if head.bias is not None and head.bias.requires_grad:
        bias_weight = head.bias.square() if adaptive else torch.ones_like(head.bias)
        sq_norm += (bias_weight * delta.square()).sum(1)
        direction += bias_weight * delta
    scale = rho / (sq_norm.sqrt() + DENOMINATOR_EPS)
    perturbed = F.cross_entropy(logits + scale.unsqueeze(1) * direction, pseudo, reduction="none")
    return clean, perturbed


def last_layer_bytes_per_sample(model: nn.Module, probe: torch.Tensor) -> int:
    """Working memory per item: one no-grad forward's activations (with headroom for their temporaries)."""
    return element_size(probe) * 2 * activation_numel_per_sample(model, probe)
