"""BADGE's gradient embeddings (Ash et al., ICLR 2020): each item's pseudo-label loss gradient w.r.t. the head.

For logits ``z = W h + b`` from the classifier head (:func:`~.head.forward_output_head`) and the pseudo label
``yhat = argmax z``, the gradient of ``CE(z, yhat)`` has the closed form ``dL/dW = r h^T``, ``dL/db = r`` with the
softmax residual ``r = softmax(z) - onehot(yhat)``: one forward, no backward. Kept as its two factors ``r`` and
``[h, 1]`` (:class:`~saal_lightning.acquisition.selection.OuterProducts`), an item takes ``C + D + 1`` numbers instead
of ``C * (D + 1)``; :func:`pack_factors` puts them in one tensor for the pool gather across ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.functional.head import forward_output_head
from saal_lightning.acquisition.selection import OuterProducts


def _residual_and_features(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``softmax(z) - onehot(argmax z)``, the head's input ``h``, and whether the head has a bias."""
    head = forward_output_head(model, inputs, "the gradient embedding")
    logits = head.logits.float()
    pseudo_onehot = nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
    residual = torch.softmax(logits, dim=1) - pseudo_onehot
    return residual, head.features.float(), head.layer.bias is not None


def gradient_embedding(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Per-item gradient of ``CE(logits, yhat)`` w.r.t. the head's parameters, dense: ``[B, C*D (+ C)]``.

    The row is ``dL/dW`` flattened row-major (as ``W.flatten()``), followed by ``dL/db`` when the head has a bias.
    Selection uses the same numbers as factors (:func:`gradient_embedding_factors`).

    Raises:
        ValueError: if the model has no ``nn.Linear``, or the head's output is not the model's output (the closed
            form then is not the gradient of the model's loss).

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> gradient_embedding(model, torch.randn(2, 4)).shape
        torch.Size([2, 27])
    """
    residual, features, has_bias = _residual_and_features(model, inputs)
    weight_part = (residual.unsqueeze(2) * features.unsqueeze(1)).flatten(1)
    return torch.cat([weight_part, residual], dim=1) if has_bias else weight_part


def gradient_embedding_factors(model: nn.Module, inputs: torch.Tensor) -> OuterProducts:
    """:func:`gradient_embedding` as factors: ``residual ⊗ [h, 1]`` (``residual ⊗ h`` without a bias).

    The flattened outer product holds the same numbers as the embedding, in another column order, so every
    distance and norm, and hence every k-means++ draw, is the same.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> factors = gradient_embedding_factors(model, torch.randn(2, 4))
        >>> factors.left.shape, factors.right.shape
        (torch.Size([2, 3]), torch.Size([2, 9]))
    """
    residual, features, has_bias = _residual_and_features(model, inputs)
    if has_bias:
        features = torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)
    return OuterProducts(residual, features)


def pack_factors(factors: OuterProducts) -> torch.Tensor:
    """One ``[N, 1 + C + D]`` tensor for the pool gather: column 0 holds ``C``, then the left and right factors.

    Example::

        >>> pack_factors(OuterProducts(torch.ones(1, 2), torch.zeros(1, 3)))
        tensor([[2., 1., 1., 0., 0., 0.]])
    """
    left, right = factors
    header = left.new_full((left.shape[0], 1), float(left.shape[1]))
    return torch.cat([header, left, right], dim=1)


def unpack_factors(outputs: torch.Tensor) -> OuterProducts:
    """Inverse of :func:`pack_factors`; refuses a tensor that was not made by it.

    Example::

        >>> unpack_factors(torch.tensor([[2.0, 1.0, 1.0, 0.0]])).right
        tensor([[0.]])
    """
    if outputs.ndim != 2 or outputs.shape[0] == 0 or outputs.shape[1] < 3:
        raise ValueError(f"expected packed gradient-embedding factors [N, 1 + C + D], got shape "
                         f"{tuple(outputs.shape)}")
    split = outputs[0, 0]
    if not (outputs[:, 0] == split).all() or split != split.round() or not 1 <= split <= outputs.shape[1] - 2:
        raise ValueError("column 0 of packed gradient-embedding factors must hold the same number of classes C "
                         "(1 <= C <= width - 2) on every row; these outputs were not made by pack_factors")
    classes = int(split)
    return OuterProducts(outputs[:, 1 : 1 + classes], outputs[:, 1 + classes :])
