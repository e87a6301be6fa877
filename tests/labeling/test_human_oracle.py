"""People as the oracle, end to end: a folder of unlabeled images, queries answered in CSV files or Label Studio
exports, validated imports, the label ledger, a start from zero labels, a loop of fits, and two DDP ranks."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from saal_lightning import AcquisitionCallback, ActiveClassifier, ActiveDataModule
from saal_lightning.cli import main
from saal_lightning.data.image_folder import find_images
from saal_lightning.labeling.query_files import LabelImportError, read_answers, read_ledger
from tests.synthetic_data import SyntheticImages, write_fashion

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import make_image_folder  # noqa: E402  (scripts/make_image_folder.py, the worked example's data)

CONFIG = str(REPO / "configs" / "image_folder.yaml")
QUERY = 5


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The worked example's folder (120 unlabeled PNGs, 30 labeled test PNGs) made from a fake Fashion-MNIST."""
    source = tmp_path / "idx"
    write_fashion(source, compressed=True, train_count=200, test_count=60)
    make_image_folder.make_image_folder(tmp_path / "fashion_folder", train=120, test=30, source=source)
    return tmp_path / "fashion_folder"


def answers(example: Path) -> dict[str, str]:
    with open(example / "answers.csv", newline="") as handle:
        return {row["path"]: row["label"] for row in csv.DictReader(handle)}


def saal_fit(tmp_path: Path, example: Path, *extra: str) -> None:
    main(["fit", "--config", CONFIG, "--data.init_args.images", str(example / "images"),
          "--data.init_args.test_images", str(example / "test"), "--data.init_args.batch_size", "8",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
          "--acquisition.query_size", str(QUERY), "--acquisition.pool_size", "30", "--acquisition.num_rounds", "2",
          "--acquisition.epochs_per_round", "1", *extra])


def fill(csv_path: Path, truth: dict[str, str], change=None) -> None:
    """Answer a queries file as the person would (``change`` may edit the rows first, to make mistakes)."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["label"] = truth[row["path"]]
    if change is not None:
        rows = change(rows)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["index", "path", "pseudo_label", "score", "label"])
        writer.writeheader()
        writer.writerows(rows)


def test_the_worked_example_runs_two_rounds_from_a_bare_folder(tmp_path: Path, example: Path, capsys) -> None:
    run = tmp_path / "runs" / "image_folder" / "version_0"
    truth = answers(example)
    saal_fit(tmp_path, example)  # no labels at all: a random first query, before any training
    out = capsys.readouterr().out
    assert f"saal: {QUERY} items to label for round 0: fill the label column of {run / 'queries' / 'round_0.csv'}" \
           in out and "rerun the same command with --ckpt_path last" in out
    with open(run / "queries" / "round_0.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == QUERY and all(row["label"] == "" and row["pseudo_label"] == "" for row in rows)
    assert (run / "queries" / "round_0.png").stat().st_size > 0 and (run / "checkpoints" / "last.ckpt").exists()
    assert not (run / "rounds.csv").exists()  # nothing was trained yet

    for round_index in (0, 1):
        fill(run / "queries" / f"round_{round_index}.csv", truth)
        saal_fit(tmp_path, example, "--ckpt_path", "last")
        with open(run / "queries" / f"round_{round_index + 1}.csv", newline="") as handle:
            query = list(csv.DictReader(handle))
        assert len(query) == QUERY and all(row["pseudo_label"] in truth.values() for row in query)
        assert all(float(row["score"]) >= 0 for row in query)  # SAAL scores: perturbed losses
    fill(run / "queries" / "round_2.csv", truth)
    saal_fit(tmp_path, example, "--ckpt_path", "last")  # the last round trains and tests, and asks nothing more

    ledger = read_ledger(run / "labels.csv")
    assert len(ledger) == 3 * QUERY and [int(row["round"]) for row in ledger] == [0] * 5 + [1] * 5 + [2] * 5
    assert all(truth[row["path"]] == row["label"] for row in ledger)
    with open(run / "rounds.csv", newline="") as handle:
        rounds = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rounds] == [0, 1, 2] and [int(r["num_labeled"]) for r in rounds] == [5, 10, 15]
    assert [int(r["num_acquired"]) for r in rounds] == [5, 5, 0]
    assert all(0 <= float(r["test_acc"]) <= 1 for r in rounds)
    assert sorted(p.name for p in (tmp_path / "runs" / "image_folder").iterdir()) == ["version_0"]

    # Never lose a label: without the checkpoints, the ledger rebuilds the labeled set exactly.
    shutil.rmtree(run / "checkpoints")
    saal_fit(tmp_path, example, "--data.init_args.labels", str(run / "labels.csv"), "--acquisition.num_rounds", "0",
             "--trainer.logger.init_args.name", "rebuilt")
    rebuilt = json.loads((tmp_path / "runs" / "rebuilt" / "version_0" / "labeled_indices.json").read_text())
    paths = find_images(example / "images")
    assert sorted(paths[i] for i in rebuilt["labeled_indices"]) == sorted(row["path"] for row in ledger)


@pytest.fixture
def queried(example: Path, tmp_path: Path) -> Path:
    """A run stopped at its first query; returns the run's folder."""
    saal_fit(tmp_path, example)
    return tmp_path / "runs" / "image_folder" / "version_0"


def _duplicate(rows):
    return rows + rows[:1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda rows: [{**rows[0], "index": "9999"}] + rows[1:], r"row 2: index 9999 was not queried in round 0"),
        (lambda rows: [{**rows[0], "path": "elsewhere.png"}] + rows[1:], r"row 2: the path of index \d+ changed: "
                                                                           "'elsewhere.png'"),
        (lambda rows: rows[:1] + [{**rows[1], "label": "Cat"}] + rows[2:], r"row 3: label 'Cat' of '.*' is not one "
                                                                             r"of the classes"),
        (lambda rows: rows[:2] + [{**rows[2], "label": " "}] + rows[3:], r"row 4: the label of '.*' is empty; fill it"),
        (_duplicate, r"row 7: index \d+ appears twice"),
        (lambda rows: rows[1:], r"1 queried row\(s\) are missing"),
    ],
    ids=["not-queried", "changed-path", "unknown-class", "empty-label", "duplicate-row", "missing-row"],
)
def test_answers_that_cannot_be_imported_are_refused_naming_file_row_and_problem(
    tmp_path: Path, example: Path, queried: Path, capsys, change, message: str
) -> None:
    csv_path = queried / "queries" / "round_0.csv"
    fill(csv_path, answers(example), change)
    checkpoint = (queried / "checkpoints" / "last.ckpt").read_bytes()
    answers_before = csv_path.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        saal_fit(tmp_path, example, "--ckpt_path", "last")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"saal: error: {csv_path}, " in error or f"saal: error: {csv_path}: " in error
    assert __import__("re").search(message, error), error
    # Nothing was imported or changed.
    assert not (queried / "labels.csv").exists() and not (queried / "rounds.csv").exists()
    assert (queried / "checkpoints" / "last.ckpt").read_bytes() == checkpoint and csv_path.read_bytes() == \
        answers_before


def test_partial_answers_need_the_explicit_option(tmp_path: Path, example: Path, queried: Path) -> None:
    csv_path = queried / "queries" / "round_0.csv"
    fill(csv_path, answers(example), lambda rows: rows[:2] + [{**row, "label": ""} for row in rows[2:4]])
    with open(csv_path, newline="") as handle:
        queried_items = {int(r["index"]): r["path"] for r in csv.DictReader(handle)}
    with pytest.raises(LabelImportError, match="is empty"):
        read_answers(queried / "queries", 0, queried_items, make_image_folder.CLASS_NAMES)
    saal_fit(tmp_path, example, "--ckpt_path", "last", "--acquisition.partial_labels", "true")
    ledger = read_ledger(queried / "labels.csv")
    assert len(ledger) == 2  # the 2 answered; the unanswered and the removed row stay unlabeled
    with open(queried / "rounds.csv", newline="") as handle:
        assert int(next(csv.DictReader(handle))["num_labeled"]) == 2


def test_a_label_studio_export_is_accepted_where_the_csv_is(tmp_path: Path, example: Path, queried: Path) -> None:
    truth = answers(example)
    tasks = json.loads((queried / "queries" / "round_0.tasks.json").read_text())
    assert all(task["data"]["image"].startswith("/data/local-files/?d=") for task in tasks)
    export = [{  # Label Studio's JSON export of those tasks, as its export page documents it
        "id": 100 + n, "data": task["data"], "meta": {}, "created_at": "2026-12-01T10:00:00.000000Z",
        "updated_at": "2026-12-01T10:05:00.000000Z", "project": 1, "predictions": [],
        "annotations": [{
            "id": 200 + n, "completed_by": 1, "was_cancelled": False, "ground_truth": False,
            "created_at": "2026-12-01T10:04:00.000000Z", "updated_at": "2026-12-01T10:04:00.000000Z",
            "lead_time": 3.2, "task": 100 + n, "project": 1, "result_count": 0,
            "result": [{"id": f"r{n}", "type": "choices", "from_name": "label", "to_name": "image",
                        "origin": "manual", "value": {"choices": [truth[task["data"]["path"]]]}}],
        }],
    } for n, task in enumerate(tasks)]
    (queried / "queries" / "round_0.export.json").write_text(json.dumps(export))
    saal_fit(tmp_path, example, "--ckpt_path", "last")
    ledger = read_ledger(queried / "labels.csv")
    assert {row["path"]: row["label"] for row in ledger} == {t["data"]["path"]: truth[t["data"]["path"]]
                                                            for t in tasks}


def test_importing_the_same_answers_twice_adds_nothing(tmp_path: Path, example: Path, queried: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    cold_start = queried / "checkpoints" / "cold_start.ckpt"  # an explicit checkpoint of the run
    shutil.copy(queried / "checkpoints" / "last.ckpt", cold_start)
    fill(queried / "queries" / "round_0.csv", answers(example))
    saal_fit(tmp_path, example, "--ckpt_path", "last")
    first = (queried / "labels.csv").read_text()
    with caplog.at_level("WARNING"):  # a crash before the next checkpoint: the same answers are imported again
        saal_fit(tmp_path, example, "--ckpt_path", str(cold_start))
    assert "5 of round 0's 5 labels were already in" in caplog.text
    assert (queried / "labels.csv").read_text() == first


class InputsOnly(Dataset):
    """What a person brings: inputs without targets."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def test_a_loop_of_fits_labels_through_the_python_api(tmp_path: Path) -> None:
    truth = SyntheticImages(120, seed=0)
    datamodule = ActiveDataModule(InputsOnly(truth.images), SyntheticImages(40, seed=1), oracle="human",
                                  num_classes=4, initial_labels=0, batch_size=8)
    acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=30, output_dir=str(tmp_path), plot=False)
    pl.seed_everything(0, verbose=False)
    model = ActiveClassifier("small_cnn", num_classes=4, in_channels=1, lr=1e-2)
    for _ in range(3):
        pl.Trainer(max_epochs=2, callbacks=[acquisition], accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(model, datamodule=datamodule)
        pending = acquisition.pending_query
        assert pending is not None and len(pending) == 4
        datamodule.label(pending, truth.targets[pending])  # the person's answers
    assert datamodule.num_labeled == 12
    assert torch.equal(datamodule.labels[datamodule.labeled_indices], truth.targets[datamodule.labeled_indices])
    assert [row["num_labeled"] for row in acquisition.history] == [4, 8]
    with pytest.raises(ValueError, match="labels come from people"):
        datamodule.label(datamodule.unlabeled_indices[:2])


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo on CPU")
def test_one_query_and_import_cycle_under_ddp(tmp_path: Path) -> None:
    truth = SyntheticImages(100, seed=0)

    def fit(ckpt_path: str | None) -> None:
        datamodule = ActiveDataModule(InputsOnly(truth.images), SyntheticImages(20, seed=1), oracle="human",
                                      num_classes=4, initial_labels=0, batch_size=8, eval_batch_size=16)
        acquisition = AcquisitionCallback("entropy", query_size=4, pool_size=25, num_rounds=1, epochs_per_round=1,
                                          output_dir=str(tmp_path / "run"), plot=False)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1,
                                      save_on_train_epoch_end=True)
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             reload_dataloaders_every_n_epochs=1, callbacks=[acquisition, checkpoints])
        trainer.fit(ActiveClassifier("small_cnn", num_classes=4, in_channels=1), datamodule=datamodule,
                    ckpt_path=ckpt_path)

    def answer(round_index: int) -> None:
        path = tmp_path / "run" / "queries" / f"round_{round_index}.csv"
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        fill(path, {row["path"]: str(int(truth.targets[int(row["index"])])) for row in rows})

    fit(None)  # cold start: a random query written once (rank 0), both ranks stop
    answer(0)
    fit(str(tmp_path / "ckpt" / "last.ckpt"))  # both ranks import, train round 0, query round 1, stop
    ledger = read_ledger(tmp_path / "run" / "labels.csv")
    assert len(ledger) == 4 and {row["round"] for row in ledger} == {"0"}
    assert all(row["label"] == str(int(truth.targets[int(row["path"])])) for row in ledger)
    with open(tmp_path / "run" / "queries" / "round_1.csv", newline="") as handle:
        query = list(csv.DictReader(handle))
    assert len(query) == 4 and not {row["path"] for row in query} & {row["path"] for row in ledger}
    with open(tmp_path / "run" / "rounds.csv", newline="") as handle:
        assert [(r["round"], r["num_labeled"]) for r in csv.DictReader(handle)] == [("0", "4")]
