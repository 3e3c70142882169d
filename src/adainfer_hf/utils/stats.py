"""Exact binomial statistics for the finite-sample guarantees of calibration and schedule choice."""

from __future__ import annotations

from scipy.stats import beta, binom

__all__ = ["binomial_tail", "binomial_upper_bound"]


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k): the p-value of k errors in n trials under H0 "error rate >= p"."""
    return float(binom.cdf(k, n, p))


def binomial_upper_bound(errors: int, n: int, delta: float) -> float:
    """Exact (Clopper-Pearson) one-sided upper bound on an error rate: P(rate > bound) <= delta."""
    if n == 0 or errors >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, errors + 1, n - errors))
