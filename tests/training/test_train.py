"""Training every method into an ExitClassifier that the model accepts and that fires."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from tiny_models import tiny_pair

from adainfer_hf.estimators.crf import CRFExitEstimator
from adainfer_hf.policy.classifier import ExitClassifier
from adainfer_hf.training.collect import FeatureTable
from adainfer_hf.training.table import table_sequences
from adainfer_hf.training.train import TRAIN_METHODS, train_exit_classifier

L = 4


def separable_table(P=120, K=L - 1, seed=0):
    """Rows whose label is 1 exactly where `gap < 0.4` (so a classifier fires on a random tiny model's tiny gaps)."""
    rng = np.random.default_rng(seed)
    gap = rng.random((P, K))
    top_prob = np.clip(gap + rng.random((P, K)) * 0.2, 0, 1)
    final = np.arange(P) + 1000
    tokens = np.where(gap < 0.4, final[:, None], 7)
    return FeatureTable(
        X=np.stack([gap.reshape(-1), top_prob.reshape(-1)], 1),
        feature_names=("gap", "top_prob"),
        layer=np.tile(np.arange(1, K + 1), P),
        prompt_id=np.repeat(np.arange(P), K),
        top_token=tokens.reshape(-1),
        task=["t"] * P,
        shots=np.zeros(P),
        example_index=np.arange(P),
        final_token=final,
        gold_token=final,
        num_layers=np.full(P, K + 1),
    )


@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_each_method_gives_a_classifier_the_model_accepts_and_fires(method):
    table = separable_table()
    clf = train_exit_classifier(table, method=method)
    assert isinstance(clf, ExitClassifier) and clf.features == ("gap", "top_prob") and clf.label == "final"
    assert clf.calibration["training"]["method"] == method
    _, model = tiny_pair()
    model.exit_classifier = clf.bind(model)
    assert clf.num_layers == L
    ids = torch.randint(3, 300, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=False)
    if (
        method == "gap_rule"
    ):  # gap > 0.8 never holds on a random model: the rule is sane, it just does not fire
        assert (out.exit_layers == L).all()
        assert clf.exit_mask(np.array([[0.9, 0.95], [0.5, 0.9]])).tolist() == [True, False]
    else:
        assert (out.exit_layers == 1).all()  # random tiny models have gap ~ 0 < 0.4: exit at once
    if method == "gate_only":  # no classifier: it fires wherever its check runs (train_on_tables adds the gate)
        assert clf.exit_mask(table.columns(clf.features)).all()
    elif method not in ("crf", "gap_rule"):
        pred = clf.exit_mask(table.columns(clf.features))
        assert (pred == table.labels("final")).mean() > 0.95


@pytest.mark.parametrize("method", ["linear_svm", "logistic"])
def test_linear_methods_fold_the_scaler(method, tmp_path):
    table = separable_table()
    clf = train_exit_classifier(table, method=method)
    est = clf.estimator
    assert not hasattr(est, "steps") and est.coef_.shape == (1, 2)
    assert clf._scorer is not None and clf._scorer.kind == "linear"  # decided on the features' device, one matmul
    # Same decisions as a scaler pipeline fitted the same way.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    X, y = table.columns(clf.features).astype(np.float64), table.labels("final")
    model = (
        LinearSVC(class_weight="balanced", max_iter=20000, random_state=0)
        if method == "linear_svm"
        else LogisticRegression(class_weight="balanced", max_iter=2000, random_state=0)
    )
    pipe = make_pipeline(StandardScaler(), model).fit(X, y)
    np.testing.assert_allclose(est.decision_function(X), pipe.decision_function(X), rtol=1e-6, atol=1e-8)
    clf.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "exit_classifier.safetensors").is_file()
    back = ExitClassifier.from_pretrained(tmp_path / "a")
    assert np.array_equal(back.exit_mask(X), clf.exit_mask(X))


def test_imbalance_subsample_is_stratified_and_capped():
    table = separable_table(P=400)
    y = table.labels("final")
    clf = train_exit_classifier(table, method="linear_svm", max_rows=200)
    info = clf.calibration["training"]
    assert info["rows_used"] <= 202 and info["rows"] == len(table)
    assert abs(info["positive_rate"] - y.mean()) < 1e-12


def test_errors_name_the_bad_value():
    table = separable_table()
    with pytest.raises(ValueError, match="expected one of"):
        train_exit_classifier(table, method="xgboost")
    with pytest.raises(ValueError, match="expected one of"):
        train_exit_classifier(table, label="dense")
    with pytest.raises(ValueError, match="were not collected"):
        train_exit_classifier(table, features=("kl_prev",))
    one_class = separable_table()
    one_class.top_token[:] = 7
    with pytest.raises(ValueError, match="single class"):
        train_exit_classifier(one_class, method="svm")


def test_crf_sequences_and_missing_extra(monkeypatch):
    table = separable_table()
    clf = train_exit_classifier(table, method="crf")
    est = clf.estimator
    assert isinstance(est, CRFExitEstimator)
    seqs, labs = table_sequences(table, clf.features, "final")
    pred = est.predict_sequences(seqs)
    assert np.mean(np.concatenate(pred) == np.concatenate(labs)) > 0.9
    causal = est.causal_scores(seqs[:3])
    assert [c.shape for c in causal] == [(L - 1,)] * 3 and all(((c >= 0) & (c <= 1)).all() for c in causal)
    monkeypatch.setitem(sys.modules, "sklearn_crfsuite", None)
    with pytest.raises(ImportError, match=r"adainfer-hf\[crf\]"):
        train_exit_classifier(table, method="crf")
