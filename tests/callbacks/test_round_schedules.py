"""One round per fit (the user's own loop of fits) against rounds inside one fit, and the callbacks that watch
metrics across rounds (EarlyStopping, monitoring ModelCheckpoint, LR schedulers) in both schedules."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn import functional as F

from saal_lightning import AcquisitionCallback
from saal_lightning.models.backbones import build_backbone
from tests.callbacks.tiny_experiment import QUIET as BASE_QUIET
from tests.callbacks.tiny_experiment import tiny_classifier, tiny_datamodule
from tests.synthetic_data import SyntheticImages

QUIET = BASE_QUIET | {"enable_checkpointing": False}


def _rounds_csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "rounds.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_round_per_fit_with_a_new_trainer_each_round(tmp_path: Path) -> None:
    datamodule, model = tiny_datamodule(), tiny_classifier()
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, output_dir=str(tmp_path), plot=False)
    for expected_round in range(3):
        trainer = pl.Trainer(max_epochs=2, callbacks=[acquisition], **QUIET)
        trainer.fit(model, datamodule=datamodule)
        assert trainer.max_epochs == 2 and trainer.current_epoch == 2  # the callback never touches max_epochs
        assert datamodule.current_round == expected_round + 1
    assert datamodule.num_labeled == 8 + 3 * 4
    assert [row["round"] for row in acquisition.history] == [0, 1, 2]
    assert [row["num_labeled"] for row in acquisition.history] == [8, 12, 16]
    assert [row["num_acquired"] for row in acquisition.history] == [4, 4, 4]
    assert [int(row["round"]) for row in _rounds_csv(tmp_path)] == [0, 1, 2]


def test_fit_again_on_the_same_trainer_needs_max_epochs_raised(tmp_path: Path) -> None:
    datamodule, model = tiny_datamodule(), tiny_classifier()
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, output_dir=str(tmp_path), plot=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[acquisition], **QUIET)
    trainer.fit(model, datamodule=datamodule)
    trainer.fit_loop.max_epochs += 2  # the documented way: Lightning counts epochs across fits of one Trainer
    trainer.fit(model, datamodule=datamodule)
    assert [row["round"] for row in acquisition.history] == [0, 1] and datamodule.num_labeled == 16
    assert [row["epoch"] for row in acquisition.history] == [1, 3]

    # Without raising it, the fit trains nothing: refused, with nothing recorded or labeled.
    labeled_before = datamodule.labeled_round.clone()
    with pytest.raises(MisconfigurationException, match="This fit trained no epoch: .*max_epochs=4"):
        trainer.fit(model, datamodule=datamodule)
    assert torch.equal(datamodule.labeled_round, labeled_before) and len(acquisition.history) == 2


def test_the_loop_of_fits_labels_what_rounds_inside_one_fit_label(tmp_path: Path) -> None:
    per_fit_data, per_fit_model = tiny_datamodule(), tiny_classifier()
    per_fit = AcquisitionCallback("entropy", query_size=4, pool_size=30, output_dir=str(tmp_path / "a"), plot=False)
    for _ in range(3):
        pl.Trainer(max_epochs=3, callbacks=[per_fit], **QUIET).fit(per_fit_model, datamodule=per_fit_data)

    in_fit_data, in_fit_model = tiny_datamodule(), tiny_classifier()
    in_fit = AcquisitionCallback("entropy", query_size=4, pool_size=30, num_rounds=3, epochs_per_round=3,
                                 output_dir=str(tmp_path / "b"), plot=False)
    pl.Trainer(callbacks=[in_fit], reload_dataloaders_every_n_epochs=1, **QUIET).fit(in_fit_model,
                                                                                     datamodule=in_fit_data)
    assert per_fit_data.num_labeled == in_fit_data.num_labeled == 20
    assert torch.equal(per_fit_data.labeled_round, in_fit_data.labeled_round)
    assert [r["test_acc"] for r in per_fit.history] == [r["test_acc"] for r in in_fit.history[:3]]
    # ... and a different data seed labels something else (the comparison can fail).
    other_data, other_model = tiny_datamodule(seed=1), tiny_classifier()
    other = AcquisitionCallback("entropy", query_size=4, pool_size=30, output_dir=str(tmp_path / "c"), plot=False)
    for _ in range(3):
        pl.Trainer(max_epochs=3, callbacks=[other], **QUIET).fit(other_model, datamodule=other_data)
    assert not torch.equal(other_data.labeled_round, per_fit_data.labeled_round)


def test_a_fresh_callback_per_fit_is_refused(tmp_path: Path) -> None:
    datamodule, model = tiny_datamodule(), tiny_classifier()
    pl.Trainer(max_epochs=1, callbacks=[AcquisitionCallback("random", query_size=4, pool_size=30, plot=False,
                                                            output_dir=str(tmp_path))], **QUIET).fit(
        model, datamodule=datamodule)
    fresh = AcquisitionCallback("random", query_size=4, pool_size=30, plot=False, output_dir=str(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"labels from 1 acquisition round\(s\) that this "
                                                        "AcquisitionCallback did not record. Create the callback once"):
        pl.Trainer(max_epochs=1, callbacks=[fresh], **QUIET).fit(model, datamodule=datamodule)
    assert datamodule.num_labeled == 12 and fresh.history == []


def test_one_round_per_fit_stops_after_num_rounds(tmp_path: Path) -> None:
    datamodule, model = tiny_datamodule(), tiny_classifier()
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, num_rounds=1, output_dir=str(tmp_path),
                                      plot=False)
    for _ in range(2):
        pl.Trainer(max_epochs=1, callbacks=[acquisition], **QUIET).fit(model, datamodule=datamodule)
    assert [row["num_acquired"] for row in acquisition.history] == [4, 0]  # the final round trains and tests
    with pytest.raises(MisconfigurationException, match="All num_rounds=1 acquisition rounds and the final round"):
        pl.Trainer(max_epochs=1, callbacks=[acquisition], **QUIET).fit(model, datamodule=datamodule)
    assert datamodule.num_labeled == 12


class EpochsPerFit(Callback):
    """How many epochs each fit trained, and EarlyStopping's state when each fit's training starts."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.wait_at_start: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self._first = trainer.current_epoch
        self.wait_at_start.append(trainer.early_stopping_callback.wait_count)

    def on_train_end(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch - self._first)


def test_early_stopping_restarts_at_every_round_of_a_loop_of_fits(tmp_path: Path) -> None:
    # min_delta so large that only the first epoch of a fresh EarlyStopping counts as an improvement: a fresh one
    # stops after 2 epochs; one carrying the previous round's best score would stop after 1.
    early_stopping = EarlyStopping(monitor="train_loss", min_delta=1e9, patience=1, check_on_train_epoch_end=True)
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, output_dir=str(tmp_path), plot=False)
    epochs = EpochsPerFit()
    datamodule, model = tiny_datamodule(), tiny_classifier()
    for _ in range(3):
        pl.Trainer(max_epochs=5, callbacks=[early_stopping, acquisition, epochs], **QUIET).fit(
            model, datamodule=datamodule)
    assert epochs.epochs == [2, 2, 2]
    assert epochs.wait_at_start == [0, 0, 0]
    assert datamodule.num_labeled == 20 and len(acquisition.history) == 3


def test_a_new_early_stopping_per_fit_keeps_its_own_settings() -> None:
    from types import SimpleNamespace

    from saal_lightning.callbacks.metric_watchers import PerRoundWatchers

    watchers = PerRoundWatchers()
    for round_index, patience in enumerate((1, 3, 5)):  # each fit's EarlyStopping is new; the last one is freed
        early_stopping = EarlyStopping(monitor="train_loss", patience=patience)
        trainer = SimpleNamespace(callbacks=[early_stopping])
        watchers.start_round(trainer, round_index)
        early_stopping.wait_count = 7  # it watched some epochs; the next round start resets that
        watchers.start_round(trainer, round_index + 1)
        assert early_stopping.patience == patience and early_stopping.wait_count == 0
        del early_stopping, trainer


def test_callbacks_comparing_rounds_inside_one_fit_are_refused_before_training(tmp_path: Path) -> None:
    for watcher, message in (
        (EarlyStopping(monitor="val_loss"), r"EarlyStopping\(monitor='val_loss'\) cannot be used .* one fit per "
                                            "round"),
        (ModelCheckpoint(monitor="val_acc", dirpath=tmp_path / "ckpt"),
         r"ModelCheckpoint\(monitor='val_acc'\) would rank checkpoints of different rounds"),
    ):
        datamodule, model = tiny_datamodule(), tiny_classifier()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, num_rounds=2, epochs_per_round=1,
                                          output_dir=str(tmp_path / "run"))
        trainer = pl.Trainer(callbacks=[acquisition, watcher], reload_dataloaders_every_n_epochs=1,
                             **(QUIET | {"enable_checkpointing": True}))
        with pytest.raises(MisconfigurationException, match=message):
            trainer.fit(model, datamodule=datamodule)
        assert trainer.current_epoch == 0 and datamodule.num_labeled == 8
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()


def test_a_reused_monitoring_checkpoint_is_refused_in_a_loop_of_fits(tmp_path: Path) -> None:
    datamodule, model = tiny_datamodule(val_dataset=SyntheticImages(16, seed=2)), tiny_classifier()
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, output_dir=str(tmp_path), plot=False)
    for round_index in range(2):  # a new ModelCheckpoint per fit works
        checkpoint = ModelCheckpoint(monitor="val_acc", mode="max", dirpath=tmp_path / f"round_{round_index}")
        pl.Trainer(max_epochs=1, callbacks=[acquisition, checkpoint], **(QUIET | {"enable_checkpointing": True})
                   ).fit(model, datamodule=datamodule)
        assert checkpoint.best_model_path
    with pytest.raises(MisconfigurationException, match=r"still ranks the checkpoints of an earlier round"):
        pl.Trainer(max_epochs=1, callbacks=[acquisition, checkpoint], **(QUIET | {"enable_checkpointing": True})
                   ).fit(model, datamodule=datamodule)
    assert datamodule.num_labeled == 16


class ScheduledClassifier(pl.LightningModule):
    """Automatic optimization with an LR scheduler: StepLR halving the rate every epoch, or ReduceLROnPlateau."""

    def __init__(self, scheduler: str) -> None:
        super().__init__()
        self.backbone = build_backbone("small_cnn", num_classes=4, in_channels=1)
        self.scheduler = scheduler

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if self.scheduler == "step":
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}


class LearningRates(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_weight_reset_restarts_lr_schedulers(tmp_path: Path) -> None:
    rates = LearningRates()
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, num_rounds=2, epochs_per_round=2,
                                      output_dir=str(tmp_path), plot=False)
    pl.seed_everything(0, verbose=False)
    pl.Trainer(callbacks=[acquisition, rates], reload_dataloaders_every_n_epochs=1, **QUIET).fit(
        ScheduledClassifier("step"), datamodule=tiny_datamodule())
    assert rates.rates == pytest.approx([0.1, 0.05] * 3)  # without the restart: 0.1 / 2**epoch


def test_a_plateau_scheduler_without_weight_reset_is_refused(tmp_path: Path) -> None:
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, num_rounds=2, epochs_per_round=2,
                                      reset_weights=False, output_dir=str(tmp_path / "run"))
    datamodule = tiny_datamodule()
    with pytest.raises(MisconfigurationException, match="ReduceLROnPlateau .* reset_weights=False nothing "
                                                        "restarts it"):
        pl.Trainer(callbacks=[acquisition], reload_dataloaders_every_n_epochs=1, **QUIET).fit(
            ScheduledClassifier("plateau"), datamodule=datamodule)
    assert datamodule.num_labeled == 8 and not (tmp_path / "run").exists()
    # With the reset (the default) it restarts with every round, and the run goes through.
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, num_rounds=2, epochs_per_round=2,
                                      output_dir=str(tmp_path / "ok"), plot=False)
    pl.Trainer(callbacks=[acquisition], reload_dataloaders_every_n_epochs=1, **QUIET).fit(
        ScheduledClassifier("plateau"), datamodule=tiny_datamodule())
    assert len(acquisition.history) == 3


def test_an_explicit_max_epochs_that_contradicts_rounds_inside_one_fit_is_refused(tmp_path: Path) -> None:
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, num_rounds=5, epochs_per_round=3)
    with pytest.raises(MisconfigurationException, match=r"max_epochs=3\) conflicts .* = 18 epochs"):
        pl.Trainer(max_epochs=3, callbacks=[acquisition], reload_dataloaders_every_n_epochs=1, **QUIET).fit(
            tiny_classifier(), datamodule=tiny_datamodule())


def test_the_weight_reset_restarts_the_gradient_scaler(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    from tests.test_readme import MyClassifier  # automatic optimization, as fp16 scaling needs

    class Scales(Callback):
        def __init__(self) -> None:
            self.scales: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.scales.append(trainer.precision_plugin.scaler.get_scale())

    # A scale that doubles after every step, so that a scaler carried across rounds would be visible.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
    scales = Scales()
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, num_rounds=2, epochs_per_round=2,
                                      output_dir=str(tmp_path), plot=False)
    pl.Trainer(plugins=[MixedPrecision("16-mixed", device="cpu", scaler=scaler)], callbacks=[acquisition, scales],
               reload_dataloaders_every_n_epochs=1, **QUIET).fit(MyClassifier(), datamodule=tiny_datamodule())
    assert scales.scales[0::2] == [16.0, 16.0, 16.0]  # every round starts from the initial scale
    assert all(scale > 16.0 for scale in scales.scales[1::2])
