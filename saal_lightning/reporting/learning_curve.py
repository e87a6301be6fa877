"""Learning curves (test accuracy against the number of labels) from one or more ``rounds.csv`` files."""

from __future__ import annotations

import csv
import os
import textwrap
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
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        points = [(int(str(r["num_labeled"])), float(str(r["test_acc"]))) for r in rows
                  if r["test_acc"] not in ("", None)]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
    axes.set_xlabel("number of labeled items")
    axes.set_ylabel("test accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.get_lines():  # a run without a test set has no accuracy to draw
        axes.legend()
    figure.tight_layout()
    return _save(figure, plt, output)


def mean_learning_curve(runs: Sequence[Sequence[Mapping[str, object]]]) -> list[tuple[int, float, float, int]]:
    """``(num_labeled, mean, std, seeds)`` of the test accuracy over runs, at every label count any run reached.

    Example::

        >>> mean_learning_curve([[{"num_labeled": 20, "test_acc": 0.4}], [{"num_labeled": 20, "test_acc": 0.6}]])
        [(20, 0.5, 0.141421356237, 2)]
    """
    by_count: dict[int, list[float]] = {}
    for rows in runs:
        for row in rows:
            if row["test_acc"] not in ("", None):
                by_count.setdefault(int(str(row["num_labeled"])), []).append(float(str(row["test_acc"])))
    points = []
    for count, values in sorted(by_count.items()):
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        points.append((count, round(mean, 12), round(std, 12), len(values)))
    return points


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


RunsByName = Mapping[str, Sequence[Sequence[Mapping[str, object]]]]


def plot_mean_learning_curves(curves: RunsByName, output: str | os.PathLike, title: str) -> Path:
    """One line per name: the mean test accuracy over its runs (seeds), with a band of ± one standard deviation."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    _draw_mean_curves(axes, curves, title)
    figure.tight_layout()
    return _save(figure, plt, output)


def plot_mean_learning_curve_panels(panels: Mapping[str, RunsByName], output: str | os.PathLike,
                                    columns: int = 3) -> Path:
    """One panel per title, each drawn as :func:`plot_mean_learning_curves` draws its one; panels share the axes.

    Example: a study's factors side by side, each panel its SAAL and random runs::

        >>> rows = [{"num_labeled": 20, "test_acc": 0.4}, {"num_labeled": 30, "test_acc": 0.5}]
        >>> panels = {"baseline": {"saal": [rows, rows]}, "small model": {"saal": [rows]}}
        >>> path = plot_mean_learning_curve_panels(panels, tmp_path / "study.png")  # doctest: +SKIP
    """
    if not panels:
        raise ValueError("plot_mean_learning_curve_panels needs at least one panel")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    plt = _pyplot()
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), sharex=True, sharey=True,
                                squeeze=False)
    cells = [axes for row in grid for axes in row]
    for axes, (title, curves) in zip(cells, panels.items(), strict=False):
        _draw_mean_curves(axes, curves, textwrap.fill(title, 48))  # long titles wrap instead of overlapping
        axes.label_outer()  # the shared axes are labeled once, on the outer panels
    for axes in cells[len(panels):]:
        axes.set_visible(False)  # an incomplete last row: no empty frames
    figure.tight_layout()
    return _save(figure, plt, output)


def _draw_mean_curves(axes, curves: RunsByName, title: str) -> None:  # noqa: ANN001 - matplotlib's Axes
    for name, runs in curves.items():
        points = mean_learning_curve(runs)
        if not points:
            continue
        counts, means, stds, _ = zip(*points, strict=True)
        lower = [m - s for m, s in zip(means, stds, strict=True)]
        upper = [m + s for m, s in zip(means, stds, strict=True)]
        (line,) = axes.plot(counts, means, linewidth=1.5, label=f"{name} ({max(p[3] for p in points)} seeds)")
        axes.fill_between(counts, lower, upper, color=line.get_color(), alpha=0.15, linewidth=0)
    axes.set_xlabel("number of labeled items")
    axes.set_ylabel("test accuracy")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if axes.get_lines():  # no finished run yet: an empty frame, not a warning
        axes.legend(fontsize=8)


def plot_round_times(times: Mapping[str, tuple[float, float]], output: str | os.PathLike) -> Path:
    """The paper's Figure 2: training and acquisition seconds per round for each name, log-scale bars."""
    plt = _pyplot()
    names = list(times)
    figure, axes = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
    positions = range(len(names))
    for offset, (label, column) in ((-0.2, ("training", 0)), (0.2, ("acquisition", 1))):
        axes.bar([p + offset for p in positions], [max(times[n][column], 1e-3) for n in names], width=0.4,
                 label=label)
    axes.set_yscale("log")
    axes.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("seconds per round (log scale)")
    axes.set_title("Time per round")
    axes.legend()
    figure.tight_layout()
    return _save(figure, plt, output)


def _save(figure, plt, output: str | os.PathLike) -> Path:  # noqa: ANN001 - matplotlib's types
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output
