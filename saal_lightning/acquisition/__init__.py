"""Acquisition: the SAAL score (a pure function), selection rules and the pluggable strategies."""

from saal_lightning.acquisition.saal_score import saal_scores

__all__ = ["saal_scores"]
