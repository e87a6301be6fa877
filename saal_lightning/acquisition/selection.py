"""Pure selection rules: turn gathered pool scores or embeddings into positions to label."""

from __future__ import annotations

from typing import NamedTuple

import torch

from saal_lightning.option_checks import check_int


def _check_query_size(num_items: int, query_size: int) -> None:
    check_int("query_size", query_size, minimum=1)
    if query_size > num_items:
        raise ValueError(f"cannot select {query_size} items from a pool of {num_items}")


def top_k(scores: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Positions of the ``k`` largest scores, highest first.

    Ties are broken uniformly at random with ``generator`` (a random permutation before a stable sort), so that
    equal scores never favour low pool positions; without a generator they go to the lower position. NaN scores
    are refused: a NaN would silently sort first or last depending on the backend.

    Example::

        >>> top_k(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2)
        tensor([1, 3])
        >>> sorted(top_k(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2, torch.Generator().manual_seed(0)).tolist())
        [1, 3]
    """
    if scores.ndim != 1:
        raise ValueError(f"top_k expects one score per item (a 1-D tensor), got shape {tuple(scores.shape)}")
    _check_query_size(scores.numel(), k)
    if torch.isnan(scores).any():
        raise ValueError(f"{int(torch.isnan(scores).sum())} acquisition scores are NaN; refusing to select")
    scores = scores.detach().cpu()
    if generator is None:
        return torch.sort(scores, descending=True, stable=True).indices[:k]
    shuffle = torch.randperm(scores.numel(), generator=generator)
    return shuffle[torch.sort(scores[shuffle], descending=True, stable=True).indices[:k]]


def uniform_random(num_items: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct positions out of ``num_items``, uniformly at random from ``generator`` (not the global RNG).

    Example::

        >>> uniform_random(5, 5, torch.Generator().manual_seed(0)).sort().values
        tensor([0, 1, 2, 3, 4])
    """
    _check_query_size(num_items, k)
    return torch.randperm(num_items, generator=generator)[:k]


def _check_embeddings(embeddings: torch.Tensor, what: str) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"{what} must be one row per item (a 2-D tensor), got shape {tuple(embeddings.shape)}")
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{what} contain NaN or infinite values; refusing to select")


def _sq_distances_to(points: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of every row of ``points`` to ``centre``, exact (no ``|a|² - 2ab + |b|²``).

    Rows are processed in blocks of about 2^24 elements, so a wide embedding (BADGE on 100 classes: 51k
    dimensions) never needs a pool-sized temporary.
    """
    rows = max(1, 2**24 // max(1, points.shape[1]))
    return torch.cat([((block - centre) ** 2).sum(dim=1) for block in points.split(rows)])


class OuterProducts(NamedTuple):
    """``N`` points kept as factors: point ``i`` is ``left[i] ⊗ right[i]`` flattened, never materialised.

    BADGE's gradient embedding has this form (softmax residual ⊗ penultimate features), so a CIFAR-100 pool of
    10,000 items with 512 features takes 25 MB as factors instead of 2 GB as ``[N, 100 * 513]`` rows.

    Example::

        >>> points = OuterProducts(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0], [1.0]]))
        >>> points.sq_distances_to(0)  # |[3, 0] - [0, 2]|^2 = 13
        tensor([ 0., 13.])
    """

    left: torch.Tensor  # [N, C]
    right: torch.Tensor  # [N, D]

    def norms(self) -> torch.Tensor:
        """Euclidean norm of every point: ``|left_i| * |right_i|``."""
        return torch.linalg.vector_norm(self.left, dim=1) * torch.linalg.vector_norm(self.right, dim=1)

    def sq_distances_to(self, position: int) -> torch.Tensor:
        """Squared Euclidean distance of every point to point ``position``.

        With ``u = a_i - a_j`` and ``v = b_i - b_j``: ``a_i⊗b_i - a_j⊗b_j = u⊗b_i + a_j⊗v``, so the distance is
        ``|u|²|b_i|² + |a_j|²|v|² + 2 (u·a_j)(b_i·v)``. Differences come first (no ``|x|² - 2xy + |y|²``
        cancellation), so an exact duplicate is at distance exactly 0, as in the dense computation.
        """
        left_j, right_j = self.left[position], self.right[position]
        u, v = self.left - left_j, self.right - right_j
        sq = (u.square().sum(1) * self.right.square().sum(1) + left_j.square().sum() * v.square().sum(1)
              + 2 * (u @ left_j) * (self.right * v).sum(1))
        return sq.clamp_min(0.0)  # rounding can take a near-duplicate's distance just below 0


def k_center_greedy(
    pool_embeddings: torch.Tensor, k: int, labeled_embeddings: torch.Tensor | None = None, chunk_size: int = 1024
) -> torch.Tensor:
    """Greedy k-center selection (Sener & Savarese, ICLR 2018, Algorithm 1): a 2-approximation of the coreset.

    Each step picks the pool item farthest (Euclidean) from its nearest centre, where the centres are the
    labeled items plus the items picked so far. Without labeled items the first pick is the item farthest
    from the pool's mean. Ties go to the lower position; a picked item is never picked again, even when
    every remaining item coincides with a centre.

    Args:
        pool_embeddings: ``[N, D]`` embeddings of the candidate items.
        k: how many positions to return.
        labeled_embeddings: ``[M, D]`` embeddings of the already labeled items (``None`` or ``M = 0``: none).
        chunk_size: labeled items compared with the whole pool at once, which bounds memory at ``N * chunk_size``.

    Returns:
        ``k`` distinct positions into ``pool_embeddings``, in the order they were picked.

    Example::

        >>> pool = torch.tensor([[0.0], [1.0], [5.0], [9.0]])
        >>> k_center_greedy(pool, 2, labeled_embeddings=torch.tensor([[0.0]]))
        tensor([3, 2])
    """
    _check_embeddings(pool_embeddings, "pool embeddings")
    _check_query_size(pool_embeddings.shape[0], k)
    check_int("chunk_size", chunk_size, minimum=1)
    pool = pool_embeddings.detach()
    picked = torch.zeros(pool.shape[0], dtype=torch.bool, device=pool.device)
    order: list[int] = []
    if labeled_embeddings is not None and labeled_embeddings.shape[0] > 0:
        _check_embeddings(labeled_embeddings, "labeled embeddings")
        if labeled_embeddings.shape[1] != pool.shape[1]:
            raise ValueError(
                f"labeled embeddings have {labeled_embeddings.shape[1]} dimensions, pool embeddings {pool.shape[1]}"
            )
        labeled = labeled_embeddings.detach().to(device=pool.device, dtype=pool.dtype)
        min_dist = torch.full((pool.shape[0],), float("inf"), device=pool.device, dtype=pool.dtype)
        for start in range(0, labeled.shape[0], chunk_size):
            chunk_dist = torch.cdist(pool, labeled[start : start + chunk_size]).min(dim=1).values
            min_dist = torch.minimum(min_dist, chunk_dist)
    else:
        first = int(torch.argmax(_sq_distances_to(pool, pool.mean(dim=0))))
        min_dist = _sq_distances_to(pool, pool[first]).sqrt()
        picked[first] = True
        order.append(first)
    while len(order) < k:
        # -inf on picked items keeps them out even when all remaining distances are 0 (duplicates of centres).
        index = int(torch.argmax(min_dist.masked_fill(picked, float("-inf"))))
        order.append(index)
        picked[index] = True
        min_dist = torch.minimum(min_dist, _sq_distances_to(pool, pool[index]).sqrt())
    return torch.tensor(order, dtype=torch.long)


def kmeans_pp_seeding(
    points: torch.Tensor | OuterProducts,
    k: int,
    generator: torch.Generator,
    fill_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) as BADGE uses it (Ash et al., ICLR 2020), without repeats.

    The first centre is the point of largest Euclidean norm (as in BADGE's ``init_centers``); every later centre
    is drawn with probability proportional to D², its squared distance to the nearest centre chosen so far,
    using ``generator`` (no global RNG). Points already chosen have D² = 0, so no position is picked twice (the
    original code could repeat one, JordanAsh/badge#5). When every remaining point has D² = 0 (fewer distinct
    points than ``k``), the remaining picks are the not yet chosen positions in ``fill_order``.

    Args:
        points: ``[N, D]`` points (``[N, 1]`` for scalar scores), or :class:`OuterProducts` factors.
        k: how many positions to return.
        generator: the random stream of the draws; the draws run on the generator's device.
        fill_order: positions in order of preference for the degenerate case; default: decreasing norm, ties to
            the lower position.

    Returns:
        ``k`` distinct positions into ``points``, in the order they were picked.

    Example::

        >>> points = torch.tensor([[0.0], [1.0], [1.0], [10.0]])
        >>> kmeans_pp_seeding(points, 4, torch.Generator().manual_seed(0))[0]
        tensor(3)
    """
    if isinstance(points, OuterProducts):
        _check_embeddings(points.left, "points' left factors")
        _check_embeddings(points.right, "points' right factors")
        if points.left.shape[0] != points.right.shape[0]:
            raise ValueError(f"left and right factors disagree on the number of points: {points.left.shape[0]} "
                             f"vs {points.right.shape[0]}")
        points = OuterProducts(points.left.detach(), points.right.detach())
        norms, sq_distances_to = points.norms(), points.sq_distances_to
    else:
        _check_embeddings(points, "points")
        points = points.detach()
        norms = torch.linalg.vector_norm(points, dim=1)

        def sq_distances_to(position: int) -> torch.Tensor:
            return _sq_distances_to(points, points[position])

    num_points = norms.shape[0]
    _check_query_size(num_points, k)
    if fill_order is None:
        fill_order = top_k(norms, norms.numel())
    elif sorted(fill_order.tolist()) != list(range(num_points)):
        raise ValueError("fill_order must be a permutation of all positions into points")
    first = int(torch.argmax(norms))
    picked = torch.zeros(num_points, dtype=torch.bool, device=norms.device)
    picked[first] = True
    order = [first]
    sq_dist = sq_distances_to(first)
    while len(order) < k:
        # float64 on the generator's device: the draw is then the same whichever device scored the pool.
        weights = sq_dist.masked_fill(picked, 0.0).to(device=generator.device, dtype=torch.float64)
        if weights.sum() <= 0:
            chosen = set(order)
            remaining = [i for i in fill_order.tolist() if i not in chosen]
            order.extend(remaining[: k - len(order)])
            break
        index = int(torch.multinomial(weights, 1, generator=generator))
        order.append(index)
        picked[index] = True
        sq_dist = torch.minimum(sq_dist, sq_distances_to(index))
    return torch.tensor(order, dtype=torch.long)
