"""One seed for an experiment: options left at ``seed=None`` follow ``seed_everything``.

``lightning.pytorch.seed_everything(s)`` (and ``saal fit --seed_everything s``) records ``s`` in the
``PL_GLOBAL_SEED`` environment variable. The data module's seed (initial labels, training order) and the
acquisition callback's (pools, random choices) default to it, so that two runs with different global seeds never
silently share an initial labeled set. A seed given explicitly wins.
"""

from __future__ import annotations

import os


def resolve_seed(seed: int | None) -> int:
    """``seed`` itself, or the seed of the last ``seed_everything`` call (0 when there was none).

    Raises:
        ValueError: for a seed that is not an integer.
    """
    if seed is None:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer or None (follow seed_everything), got {seed!r}")
    return seed
