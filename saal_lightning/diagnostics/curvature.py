"""The terms of Theorem 3.3's upper bound on the SAAL score: loss, gradient norm and the Hessian's top eigenvalue.

Theorem 3.3 (Appendix A.2.3): for the loss l(theta) = l(x, y; theta) of one item,

    max_{||eps|| <= rho} l(theta + eps) <= l(theta) + rho ||grad l(theta)||_2 + 1/2 rho^2 lambda_1 + O(rho^3),

with lambda_1 the largest eigenvalue of that item's loss Hessian with respect to all trainable parameters. For the
SAAL score, y is the pseudo label yhat = argmax f_theta(x) (``targets=None`` here). With ``adaptive=True`` the same
expansion over the authors' ASAM ball {eps = |w| * u : ||u|| <= rho} gives rho || |w| * grad l || and the top
eigenvalue of diag(|w|) H diag(|w|); the paper's figure uses the plain ball (the default).

lambda_1 comes from the Lanczos method on Hessian-vector products (reverse over reverse: the gradient of
<grad l, v>, batched over items with ``torch.func.vmap``), never forming the Hessian: each product costs about two
backward passes, and the largest Ritz value converges to the largest (algebraic) eigenvalue even where a negative
eigenvalue is larger in magnitude (where plain power iteration would find that one). Lanczos keeps its basis, one
parameter-sized vector per iteration and item. The model is evaluated as the SAAL scorer does (eval mode, left
exactly as it was).

Example::

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> terms = bound_terms(model, torch.randn(2, 4), rho=0.05, iterations=5)
    >>> terms.loss.shape, terms.gradient_term.shape, terms.curvature_term.shape
    (torch.Size([2]), torch.Size([2]), torch.Size([2]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, vmap

from saal_lightning.diagnostics._functional import (
    Params,
    autograd_input,
    check_batch,
    chunk_size,
    evaluating,
    global_norm,
    item_loss,
    logits_and_targets,
    split_state,
)

Hvp = Callable[[torch.Tensor, torch.Tensor, Params], Params]


def _check_iterations(iterations: object, tolerance: object) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")


def _losses_and_norms(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None,
                      adaptive: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-item loss, gradient norm (plain or adaptive) and the labels used, for one chunk."""
    trainable, fixed = split_state(model)
    _, labels = logits_and_targets(model, x, targets)
    loss = item_loss(model, fixed)

    def with_value(params: Params, xi: torch.Tensor, yi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = loss(params, xi, yi)
        return value, value

    grads, values = vmap(grad(with_value, has_aux=True), in_dims=(None, 0, 0))(trainable, x, labels)
    return values.detach(), global_norm(grads, trainable, adaptive).detach(), labels


def _chunks(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None, copies: int,
            max_memory: int | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    x_all = autograd_input(inputs)
    size = chunk_size(model, x_all[:1], len(x_all), copies=copies, max_memory=max_memory)
    return [(x_all[start : start + size], None if targets is None else targets[start : start + size])
            for start in range(0, len(x_all), size)]


def gradient_norms(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    adaptive: bool = False,
    *,
    max_memory: int | None = None,
) -> torch.Tensor:
    """Per item, ||grad_theta l(x, y; theta)||_2 over all trainable parameters (``adaptive``: || |w| * grad l ||).

    ``targets=None`` takes the pseudo labels argmax f_theta(x). Returns a 1-D tensor on the inputs' device.
    """
    check_batch(model, inputs, targets)
    with evaluating(model):
        return torch.cat([_losses_and_norms(model, x, y, adaptive)[1]
                          for x, y in _chunks(model, inputs, targets, 2, max_memory)])


def _hvp(model: nn.Module, adaptive: bool) -> Hvp:
    """Batched ``hvp(x, y, v)``: each item's Hessian (``adaptive``: diag(|w|) H diag(|w|)) times its own v."""
    trainable, fixed = split_state(model)
    item_gradient = grad(item_loss(model, fixed))
    scale = {name: w.abs() for name, w in trainable.items()}

    def one(xi: torch.Tensor, yi: torch.Tensor, v: Params) -> Params:
        if adaptive:
            v = {name: scale[name] * t for name, t in v.items()}
        # Reverse over reverse: the gradient of <grad l, v>. (Forward over reverse, jvp of the gradient, measured
        # 6x slower under vmap on CPU for the small CNN.)
        hv = grad(lambda params: _dot_one(item_gradient(params, xi, yi), v))(trainable)
        return {name: scale[name] * t for name, t in hv.items()} if adaptive else hv

    return vmap(one)


def _dot_one(a: Params, b: Params) -> torch.Tensor:
    return sum((a[name] * b[name]).sum() for name in a)  # type: ignore[return-value]


class _Flat:
    """Between a parameter dict of per-item tensors ``[items, *shape]`` and one flat ``[items, P]`` matrix."""

    def __init__(self, params: Params) -> None:
        self.names = list(params)
        self.shapes = [params[name].shape for name in self.names]
        self.sizes = [shape.numel() for shape in self.shapes]

    def flatten(self, tensors: Params) -> torch.Tensor:
        return torch.cat([tensors[name].flatten(1) for name in self.names], dim=1)

    def unflatten(self, flat: torch.Tensor) -> Params:
        parts = flat.split(self.sizes, dim=1)
        return {name: part.reshape(len(flat), *shape) for name, part, shape in
                zip(self.names, parts, self.shapes, strict=True)}


def _tridiagonal(alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Batched symmetric tridiagonal matrices from diagonals ``[n, k]`` and off-diagonals ``[n, k - 1]``."""
    matrix = torch.diag_embed(alphas)
    if betas.shape[1]:
        matrix = matrix + torch.diag_embed(betas, offset=1) + torch.diag_embed(betas, offset=-1)
    return matrix


def _lanczos_top(hvp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], start: torch.Tensor, iterations: int,
                 tolerance: float) -> torch.Tensor:
    """The largest Ritz value of each row's Krylov space, by Lanczos with full reorthogonalization.

    ``hvp(rows, q)`` multiplies the Hessians of the items ``rows`` with the rows of ``q`` (``[len(rows), P]``).
    An item stops when its Ritz pair's residual ||H y - theta y|| = beta_j |s_j| is at most ``tolerance |theta|``
    (then H has an eigenvalue within that distance of theta), when its Krylov space is invariant (theta is then
    exact), or after ``iterations`` products.
    """
    n, size = start.shape
    steps = min(iterations, size)
    basis = torch.zeros(steps + 1, n, size, dtype=start.dtype, device=start.device)
    basis[0] = start / start.norm(dim=1, keepdim=True).clamp_min(torch.finfo(start.dtype).tiny)
    alphas = torch.zeros(n, steps, dtype=torch.float64, device=start.device)
    betas = torch.zeros(n, steps, dtype=torch.float64, device=start.device)
    top = torch.zeros(n, dtype=torch.float64, device=start.device)
    scale = torch.zeros(n, dtype=torch.float64, device=start.device)
    active = torch.ones(n, dtype=torch.bool, device=start.device)
    breakdown = 100 * torch.finfo(start.dtype).eps
    for j in range(steps):
        rows = active.nonzero().flatten()
        if len(rows) == 0:
            break
        q = basis[j, rows]
        w = hvp(rows, q)
        alpha = (w * q).sum(dim=1)
        previous = basis[: j + 1, rows].transpose(0, 1)  # [rows, j + 1, P]
        for _ in range(2):  # classical Gram-Schmidt twice keeps the basis orthogonal in float32
            w = w - torch.einsum("rk,rkp->rp", torch.einsum("rkp,rp->rk", previous, w), previous)
        beta = w.norm(dim=1)
        alphas[rows, j], betas[rows, j] = alpha.double(), beta.double()
        values, vectors = torch.linalg.eigh(_tridiagonal(alphas[rows, : j + 1], betas[rows, :j]))
        theta = values[:, -1]
        residual = betas[rows, j] * vectors[:, -1, -1].abs()
        scale[rows] = torch.maximum(scale[rows], alpha.double().abs() + beta.double())
        top[rows] = theta
        invariant = betas[rows, j] <= breakdown * scale[rows]
        converged = invariant | (residual <= tolerance * theta.abs())
        basis[j + 1, rows] = w / beta.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(1)
        active[rows[converged]] = False
    return top


def _top_eigenvalue_chunk(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None, adaptive: bool,
                          iterations: int, tolerance: float, generator: torch.Generator) -> torch.Tensor:
    trainable, _ = split_state(model)
    _, labels = logits_and_targets(model, x, targets)
    batched_hvp = _hvp(model, adaptive)
    flat = _Flat(trainable)

    def hvp(rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return flat.flatten(batched_hvp(x[rows], labels[rows], flat.unflatten(q)))

    size = sum(flat.sizes)
    like = next(iter(trainable.values()))
    start = torch.randn(len(x), size, generator=generator, dtype=like.dtype).to(like.device)
    return _lanczos_top(hvp, start, iterations, tolerance)


def top_hessian_eigenvalue(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    iterations: int = 20,
    tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
    *,
    adaptive: bool = False,
    max_memory: int | None = None,
) -> torch.Tensor:
    """Per item, lambda_1: the largest eigenvalue of the Hessian of l(x, y; theta) over all trainable parameters.

    Lanczos on Hessian-vector products, batched over items; an item stops when H provably has an eigenvalue within
    ``tolerance`` (relative) of its estimate, or after ``iterations`` products (see the module docstring). The
    estimate is a lower bound of lambda_1 that rises to it (it is the top of the Krylov space's spectrum). Returns
    float64 values on the inputs' device.

    Args:
        model: maps ``inputs`` to logits ``[items, classes]``, on the inputs' device.
        inputs: the items, batched along dim 0.
        targets: one class index per item, or ``None`` for the pseudo labels argmax f_theta(x).
        iterations: at most this many Hessian-vector products per item (and at most the parameter count).
        tolerance: relative residual at which an item has converged (0: run all iterations).
        generator: a CPU generator for the random start vectors (default: seeded with 0, so results repeat).
        adaptive: the top eigenvalue of diag(|w|) H diag(|w|) instead (the ASAM ball's curvature).
        max_memory: working-memory budget in bytes that picks the chunk size (default 1 GiB); an estimate.
    """
    check_batch(model, inputs, targets)
    _check_iterations(iterations, tolerance)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with evaluating(model):
        return torch.cat([_top_eigenvalue_chunk(model, x, y, adaptive, iterations, float(tolerance), generator)
                          for x, y in _chunks(model, inputs, targets, iterations + 8, max_memory)])


@dataclass(frozen=True)
class BoundTerms:
    """Theorem 3.3's terms per item (1-D tensors): loss l, gradient norm ||grad l|| and top eigenvalue lambda_1.

    Attributes:
        loss: l(x, y; theta).
        gradient_norm: ||grad_theta l||_2 (adaptive ball: || |w| * grad l ||).
        top_eigenvalue: lambda_1 of the loss Hessian (adaptive ball: of diag(|w|) H diag(|w|)).
        rho: the radius the terms are scaled with.
    """

    loss: torch.Tensor
    gradient_norm: torch.Tensor
    top_eigenvalue: torch.Tensor
    rho: float

    @property
    def gradient_term(self) -> torch.Tensor:
        """rho ||grad l||."""
        return self.rho * self.gradient_norm

    @property
    def curvature_term(self) -> torch.Tensor:
        """1/2 rho^2 lambda_1."""
        return 0.5 * self.rho**2 * self.top_eigenvalue

    @property
    def bound(self) -> torch.Tensor:
        """l + rho ||grad l|| + 1/2 rho^2 lambda_1 (the bound without its O(rho^3) remainder)."""
        return self.loss.double() + self.gradient_term.double() + self.curvature_term.double()


def bound_terms(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    rho: float = 0.05,
    *,
    adaptive: bool = False,
    iterations: int = 20,
    tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
    max_memory: int | None = None,
) -> BoundTerms:
    """The three terms of Theorem 3.3 for every item: l, rho ||grad l|| and 1/2 rho^2 lambda_1.

    ``targets=None`` (the pseudo labels) bounds the SAAL score itself. ``iterations``, ``tolerance`` and
    ``generator`` are :func:`top_hessian_eigenvalue`'s.
    """
    check_batch(model, inputs, targets)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be positive and finite, got {rho!r}")
    _check_iterations(iterations, tolerance)
    with evaluating(model):
        parts = [_losses_and_norms(model, x, y, adaptive) for x, y in _chunks(model, inputs, targets, 2, max_memory)]
    labels = torch.cat([p[2] for p in parts])
    # The Hessian is taken for the labels the loss used (the pseudo labels are fixed once, from the clean model).
    eigenvalues = top_hessian_eigenvalue(model, inputs, labels, iterations, tolerance, generator, adaptive=adaptive,
                                         max_memory=max_memory)
    return BoundTerms(loss=torch.cat([p[0] for p in parts]), gradient_norm=torch.cat([p[1] for p in parts]),
                      top_eigenvalue=eigenvalues, rho=float(rho))
