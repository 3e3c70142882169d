"""scikit-learn-compatible exit estimators: the paper's gap rule and the always-exit rule (`rules`), the
layer-sequence CRF (`crf`), and linear models with their scaler folded in (`linear`)."""

from .crf import CRFExitEstimator
from .linear import fold_scaler, fold_standard_scalers
from .rules import AlwaysExit, GapThresholdRule

__all__ = ["AlwaysExit", "CRFExitEstimator", "GapThresholdRule", "fold_scaler", "fold_standard_scalers"]
