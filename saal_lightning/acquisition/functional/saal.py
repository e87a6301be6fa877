"""The SAAL score (Kim et al., ICML 2023, eq. 6) in the functional layer.

:func:`saal_scores` lives with its engines in :mod:`saal_lightning.acquisition.saal_score`; this module gives it,
its option types and its option check their place beside the other pure functions.
"""

from saal_lightning.acquisition.saal_score import Method, Mode, saal_scores, validate_scoring_options

__all__ = ["Method", "Mode", "saal_scores", "validate_scoring_options"]
