"""The AcquisitionCallback end to end on small synthetic data: rounds, selection, records, reset, resume."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from saal_lightning import AcquisitionCallback, ActiveClassifier, ActiveDataModule
from saal_lightning.acquisition.strategies import SAAL, Entropy
from saal_lightning.reporting.round_log import ROUND_COLUMNS
from tests.synthetic_data import SyntheticImages


def _datamodule(num_items: int = 160, initial_labels: int = 8) -> ActiveDataModule:
    return ActiveDataModule(
        train_dataset=SyntheticImages(num_items, seed=0),
        test_dataset=SyntheticImages(64, seed=1),
        initial_labels=initial_labels,
        batch_size=8,
        eval_batch_size=32,
        seed=0,
    )


def _model() -> ActiveClassifier:
    return ActiveClassifier("small_cnn", num_classes=4, in_channels=1, optimizer="adam", lr=1e-2)


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        reload_dataloaders_every_n_epochs=1,
    )
    return pl.Trainer(callbacks=callbacks, **(defaults | kwargs))


class RecordingEntropy(Entropy):
    """Entropy that remembers what it was asked to score and what it returned, round by round."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.selections: list[torch.Tensor] = []
        self._round_inputs: list[torch.Tensor] = []

    def compute(self, model, inputs):
        self._round_inputs.append(inputs.detach().clone())
        return super().compute(model, inputs)

    def select(self, pool_outputs, query_size, generator, labeled_outputs=None):
        self.inputs.append(torch.cat(self._round_inputs))
        self._round_inputs = []
        self.outputs.append(pool_outputs.clone())
        positions = super().select(pool_outputs, query_size, generator, labeled_outputs)
        self.selections.append(positions.clone())
        return positions


class SplitRecorder(Callback):
    """Snapshots of the labeled set at every round start, and of the pools the callback sampled."""

    def __init__(self, datamodule: ActiveDataModule) -> None:
        self.labeled_at_epoch: list[torch.Tensor] = []
        self.pools: list[torch.Tensor] = []
        self.labelled_batches: list[torch.Tensor] = []
        sample_pool, label = datamodule.sample_pool, datamodule.label

        def recording_sample_pool(size, generator):
            pool = sample_pool(size, generator)
            self.pools.append(pool.clone())
            return pool

        def recording_label(indices, round=None):
            self.labelled_batches.append(torch.as_tensor(indices).clone())
            return label(indices, round=round)

        datamodule.sample_pool, datamodule.label = recording_sample_pool, recording_label

    def on_train_epoch_start(self, trainer, pl_module):
        self.labeled_at_epoch.append(trainer.datamodule.labeled_indices.clone())


def test_rounds_grow_the_labeled_set_by_query_size_with_the_top_k_of_the_pool(tmp_path: Path) -> None:
    datamodule = _datamodule()
    strategy = RecordingEntropy()
    acquisition = AcquisitionCallback(strategy, query_size=6, pool_size=40, num_rounds=3, epochs_per_round=2,
                                      output_dir=str(tmp_path), plot=False)
    recorder = SplitRecorder(datamodule)
    trainer = _trainer(tmp_path, [acquisition, recorder])
    trainer.fit(_model(), datamodule=datamodule)

    assert trainer.current_epoch == 8  # (3 + 1) rounds x 2 epochs: the callback set max_epochs
    sizes = [len(labeled) for labeled in recorder.labeled_at_epoch]
    assert sizes == [8, 8, 14, 14, 20, 20, 26, 26]  # the loader sees each round's labels from its first epoch
    assert datamodule.num_labeled == 8 + 3 * 6
    # Nothing lost, nothing labeled twice, every round's selection came from that round's pool.
    for before, after, pool, chosen in zip(recorder.labeled_at_epoch[1::2], recorder.labeled_at_epoch[2::2],
                                           recorder.pools, recorder.labelled_batches, strict=False):
        assert set(before.tolist()) <= set(after.tolist())
        assert set(after.tolist()) - set(before.tolist()) == set(chosen.tolist())
        assert set(chosen.tolist()) <= set(pool.tolist())
    for pool, chosen, inputs, outputs in zip(recorder.pools, recorder.labelled_batches, strategy.inputs,
                                             strategy.outputs, strict=True):
        assert len(pool) == 40 and len(chosen) == 6
        # The strategy scored exactly the pool's items, in pool order ...
        torch.testing.assert_close(inputs, datamodule.pool_dataset.images[pool])
        # ... and the labeled items are the 6 highest scores (independent check with a full sort).
        expected = pool[torch.argsort(outputs, descending=True, stable=True)[:6]]
        assert sorted(chosen.tolist()) == sorted(expected.tolist())
    labeled, unlabeled = set(datamodule.labeled_indices.tolist()), set(datamodule.unlabeled_indices.tolist())
    assert not labeled & unlabeled and labeled | unlabeled == set(range(160))


def test_rounds_csv_and_labeled_indices_json_record_every_round(tmp_path: Path) -> None:
    datamodule = _datamodule()
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, num_rounds=2, epochs_per_round=1,
                                      output_dir=str(tmp_path), plot=True)
    _trainer(tmp_path, [acquisition]).fit(_model(), datamodule=datamodule)

    with open(tmp_path / "rounds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == ROUND_COLUMNS
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert [int(r["num_labeled"]) for r in rows] == [8, 12, 16]
    accuracies = [float(r["test_acc"]) for r in rows]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert [float(r["best_test_acc"]) for r in rows] == pytest.approx(
        [max(accuracies[: i + 1]) for i in range(3)])
    assert all(float(r["acquisition_seconds"]) > 0 for r in rows[:2]) and rows[2]["acquisition_seconds"] == ""
    assert {r["strategy"] for r in rows} == {"entropy"}

    record = json.loads((tmp_path / "labeled_indices.json").read_text())
    assert record["labeled_indices"] == datamodule.labeled_indices.tolist()
    assert {k: len(v) for k, v in record["indices_by_round"].items()} == {"0": 8, "1": 4, "2": 4}
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_test_accuracy_is_measured_on_the_held_out_set(tmp_path: Path) -> None:
    datamodule = _datamodule()
    model = _model()
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=None, num_rounds=0, epochs_per_round=4,
                                      output_dir=str(tmp_path), plot=False)
    _trainer(tmp_path, [acquisition]).fit(model, datamodule=datamodule)
    model.eval()
    with torch.no_grad():
        test = datamodule.test_dataset
        expected = (model(test.images).argmax(1) == test.targets).float().mean().item()
    assert acquisition.history[0]["test_acc"] == pytest.approx(expected)


def test_weights_and_optimizer_are_reset_at_every_round_start(tmp_path: Path) -> None:
    class WeightsAtRoundStart(Callback):
        def __init__(self):
            self.snapshots, self.optimizer_state_sizes = [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self.snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})
            self.optimizer_state_sizes.append(len(trainer.optimizers[0].state))

    datamodule = _datamodule()
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=20, num_rounds=2, epochs_per_round=2,
                                      output_dir=str(tmp_path), plot=False)
    watcher = WeightsAtRoundStart()
    _trainer(tmp_path, [acquisition, watcher]).fit(_model(), datamodule=datamodule)
    initial = watcher.snapshots[0]
    for epoch, snapshot in enumerate(watcher.snapshots):
        same = all(torch.equal(snapshot[k], initial[k]) for k in initial)
        assert same == (epoch % 2 == 0), f"epoch {epoch}: weights {'' if same else 'not '}at their initial values"
    assert watcher.optimizer_state_sizes[::2] == [0, 0, 0]  # a fresh Adam (no moments) at every round start
    assert all(size > 0 for size in watcher.optimizer_state_sizes[1::2])


def test_warm_start_keeps_training_across_rounds(tmp_path: Path) -> None:
    datamodule = _datamodule()
    model = _model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=20, num_rounds=1, epochs_per_round=1,
                                      reset_weights=False, output_dir=str(tmp_path), plot=False)
    _trainer(tmp_path, [acquisition]).fit(model, datamodule=datamodule)
    assert acquisition.state_dict()["initial_model_state"] is None
    assert not torch.equal(model.state_dict()["backbone.head.weight"], initial["backbone.head.weight"])


def test_acquisition_leaves_the_training_rng_stream_alone(tmp_path: Path) -> None:
    class RngProbe(Callback):
        def __init__(self):
            self.states = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.states.append(torch.get_rng_state())

    before, after = RngProbe(), RngProbe()
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=20, num_rounds=1, epochs_per_round=1,
                                      output_dir=str(tmp_path), plot=False)
    # Callbacks run in list order: `before` sees the state just before the acquisition, `after` just after.
    _trainer(tmp_path, [before, acquisition, after]).fit(_model(), datamodule=_datamodule())
    assert all(torch.equal(b, a) for b, a in zip(before.states, after.states, strict=True))


def test_saal_strategy_selects_the_top_k_saal_scores(tmp_path: Path) -> None:
    from saal_lightning.acquisition import saal_scores

    class RecordingSAAL(SAAL):
        def compute(self, model, inputs):
            if not hasattr(self, "scoring_model"):
                self.scoring_model = copy.deepcopy(model)  # the model as it was when the pool was scored
            return super().compute(model, inputs)

        def select(self, pool_outputs, query_size, generator, labeled_outputs=None):
            self.last_outputs = pool_outputs.clone()
            self.last_positions = super().select(pool_outputs, query_size, generator, labeled_outputs)
            return self.last_positions

    datamodule = _datamodule()
    strategy = RecordingSAAL(rho=0.05, adaptive=True)
    acquisition = AcquisitionCallback(strategy, query_size=5, pool_size=24, num_rounds=1, epochs_per_round=1,
                                      output_dir=str(tmp_path), plot=False)
    recorder = SplitRecorder(datamodule)
    _trainer(tmp_path, [acquisition, recorder]).fit(_model(), datamodule=datamodule)
    pool = recorder.pools[0]
    expected = saal_scores(strategy.scoring_model, datamodule.pool_dataset.images[pool], rho=0.05, adaptive=True)
    torch.testing.assert_close(strategy.last_outputs, expected, rtol=1e-4, atol=1e-5)
    assert set(recorder.labelled_batches[0].tolist()) == set(pool[torch.topk(expected, 5).indices].tolist())


@pytest.mark.parametrize("save_on_train_epoch_end", [True, False], ids=["after-acquisition", "before-acquisition"])
def test_resume_from_a_round_checkpoint_reproduces_the_uninterrupted_run(
    tmp_path: Path, save_on_train_epoch_end: bool
) -> None:
    # Saving on validation end writes the round's last checkpoint *before* the acquisition ran; the resumed run
    # must then acquire first, and still label exactly what the uninterrupted run labels.
    def run(root: Path, ckpt_path: str | None = None, stop_after_epochs: int | None = None):
        pl.seed_everything(0)
        datamodule = _datamodule()
        datamodule.val_dataset = SyntheticImages(16, seed=2)
        acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, num_rounds=3,
                                          epochs_per_round=2, output_dir=str(root), plot=False)
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=2, save_top_k=-1,
                                      save_on_train_epoch_end=save_on_train_epoch_end)
        trainer = _trainer(root, [acquisition, checkpoints], enable_checkpointing=True)
        if stop_after_epochs is not None:

            class Stop(Callback):  # simulate a crash after that many epochs
                def on_train_epoch_end(self, trainer, pl_module):
                    if trainer.current_epoch + 1 == stop_after_epochs:
                        trainer.should_stop = True

            trainer.callbacks.append(Stop())
        trainer.fit(_model(), datamodule=datamodule, ckpt_path=ckpt_path)
        return datamodule, acquisition

    full_dm, full_cb = run(tmp_path / "full")
    run(tmp_path / "crashed", stop_after_epochs=4)
    checkpoint = sorted((tmp_path / "crashed" / "ckpt").glob("*.ckpt"))[-1]
    assert "epoch=3" in checkpoint.name
    state = torch.load(checkpoint, weights_only=True)  # tensors and primitives only
    callback_state = next(v for k, v in state["callbacks"].items() if k.startswith("AcquisitionCallback"))
    assert len(callback_state["history"]) == (2 if save_on_train_epoch_end else 1)
    assert int((state["ActiveDataModule"]["labeled_round"] >= 0).sum()) == (16 if save_on_train_epoch_end else 12)
    resumed_dm, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(checkpoint))
    assert torch.equal(resumed_dm.labeled_round, full_dm.labeled_round)
    assert [r["num_labeled"] for r in resumed_cb.history] == [8, 12, 16, 20]
    assert [r["test_acc"] for r in resumed_cb.history] == pytest.approx([r["test_acc"] for r in full_cb.history])


def test_misconfiguration_is_refused_with_a_fix(tmp_path: Path) -> None:
    acquisition = AcquisitionCallback("random", query_size=4, pool_size=20, num_rounds=1, epochs_per_round=1)
    trainer = _trainer(tmp_path, [acquisition], reload_dataloaders_every_n_epochs=0)
    with pytest.raises(MisconfigurationException, match="reload_dataloaders_every_n_epochs=1"):
        trainer.fit(_model(), datamodule=_datamodule())

    too_many = AcquisitionCallback("random", query_size=50, pool_size=60, num_rounds=4, epochs_per_round=1)
    with pytest.raises(ValueError, match="only 152 unlabeled items are left"):
        _trainer(tmp_path, [too_many]).fit(_model(), datamodule=_datamodule())

    plain_loader = torch.utils.data.DataLoader(SyntheticImages(16), batch_size=4)
    with pytest.raises(MisconfigurationException, match="ActiveDataModule"):
        _trainer(tmp_path, [AcquisitionCallback("random", num_rounds=1, epochs_per_round=1)]).fit(
            _model(), train_dataloaders=plain_loader)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query_size": 0}, "query_size"),
        ({"epochs_per_round": 0}, "epochs_per_round"),
        ({"num_rounds": -1}, "num_rounds"),
        ({"query_size": 10, "pool_size": 5}, "pool_size"),
        ({"strategy": "no_such_strategy"}, "Unknown acquisition strategy"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AcquisitionCallback(**kwargs)


def test_the_rich_bar_ends_showing_the_last_rounds_test_accuracy(tmp_path: Path) -> None:
    import io
    import re

    from lightning.pytorch.callbacks import RichProgressBar

    screen = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 300})
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, num_rounds=2, epochs_per_round=1,
                                      output_dir=str(tmp_path), plot=False)
    # The bar first, as in the CLI (trainer.callbacks from the config, then the acquisition callback): its epoch-end
    # refresh then runs before the round's test accuracy is logged.
    _trainer(tmp_path, [bar, acquisition], enable_progress_bar=True).fit(_model(), datamodule=_datamodule())
    shown = re.findall(r"al/test_acc: ([0-9.]+)", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()))
    accuracies = [row["test_acc"] for row in acquisition.history]
    assert accuracies[-1] != accuracies[-2]  # otherwise a one-round lag could not be seen
    assert float(shown[-1]) == pytest.approx(accuracies[-1], abs=1e-3)
