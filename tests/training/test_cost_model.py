"""The drafting cost model (`training.cost_model`): measured on the model, predictions built from the parts."""

import json

import pytest
from tiny_models import make_pair

from adainfer_hf.training.cost_model import CostModel, measure_cost_model


@pytest.fixture(scope="module")
def cost():
    _, ada = make_pair("llama_gqa")
    return measure_cost_model(ada, cache_length=16, max_positions=4, vocabularies=(8,), repeats=3, decode_tokens=4)


def test_measured_parts_and_record(cost):
    assert cost.num_layers == 4 and len(cost.layer_seconds) == 4 and len(cost.head_seconds) == 4
    assert set(cost.lens_seconds) == {"full", "8"} and cost.stock_step() > 0
    assert all(s > 0 for s in (*cost.layer_seconds, *cost.head_seconds, cost.gate_seconds))
    assert CostModel.from_dict(json.loads(json.dumps(cost.to_dict()))) == cost


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
    assert cost.verify_step_seconds(()) <= cost.verify_step_seconds((1,)) <= cost.verify_step_seconds((1, 1))
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
