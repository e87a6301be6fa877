r"""
Acquisition Callback
^^^^^^^^^^^^^^^^^^^^

Runs a whole pool-based active-learning experiment inside one ``trainer.fit``.

Rounds are blocks of ``epochs_per_round`` epochs. At the end of a round's last epoch (``on_train_epoch_end``)
the callback measures test accuracy on the held-out set, samples a random pool of unlabeled items, scores it
with the acquisition strategy, labels the top ``query_size`` through ``datamodule.label`` and, by default,
resets the model and optimizer to their initial state; the trainer's ``reload_dataloaders_every_n_epochs=1``
makes the next epoch train on the grown labeled set.

Why rounds inside one fit rather than one fit per round: it works with an unchanged ``trainer.fit`` (the drop-in
case), with ``ddp_spawn`` (which forbids fitting twice), and resumes natively from a checkpoint (loop, data
split, callback state and optimizer all travel in it). One fit per round would need a custom loop around
``fit`` and would have to restore "which round" by hand. (See ``shared/notes/lightning-conventions.md`` B1.)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from saal_lightning.acquisition.strategies import AcquisitionStrategy, build_strategy
from saal_lightning.callbacks.pool_scoring import (
    broadcast_from_rank_zero,
    destroy_process_group_at_exit,
    score_items,
)
from saal_lightning.reporting.learning_curve import plot_learning_curves
from saal_lightning.reporting.progress import acquisition_progress, show_final_metrics
from saal_lightning.reporting.round_log import write_labeled_indices, write_rounds_csv
from saal_lightning.reporting.summary import print_round_summary

log = logging.getLogger(__name__)

# What the callback needs from the trainer's datamodule (ActiveDataModule provides all of it).
DATAMODULE_PROTOCOL = (
    "label",
    "sample_pool",
    "labeled_indices",
    "unlabeled_indices",
    "pool_dataloader",
    "test_dataloader",
    "num_classes",
    "state_dict",
)


class AcquisitionCallback(Callback):
    r"""Score the unlabeled pool after each round's training and move the top items to the labeled set.

    Args:
        strategy: a registered strategy name with its default options (``"saal"``, ``"entropy"``, ``"badge"``,
            ...; see ``STRATEGIES``) or an
            :class:`~saal_lightning.acquisition.strategies.AcquisitionStrategy` instance: in YAML a
            ``class_path`` with ``init_args`` (e.g. ``SAAL`` with ``rho`` and ``adaptive``). On the command line
            ``--acquisition.strategy badge`` switches strategy.
        query_size: items labeled per round (the paper: 10; CIFAR-100: 100).
        pool_size: unlabeled items sampled at random and scored per round (the paper: 2,000; CIFAR-100: 10,000);
            ``None`` scores every unlabeled item. When fewer unlabeled items remain, all of them are scored.
        num_rounds: acquisition rounds after the initial round 0 (the paper: 100). The fit runs
            ``epochs_per_round * (num_rounds + 1)`` epochs: the callback sets the trainer's ``max_epochs``.
        epochs_per_round: training epochs per round (the paper: 50).
        reset_weights: restore the model's initial weights and a fresh optimizer state at the start of every
            round (default ``True``: the authors' Adam protocol, and the standard active-learning practice that
            keeps rounds comparable; ``False`` warm-starts, as the authors' SAM runs do).
        seed: seed of the callback's own ``torch.Generator`` (pool sampling, random choices); the training RNG
            stream is never touched.
        output_dir: where ``rounds.csv``, ``labeled_indices.json`` and ``learning_curve.png`` go; defaults to
            the trainer's ``log_dir``.
        plot: write ``learning_curve.png`` and print a summary table at the end of training.

    Raises:
        ValueError: for invalid sizes or counts, or an unknown strategy name.
        MisconfigurationException: at setup, when the datamodule is not an active one or the trainer does not
            reload its dataloaders every epoch.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> acquisition = AcquisitionCallback("entropy", query_size=10, num_rounds=3, epochs_per_round=2)
        >>> trainer = Trainer(callbacks=[acquisition], reload_dataloaders_every_n_epochs=1)  # doctest: +SKIP
    """

    def __init__(
        self,
        strategy: AcquisitionStrategy | str = "saal",
        query_size: int = 10,
        pool_size: int | None = 2000,
        num_rounds: int = 100,
        epochs_per_round: int = 50,
        reset_weights: bool = True,
        seed: int = 0,
        output_dir: str | None = None,
        plot: bool = True,
    ) -> None:
        for name, value in (("query_size", query_size), ("epochs_per_round", epochs_per_round)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(num_rounds, int) or num_rounds < 0:
            raise ValueError(f"num_rounds must be a non-negative integer, got {num_rounds!r}")
        if pool_size is not None and (not isinstance(pool_size, int) or pool_size < query_size):
            raise ValueError(f"pool_size must be None or an integer >= query_size ({query_size}), got {pool_size!r}")
        self.strategy = build_strategy(strategy)
        self.query_size = query_size
        self.pool_size = pool_size
        self.num_rounds = num_rounds
        self.epochs_per_round = epochs_per_round
        self.reset_weights = reset_weights
        self.seed = seed
        self.output_dir = output_dir
        self.plot = plot
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, Any]] = []
        self._initial_model_state: dict[str, torch.Tensor] | None = None
        self._initial_optimizer_states: list[dict[str, Any]] = []
        self._round_started_at: float | None = None
        self._accuracy: MulticlassAccuracy | None = None
        self._output_dir: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the trainer with its callbacks. A torch.Generator pickles through a temporary state
        # tensor that torch shares by file descriptor, and the temporary is freed before the child process
        # opens it; plain bytes travel safely.
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8)
        state["generator"] = torch.Generator()
        state["generator"].set_state(generator_state)
        self.__dict__.update(state)

    @property
    def total_epochs(self) -> int:
        """Epochs the whole experiment trains: round 0 plus ``num_rounds`` acquisition rounds."""
        return self.epochs_per_round * (self.num_rounds + 1)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(strategy=self.strategy.name, query_size=self.query_size)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        missing = [name for name in DATAMODULE_PROTOCOL if not hasattr(datamodule, name)]
        if datamodule is None or missing:
            raise MisconfigurationException(
                "AcquisitionCallback needs the trainer's datamodule to be an ActiveDataModule (or to provide "
                f"{', '.join(DATAMODULE_PROTOCOL)}); missing: {missing or 'no datamodule was passed to fit'}. "
                "Wrap your dataset: ActiveDataModule(train_dataset=..., test_dataset=...)."
            )
        reload_every = trainer.reload_dataloaders_every_n_epochs
        if reload_every < 1 or self.epochs_per_round % reload_every:
            raise MisconfigurationException(
                "AcquisitionCallback changes the labeled set between epochs, so the trainer must rebuild the "
                f"training dataloader at every round start: pass Trainer(reload_dataloaders_every_n_epochs=1) "
                f"(got {reload_every})."
            )
        if trainer.max_epochs != self.total_epochs:
            log.info(
                "AcquisitionCallback sets max_epochs=%d (epochs_per_round=%d x (num_rounds=%d + 1)); it was %s.",
                self.total_epochs, self.epochs_per_round, self.num_rounds, trainer.max_epochs,
            )
            trainer.fit_loop.max_epochs = self.total_epochs
        destroy_process_group_at_exit()
        # trainer.log_dir broadcasts, so every rank must ask for it.
        self._output_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        rounds_left = self.num_rounds - len(self.history)
        unlabeled = len(datamodule.unlabeled_indices)
        if rounds_left * self.query_size > unlabeled:
            raise ValueError(
                f"{rounds_left} rounds x query_size {self.query_size} = {rounds_left * self.query_size} labels "
                f"requested, but only {unlabeled} unlabeled items are left: lower num_rounds or query_size."
            )
        if self.reset_weights and self._initial_model_state is None:
            # A copy on the CPU: it lives for the whole run and must not hold accelerator memory.
            self._initial_model_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        # Optimizers are fresh here (training state is restored after on_fit_start), so this is the state a
        # "fresh optimizer" has: no moments, the configured hyper-parameters.
        self._initial_optimizer_states = [deepcopy(opt.state_dict()) for opt in trainer.optimizers]
        self._accuracy = MulticlassAccuracy(num_classes=datamodule.num_classes, average="micro").to(
            pl_module.device
        )
        self.strategy.setup(trainer, pl_module)
        self._round_started_at = time.perf_counter()

    # ------------------------------------------------------------------ training
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.strategy.on_train_batch_end(trainer, pl_module, batch)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint written at a round's last epoch *before* this callback's epoch-end hook ran (a
        # ModelCheckpoint that saves on validation end does that) resumes after a round end whose acquisition
        # never happened. Finish that round now: the next epoch's dataloader reload sees the new labels.
        missed = trainer.current_epoch // self.epochs_per_round - len(self.history)
        if missed > 0:
            log.warning("Resuming after the end of round %d, whose acquisition was not in the checkpoint: "
                        "acquiring now.", len(self.history))
            self._finish_round(trainer, pl_module, epoch=trainer.current_epoch - 1)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        pl_module.log("al/round", float(len(self.history)), prog_bar=True)
        pl_module.log("al/num_labeled", float(len(datamodule.labeled_indices)), prog_bar=True)
        if (trainer.current_epoch + 1) % self.epochs_per_round:
            return
        record = self._finish_round(trainer, pl_module, epoch=trainer.current_epoch)
        pl_module.log("al/test_acc", record["test_acc"], prog_bar=True)
        pl_module.log("al/best_test_acc", record["best_test_acc"])

    def _finish_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> dict[str, Any]:
        """Test, acquire (unless it is the last round), reset, and record the round that ended at ``epoch``."""
        datamodule = trainer.datamodule
        round_index = len(self.history)
        train_seconds = time.perf_counter() - (self._round_started_at or time.perf_counter())
        num_labeled = len(datamodule.labeled_indices)
        acquired, pool_size, acquisition_seconds = 0, 0, ""
        # Iterating a DataLoader draws its base seed from the global RNG: isolate it, so that an experiment's
        # training stream does not depend on the strategy or on the test-set size.
        with isolate_rng():
            test_acc = self._test_accuracy(trainer, pl_module)
            if round_index < self.num_rounds:
                started = time.perf_counter()
                acquired, pool_size = self._acquire(trainer, pl_module, round_index)
                acquisition_seconds = round(time.perf_counter() - started, 4)
                if self.reset_weights:
                    self._reset_model_and_optimizers(trainer, pl_module)
        record = {
            "round": round_index,
            "num_labeled": num_labeled,
            "test_acc": test_acc,
            "best_test_acc": max([test_acc] + [row["test_acc"] for row in self.history]),
            "acquisition_seconds": acquisition_seconds,
            "train_seconds": round(train_seconds, 4),
            "num_acquired": acquired,
            "pool_size": pool_size,
            "strategy": self.strategy.name,
            "epoch": epoch,
            "global_step": trainer.global_step,
        }
        self.history.append(record)
        if trainer.is_global_zero:
            self._write_records(datamodule)
        self._round_started_at = time.perf_counter()
        return record

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        show_final_metrics(trainer, pl_module)
        if not (trainer.is_global_zero and self.plot and self.history and self._output_dir is not None):
            return
        title = f"{self.strategy.name}: {len(self.history)} rounds"
        print_round_summary(self.history, title=title)
        path = plot_learning_curves({self.strategy.name: self.history}, self._output_dir / "learning_curve.png",
                                    title=title)
        log.info("Learning curve written to %s", path)

    # ------------------------------------------------------------------ the round's work
    def _test_accuracy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Accuracy on the held-out set, batches split across ranks, reduced by torchmetrics."""
        assert self._accuracy is not None
        self._accuracy.reset()
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            for batch_idx, (inputs, targets) in enumerate(trainer.datamodule.test_dataloader()):
                if batch_idx % trainer.world_size == trainer.global_rank:
                    self._accuracy.update(pl_module(inputs.to(pl_module.device)), targets.to(pl_module.device))
        pl_module.train(was_training)
        return float(self._accuracy.compute())

    def _acquire(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round_index: int) -> tuple[int, int]:
        """Sample the pool, score it, label the selection. Returns (items labeled, pool size)."""
        datamodule = trainer.datamodule
        self.strategy.on_round_end(trainer, pl_module, datamodule)
        unlabeled = len(datamodule.unlabeled_indices)
        pool_size = unlabeled if self.pool_size is None else min(self.pool_size, unlabeled)
        # Every rank draws from an identical generator state, so every rank holds the same pool.
        pool = datamodule.sample_pool(pool_size, self.generator)
        labeled = datamodule.labeled_indices if self.strategy.needs_labeled else None
        total = pool_size + (len(labeled) if labeled is not None else 0)
        description = f"Acquiring {self.query_size} with {self.strategy.name} (round {round_index})"
        with acquisition_progress(trainer, math.ceil(total / trainer.world_size), description) as advance:
            pool_outputs = score_items(trainer, self.strategy, pl_module, datamodule.pool_dataloader, pool,
                                       pl_module.device, advance)
            labeled_outputs = None
            if labeled is not None:
                labeled_outputs = score_items(trainer, self.strategy, pl_module, datamodule.pool_dataloader,
                                              labeled, pl_module.device, advance)
        selection, generator_state = None, None
        if trainer.is_global_zero:
            positions = self.strategy.select(pool_outputs, self.query_size, self.generator, labeled_outputs)
            self._check_selection(positions, pool_size)
            selection, generator_state = pool[torch.as_tensor(positions)], self.generator.get_state()
        # Rank 0 decides once; every rank labels the same items and keeps its generator in step with rank 0's
        # (select() may have drawn from it), so the next round's pool is identical everywhere.
        selection, generator_state = broadcast_from_rank_zero(trainer, (selection, generator_state))
        self.generator.set_state(generator_state)
        datamodule.label(selection, round=round_index + 1)
        return len(selection), pool_size

    def _check_selection(self, positions: torch.Tensor, pool_size: int) -> None:
        """A strategy must return exactly query_size distinct, in-range positions: never silently fewer."""
        positions = torch.as_tensor(positions)
        if positions.ndim != 1 or len(positions) != self.query_size:
            raise RuntimeError(f"{self.strategy!r} returned {tuple(positions.shape)} positions, "
                               f"expected {self.query_size}")
        if len(torch.unique(positions)) != len(positions) or positions.min() < 0 or positions.max() >= pool_size:
            raise RuntimeError(f"{self.strategy!r} returned duplicate or out-of-range positions: {positions.tolist()}")

    def _reset_model_and_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._initial_model_state is not None
        pl_module.load_state_dict(self._initial_model_state)
        for optimizer, state in zip(trainer.optimizers, self._initial_optimizer_states, strict=True):
            optimizer.load_state_dict(deepcopy(state))
        self.strategy.on_weights_reset(trainer, pl_module)

    def _write_records(self, datamodule: Any) -> None:
        assert self._output_dir is not None
        write_rounds_csv(self._output_dir / "rounds.csv", self.history)
        labeled_round = datamodule.state_dict()["labeled_round"].tolist()
        write_labeled_indices(self._output_dir / "labeled_indices.json", labeled_round, self.strategy.name,
                              completed_rounds=len(self.history))

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_state": self.generator.get_state(),
            "history": [dict(row) for row in self.history],
            "initial_model_state": self._initial_model_state,
            "strategy": self.strategy.state_dict(),
            "epochs_per_round": self.epochs_per_round,
            "query_size": self.query_size,
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict["epochs_per_round"] != self.epochs_per_round:
            raise ValueError(
                f"The checkpoint was written with epochs_per_round={state_dict['epochs_per_round']}, "
                f"this callback has {self.epochs_per_round}: rounds would not line up."
            )
        self.generator.set_state(state_dict["generator_state"])
        self.history = [dict(row) for row in state_dict["history"]]
        self._initial_model_state = state_dict["initial_model_state"]
        self.strategy.load_state_dict(state_dict["strategy"])
