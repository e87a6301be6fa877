"""Lightning's ``CSVLogger``, except that a resumed run keeps the metrics logged before its interruption.

Lightning's CSV writer deletes ``metrics.csv`` when it opens a run folder that already has one, and it opens it
while the trainer sets up, before a checkpoint is restored: ``saal fit --ckpt_path last`` (which logs into the
run's own folder) would erase the training curves of every round before the crash, and a resume that is then
refused would have erased them too. This logger appends instead.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override


class _AppendingExperimentWriter(ExperimentWriter):
    @override
    def _check_log_dir_exists(self) -> None:
        # Carry on with the existing columns, so that a new metric rewrites the header over all the old rows.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))


class AppendingCSVLogger(CSVLogger):
    """A ``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it.

    Rows re-logged by a resumed run (the epochs after the last checkpoint are trained again) appear twice, with
    their ``epoch`` and ``step``; the last occurrence is the resumed run's.

    Example::

        >>> logger = AppendingCSVLogger("runs", name="quickstart")
    """

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if not isinstance(self._experiment, _AppendingExperimentWriter):
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
