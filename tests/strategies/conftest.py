"""Shared fixtures for the strategy tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run on one intra-op thread: these tensors are tiny, and on a busy shared CPU a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlp() -> nn.Sequential:
    """A seeded 4 -> 8 -> 3 MLP in eval mode: its last module is the nn.Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
