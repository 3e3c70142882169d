"""Calibration: the agreement guarantee on synthetic tables, the misleading-features case, simulation == live."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import (
    TABLE_BLANK,
    TABLE_LAYERS,
    misleading_table,
    settling_table,
    task_tokenizer,
    tiny_pair,
    tiny_prompts,
)

from adainfer_hf.estimators.rules import GapThresholdRule
from adainfer_hf.policy.classifier import ExitClassifier
from adainfer_hf.training.calibrate import calibrate, simulate_exits
from adainfer_hf.training.collect import collect_features
from adainfer_hf.training.train import train_exit_classifier
from adainfer_hf.utils.stats import binomial_tail

L = TABLE_LAYERS
BLANK = TABLE_BLANK


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
    tok = task_tokenizer()
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
