"""Silence the messages of Lightning that a user of this package cannot act on, and nothing else.

Each filter matches one message by its text (and, for warnings, by the Lightning module that emits it):

* ``isinstance(treespec, LeafSpec)`` is deprecated: a ``FutureWarning`` of torch >= 2.10 about Lightning's own
  ``lightning/pytorch/utilities/_pytree.py`` (every fit builds a ``CombinedLoader`` that triggers it); the fix
  belongs in Lightning.
* ``💡 Tip: For seamless cloud ...``: Lightning's advertisements for ``litlogger`` and ``litmodels``, logged at
  INFO by every ``Trainer``.

Every other warning and log line, of Lightning or of this package, is left alone.
"""

from __future__ import annotations

import logging
import warnings

# The loggers that rank_zero_info writes to (lightning_utilities' module logger, replaced by Lightning's).
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_ADVERTISEMENT_PREFIX = "💡 Tip: For seamless cloud"


class _DropAdvertisements(logging.Filter):
    """Drops Lightning's "💡 Tip: For seamless cloud ..." log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERTISEMENT_PREFIX)


def quiet_lightning_noise() -> None:
    """Install the filters described in the module docstring; calling it again adds nothing."""
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropAdvertisements) for existing in logger.filters):
            logger.addFilter(_DropAdvertisements())
