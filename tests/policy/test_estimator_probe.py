"""An estimator that cannot score rows of the width it is wrapped with is refused when the classifier is built
(or bound), naming the estimator and the feature count, instead of failing deep inside itself at the first
forward. The reference for "it would have failed" is the estimator's own call on rows of that width."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from tiny_models import batch, make_pair

from adainfer_hf import ExitClassifier, GapThresholdRule


class _ReadsThirdColumn(ClassifierMixin, BaseEstimator):
    """No `n_features_in_`: nothing says it reads three columns until it is called."""

    def fit(self, X=None, y=None):
        self.classes_ = np.array([0, 1])
        self.threshold_ = 5e-4  # splits the test batch's exits on the tiny Llama (layers 2, 3 and 4)
        return self

    def predict(self, X):
        return (np.asarray(X)[:, 2] > self.threshold_).astype(int)


class _OneLabel(_ReadsThirdColumn):
    """Answers one label whatever the number of rows."""

    def predict(self, X):
        return np.array(1)


def test_an_estimator_reading_a_column_it_is_not_given_is_refused_when_wrapped():
    est = _ReadsThirdColumn().fit()
    with pytest.raises(IndexError):  # what the first forward would raise: the estimator's own call
        est.predict(np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"estimator _ReadsThirdColumn cannot score rows of the 2 feature\(s\) "
                                         r"\['gap', 'top_prob'\] it would be given: _ReadsThirdColumn.predict fails "
                                         r"on rows of 2 feature\(s\) \(IndexError: "):
        ExitClassifier(est)
    wide = ExitClassifier(est, features=("gap", "top_prob", "kl_prev"))  # the width it reads: accepted
    with pytest.raises(ValueError, match="_ReadsThirdColumn cannot score rows of the 2 feature"):
        wide.replace(features=("gap", "top_prob"))  # every change is validated, the probe included


def test_an_estimator_answering_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"_OneLabel.predict returns shape \(\) for 4 rows of 3 feature\(s\)"):
        ExitClassifier(_OneLabel().fit(), features=("gap", "top_prob", "kl_prev"))


def test_a_probed_estimator_decides_the_forward_it_was_accepted_for():
    # Reference: the same rule (kl_prev > 5e-4) as a GapThresholdRule, which runs on the device path instead.
    _, ada = make_pair("llama_gqa")
    ids, mask = batch("left")
    features = ("gap", "top_prob", "kl_prev")
    ours = ExitClassifier(_ReadsThirdColumn().fit(), features=features).bind(ada)
    rule = ExitClassifier(GapThresholdRule(feature_index=2, threshold=5e-4).fit(np.zeros((1, 3))), features=features)
    assert ours._scorer is None and rule.bind(ada)._scorer is not None
    with torch.no_grad():
        out = ada(ids, attention_mask=mask, exit_policy=ours, use_cache=False)
        ref = ada(ids, attention_mask=mask, exit_policy=rule, use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    assert out.exit_layers.tolist() == ref.exit_layers.tolist() and len(set(out.exit_layers.tolist())) > 1
