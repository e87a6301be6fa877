"""Is a resumed run the same experiment as the one that wrote the checkpoint?

The acquisition callback records, in its checkpoint entry, every option that decides which items get labeled
(the strategy and its options, query and pool size, the schedule, the seeds) and what the data set is (the data
module's class, its length, a digest of its labels). On resume both are compared with the run being started,
and any difference is refused before training, each one named with its old and new value: a resumed run with
another strategy or another data set would otherwise carry on silently as a mixture of two experiments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException


class ResumeMismatchError(MisconfigurationException):
    """A checkpoint cannot be resumed by this run: it belongs to another experiment, or lacks its state."""


def data_description(datamodule: Any) -> dict[str, Any]:
    """What identifies the data of an experiment: the data module's class, its size, its labels and seed."""
    fingerprint = getattr(datamodule, "fingerprint", None)
    return {
        "data module": type(datamodule).__qualname__,
        "training items": len(datamodule.train_dataset) if getattr(datamodule, "train_dataset", None) is not None
        else None,
        "training targets (sha256)": fingerprint() if callable(fingerprint) else None,
        "data seed": getattr(datamodule, "seed", None),
    }


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per key whose value differs, ``"key: old (checkpoint) -> new (this run)"``, in ``current``'s order."""
    lines = []
    for key, value in current.items():
        old = saved.get(key, "<not recorded>")
        if old != value:
            lines.append(f"{key}: {old!r} in the checkpoint, {value!r} in this run")
    return lines


def refuse_if_different(checkpoint_path: Any, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise :class:`ResumeMismatchError` listing every difference between ``saved`` and ``current``."""
    lines = differences(saved, current)
    if lines:
        listed = "\n".join(f"  - {line}" for line in lines)
        raise ResumeMismatchError(
            f"Refusing to resume from {checkpoint_path}: this run is not the experiment that wrote it.\n{listed}\n"
            "Resume with the checkpoint's options (e.g. the run's config.yaml), or start a new run without "
            "ckpt_path. Nothing was changed."
        )
