"""The linear gate: fitted probes against scikit-learn's own decision function, recall, torch == numpy paths,
safe round trip, and clear errors for malformed arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from adainfer_hf.policy.gate import GATEABLE_FEATURES, LinearGate, fit_linear_gate, rms_normalize


def _rows(n=300, H=16, layers=(1, 2, 3), seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n * len(layers), H)).astype(np.float32)
    layer = np.repeat(np.asarray(layers), n)
    # agreement depends linearly on the normalised state, more so at deeper layers
    direction = rng.normal(size=H)
    score = rms_normalize(hidden) @ direction + 0.8 * (layer - 2)
    label = score + rng.normal(scale=0.5, size=score.shape) > 0
    return hidden, layer, label


def test_probe_scores_are_the_logistic_regression_decision_function():
    hidden, layer, label = _rows()
    gate = fit_linear_gate(hidden, layer, label, recall=0.95)
    at = layer == 2
    x = rms_normalize(hidden[at])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    ref = LogisticRegression(C=1.0, class_weight="balanced", max_iter=500).fit((x - mean) / scale, label[at])
    np.testing.assert_allclose(gate.scores(hidden[at], layer[at]), ref.decision_function((x - mean) / scale),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recall", [0.9, 0.99, 1.0])
def test_thresholds_keep_the_requested_recall_and_gate_out_negatives(recall):
    hidden, layer, label = _rows()
    gate = fit_linear_gate(hidden, layer, label, recall=recall)
    passed = gate.passes_table(hidden, layer)
    for k in (1, 2, 3):
        at = layer == k
        assert passed[at][label[at]].mean() >= recall - 1e-9
    # the point of a gate: it stops most rows that do not agree
    assert passed[~label].mean() < 0.6


def test_degenerate_layers_never_or_always_pass():
    hidden, layer, _ = _rows(n=50)
    label = np.where(layer == 1, False, True)
    gate = fit_linear_gate(hidden, layer, label)
    passed = gate.passes_table(hidden, layer)
    assert not passed[layer == 1].any() and passed[layer > 1].all()


def test_torch_path_equals_the_numpy_path_and_ungated_layers_pass():
    hidden, layer, label = _rows()
    gate = fit_linear_gate(hidden, layer, label, layers=(2, 3))
    for k in (2, 3):
        at = layer == k
        got = gate.passes(torch.from_numpy(hidden[at]), k)
        assert torch.equal(got, torch.from_numpy(gate.passes_table(hidden[at], layer[at])))
    assert gate.passes(torch.from_numpy(hidden[:3]), 1) is None  # no probe at layer 1
    assert gate.passes_table(hidden[layer == 1], layer[layer == 1]).all()


def test_round_trip_through_arrays_and_fingerprint():
    gate = fit_linear_gate(*_rows())
    again = LinearGate.from_tensors(gate.to_tensors())
    assert again.fingerprint() == gate.fingerprint()
    hidden, layer, _ = _rows(seed=3)
    assert np.array_equal(again.passes_table(hidden, layer), gate.passes_table(hidden, layer))
    other = fit_linear_gate(*_rows(seed=1))
    assert other.fingerprint() != gate.fingerprint()


def test_malformed_arrays_are_refused_by_name():
    gate = fit_linear_gate(*_rows(n=40))
    tensors = gate.to_tensors()
    bad = dict(tensors, **{"gate.bias": np.zeros(5, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"exit_gate.safetensors: LinearGate bias must have shape \(3,\)"):
        LinearGate.from_tensors(bad, source="exit_gate.safetensors")
    with pytest.raises(ValueError, match="missing gate arrays"):
        LinearGate.from_tensors({k: v for k, v in tensors.items() if k != "gate.weight"})
    with pytest.raises(ValueError, match="recall must be in"):
        fit_linear_gate(*_rows(n=10), recall=0.0)


def test_gateable_features_exclude_those_that_read_the_previous_lens():
    assert {"gap", "top_prob", "cos_hidden"} <= set(GATEABLE_FEATURES)
    assert not {"delta_gap", "delta_top_prob", "kl_prev"} & set(GATEABLE_FEATURES)
