"""The callbacks that train LL4AL's and VAAL's networks, in real fits: added by the AcquisitionCallback, restored
exactly on resume (and a checkpoint without their state refused), identical on every DDP rank."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from saal_lightning import AcquisitionCallback, ActiveClassifier
from saal_lightning.acquisition.strategies import LL4AL, VAAL, AcquisitionStrategy
from saal_lightning.callbacks import LossPredictionTraining, VAALTraining
from saal_lightning.callbacks.resume_checks import ResumeMismatchError
from saal_lightning.cli import main
from saal_lightning.data import vision_datasets
from tests.callbacks.tiny_experiment import QUIET, tiny_classifier, tiny_datamodule
from tests.synthetic_data import write_fashion

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

STRATEGIES = {
    "ll4al": lambda: LL4AL(feature_layers=["features.2", "features.6"], hidden_dim=8),
    "vaal": lambda: VAAL(latent_dim=4, width=4, discriminator_hidden=8, steps=5, batch_size=8, num_unlabeled=40),
}


def trainer(root: Path, callbacks: list[Callback], **kwargs) -> pl.Trainer:
    return pl.Trainer(callbacks=callbacks, default_root_dir=root, reload_dataloaders_every_n_epochs=1,
                      **(QUIET | {"enable_checkpointing": False} | kwargs))


def assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if isinstance(value, dict):
            assert_same_state(value, theirs[key])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, theirs[key]), key
        else:
            assert value == theirs[key], key


def test_a_strategy_given_by_name_brings_its_training_callback(tmp_path: Path) -> None:
    acquisition = AcquisitionCallback("ll4al", query_size=4, pool_size=20, num_rounds=1, epochs_per_round=1,
                                      output_dir=str(tmp_path), plot=False)
    fit = trainer(tmp_path, [acquisition])
    pl.seed_everything(0, verbose=False)
    fit.fit(ActiveClassifier("resnet18", num_classes=4, in_channels=1), datamodule=tiny_datamodule())
    training = acquisition.strategy.training_callback()
    assert isinstance(training, LossPredictionTraining)
    assert fit.callbacks[fit.callbacks.index(acquisition) + 1] is training  # added once, just after it
    assert sum(isinstance(callback, LossPredictionTraining) for callback in fit.callbacks) == 1
    assert [branch.in_features for branch in training.predictor.branches] == [64, 128, 256, 512]
    assert [row["num_acquired"] for row in acquisition.history] == [4, 0]


def test_the_command_line_runs_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Through LightningCLI, whose forced AcquisitionCallback adds the strategy's training callback (a name such as
    # `--acquisition.strategy vaal` builds the same strategy with its defaults, which train for longer).
    debian = tmp_path / "debian-fashion-mnist"
    write_fashion(debian, compressed=True, train_count=60, test_count=20)
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", debian)
    main(["fit", "--config", str(QUICKSTART), "--data.init_args.root", str(tmp_path / "data"),
          "--data.init_args.batch_size", "8", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
          "--acquisition.strategy", "saal_lightning.acquisition.strategies.VAAL",
          "--acquisition.strategy.init_args.steps", "3", "--acquisition.strategy.init_args.width", "4",
          "--acquisition.num_rounds", "1", "--acquisition.epochs_per_round", "1", "--acquisition.query_size", "5",
          "--acquisition.pool_size", "15"])
    run_dir = next((tmp_path / "runs" / "quickstart").glob("version_*"))
    assert (run_dir / "rounds.csv").read_text().count(",vaal,") == 2
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["VAALTraining"]
    assert state["rounds_trained"] == 1 and state["input_shape"] == [1, 28, 28]


def test_another_instance_of_the_training_callback_is_refused(tmp_path: Path) -> None:
    acquisition = AcquisitionCallback(STRATEGIES["vaal"](), query_size=4, pool_size=20, num_rounds=1,
                                      epochs_per_round=1, output_dir=str(tmp_path), plot=False)
    with pytest.raises(MisconfigurationException, match="holds a VAALTraining of its own"):
        trainer(tmp_path, [acquisition, VAALTraining()]).fit(tiny_classifier(), datamodule=tiny_datamodule())


def test_the_loss_predictor_restarts_with_the_classifier_at_every_round(tmp_path: Path) -> None:
    class AtEpochStart(Callback):
        def __init__(self, training: LossPredictionTraining) -> None:
            self.training, self.fresh = training, []

        def on_train_epoch_start(self, trainer, pl_module):  # after the training callback's own hook
            self.fresh.append(self.training.predictor is None)

    strategy = STRATEGIES["ll4al"]()
    acquisition = AcquisitionCallback(strategy, query_size=4, pool_size=20, num_rounds=2, epochs_per_round=2,
                                      output_dir=str(tmp_path), plot=False)
    probe = AtEpochStart(strategy.training_callback())
    trainer(tmp_path, [acquisition, probe]).fit(tiny_classifier(), datamodule=tiny_datamodule())
    # Built again at the first batch of every round (from the same seeded initialisation), trained on in a round.
    assert probe.fresh == [True, False] * 3


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_resume_mid_round_restores_the_networks_exactly(tmp_path: Path, name: str) -> None:
    def run(root: Path, ckpt_path: str | None = None, stop_after_epochs: int | None = None):
        strategy: AcquisitionStrategy = STRATEGIES[name]()
        acquisition = AcquisitionCallback(strategy, query_size=4, pool_size=30, num_rounds=2, epochs_per_round=2,
                                          output_dir=str(root), plot=False)
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1,
                                      save_on_train_epoch_end=True)
        callbacks: list[Callback] = [acquisition, checkpoints]
        if stop_after_epochs is not None:

            class Stop(Callback):  # simulate a crash after that many epochs
                def on_train_epoch_end(self, trainer, pl_module):
                    if trainer.current_epoch + 1 == stop_after_epochs:
                        trainer.should_stop = True

            callbacks.append(Stop())
        datamodule = tiny_datamodule()
        trainer(root, callbacks, enable_checkpointing=True).fit(tiny_classifier(), datamodule=datamodule,
                                                                 ckpt_path=ckpt_path)
        training = strategy.training_callback()
        assert training is not None
        return datamodule, acquisition, training

    full_dm, full_acquisition, full_training = run(tmp_path / "full")
    run(tmp_path / "crashed", stop_after_epochs=3)
    (checkpoint,) = (tmp_path / "crashed" / "ckpt").glob("epoch=2-*.ckpt")  # round 1's first epoch
    resumed_dm, resumed_acquisition, resumed_training = run(tmp_path / "resumed", ckpt_path=str(checkpoint))
    assert torch.equal(resumed_dm.labeled_round, full_dm.labeled_round)
    assert [row["test_acc"] for row in resumed_acquisition.history] == [
        row["test_acc"] for row in full_acquisition.history
    ]
    assert_same_state(resumed_training.state_dict(), full_training.state_dict())
    # What the networks were at the end of round 1, written into both runs' checkpoints after its acquisition.
    round_1_end = [torch.load(next((tmp_path / run_name / "ckpt").glob("epoch=3-*.ckpt")), weights_only=True)
                   for run_name in ("full", "resumed")]
    assert_same_state(*(state["callbacks"][full_training.state_key] for state in round_1_end))

    # A checkpoint without the networks' state cannot be resumed exactly: refused, not trained afresh.
    state = torch.load(checkpoint, weights_only=True)
    del state["callbacks"][full_training.state_key]
    torch.save(state, tmp_path / "without.ckpt")
    with pytest.raises(ResumeMismatchError, match=f"holds no {full_training.state_key} state"):
        run(tmp_path / "refused", ckpt_path=str(tmp_path / "without.ckpt"))


class SaveTrainingState(Callback):
    """Every rank writes its strategy's training-callback state and its labeled set at the end of the fit."""

    def __init__(self, out_dir: str, strategy: AcquisitionStrategy) -> None:
        self.out_dir, self.strategy = out_dir, strategy

    def on_train_end(self, trainer, pl_module):
        training = self.strategy.training_callback()
        assert training is not None and training in trainer.callbacks  # added in the spawned process too
        torch.save({"training": training.state_dict(), "labeled": trainer.datamodule.labeled_indices},
                   Path(self.out_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo on CPU")
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_rank_trains_the_same_networks_under_ddp(tmp_path: Path, name: str) -> None:
    strategy = STRATEGIES[name]()
    acquisition = AcquisitionCallback(strategy, query_size=4, pool_size=30, num_rounds=1, epochs_per_round=2,
                                      output_dir=str(tmp_path), plot=False)
    fit = trainer(tmp_path, [acquisition, SaveTrainingState(str(tmp_path), strategy)], strategy="ddp_spawn",
                  devices=2)
    fit.fit(ActiveClassifier("small_cnn", num_classes=4, in_channels=1), datamodule=tiny_datamodule())
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert torch.equal(ranks[0]["labeled"], ranks[1]["labeled"]) and len(ranks[0]["labeled"]) == 12
    assert "predictor" in ranks[0]["training"] or "vae" in ranks[0]["training"]
    assert_same_state(ranks[0]["training"], ranks[1]["training"])
