"""The files a run keeps about its rounds, written on rank 0 and kept in step with the checkpoint.

``rounds.csv`` and ``labeled_indices.json`` are rewritten whole, atomically, after every round. A run killed
between writing them and writing its checkpoint leaves files one round ahead of the checkpoint it resumes from:
:meth:`RoundRecorder.reconcile` then rewrites them from the checkpoint's state (the checkpoint wins) and says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saal_lightning.reporting.learning_curve import plot_learning_curves, read_rounds_csv
from saal_lightning.reporting.round_log import write_labeled_indices, write_rounds_csv
from saal_lightning.reporting.summary import print_round_summary

log = logging.getLogger(__name__)


class RoundRecorder:
    """``rounds.csv``, ``labeled_indices.json``, ``learning_curve.png`` and the summary table of one run.

    Args:
        output_dir: the run's folder.
        strategy_name: written into the records and the plot's legend.
    """

    def __init__(self, output_dir: Path, strategy_name: str) -> None:
        self.output_dir = output_dir
        self.strategy_name = strategy_name

    @property
    def rounds_csv(self) -> Path:
        return self.output_dir / "rounds.csv"

    @property
    def labeled_json(self) -> Path:
        return self.output_dir / "labeled_indices.json"

    def write(self, history: Sequence[Mapping[str, Any]], labeled_round: Sequence[int]) -> None:
        """Rewrite both records from the rounds so far and the current split."""
        write_rounds_csv(self.rounds_csv, history)
        write_labeled_indices(self.labeled_json, labeled_round, self.strategy_name, completed_rounds=len(history))

    def reconcile(self, history: Sequence[Mapping[str, Any]], labeled_round: Sequence[int]) -> None:
        """Make the files on disk describe exactly ``history`` and ``labeled_round`` (the checkpoint's state).

        Files that already agree are left untouched; files that disagree (a crash after the records but before
        the checkpoint, or an earlier run's files in the same folder) are rewritten with a warning.
        """
        on_disk = self._rounds_on_disk()
        labeled_on_disk = self._labeled_on_disk()
        expected_rounds = [int(row["round"]) for row in history]
        expected_labeled = sorted(i for i, r in enumerate(labeled_round) if r >= 0)
        if on_disk is None and labeled_on_disk is None:
            return
        if on_disk == expected_rounds and labeled_on_disk == expected_labeled:
            return
        log.warning(
            "The records in %s (rounds %s, %s labeled) do not match the checkpoint being resumed (rounds %s, %d "
            "labeled): the checkpoint wins, rounds.csv and labeled_indices.json are rewritten from it.",
            self.output_dir, _span(on_disk), "?" if labeled_on_disk is None else len(labeled_on_disk),
            _span(expected_rounds), len(expected_labeled),
        )
        self.write(history, labeled_round)

    def finish(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Print the summary table and write ``learning_curve.png``."""
        title = f"{self.strategy_name}: {len(history)} rounds"
        print_round_summary(history, title=title)
        path = plot_learning_curves({self.strategy_name: list(history)}, self.output_dir / "learning_curve.png",
                                    title=title)
        log.info("Learning curve written to %s", path)

    def _rounds_on_disk(self) -> list[int] | None:
        if not self.rounds_csv.exists():
            return None
        return [int(row["round"]) for row in read_rounds_csv(self.rounds_csv)]

    def _labeled_on_disk(self) -> list[int] | None:
        if not self.labeled_json.exists():
            return None
        return sorted(json.loads(self.labeled_json.read_text())["labeled_indices"])


def _span(rounds: list[int] | None) -> str:
    if rounds is None:
        return "none (no file)"
    return f"{rounds[0]}-{rounds[-1]}" if rounds else "none"
