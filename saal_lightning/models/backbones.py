"""Named classifier backbones for small images (28 or 32 px, 1 or 3 channels).

``resnet18`` is the CIFAR-style ResNet-18 the SAAL authors use (3x3 stem, no max-pool), with an adaptive
average pool so that 28 px Fashion-MNIST works as well as 32 px CIFAR. ``wide_cnn`` (about 420 k parameters)
is the CPU stand-in for it in the ``cpu`` preset of ``scripts/replicate.py``: the widest model whose 31-round
protocol fits two CPU cores in about two hours, chosen for capacity, not for any strategy's result.
``small_cnn`` (about 40 k parameters) is for the quickstart and tests. Every backbone's last module is the
``nn.Linear`` classifier head: strategies that need penultimate features (coreset, BADGE) read the input of the
last ``nn.Linear`` that runs.

Example::

    >>> model = build_backbone("small_cnn", num_classes=10, in_channels=1)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallImageResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem without max-pool, four stages, global average pool, linear head."""

    def __init__(self, num_blocks: tuple[int, ...], num_classes: int, in_channels: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        in_planes = width
        for stage, blocks in enumerate(num_blocks):
            planes = width * 2**stage
            strides = [1 if stage == 0 else 2] + [1] * (blocks - 1)
            layers = []
            for stride in strides:
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 3x3 convolution (no bias: BatchNorm follows), BatchNorm and ReLU, as a flat list of modules, so that the
    ``features`` of the CNNs below keep their flat, index-named layout (``features.0.weight``, ...)."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU()]


class SmallCNN(nn.Module):
    """Two conv+BN blocks and two linear layers: a fast model for CPU runs and tests."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, width), nn.MaxPool2d(2),
            *conv_bn_relu(width, 2 * width), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(2 * width * 16, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.hidden(self.features(x))))


class WideCNN(nn.Module):
    """Two conv+BN+max-pool blocks and a wide hidden layer; ``width=32`` is about 420 k parameters.

    conv ``width`` -> BN -> ReLU -> max-pool, conv ``2 * width`` -> BN -> ReLU -> max-pool, linear
    ``2 * width * (size / 4)^2`` -> ``hidden`` -> classes. The flattened size depends on the image size, so the
    first linear layer is built for ``image_size`` (28: Fashion-MNIST; 32: SVHN, CIFAR).
    """

    def __init__(
        self, num_classes: int, in_channels: int, width: int = 32, hidden: int = 128, image_size: int = 28
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, width), nn.MaxPool2d(2),
            *conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(2 * width * (image_size // 4) ** 2, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.hidden(self.features(x))))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> SmallImageResNet:
    """CIFAR-style ResNet-18 (11.2 M parameters for 3-channel input and 10 classes)."""
    return SmallImageResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


def small_cnn(num_classes: int = 10, in_channels: int = 3) -> SmallCNN:
    """Two-block CNN, about 40 k parameters."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels)


def wide_cnn(num_classes: int = 10, in_channels: int = 3) -> WideCNN:
    """The ``cpu`` preset's model for 28 px images: two conv blocks (32, 64 channels), 128 hidden, about 420 k
    parameters. For 32 px images or other widths use ``class_path: saal_lightning.models.backbones.WideCNN``."""
    return WideCNN(num_classes=num_classes, in_channels=in_channels)


BACKBONES: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "small_cnn": small_cnn, "wide_cnn": wide_cnn}


def build_backbone(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build a named backbone; raises ``ValueError`` listing the known names for an unknown one."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; known backbones: {sorted(BACKBONES)} (or pass an nn.Module)")
    return BACKBONES[name](num_classes=num_classes, in_channels=in_channels)
