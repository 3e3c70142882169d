"""Exit scores computed on the features' device, so the decoder loop neither copies features to the host nor calls
scikit-learn: a linear margin (one matmul) or an RBF-kernel SVM's decision function (one distance matrix against
the support vectors).

Each scorer is built from a fitted estimator only when it reproduces the estimator's own `decision_function` (and
its `predict`) on fixed probe inputs, in float64; anything else keeps the scikit-learn path.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from ..artifact.codec import _linear_form, _probe

__all__ = ["DeviceScorer", "device_scorer"]


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


def device_scorer(est, score_kind: str) -> DeviceScorer | None:
    """The device scorer of a fitted estimator (linear, or an RBF `SVC` behind `StandardScaler` steps), or None.

    A probability-kind linear model scores its margin (the caller compares it with the threshold's logit).
    """
    if score_kind == "label":
        return None
    linear = _linear_form(est)
    if linear is not None:
        return DeviceScorer("linear", {"coef": linear[0]}, linear[1])
    scorer = _rbf_scorer(est) if score_kind == "decision" else None
    if scorer is None:
        return None
    try:
        X = _probe(est)
        reference = np.asarray(est.decision_function(X), dtype=np.float64).reshape(-1)
        fires = np.asarray(est.predict(X)).reshape(-1) == 1
    except Exception:  # an estimator we cannot probe simply takes the scikit-learn path
        return None
    ours = scorer.margin(torch.from_numpy(X)).numpy()
    if not np.allclose(ours, reference, rtol=1e-9, atol=1e-9) or not np.array_equal(ours > 0, fires):
        return None
    return scorer
