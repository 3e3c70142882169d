"""Parts of `ExitClassifier` that need no classifier: the read-only view of its config fields, the normal form of
a config, the checks of an estimator against the features it reads, and whether it can ever say no."""

from __future__ import annotations

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from ..artifact.config import POLICY_FIELDS, ExitClassifierConfig
from ..estimators.rules import GapThresholdRule
from .features import FEATURES

__all__ = ["ConfigField", "check_estimator", "fires_on_every_row", "normalized"]

NONNEGATIVE_FEATURES = ("gap", "top_prob")  # probabilities and their differences: never below 0


class ConfigField:
    """A read-only view of one field of an `ExitClassifier`'s config (a change goes through `replace`)."""

    def __init__(self, name: str):
        self.name = name
        self.__doc__ = f"`ExitClassifierConfig.{name}` of this classifier (read-only; see `replace`)."

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj._config, self.name)

    def __set__(self, obj, value):
        raise AttributeError(
            f"{type(obj).__name__}.{self.name} is read-only (the config is the one source of truth); "
            f"use `clf = clf.replace({self.name}=...)`, which validates the change."
        )


def normalized(config: ExitClassifierConfig) -> ExitClassifierConfig:
    """The policy fields of `config` in the types the classifier exposes (tuples), save-time fields reset."""
    values = {name: getattr(config, name) for name in POLICY_FIELDS}
    features = values["features"]
    values["features"] = (features,) if isinstance(features, str) else tuple(features)
    for name in ("check_layers", "decode_check_layers", "check_vocabulary"):
        values[name] = None if values[name] is None else tuple(values[name])
    return ExitClassifierConfig(**values)


def check_estimator(est, features) -> None:
    """Raises `ValueError` when `est` is not a fitted binary scikit-learn classifier of the `features` columns."""
    if not hasattr(est, "predict"):
        raise ValueError(f"estimator must be a scikit-learn classifier with `predict`; got {type(est).__name__}.")
    try:
        check_is_fitted(est)
    except NotFittedError as err:
        raise ValueError(f"estimator {type(est).__name__} is not fitted; call `fit` before wrapping it.") from err
    except TypeError as err:
        raise ValueError(f"estimator {est!r} is not a scikit-learn estimator: {err}") from err

    if not features or not all(isinstance(f, str) for f in features):
        raise ValueError(f"features must be a non-empty sequence of names; got {features!r}.")
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ValueError(f"Unknown feature(s) {unknown}; expected names from {sorted(FEATURES)}.")
    if len(set(features)) != len(features):
        raise ValueError(f"features contains duplicates: {list(features)}.")
    n_in = getattr(est, "n_features_in_", None)
    if n_in is not None and int(n_in) != len(features):
        raise ValueError(f"estimator {type(est).__name__} was fitted on n_features_in_={n_in} columns but "
                         f"features={list(features)} names {len(features)}.")
    classes = getattr(est, "classes_", None)
    if classes is not None and (len(classes) != 2 or classes[1] != 1):
        labels = np.asarray(classes).tolist()
        raise ValueError(f"estimator must be binary with classes [0, 1] (1 = exit); got classes_={labels!r}: "
                         "labels must be 0/1 or bool.")


def fires_on_every_row(estimator, features, threshold) -> bool:
    """Whether a classifier fires on every row with finite features: a `GapThresholdRule` on a feature that is never
    below 0 whose cut is below 0 (`x - t > 0` with `threshold` None, else `x - t >= threshold`)."""
    if not isinstance(estimator, GapThresholdRule) or features[estimator.feature_index] not in NONNEGATIVE_FEATURES:
        return False
    cut = float(estimator.threshold) + (0.0 if threshold is None else float(threshold))
    return cut < 0 if threshold is None else cut <= 0
