"""The drafting cost model (`training.cost_model`): measured on the model, predictions built from the parts."""

import json
import warnings

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from tiny_models import make_pair

from adainfer_hf.training import cost_model as cost_module
from adainfer_hf.training.cost_model import CostModel, measure_cost_model, nondecreasing_fit


@pytest.fixture(scope="module")
def cost():
    _, ada = make_pair("llama_gqa")
    return measure_cost_model(ada, cache_length=16, max_positions=4, vocabularies=(8,), repeats=3, decode_tokens=4)


def test_measured_parts_and_record(cost):
    assert cost.num_layers == 4 and len(cost.layer_seconds) == 4 and len(cost.head_seconds) == 4
    assert set(cost.lens_seconds) == {"full", "8"} and cost.stock_step() > 0
    assert all(s > 0 for s in (*cost.layer_seconds, *cost.head_seconds, cost.gate_seconds))
    assert CostModel.from_dict(json.loads(json.dumps(cost.to_dict()))) == cost
    # the layers are scaled to the whole: L of them and the head on one position make the measured stock step
    assert cost.num_layers * cost.layer_seconds[0] + cost.head_seconds[0] == pytest.approx(cost.stock_step())


def test_step_predictions_are_sums_of_measured_parts(cost):
    L, fixed = cost.num_layers, cost.loop_fixed_seconds
    # a draft after layer 2, two checks, one owed position at frontier 1: layer 1 on one position, layer 2 on two
    assert cost.draft_step_seconds(2, 2, (1,)) == pytest.approx(
        fixed + cost.layer_seconds[0] + cost.layer_seconds[1] + 2 * cost.lens_seconds["full"])
    assert cost.verify_step_seconds((1, 3), checks=1) == pytest.approx(
        fixed + cost.layer_seconds[0] + 2 * cost.layer_seconds[1] + cost.layer_seconds[2]
        + cost.lens_seconds["full"] + cost.head_seconds[2])
    # monotone: a deeper exit, more checks, more owed positions never cost less
    assert cost.draft_step_seconds(1, 1) <= cost.draft_step_seconds(2, 1) <= cost.draft_step_seconds(2, 2)
    # (one position runs another kernel and stands alone: only n >= 2 positions are fit non-decreasing)
    assert cost.verify_step_seconds((1,)) <= cost.verify_step_seconds((1, 1)) <= cost.verify_step_seconds((1, 1, 1))
    assert cost.layer(10) >= cost.layer(4)  # extrapolated past the measured positions, never down
    assert cost.verify_step_seconds(()) == pytest.approx(fixed + L * cost.layer_seconds[0] + cost.head_seconds[0])


def test_bad_values_are_named(cost):
    with pytest.raises(ValueError, match="exit_layer"):
        cost.draft_step_seconds(cost.num_layers, 1)
    with pytest.raises(ValueError, match="16"):
        cost.check(16)
    with pytest.raises(ValueError, match="bogus"):
        CostModel.from_dict({**cost.to_dict(), "bogus": 1})
    _, ada = make_pair("llama_gqa")
    with pytest.raises(ValueError, match="repeats"):
        measure_cost_model(ada, repeats=0)


@pytest.mark.parametrize("seed", range(6))
def test_nondecreasing_fit_is_the_isotonic_regression(seed):
    """The fit of noisy medians is scikit-learn's isotonic regression (least squares, non-decreasing); one outlier
    no longer raises every later value (the running maximum did)."""
    values = np.random.default_rng(seed).normal(1.0, 0.3, size=9).tolist()
    ref = IsotonicRegression(increasing=True).fit_transform(np.arange(9), values)
    np.testing.assert_allclose(nondecreasing_fit(values), ref, rtol=1e-12)
    assert nondecreasing_fit([1.0, 5.0, 1.2, 1.3, 1.4]) == pytest.approx([1.0, 2.225, 2.225, 2.225, 2.225])


def test_one_position_stands_alone_and_the_rest_is_fit(cost):
    """The head on one position may cost more than on two (another kernel); n >= 2 are fit non-decreasing."""
    record = {**cost.to_dict(), "head_seconds": [4.0, 1.0, 3.0, 2.0], "layer_seconds": [1.0, 2.0, 1.5, 3.0]}
    fitted = CostModel.from_dict(record)
    assert fitted.head_seconds == pytest.approx((4.0, 1.0, 2.5, 2.5))
    assert fitted.layer_seconds == pytest.approx((1.0, 1.75, 1.75, 3.0))


def test_parts_that_disagree_with_the_whole_are_remeasured_then_reported(monkeypatch):
    """When L layers and the head on one position are far from the measured stock step (a busy machine), the
    measurement is repeated `attempts` times, then kept with a warning and `consistent` False."""
    _, ada = make_pair("llama_gqa")
    real = cost_module._decode_steps
    calls = []

    def busy(*args):
        calls.append(1)
        steps = real(*args)
        return {kind: seconds / 50 for kind, seconds in steps.items()}  # the whole step 50x faster than its parts

    monkeypatch.setattr(cost_module, "_decode_steps", busy)
    with pytest.warns(UserWarning, match="parts disagree with the whole after 2"):
        cost = measure_cost_model(ada, cache_length=8, max_positions=2, repeats=1, decode_tokens=2, attempts=2)
    assert len(calls) == 2 and cost.attempts == 2 and not cost.consistent and cost.parts_over_stock > 1.15
    monkeypatch.setattr(cost_module, "_decode_steps", real)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = measure_cost_model(ada, cache_length=8, max_positions=2, repeats=3, decode_tokens=4, attempts=3)
    assert quiet.parts_over_stock is not None and quiet.attempts >= 1


def test_the_few_rows_forms_the_timings_ran_are_recorded(monkeypatch):
    """`CostModel.kernels` names, for every linear weight of the timed layer on 2..max_positions rows, the form the
    few-rows routing chose (`few_rows.kernel_choices()`), and the setting; a fixed setting chooses nothing."""
    import torch

    from adainfer_hf.architectures import few_rows

    _, ada = make_pair("llama_gqa")
    monkeypatch.setattr(few_rows, "MIN_WEIGHT_ELEMENTS", 0)  # route the tiny weights as a real model's
    monkeypatch.setattr(few_rows, "KERNEL", "auto")
    few_rows.clear_kernel_choices()
    cost = measure_cost_model(ada, cache_length=8, max_positions=3, repeats=1, decode_tokens=2)
    assert cost.kernels["setting"] == "auto"
    threads = torch.get_num_threads()
    layer = ada.model.layers[0]
    expected = {}
    for m in layer.modules():
        if type(m) is torch.nn.Linear:
            for rows in (2, 3):
                key = (tuple(m.weight.shape), m.weight.dtype, rows, m.bias is not None, threads)
                name = f"{m.weight.shape[0]}x{m.weight.shape[1]} float32 rows{rows}"
                expected[f"{name}{' bias' if m.bias is not None else ''} threads{threads}"] = (
                    few_rows.kernel_choices()[key])
    assert expected and set(expected.values()) <= {"product", "linear"}
    assert expected.items() <= cost.kernels["chosen"].items()
    assert CostModel.from_dict(json.loads(json.dumps(cost.to_dict()))) == cost

    monkeypatch.setattr(few_rows, "KERNEL", "product")
    few_rows.clear_kernel_choices()
    fixed = measure_cost_model(ada, cache_length=8, max_positions=3, repeats=1, decode_tokens=2)
    assert fixed.kernels == {"setting": "product", "chosen": {}}
    few_rows.clear_kernel_choices()
