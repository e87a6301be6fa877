"""Data: the labeled/unlabeled split as a Lightning data module, and the paper's image data sets."""

from saal_lightning.data.active_datamodule import ActiveDataModule, read_targets
from saal_lightning.data.image_folder import ImageFolderActiveDataModule
from saal_lightning.data.vision_datasets import (
    VISION_DATASETS,
    DatasetNotFoundError,
    VisionActiveDataModule,
    VisionDatasetSpec,
)

__all__ = [
    "VISION_DATASETS",
    "ActiveDataModule",
    "DatasetNotFoundError",
    "ImageFolderActiveDataModule",
    "VisionActiveDataModule",
    "VisionDatasetSpec",
    "read_targets",
]
