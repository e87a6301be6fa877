"""Learning curves (test accuracy against the number of labels) from one or more ``rounds.csv`` files."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def read_rounds_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a ``rounds.csv`` as dictionaries of strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def plot_learning_curves(
    curves: Mapping[str, Sequence[Mapping[str, object]]], output: str | os.PathLike, title: str = "Active learning"
) -> Path:
    """Plot test accuracy against the number of labeled items, one line per named curve, to a PNG file.

    Example::

        >>> rows = [{"num_labeled": 20, "test_acc": 0.4}, {"num_labeled": 30, "test_acc": 0.5}]
        >>> path = plot_learning_curves({"saal": rows}, tmp_path / "curve.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        points = [(int(r["num_labeled"]), float(r["test_acc"])) for r in rows
                  if r["test_acc"] not in ("", None)]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
    axes.set_xlabel("number of labeled items")
    axes.set_ylabel("test accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output
