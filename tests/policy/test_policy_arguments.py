"""Policies and classifiers refuse bad arguments by value; rows with non-finite features never exit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, make_pair

from adainfer_hf import ExitPolicy, ScriptedExit


class NeverExit(ExitPolicy):
    """Checks after every layer and never fires (the loop runs, the output must be the stock model's)."""

    features = ("gap", "top_prob")

    def decide(self, features, layer, rows, state=None):
        return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)


def _gen_kwargs(**kw):
    return dict(max_new_tokens=5, do_sample=False, pad_token_id=0, **kw)




# ---------------------------------------------------------------- 10. policy arguments are refused by value
@pytest.mark.parametrize("value", [True, 1.0, [2, False], "3"])
def test_scripted_exit_refuses_non_int_layers_by_value(value):
    with pytest.raises(ValueError, match=f"exit_layer.*{value!r}".replace("[", r"\[")):
        ScriptedExit(value)


def test_scripted_exit_per_row_list_of_the_wrong_length_is_refused():
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")  # 3 rows
    with pytest.raises(ValueError, match="2 layers.*3 rows"):
        ada(ids, attention_mask=mask, exit_policy=ScriptedExit([1, 2]))
    with torch.no_grad():
        assert ada(ids, attention_mask=mask, exit_policy=ScriptedExit([2])).exit_layers.tolist() == [2, 2, 2]

# ---------------------------------------------------------------- 9. non-finite features never exit
def _classifier(kind):
    import numpy as np
    from sklearn.svm import SVC, LinearSVC

    from adainfer_hf.estimators.rules import GapThresholdRule
    from adainfer_hf.policy.classifier import ExitClassifier

    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (200, 2))
    y = (X[:, 0] > 0.5).astype(int)
    est = {"linear": LinearSVC(), "svc_rbf": SVC(kernel="rbf"), "gap_rule": GapThresholdRule(threshold=0.5)}[kind]
    return ExitClassifier(est.fit(X, y))


@pytest.mark.parametrize("kind", ["linear", "svc_rbf", "gap_rule"])
def test_non_finite_feature_rows_never_exit_and_warn_once(kind):
    import warnings

    clf = _classifier(kind)
    clean = torch.tensor([[0.9, 0.95], [0.1, 0.2], [0.8, 0.9], [0.95, 0.99], [0.9, 0.9]])
    feats = clean.clone()
    feats[0, 1] = float("nan")
    feats[2, 0] = float("inf")
    feats[4, 1] = float("-inf")
    rows = torch.arange(len(feats))
    expected = clf.decide(clean, 2, rows)
    assert expected.tolist() == [True, False, True, True, True]  # the clean rows exercise both outcomes
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = clf.decide(feats, 2, rows)
        again = clf.decide(feats, 3, rows)
    assert got.tolist() == again.tolist() == [False, False, False, True, False]
    non_finite = [w for w in record if issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message)]
    assert len(non_finite) == 1, [str(w.message) for w in record]
    assert clf.decide(clean, 2, rows).tolist() == expected.tolist()

# ---------------------------------------------------------------- 10. classifier arguments are refused by value
def test_string_labels_are_refused_naming_the_classes():
    import numpy as np
    from sklearn.base import BaseEstimator
    from sklearn.svm import LinearSVC

    from adainfer_hf.policy.classifier import ExitClassifier

    X = np.random.default_rng(0).uniform(0, 1, (50, 2))
    est = LinearSVC().fit(X, np.where(X[:, 0] > 0.5, "yes", "no"))
    with pytest.raises(ValueError, match=r"\['no', 'yes'\].*0/1 or bool"):
        ExitClassifier(est)

    class NoClasses(BaseEstimator):  # an estimator without `classes_` whose predictions are strings
        def fit(self, X, y=None):
            self.n_features_in_ = 2
            return self

        def predict(self, X):
            return np.where(np.asarray(X)[:, 0] > 0.5, "yes", "no")

    clf = ExitClassifier(NoClasses().fit(X))
    with pytest.raises(ValueError, match=r"'no'.*'yes'.*0/1 or bool"):
        clf.decide(torch.tensor([[0.9, 0.9], [0.1, 0.1]]), 1, torch.arange(2))


def test_unbound_min_layer_beyond_the_model_is_refused_naming_both():
    from adainfer_hf.estimators.rules import GapThresholdRule
    from adainfer_hf.policy.classifier import ExitClassifier

    _, ada = make_pair("llama_gqa")  # 4 layers
    ids, mask = batch("left")
    clf = ExitClassifier(GapThresholdRule(threshold=0.8).fit([[0.0, 0.0]]), min_layer=99)
    with pytest.raises(ValueError, match=r"min_layer=99.*4 decoder layers"):
        ada(ids, attention_mask=mask, exit_policy=clf)
    with pytest.raises(ValueError, match=r"min_layer=99.*4 decoder layers"):
        ada.exit_classifier = clf
    edge = clf.replace(min_layer=4)
    with pytest.raises(ValueError, match=r"min_layer=4.*4 decoder layers"):
        ada(ids, attention_mask=mask, exit_policy=edge)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_non_finite_screen_on_cuda_does_not_synchronise_and_warns_later():
    clf = _classifier("linear")
    feats = torch.tensor([[0.9, float("nan")], [0.9, 0.95]], device="cuda")
    rows = torch.arange(2, device="cuda")
    clf.decide(feats[1:], 1, rows[:1])  # builds the cached device weights (a host-to-device copy)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = clf.decide(feats, 1, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.cpu().tolist() == [False, True]
    torch.cuda.synchronize()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        clf.decide(feats[1:], 2, rows[:1])  # the flag of the previous call has landed: warned now
