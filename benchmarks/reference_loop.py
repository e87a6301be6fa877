"""The reference SAAL score: a plain one-item-at-a-time loop, as in the authors' code.

This is the test oracle and the benchmark's baseline, deliberately not part of the library: for each item it runs
one forward, takes the gradient of the pseudo-label loss with ``torch.autograd.grad``, adds the ascent step to the
parameters in place, runs a second forward and copies the original parameters back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

ParamFilter = Callable[[str, nn.Parameter], bool]


def _all_trainable(name: str, param: nn.Parameter) -> bool:
    return param.requires_grad


@torch.no_grad()
def _perturbed_loss(model: nn.Module, x: torch.Tensor, params: list[nn.Parameter], rho: float,
                    adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        logits = model(x)
        pseudo = logits.argmax(dim=1)
        loss = F.cross_entropy(logits, pseudo)
        grads = torch.autograd.grad(loss, params)
    if adaptive:
        norm = torch.linalg.vector_norm(torch.stack([(p.abs() * g).norm() for p, g in zip(params, grads, strict=True)]))
        steps = [rho * p**2 * g / (norm + 1e-12) for p, g in zip(params, grads, strict=True)]
    else:
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        steps = [rho * g / (norm + 1e-12) for g in grads]
    originals = [p.detach().clone() for p in params]
    try:
        for p, step in zip(params, steps, strict=True):
            p.add_(step)
        perturbed = F.cross_entropy(model(x), pseudo)
    finally:
        for p, original in zip(params, originals, strict=True):
            p.copy_(original)
    return loss.detach(), perturbed


def reference_saal_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    rho: float = 0.05,
    adaptive: bool = False,
    mode: str = "max",
    perturb: ParamFilter = _all_trainable,
) -> torch.Tensor:
    """SAAL scores one item at a time; ``perturb(name, param)`` picks the parameters that get the ascent step.

    The gradient, its norm and the step are taken over the picked parameters only, so
    ``perturb=lambda name, p: name.startswith("head.")`` is "perturb only the head". The model is scored in eval mode
    and its training flag is restored afterwards.
    """
    params = [p for name, p in model.named_parameters() if perturb(name, p)]
    was_training = model.training
    model.eval()
    try:
        scores = []
        for x in inputs:
            clean, perturbed = _perturbed_loss(model, x.unsqueeze(0), params, rho, adaptive)
            scores.append(perturbed - clean if mode == "diff" else perturbed)
        return torch.stack(scores)
    finally:
        model.train(was_training)
