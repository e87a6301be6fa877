"""saal-lightning: Sharpness-Aware Active Learning (Kim et al., ICML 2023) for PyTorch Lightning.

The pieces, each in the file named for it:

* :class:`ActiveDataModule` (``data/active_datamodule.py``): the labeled/unlabeled split and the oracle.
* :class:`ImageFolderActiveDataModule` (``data/image_folder.py``): a folder of unlabeled images, labeled by people
  through the query files of ``labeling/``.
* :class:`ActiveClassifier` (``models/classifier.py``) with :class:`SAM` (``optim/sam.py``): training.
* :class:`AcquisitionCallback` (``callbacks/acquisition_callback.py``): the rounds.
* :func:`saal_scores` (``acquisition/saal_score.py``): the SAAL score, callable without a Trainer.
* ``saal`` (``cli.py``): the LightningCLI front end.
"""

from saal_lightning.__about__ import __version__
from saal_lightning.acquisition.saal_score import saal_scores
from saal_lightning.callbacks.acquisition_callback import AcquisitionCallback
from saal_lightning.data.active_datamodule import ActiveDataModule
from saal_lightning.data.image_folder import ImageFolderActiveDataModule
from saal_lightning.data.vision_datasets import VisionActiveDataModule
from saal_lightning.lightning_noise import quiet_lightning_noise
from saal_lightning.models.classifier import ActiveClassifier
from saal_lightning.optim.sam import SAM

# Lightning's LeafSpec deprecation notice and its cloud advertisements, narrowly (see lightning_noise.py): a
# drop-in user sees the same clean output as the `saal` command.
quiet_lightning_noise()

__all__ = [
    "AcquisitionCallback",
    "ActiveClassifier",
    "ActiveDataModule",
    "ImageFolderActiveDataModule",
    "SAM",
    "VisionActiveDataModule",
    "__version__",
    "saal_scores",
]
