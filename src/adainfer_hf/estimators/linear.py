"""Linear estimators on the raw features: `StandardScaler` steps folded into the weights.

`w . (x - mean) / scale + b == (w / scale) . x + (b - (w / scale) . mean)`, so a scaled linear model is one weight
vector and bias, which `ExitClassifier` evaluates as one matmul on the features' device.
"""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import StandardScaler

__all__ = ["fold_scaler", "fold_standard_scalers"]


def fold_standard_scalers(steps, coef, intercept) -> tuple[np.ndarray, np.ndarray] | None:
    """`(coef, intercept)` of a linear model preceded by `steps`, rewritten to act on the raw features.

    Args:
        steps (`Sequence`): the pipeline steps before the linear model: `StandardScaler`s, `None` or
            `"passthrough"`.
        coef (array-like `[..., F]`), intercept (array-like): the linear model's fitted weights and bias.

    Returns:
        float64 `(coef, intercept)` of the same shapes, or `None` when a step is not a `StandardScaler`.
    """
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64)
    for step in reversed(list(steps)):
        if step is None or (isinstance(step, str) and step == "passthrough"):
            continue
        if type(step) is not StandardScaler:
            return None
        if step.with_std and step.scale_ is not None:
            coef = coef / step.scale_
        if step.with_mean and step.mean_ is not None:
            intercept = intercept - coef @ step.mean_
    return coef, intercept


def fold_scaler(pipeline, linear_cls):
    """Rewrites a fitted `Pipeline(StandardScaler, linear model)` as one `linear_cls` on the raw features.

    The artifact is then a plain linear model (`coef_`, `intercept_`) that `ExitClassifier` evaluates as one matmul
    on the features' device (see [`fold_standard_scalers`]).
    """
    *pre, model = [step for _, step in pipeline.steps]
    folded_weights = fold_standard_scalers(pre, model.coef_, model.intercept_)
    if folded_weights is None:
        raise ValueError(f"fold_scaler expects StandardScaler steps before the model; got {pipeline!r}.")
    coef, intercept = folded_weights
    folded = linear_cls(**model.get_params())
    folded.coef_ = coef
    folded.intercept_ = intercept
    folded.classes_ = model.classes_
    folded.n_features_in_ = coef.shape[1]
    return folded
