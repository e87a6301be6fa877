"""Progress for long acquisition work, shown inside Lightning's own progress display when there is one.

Rich allows one live display at a time, so a second ``rich.progress.Progress`` next to Lightning's
``RichProgressBar`` would fail; we add a task to the bar's own ``progress`` instead. With the default TQDM bar
we open a tqdm bar; with no progress bar, nothing is shown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

if TYPE_CHECKING:
    import lightning.pytorch as pl


@contextmanager
def acquisition_progress(trainer: pl.Trainer, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: report ``n`` more items done out of ``total`` (rank 0 only)."""
    bar = trainer.progress_bar_callback
    if not trainer.is_global_zero or not isinstance(bar, (RichProgressBar, TQDMProgressBar)) or not bar.is_enabled:
        yield lambda n: None
    elif isinstance(bar, RichProgressBar) and bar.progress is not None:
        progress = bar.progress
        task = progress.add_task(description, total=total)
        try:
            yield lambda n: progress.update(task, advance=n, refresh=True)
        finally:
            progress.remove_task(task)
    elif isinstance(bar, TQDMProgressBar):
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=description, leave=False, dynamic_ncols=True) as tqdm_bar:
            yield tqdm_bar.update
    else:
        yield lambda n: None


def show_final_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Put the last epoch's logged values on the rich bar before it stops.

    The bar reads the logged values in its own hooks. When its ``on_train_epoch_end`` runs before the callback
    that logs the round's test accuracy (as in the CLI, where ``trainer.callbacks`` come first), the value shows
    from the next batch on, and the last round's never would. Call from ``on_train_end``: the display stops
    only at teardown, after every ``on_train_end``.
    """
    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar) and bar.is_enabled and bar.progress is not None:
        bar.on_train_epoch_end(trainer, pl_module)  # refreshes the metrics column from progress_bar_metrics
