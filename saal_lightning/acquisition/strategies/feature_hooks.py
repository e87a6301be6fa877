"""Forward hooks that read a classifier's intermediate tensors without changing its code.

Strategies get the user's model as it is (any ``nn.Module`` returning logits), so the tensors they need are
captured with forward hooks that are always removed again, even when the forward raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@contextmanager
def capture_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of ``modules[name]`` stores its output tensor under ``name``.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with capture_outputs({"hidden": model[1]}) as captured:
        ...     _ = model(torch.zeros(5, 3))
        >>> captured["hidden"].shape
        torch.Size([5, 4])
    """
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"module {name!r} returns {type(output).__name__}, expected a tensor to capture")
            captured[name] = output

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LastLinear:
    """What one forward showed about the classifier's last ``nn.Linear``."""

    logits: torch.Tensor
    features: torch.Tensor  # the layer's input: the penultimate-layer embedding, [B, D]
    layer: nn.Linear
    is_output: bool  # whether the layer's output is the model's output (the logits) unchanged


def forward_last_linear(model: nn.Module, inputs: torch.Tensor) -> LastLinear:
    """Run ``model(inputs)`` and capture the input of the last ``nn.Linear`` that ran (in execution order).

    Execution order rather than registration order, so that a head registered before the body is still found.

    Raises:
        ValueError: if the model has no ``nn.Linear`` module, none ran, or its input is not ``[B, D]``.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> forward_last_linear(model, torch.zeros(5, 3)).features.shape
        torch.Size([5, 4])
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear module: this strategy reads the penultimate features as the "
            "input of the classifier's last nn.Linear layer"
        )
    last: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
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
