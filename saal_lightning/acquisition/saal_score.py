"""The SAAL acquisition score as a pure function (paper eq. 6), vectorized with torch.func.

STARTING POINT ONLY: the generic torch.func path. The fast exact paths and approximations come with issue 4.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F


def saal_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    rho: float = 0.05,
    adaptive: bool = False,
    mode: str = "max",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """One SAAL score per input: ``max_{||eps||<=rho} CE(f_{theta+eps}(x), yhat)`` with the SAM ascent step."""
    was_training = model.training
    model.eval()
    try:
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def loss_fn(p, x, y):
            logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
            return F.cross_entropy(logits, y.unsqueeze(0))

        def perturbed_loss(p, x, y):
            return loss_fn(p, x, y)

        scores = []
        chunk = chunk_size or 64
        with torch.no_grad():
            logits = model(inputs)
        pseudo = logits.argmax(dim=1)
        clean = F.cross_entropy(logits, pseudo, reduction="none")
        for start in range(0, inputs.shape[0], chunk):
            x = inputs[start : start + chunk]
            y = pseudo[start : start + chunk]
            grads = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)
            if adaptive:
                norm = torch.sqrt(sum(((params[k].abs() * g) ** 2).flatten(1).sum(1) for k, g in grads.items()))
                eps = {k: rho * params[k] ** 2 * g / (norm.view(-1, *[1] * (g.ndim - 1)) + 1e-12)
                       for k, g in grads.items()}
            else:
                norm = torch.sqrt(sum((g**2).flatten(1).sum(1) for g in grads.values()))
                eps = {k: rho * g / (norm.view(-1, *[1] * (g.ndim - 1)) + 1e-12) for k, g in grads.items()}
            perturbed = {k: params[k] + eps[k] for k in params}
            with torch.no_grad():
                scores.append(vmap(perturbed_loss, in_dims=(0, 0, 0))(perturbed, x, y))
        result = torch.cat(scores)
        return result - clean if mode == "diff" else result
    finally:
        model.train(was_training)
