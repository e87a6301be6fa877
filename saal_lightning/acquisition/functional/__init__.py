"""The functional layer: pure functions of a model and a batch, with no Lightning in sight.

Every acquisition strategy is a small object that calls one of these in ``compute`` and a selection rule of
:mod:`saal_lightning.acquisition.selection` in ``select``; they can as well be called directly, without a Trainer.

* :mod:`.head`: the classifier head, the last ``nn.Linear`` that runs (:func:`forward_last_linear`), the one head
  finder of every path;
* :mod:`.saal`: the SAAL score, :func:`saal_scores`;
* :mod:`.uncertainty`: :func:`entropy_scores`, :func:`margin_scores`, :func:`least_confidence_scores`;
* :mod:`.gradient_embedding`: BADGE's gradient embeddings, dense or as factors;
* :mod:`.features`: the penultimate features (coreset) and :func:`capture_outputs` for any module's output.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> inputs = torch.randn(5, 4)
    >>> entropy_scores(model(inputs)).shape, penultimate_features(model, inputs).shape
    (torch.Size([5]), torch.Size([5, 8]))
"""

from saal_lightning.acquisition.functional.features import capture_outputs, penultimate_features
from saal_lightning.acquisition.functional.gradient_embedding import (
    gradient_embedding,
    gradient_embedding_factors,
    pack_factors,
    unpack_factors,
)
from saal_lightning.acquisition.functional.head import LastLinear, forward_last_linear, forward_output_head
from saal_lightning.acquisition.functional.saal import Method, Mode, saal_scores, validate_scoring_options
from saal_lightning.acquisition.functional.uncertainty import entropy_scores, least_confidence_scores, margin_scores

__all__ = [
    "LastLinear",
    "Method",
    "Mode",
    "capture_outputs",
    "entropy_scores",
    "forward_last_linear",
    "forward_output_head",
    "gradient_embedding",
    "gradient_embedding_factors",
    "least_confidence_scores",
    "margin_scores",
    "pack_factors",
    "penultimate_features",
    "saal_scores",
    "unpack_factors",
    "validate_scoring_options",
]
