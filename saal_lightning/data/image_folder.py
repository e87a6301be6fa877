"""A folder of unlabeled images as an active-learning data module, labeled by people.

The items are every image file under ``images`` (any nesting), in the order of their sorted relative paths, so
the same folder always gives the same indices; paths in every file (the ``labels`` input, the queries, the ledger)
are relative to ``images`` with ``/`` separators. Images load with PIL through torchvision, are resized and
normalised; their labels come only from ``labels`` (a CSV ``path,label[,round]``) and from the people who answer
the queries: no target is ever read from the folder.

Example::

    >>> dm = ImageFolderActiveDataModule("my_images", classes=["cat", "dog"], image_size=32)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from saal_lightning.data.active_datamodule import ActiveDataModule

#: What counts as an image file (lower-case suffixes); anything else in the folder is ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def find_images(folder: str | os.PathLike) -> list[str]:
    """The relative paths (``/``-separated, sorted) of every image file under ``folder``, at any depth.

    Raises:
        FileNotFoundError: when ``folder`` is not a directory.
        ValueError: when it holds no image file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"images: {root} is not a folder")
    paths = sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                   if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"images: no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return paths


class UnlabeledImages(Dataset):
    """The images at ``paths`` under ``root``, transformed: inputs only, no targets."""

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], transform: transforms.Compose) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.root / self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def read_labels_csv(path: str | os.PathLike, known_paths: Sequence[str], classes: Sequence[str]) -> dict[str, int]:
    """``path -> class index`` from a CSV with ``path`` and ``label`` columns (a ``round`` column is ignored).

    Raises:
        ValueError: naming the file, the row and the problem, for a missing column, a path that is not in the
            images folder, a label that is not one of ``classes``, or a path given twice.
    """
    known, class_index = set(known_paths), {name: i for i, name in enumerate(classes)}
    labels: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return labels  # an empty file: nothing labeled yet
        missing = {"path", "label"} - set(reader.fieldnames)
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected path,label[,round]")
        for row_number, row in enumerate(reader, start=2):
            where = f"{path}, row {row_number}"
            if row["path"] not in known:
                raise ValueError(f"{where}: {row['path']!r} is not an image under the images folder")
            if row["label"] not in class_index:
                raise ValueError(f"{where}: label {row['label']!r} is not one of the classes {list(classes)}")
            if row["path"] in labels:
                raise ValueError(f"{where}: {row['path']!r} is labeled twice")
            labels[row["path"]] = class_index[row["label"]]
    return labels


class ImageFolderActiveDataModule(ActiveDataModule):
    """Unlabeled images in a folder, labeled by people round by round (``oracle="human"``).

    Args:
        images: the folder of images to label (any nesting; PNG, JPEG, BMP, GIF, TIFF, WebP).
        classes: the class names, in label order; people label with these names.
        labels: a CSV ``path,label[,round]`` of what is labeled so far (paths relative to ``images``), e.g. a run's
            ``labels.csv`` ledger; missing, empty or ``None`` starts from no labels. They form the run's initial
            labeled set (round 0).
        test_images: an optional labeled test folder in torchvision ``ImageFolder`` layout (one sub-folder per
            class, named exactly as in ``classes``; a sub-folder that is not a class is an error). Without one,
            rounds are recorded with an empty test accuracy.
        image_size: the size images are resized to, ``(height, width)`` or one number for squares.
        channels: 1 (grey-scale) or 3 (RGB).
        mean: per-channel normalisation mean (default 0.5 per channel).
        std: per-channel normalisation standard deviation (default 0.5 per channel).
        batch_size: the training batch size.
        eval_batch_size: the batch size of the test and pool loaders.
        num_workers: worker processes for every loader.
        seed: seeds the training order; ``None`` follows ``seed_everything``.

    Raises:
        ValueError: for fewer than two classes, a channel count other than 1 or 3, or normalisation values of
            the wrong length.
    """

    def __init__(
        self,
        images: str,
        classes: list[str],
        labels: str | None = None,
        test_images: str | None = None,
        image_size: int | tuple[int, int] = 32,
        channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        batch_size: int = 10,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        if len(classes) < 2:
            raise ValueError(f"classes must name at least two classes, got {classes!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        mean = [0.5] * channels if mean is None else mean
        std = [0.5] * channels if std is None else std
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values each, got {mean!r} and {std!r}")
        super().__init__(initial_labels=0, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed, oracle="human", classes=list(classes))
        self.images = images
        self.labels_file = labels
        self.test_images = test_images
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.in_channels = channels
        steps: list = [transforms.Resize(self.image_size)]
        if channels == 1:
            steps.append(transforms.Grayscale(num_output_channels=1))
        self.transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
        self.paths: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        """Scan the folder (once), build the test set, and on a fresh split apply the ``labels`` file."""
        if self.train_dataset is None:
            self.paths = find_images(self.images)
            self.train_dataset = UnlabeledImages(self.images, self.paths, self.transform)
            if self.test_images is not None:
                self.test_dataset = self._test_folder()
        fresh = self.labeled_round is None
        super().setup(stage)
        if fresh and self.labels_file is not None and Path(self.labels_file).is_file():
            given = read_labels_csv(self.labels_file, self.paths, self.class_names)
            if given:
                position = {path: i for i, path in enumerate(self.paths)}
                indices = torch.tensor([position[path] for path in given])
                self.label(indices, torch.tensor(list(given.values())), round=0)

    def item_names(self, indices: torch.Tensor) -> list[str]:
        """The images' paths, relative to ``images``."""
        return [self.paths[int(i)] for i in indices]

    def image_path(self, index: int) -> Path:
        """Where item ``index``'s image file is."""
        return Path(self.images) / self.paths[index]

    def _test_folder(self) -> datasets.ImageFolder:
        assert self.test_images is not None
        folder_classes, _ = datasets.folder.find_classes(self.test_images)
        unknown = sorted(set(folder_classes) - set(self.class_names))
        if unknown:
            raise ValueError(f"test_images: sub-folder(s) {unknown} of {self.test_images} are not among the classes "
                             f"{self.class_names}")
        # ImageFolder numbers its sub-folders alphabetically; map them to the position in `classes` by name.
        to_class = {i: self.class_names.index(name) for i, name in enumerate(folder_classes)}
        return datasets.ImageFolder(self.test_images, transform=self.transform, target_transform=to_class.__getitem__)

    def test_dataloader(self):  # noqa: ANN201 - a DataLoader, or None without a test folder
        """The labeled test folder in order; ``None`` without ``test_images`` (rounds then record no accuracy)."""
        return super().test_dataloader() if self.test_dataset is not None else None
