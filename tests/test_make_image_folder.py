"""scripts/make_image_folder.py on fake Fashion-MNIST files: what it writes, its determinism and its refusals."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import FashionMNIST

from saal_lightning.data import vision_datasets
from tests.synthetic_data import fashion_images, write_fashion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_image_folder as script  # noqa: E402  (scripts/make_image_folder.py)

TRAIN_COUNT, TEST_COUNT = 80, 50  # the fake source's split sizes


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "fashion"
    write_fashion(folder, compressed=True, train_count=TRAIN_COUNT, test_count=TEST_COUNT)
    return folder


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        assert png.mode == "L" and png.size == (28, 28)
        return np.asarray(png)


def _index(path: Path) -> int:
    """The source index in a PNG's name, ``img_00042.png`` -> 42."""
    return int(path.stem.removeprefix("img_"))


def _answers(out: Path) -> dict[str, str]:
    with (out / "answers.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["path", "label"]
        return {row["path"]: row["label"] for row in reader}


def _selection(out: Path) -> tuple[list[str], list[str]]:
    train = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png"))
    test = sorted(p.relative_to(out / "test").as_posix() for p in (out / "test").rglob("*.png"))
    return train, test


@pytest.mark.parametrize("compressed", [True, False])
def test_counts_and_training_pngs_match_the_answers(tmp_path: Path, compressed: bool) -> None:
    source = tmp_path / "fashion"
    write_fashion(source, compressed=compressed, train_count=TRAIN_COUNT, test_count=TEST_COUNT)
    out = tmp_path / "out"
    counts = script.make_image_folder(out, train=25, test=20, seed=0, source=source)
    assert counts == {"train": 25, "test": 20, "classes": 10}

    answers = _answers(out)
    train_paths, _ = _selection(out)
    assert sorted(answers) == train_paths and len(train_paths) == 25
    images, labels = fashion_images(TRAIN_COUNT)
    classes = (out / "classes.txt").read_text().splitlines()
    indices = set()
    for relative, label in answers.items():
        path = out / "images" / relative
        assert len(Path(relative).parts) >= 2, "nested below images/"
        index = _index(path)
        indices.add(index)
        np.testing.assert_array_equal(_pixels(path), images[index])
        assert label == classes[labels[index]]
    assert len(indices) == 25, "drawn without replacement"


def test_training_paths_do_not_reveal_the_class(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    script.make_image_folder(out, train=60, test=10, source=source)
    names = [*FashionMNIST.classes, *script.CLASS_NAMES, "tshirt", "t-shirt", "boot"]
    for relative in _answers(out):
        lowered = relative.lower()
        assert not any(name.lower() in lowered for name in names), relative


def test_classes_file_and_test_folders_agree(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    script.make_image_folder(out, train=5, test=23, seed=3, source=source)
    classes = (out / "classes.txt").read_text().splitlines()
    assert classes[0] == "T-shirt_top"
    assert classes == [name.replace("/", "_") for name in FashionMNIST.classes]
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(classes)
    images, labels = fashion_images(TEST_COUNT)
    per_class = {}
    for label, name in enumerate(classes):
        pngs = sorted((out / "test" / name).iterdir())
        per_class[name] = len(pngs)
        for path in pngs:
            assert labels[_index(path)] == label, path
            np.testing.assert_array_equal(_pixels(path), images[_index(path)])
    # 23 over 10 classes: two each, three for three of them.
    assert sum(per_class.values()) == 23 and sorted(per_class.values()) == [2] * 7 + [3] * 3


def test_the_same_seed_gives_the_same_selection(tmp_path: Path, source: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        script.make_image_folder(tmp_path / name, train=30, test=10, seed=seed, source=source)
    first, again, other = (_selection(tmp_path / name) for name in "abc")
    assert first == again
    assert _answers(tmp_path / "a") == _answers(tmp_path / "b")
    assert first != other


def test_default_source_is_debians_copy(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", source)
    assert script.main([str(tmp_path / "out"), "--train", "4", "--test", "10"]) == 0
    assert len(_answers(tmp_path / "out")) == 4


def test_missing_source_exits_2_with_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    assert script.main([str(tmp_path / "out"), "--train", "3", "--test", "10"]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("make_image_folder: Fashion-MNIST not found")
    assert "apt-get install dataset-fashion-mnist" in message and str(tmp_path / "absent") in message
    assert not (tmp_path / "out").exists(), "nothing written"


def test_missing_source_from_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_image_folder.py"), str(tmp_path / "out"), "--train", "3",
         "--test", "10", "--source", str(tmp_path / "absent")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr and result.stderr.count("\n") == 1


def test_a_non_empty_out_is_refused_unless_overwrite(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [str(out), "--train", "20", "--test", "10", "--source", str(source)]
    assert script.main([*args, "--seed", "1"]) == 0
    (out / "notes.txt").write_text("mine")
    before = _selection(out)
    capsys.readouterr()

    assert script.main(args) == 2
    err = capsys.readouterr().err
    assert "already contains files" in err and "--overwrite" in err
    assert _selection(out) == before, "nothing changed"

    assert script.main([*args, "--seed", "2", "--overwrite"]) == 0
    train, _ = _selection(out)
    assert train == sorted(_answers(out)), "no stale PNG from the first run is left"
    assert (out / "notes.txt").read_text() == "mine", "files the script did not write are kept"


def test_refusal_message_for_a_non_empty_out(tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".hidden").write_text("")
    assert script.main([str(out), "--train", "2", "--test", "0", "--source", str(source)]) == 2
    err = capsys.readouterr().err
    expected = f"make_image_folder: {out} already contains files; choose an empty or new folder, or pass --overwrite"
    assert err == expected + "\n"


@pytest.mark.parametrize(
    ("train", "test", "message"),
    [
        (0, 10, "--train must be at least 1, got 0"),
        (5, 4, "--test must be 0 or at least 10 (one per class), got 4"),
        (TRAIN_COUNT + 1, 10, f"--train {TRAIN_COUNT + 1} is more than the {TRAIN_COUNT} images"),
        (5, TEST_COUNT + 1, f"--test {TEST_COUNT + 1} is more than the {TEST_COUNT} images"),
    ],
)
def test_counts_out_of_range_are_refused(tmp_path: Path, source: Path, train: int, test: int, message: str) -> None:
    with pytest.raises(script.ImageFolderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        script.make_image_folder(tmp_path / "out", train, test, source=source)
    assert not (tmp_path / "out").exists()


def test_no_test_set(tmp_path: Path, source: Path) -> None:
    assert script.make_image_folder(tmp_path / "out", 5, 0, source=source) == {"train": 5, "test": 0, "classes": 10}
    assert _selection(tmp_path / "out")[1] == []


def test_a_file_that_is_not_idx_is_refused(tmp_path: Path, source: Path) -> None:
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    (source / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(script.ImageFolderError, match="is not an IDX file of unsigned bytes"):
        script.make_image_folder(tmp_path / "out", 5, 10, source=source)
