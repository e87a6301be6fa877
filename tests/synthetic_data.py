"""Small learnable image data sets that the tests make (no downloads)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


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
