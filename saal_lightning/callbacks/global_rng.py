"""Capture and restore the global random number generators, as tensors and primitives.

Lightning's checkpoints carry no global RNG state, so a run resumed from a checkpoint would draw dropout masks
and the random crops of an in-process data pipeline (``num_workers=0``) from a reseeded stream, and train a
different model than the uninterrupted run. The acquisition callback stores this state in its own checkpoint
entry; tensors and primitives only, so checkpoints still load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_global_rng() -> dict[str, Any]:
    """The CPU states of torch's, numpy's and Python's global generators."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    keys = np.asarray(keys)  # the legacy tuple's key array (typed loosely by numpy's stubs)
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }


def restore_global_rng(state: dict[str, Any]) -> None:
    """Set the global generators to a state :func:`capture_global_rng` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
