"""Sharpness-Aware Minimization (Foret et al., 2021) as a closure-driven ``torch.optim.Optimizer``.

One :meth:`SAM.step` call runs the whole SAM update, so Lightning's ``optimizer.step(closure=...)`` counts it
as one step (``global_step``, ``max_steps`` and step-based checkpoints keep working):

1. ``closure()`` computes the loss and gradient g at theta;
2. eps = rho * g / ||g||_2 (or, with ``adaptive=True``, ASAM's eps = rho * w^2 g / || |w| g ||_2), theta += eps;
3. ``closure()`` again computes the gradient at theta + eps;
4. theta is restored exactly (the saved tensors are copied back, not ``theta - eps``, which would round);
5. the base optimizer steps with the perturbed gradient.

The closure is told which pass it is in through :attr:`SAM.first_pass`, so that the caller can keep BatchNorm
running statistics from the first pass only and skip DDP gradient sync on the ascent pass.

Example::

    >>> model = torch.nn.Linear(3, 1)
    >>> optimizer = SAM(model.parameters(), base_optimizer="sgd", lr=0.1, momentum=0.9, rho=0.05)
    >>> def closure():
    ...     optimizer.zero_grad()
    ...     loss = model(torch.ones(4, 3)).pow(2).mean()
    ...     loss.backward()
    ...     return loss
    >>> loss = optimizer.step(closure)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


class SAM(torch.optim.Optimizer):
    """SAM wrapper around a base optimizer (SGD or Adam), driven by a closure.

    Args:
        params: parameters (or parameter groups) to optimise.
        base_optimizer: ``"sgd"`` or ``"adam"``: the optimizer that takes the final step.
        rho: radius of the perturbation ball (Foret et al. use 0.05; ASAM usually needs ~10x larger).
        adaptive: use ASAM's element-wise ball (Kwon et al., 2021) instead of the plain L2 ball.
        **base_kwargs: passed to the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...).

    Raises:
        ValueError: for a negative ``rho`` or an unknown base optimizer.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: str = "sgd",
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"SAM's rho must be non-negative, got {rho}")
        if base_optimizer not in BASE_OPTIMIZERS:
            raise ValueError(f"Unknown base optimizer {base_optimizer!r}; choose one of {sorted(BASE_OPTIMIZERS)}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = BASE_OPTIMIZERS[base_optimizer](self.param_groups, **base_kwargs)
        # Share the groups so that learning-rate schedulers on either object act on both.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.first_pass = True

    @torch.no_grad()
    def _ascent_direction_norm(self) -> torch.Tensor:
        """|| g ||_2, or || |w| * g ||_2 for the adaptive ball, over every parameter with a gradient."""
        norms = [
            ((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            raise RuntimeError("SAM found no gradients after the first closure call: did the closure call backward?")
        return torch.stack([n.to(norms[0].device) for n in norms]).norm(p=2)

    @torch.no_grad()
    def perturb(self) -> None:
        """Move every parameter to theta + eps and remember theta (the ascent step)."""
        grad_norm = self._ascent_direction_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["theta"] = p.detach().clone()
                eps = (p.pow(2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(eps)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy theta back exactly (subtracting eps again would not round-trip in floating point)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "theta" in self.state[p]:
                    p.copy_(self.state[p].pop("theta"))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the two-pass SAM update; returns the first (unperturbed) pass's loss."""
        if closure is None:
            raise RuntimeError(
                "SAM needs a closure that recomputes the loss and calls backward: call optimizer.step(closure=...). "
                "With Lightning's precision='16-mixed' the GradScaler drops the closure; use '32' or 'bf16-mixed'."
            )
        closure = torch.enable_grad()(closure)
        self.first_pass = True
        loss = closure()
        self.perturb()
        self.first_pass = False
        try:
            closure()
        finally:
            self.restore()
            self.first_pass = True
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        # The base optimizer owns the real state (momentum, Adam moments); theta only exists inside step().
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
