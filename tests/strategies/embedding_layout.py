"""Test helper: a BADGE embedding's factors back to ``gradient_embedding``'s column order."""

from __future__ import annotations

import torch

from saal_lightning.acquisition.selection import OuterProducts


def dense_in_embedding_order(factors: OuterProducts, has_bias: bool = True) -> torch.Tensor:
    """``residual ⊗ [h, 1]`` laid out as ``[dL/dW flattened, dL/db]`` (or ``residual ⊗ h`` without a bias)."""
    outer = factors.left.unsqueeze(2) * factors.right.unsqueeze(1)  # [N, C, D (+1)]
    if not has_bias:
        return outer.flatten(1)
    return torch.cat([outer[:, :, :-1].flatten(1), outer[:, :, -1]], dim=1)
