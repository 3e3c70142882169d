"""ExitClassifier: save/load round trips, the on-device decision, validation errors and atomic saves.

The reference is always the wrapped scikit-learn estimator itself: whatever we serialise, rebuild or evaluate
on the device must decide exactly what `estimator.predict` / `decision_function` decide.
"""

from __future__ import annotations

import json
import os
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.tree import DecisionTreeClassifier
from tiny_models import stock_llama

from adainfer_hf.artifact.constants import (
    CLASSIFIER_CONFIG_NAME,
    CLASSIFIER_MANIFEST_NAME,
    CLASSIFIER_SAFE_NAME,
    CLASSIFIER_WEIGHTS_NAME,
)
from adainfer_hf.estimators.rules import GapThresholdRule
from adainfer_hf.policy.classifier import (
    ExitClassifier,
    ExitClassifierConfig,
)


def _data(n=400, seed=0):
    """Features shaped like (gap, top_prob): gap <= top_prob, both in [0, 1]; label mostly "gap is large"."""
    rng = np.random.default_rng(seed)
    top = rng.uniform(0.05, 1.0, n)
    gap = top * rng.uniform(0.0, 1.0, n)
    X = np.stack([gap, top], axis=1)
    y = (gap + 0.2 * top + 0.1 * rng.normal(size=n) > 0.6).astype(int)
    return X, y


X_TRAIN, Y_TRAIN = _data()
X_TEST, _ = _data(n=500, seed=1)

ESTIMATORS = {
    "linear_svc": lambda: LinearSVC(C=0.5),
    "logreg": lambda: LogisticRegression(C=2.0),
    "svc_rbf": lambda: SVC(kernel="rbf", gamma=3.0, C=2.0),
    "scaler_svc": lambda: make_pipeline(StandardScaler(), SVC()),
    "scaler_linear_svc": lambda: make_pipeline(StandardScaler(), LinearSVC()),
    "two_scalers_svc": lambda: make_pipeline(StandardScaler(), StandardScaler(with_mean=False), SVC(gamma="auto")),
    "svc_poly": lambda: SVC(kernel="poly", degree=2),
    "sgd": lambda: SGDClassifier(random_state=0),
    "gap_rule": lambda: GapThresholdRule(threshold=0.5),
}
LINEAR = ["linear_svc", "logreg", "scaler_linear_svc", "sgd", "gap_rule"]


def _fit(name):
    return ESTIMATORS[name]().fit(X_TRAIN, Y_TRAIN)


def _edit_by_hand(directory):
    """Tests that edit an artifact's files by hand drop its manifest, which would (rightly) refuse the edit; the
    artifact then loads with a warning (see tests/test_artifact_hardening.py)."""
    (directory / CLASSIFIER_MANIFEST_NAME).unlink()


no_manifest_warning = pytest.mark.filterwarnings("ignore:.*has no exit_classifier_manifest.json:UserWarning")


def _same_decisions(a: ExitClassifier, b: ExitClassifier, X=X_TEST):
    np.testing.assert_array_equal(a.score(X), b.score(X))
    np.testing.assert_array_equal(a.exit_mask(X), b.exit_mask(X))
    np.testing.assert_array_equal(a.estimator.predict(X), b.estimator.predict(X))


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_round_trip_safe_path(tmp_path, monkeypatch, name):
    clf = ExitClassifier(_fit(name), min_layer=2, calibration={"accuracy": 0.9})
    clf.save_pretrained(tmp_path)
    assert (tmp_path / CLASSIFIER_SAFE_NAME).is_file() and (tmp_path / CLASSIFIER_WEIGHTS_NAME).is_file()

    # The safe path must never unpickle: make any joblib.load fail loudly.
    monkeypatch.setattr(joblib, "load", lambda *a, **k: pytest.fail("safe path unpickled"))
    loaded = ExitClassifier.from_pretrained(tmp_path)
    assert type(loaded.estimator) is type(clf.estimator)
    assert loaded.min_layer == 2 and loaded.calibration == {"accuracy": 0.9}
    _same_decisions(clf, loaded)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_round_trip_joblib_path(tmp_path, name):
    clf = ExitClassifier(_fit(name), threshold=None)
    clf.save_pretrained(tmp_path)
    os.remove(tmp_path / CLASSIFIER_SAFE_NAME)
    loaded = ExitClassifier.from_pretrained(tmp_path)
    _same_decisions(clf, loaded)


def test_svc_safe_file_keeps_probability_model(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `probability` is deprecated in recent scikit-learn
        est = SVC(probability=True, random_state=0).fit(X_TRAIN, Y_TRAIN)
    ExitClassifier(est).save_pretrained(tmp_path)
    os.remove(tmp_path / CLASSIFIER_WEIGHTS_NAME)
    loaded = ExitClassifier.from_pretrained(tmp_path).estimator
    np.testing.assert_array_equal(loaded.decision_function(X_TEST), est.decision_function(X_TEST))
    np.testing.assert_array_equal(loaded.predict_proba(X_TEST), est.predict_proba(X_TEST))


def test_unencodable_estimator_saves_joblib_only_and_replaces_stale_safe_file(tmp_path):
    ExitClassifier(_fit("linear_svc")).save_pretrained(tmp_path)
    assert (tmp_path / CLASSIFIER_SAFE_NAME).exists()
    tree = ExitClassifier(DecisionTreeClassifier(max_depth=3, random_state=0).fit(X_TRAIN, Y_TRAIN))
    with pytest.warns(UserWarning, match="DecisionTreeClassifier"):
        tree.save_pretrained(tmp_path)
    assert not (tmp_path / CLASSIFIER_SAFE_NAME).exists()  # a stale safe file would shadow the new joblib
    assert json.loads((tmp_path / CLASSIFIER_CONFIG_NAME).read_text())["safe_format"] is None
    _same_decisions(tree, ExitClassifier.from_pretrained(tmp_path))


def test_config_file_is_sorted_versioned_json(tmp_path):
    clf = ExitClassifier(_fit("svc_rbf"), threshold=0.25, check_layers=[2, 5], num_layers=8, label="gold")
    clf.save_pretrained(tmp_path)
    text = (tmp_path / CLASSIFIER_CONFIG_NAME).read_text()
    data = json.loads(text)
    assert list(data) == sorted(data) and text.startswith("{\n  ")
    assert data["format_version"] == 1 and data["estimator_class"] == "sklearn.svm._classes.SVC"
    assert data["features"] == ["gap", "top_prob"] and data["check_layers"] == [2, 5]
    assert set(data["versions"]) >= {"adainfer-hf", "scikit-learn", "transformers", "torch"}
    loaded = ExitClassifier.from_pretrained(tmp_path)
    assert (loaded.threshold, loaded.check_layers, loaded.num_layers, loaded.label) == (
        0.25,
        (2, 5),
        8,
        "gold",
    )


@no_manifest_warning
def test_unknown_config_key_warns_and_is_ignored(tmp_path):
    ExitClassifier(_fit("gap_rule")).save_pretrained(tmp_path)
    _edit_by_hand(tmp_path)
    path = tmp_path / CLASSIFIER_CONFIG_NAME
    data = json.loads(path.read_text())
    data["exit_temperature"] = 3
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="exit_temperature"):
        loaded = ExitClassifier.from_pretrained(tmp_path)
    assert not hasattr(loaded, "exit_temperature")


@no_manifest_warning
def test_newer_format_version_is_refused(tmp_path):
    ExitClassifier(_fit("gap_rule")).save_pretrained(tmp_path)
    _edit_by_hand(tmp_path)
    path = tmp_path / CLASSIFIER_CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99"):
        ExitClassifier.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- decisions
@pytest.mark.parametrize("name", LINEAR)
def test_linear_decide_on_device_matches_predict(monkeypatch, name):
    est = _fit(name)
    clf = ExitClassifier(est)
    assert clf._scorer is not None and clf._scorer.kind == "linear"
    expected = est.predict(X_TEST.astype(np.float32)) == 1
    # The fast path must not call scikit-learn at all.
    for method in ("predict", "decision_function", "predict_proba"):
        monkeypatch.setattr(est, method, lambda *a, **k: pytest.fail("sklearn called"), raising=False)
    feats = torch.tensor(X_TEST, dtype=torch.float32)
    out = clf.decide(feats, layer=3, rows=torch.arange(len(feats)))
    assert out.dtype == torch.bool and out.shape == (len(feats),) and out.device == feats.device
    np.testing.assert_array_equal(out.numpy(), expected)
    assert 0 < expected.sum() < len(expected)  # the test data actually exercises both outcomes


@pytest.mark.parametrize("name", ["svc_rbf", "scaler_svc", "two_scalers_svc"])
def test_rbf_svm_decides_on_device_like_sklearn(monkeypatch, name):
    est = _fit(name)
    clf = ExitClassifier(est)
    assert clf._scorer is not None and clf._scorer.kind == "rbf"
    feats = torch.tensor(X_TEST, dtype=torch.float32)
    X = feats.numpy().astype(np.float64)
    margin, predicted = est.decision_function(X), est.predict(X) == 1
    assert 0 < predicted.sum() < len(predicted)  # both outcomes exercised
    np.testing.assert_allclose(clf._scorer.margin(feats).numpy(), margin, rtol=1e-9, atol=1e-9)
    cut = float(np.quantile(margin, 0.3))
    with_cut = clf.replace(threshold=cut)
    for method in ("predict", "decision_function", "predict_proba"):  # the device path never calls sklearn
        monkeypatch.setattr(est, method, lambda *a, **k: pytest.fail("sklearn called"), raising=False)
    rows = torch.arange(len(feats))
    out = clf.decide(feats, layer=1, rows=rows)
    assert out.dtype == torch.bool and out.device == feats.device
    np.testing.assert_array_equal(out.numpy(), predicted)
    clear = np.abs(margin - cut) > 1e-9  # rows not on the threshold itself
    np.testing.assert_array_equal(with_cut.decide(feats, 1, rows).numpy()[clear], (margin >= cut)[clear])
    assert clf.decide(feats[:0], layer=1, rows=torch.arange(0)).shape == (0,)


def test_other_nonlinear_estimators_decide_through_sklearn():
    est = _fit("svc_poly")
    clf = ExitClassifier(est)
    assert clf._scorer is None
    feats = torch.tensor(X_TEST, dtype=torch.float32)
    out = clf.decide(feats, layer=1, rows=torch.arange(len(feats)))
    np.testing.assert_array_equal(out.numpy(), est.predict(feats.numpy()) == 1)
    empty = clf.decide(feats[:0], layer=1, rows=torch.arange(0))
    assert empty.shape == (0,) and empty.dtype == torch.bool


def test_threshold_semantics():
    est = _fit("linear_svc")
    margin = est.decision_function(X_TEST)
    feats = torch.tensor(X_TEST, dtype=torch.float32)
    rows = torch.arange(len(feats))
    # None: the estimator's own decision.
    np.testing.assert_array_equal(ExitClassifier(est).exit_mask(X_TEST), est.predict(X_TEST) == 1)
    # A threshold on the decision function: fires where margin >= t, on host and on device alike.
    clf = ExitClassifier(est, threshold=0.5)
    assert clf.score_kind == "decision"
    np.testing.assert_array_equal(clf.exit_mask(X_TEST), margin >= 0.5)
    np.testing.assert_array_equal(clf.decide(feats, 2, rows).numpy(), clf.exit_mask(feats.numpy()))


def test_logistic_threshold_is_a_probability_and_stays_on_device():
    est = _fit("logreg")
    feats = torch.tensor(X_TEST, dtype=torch.float32)
    rows = torch.arange(len(feats))
    clf = ExitClassifier(est, threshold=0.8)
    assert clf.score_kind == "probability"
    proba = est.predict_proba(feats.numpy())[:, 1]
    np.testing.assert_array_equal(clf.exit_mask(feats.numpy()), proba >= 0.8)
    np.testing.assert_array_equal(clf.decide(feats, 2, rows).numpy(), proba >= 0.8)
    with pytest.raises(ValueError, match=r"threshold=1.5 .*0 <= t <= 1"):
        ExitClassifier(est, threshold=1.5)


def test_logistic_threshold_edges_match_sklearn_on_device():
    # Margins far enough out that float64 probabilities saturate at exactly 0 and 1.
    est = LogisticRegression().fit(X_TRAIN, Y_TRAIN)
    est.coef_ = est.coef_ * 60.0
    feats = torch.tensor(X_TEST, dtype=torch.float32)
    proba = est.predict_proba(feats.numpy())[:, 1]
    assert (proba == 1.0).any() and (proba < 1.0).any()
    for t in (0.0, 1.0):
        clf = ExitClassifier(est, threshold=t)
        out = clf.decide(feats, 1, torch.arange(len(feats))).numpy()
        np.testing.assert_array_equal(out, proba >= t)
        np.testing.assert_array_equal(clf.exit_mask(feats.numpy()), proba >= t)


def test_threshold_changes_through_replace_only():
    est = _fit("linear_svc")
    clf = ExitClassifier(est)
    feats = torch.tensor(X_TEST, dtype=torch.float32)
    clf.decide(feats, 1, torch.arange(len(feats)))  # builds the device cache
    with pytest.raises(AttributeError, match="replace"):
        clf.threshold = 0.7  # the config is the one source of truth: no unvalidated assignment
    swept = clf.replace(threshold=0.7)  # what a calibration sweep does
    out = swept.decide(feats, 1, torch.arange(len(feats))).numpy()
    np.testing.assert_array_equal(out, est.decision_function(feats.numpy()) >= 0.7)
    assert clf.threshold is None and swept.config.threshold == 0.7


def test_gap_rule_is_the_papers_rule():
    rule = GapThresholdRule().fit(np.zeros((0, 2)))
    X = np.array([[0.81, 0.9], [0.79, 0.85], [0.1, 0.5]])
    np.testing.assert_array_equal(rule.predict(X), [1, 0, 0])
    np.testing.assert_allclose(rule.decision_function(X), X[:, 0] - 0.8)
    assert clone(rule).get_params() == {"feature_index": 0, "threshold": 0.8}
    clf = ExitClassifier(rule)
    out = clf.decide(torch.tensor(X, dtype=torch.float32), 1, torch.arange(3))
    assert out.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="feature_index=5"):
        GapThresholdRule(feature_index=5).fit(X)


def test_layers_to_check():
    est = _fit("gap_rule")
    assert ExitClassifier(est, min_layer=3).layers_to_check(6) == [3, 4, 5]
    assert ExitClassifier(est, min_layer=2, check_layers=[1, 4, 9]).layers_to_check(6) == [4]
    assert (
        ExitClassifier(est, check_layers=()).layers_to_check(6) == []
    )  # "never exit" (calibration's answer)


def test_repr_is_short_and_informative():
    text = repr(
        ExitClassifier(_fit("svc_rbf"), threshold=0.1, base_model_name_or_path="org/m", num_layers=30)
    )
    assert text.startswith("ExitClassifier(SVC, features=('gap', 'top_prob'), threshold=0.1")
    assert "org/m" in text and "num_layers=30" in text and len(text) < 200


# ---------------------------------------------------------------------- validation
def test_validation_errors_name_the_bad_value():
    est = _fit("linear_svc")
    with pytest.raises(ValueError, match=r"n_features_in_=2.*\['gap', 'top_prob', 'kl_prev'\]"):
        ExitClassifier(est, features=("gap", "top_prob", "kl_prev"))
    with pytest.raises(ValueError, match=r"\['entropy'\].*'cos_hidden'"):
        ExitClassifier(est, features=("gap", "entropy"))
    with pytest.raises(ValueError, match=r"min_layer=0 .*\[1, num_layers - 1\]"):
        ExitClassifier(est, min_layer=0)
    with pytest.raises(ValueError, match=r"min_layer=4 .*\[1, 3\]"):
        ExitClassifier(est, min_layer=4, num_layers=4)
    with pytest.raises(ValueError, match=r"check_layers=\[3, 2\]"):
        ExitClassifier(est, check_layers=[3, 2])
    with pytest.raises(ValueError, match=r"offending value\(s\): \[7\]"):
        ExitClassifier(est, check_layers=[2, 7], num_layers=6)
    with pytest.raises(ValueError, match="label='silver'"):
        ExitClassifier(est, label="silver")
    with pytest.raises(ValueError, match="LinearSVC is not fitted"):
        ExitClassifier(LinearSVC())
    with pytest.raises(ValueError, match=r"classes_=\[1, 2\]"):
        ExitClassifier(LinearSVC().fit(X_TRAIN, Y_TRAIN + 1))
    with pytest.raises(ValueError, match=r"shape \[n_rows, 2\].*\(3, 5\)"):
        ExitClassifier(est).decide(torch.zeros(3, 5), 1, torch.arange(3))


def test_config_from_dict_rejects_non_objects():
    with pytest.raises(ValueError, match="JSON object"):
        ExitClassifierConfig.from_dict([1, 2])


# ---------------------------------------------------------------------- broken artifacts
@no_manifest_warning
def test_corrupt_or_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=CLASSIFIER_CONFIG_NAME):
        ExitClassifier.from_pretrained(tmp_path)  # an empty directory
    ExitClassifier(_fit("svc_rbf")).save_pretrained(tmp_path)
    _edit_by_hand(tmp_path)

    safe = (tmp_path / CLASSIFIER_SAFE_NAME).read_bytes()
    (tmp_path / CLASSIFIER_SAFE_NAME).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=CLASSIFIER_SAFE_NAME):
        ExitClassifier.from_pretrained(tmp_path)
    os.remove(tmp_path / CLASSIFIER_SAFE_NAME)

    weights = (tmp_path / CLASSIFIER_WEIGHTS_NAME).read_bytes()
    (tmp_path / CLASSIFIER_WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=CLASSIFIER_WEIGHTS_NAME):
        ExitClassifier.from_pretrained(tmp_path)
    os.remove(tmp_path / CLASSIFIER_WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=f"{CLASSIFIER_SAFE_NAME} or {CLASSIFIER_WEIGHTS_NAME}"):
        ExitClassifier.from_pretrained(tmp_path)

    (tmp_path / CLASSIFIER_SAFE_NAME).write_bytes(safe)
    (tmp_path / CLASSIFIER_CONFIG_NAME).write_text('{"features": ["gap", "top_prob"],')
    with pytest.raises(ValueError, match=f"{CLASSIFIER_CONFIG_NAME}.*not valid JSON"):
        ExitClassifier.from_pretrained(tmp_path)


@no_manifest_warning
def test_safe_file_only_rebuilds_allowlisted_classes(tmp_path):
    import safetensors.numpy

    ExitClassifier(_fit("gap_rule")).save_pretrained(tmp_path)
    _edit_by_hand(tmp_path)
    header = {"format": "adainfer-sklearn-v1", "estimator": {"class": "Popen", "params": {"args": "true"}}}
    safetensors.numpy.save_file(
        {"x": np.zeros(1)}, tmp_path / CLASSIFIER_SAFE_NAME, metadata={"adainfer_hf": json.dumps(header)}
    )
    with pytest.raises(ValueError, match=r"unsupported estimator class 'Popen'"):
        ExitClassifier.from_pretrained(tmp_path)


def test_a_file_is_not_an_artifact(tmp_path):
    path = tmp_path / "clf.joblib"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        ExitClassifier.from_pretrained(path)


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_keeps_the_previous_artifact(tmp_path, monkeypatch, interrupt):
    target = tmp_path / "clf"
    ExitClassifier(_fit("gap_rule")).save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise interrupt

    monkeypatch.setattr(joblib, "dump", crash)
    with pytest.raises(type(interrupt)):
        ExitClassifier(_fit("svc_rbf"), min_layer=3).save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no temporary directory left behind
    assert type(ExitClassifier.from_pretrained(target).estimator) is GapThresholdRule


# ---------------------------------------------------------------------- base model checks
def test_bind_and_validate_for(tmp_path):
    model = stock_llama(seed=0)
    clf = ExitClassifier(_fit("gap_rule")).bind(model)
    assert clf.num_layers == 4 and clf.lm_head_fingerprint["shape"] == [99, 32]
    clf.validate_for(model)
    clf.save_pretrained(tmp_path)
    loaded = ExitClassifier.from_pretrained(tmp_path)
    loaded.validate_for(model)  # the fingerprint survives the JSON round trip
    loaded.validate_for(model.to(torch.bfloat16))  # and a half-precision load of the same weights

    with pytest.raises(ValueError, match=r"num_layers: classifier 4 vs model 6.*ignore_mismatch=True"):
        loaded.validate_for(stock_llama(seed=0, num_hidden_layers=6))
    other = stock_llama(seed=1)
    with pytest.raises(
        ValueError, match=r"LM-head fingerprint: classifier \w+ \(shape \[99, 32\]\) vs model"
    ):
        loaded.validate_for(other)
    with pytest.warns(UserWarning, match="fingerprint") as record:
        loaded.validate_for(other, ignore_mismatch=True)
        loaded.validate_for(other, ignore_mismatch=True)
    assert len([w for w in record if "fingerprint" in str(w.message)]) == 1  # warned once


def test_validate_for_skips_what_was_not_recorded():
    ExitClassifier(_fit("gap_rule")).validate_for(stock_llama(seed=3, num_hidden_layers=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_linear_decide_on_cuda_does_not_synchronise():
    est = _fit("scaler_linear_svc")
    clf = ExitClassifier(est, threshold=0.1)
    feats = torch.tensor(X_TEST, dtype=torch.float32, device="cuda")
    rows = torch.arange(len(feats), device="cuda")
    clf.decide(feats, 1, rows)  # first call builds the cached device weights (a host-to-device copy)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = clf.decide(feats, 1, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == feats.device
    np.testing.assert_array_equal(out.cpu().numpy(), est.decision_function(X_TEST.astype(np.float32)) >= 0.1)
