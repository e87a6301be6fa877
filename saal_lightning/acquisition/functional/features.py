"""Intermediate tensors of a classifier, read with forward hooks without changing its code.

Strategies get the user's model as it is (any ``nn.Module`` returning logits), so the tensors they need are
captured with forward hooks that are always removed again, even when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from saal_lightning.acquisition.functional.head import forward_last_linear


def penultimate_features(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The input of the classifier head (:func:`~.head.forward_last_linear`) for every item, in float32: ``[B, D]``.

    This is coreset's embedding (Sener & Savarese, ICLR 2018).

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> inputs = torch.randn(5, 3)
        >>> torch.equal(penultimate_features(model, inputs), model[1](model[0](inputs)))
        True
    """
    return forward_last_linear(model, inputs).features.float()


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

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
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
