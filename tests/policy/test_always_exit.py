"""`AlwaysExit`, the exit rule of `method="gate_only"`: it fires at every check, on the device path, and a gated
classifier built on it exits exactly where the rule it replaces (`GapThresholdRule(threshold=-1)` on the gap,
which is never below 0) exits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from tiny_models import batch, make_pair

from adainfer_hf import AlwaysExit, ExitClassifier, GapThresholdRule
from adainfer_hf.artifact.constants import CLASSIFIER_SAFE_NAME
from adainfer_hf.policy.gate import LinearGate


def test_it_fires_everywhere_through_the_device_path(monkeypatch):
    est = AlwaysExit().fit(np.zeros((1, 2)))
    feats = torch.tensor(np.random.default_rng(0).normal(size=(50, 2)) * 10, dtype=torch.float32)
    assert est.predict(feats.numpy()).tolist() == [1] * 50
    clf = ExitClassifier(est)
    assert clf._scorer is not None and clf._scorer.kind == "linear"
    for method in ("predict", "decision_function"):  # the fast path never calls the estimator
        monkeypatch.setattr(est, method, lambda *a, **k: pytest.fail("sklearn called"))
    assert clf.decide(feats, layer=1, rows=torch.arange(50)).tolist() == [True] * 50
    with pytest.raises(ValueError, match="X has 3 feature"):
        AlwaysExit().fit(np.zeros((1, 2))).decision_function(np.zeros((1, 3)))
    with pytest.raises(NotFittedError):
        AlwaysExit().predict(np.zeros((1, 2)))


def test_it_is_saved_without_pickle_and_stores_no_margin(tmp_path):
    from safetensors import safe_open

    ExitClassifier(AlwaysExit().fit(np.zeros((1, 2)))).save_pretrained(tmp_path)
    with safe_open(tmp_path / CLASSIFIER_SAFE_NAME, framework="np") as f:
        assert list(f.keys()) == ["classes_"]  # coef_ / intercept_ are derived: a file cannot change them
    loaded = ExitClassifier.from_pretrained(tmp_path)
    assert type(loaded.estimator) is AlwaysExit and loaded.estimator.n_features_in_ == 2


@pytest.mark.parametrize("variant", ["llama_gqa", "gemma3_text"])
def test_a_gated_always_exit_exits_where_the_rule_it_replaces_exits(variant):
    _, ada = make_pair(variant)
    ids, mask = batch("left")
    H = ada.config.hidden_size
    weight = np.random.default_rng(0).normal(size=(3, H)).astype(np.float32)
    gate = LinearGate([1, 2, 3], weight, np.zeros(3), np.array([0.5, 0.0, -0.5]))
    ours = ExitClassifier(AlwaysExit().fit(np.zeros((1, 2))), gate=gate)
    old = ExitClassifier(GapThresholdRule(threshold=-1.0).fit(np.zeros((1, 2))), gate=gate)
    assert ours.exits_where_gate_passes() and old.exits_where_gate_passes()
    with torch.no_grad():
        out = ada(ids, attention_mask=mask, use_cache=False, exit_policy=ours)
        ref = ada(ids, attention_mask=mask, use_cache=False, exit_policy=old)
    assert out.exit_layers.tolist() == ref.exit_layers.tolist()
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
