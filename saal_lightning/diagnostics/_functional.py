"""The ``torch.func`` plumbing the diagnostics share: eval mode, the model's state, per-item losses, chunks.

Every diagnostic looks at the model as the SAAL scorer does (:func:`saal_lightning.acquisition.saal_score.saal_scores`):
in eval mode (BatchNorm on its running statistics, dropout off, so items do not interact), differentiating with
respect to the trainable parameters only, and leaving the model exactly as it was (training flags, parameters,
buffers and ``.grad`` untouched).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from saal_lightning.acquisition.saal_score import DEFAULT_MAX_MEMORY
from saal_lightning.acquisition.scoring_common import (
    activation_numel_per_sample,
    check_logits,
    check_model_and_inputs,
    element_size,
)

Params = dict[str, torch.Tensor]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode with autograd on (also inside ``torch.inference_mode``), training flags restored afterwards."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def split_state(model: nn.Module) -> tuple[Params, Params]:
    """Trainable parameters (detached: what is differentiated) and everything else the forward reads."""
    trainable: Params = {}
    fixed: Params = {}
    for name, parameter in model.named_parameters():
        (trainable if parameter.requires_grad else fixed)[name] = parameter.detach()
    fixed.update(dict(model.named_buffers()))
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    return trainable, fixed


def item_logits(model: nn.Module, fixed: Params) -> Callable[[Params, torch.Tensor], torch.Tensor]:
    """``logits(params, x_i)``: one item's logits ``[classes]`` under the given parameters."""

    def logits(params: Params, xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (params, fixed), (xi.unsqueeze(0),))
        check_logits(out, xi.unsqueeze(0))
        return out.squeeze(0)

    return logits


def item_loss(model: nn.Module, fixed: Params) -> Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(params, x_i, y_i)``: one item's cross-entropy for the class ``y_i`` under the given parameters."""
    logits = item_logits(model, fixed)

    def loss(params: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(params, xi).unsqueeze(0), yi.unsqueeze(0))

    return loss


def check_batch(model: nn.Module, inputs: object, targets: object) -> None:
    """Raise for a non-module, non-tensor inputs, no items, or targets that are not one class index per item."""
    model, inputs = check_model_and_inputs(model, inputs)
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError("targets must be None (pseudo labels) or an integer tensor of class indices")
    if targets.shape != (inputs.shape[0],):
        raise ValueError(f"targets must have shape ({inputs.shape[0]},), one class per item; got "
                         f"{tuple(targets.shape)}")


def autograd_input(x: torch.Tensor) -> torch.Tensor:
    """Tensors made under ``torch.inference_mode`` cannot enter autograd: a normal copy of them."""
    return x.clone() if x.is_inference() else x


def logits_and_targets(model: nn.Module, x: torch.Tensor,
                       targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean batched logits (no grad) and the targets: the given ones, or the pseudo labels ``argmax f(x)``."""
    with torch.no_grad():
        logits = model(x)
    check_logits(logits, x)
    labels = logits.argmax(dim=1) if targets is None else targets.to(device=x.device, dtype=torch.long)
    if targets is not None and len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"targets must be class indices in [0, {logits.shape[1]}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return logits, labels


def global_norm(tensors: Params, params: Params | None = None, adaptive: bool = False) -> torch.Tensor:
    """Per-item ``||t||`` (``adaptive``: ``|| |w| * t ||`` with ``params`` w) over all parameters; ``tensors`` are
    ``[items, ...]``."""
    if adaptive and params is None:
        raise ValueError("the adaptive norm needs the parameters")
    squares = [((params[name].abs() * t) if adaptive and params is not None else t).flatten(1).square().sum(1)
               for name, t in tensors.items()]
    return torch.stack(squares).sum(0).sqrt()


def chunk_size(model: nn.Module, probe: torch.Tensor, items: int, copies: int, max_memory: int | None) -> int:
    """Items per chunk so that ``copies`` per-item copies of the parameters plus activations fit the budget."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        activations = activation_numel_per_sample(model, probe)
    per_item = element_size(probe) * (copies * n_params + 4 * copies * activations)
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    return max(1, min(items, 256, budget // max(1, per_item)))
