"""Per-round records: ``rounds.csv`` (one row per round) and ``labeled_indices.json`` (the labels so far)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from saal_lightning.reporting.atomic_file import atomic_write_text

# The column order of rounds.csv. `best_test_acc` is the running maximum, the figure the SAAL authors report;
# `acquisition_seconds` is the time spent choosing the labels added at the end of the round (paper Figure 2).
ROUND_COLUMNS = (
    "round",
    "num_labeled",
    "test_acc",
    "best_test_acc",
    "acquisition_seconds",
    "train_seconds",
    "num_acquired",
    "pool_size",
    "strategy",
    "epoch",
    "global_step",
)


def write_rounds_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``rounds.csv`` atomically with all rows so far (the file is small; rewriting keeps it whole)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROUND_COLUMNS, extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: row.get(column, "") for column in ROUND_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def write_labeled_indices(
    path: str | os.PathLike, labeled_round: Sequence[int], strategy: str, completed_rounds: int
) -> None:
    """Write the labeled indices, grouped by the round that labeled them (0 = the initial set), atomically."""
    by_round: dict[str, list[int]] = {}
    for index, round_labeled in enumerate(labeled_round):
        if round_labeled >= 0:
            by_round.setdefault(str(round_labeled), []).append(index)
    payload = {
        "strategy": strategy,
        "completed_rounds": completed_rounds,
        "num_labeled": sum(len(v) for v in by_round.values()),
        "labeled_indices": sorted(i for v in by_round.values() for i in v),
        "indices_by_round": dict(sorted(by_round.items(), key=lambda item: int(item[0]))),
    }
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
