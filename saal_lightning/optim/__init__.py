from saal_lightning.optim.sam import SAM

__all__ = ["SAM"]
