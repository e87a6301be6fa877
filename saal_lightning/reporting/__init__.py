"""What an experiment leaves behind: ``rounds.csv``, ``labeled_indices.json``, a learning curve, a summary."""

from saal_lightning.reporting.learning_curve import plot_learning_curves, read_rounds_csv
from saal_lightning.reporting.round_log import ROUND_COLUMNS, write_labeled_indices, write_rounds_csv

__all__ = ["ROUND_COLUMNS", "plot_learning_curves", "read_rounds_csv", "write_labeled_indices", "write_rounds_csv"]
