"""SAAL: the sharpness-aware acquisition of Kim et al. (ICML 2023), top-k of the per-sample perturbed loss."""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.functional.saal import Method, Mode, saal_scores, validate_scoring_options
from saal_lightning.acquisition.strategies.base import AcquisitionStrategy


class SAAL(AcquisitionStrategy):
    """Label the items whose loss under their own pseudo-label rises most in a rho-ball around the weights.

    ``compute`` is :func:`~saal_lightning.acquisition.functional.saal_scores`, score(x) = CE(f_{theta+eps}(x), yhat)
    with eps the per-sample SAM ascent step (paper eq. 6); ``select`` the top-k of the scores.

    Args:
        rho: radius of the perturbation ball (the paper and the authors' code use 0.05).
        adaptive: ``False`` is the paper's ball (eps = rho g/||g||); ``True`` is what the authors' released code
            computes (ASAM: eps = rho w^2 g / || |w| g ||).
        mode: ``"max"`` scores the perturbed loss (paper eq. 6); ``"diff"`` the perturbed minus the clean loss
            (the authors' ``Diff`` acquisition mode).
        chunk_size: items scored at once (``None`` lets :func:`saal_scores` bound the memory).
        method: how :func:`saal_scores` computes the score: ``"auto"`` (exact, the fastest path the model
            allows), ``"hooks"`` or ``"vmap"`` (exact), or the labelled approximations ``"first_order"``
            (loss + rho ||g||) and ``"last_layer"`` (only the classifier head perturbed).

    Example::

        >>> strategy = SAAL(rho=0.05, adaptive=True)
        >>> SAAL(chunk_size=2.5)
        Traceback (most recent call last):
        ...
        ValueError: chunk_size must be an integer >= 1 or None, got 2.5
    """

    name = "saal"
    needs_grad = True

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        mode: Mode = "max",
        chunk_size: int | None = None,
        method: Method = "auto",
    ) -> None:
        validate_scoring_options(rho, adaptive, mode, chunk_size, method)
        self.rho = rho
        self.adaptive = adaptive
        self.mode: Mode = mode
        self.chunk_size = chunk_size
        self.method: Method = method

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return saal_scores(model, inputs, rho=self.rho, adaptive=self.adaptive, mode=self.mode,
                           chunk_size=self.chunk_size, method=self.method)

    def __repr__(self) -> str:
        return f"SAAL(rho={self.rho}, adaptive={self.adaptive}, mode={self.mode!r}, method={self.method!r})"
