"""BADGE: k-means++ seeding on last-layer gradient embeddings (Ash et al., ICLR 2020)."""

from __future__ import annotations

import torch
from torch import nn

from saal_lightning.acquisition.selection import kmeans_pp_seeding
from saal_lightning.acquisition.strategies.base import AcquisitionStrategy
from saal_lightning.acquisition.strategies.feature_hooks import forward_last_linear


def gradient_embedding(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Per-item gradient of ``CE(logits, yhat)`` w.r.t. the last ``nn.Linear``'s parameters, with yhat = argmax.

    For logits ``z = W h + b`` the gradient has the closed form ``dL/dW = (softmax(z) - onehot(yhat)) h^T`` and
    ``dL/db = softmax(z) - onehot(yhat)``, so no backward pass is needed. The row is ``dL/dW`` flattened
    row-major (as ``W.flatten()``), followed by ``dL/db`` when the layer has a bias: ``[B, C*D (+ C)]``.

    Raises:
        ValueError: if the model has no ``nn.Linear``, or the last one's output is not the model's output (the
            closed form then is not the gradient of the model's loss).

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> gradient_embedding(model, torch.randn(2, 4)).shape
        torch.Size([2, 27])
    """
    last = forward_last_linear(model, inputs)
    if not last.is_output:
        raise ValueError(
            f"the output of the last nn.Linear of {type(model).__name__} is not what the model returns; the "
            "gradient embedding needs the logits to come straight out of that layer"
        )
    logits = last.logits.float()
    pseudo_onehot = nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
    residual = torch.softmax(logits, dim=1) - pseudo_onehot
    features = last.features.float()
    weight_part = (residual.unsqueeze(2) * features.unsqueeze(1)).flatten(1)
    if last.layer.bias is None:
        return weight_part
    return torch.cat([weight_part, residual], dim=1)


class BADGE(AcquisitionStrategy):
    """Label a diverse set of uncertain items: k-means++ seeding on gradient embeddings.

    Each pool item is embedded as the gradient of its pseudo-label loss w.r.t. the last linear layer
    (:func:`gradient_embedding`); its norm grows with the model's uncertainty and its direction encodes the
    features. The first pick is the largest embedding, each later one is drawn with probability proportional to
    its squared distance to the nearest pick (:func:`~saal_lightning.acquisition.selection.kmeans_pp_seeding`),
    using the callback's generator. No item is drawn twice: picked items get probability 0 (the first release of
    the reference code could repeat one, JordanAsh/badge#5; it later re-drew instead).

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
        return gradient_embedding(model, inputs)

    def select(
        self,
        pool_outputs: torch.Tensor,
        query_size: int,
        generator: torch.Generator,
        labeled_outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kmeans_pp_seeding(pool_outputs, query_size, generator)
