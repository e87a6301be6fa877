from saal_lightning.callbacks.acquisition_callback import AcquisitionCallback
from saal_lightning.callbacks.loss_prediction_training import LossPredictionTraining
from saal_lightning.callbacks.sharpness_diagnostics import SharpnessDiagnostics
from saal_lightning.callbacks.strategy_training import StrategyTraining
from saal_lightning.callbacks.vaal_training import VAALTraining

__all__ = ["AcquisitionCallback", "LossPredictionTraining", "SharpnessDiagnostics", "StrategyTraining",
           "VAALTraining"]
