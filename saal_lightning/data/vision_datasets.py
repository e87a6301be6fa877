"""The paper's image data sets (Fashion-MNIST, SVHN, CIFAR-10, CIFAR-100) as :class:`ActiveDataModule` s.

Preprocessing follows the SAAL authors' protocol: ``ToTensor`` + per-data-set ``Normalize`` everywhere, and
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` on the CIFAR training sets only. The pool (scored for
acquisition) and the test set are never augmented.

Fashion-MNIST is looked for, in order, in torchvision's layout under ``root`` (``root/FashionMNIST/raw``), in
Debian's ``dataset-fashion-mnist`` package (:data:`DEBIAN_FASHION_MNIST_DIR`, unpacked into ``root`` on first
use), then downloaded when ``download=True``. The other data sets use torchvision's own files and download. A
missing data set raises :class:`DatasetNotFoundError`, whose message says how to get it.

Example::

    >>> dm = VisionActiveDataModule("fashion_mnist", root="data")
    >>> dm.num_classes, dm.in_channels
    (10, 1)
    >>> dm.prepare_data()  # doctest: +SKIP
    >>> dm.setup("fit")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import gzip
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.vision import StandardTransform, VisionDataset

from saal_lightning.data.active_datamodule import ActiveDataModule

#: Where Debian's ``dataset-fashion-mnist`` package installs the four ``*-ubyte.gz`` files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DatasetNotFoundError(RuntimeError):
    """A data set is not on disk and may not be downloaded; the message says how to get it."""


@dataclass(frozen=True)
class VisionDatasetSpec:
    """What :class:`VisionActiveDataModule` needs to know about one named data set.

    Attributes:
        title: the human-readable name used in messages.
        num_classes: the number of classes.
        in_channels: image channels (1 for grey-scale).
        image_size: height (= width) in pixels; the size random crops keep.
        mean: per-channel mean of the training images (in ``[0, 1]``) for ``Normalize``.
        std: per-channel standard deviation of the training images for ``Normalize``.
        augment: whether the training set is augmented (crop + flip) by default.
        load: ``load(root, train, download)`` returns the torchvision data set, without transforms.
    """

    title: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    load: Callable[[str, bool, bool], Dataset]


def _gunzip_atomic(source: Path, target: Path) -> None:
    """Decompress ``source`` to ``target`` through a temporary file, so that no reader sees a partial file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(source, "rb") as src:
            shutil.copyfileobj(src, out)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _ensure_fashion_mnist(root: str, download: bool) -> None:
    """Make sure torchvision finds Fashion-MNIST's raw files under ``root``, unpacking Debian's copy if needed."""
    raw = Path(root) / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in _FASHION_MNIST_FILES):
        return
    # Read the module attribute at call time, so that tests can point it elsewhere.
    debian = DEBIAN_FASHION_MNIST_DIR
    if all((debian / f"{name}.gz").is_file() for name in _FASHION_MNIST_FILES):
        raw.mkdir(parents=True, exist_ok=True)
        for name in _FASHION_MNIST_FILES:
            if not (raw / name).is_file():
                _gunzip_atomic(debian / f"{name}.gz", raw / name)
        return
    if not download:
        raise DatasetNotFoundError(
            f"Fashion-MNIST was not found under root '{root}' (looked in {raw} and {debian}). Get it with "
            "`apt-get install dataset-fashion-mnist`, or let torchvision download it: pass "
            "`--data.init_args.download true` (download=True in Python)."
        )


def _torchvision_load(title: str, build: Callable[[], Dataset], root: str, download: bool) -> Dataset:
    """Call a torchvision constructor, turning its missing-data and download errors into a clear message."""
    try:
        return build()
    except RuntimeError as err:
        if download:
            raise DatasetNotFoundError(f"{title} could not be downloaded into root '{root}': {err}") from err
        if "not found" not in str(err):
            raise
        raise DatasetNotFoundError(
            f"{title} was not found under root '{root}'. Let torchvision download it: pass "
            "`--data.init_args.download true` (download=True in Python), or put torchvision's files there."
        ) from None
    except OSError as err:  # network errors during download (URLError is an OSError)
        if not download:
            raise
        raise DatasetNotFoundError(f"{title} could not be downloaded into root '{root}': {err}") from err


def _load_fashion_mnist(root: str, train: bool, download: bool) -> Dataset:
    _ensure_fashion_mnist(root, download)
    return _torchvision_load(
        "Fashion-MNIST", lambda: datasets.FashionMNIST(root, train=train, download=download), root, download
    )


def _load_svhn(root: str, train: bool, download: bool) -> Dataset:
    split = "train" if train else "test"
    return _torchvision_load("SVHN", lambda: datasets.SVHN(root, split=split, download=download), root, download)


def _load_cifar10(root: str, train: bool, download: bool) -> Dataset:
    return _torchvision_load("CIFAR-10", lambda: datasets.CIFAR10(root, train=train, download=download), root, download)


def _load_cifar100(root: str, train: bool, download: bool) -> Dataset:
    return _torchvision_load(
        "CIFAR-100", lambda: datasets.CIFAR100(root, train=train, download=download), root, download
    )


#: The named data sets; means and standard deviations are the usual per-channel statistics of each training set.
VISION_DATASETS: dict[str, VisionDatasetSpec] = {
    "fashion_mnist": VisionDatasetSpec(
        "Fashion-MNIST", 10, 1, 28, (0.2860,), (0.3530,), augment=False, load=_load_fashion_mnist
    ),
    "svhn": VisionDatasetSpec(
        "SVHN", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), augment=False, load=_load_svhn
    ),
    "cifar10": VisionDatasetSpec(
        "CIFAR-10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), augment=True, load=_load_cifar10
    ),
    "cifar100": VisionDatasetSpec(
        "CIFAR-100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), augment=True, load=_load_cifar100
    ),
}


def build_transforms(spec: VisionDatasetSpec, augment: bool) -> tuple[Callable, Callable]:
    """``(train_transform, eval_transform)``: ``ToTensor`` + ``Normalize``, with crop + flip first if ``augment``."""
    normalize = [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    augmentation = [transforms.RandomCrop(spec.image_size, padding=4), transforms.RandomHorizontalFlip()]
    return transforms.Compose((augmentation if augment else []) + normalize), transforms.Compose(normalize)


def _with_transform(dataset: VisionDataset, transform: Callable) -> VisionDataset:
    """A shallow copy of a torchvision data set with another transform; the image arrays are shared, not copied."""
    view = copy.copy(dataset)
    view.transform = transform
    view.transforms = StandardTransform(transform, view.target_transform)
    return view


class VisionActiveDataModule(ActiveDataModule):
    """An :class:`ActiveDataModule` over one of the paper's image data sets, loaded with torchvision.

    ``num_classes`` and ``in_channels`` are set on construction, so LightningCLI can link them to the model
    before any data is read. The data is located (and, with ``download``, downloaded) in :meth:`prepare_data`
    and loaded in :meth:`setup`; the training, pool and test sets share one copy of the images in memory.

    Args:
        dataset: which data set: ``fashion_mnist``, ``svhn``, ``cifar10`` or ``cifar100``.
        root: the data directory, in torchvision's layout (``root/FashionMNIST/raw``,
            ``root/cifar-10-batches-py``, ``root/cifar-100-python``, ``root/{train,test}_32x32.mat`` for SVHN).
        download: let torchvision download a data set that is not on disk.
        augment: random crop (4-pixel padding) + horizontal flip on the training set; ``None`` follows the
            authors' protocol: on for CIFAR-10/100, off for Fashion-MNIST and SVHN.
        initial_labels: the size of the initial labeled set (the paper: 20, 1000 for CIFAR-100).
        balanced: draw the initial set as the same number of items per class.
        batch_size: the training batch size (the paper: 10, 100 for CIFAR-100).
        eval_batch_size: the batch size of the test and pool loaders.
        num_workers: worker processes for every loader.
        seed: seeds the initial draw and the training loader's shuffling; ``None`` follows ``seed_everything``.

    Raises:
        ValueError: for an unknown ``dataset`` name (the message lists the known ones).
        DatasetNotFoundError: from :meth:`prepare_data`/:meth:`setup` when the data is missing and ``download`` is
            off.

    Example::

        >>> dm = VisionActiveDataModule("cifar10", root="data", download=True, initial_labels=20)
        >>> dm.num_classes, dm.in_channels
        (10, 3)
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str = "data",
        download: bool = False,
        augment: bool | None = None,
        initial_labels: int = 20,
        balanced: bool = True,
        batch_size: int = 10,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        if dataset not in VISION_DATASETS:
            raise ValueError(f"Unknown dataset {dataset!r}; known data sets: {sorted(VISION_DATASETS)}")
        self.spec = VISION_DATASETS[dataset]
        super().__init__(
            num_classes=self.spec.num_classes,
            initial_labels=initial_labels,
            balanced=balanced,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.dataset = dataset
        self.root = root
        self.download = download
        self.augment = self.spec.augment if augment is None else augment
        self.in_channels = self.spec.in_channels

    def prepare_data(self) -> None:
        """Locate the data, unpacking Debian's Fashion-MNIST or downloading as configured (rank 0 only)."""
        for train in (True, False):
            self.spec.load(self.root, train, self.download)

    def setup(self, stage: str | None = None) -> None:
        """Load the training, pool and test sets once, then create the split (see :meth:`ActiveDataModule.setup`)."""
        if self.train_dataset is None:
            train_transform, eval_transform = build_transforms(self.spec, self.augment)
            train = self.spec.load(self.root, True, self.download)
            self.pool_dataset = _with_transform(train, eval_transform)
            self.train_dataset = _with_transform(train, train_transform)
            self.test_dataset = _with_transform(self.spec.load(self.root, False, self.download), eval_transform)
        super().setup(stage)
