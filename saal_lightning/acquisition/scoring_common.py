"""Pieces the SAAL scoring engines share: the norm's guard, the logits check and a one-item shape probe."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The authors' code divides by (norm + 1e-12); keeping it makes scores match theirs when a gradient vanishes.
DENOMINATOR_EPS = 1e-12


def check_logits(logits: torch.Tensor, x: torch.Tensor) -> None:
    """Raise a ValueError unless the model's output is a [batch, classes] tensor for the batch ``x``."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape [batch, classes]; got {shape} for a batch of "
                         f"{x.shape[0]}")


def element_size(x: torch.Tensor) -> int:
    """Bytes per element of the floating dtype the scorer computes in."""
    return x.element_size() if x.is_floating_point() else torch.get_default_dtype().itemsize


@dataclass(frozen=True)
class LeafCall:
    """One call of a leaf module during the probe forward, with the shapes of its first input and its output."""

    module: nn.Module
    input_shape: torch.Size
    output_shape: torch.Size


def probe_leaf_calls(model: nn.Module, probe: torch.Tensor) -> list[LeafCall]:
    """Shapes seen by every leaf module in one no-grad forward of ``probe`` (one item), in call order."""
    calls: list[LeafCall] = []

    def record(module: nn.Module, args: tuple, output: object) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append(LeafCall(module, args[0].shape, output.shape))

    handles = [m.register_forward_hook(record) for m in model.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def activation_numel_per_sample(model: nn.Module, probe: torch.Tensor) -> int:
    """Elements of all leaf-module outputs for one item: a proxy for what autograd keeps alive per sample."""
    return sum(call.output_shape.numel() for call in probe_leaf_calls(model, probe))
