"""VisionActiveDataModule: data-set lookup order, clear missing-data errors, transforms and class wiring.

The torchvision loading path runs for real on tiny files the tests write (IDX for Fashion-MNIST, the pickle
batches of CIFAR, SVHN's .mat files).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from torchvision import transforms

from saal_lightning.data import VISION_DATASETS, DatasetNotFoundError, VisionActiveDataModule, vision_datasets
from saal_lightning.data.vision_datasets import build_transforms
from tests.synthetic_data import FASHION_FILES, write_fashion


def transform_types(transform) -> list[type]:
    return [type(t) for t in transform.transforms]


# --------------------------------------------------------------------------------------------- construction


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'; known data sets: \['cifar10', 'cifar100'"):
        VisionActiveDataModule("mnist")


@pytest.mark.parametrize(
    ("name", "num_classes", "in_channels", "augment"),
    [("fashion_mnist", 10, 1, False), ("svhn", 10, 3, False), ("cifar10", 10, 3, True), ("cifar100", 100, 3, True)],
)
def test_static_wiring_before_setup(name, num_classes, in_channels, augment):
    dm = VisionActiveDataModule(name, initial_labels=num_classes)
    assert (dm.num_classes, dm.in_channels, dm.augment) == (num_classes, in_channels, augment)
    assert VisionActiveDataModule(name, augment=not augment, initial_labels=num_classes).augment is (not augment)
    assert dm.train_dataset is None  # nothing is read before prepare_data/setup


def test_cifar100_default_initial_labels_must_fit_100_classes():
    with pytest.raises(ValueError, match="initial_labels=20 is not divisible by num_classes=100"):
        VisionActiveDataModule("cifar100")


def test_build_transforms_augments_only_when_asked():
    cifar = VISION_DATASETS["cifar10"]
    train, evaluation = build_transforms(cifar, augment=True)
    assert transform_types(train) == [
        transforms.RandomCrop,
        transforms.RandomHorizontalFlip,
        transforms.ToTensor,
        transforms.Normalize,
    ]
    assert train.transforms[0].size == (32, 32) and train.transforms[0].padding == 4
    assert transform_types(evaluation) == [transforms.ToTensor, transforms.Normalize]
    fashion_train, _ = build_transforms(VISION_DATASETS["fashion_mnist"], augment=True)
    assert fashion_train.transforms[0].size == (28, 28)  # crops keep Fashion-MNIST's 28 px
    plain, _ = build_transforms(VISION_DATASETS["svhn"], augment=False)
    assert transform_types(plain) == [transforms.ToTensor, transforms.Normalize]


# ------------------------------------------------------------------------------------------- Fashion-MNIST


def expected_fashion_pixel(index: int) -> float:
    return ((7 * index) % 256 / 255 - 0.2860) / 0.3530


def test_fashion_mnist_from_debian_package_is_unpacked_into_root(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_fashion(debian, compressed=True)
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", debian)
    root = tmp_path / "data"
    dm = VisionActiveDataModule("fashion_mnist", root=str(root), initial_labels=20)
    dm.prepare_data()
    raw = root / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(FASHION_FILES)  # unpacked, no temporary files left behind
    dm.setup("fit")

    assert (len(dm.train_dataset), len(dm.pool_dataset), len(dm.test_dataset)) == (30, 30, 10)
    assert dm.train_dataset.data is dm.pool_dataset.data  # one copy of the images
    assert dm.summary()["labeled_per_class"] == [2] * 10
    image, label = dm.pool_dataset[13]
    assert image.shape == (1, 28, 28) and label == 3
    assert torch.allclose(image, torch.full((1, 28, 28), expected_fashion_pixel(13)), atol=1e-5)
    assert torch.equal(dm.train_dataset[13][0], image)  # no augmentation by default
    assert transform_types(dm.test_dataset.transform) == [transforms.ToTensor, transforms.Normalize]
    batch, _ = next(iter(dm.train_dataloader()))
    assert batch.shape == (10, 1, 28, 28)

    assert torch.equal(pickle.loads(pickle.dumps(dm)).pool_dataset[13][0], image)  # ddp_spawn sends it to workers

    # Once unpacked, root alone is enough.
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "gone")
    again = VisionActiveDataModule("fashion_mnist", root=str(root), initial_labels=20)
    again.setup()
    assert torch.equal(again.labeled_indices, dm.labeled_indices)


def test_fashion_mnist_in_torchvision_root_wins_over_debian(tmp_path, monkeypatch):
    write_fashion(tmp_path / "data" / "FashionMNIST" / "raw", compressed=False, train_count=40)
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    dm = VisionActiveDataModule("fashion_mnist", root=str(tmp_path / "data"), initial_labels=30)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_dataset) == 40 and dm.num_labeled == 30


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    root = tmp_path / "data"
    dm = VisionActiveDataModule("fashion_mnist", root=str(root))
    with pytest.raises(DatasetNotFoundError) as excinfo:
        dm.prepare_data()
    message = str(excinfo.value)
    assert f"root '{root}'" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data.init_args.download true" in message
    with pytest.raises(DatasetNotFoundError):
        dm.setup()


@pytest.mark.skipif(
    not all((vision_datasets.DEBIAN_FASHION_MNIST_DIR / f"{name}.gz").is_file() for name in FASHION_FILES),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_from_debian(tmp_path):
    dm = VisionActiveDataModule("fashion_mnist", root=str(tmp_path), initial_labels=20, seed=123)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (60_000, 10_000)
    assert dm.summary()["labeled_per_class"] == [2] * 10
    assert dm.num_unlabeled == 59_980
    image, _ = dm.pool_dataset[0]
    assert image.shape == (1, 28, 28)
    # Normalize uses the training set's statistics: the normalised training images are ~N(0, 1) per pixel.
    sample = torch.stack([dm.pool_dataset[i][0] for i in range(0, 60_000, 60)])
    assert abs(sample.mean().item()) < 0.05 and abs(sample.std().item() - 1) < 0.05


# ------------------------------------------------------------------------------------------ CIFAR and SVHN


def cifar_batch(count: int, start: int, label_key: str, num_classes: int) -> dict:
    """Image ``i`` has channel ``c`` constant at ``(i + 50 * c) % 256``; label ``i % num_classes``."""
    index = np.arange(start, start + count)
    channels = [np.broadcast_to(((index + 50 * c) % 256)[:, None], (count, 1024)) for c in range(3)]
    data = np.concatenate(channels, axis=1).astype(np.uint8)
    return {"data": data, label_key: (index % num_classes).tolist()}


def write_cifar(root: Path, name: str) -> int:
    """Write the python-pickle layout torchvision reads; return the number of training images."""
    if name == "cifar10":
        folder, label_key, meta_key, num_classes = root / "cifar-10-batches-py", "labels", "label_names", 10
        train_files, test_file, meta_file = [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"
        per_file = 4
    else:
        folder, label_key, meta_key, num_classes = root / "cifar-100-python", "fine_labels", "fine_label_names", 100
        train_files, test_file, meta_file = ["train"], "test", "meta"
        per_file = 200
    folder.mkdir(parents=True)
    for position, file_name in enumerate(train_files):
        batch = cifar_batch(per_file, position * per_file, label_key, num_classes)
        (folder / file_name).write_bytes(pickle.dumps(batch))
    (folder / test_file).write_bytes(pickle.dumps(cifar_batch(10, 0, label_key, num_classes)))
    (folder / meta_file).write_bytes(pickle.dumps({meta_key: [f"class{i}" for i in range(num_classes)]}))
    return per_file * len(train_files)


@pytest.mark.parametrize(("name", "mean", "std"), [("cifar10", 0.4914, 0.2470), ("cifar100", 0.5071, 0.2673)])
def test_cifar_loads_through_torchvision_with_train_only_augmentation(tmp_path, monkeypatch, name, mean, std):
    train_count = write_cifar(tmp_path, name)
    # The test files are fakes, so their checksums cannot match torchvision's; existence is what matters here.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    num_classes = VISION_DATASETS[name].num_classes
    dm = VisionActiveDataModule(name, root=str(tmp_path), initial_labels=num_classes)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == train_count and len(dm.test_dataset) == 10
    assert dm.summary()["labeled_per_class"] == [1] * num_classes
    assert transform_types(dm.train_dataset.transform)[:2] == [transforms.RandomCrop, transforms.RandomHorizontalFlip]
    assert transform_types(dm.pool_dataset.transform) == [transforms.ToTensor, transforms.Normalize]
    image, label = dm.pool_dataset[7]
    assert image.shape == (3, 32, 32) and label == 7 % num_classes
    assert torch.allclose(image[0], torch.full((32, 32), (7 / 255 - mean) / std), atol=1e-5)
    assert dm.train_dataset[7][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["svhn", "cifar10", "cifar100"])
def test_missing_torchvision_dataset_says_how_to_get_it(tmp_path, name):
    dm = VisionActiveDataModule(name, root=str(tmp_path), initial_labels=VISION_DATASETS[name].num_classes)
    with pytest.raises(DatasetNotFoundError, match=rf"{VISION_DATASETS[name].title} was not found under root") as err:
        dm.prepare_data()
    assert "--data.init_args.download true" in str(err.value) and str(tmp_path) in str(err.value)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    dm = VisionActiveDataModule("cifar10", root=str(tmp_path), download=True)
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 could not be downloaded into root .*Error downloading"):
        dm.prepare_data()


def write_svhn(root: Path, split: str, count: int) -> None:
    """SVHN's .mat layout: X is 32x32x3xN uint8, y is Nx1 with digit 0 stored as label 10."""
    images = np.broadcast_to((np.arange(count) % 256)[None, None, None, :], (32, 32, 3, count)).astype(np.uint8)
    labels = np.arange(count) % 10
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images, "y": np.where(labels == 0, 10, labels)[:, None]})


def test_svhn_loads_real_mat_files_without_augmentation(tmp_path, monkeypatch):
    write_svhn(tmp_path, "train", 30)
    write_svhn(tmp_path, "test", 10)
    # The tiny files do not have the published checksums.
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    dm = VisionActiveDataModule("svhn", root=str(tmp_path), initial_labels=20)
    dm.setup()
    assert len(dm.train_dataset) == 30 and len(dm.test_dataset) == 10
    assert dm.summary()["labeled_per_class"] == [2] * 10
    image, label = dm.pool_dataset[4]
    assert image.shape == (3, 32, 32) and label == 4
    assert torch.allclose(image[2], torch.full((32, 32), (4 / 255 - 0.4728) / 0.1970), atol=1e-5)
    assert dm.pool_dataset[10][1] == 0  # label 10 in the file is the digit 0
    assert torch.equal(dm.train_dataset[4][0], image)  # SVHN is not augmented by default
