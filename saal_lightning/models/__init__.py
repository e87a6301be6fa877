from saal_lightning.models.backbones import BACKBONES, build_backbone
from saal_lightning.models.classifier import ActiveClassifier

__all__ = ["BACKBONES", "ActiveClassifier", "build_backbone"]
