"""Finite-sample statistics for the guarantees of calibration and schedule choice.

Exact binomial tests for 0/1 losses (one unit per prompt); the Hoeffding-Bentkus bound (Bates et al., 2021,
"Distribution-free, risk-controlling prediction sets", eq. 10-11) for losses in [0, 1] (one unit per generated
sequence, its loss the share of its tokens that disagree).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta, binom

__all__ = ["binomial_tail", "binomial_upper_bound", "hb_p_value", "hb_upper_bound", "risk_p_value",
           "risk_upper_bound"]


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k): the p-value of k errors in n trials under H0 "error rate >= p"."""
    return float(binom.cdf(k, n, p))


def binomial_upper_bound(errors: int, n: int, delta: float) -> float:
    """Exact (Clopper-Pearson) one-sided upper bound on an error rate: P(rate > bound) <= delta."""
    if n == 0 or errors >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, errors + 1, n - errors))


def _kl_bernoulli(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b)), 0 * log 0 = 0."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hb_p_value(mean_loss: float, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of H0 "risk >= alpha" from the mean of `n` i.i.d. losses in [0, 1]."""
    if n == 0:
        return 1.0
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1); got {alpha!r}.")
    hoeffding = math.exp(-n * _kl_bernoulli(min(mean_loss, alpha), alpha))
    bentkus = math.e * float(binom.cdf(math.ceil(n * mean_loss - 1e-9), n, alpha))
    return min(1.0, hoeffding, bentkus)


def hb_upper_bound(mean_loss: float, n: int, delta: float) -> float:
    """The smallest risk level the Hoeffding-Bentkus test rejects at `delta` (bisection): P(risk > bound) <= delta."""
    if n == 0 or mean_loss >= 1.0:
        return 1.0
    lo, hi = mean_loss, 1.0 - 1e-12
    if hb_p_value(mean_loss, n, hi) > delta:
        return 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if hb_p_value(mean_loss, n, mid) <= delta else (mid, hi)
    return hi


def _group_means(losses: np.ndarray, groups: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return np.bincount(inverse, weights=np.asarray(losses, dtype=np.float64)) / counts


def risk_p_value(losses: np.ndarray, groups: np.ndarray | None, alpha: float) -> float:
    """p-value of H0 "risk >= alpha" for 0/1 `losses` per unit: exact binomial when every unit is its own draw
    (`groups` None), else Hoeffding-Bentkus on the per-group mean losses (groups are the i.i.d. draws)."""
    losses = np.asarray(losses)
    if groups is None:
        return binomial_tail(int(losses.sum()), losses.size, alpha)
    means = _group_means(losses, groups)
    return hb_p_value(float(means.mean()) if means.size else 0.0, means.size, alpha)


def risk_upper_bound(losses: np.ndarray, groups: np.ndarray | None, delta: float) -> float:
    """Upper confidence bound (1 - delta) on the risk of 0/1 `losses`, drawn as in [`risk_p_value`]."""
    losses = np.asarray(losses)
    if groups is None:
        return binomial_upper_bound(int(losses.sum()), losses.size, delta)
    means = _group_means(losses, groups)
    return hb_upper_bound(float(means.mean()) if means.size else 0.0, means.size, delta)
