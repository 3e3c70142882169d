"""Calibration: the agreement guarantee on synthetic tables, the misleading-features case, simulation == live."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_collect import tiny_pair, tiny_prompts, tiny_tokenizer

from adainfer_hf.estimators.rules import GapThresholdRule
from adainfer_hf.policy.classifier import ExitClassifier
from adainfer_hf.training.calibrate import calibrate, simulate_exits
from adainfer_hf.training.collect import FeatureTable, collect_features
from adainfer_hf.training.train import train_exit_classifier
from adainfer_hf.utils.stats import binomial_tail

L = 9
BLANK = 0


def _table(tokens, gap, top_prob, final, gold=None):
    P, K = tokens.shape
    return FeatureTable(
        X=np.stack([gap.reshape(-1), top_prob.reshape(-1)], 1),
        feature_names=("gap", "top_prob"),
        layer=np.tile(np.arange(1, K + 1), P),
        prompt_id=np.repeat(np.arange(P), K),
        top_token=tokens.reshape(-1),
        task=[f"task{i % 3}" for i in range(P)],
        shots=np.zeros(P),
        example_index=np.arange(P),
        final_token=final,
        gold_token=final if gold is None else gold,
        num_layers=np.full(P, K + 1),
    )


def settling_table(P, seed):
    """Each prompt's top-1 settles on the final token at a random layer; gap jumps there, with noise."""
    rng = np.random.default_rng(seed)
    K = L - 1
    settle = rng.integers(2, L + 1, size=P)  # == L: only the last layer is right
    k = np.arange(1, K + 1)[None]
    right = k >= settle[:, None]
    final = 100 + np.arange(P)
    tokens = np.where(right, final[:, None], 50 + rng.integers(0, 10, (P, K)))
    gap = np.clip(0.25 + 0.5 * right + rng.normal(0, 0.15, (P, K)), 0, 1)
    return _table(tokens, gap, np.clip(gap + 0.05, 0, 1), final)


def misleading_table(P, seed, blank_share=0.2):
    """SmolLM2-like: every checked layer puts a blank on top with high confidence; only the last layer has the
    answer. Prompts whose answer is the blank itself (`blank_share`; many 0-shot prompts) are right at every
    layer, so a classifier trained on them learns "confident => exit".
    """
    rng = np.random.default_rng(seed)
    K = L - 1
    blank_answer = rng.random(P) < blank_share
    final = np.where(blank_answer, BLANK, 100 + np.arange(P))
    tokens = np.full((P, K), BLANK)
    top_prob = rng.uniform(0.85, 0.98, (P, K))
    return _table(tokens, top_prob - rng.uniform(0.0, 0.05, (P, K)), top_prob, final)


def test_binomial_tail_matches_the_sum():
    for k, n, p in [(0, 10, 0.1), (3, 50, 0.05), (20, 40, 0.5)]:
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert abs(binomial_tail(k, n, p) - exact) < 1e-12


def test_agreement_guarantee_holds_on_fresh_prompts():
    target, delta, failures, exits = 0.95, 0.1, 0, []
    clf = train_exit_classifier(settling_table(400, seed=999), method="logistic")
    for seed in range(30):
        cal = calibrate(clf, settling_table(500, seed), target_agreement=target, delta=delta)
        _, test = simulate_exits(cal, settling_table(4000, 1000 + seed))
        failures += test["agreement"] < target
        exits.append(test["mean_exit_layer"])
        assert cal.calibration["agreement"] >= target and cal.calibration["n_prompts"] == 500
    assert failures <= 6  # delta = 0.1 of 30 runs is 3 expected at worst; 6 leaves room for binomial noise
    assert np.mean(exits) < L - 1.5  # and it does exit early: not a trivial "never"


@pytest.mark.parametrize("method", ["svm", "gap_rule", "logistic"])
def test_misleading_features_end_in_never_exit(method, tmp_path):
    clf = train_exit_classifier(misleading_table(300, seed=1, blank_share=0.9), method=method)
    calib = misleading_table(500, seed=2)
    _, raw = simulate_exits(clf, calib)  # the uncalibrated rule exits on the confident blank
    assert raw["agreement"] < 0.6 and raw["mean_exit_layer"] < 3, raw
    cal = calibrate(clf, calib, target_agreement=0.99, delta=0.1)
    # At most the few most confident prompts may exit (those that LTT can show are safe): late or never.
    _, test = simulate_exits(cal, misleading_table(2000, seed=3))
    assert test["agreement"] >= 0.99 and test["mean_exit_layer"] > L - 0.2, test
    assert cal.calibration["agreement"] >= 0.99
    # Too few calibration prompts for the target: never exit, and the conclusion says why.
    small = calibrate(clf, misleading_table(100, seed=4), target_agreement=0.99, delta=0.1)
    assert small.calibration["never_exit"] and small.check_layers == () and small.layers_to_check(L) == []
    assert "cannot certify" in small.calibration["conclusion"]
    assert small.calibration["min_prompts_for_target"] == 437  # 0.99**437 <= 0.1 / 8 < 0.99**436
    small.save_pretrained(tmp_path / "never")
    back = ExitClassifier.from_pretrained(tmp_path / "never")
    assert back.layers_to_check(L) == [] and back.calibration["never_exit"]


def test_wrong_confident_layers_give_never_exit():
    # Nothing is ever right before the last layer: no threshold can pass, whatever the sample size.
    table = misleading_table(600, seed=5, blank_share=0.0)
    clf = ExitClassifier(GapThresholdRule(threshold=0.8).fit([[0.0, 0.0]]))
    assert (
        simulate_exits(clf, table)[1]["agreement"] == 0.0
    )  # the paper's rule: exits at layer 1, always wrong
    cal = calibrate(clf, table, target_agreement=0.99)
    assert (
        cal.calibration["never_exit"]
        and "settles its answers only in its last layers" in cal.calibration["conclusion"]
    )
    assert simulate_exits(cal, table)[1]["agreement"] == 1.0


def test_never_exit_classifier_runs_full_depth_on_a_model():
    clf = calibrate(
        train_exit_classifier(misleading_table(300, 1, 0.9), method="logistic"), misleading_table(200, 2)
    )
    _, model = tiny_pair()
    clf = clf.replace(num_layers=None)  # the synthetic table had 9 layers, the tiny model 4
    model.exit_classifier = clf.bind(model)
    with torch.no_grad():
        out = model(torch.randint(3, 300, (2, 6)), use_cache=False)
    assert (out.exit_layers == 4).all()


def test_picks_the_fewest_layers_and_records_figures():
    clf = train_exit_classifier(settling_table(400, 5), method="logistic")
    cal = calibrate(clf, settling_table(800, 6), target_agreement=0.9, delta=0.1, min_layers=[1, 3, 5])
    fig = cal.calibration
    for key in (
        "target_agreement",
        "delta",
        "n_prompts",
        "agreement",
        "risk_upper_bound",
        "mean_exit_layer",
        "pruning_ratio",
        "gold_accuracy_dense",
        "gold_accuracy_exit",
        "min_layer",
        "threshold",
        "training",
    ):
        assert key in fig, key
    assert fig["min_layer_grid"] == [1, 3, 5] and cal.min_layer == fig["min_layer"]
    assert cal.threshold == fig["threshold"] and fig["agreement"] >= 0.9
    assert abs(fig["pruning_ratio"] - (1 - fig["mean_exit_layer"] / L)) < 1e-12
    # every accepted-looking lower threshold at the same min_layer uses fewer layers but breaks the target
    exit_layer, summary = simulate_exits(cal, settling_table(800, 6))
    assert abs(summary["mean_exit_layer"] - fig["mean_exit_layer"]) < 1e-12
    lenient = ExitClassifier(clf.estimator, threshold=cal.threshold - 0.5, min_layer=cal.min_layer)
    assert simulate_exits(lenient, settling_table(800, 6))[1]["agreement"] < 0.9
    with pytest.raises(ValueError, match="target_agreement"):
        calibrate(clf, settling_table(10, 0), target_agreement=1.5)
    with pytest.raises(ValueError, match="min_layers"):
        calibrate(clf, settling_table(10, 0), min_layers=[0, 9])


def test_simulation_equals_the_live_model():
    _, model = tiny_pair()
    tok = tiny_tokenizer()
    prompts = tiny_prompts(4)
    table = collect_features(model, tok, prompts, features=("gap", "top_prob"), progress=False)
    threshold = float(np.median(table.columns(["gap"])[table.layer == 2]))
    clf = ExitClassifier(GapThresholdRule(threshold=threshold).fit([[0.0, 0.0]]), min_layer=2).bind(model)
    expected, _ = simulate_exits(clf, table)
    assert 0 < (expected < 4).sum() < len(prompts)
    tok.padding_side = "left"
    enc = tok([p.text for p in prompts], return_tensors="pt", padding=True)
    model.exit_classifier = clf
    with torch.no_grad():
        out = model(**enc, use_cache=False)
    assert out.exit_layers.tolist() == expected.tolist()
