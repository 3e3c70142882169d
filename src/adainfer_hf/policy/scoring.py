"""How an exit estimator is scored: what its score is (`score_kind`), and the scores computed on the features'
device, so the decoder loop neither copies features to the host nor calls scikit-learn: a linear margin (one
matmul; `linear_form` rewrites linear models and their `StandardScaler` pipelines as one weight vector and bias) or
an RBF-kernel SVM's decision function (one distance matrix against the support vectors).

Each scorer is built from a fitted estimator only when it reproduces the estimator's own `decision_function` (and
its `predict`) on the fixed probe rows (`artifact.validation.probe_rows`), in float64 (`reproduces`, the one probe);
anything else keeps the scikit-learn path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from ..artifact.validation import probe_rows
from ..estimators.linear import fold_standard_scalers

__all__ = ["DeviceScorer", "device_scorer", "linear_form", "logit", "reproduces", "score_kind"]


def score_kind(est) -> str:
    """What `ExitClassifier.score` returns for `est`: `"probability"` (logistic regression, or estimators with
    `predict_proba` and no decision function), `"decision"` (the signed margin) or `"label"` (the 0/1 prediction)."""
    final = est.steps[-1][1] if hasattr(est, "steps") else est
    # Logistic regression is trained to be calibrated, so its threshold is a probability; other margins are not.
    if isinstance(final, LogisticRegression) and hasattr(est, "predict_proba"):
        return "probability"
    if hasattr(est, "decision_function"):
        return "decision"
    if hasattr(est, "predict_proba"):
        return "probability"
    return "label"


def logit(p: float) -> float:
    """`log(p / (1 - p))`, the margin a probability threshold `p` cuts at; `p = 1` maps to the margin where float64
    `expit` (scikit-learn's) first rounds to 1."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.nextafter(53 * math.log(2.0), math.inf)
    return math.log(p) - math.log1p(-p)


def reproduces(est, margin: Callable[[np.ndarray], np.ndarray]) -> bool:
    """Whether `margin` (float64 rows -> float64 scores) equals `est.decision_function` on [`probe_rows`] of its
    width (rtol = atol = 1e-9) and its sign equals `est.predict == 1`: the one check a rewritten scorer passes
    before it replaces scikit-learn. An estimator that cannot be probed is not reproduced."""
    try:
        X = probe_rows(int(est.n_features_in_))
        reference = np.asarray(est.decision_function(X), dtype=np.float64).reshape(-1)
        fires = np.asarray(est.predict(X)).reshape(-1) == 1
        ours = np.asarray(margin(X), dtype=np.float64).reshape(-1)
    except Exception:  # an estimator we cannot probe simply takes the scikit-learn path
        return False
    return ours.shape == reference.shape and bool(
        np.allclose(ours, reference, rtol=1e-9, atol=1e-9) and np.array_equal(ours > 0, fires))


def linear_form(est) -> tuple[np.ndarray, float] | None:
    """`(w, b)` with `decision_function(X) == X @ w + b`, folding `StandardScaler` steps of a pipeline into `w`
    and `b`; `None` when the estimator is not of that form (checked by [`reproduces`], not trusted from `coef_`)."""
    steps = [step for _, step in est.steps] if type(est) is Pipeline else [est]
    *pre, final = steps
    try:
        coef = np.asarray(final.coef_, dtype=np.float64)
        intercept = np.asarray(final.intercept_, dtype=np.float64).reshape(-1)
    except (AttributeError, TypeError, ValueError):  # e.g. SVC(kernel="rbf").coef_ raises AttributeError
        return None
    if coef.ndim == 2 and coef.shape[0] == 1:
        coef = coef[0]
    if coef.ndim != 1 or intercept.shape != (1,) or not hasattr(est, "decision_function"):
        return None
    folded = fold_standard_scalers(pre, coef, intercept)
    if folded is None:
        return None
    coef, bias = folded[0], float(folded[1][0])
    return (coef, bias) if reproduces(est, lambda X: X @ coef + bias) else None


class DeviceScorer:
    """`margin(features)`: the estimator's decision function on `features` `[n_rows, F]`, on their device.

    Linear: `x @ coef + intercept`. RBF: `z = x * a + c` (the pipeline's `StandardScaler` steps), then
    `exp(-gamma * |z - s|^2) @ dual + intercept` over the support vectors `s` (their squared norms precomputed).
    The arrays are copied once per device, in float64 (float32 on MPS, which has no float64).
    """

    def __init__(self, kind: str, arrays: dict, intercept: float, gamma: float | None = None):
        self.kind, self.arrays, self.intercept, self.gamma = kind, arrays, float(intercept), gamma
        self._on_device: dict = {}

    def _tensors(self, device: torch.device) -> dict:
        key = (device.type, device.index)
        if key not in self._on_device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._on_device[key] = {name: torch.tensor(np.asarray(a), dtype=dtype, device=device)
                                    for name, a in self.arrays.items()}
        return self._on_device[key]

    def margin(self, features: torch.Tensor) -> torch.Tensor:
        t = self._tensors(features.device)
        x = features.to(next(iter(t.values())).dtype)
        if self.kind == "linear":
            return x @ t["coef"] + self.intercept
        z = x * t["a"] + t["c"]
        sq = ((z * z).sum(1, keepdim=True) - 2.0 * (z @ t["support"].T) + t["support_sq"]).clamp_min(0.0)
        return torch.exp(-self.gamma * sq) @ t["dual"] + self.intercept


def _affine_of_scalers(steps, n_features: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`(a, c)` with `steps(x) == x * a + c` for `StandardScaler` / passthrough steps; None for any other step."""
    a, c = np.ones(n_features), np.zeros(n_features)
    for step in steps:
        if step is None or (isinstance(step, str) and step == "passthrough"):
            continue
        if type(step) is not StandardScaler:
            return None
        if step.with_mean and step.mean_ is not None:
            c = c - step.mean_
        if step.with_std and step.scale_ is not None:
            a, c = a / step.scale_, c / step.scale_
    return a, c


def _rbf_scorer(est) -> DeviceScorer | None:
    steps = [step for _, step in est.steps] if type(est) is Pipeline else [est]
    *pre, svc = steps
    if type(svc) is not SVC or svc.kernel != "rbf" or len(getattr(svc, "classes_", ())) != 2:
        return None
    gamma = getattr(svc, "_gamma", None)  # the fitted value ('scale' / 'auto' resolved): libsvm's input
    if getattr(svc, "_sparse", True) or not isinstance(gamma, (int, float, np.floating)):
        return None
    affine = _affine_of_scalers(pre, int(svc.n_features_in_))
    if affine is None:
        return None
    support = np.asarray(svc.support_vectors_, dtype=np.float64)
    arrays = {"a": affine[0], "c": affine[1], "support": support, "support_sq": (support * support).sum(1),
              "dual": np.asarray(svc.dual_coef_, dtype=np.float64).reshape(-1)}
    return DeviceScorer("rbf", arrays, float(np.asarray(svc.intercept_).reshape(-1)[0]), float(gamma))


def device_scorer(est, kind: str) -> DeviceScorer | None:
    """The device scorer of a fitted estimator (linear, or an RBF `SVC` behind `StandardScaler` steps), or None.

    A probability-kind linear model scores its margin (the caller compares it with the threshold's logit).
    """
    if kind == "label":
        return None
    linear = linear_form(est)
    if linear is not None:
        return DeviceScorer("linear", {"coef": linear[0]}, linear[1])
    scorer = _rbf_scorer(est) if kind == "decision" else None
    if scorer is None or not reproduces(est, lambda X: scorer.margin(torch.from_numpy(X)).numpy()):
        return None
    return scorer
