"""How many calibration draws Learn-then-Test needs before it can certify a target agreement.

A draw is one i.i.d. unit of the calibration set: a prompt (first-token tables, exact binomial test) or a
generation (generation tables, Hoeffding-Bentkus on its share of disagreeing tokens). `calibration.calibrate`
tests each candidate rule at level `delta / m` (Bonferroni over its `m` candidate `min_layer` values, at most
`calibrate.MAX_MIN_LAYERS` by default) and certifies a rule only when its p-value of "risk >= 1 - target" is at or
below that level. With zero disagreements the p-value is `target ** n` under both tests, so no rule can pass with
fewer than `ceil(log(delta / m) / log(target))` draws: below that, calibration returns "never exit" whatever the
model does.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

__all__ = ["calibration_draws_needed"]


def calibration_draws_needed(target: float, delta: float, candidates: int = 1, disagreement: float = 0.0) -> int:
    """The fewest calibration prompts with which a rule that disagrees with the dense model on a share
    `disagreement` of them passes Learn-then-Test's exact binomial test at `target` agreement.

    Args:
        target (`float`): the target agreement, in (0, 1) (`CalibrationConfig.target_agreement`).
        delta (`float`): the allowed failure probability, in (0, 1).
        candidates (`int`, *optional*, defaults to 1): the `min_layer` candidates `delta` is split over.
        disagreement (`float`, *optional*, defaults to 0): the rule's observed share of disagreeing draws, in
            `[0, 1 - target)`; `floor(n * disagreement)` errors in `n` draws.

    Returns:
        `int`: the smallest `n` with `P(Binomial(n, 1 - target) <= floor(n * disagreement)) <= delta / candidates`
        (the test `calibrate` runs, `utils.stats.binomial_tail`). With `disagreement=0` this is
        `ceil(log(delta / candidates) / log(target))`, for generations too.
    """
    for name, value in (("target", target), ("delta", delta)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1); got {value!r}.")
    if not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1; got {candidates!r}.")
    if not isinstance(disagreement, (int, float)) or not 0.0 <= disagreement < 1.0 - target:
        raise ValueError(f"disagreement must lie in [0, 1 - target) = [0, {1.0 - target:g}); got {disagreement!r}.")
    level = delta / candidates
    start = math.ceil(math.log(level) / math.log(target))  # zero errors: target ** n <= level
    if disagreement == 0.0:
        return start
    step = 4096
    while True:  # the first n that passes, scanned in blocks (the tail is not monotone in n: errors are floored)
        n = np.arange(start, start + step)
        passes = binom.cdf(np.floor(n * disagreement), n, 1.0 - target) <= level
        if passes.any():
            return int(n[np.argmax(passes)])
        start, step = start + step, step * 2
