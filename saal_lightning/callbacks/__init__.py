from saal_lightning.callbacks.acquisition_callback import AcquisitionCallback

__all__ = ["AcquisitionCallback"]
