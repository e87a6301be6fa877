"""What must never end in exit 0 with a wrong experiment: diverged training, uninformative scores, a resume that
is another experiment, a checkpoint without the callback's state; plus the small print (seeds, warnings, modes)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from saal_lightning import AcquisitionCallback, ActiveClassifier, ActiveDataModule
from saal_lightning.acquisition.strategies import Entropy
from saal_lightning.callbacks.resume_checks import ResumeMismatchError
from saal_lightning.callbacks.training_health import TrainingDivergedError
from tests.callbacks.tiny_experiment import QUIET, tiny_classifier, tiny_datamodule
from tests.synthetic_data import SyntheticImages


class NaNLossAfter(ActiveClassifier):
    """Training whose loss turns NaN from a given global step on (as a diverging run's does)."""

    def __init__(self, from_step: int) -> None:
        super().__init__("small_cnn", num_classes=4, in_channels=1, optimizer="adam", lr=1e-2)
        self.from_step = from_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step > self.from_step else loss  # counted after the step


@pytest.mark.parametrize("epochs_per_round", [None, 3], ids=["per-fit", "in-fit"])
def test_a_non_finite_training_loss_stops_the_run_naming_round_and_epoch(tmp_path: Path, epochs_per_round) -> None:
    datamodule = tiny_datamodule()
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, num_rounds=3,
                                      epochs_per_round=epochs_per_round, output_dir=str(tmp_path), plot=False)
    trainer_args = dict(max_epochs=3) if epochs_per_round is None else dict(reload_dataloaders_every_n_epochs=1)
    pl.seed_everything(0, verbose=False)
    model = NaNLossAfter(from_step=2)  # one batch per epoch (8 labels, batch 8): NaN from epoch 2 of round 0 on
    with pytest.raises(TrainingDivergedError, match=r"Training diverged in round 0, epoch 2: the training loss "
                                                    r"was NaN or infinite in 1 batch"):
        pl.Trainer(callbacks=[acquisition], enable_checkpointing=False, **trainer_args, **QUIET).fit(
            model, datamodule=datamodule)
    assert datamodule.num_labeled == 8 and acquisition.history == []


def test_non_finite_parameters_stop_the_round_before_acquiring(tmp_path: Path) -> None:
    class BreakWeights(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.backbone.head.weight[0, 0] = float("inf")

    datamodule = tiny_datamodule()
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, output_dir=str(tmp_path), plot=False)
    with pytest.raises(TrainingDivergedError, match=r"round 0: the model's backbone.head.weight hold NaN"):
        pl.Trainer(max_epochs=1, callbacks=[BreakWeights(), acquisition], enable_checkpointing=False,
                   **QUIET).fit(tiny_classifier(), datamodule=datamodule)
    assert datamodule.num_labeled == 8 and not (tmp_path / "rounds.csv").exists()


class ConstantScores(Entropy):
    """A strategy whose every score is the same value (what a collapsed model gives), or NaN/inf at some items."""

    def __init__(self, value: float = 0.0, broken_items: int = 0) -> None:
        self.value, self.broken_items = value, broken_items
        self.pools: list[int] = []

    def compute(self, model, inputs):
        scores = torch.full((len(inputs),), self.value)
        scores[: self.broken_items] = float("nan")
        return scores


def test_non_finite_scores_are_refused_at_acquisition(tmp_path: Path) -> None:
    datamodule = tiny_datamodule()
    acquisition = AcquisitionCallback(ConstantScores(broken_items=3), query_size=4, pool_size=30,
                                      output_dir=str(tmp_path), plot=False)
    with pytest.raises(TrainingDivergedError, match="Round 0: 3 of 30 entropy scores are not finite"):
        pl.Trainer(max_epochs=1, callbacks=[acquisition], enable_checkpointing=False, **QUIET).fit(
            tiny_classifier(), datamodule=datamodule)
    assert datamodule.num_labeled == 8


def test_equal_scores_warn_and_break_ties_at_random_not_by_pool_position(tmp_path: Path) -> None:
    class PoolRecorder(Callback):
        def setup(self, trainer, pl_module, stage):
            sample_pool = trainer.datamodule.sample_pool
            self.pools = []

            def recording(size, generator):
                self.pools.append(sample_pool(size, generator))
                return self.pools[-1]

            trainer.datamodule.sample_pool = recording

    datamodule, recorder = tiny_datamodule(), PoolRecorder()
    acquisition = AcquisitionCallback(ConstantScores(value=-0.0), query_size=4, pool_size=30,
                                      output_dir=str(tmp_path), plot=False)
    with pytest.warns(UserWarning, match=r"Round 0: all 30 entropy scores are equal \(-0.0\), so they carry no "
                                         "information"):
        pl.Trainer(max_epochs=1, callbacks=[recorder, acquisition], enable_checkpointing=False, **QUIET).fit(
            tiny_classifier(), datamodule=datamodule)
    chosen = torch.nonzero(datamodule.labeled_round == 1).flatten().tolist()
    pool = recorder.pools[0]
    assert chosen != pool[:4].tolist()  # the old behaviour: the 4 lowest pool positions
    # The draw is the callback generator's: the same seed picks the same items again.
    again, recorder_again = tiny_datamodule(), PoolRecorder()
    with pytest.warns(UserWarning):
        pl.Trainer(max_epochs=1, callbacks=[recorder_again, AcquisitionCallback(
            ConstantScores(value=-0.0), query_size=4, pool_size=30, output_dir=str(tmp_path / "again"),
            plot=False)], enable_checkpointing=False, **QUIET).fit(tiny_classifier(), datamodule=again)
    assert torch.equal(again.labeled_round, datamodule.labeled_round)


def test_a_pool_larger_than_the_unlabeled_set_says_once_that_it_scores_all(tmp_path: Path) -> None:
    datamodule = tiny_datamodule(train_dataset=SyntheticImages(24, seed=0))
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=15, num_rounds=3, epochs_per_round=1,
                                      output_dir=str(tmp_path), plot=False)
    with pytest.warns(UserWarning, match="pool_size=15 is larger than the 12 unlabeled items left") as caught:
        pl.Trainer(callbacks=[acquisition], reload_dataloaders_every_n_epochs=1, enable_checkpointing=False,
                   **QUIET).fit(tiny_classifier(), datamodule=datamodule)
    assert sum("pool_size=15" in str(w.message) for w in caught) == 1
    assert [row["pool_size"] for row in acquisition.history] == [15, 12, 8, 0]


def test_records_get_the_permissions_of_the_runs_other_files(tmp_path: Path) -> None:
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=30, num_rounds=1, epochs_per_round=1,
                                      output_dir=str(tmp_path))
    pl.Trainer(callbacks=[acquisition], reload_dataloaders_every_n_epochs=1, enable_checkpointing=False,
               **QUIET).fit(tiny_classifier(), datamodule=tiny_datamodule())
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    for name in ("rounds.csv", "labeled_indices.json", "learning_curve.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_the_callback_seed_follows_seed_everything_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    assert AcquisitionCallback("random").seed == 5 and AcquisitionCallback("random", seed=2).seed == 2
    with pytest.raises(ValueError, match="seed must be an integer or None"):
        AcquisitionCallback("random", seed=2.5)


def test_an_empty_labeled_set_is_refused_before_training(tmp_path: Path) -> None:
    datamodule = tiny_datamodule()
    datamodule.setup("fit")
    datamodule.labeled_round[:] = -1
    with pytest.raises(ValueError, match="no labeled items, so there is nothing to train round 0 on"):
        pl.Trainer(max_epochs=1, callbacks=[AcquisitionCallback("random", pool_size=30)], enable_checkpointing=False,
                   **QUIET).fit(tiny_classifier(), datamodule=datamodule)


# ---------------------------------------------------------------------------------------------- resume checks


class OtherDataModule(ActiveDataModule):
    """The same data under another data-module class: Lightning would silently skip the checkpoint's split."""


def _crashed_run(root: Path) -> Path:
    """A 3-round run stopped after its first round; returns the round checkpoint."""

    class Stop(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, num_rounds=3, epochs_per_round=2,
                                      output_dir=str(root), plot=False)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=-1, save_on_train_epoch_end=True)
    pl.Trainer(callbacks=[acquisition, checkpoints, Stop()], reload_dataloaders_every_n_epochs=1, **QUIET).fit(
        tiny_classifier(), datamodule=tiny_datamodule())
    return root / "ckpt" / "last.ckpt"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    ("changes", "expected_lines"),
    [
        (dict(strategy="margin", query_size=5), ["strategy: 'Entropy()' in the checkpoint, 'Margin()' in this run",
                                                 "query_size: 4 in the checkpoint, 5 in this run"]),
        (dict(pool_size=40, seed=3), ["pool_size: 30 in the checkpoint, 40 in this run",
                                      "acquisition seed: 0 in the checkpoint, 3 in this run"]),
        (dict(data_seed=1), ["data seed: 0 in the checkpoint, 1 in this run"]),
        # The data module itself refuses a split of another length, before the callback compares options.
        (dict(train_items=200), ["The checkpoint's split covers 160 items but the training set has 200"]),
        (dict(other_targets=True), ["training targets (sha256): '"]),
        (dict(data_class=True), ["data module: 'ActiveDataModule' in the checkpoint, 'OtherDataModule' in this run"]),
    ],
    ids=["strategy+query", "pool+seed", "data-seed", "data-length", "data-targets", "data-class"],
)
def test_a_resume_with_changed_options_is_refused_naming_each(tmp_path: Path, changes: dict, expected_lines) -> None:
    checkpoint = _crashed_run(tmp_path / "run")
    before = _snapshot(tmp_path / "run")
    train = SyntheticImages(changes.get("train_items", 160), seed=0)
    if changes.get("other_targets"):
        train.targets = train.targets.flip(0)
    module = OtherDataModule if changes.get("data_class") else ActiveDataModule
    datamodule = module(train_dataset=train, test_dataset=SyntheticImages(64, seed=1), initial_labels=8,
                        batch_size=8, eval_batch_size=32, seed=changes.get("data_seed", 0))
    options = dict(strategy="entropy", query_size=4, pool_size=30, seed=0)
    options.update({k: v for k, v in changes.items() if k in options})
    acquisition = AcquisitionCallback(**options, num_rounds=3, epochs_per_round=2, output_dir=str(tmp_path / "run"),
                                      plot=False)
    trainer = pl.Trainer(callbacks=[acquisition], reload_dataloaders_every_n_epochs=1, enable_checkpointing=False,
                         **QUIET)
    with pytest.raises((ResumeMismatchError, ValueError)) as refusal:
        trainer.fit(tiny_classifier(), datamodule=datamodule, ckpt_path=str(checkpoint))
    message = str(refusal.value)
    for line in expected_lines:
        assert line in message, message
    if not changes.get("train_items"):
        assert message.startswith(f"Refusing to resume from {checkpoint}") and "Nothing was changed" in message
    assert trainer.current_epoch == 0 and acquisition.history == []
    assert _snapshot(tmp_path / "run") == before  # records and checkpoints untouched


def test_a_checkpoint_without_the_callbacks_state_is_refused(tmp_path: Path) -> None:
    model = tiny_classifier()
    plain = pl.Trainer(max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], **QUIET)
    plain.fit(model, datamodule=tiny_datamodule())
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, num_rounds=2, epochs_per_round=1,
                                      output_dir=str(tmp_path / "run"))
    with pytest.raises(ResumeMismatchError, match=r"holds no AcquisitionCallback state of this version \(callback "
                                                  r"states found: \[\"ModelCheckpoint"):
        pl.Trainer(callbacks=[acquisition], reload_dataloaders_every_n_epochs=1, enable_checkpointing=False,
                   **QUIET).fit(tiny_classifier(), datamodule=tiny_datamodule(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert not (tmp_path / "run").exists()


def test_the_same_options_resume_and_reconcile_records_that_ran_ahead(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    checkpoint = _crashed_run(tmp_path / "run")
    # A crash after the next round's records but before its checkpoint leaves the files one round ahead.
    rounds_csv = tmp_path / "run" / "rounds.csv"
    rounds_csv.write_text(rounds_csv.read_text() + rounds_csv.read_text().splitlines()[-1].replace("0,", "1,", 1)
                          + "\n")
    datamodule = tiny_datamodule()
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, num_rounds=3, epochs_per_round=2,
                                      output_dir=str(tmp_path / "run"), plot=False)
    with caplog.at_level("WARNING"):
        pl.Trainer(callbacks=[acquisition], reload_dataloaders_every_n_epochs=1, enable_checkpointing=False,
                   **QUIET).fit(tiny_classifier(), datamodule=datamodule, ckpt_path=str(checkpoint))
    assert "(rounds 0-1, 12 labeled) do not match the checkpoint being resumed (rounds 0-0, 12 labeled): the " \
           "checkpoint wins" in caplog.text
    assert [int(line.split(",")[0]) for line in rounds_csv.read_text().splitlines()[1:]] == [0, 1, 2, 3]
    assert datamodule.num_labeled == 20
