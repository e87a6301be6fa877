"""The end-of-run summary table, printed with rich."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def round_summary_table(rows: Sequence[Mapping[str, Any]], title: str) -> Table:
    """A rich table of the per-round records (round, labels, accuracy, best accuracy, acquisition time)."""
    table = Table(title=title)
    for column in ("round", "labeled", "test acc", "best test acc", "acquisition s", "train s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["round"]),
            str(row["num_labeled"]),
            _percent(row["test_acc"]),
            _percent(row["best_test_acc"]),
            f"{float(row['acquisition_seconds']):.2f}" if row["acquisition_seconds"] != "" else "-",
            f"{float(row['train_seconds']):.1f}",
        )
    return table


def print_round_summary(rows: Sequence[Mapping[str, Any]], title: str, console: Console | None = None) -> None:
    """Print :func:`round_summary_table` to the console (stdout by default)."""
    (console or Console()).print(round_summary_table(rows, title))


def _percent(value: Any) -> str:
    # No test set (a folder of images labeled by people may have none): no accuracy, not 0 %.
    return "-" if value in ("", None) else f"{100 * float(value):.2f}%"
