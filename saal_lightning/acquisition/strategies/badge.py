"""BADGE: k-means++ seeding on last-layer gradient embeddings (Ash et al., ICLR 2020)."""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.selection import OuterProducts, kmeans_pp_seeding
from saal_lightning.acquisition.strategies.base import AcquisitionStrategy
from saal_lightning.acquisition.strategies.feature_hooks import forward_last_linear


def _residual_and_features(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``softmax(z) - onehot(argmax z)``, the last ``nn.Linear``'s input ``h``, and whether that layer has a bias."""
    last = forward_last_linear(model, inputs)
    if not last.is_output:
        raise ValueError(
            f"the output of the last nn.Linear of {type(model).__name__} is not what the model returns; the "
            "gradient embedding needs the logits to come straight out of that layer"
        )
    logits = last.logits.float()
    pseudo_onehot = nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
    residual = torch.softmax(logits, dim=1) - pseudo_onehot
    return residual, last.features.float(), last.layer.bias is not None


def gradient_embedding(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Per-item gradient of ``CE(logits, yhat)`` w.r.t. the last ``nn.Linear``'s parameters, with yhat = argmax.

    For logits ``z = W h + b`` the gradient has the closed form ``dL/dW = (softmax(z) - onehot(yhat)) h^T`` and
    ``dL/db = softmax(z) - onehot(yhat)``, so no backward pass is needed. The row is ``dL/dW`` flattened
    row-major (as ``W.flatten()``), followed by ``dL/db`` when the layer has a bias: ``[B, C*D (+ C)]``.
    Selection uses the same vectors as factors (:func:`gradient_embedding_factors`), which take ``C + D + 1``
    numbers per item instead of ``C * (D + 1)``.

    Raises:
        ValueError: if the model has no ``nn.Linear``, or the last one's output is not the model's output (the
            closed form then is not the gradient of the model's loss).

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
    """
    residual, features, has_bias = _residual_and_features(model, inputs)
    if has_bias:
        features = torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)
    return OuterProducts(residual, features)


def pack_factors(factors: OuterProducts) -> torch.Tensor:
    """One ``[N, 1 + C + D]`` tensor for the pool gather: column 0 holds ``C``, then the left and right factors."""
    left, right = factors
    header = left.new_full((left.shape[0], 1), float(left.shape[1]))
    return torch.cat([header, left, right], dim=1)


def unpack_factors(outputs: torch.Tensor) -> OuterProducts:
    """Inverse of :func:`pack_factors`; refuses a tensor that was not made by it."""
    if outputs.ndim != 2 or outputs.shape[0] == 0 or outputs.shape[1] < 3:
        raise ValueError(f"expected packed gradient-embedding factors [N, 1 + C + D], got shape "
                         f"{tuple(outputs.shape)}")
    split = outputs[0, 0]
    if not (outputs[:, 0] == split).all() or split != split.round() or not 1 <= split <= outputs.shape[1] - 2:
        raise ValueError("column 0 of packed gradient-embedding factors must hold the same number of classes C "
                         "(1 <= C <= width - 2) on every row; these outputs were not made by pack_factors")
    classes = int(split)
    return OuterProducts(outputs[:, 1 : 1 + classes], outputs[:, 1 + classes :])


class BADGE(AcquisitionStrategy):
    """Label a diverse set of uncertain items: k-means++ seeding on gradient embeddings.

    Each pool item is embedded as the gradient of its pseudo-label loss w.r.t. the last linear layer
    (:func:`gradient_embedding`); its norm grows with the model's uncertainty and its direction encodes the
    features. Each item's embedding is kept as its two factors (:func:`gradient_embedding_factors`), so the pool
    needs ``C + D + 2`` numbers per item, not ``C * (D + 1)``. The first pick is the largest embedding, each
    later one is drawn with probability proportional to its squared distance to the nearest pick
    (:func:`~saal_lightning.acquisition.selection.kmeans_pp_seeding`), using the callback's generator. No item is
    drawn twice: picked items get probability 0 (the first release of the reference code could repeat one,
    JordanAsh/badge#5; it later re-drew instead).

    Reference: Ash, Zhang, Krishnamurthy, Langford & Agarwal, "Deep Batch Active Learning by Diverse, Uncertain
    Gradient Lower Bounds" (ICLR 2020); the "BADGE" baseline of the SAAL paper's Table 1.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> strategy = BADGE()
        >>> embeddings = strategy.compute(model, torch.randn(50, 4))
        >>> strategy.select(embeddings, 10, torch.Generator().manual_seed(0)).unique().numel()
        10
    """

    name = "badge"

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return pack_factors(gradient_embedding_factors(model, inputs))

    def select(
        self,
        pool_outputs: torch.Tensor,
        query_size: int,
        generator: torch.Generator,
        labeled_outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kmeans_pp_seeding(unpack_factors(pool_outputs), query_size, generator)
