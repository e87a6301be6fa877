"""SharpnessDiagnostics in both round schedules of the AcquisitionCallback, its files, logger and resumes."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from saal_lightning import AcquisitionCallback
from saal_lightning.acquisition.strategies.saal import SAAL
from saal_lightning.callbacks.sharpness_diagnostics import (
    DIAGNOSTIC_COLUMNS,
    ITEM_COLUMNS,
    SharpnessDiagnostics,
    round_diagnostics,
)
from tests.callbacks.tiny_experiment import QUIET, tiny_classifier, tiny_datamodule

NO_CHECKPOINTS = QUIET | {"enable_checkpointing": False}


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _diagnostics(**kwargs) -> SharpnessDiagnostics:
    return SharpnessDiagnostics(**({"sample_size": 40, "hessian_iterations": 5} | kwargs))


def _acquisition(root: Path, **kwargs) -> AcquisitionCallback:
    options = dict(strategy=SAAL(rho=0.05, adaptive=True), query_size=4, pool_size=30, num_rounds=2,
                   output_dir=str(root), plot=False)
    return AcquisitionCallback(**(options | kwargs))


def _check_run(root: Path, rounds: int, query_size: int = 4) -> list[dict[str, str]]:
    """One sane row per round, matching rounds.csv; the acquired items are those labeled_indices.json lists."""
    rows = _read(root / "diagnostics.csv")
    assert list(rows[0]) == list(DIAGNOSTIC_COLUMNS)
    assert [int(r["round"]) for r in rows] == list(range(rounds + 1))
    assert [r["num_labeled"] for r in rows] == [r["num_labeled"] for r in _read(root / "rounds.csv")]
    for row in rows:
        labeled, unlabeled = float(row["labeled_perturbed_loss"]), float(row["unlabeled_perturbed_loss"])
        n_l, n_u = int(row["num_labeled"]), int(row["num_unlabeled"])
        assert n_l + n_u == 160 and int(row["labeled_sample"]) == min(n_l, 40) and int(row["unlabeled_sample"]) == 40
        union = float(row["union_perturbed_loss"])
        assert min(labeled, unlabeled) <= union <= max(labeled, unlabeled)
        assert union == pytest.approx((n_l * labeled + n_u * unlabeled) / (n_l + n_u))
        assert 0.0 <= float(row["prediction_kept_fraction"]) <= 1.0
        assert float(row["mean_margin"]) >= 0 and float(row["relative_margin"]) >= 0
    for row in rows[:-1]:
        assert int(row["num_acquired"]) == query_size
        assert float(row["acquired_loss"]) > 0 and float(row["acquired_gradient_term"]) > 0
        top_eigenvalue = float(row["acquired_top_eigenvalue"])
        assert top_eigenvalue > 0  # the Gauss-Newton part of a cross-entropy Hessian is positive semi-definite
        assert float(row["acquired_curvature_term"]) == pytest.approx(0.5 * 0.05**2 * top_eigenvalue)
        for term in ("loss", "gradient_term", "curvature_term", "bound"):
            assert -1.0 <= float(row[f"spearman_{term}"]) <= 1.0
    assert rows[-1]["num_acquired"] == "0" and rows[-1]["acquired_loss"] == ""  # the last round acquires nothing
    items = _read(root / "diagnostics_items.csv")
    assert list(items[0]) == list(ITEM_COLUMNS)
    by_round = json.loads((root / "labeled_indices.json").read_text())["indices_by_round"]
    for r in range(rounds):
        assert sorted(int(i["index"]) for i in items if int(i["round"]) == r) == by_round[str(r + 1)]
    return rows


def test_rounds_inside_one_fit_write_one_row_per_round_and_log_them(tmp_path: Path) -> None:
    acquisition = _acquisition(tmp_path, epochs_per_round=2)
    diagnostics = _diagnostics()
    logger = CSVLogger(tmp_path / "logs", name="", version=0)
    # Listed before the acquisition callback: it moves itself behind it.
    trainer = pl.Trainer(callbacks=[diagnostics, acquisition], reload_dataloaders_every_n_epochs=1,
                         **(NO_CHECKPOINTS | {"logger": logger}))
    trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert trainer.callbacks.index(diagnostics) == trainer.callbacks.index(acquisition) + 1
    rows = _check_run(tmp_path, rounds=2)
    assert len(diagnostics.rows) == 3 and diagnostics.csv_path == tmp_path / "diagnostics.csv"
    logged = [r for r in _read(tmp_path / "logs" / "version_0" / "metrics.csv")
              if r.get("diagnostics/union_perturbed_loss")]
    assert [float(r["diagnostics/union_perturbed_loss"]) for r in logged] == pytest.approx(
        [float(r["union_perturbed_loss"]) for r in rows])


def test_one_round_per_fit_writes_one_row_per_fit_into_the_acquisition_folder(tmp_path: Path) -> None:
    acquisition, diagnostics = _acquisition(tmp_path / "run"), _diagnostics()
    datamodule, model = tiny_datamodule(), tiny_classifier()
    for _ in range(3):  # a new Trainer per round, each with its own (unused) root folder
        pl.Trainer(max_epochs=2, callbacks=[acquisition, diagnostics], default_root_dir=tmp_path / "elsewhere",
                   **NO_CHECKPOINTS).fit(model, datamodule=datamodule)
    _check_run(tmp_path / "run", rounds=2)
    assert not (tmp_path / "elsewhere").exists()


def test_the_diagnostics_change_nothing_the_run_does(tmp_path: Path) -> None:
    def run(root: Path, with_diagnostics: bool):
        datamodule = tiny_datamodule()
        acquisition = _acquisition(root, epochs_per_round=2)
        callbacks = [acquisition, _diagnostics()] if with_diagnostics else [acquisition]
        pl.Trainer(callbacks=callbacks, reload_dataloaders_every_n_epochs=1, **NO_CHECKPOINTS).fit(
            tiny_classifier(), datamodule=datamodule)
        return datamodule.labeled_round, [r["test_acc"] for r in acquisition.history]

    plain, diagnosed = run(tmp_path / "a", False), run(tmp_path / "b", True)
    assert torch.equal(plain[0], diagnosed[0]) and plain[1] == diagnosed[1]


@pytest.mark.parametrize("save_on_train_epoch_end", [True, False], ids=["after-the-round", "before-the-round"])
def test_a_resumed_run_has_each_round_once_with_the_uninterrupted_values(tmp_path: Path, save_on_train_epoch_end: bool,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    # Saving on validation end writes a round's last checkpoint before the acquisition and the diagnostics ran:
    # the resumed run then acquires at its start, and the diagnostics follow there (on_train_start).
    def run(root: Path, ckpt_path: str | None = None, stop_after_epochs: int | None = None) -> SharpnessDiagnostics:
        datamodule = tiny_datamodule()
        datamodule.val_dataset = tiny_datamodule().train_dataset
        diagnostics = _diagnostics()
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1,
                                      save_on_train_epoch_end=save_on_train_epoch_end)
        callbacks: list[Callback] = [_acquisition(root, epochs_per_round=2), diagnostics, checkpoints]
        if stop_after_epochs is not None:

            class Stop(Callback):  # a crash after that many epochs
                def on_train_epoch_end(self, trainer, pl_module):
                    if trainer.current_epoch + 1 == stop_after_epochs:
                        trainer.should_stop = True

            callbacks.append(Stop())
        pl.Trainer(callbacks=callbacks, reload_dataloaders_every_n_epochs=1, limit_val_batches=1,
                   **QUIET).fit(tiny_classifier(), datamodule=datamodule, ckpt_path=ckpt_path)
        return diagnostics

    full = run(tmp_path / "full")
    run(tmp_path / "run", stop_after_epochs=5)  # rows of rounds 0, 1 written; round 2 not reached
    assert [int(r["round"]) for r in _read(tmp_path / "run" / "diagnostics.csv")] == [0, 1]
    # Resume from the end of round 0 (epoch 1): the file holds round 1 too, which the resumed run recomputes.
    checkpoint = next((tmp_path / "run" / "ckpt").glob("epoch=1-*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)  # tensors and primitives only
    assert [r["round"] for r in state["callbacks"]["SharpnessDiagnostics"]["rows"]] == (
        [0] if save_on_train_epoch_end else [])
    with caplog.at_level(logging.WARNING, logger="saal_lightning.callbacks.sharpness_diagnostics"):
        resumed = run(tmp_path / "run", ckpt_path=str(checkpoint))
    assert "holds rounds ['0', '1'], this run's state has " in caplog.text  # the file follows the checkpoint
    rows = _check_run(tmp_path / "run", rounds=2)
    expected = _read(tmp_path / "full" / "diagnostics.csv")
    for got, want in zip(rows, expected, strict=True):
        for column in DIAGNOSTIC_COLUMNS:
            if column == "adaptive" or want[column] in ("", "nan"):
                assert got[column] == want[column], column
            elif column != "seconds":
                assert float(got[column]) == pytest.approx(float(want[column]), rel=1e-4, abs=1e-6), column
    assert [r["round"] for r in resumed.rows] == [r["round"] for r in full.rows] == [0, 1, 2]
    assert len(_read(tmp_path / "run" / "diagnostics_items.csv")) == 8


def test_without_true_labels_the_columns_that_need_them_stay_empty() -> None:
    torch.manual_seed(0)
    model = tiny_classifier()
    x = torch.randn(12, 1, 8, 8)
    labels = torch.arange(12) % 4
    row, items = round_diagnostics(model, (x[:6], labels[:6]), (x[6:], None), x[:3], num_labeled=6,
                                   num_unlabeled=100, hessian_iterations=3)
    for column in ("unlabeled_perturbed_loss", "union_perturbed_loss", "relative_margin"):
        assert row[column] == ""
    assert 0.0 <= row["prediction_kept_fraction"] <= 1.0 and row["mean_margin"] >= 0
    assert row["labeled_perturbed_loss"] > 0 and row["num_acquired"] == 3 and len(items) == 3
    with_labels, _ = round_diagnostics(model, (x[:6], labels[:6]), (x[6:], labels[6:]), None, num_labeled=6,
                                       num_unlabeled=100)
    assert with_labels["unlabeled_perturbed_loss"] > 0 and with_labels["num_acquired"] == 0
    assert with_labels["prediction_kept_fraction"] == row["prediction_kept_fraction"]


def test_misconfiguration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="exactly one AcquisitionCallback"):
        pl.Trainer(max_epochs=1, callbacks=[_diagnostics()], **NO_CHECKPOINTS).fit(
            tiny_classifier(), datamodule=tiny_datamodule())
    for options, message in (({"sample_size": 0}, "sample_size must be an integer >= 1 or None"),
                             ({"hessian_iterations": 1.5}, "hessian_iterations must be an integer >= 1"),
                             ({"rho": 0.0}, "rho must be positive"),
                             ({"adaptive": "yes"}, "adaptive must be True or False"),
                             ({"hessian_tolerance": -1}, "hessian_tolerance must be a number >= 0")):
        with pytest.raises(ValueError, match=message):
            SharpnessDiagnostics(**options)
