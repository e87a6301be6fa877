"""The paper's sharpness diagnostics as pure functions of a model and a batch (no Trainer, no Lightning).

* :mod:`~saal_lightning.diagnostics.sharpness`: maximally perturbed losses with any labels (Figure 3), ψ(ρ), the
  margin δ_x of Theorem 3.1 and the relative margin (Figure 4);
* :mod:`~saal_lightning.diagnostics.curvature`: Theorem 3.3's bound terms, with per-item gradient norms and the top
  Hessian eigenvalue by Lanczos iteration on Hessian-vector products (Figure 1);
* :mod:`~saal_lightning.diagnostics.rank_correlation`: Spearman's rank correlation (ties averaged).

:class:`~saal_lightning.callbacks.sharpness_diagnostics.SharpnessDiagnostics` logs them every round of a run.
"""

from saal_lightning.diagnostics.curvature import BoundTerms, bound_terms, gradient_norms, top_hessian_eigenvalue
from saal_lightning.diagnostics.rank_correlation import average_ranks, spearman_correlation
from saal_lightning.diagnostics.sharpness import (
    Perturbation,
    margins,
    perturb,
    perturbed_losses,
    prediction_kept_fraction,
    relative_margin,
)

__all__ = [
    "BoundTerms",
    "Perturbation",
    "average_ranks",
    "bound_terms",
    "gradient_norms",
    "margins",
    "perturb",
    "perturbed_losses",
    "prediction_kept_fraction",
    "relative_margin",
    "spearman_correlation",
    "top_hessian_eigenvalue",
]
