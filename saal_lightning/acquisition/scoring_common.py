"""Pieces the SAAL scoring engines share: the norm's guard, the logits check, hook registration that cannot leak, and
a one-item shape probe."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# The authors' code divides by (norm + 1e-12); keeping it makes scores match theirs when a gradient vanishes.
DENOMINATOR_EPS = 1e-12


def check_logits(logits: object, x: torch.Tensor) -> None:
    """Raise a ValueError unless the model's output is a [batch, classes] tensor for the batch ``x``."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape [batch, classes]; got {shape} for a batch of "
                         f"{x.shape[0]}")


def element_size(x: torch.Tensor) -> int:
    """Bytes per element of the floating dtype the scorer computes in."""
    return x.element_size() if x.is_floating_point() else torch.get_default_dtype().itemsize


@contextmanager
def hooks_registered(modules: Iterable[nn.Module],
                     register: Callable[[nn.Module], RemovableHandle]) -> Iterator[None]:
    """Register one hook per module for the duration of the block; every hook registered is removed again, also when
    the block, or the registration of a later hook, raises (the model must not keep a scorer's hook)."""
    handles: list[RemovableHandle] = []
    try:
        for module in modules:
            handles.append(register(module))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class LeafCall:
    """One call of a leaf module during the probe forward, with the shapes of its first input and its output."""

    module: nn.Module
    input_shape: torch.Size
    output_shape: torch.Size


def probe_leaf_calls(model: nn.Module, probe: torch.Tensor) -> list[LeafCall]:
    """Shapes seen by every leaf module in one no-grad forward of ``probe`` (one item), in call order."""
    calls: list[LeafCall] = []

    def record(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append(LeafCall(module, args[0].shape, output.shape))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    with hooks_registered(leaves, lambda m: m.register_forward_hook(record)), torch.no_grad():
        model(probe)
    return calls


def activation_numel_per_sample(model: nn.Module, probe: torch.Tensor) -> int:
    """Elements of all leaf-module outputs for one item: a proxy for what autograd keeps alive per sample."""
    return sum(call.output_shape.numel() for call in probe_leaf_calls(model, probe))


def check_model_and_inputs(model: object, inputs: object) -> tuple[nn.Module, torch.Tensor]:
    """Refuse a non-module model and inputs that are not a tensor of at least one item along dim 0; return both."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must hold at least one item along dim 0, got shape {tuple(inputs.shape)}")
    return model, inputs


def perturb_in_place(
    grads: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], scale: torch.Tensor, adaptive: bool
) -> dict[str, torch.Tensor]:
    """Turn per-item gradients ``[B, *w.shape]`` into per-item perturbed weights ``w + scale_i (w^2 if adaptive) g_i``.

    In place, so that only one per-item copy of the model is alive. A parameter the loss does not reach (a layer
    run under no_grad) gets expanded zeros from ``torch.func``, which share memory and cannot be written in place:
    those are copied (``contiguous()`` returns every other gradient as it is).
    """
    for name in list(grads):
        g = grads[name] = grads[name].contiguous()
        w = weights[name]
        g.mul_(scale.view(-1, *[1] * w.ndim))
        if adaptive:
            g.mul_(w.square())
        g.add_(w)
    return grads
