"""Small learnable image data sets that the tests make (no downloads)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class SyntheticImages(Dataset):
    """``num_items`` 1xSxS images whose class shifts the mean of one image quadrant: learnable in a few epochs.

    Like torchvision's data sets it exposes ``targets``, which the ActiveDataModule reads as the oracle.
    """

    def __init__(self, num_items: int, num_classes: int = 4, size: int = 8, channels: int = 1, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.targets = torch.arange(num_items) % num_classes
        self.images = torch.randn(num_items, channels, size, size, generator=generator) * 0.5
        half = size // 2
        for label in range(num_classes):
            rows, cols = divmod(label % 4, 2)
            chosen = self.targets == label
            self.images[chosen, :, rows * half : (rows + 1) * half, cols * half : (cols + 1) * half] += 1.5

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]


def fashion_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``i`` is a constant ``7 * i % 256`` grey; label ``i % 10``."""
    values = (7 * np.arange(count)) % 256
    images = np.broadcast_to(values[:, None, None], (count, 28, 28)).astype(np.uint8)
    return images, (np.arange(count) % 10).astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: magic (0, 0, uint8 type 0x08, number of dimensions), big-endian sizes, then the data."""
    return struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion(folder: Path, compressed: bool, train_count: int = 30, test_count: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    train, test = fashion_images(train_count), fashion_images(test_count)
    arrays = dict(zip(FASHION_FILES, (train[0], train[1], test[0], test[1]), strict=True))
    for name, array in arrays.items():
        if compressed:
            with gzip.open(folder / f"{name}.gz", "wb") as handle:
                handle.write(idx_bytes(array))
        else:
            (folder / name).write_bytes(idx_bytes(array))


class TinyMLP(torch.nn.Module):
    """A user's own classifier, for the `class_path` backbone test: flatten, one hidden layer, logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
