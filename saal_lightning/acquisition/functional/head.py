"""The classifier head: the last ``nn.Linear`` that runs in the model's forward, found by running it.

Every path that needs the head (BADGE's gradient embeddings, coreset's features, SAAL's ``method="last_layer"``)
finds it here, so they cannot disagree. Execution order, not registration order: a model may register its head
before its body (``self.head = nn.Linear(...)`` first in ``__init__``), and the head is still the layer whose
output the forward returns. The probe is the forward on the batch itself, so finding the head costs nothing extra;
the hooks are removed again even when the forward raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LastLinear:
    """What one forward showed about the model's last ``nn.Linear``."""

    logits: torch.Tensor  # what the model returned
    features: torch.Tensor  # the layer's input: the penultimate-layer embedding, [B, D]
    layer: nn.Linear
    is_output: bool  # whether the layer's output is the model's output (the logits) unchanged


def forward_last_linear(model: nn.Module, inputs: torch.Tensor) -> LastLinear:
    """Run ``model(inputs)`` and capture the input and output of the last ``nn.Linear`` that ran.

    Raises:
        ValueError: if the model has no ``nn.Linear`` module, none ran, or the last one's input is not ``[B, D]``.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> head = forward_last_linear(model, torch.zeros(5, 3))
        >>> head.layer is model[2], head.features.shape, head.is_output
        (True, torch.Size([5, 4]), True)
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear module: the classifier head is the last nn.Linear that runs "
            "in the forward, and its input the penultimate features"
        )
    last: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        last[:] = [(module, args[0], output)]

    handles = [module.register_forward_hook(hook) for module in linears]
    try:
        logits = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not last:
        raise ValueError(f"none of the nn.Linear modules of {type(model).__name__} ran in its forward")
    layer, features, output = last[0]
    if features.ndim != 2:
        raise ValueError(
            f"the last nn.Linear of {type(model).__name__} got an input of shape {tuple(features.shape)}; "
            "expected [batch, features]"
        )
    return LastLinear(logits=logits, features=features, layer=layer, is_output=output is logits)


def forward_output_head(model: nn.Module, inputs: torch.Tensor, needed_by: str) -> LastLinear:
    """:func:`forward_last_linear`, refusing a model whose output is not that layer's output unchanged.

    Closed forms in the head's parameters (BADGE's embedding, the ``last_layer`` score) are the gradient of the
    model's loss only when the logits come straight out of the head; ``needed_by`` names the caller in the error.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
        >>> forward_output_head(model, torch.zeros(1, 3), "this example")
        Traceback (most recent call last):
        ...
        ValueError: this example needs the logits to come straight out of the classifier head (the last nn.Linear \
that runs); the output of that layer of Sequential is not what the model returns
    """
    head = forward_last_linear(model, inputs)
    if not head.is_output:
        raise ValueError(
            f"{needed_by} needs the logits to come straight out of the classifier head (the last nn.Linear that "
            f"runs); the output of that layer of {type(model).__name__} is not what the model returns"
        )
    return head
