"""Fitting one exit classifier on a [`~adainfer_hf.training.table.FeatureTable`] (`train_exit_classifier`): the
estimators of `train.py`'s table of methods, before calibration and scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from ..estimators.crf import CRFExitEstimator
from ..estimators.linear import fold_scaler
from ..estimators.rules import AlwaysExit, GapThresholdRule
from ..policy.classifier import ExitClassifier
from .config import TRAIN_METHODS
from .table import LABEL_KINDS, FeatureTable, table_sequences

__all__ = ["train_exit_classifier"]


def _stratified_rows(y: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Row indices: all rows, or a class-stratified random subset of `max_rows`."""
    n = y.shape[0]
    if n <= max_rows:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        k = max(1, round(max_rows * idx.size / n))  # keep every class, even a rare one
        picked.append(rng.choice(idx, size=min(k, idx.size), replace=False))
    return np.sort(np.concatenate(picked))


def train_exit_classifier(
    table: FeatureTable,
    method: str = "svm",
    features: Sequence[str] = ("gap", "top_prob"),
    label: str = "final",
    class_weight: str | dict | None = "balanced",
    max_rows: int = 20000,
    seed: int = 0,
) -> ExitClassifier:
    """Trains an exit classifier on a feature table.

    Args:
        table ([`~adainfer_hf.collect.FeatureTable`]): training rows (one per prompt and layer).
        method (`str`, *optional*, defaults to `"svm"`): one of `TRAIN_METHODS` (see the module docstring).
        features (`Sequence[str]`, *optional*, defaults to `("gap", "top_prob")`): columns the classifier reads.
        label (`str`, *optional*, defaults to `"final"`): `"final"` (agree with the dense model) or `"gold"`.
        class_weight (`str`, `dict` or `None`, *optional*, defaults to `"balanced"`): early layers are mostly
            label 0, so classes are reweighted (ignored by `"crf"`, `"gap_rule"` and `"gate_only"`).
        max_rows (`int`, *optional*, defaults to 20000): cap on training rows, drawn stratified by class (for
            `"crf"`: whole prompts, `max_rows // (L-1)` of them).
        seed (`int`, *optional*, defaults to 0): seed of the subsample and of the estimators.

    Returns:
        [`~adainfer_hf.classifier.ExitClassifier`]: `threshold=None`, `min_layer=1`; call
        `calibrate.calibrate` to choose both, then `bind(model)`.
    """
    if method not in TRAIN_METHODS:
        raise ValueError(f"method={method!r} is not supported; expected one of {list(TRAIN_METHODS)}.")
    if label not in LABEL_KINDS:
        raise ValueError(f"label={label!r} is not supported; expected one of {list(LABEL_KINDS)}.")
    if not isinstance(max_rows, int) or max_rows < 2:
        raise ValueError(f"max_rows must be an int >= 2; got {max_rows!r}.")
    features = (features,) if isinstance(features, str) else tuple(features)
    X_all, y_all = table.columns(features).astype(np.float64), table.labels(label)
    info = {
        "method": method,
        "label": label,
        "rows": int(len(table)),
        "prompts": table.num_prompts,
        "positive_rate": float(y_all.mean()) if y_all.size else 0.0,
    }
    if method in ("gap_rule", "gate_only"):
        if "gap" not in features:
            raise ValueError(f"method={method!r} reads the 'gap' feature; features={list(features)} lack it.")
        if method == "gap_rule":
            estimator = GapThresholdRule(feature_index=features.index("gap"), threshold=0.8).fit(X_all[:1])
        else:  # gate_only: always true, the gate decides
            estimator = AlwaysExit().fit(X_all[:1])
    elif method == "crf":
        estimator, info["rows_used"] = _fit_crf(table, features, label, max_rows, seed)
    else:
        rows = _stratified_rows(y_all, max_rows, seed)
        estimator = _fit_row_model(method, X_all[rows], y_all[rows], label, class_weight, seed)
        info["rows_used"] = int(rows.size)
    # A table collected with a half-precision check head trains a classifier that checks the same way.
    return ExitClassifier(estimator, features=features, label=label, calibration={"training": info},
                          check_dtype=table.meta.get("check_dtype"),
                          check_vocabulary=table.meta.get("check_vocabulary"))


def _fit_crf(table: FeatureTable, features, label: str, max_rows: int, seed: int):
    """A [`CRFExitEstimator`] on whole prompts (at most `max_rows // (L-1)` of them) and the rows it used."""
    seqs, labs = table_sequences(table, features, label)
    L = int(table.num_layers.max()) if table.num_prompts else 2
    n_prompts = max(1, max_rows // max(1, L - 1))
    if len(seqs) > n_prompts:
        keep = np.sort(np.random.default_rng(seed).choice(len(seqs), size=n_prompts, replace=False))
        seqs, labs = [seqs[i] for i in keep], [labs[i] for i in keep]
    estimator = CRFExitEstimator(feature_names=list(features)).fit(seqs, labs)
    return estimator, int(sum(len(s) for s in seqs))


def _fit_row_model(method: str, X: np.ndarray, y: np.ndarray, label: str, class_weight, seed: int):
    """A row-wise estimator (`"svm"`, `"linear_svm"` or `"logistic"`), linear ones with the scaler folded in."""
    counts = np.bincount(y, minlength=2)
    if counts.min() == 0:
        raise ValueError(
            f"label={label!r} has a single class in the training rows (counts [no-exit, exit] = "
            f"{counts.tolist()}); collect more or more varied prompts, or use method='gap_rule'."
        )
    if method == "svm":
        return make_pipeline(
            StandardScaler(),
            SVC(kernel="rbf", class_weight=class_weight, cache_size=500, random_state=seed),
        ).fit(X, y)
    if method == "linear_svm":
        pipe = make_pipeline(
            StandardScaler(), LinearSVC(class_weight=class_weight, max_iter=20000, random_state=seed)
        ).fit(X, y)
        return fold_scaler(pipe, LinearSVC)
    pipe = make_pipeline(  # logistic
        StandardScaler(),
        LogisticRegression(class_weight=class_weight, max_iter=2000, random_state=seed),
    ).fit(X, y)
    return fold_scaler(pipe, LogisticRegression)
