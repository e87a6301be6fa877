"""Acquisition strategies, selectable by name (``strategy: entropy``) or by ``class_path``."""

from __future__ import annotations

from typing import Any

from saal_lightning.acquisition.strategies.base import AcquisitionStrategy
from saal_lightning.acquisition.strategies.random_sampling import RandomSampling
from saal_lightning.acquisition.strategies.saal import SAAL
from saal_lightning.acquisition.strategies.uncertainty import Entropy

STRATEGIES: dict[str, type[AcquisitionStrategy]] = {
    cls.name: cls for cls in (RandomSampling, Entropy, SAAL)
}


def build_strategy(strategy: str | AcquisitionStrategy, **kwargs: Any) -> AcquisitionStrategy:
    """Return ``strategy`` itself, or build the registered strategy of that name with ``kwargs``."""
    if isinstance(strategy, AcquisitionStrategy):
        if kwargs:
            raise ValueError(f"strategy options {sorted(kwargs)} only apply to a strategy given by name")
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown acquisition strategy {strategy!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](**kwargs)


__all__ = ["STRATEGIES", "AcquisitionStrategy", "build_strategy", "RandomSampling", "Entropy", "SAAL"]
