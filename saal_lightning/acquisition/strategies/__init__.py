"""Acquisition strategies, selectable by name (``strategy: entropy``) or by ``class_path``."""

from __future__ import annotations

from typing import Any

from saal_lightning.acquisition.strategies.badge import BADGE
from saal_lightning.acquisition.strategies.base import AcquisitionStrategy
from saal_lightning.acquisition.strategies.coreset import Coreset
from saal_lightning.acquisition.strategies.ll4al import LL4AL
from saal_lightning.acquisition.strategies.random_sampling import RandomSampling
from saal_lightning.acquisition.strategies.saal import SAAL
from saal_lightning.acquisition.strategies.saal_diverse import SAALDiverse
from saal_lightning.acquisition.strategies.uncertainty import Entropy, LeastConfidence, Margin
from saal_lightning.acquisition.strategies.vaal import VAAL

STRATEGIES: dict[str, type[AcquisitionStrategy]] = {
    cls.name: cls
    for cls in (RandomSampling, Entropy, Margin, LeastConfidence, Coreset, BADGE, LL4AL, VAAL, SAAL, SAALDiverse)
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


__all__ = [
    "BADGE",
    "LL4AL",
    "SAAL",
    "STRATEGIES",
    "VAAL",
    "AcquisitionStrategy",
    "Coreset",
    "Entropy",
    "LeastConfidence",
    "Margin",
    "RandomSampling",
    "SAALDiverse",
    "build_strategy",
]
