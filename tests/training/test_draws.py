"""The calibration draws Learn-then-Test needs (training/draws.py): against a scan of the exact binomial test, and
against what `calibrate` does with one draw fewer and with exactly that many."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_models import feature_table

from adainfer_hf import ExitClassifier, GapThresholdRule
from adainfer_hf.training.calibrate import calibrate
from adainfer_hf.training.draws import calibration_draws_needed
from adainfer_hf.utils.stats import binomial_tail


@pytest.mark.parametrize(("target", "delta", "candidates", "share"),
                         [(0.9, 0.1, 1, 0.0), (0.9, 0.05, 8, 0.05), (0.95, 0.1, 3, 0.02), (0.99, 0.1, 8, 0.0)])
def test_the_first_n_that_passes_the_binomial_test(target, delta, candidates, share):
    level = delta / candidates
    n = calibration_draws_needed(target, delta, candidates, share)
    passes = lambda m: binomial_tail(math.floor(m * share), m, 1 - target) <= level  # noqa: E731
    assert passes(n) and not any(passes(m) for m in range(1, n))


def test_the_issue_figure_and_the_closed_form():
    assert calibration_draws_needed(0.99, 0.1, 8) == 437 == math.ceil(math.log(0.1 / 8) / math.log(0.99))


def _agreeing_table(P):
    """Every layer's top-1 is the final token and the gap is high: a rule that exits at layer 1 never errs."""
    final = np.arange(P) + 10
    tokens = np.repeat(final[:, None], 3, 1)
    return feature_table(tokens, np.full((P, 3), 0.9), np.full((P, 3), 0.95), final)


def test_calibrate_certifies_from_exactly_that_many_prompts():
    clf = ExitClassifier(GapThresholdRule(threshold=0.5).fit(np.zeros((1, 2))))
    n = calibration_draws_needed(0.9, 0.1, candidates=1)
    short = calibrate(clf, _agreeing_table(n - 1), target_agreement=0.9, delta=0.1, min_layers=(1,))
    enough = calibrate(clf, _agreeing_table(n), target_agreement=0.9, delta=0.1, min_layers=(1,))
    assert short.calibration["never_exit"] and short.calibration["min_prompts_for_target"] == n
    assert not enough.calibration["never_exit"] and enough.calibration["mean_exit_layer"] == 1.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target": 1.0, "delta": 0.1}, "target must lie in"), ({"target": 0.9, "delta": 0.0}, "delta must lie in"),
    ({"target": 0.9, "delta": 0.1, "candidates": 0}, "candidates must be an int"),
    ({"target": 0.9, "delta": 0.1, "disagreement": 0.1}, "disagreement must lie in"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibration_draws_needed(**kwargs)
