r"""
Acquisition Callback
^^^^^^^^^^^^^^^^^^^^

Runs pool-based active-learning rounds: after a round's training it tests the model on the held-out set,
samples a random pool of unlabeled items, scores it with the acquisition strategy and labels the top
``query_size`` through ``datamodule.label``.

Two round schedules, chosen by ``epochs_per_round``:

* ``epochs_per_round=None`` (the default): **one round per fit**. The callback fires at the end of every
  ``trainer.fit`` (``on_train_end``) and never touches ``max_epochs``: your own loop of fits, a new ``Trainer`` per
  round or ``fit`` again on the same one, decides how long a round trains. Round numbers continue across fits.
* ``epochs_per_round=E``: **rounds inside one fit**, blocks of ``E`` epochs, the whole experiment in one
  ``trainer.fit`` (``max_epochs = E * (num_rounds + 1)``, set by the callback). This is what ``saal fit`` runs: it
  works with ``ddp_spawn`` (which forbids a second fit) and resumes from any checkpoint with ``ckpt_path``.

The round's work (test, pool, score, select) lives in :mod:`~saal_lightning.callbacks.acquisition_round`, its
files in :class:`~saal_lightning.reporting.round_recorder.RoundRecorder`; this class is the schedule and the
state (see ``shared/notes/lightning-conventions.md`` B1-B2 for the two designs).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from saal_lightning.acquisition.selection import uniform_random
from saal_lightning.acquisition.strategies import AcquisitionStrategy, build_strategy
from saal_lightning.callbacks.acquisition_round import choose_items, held_out_accuracy, predicted_classes
from saal_lightning.callbacks.global_rng import capture_global_rng, restore_global_rng
from saal_lightning.callbacks.metric_watchers import (
    PerRoundWatchers,
    refuse_plateau_schedulers_without_reset,
    refuse_watchers_in_one_fit,
)
from saal_lightning.callbacks.people_oracle import (
    asks_people,
    import_answers,
    instructions,
    save_resumable_checkpoint,
    write_query,
)
from saal_lightning.callbacks.pool_scoring import destroy_process_group_at_exit
from saal_lightning.callbacks.resume_checks import ResumeMismatchError, data_description, refuse_if_different
from saal_lightning.callbacks.training_health import NonFiniteLossCounter, batch_loss, check_finite_parameters
from saal_lightning.experiment_seed import resolve_seed
from saal_lightning.option_checks import check_int
from saal_lightning.reporting.progress import show_final_metrics
from saal_lightning.reporting.round_recorder import RoundRecorder

log = logging.getLogger(__name__)

# What the callback needs from the trainer's datamodule (ActiveDataModule provides all of it).
DATAMODULE_PROTOCOL = (
    "label",
    "sample_pool",
    "labeled_indices",
    "unlabeled_indices",
    "num_labeled",
    "current_round",
    "pool_dataloader",
    "test_dataloader",
    "num_classes",
    "state_dict",
)
# Trainer(max_epochs=None) reads as 1000 (Lightning's default): the in-fit schedule may replace it.
_LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


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
            ``None`` scores every unlabeled item. When fewer unlabeled items remain, all of them are scored (with a
            warning, once).
        num_rounds: acquisition rounds after the initial round 0 (the paper: 100). One round per fit: the fit of
            round ``num_rounds`` trains and tests without acquiring, and a further fit is refused.
        epochs_per_round: ``None`` (default) for one round per fit; an integer for rounds of that many epochs
            inside one fit, which then runs ``epochs_per_round * (num_rounds + 1)`` epochs (the callback sets
            ``max_epochs``; the trainer must reload its dataloaders every epoch).
        reset_weights: restore the model's initial weights, a fresh optimizer state, the LR schedulers' and the
            gradient scaler's initial states at the start of every round (default ``True``: the authors' Adam
            protocol, and the standard active-learning practice that keeps rounds comparable; ``False``
            warm-starts, as the authors' SAM runs do).
        seed: seed of the callback's own ``torch.Generator`` (pool sampling, random choices, tie-breaking); the
            training RNG stream is never touched. ``None`` takes the seed of ``seed_everything`` (0 without one).
        output_dir: where ``rounds.csv``, ``labeled_indices.json`` and ``learning_curve.png`` go; defaults to
            the ``log_dir`` of the first fit's trainer (with one round per fit, every round's records stay there).
        plot: write ``learning_curve.png`` and print a summary table at the end of training.
        partial_labels: with people as the oracle (``datamodule.oracle == "human"``), accept a round's answers
            with some items left unlabeled (empty label, or row removed); they stay unlabeled and may be queried
            again. By default every queried item must be labeled.

    With people as the oracle, a round's end writes its queries (``<output dir>/queries/round_<r>.csv``, a
    contact sheet and Label Studio tasks) instead of labeling, and stops the fit; the next fit (the same command
    with ``--ckpt_path last``) validates and imports the answers, appends them to ``<output dir>/labels.csv``
    and goes on. Without any label, the first query is a random draw, made before any training.

    A strategy that trains networks of its own (``ll4al``, ``vaal``) brings the callback that trains them
    (:meth:`~saal_lightning.acquisition.strategies.AcquisitionStrategy.training_callback`); this callback adds it to
    ``trainer.callbacks`` at setup, just after itself, so nothing is added by hand, and calls its
    ``on_acquisition_start`` just before each round's pool is scored (see
    :mod:`~saal_lightning.callbacks.strategy_training`).

    Raises:
        ValueError: for invalid sizes or counts, or an unknown strategy name.
        MisconfigurationException: before training, for a datamodule that is not an active one, a trainer that
            does not reload its dataloaders every epoch (rounds inside one fit), callbacks that compare metrics
            across rounds, or a resume whose options or data differ from the checkpoint's.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> acquisition = AcquisitionCallback("entropy", query_size=10, pool_size=500)
        >>> for _ in range(3):  # doctest: +SKIP
        ...     Trainer(max_epochs=3, callbacks=[acquisition]).fit(model, datamodule=datamodule)
    """

    def __init__(
        self,
        strategy: AcquisitionStrategy | str = "saal",
        query_size: int = 10,
        pool_size: int | None = 2000,
        num_rounds: int = 100,
        epochs_per_round: int | None = None,
        reset_weights: bool = True,
        seed: int | None = None,
        output_dir: str | None = None,
        plot: bool = True,
        partial_labels: bool = False,
    ) -> None:
        check_int("query_size", query_size, minimum=1)
        check_int("epochs_per_round", epochs_per_round, minimum=1, allow_none=True)
        check_int("num_rounds", num_rounds, minimum=0)
        check_int("pool_size", pool_size, minimum=query_size, allow_none=True)
        self.strategy = build_strategy(strategy)
        self.query_size = query_size
        self.pool_size = pool_size
        self.num_rounds = num_rounds
        self.epochs_per_round = epochs_per_round
        self.reset_weights = reset_weights
        self.seed = resolve_seed(seed)
        self.output_dir = output_dir
        self.plot = plot
        self.partial_labels = partial_labels
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history: list[dict[str, Any]] = []
        self._initial_model_state: dict[str, torch.Tensor] | None = None
        self._initial_optimizer_states: list[dict[str, Any]] = []
        self._initial_scheduler_states: list[dict[str, Any]] = []
        self._initial_scaler_state: dict[str, Any] | None = None
        # A reset owed to the next round: done at its first epoch's start, so that a round's checkpoint holds
        # the model that round trained, and a resume from it performs the reset.
        self._reset_pending = False
        # One round per fit: whether a round's training has begun and not yet been recorded (a checkpoint written
        # mid-round resumes that round instead of starting a new one).
        self._round_in_progress = False
        self._data: dict[str, Any] = {}
        self._fit_recorded_round = False
        self._round_started_at: float | None = None
        self._accuracy: MulticlassAccuracy | None = None
        self._recorder: RoundRecorder | None = None
        self._losses = NonFiniteLossCounter()
        self._watchers = PerRoundWatchers()
        self._warned_small_pool = False
        # People as the oracle: the query waiting for their answers ({"round", "indices", "paths"}), and whether
        # this fit stopped to wait for them.
        self._pending_query: dict[str, Any] | None = None
        self._stopped_for_labels = False

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
    def rounds_in_one_fit(self) -> bool:
        """``True`` for rounds of ``epochs_per_round`` epochs inside one fit, ``False`` for one round per fit."""
        return self.epochs_per_round is not None

    @property
    def current_round(self) -> int:
        """The round whose training is under way (0: the initial labeled set), or, during its acquisition, the round
        that has just been trained: the number of rounds recorded so far."""
        return len(self.history)

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole experiment with rounds inside one fit: round 0 plus ``num_rounds`` rounds."""
        if self.epochs_per_round is None:
            raise AttributeError("total_epochs is defined for rounds inside one fit (epochs_per_round set) only")
        return self.epochs_per_round * (self.num_rounds + 1)

    # ------------------------------------------------------------------ setup and resume checks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = _datamodule(trainer)
        missing = [name for name in DATAMODULE_PROTOCOL if not hasattr(datamodule, name)]
        if datamodule is None or missing:
            raise MisconfigurationException(
                "AcquisitionCallback needs the trainer's datamodule to be an ActiveDataModule (or to provide "
                f"{', '.join(DATAMODULE_PROTOCOL)}); missing: {missing or 'no datamodule was passed to fit'}. "
                "Wrap your dataset: ActiveDataModule(train_dataset=..., test_dataset=...)."
            )
        training = self.strategy.training_callback()
        if training is not None:
            training.attach(trainer, self)
        if self.rounds_in_one_fit:
            self._setup_rounds_in_one_fit(trainer)
            if asks_people(datamodule) and trainer.checkpoint_callback is None:
                raise MisconfigurationException(
                    "With people as the oracle the run stops after every query and resumes from its checkpoint: "
                    "add ModelCheckpoint(save_last=True, save_on_train_epoch_end=True, every_n_epochs=1)."
                )
        elif trainer.world_size > 1 and multiprocessing.parent_process() is not None:
            # Spawned (or forked) workers send nothing but the weights back to the main process, so the next fit
            # would start again from the initial labeled set.
            raise MisconfigurationException(
                "One round per fit does not work with a strategy that starts its processes per fit "
                "(ddp_spawn, ddp_fork, ddp_notebook): the labels acquired in a worker would be lost when the fit "
                "ends. Use rounds inside one fit (AcquisitionCallback(epochs_per_round=...)) or strategy='ddp'."
            )
        destroy_process_group_at_exit()
        # trainer.log_dir broadcasts, so every rank must ask for it. The first fit's folder holds the records of
        # all rounds: a new Trainer per round logs into a new version_N.
        log_dir = trainer.log_dir
        if self._recorder is None:
            self._recorder = RoundRecorder(Path(self.output_dir or log_dir or trainer.default_root_dir),
                                           self.strategy.name)

    def _setup_rounds_in_one_fit(self, trainer: pl.Trainer) -> None:
        assert self.epochs_per_round is not None
        reload_every = trainer.reload_dataloaders_every_n_epochs  # type: ignore[attr-defined]  # set at run time
        if reload_every < 1 or self.epochs_per_round % reload_every:
            raise MisconfigurationException(
                "AcquisitionCallback changes the labeled set between epochs, so the trainer must rebuild the "
                f"training dataloader at every round start: pass Trainer(reload_dataloaders_every_n_epochs=1) "
                f"(got {reload_every})."
            )
        if trainer.max_epochs not in (self.total_epochs, _LIGHTNING_DEFAULT_MAX_EPOCHS):
            raise MisconfigurationException(
                f"Trainer(max_epochs={trainer.max_epochs}) conflicts with the AcquisitionCallback's rounds inside "
                f"one fit, which train epochs_per_round={self.epochs_per_round} x (num_rounds={self.num_rounds} + 1) "
                f"= {self.total_epochs} epochs. Pass Trainer(max_epochs={self.total_epochs}) (the callback's "
                "total_epochs), or use one round per fit "
                "(epochs_per_round=None) with max_epochs as each round's length."
            )
        if trainer.max_epochs != self.total_epochs:
            log.info("AcquisitionCallback sets max_epochs=%d (epochs_per_round=%d x (num_rounds=%d + 1)).",
                     self.total_epochs, self.epochs_per_round, self.num_rounds)
            trainer.fit_loop.max_epochs = self.total_epochs
        refuse_watchers_in_one_fit(trainer)

    def _options(self) -> dict[str, Any]:
        """Every option that decides which items get labeled, as a resumed run must repeat them."""
        return {
            "strategy": repr(self.strategy),
            "query_size": self.query_size,
            "pool_size": self.pool_size,
            "num_rounds": self.num_rounds,
            "epochs_per_round": self.epochs_per_round,
            "reset_weights": self.reset_weights,
            "acquisition seed": self.seed,
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores the model and the datamodule before this hook, and callbacks' states right after
        # it; a missing state would only be warned about, and a datamodule of another class silently skipped.
        states = checkpoint.get("callbacks", {})
        state = states.get(self.state_key)
        if state is None or "options" not in state:
            raise ResumeMismatchError(
                f"Refusing to resume from {trainer.ckpt_path}: it holds no AcquisitionCallback state of this "
                f"version (callback states found: {sorted(states) or 'none'}), so which rounds it has done is "
                "unknown. Start a new run without ckpt_path. Nothing was changed."
            )
        refuse_if_different(trainer.ckpt_path, {**state["options"], **state["data"]},
                            {**self._options(), **data_description(_datamodule(trainer))})

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = _datamodule(trainer)
        self._stopped_for_labels = False
        self._data = data_description(datamodule)
        if self._pending_query is not None:
            self._import_answers(trainer, datamodule)
        if datamodule.num_labeled == 0 and asks_people(datamodule):
            self._ask_without_a_model(trainer, datamodule)
            return
        self._check_split_matches_history(datamodule)
        self._check_budget(datamodule)
        self._fit_recorded_round = False
        if self.reset_weights and self._initial_model_state is None:
            # A copy on the CPU: it lives for the whole run and must not hold accelerator memory.
            self._initial_model_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        # Optimizers, schedulers and the scaler are fresh here (training state is restored after on_fit_start):
        # this is what "a fresh optimizer" means at a reset.
        self._initial_optimizer_states = [deepcopy(opt.state_dict()) for opt in trainer.optimizers]
        self._initial_scheduler_states = [deepcopy(config.scheduler.state_dict())
                                          for config in trainer.lr_scheduler_configs]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._initial_scaler_state = deepcopy(scaler.state_dict()) if scaler is not None else None
        if self.rounds_in_one_fit and not self.reset_weights:
            refuse_plateau_schedulers_without_reset(trainer)
        if not self.rounds_in_one_fit and not self._round_in_progress:
            self._watchers.start_round(trainer, len(self.history))
        self._accuracy = MulticlassAccuracy(num_classes=datamodule.num_classes, average="micro").to(
            pl_module.device
        )
        if trainer.is_global_zero:
            assert self._recorder is not None
            self._recorder.reconcile(self.history, self._labeled_round(datamodule))

    def _check_split_matches_history(self, datamodule: Any) -> None:
        if datamodule.num_labeled == 0:
            raise ValueError(
                "The data module has no labeled items, so there is nothing to train round 0 on: start with a "
                "labeled initial set (ActiveDataModule(initial_labels=...), e.g. 20 for 10 classes)."
            )
        if not self.history:
            if datamodule.current_round > 0:
                raise MisconfigurationException(
                    f"The data module already holds labels from {datamodule.current_round} acquisition round(s) "
                    "that this AcquisitionCallback did not record. Create the callback once, before your loop of "
                    "fits, and pass the same instance to every Trainer (it keeps the round count)."
                )
            return
        last = self.history[-1]
        expected = int(last["num_labeled"]) + int(last["num_acquired"])
        if datamodule.num_labeled != expected:
            raise ResumeMismatchError(
                f"The data module holds {datamodule.num_labeled} labeled items, but the {len(self.history)} rounds "
                f"this AcquisitionCallback recorded end with {expected}: the split and the round history belong "
                "to different runs. Resume both from the same checkpoint, or start a new run."
            )

    def _check_budget(self, datamodule: Any) -> None:
        rounds_left = self.num_rounds - len(self.history)
        if not self.rounds_in_one_fit:
            if rounds_left < 0:
                raise MisconfigurationException(
                    f"All num_rounds={self.num_rounds} acquisition rounds and the final round are done "
                    f"({len(self.history)} rounds recorded): this fit would be round {len(self.history)}. Raise "
                    "num_rounds to go on."
                )
            rounds_left = min(rounds_left, 1)
        unlabeled = len(datamodule.unlabeled_indices)
        if rounds_left * self.query_size > unlabeled:
            raise ValueError(
                f"{rounds_left} rounds x query_size {self.query_size} = {rounds_left * self.query_size} labels "
                f"requested, but only {unlabeled} unlabeled items are left: lower num_rounds or query_size."
            )

    # ------------------------------------------------------------------ training
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._round_started_at = time.perf_counter()
        if not self.rounds_in_one_fit:
            self._round_in_progress = True
            return
        assert self.epochs_per_round is not None
        # A checkpoint written at a round's last epoch *before* this callback's epoch-end hook ran (a
        # ModelCheckpoint that saves on validation end does that) resumes after a round end whose acquisition
        # never happened. Finish that round now: the next epoch's dataloader reload sees the new labels.
        missed = trainer.current_epoch // self.epochs_per_round - len(self.history)
        if missed > 0:
            log.warning("Resuming after the end of round %d, whose acquisition was not in the checkpoint: "
                        "acquiring now.", len(self.history))
            self._finish_round(trainer, pl_module, epoch=trainer.current_epoch - 1)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reset_pending:
            self._reset_training_state(trainer, pl_module)
            self._reset_pending = False

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = batch_loss(outputs)
        if loss is not None:
            self._losses.update(loss)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = _datamodule(trainer)
        self._losses.check(trainer, round_index=len(self.history))
        pl_module.log("al/round", float(len(self.history)), prog_bar=True)
        pl_module.log("al/num_labeled", float(datamodule.num_labeled), prog_bar=True)
        if self.epochs_per_round is None or (trainer.current_epoch + 1) % self.epochs_per_round:
            return
        record = self._finish_round(trainer, pl_module, epoch=trainer.current_epoch)
        if record["test_acc"] is not None:
            pl_module.log("al/test_acc", record["test_acc"], prog_bar=True)
            pl_module.log("al/best_test_acc", record["best_test_acc"])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.rounds_in_one_fit:
            record = self._finish_round(trainer, pl_module, epoch=trainer.current_epoch - 1)
            self._round_in_progress = False
            self._fit_recorded_round = True
            metrics = {f"al/{key}": float(record[key]) for key in ("round", "num_labeled", "test_acc")
                       if record[key] is not None}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        show_final_metrics(trainer, pl_module)
        if trainer.is_global_zero and self.plot and self.history and self._recorder is not None:
            self._recorder.finish(self.history)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stopped_for_labels:
            self._tell_people_what_to_do(trainer)
            return
        # Lightning skips the training hooks of a fit whose loop is already done.
        if not self.rounds_in_one_fit and not self._fit_recorded_round:
            raise MisconfigurationException(
                f"This fit trained no epoch: the trainer had already reached max_epochs={trainer.max_epochs} "
                "(Lightning counts epochs across the fits of one Trainer). No round was recorded and nothing was "
                "labeled. Build a new Trainer for every round, or raise trainer.fit_loop.max_epochs by the round's "
                "epochs before calling fit again."
            )

    # ------------------------------------------------------------------ the round
    def _finish_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> dict[str, Any]:
        """Test, acquire (unless it is the last round) and record the round whose training ended at ``epoch``."""
        datamodule = _datamodule(trainer)
        round_index = len(self.history)
        train_seconds = time.perf_counter() - (self._round_started_at or time.perf_counter())
        num_labeled = datamodule.num_labeled
        acquired, pool_size = 0, 0
        acquisition_seconds: float | str = ""  # an empty rounds.csv cell when the round acquires nothing
        check_finite_parameters(pl_module, round_index)
        assert self._accuracy is not None
        # Iterating a DataLoader draws its base seed from the global RNG: isolate it, so that an experiment's
        # training stream does not depend on the strategy or on the test-set size.
        with isolate_rng():
            test_acc = held_out_accuracy(trainer, pl_module, datamodule, self._accuracy)
            if round_index < self.num_rounds:
                started = time.perf_counter()
                training = self.strategy.training_callback()
                if training is not None:
                    training.on_acquisition_start(trainer, pl_module, datamodule)
                pool_size = self._round_pool_size(datamodule)
                selection, scores = choose_items(trainer, pl_module, datamodule, self.strategy, self.query_size,
                                                 pool_size, self.generator, round_index)
                if asks_people(datamodule):
                    self._ask_people(trainer, datamodule, round_index + 1, selection, scores,
                                     predicted_classes(pl_module, datamodule, selection))
                else:
                    datamodule.label(selection, round=round_index + 1)
                    acquired = len(selection)
                acquisition_seconds = round(time.perf_counter() - started, 4)
                self._reset_pending = self.reset_weights
        record = {
            "round": round_index,
            "num_labeled": num_labeled,
            "test_acc": test_acc,
            "best_test_acc": max([row["test_acc"] for row in self.history if row["test_acc"] is not None] +
                                 ([test_acc] if test_acc is not None else []), default=None),
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
            assert self._recorder is not None
            self._recorder.write(self.history, self._labeled_round(datamodule))
        self._round_started_at = time.perf_counter()
        return record

    # ------------------------------------------------------------------ people as the oracle
    def _ask_people(self, trainer: pl.Trainer, datamodule: Any, round_index: int, selection: torch.Tensor,
                    scores: torch.Tensor | None, predicted: torch.Tensor | None) -> None:
        """Write the query for round ``round_index``'s labels and stop the fit until people answer it."""
        self._pending_query = write_query(trainer, datamodule, self._queries_dir, round_index, selection, scores,
                                          predicted)
        trainer.should_stop = True
        self._stopped_for_labels = True

    def _ask_without_a_model(self, trainer: pl.Trainer, datamodule: Any) -> None:
        """No label at all: the first query is a random draw, and the fit stops before any training."""
        unlabeled = datamodule.unlabeled_indices
        # Every rank draws the same positions from its identical generator.
        selection = unlabeled[uniform_random(len(unlabeled), min(self.query_size, len(unlabeled)), self.generator)]
        self._ask_people(trainer, datamodule, 0, selection, None, None)
        save_resumable_checkpoint(trainer)

    def _import_answers(self, trainer: pl.Trainer, datamodule: Any) -> None:
        """Import the pending query's answers and finish its round's record."""
        assert self._pending_query is not None and self._recorder is not None
        labeled = import_answers(trainer, datamodule, self._pending_query, self._queries_dir,
                                 self._recorder.output_dir / "labels.csv", self.partial_labels)
        if self.history:
            self.history[-1]["num_acquired"] = labeled
        if trainer.is_global_zero:
            self._recorder.write(self.history, self._labeled_round(datamodule))
        self._pending_query = None

    def _tell_people_what_to_do(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero and self._pending_query is not None:
            print(instructions(self._pending_query, self._queries_dir), flush=True)

    @property
    def pending_query(self) -> torch.Tensor | None:
        """With people as the oracle: the indices of the items waiting for their labels (``None`` when none are).

        In your own loop of fits, label them with ``datamodule.label(indices, labels)`` before the next fit; the
        callback then records them (and appends them to ``labels.csv``) instead of reading the queries file.
        """
        return self._pending_query["indices"] if self._pending_query is not None else None

    @property
    def _queries_dir(self) -> Path:
        assert self._recorder is not None
        return self._recorder.output_dir / "queries"

    def _round_pool_size(self, datamodule: Any) -> int:
        unlabeled = len(datamodule.unlabeled_indices)
        if self.pool_size is None or self.pool_size < unlabeled:
            return unlabeled if self.pool_size is None else self.pool_size
        if self.pool_size > unlabeled and not self._warned_small_pool:
            rank_zero_warn(f"pool_size={self.pool_size} is larger than the {unlabeled} unlabeled items left: "
                           "every round from now on scores all of them.")
            self._warned_small_pool = True
        return unlabeled

    def _reset_training_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The round starts from scratch: initial weights, fresh optimizers, schedulers and gradient scaler."""
        assert self._initial_model_state is not None
        pl_module.load_state_dict(self._initial_model_state)
        for optimizer, state in zip(trainer.optimizers, self._initial_optimizer_states, strict=True):
            optimizer.load_state_dict(deepcopy(state))
        for config, state in zip(trainer.lr_scheduler_configs, self._initial_scheduler_states, strict=True):
            config.scheduler.load_state_dict(deepcopy(state))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and self._initial_scaler_state is not None:
            scaler.load_state_dict(deepcopy(self._initial_scaler_state))

    @staticmethod
    def _labeled_round(datamodule: Any) -> list[int]:
        return datamodule.state_dict()["labeled_round"].tolist()

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_state": self.generator.get_state(),
            "history": [dict(row) for row in self.history],
            "initial_model_state": self._initial_model_state,
            "options": self._options(),
            "data": dict(self._data),
            "reset_pending": self._reset_pending,
            "round_in_progress": self._round_in_progress,
            "pending_query": dict(self._pending_query) if self._pending_query is not None else None,
            "global_rng": capture_global_rng(),
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.generator.set_state(state_dict["generator_state"])
        self.history = [dict(row) for row in state_dict["history"]]
        self._initial_model_state = state_dict["initial_model_state"]
        self._reset_pending = bool(state_dict["reset_pending"])
        self._round_in_progress = bool(state_dict["round_in_progress"])
        self._pending_query = state_dict.get("pending_query")
        restore_global_rng(state_dict["global_rng"])


def _datamodule(trainer: pl.Trainer) -> Any:
    """The fit's datamodule: Lightning attaches it to the trainer at run time, undeclared on the class."""
    return trainer.datamodule  # type: ignore[attr-defined]
