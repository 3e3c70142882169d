"""Rule-based exit estimators with the scikit-learn estimator API.

The AdaInfer paper's simplest stopping signal is a fixed rule on one feature ("exit once `gap > 0.8`"). Wrapping
it as a scikit-learn classifier lets the rule travel through exactly the same code as a trained SVM: the
[`~adainfer_hf.ExitClassifier`] artifact, calibration, evaluation and the on-device decision.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_array, check_is_fitted

__all__ = ["AlwaysExit", "GapThresholdRule"]


class GapThresholdRule(ClassifierMixin, BaseEstimator):
    """Exit when one feature column exceeds a fixed threshold (the paper's `gap > 0.8` rule).

    The rule is linear, `decision_function(X) = X[:, feature_index] - threshold`, and exposes it as `coef_` and
    `intercept_` like scikit-learn's linear models, so [`~adainfer_hf.ExitClassifier`] evaluates it on the GPU
    without a host round trip. `fit` learns nothing: it only records the number of features and the classes.

    Args:
        feature_index (`int`, *optional*, defaults to 0):
            Column of `X` the rule looks at (0 is `"gap"` in the default feature order `("gap", "top_prob")`).
        threshold (`float`, *optional*, defaults to 0.8):
            The rule fires (predicts class `1`, "exit") where `X[:, feature_index] > threshold`.

    Example:

    ```python
    >>> import numpy as np
    >>> from adainfer_hf import GapThresholdRule
    >>> rule = GapThresholdRule(threshold=0.8).fit(np.zeros((1, 2)))
    >>> rule.predict(np.array([[0.9, 0.95], [0.5, 0.7]]))
    array([1, 0])
    ```
    """

    def __init__(self, feature_index: int = 0, threshold: float = 0.8):
        self.feature_index = feature_index
        self.threshold = threshold

    def fit(self, X, y=None):
        """Record the number of features and the classes `[0, 1]`; there is nothing to learn.

        Args:
            X (array-like of shape `(n_samples, n_features)`):
                Feature matrix; only its width is used.
            y (*optional*):
                Ignored; accepted for API compatibility.

        Returns:
            `GapThresholdRule`: the fitted rule (`self`).
        """
        X = check_array(X, ensure_min_samples=0)
        n_features = X.shape[1]
        if isinstance(self.feature_index, bool) or not isinstance(self.feature_index, numbers.Integral):
            raise ValueError(f"feature_index must be an int, got {self.feature_index!r}.")
        if not 0 <= self.feature_index < n_features:
            raise ValueError(
                f"feature_index={self.feature_index} is out of range for X with {n_features} feature(s); "
                f"expected 0 <= feature_index < {n_features}."
            )
        if not isinstance(self.threshold, numbers.Real) or not np.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}.")
        self.n_features_in_ = n_features
        self.classes_ = np.array([0, 1])
        # The rule as a linear model: a one-hot weight on the chosen column and the threshold as bias.
        self.coef_ = np.zeros((1, n_features))
        self.coef_[0, self.feature_index] = 1.0
        self.intercept_ = np.array([-float(self.threshold)])
        return self

    def decision_function(self, X) -> np.ndarray:
        """Signed margin `X[:, feature_index] - threshold`; positive means "exit".

        Args:
            X (array-like of shape `(n_samples, n_features)`):
                Feature matrix with the same columns as at `fit` time.

        Returns:
            `np.ndarray` of shape `(n_samples,)`.
        """
        check_is_fitted(self)
        X = check_array(X, ensure_min_samples=0)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but GapThresholdRule is expecting {self.n_features_in_} features "
                "as input (scikit-learn's wording)."
            )
        return X[:, self.feature_index] - float(self.threshold)

    def predict(self, X) -> np.ndarray:
        """Predict `1` ("exit") where the feature exceeds the threshold, else `0`.

        Args:
            X (array-like of shape `(n_samples, n_features)`):
                Feature matrix with the same columns as at `fit` time.

        Returns:
            `np.ndarray` of shape `(n_samples,)` with values in `{0, 1}`.
        """
        return (self.decision_function(X) > 0).astype(int)


class AlwaysExit(ClassifierMixin, BaseEstimator):
    """Exit at every check: the exit rule of `method="gate_only"`, where the gate in front of the checks decides.

    Behind a [`~adainfer_hf.policy.gate.LinearGate`] a check then exits exactly where the gate passes, so the loop
    computes no logit lens there (`ExitClassifier.exits_where_gate_passes`, recognised by this type). Like
    [`GapThresholdRule`] it is linear, with the constant margin `decision_function(X) = 1`, exposed as `coef_`
    (zeros) and `intercept_` (`[1.0]`) derived from `n_features_in_`, so it runs on the features' device and the
    saved artifact holds nothing a crafted file could turn into another rule. `fit` learns nothing: it records the
    number of features and the classes `[0, 1]`.

    Example:

    ```python
    >>> import numpy as np
    >>> from adainfer_hf.estimators.rules import AlwaysExit
    >>> AlwaysExit().fit(np.zeros((1, 2))).predict(np.array([[0.0, 0.1], [0.9, 0.95]]))
    array([1, 1])
    ```
    """

    MARGIN = 1.0  # the constant decision function: positive, so `predict` (margin > 0) is 1 everywhere

    def fit(self, X, y=None):
        """Record the number of features and the classes `[0, 1]`; there is nothing to learn.

        Args:
            X (array-like of shape `(n_samples, n_features)`): feature matrix; only its width is used.
            y (*optional*): ignored; accepted for API compatibility.

        Returns:
            `AlwaysExit`: the fitted rule (`self`).
        """
        X = check_array(X, ensure_min_samples=0)
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        return self

    @property
    def coef_(self) -> np.ndarray:
        """Zeros of shape `(1, n_features_in_)`: the rule reads no feature."""
        return np.zeros((1, self.n_features_in_))

    @property
    def intercept_(self) -> np.ndarray:
        """`[MARGIN]`: the constant margin."""
        return np.array([self.MARGIN])

    def decision_function(self, X) -> np.ndarray:
        """The constant margin `1.0` for every row of `X` (shape `(n_samples,)`); positive means "exit"."""
        check_is_fitted(self)
        X = check_array(X, ensure_min_samples=0)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but AlwaysExit is expecting {self.n_features_in_} "
                             "features as input (scikit-learn's wording).")
        return np.full(X.shape[0], self.MARGIN)

    def predict(self, X) -> np.ndarray:
        """`1` ("exit") for every row of `X` (shape `(n_samples,)`)."""
        return (self.decision_function(X) > 0).astype(int)
