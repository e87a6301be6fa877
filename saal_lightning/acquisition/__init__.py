"""Acquisition: the functional layer (pure scores and embeddings), selection rules and the pluggable strategies."""

# Enter through the functional layer, not saal_score: the functional layer re-exports saal_score, whose last-layer
# engine imports the functional layer's head finder; entered through saal_score, that import would find
# saal_score half-built.
from saal_lightning.acquisition.functional import saal_scores

__all__ = ["saal_scores"]
