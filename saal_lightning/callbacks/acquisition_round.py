"""The work of one round after its training: test the model, then choose the items to label.

Plain functions of the trainer (for its ranks and collectives), the model, the data module and the strategy, so
that the round schedule (:class:`~saal_lightning.callbacks.AcquisitionCallback`) stays apart from what a round
does. Every rank runs them; scoring and testing are sharded across ranks and gathered in order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassAccuracy

from saal_lightning.callbacks.pool_scoring import (
    broadcast_from_rank_zero,
    score_items,
    shard_positions,
    stop_if_terminated,
)
from saal_lightning.callbacks.training_health import TrainingDivergedError
from saal_lightning.reporting.progress import acquisition_progress

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from saal_lightning.acquisition.strategies import AcquisitionStrategy


def held_out_accuracy(trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any,
                  accuracy: MulticlassAccuracy) -> float | None:
    """Accuracy on the held-out set (``None`` without one); each rank loads and scores only its shard."""
    loader = datamodule.test_dataloader()
    if loader is None:
        return None
    positions = shard_positions(len(loader.dataset), trainer.global_rank, trainer.world_size)
    shard = DataLoader(Subset(loader.dataset, positions.tolist()), batch_size=loader.batch_size,
                       num_workers=loader.num_workers, collate_fn=loader.collate_fn)
    accuracy.reset()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in shard:
                accuracy.update(model(batch[0].to(model.device)), batch[1].to(model.device))
                stop_if_terminated(trainer)
    finally:
        model.train(was_training)
    return float(accuracy.compute())


def choose_items(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: Any,
    strategy: AcquisitionStrategy,
    query_size: int,
    pool_size: int,
    generator: torch.Generator,
    round_index: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample a pool of ``pool_size`` unlabeled items, score it, and choose the items to label.

    Returns the chosen training-set indices in selection order, and their scores (``None`` for a strategy whose
    outputs are embeddings).

    Rank 0 selects; the selection and the generator's state are broadcast, so every rank labels the same items
    and draws the same next pool.

    Raises:
        TrainingDivergedError: when any score is NaN or infinite (on every rank: the outputs are gathered).
        RuntimeError: when the strategy returns other than ``query_size`` distinct in-range positions.
    """
    pool = datamodule.sample_pool(pool_size, generator)
    labeled = datamodule.labeled_indices if strategy.needs_labeled else None
    total = pool_size + (len(labeled) if labeled is not None else 0)
    description = f"Acquiring {query_size} with {strategy.name} (round {round_index})"
    with acquisition_progress(trainer, math.ceil(total / trainer.world_size), description) as advance:
        pool_outputs = score_items(trainer, strategy, model, datamodule.pool_dataloader, pool, model.device,
                                   advance)
        labeled_outputs = None
        if labeled is not None:
            labeled_outputs = score_items(trainer, strategy, model, datamodule.pool_dataloader, labeled,
                                          model.device, advance)
    check_scores(pool_outputs, strategy, round_index)
    positions, generator_state, failure = None, None, None
    if trainer.is_global_zero:
        try:
            positions = torch.as_tensor(strategy.select(pool_outputs, query_size, generator, labeled_outputs))
            check_selection(positions, query_size, pool_size, strategy)
            generator_state = generator.get_state()
        except Exception as err:
            # The other ranks are already waiting in the broadcast below: they must hear of the failure, or
            # they would wait there forever while rank 0 unwinds.
            failure = err
    # Rank 0 decides once; every rank keeps its generator in step with rank 0's (select() may have drawn from
    # it), so the next round's pool is identical everywhere.
    message = f"{type(failure).__name__}: {failure}" if failure is not None else None
    positions, generator_state, message = broadcast_from_rank_zero(trainer, (positions, generator_state, message))
    if failure is not None:
        raise failure
    if message is not None:
        raise SelectionFailedError(f"Round {round_index}: rank 0 failed to select the items to label, so this "
                                   f"rank stops too ({message})")
    generator.set_state(generator_state)
    return pool[positions], pool_outputs[positions] if pool_outputs.ndim == 1 else None


class SelectionFailedError(RuntimeError):
    """Raised on the other DDP ranks when the strategy's selection raised on rank 0."""


def check_scores(outputs: torch.Tensor, strategy: AcquisitionStrategy, round_index: int) -> None:
    """Refuse non-finite scores; warn when the scores of a ranking strategy are all equal."""
    per_item_finite = torch.isfinite(outputs).reshape(len(outputs), -1).all(dim=1)
    if not per_item_finite.all():
        raise TrainingDivergedError(
            f"Round {round_index}: {int((~per_item_finite).sum())} of {len(outputs)} {strategy.name} scores are "
            "not finite (NaN or infinite); the model has probably diverged, so no labels were acquired. Lower the "
            "learning rate and start again."
        )
    if strategy.ranks_by_score and outputs.ndim == 1 and len(outputs) > 1 and bool((outputs == outputs[0]).all()):
        rank_zero_warn(
            f"Round {round_index}: all {len(outputs)} {strategy.name} scores are equal ({float(outputs[0])!r}), "
            "so they carry no information about which items to label; ties are broken at random. A model whose "
            "training diverged or collapsed to one class scores like this."
        )


def predicted_classes(model: pl.LightningModule, datamodule: Any, indices: torch.Tensor) -> torch.Tensor:
    """The model's class for each item at ``indices`` (the pseudo labels shown to the people who label)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(batch[0].to(model.device)).argmax(dim=1).cpu()
                              for batch in datamodule.pool_dataloader(indices)])
    finally:
        model.train(was_training)


def check_selection(positions: torch.Tensor, query_size: int, pool_size: int, strategy: AcquisitionStrategy) -> None:
    """A strategy must return exactly ``query_size`` distinct, in-range positions: never silently fewer."""
    if positions.ndim != 1 or len(positions) != query_size:
        raise RuntimeError(f"{strategy!r} returned {tuple(positions.shape)} positions, expected {query_size}")
    if len(torch.unique(positions)) != len(positions) or positions.min() < 0 or positions.max() >= pool_size:
        raise RuntimeError(f"{strategy!r} returned duplicate or out-of-range positions: {positions.tolist()}")
