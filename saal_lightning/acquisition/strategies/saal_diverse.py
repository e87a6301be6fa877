"""SAAL with diversity (Kim et al., ICML 2023, section 4.1): k-means++ seeding instead of top-k."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from saal_lightning.acquisition.functional.gradient_embedding import (
    gradient_embedding_factors,
    pack_factors,
    unpack_factors,
)
from saal_lightning.acquisition.functional.saal import Method, Mode
from saal_lightning.acquisition.selection import OuterProducts, kmeans_pp_seeding, top_k
from saal_lightning.acquisition.strategies.saal import SAAL
from saal_lightning.option_checks import check_choice

Space = Literal["score", "gradient"]
SPACES: tuple[str, ...] = get_args(Space)


class SAALDiverse(SAAL):
    """SAAL scores, selected with BADGE's k-means++ seeding for diversity.

    ``space="score"`` (default) is what the authors' released code does for its ``*_Diversity`` modes: k-means++
    seeding on the 1-D SAAL scores, which spreads the picks over the score range. The first pick is the largest
    ``|score|``; each later one is drawn with probability proportional to ``(score - nearest picked score)^2``.
    Two flaws of the released code are fixed: an item is never picked twice, and when fewer distinct scores
    remain than picks (every remaining D² is 0; the original drops into ``pdb``), the remaining picks are the
    highest remaining scores, in top-k order.

    ``space="gradient"`` seeds in BADGE's gradient-embedding space instead
    (:func:`~saal_lightning.acquisition.functional.gradient_embedding`), with each item's embedding
    multiplied by its SAAL score clamped at 0 (a ``"diff"`` score can dip below 0). Sharp items therefore lie
    far from the origin and are likelier picks, while the direction still spreads the picks over features and
    pseudo-labels. The same top-k fallback applies.

    Reference: Kim, Yoo, Shin & Moon, "SAAL: Sharpness-Aware Active Learning" (ICML 2023), section 4.1
    ("following the same practice from BADGE"); Ash et al. (ICLR 2020) for the seeding.

    Args:
        rho, adaptive, mode, chunk_size, method: the SAAL score's options, as in :class:`SAAL`.
        space: ``"score"`` (the authors' 1-D seeding) or ``"gradient"`` (score-weighted gradient embeddings).

    Example::

        >>> strategy = SAALDiverse(rho=0.05, adaptive=True, space="score")
        >>> strategy.select(torch.tensor([0.1, 3.0, 2.9, 0.2]), 2, torch.Generator().manual_seed(0))[0]
        tensor(1)
    """

    name = "saal_diverse"

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        mode: Mode = "max",
        chunk_size: int | None = None,
        method: Method = "auto",
        space: Space = "score",
    ) -> None:
        super().__init__(rho=rho, adaptive=adaptive, mode=mode, chunk_size=chunk_size, method=method)
        self.space: Space = check_choice("space", space, SPACES)

    def compute(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        scores = super().compute(model, inputs)
        if self.space == "score":
            return scores
        # The closed-form embedding needs no autograd, although compute runs with it enabled for SAAL.
        with torch.no_grad():
            packed = pack_factors(gradient_embedding_factors(model, inputs))
        # Column 0 carries the score to select(); the rest is the embedding's packed factors.
        return torch.cat([scores.detach().to(packed.dtype).unsqueeze(1), packed], dim=1)

    def select(
        self,
        pool_outputs: torch.Tensor,
        query_size: int,
        generator: torch.Generator,
        labeled_outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        expected_ndim = 1 if self.space == "score" else 2
        if pool_outputs.ndim != expected_ndim:
            raise ValueError(
                f"space={self.space!r} expects {expected_ndim}-D outputs from compute(), got shape "
                f"{tuple(pool_outputs.shape)}"
            )
        points: torch.Tensor | OuterProducts
        if self.space == "score":
            scores, points = pool_outputs, pool_outputs.unsqueeze(1)
        else:
            scores = pool_outputs[:, 0]
            left, right = unpack_factors(pool_outputs[:, 1:])
            points = OuterProducts(left * scores.clamp_min(0.0).unsqueeze(1), right)
        return kmeans_pp_seeding(points, query_size, generator, fill_order=top_k(scores, scores.numel()))

    def __repr__(self) -> str:
        return (
            f"SAALDiverse(rho={self.rho}, adaptive={self.adaptive}, mode={self.mode!r}, space={self.space!r})"
        )
