"""scikit-learn-compatible exit estimators: the paper's gap rule (`rules`), the layer-sequence CRF (`crf`), and
linear models with their scaler folded in (`linear`)."""

from .crf import CRFExitEstimator
from .linear import fold_scaler, fold_standard_scalers
from .rules import GapThresholdRule

__all__ = ["CRFExitEstimator", "GapThresholdRule", "fold_scaler", "fold_standard_scalers"]
