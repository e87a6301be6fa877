"""ImageFolderActiveDataModule: any nesting, labels from a CSV, a test folder matched by class name, no targets."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from saal_lightning import AcquisitionCallback, ActiveClassifier, ImageFolderActiveDataModule
from saal_lightning.data.image_folder import find_images


def _png(path: Path, grey: int, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, grey).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    for n in range(12):  # nested two levels, mixed suffixes; a text file that is no image
        _png(images / f"part{n % 3}" / ("deep" if n % 2 else "") / f"item{n:02d}.{'PNG' if n == 5 else 'png'}",
             grey=20 * n)
    (images / "notes.txt").write_text("not an image")
    return images


def test_every_image_at_any_depth_in_sorted_order(folder: Path) -> None:
    paths = find_images(folder)
    assert len(paths) == 12 and paths == sorted(paths) and "notes.txt" not in paths
    assert "part2/deep/item05.PNG" in paths and "part0/item00.png" in paths
    with pytest.raises(ValueError, match="no image files"):
        find_images(_empty(folder))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        find_images(folder / "nowhere")


def _empty(folder: Path) -> Path:
    empty = folder.parent / "empty"
    empty.mkdir()
    return empty


def test_inputs_only_and_labels_from_the_csv(folder: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,round\npart0/item00.png,dog,0\npart1/deep/item01.png,cat,3\n")
    dm = ImageFolderActiveDataModule(str(folder), classes=["cat", "dog"], labels=str(labels), image_size=6,
                                     channels=1)
    assert (dm.num_classes, dm.in_channels) == (2, 1)  # known before setup, for the CLI's links
    dm.setup("fit")
    item = dm.train_dataset[0]
    assert isinstance(item, torch.Tensor) and item.shape == (1, 6, 6)  # an input, no target
    names = dm.item_names(dm.labeled_indices)
    assert sorted(names) == ["part0/item00.png", "part1/deep/item01.png"]
    assert {n: int(dm.labels[dm.paths.index(n)]) for n in names} == {"part0/item00.png": 1,
                                                                    "part1/deep/item01.png": 0}
    assert set(dm.labeled_round[dm.labeled_indices].tolist()) == {0}  # the run's initial set
    with pytest.raises(RuntimeError, match="its targets are never read"):
        dm.targets(dm.unlabeled_indices[:1])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("part0/nope.png,dog", r"row 2: 'part0/nope.png' is not an image under the images folder"),
        ("part0/item00.png,horse", r"row 2: label 'horse' is not one of the classes \['cat', 'dog'\]"),
        ("part0/item00.png,dog\npart0/item00.png,cat", r"row 3: 'part0/item00.png' is labeled twice"),
    ],
)
def test_a_bad_labels_file_is_refused_naming_the_row(folder: Path, tmp_path: Path, rows: str, message: str) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{rows}\n")
    dm = ImageFolderActiveDataModule(str(folder), classes=["cat", "dog"], labels=str(labels))
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")


def test_the_test_folder_is_matched_to_the_classes_by_name(folder: Path, tmp_path: Path) -> None:
    test = tmp_path / "test"
    _png(test / "zebra" / "a.png", 0)
    _png(test / "ant" / "b.png", 255)
    # `classes` orders zebra first; torchvision's ImageFolder would number ant 0 (alphabetical).
    dm = ImageFolderActiveDataModule(str(folder), classes=["zebra", "ant"], test_images=str(test))
    dm.setup("fit")
    targets = {Path(path).parent.name: target for path, target in dm.test_dataset.samples}
    assert {name: dm.test_dataset.target_transform(t) for name, t in targets.items()} == {"zebra": 0, "ant": 1}
    assert sorted(int(y) for _, y in dm.test_dataloader().dataset) == [0, 1]
    _png(test / "lion" / "c.png", 9)
    with pytest.raises(ValueError, match=r"sub-folder\(s\) \['lion'\] .* are not among the classes"):
        ImageFolderActiveDataModule(str(folder), classes=["zebra", "ant"], test_images=str(test)).setup("fit")


def test_without_a_test_folder_rounds_record_no_accuracy(folder: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{'cat' if n % 2 else 'dog'}\n"
                                               for n, p in enumerate(find_images(folder)[:6])))
    dm = ImageFolderActiveDataModule(str(folder), classes=["cat", "dog"], labels=str(labels), image_size=8,
                                     channels=1, batch_size=4)
    acquisition = AcquisitionCallback("entropy", query_size=2, pool_size=4, num_rounds=0, output_dir=str(tmp_path))
    pl.Trainer(max_epochs=1, callbacks=[acquisition], accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        ActiveClassifier("small_cnn", num_classes=2, in_channels=1), datamodule=dm)
    with open(tmp_path / "rounds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["test_acc"] == "" and rows[0]["best_test_acc"] == ""
    assert rows[0]["num_labeled"] == "6"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"classes": ["one"]}, "at least two classes"), ({"channels": 2}, "channels must be 1 or 3"),
     ({"mean": [0.5]}, "mean and std need 3 values")],
)
def test_bad_options_are_refused(folder: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageFolderActiveDataModule(str(folder), **({"classes": ["a", "b"]} | kwargs))
