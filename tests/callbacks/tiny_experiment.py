"""The small experiment the callback tests run: 160 learnable 8x8 images of 4 classes, 8 initial labels."""

from __future__ import annotations

import lightning.pytorch as pl

from saal_lightning import ActiveClassifier, ActiveDataModule
from tests.synthetic_data import SyntheticImages

# A trainer that writes nothing of its own and shows nothing.
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def tiny_datamodule(**kwargs) -> ActiveDataModule:
    defaults = dict(train_dataset=SyntheticImages(160, seed=0), test_dataset=SyntheticImages(64, seed=1),
                    initial_labels=8, batch_size=8, eval_batch_size=32, seed=0)
    return ActiveDataModule(**(defaults | kwargs))


def tiny_classifier(lr: float = 1e-2) -> ActiveClassifier:
    """The same initial weights every call."""
    pl.seed_everything(0, verbose=False)
    return ActiveClassifier("small_cnn", num_classes=4, in_channels=1, optimizer="adam", lr=lr)
