"""A gate in front of the checks, end to end: the decoder loop computes the LM head only for the rows the gate
passes (against the stock model's hidden states and logit lens), a gate that never passes is the stock model,
calibration and the schedule see what runs, and the artifact stores the gate safely."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import (
    VARIANTS,
    assert_scores_are_the_no_cache_lens,
    batch,
    generate_greedy,
    make_pair,
    task_tokenizer,
    tiny_pair,
    tiny_prompts,
)

from adainfer_hf import AlwaysExit, ExitClassifier, GapThresholdRule, ScriptedExit
from adainfer_hf.architectures import core as arch
from adainfer_hf.artifact.constants import CLASSIFIER_GATE_NAME
from adainfer_hf.policy.gate import LinearGate, rms_normalize
from adainfer_hf.training.calibrate import exit_scores, simulate_exits
from adainfer_hf.training.collect import collect_features
from adainfer_hf.training.config import CalibrationConfig, GateConfig, ScheduleConfig, TrainingConfig
from adainfer_hf.training.schedule import schedule_cost
from adainfer_hf.training.train import train_on_tables

L = 4


def _always_fires(**fields):
    """A classifier that fires at every check (`AlwaysExit`): only the gate decides where a row stops."""
    return ExitClassifier(AlwaysExit().fit(np.zeros((1, 2))), **fields)


def _gate(thresholds, hidden_size, weight=None):
    weight = np.zeros((len(thresholds), hidden_size), np.float32) if weight is None else weight
    return LinearGate(range(1, len(thresholds) + 1), weight, np.zeros(len(thresholds)), thresholds)


def _head_rows(model):
    """Counts the rows each LM-head call sees (a forward hook on the output embedding)."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))
    return seen, handle


def _lens_reading(gate):
    """Fires at every check too, but through `decide` on the check's features: its checks compute the head."""
    policy = ScriptedExit(1, check_every_layer=True)
    policy.gate = gate
    return policy


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_350m_layout", "gemma3_text"])
@pytest.mark.parametrize("rule", ["reads_the_lens", "exits_where_the_gate_passes"])
@pytest.mark.parametrize("others", ["exit_at_3", "run_on"])
def test_the_gate_picks_the_rows_whose_check_computes_the_head(variant, rule, others):
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    H = stock.config.hidden_size
    B = ids.shape[0]
    # Layer 2's probe splits the batch on the stock hidden states: all but the lowest-scoring row pass.
    w = np.random.default_rng(0).normal(size=H).astype(np.float32)
    scores = rms_normalize(ref.hidden_states[2][:, -1]).numpy() @ w
    low = np.sort(scores)
    cut = float(low[0] + low[1]) / 2
    weight = np.zeros((L - 1, H), np.float32)
    weight[1] = w
    gate = _gate([np.inf, cut, -np.inf if others == "exit_at_3" else np.inf], H, weight)
    passing = scores >= cut
    assert 0 < passing.sum() < len(scores)
    policy = _lens_reading(gate) if rule == "reads_the_lens" else _always_fires(gate=gate)
    assert policy.exits_where_gate_passes() == (rule == "exits_where_the_gate_passes")
    seen, handle = _head_rows(ada)
    try:
        with torch.no_grad():
            out = ada(ids, attention_mask=mask, use_cache=False, logits_to_keep=1, exit_policy=policy)
    finally:
        handle.remove()
    with torch.no_grad():
        every = ada(ids, attention_mask=mask, use_cache=False, exit_policy=policy)  # every position's logits
    expected = np.where(passing, 2, 3 if others == "exit_at_3" else L)
    assert out.exit_layers.tolist() == expected.tolist() == every.exit_layers.tolist()
    if rule == "reads_the_lens":
        # layer 1: no head; layer 2: the passing rows; layer 3: the others (if the gate passes them); the final
        # head for the rows that ran every layer (logits_to_keep=1 reuses the check logits of the others)
        running = int((expected == L).sum())
        assert seen == [int(passing.sum())] + ([int((~passing).sum())] if others == "exit_at_3" else [running])
    else:
        assert seen == [B]  # no lens at the checks: one head after the loop, over every row's frozen state
    for row, k in enumerate(expected):
        k = int(k)
        lens = ref.logits[row] if k == L else arch.ExitHead(stock).logits(ref.hidden_states[k][row])
        assert (out.logits[row, -1] - lens[-1]).abs().max() <= 1e-5
        real = mask[row].bool()
        assert (every.logits[row][real] - lens[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["llama_gqa", "gemma3_text"])
def test_exits_where_the_gate_passes_match_a_no_cache_recompute_in_exact_generation(variant):
    """The exact cache with lens-free exits (rows that exit keep running for the cache while others catch up):
    every generated token is the stock no-cache forward's logit lens at its recorded exit layer."""
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    H = stock.config.hidden_size
    gate = _gate([0.0] * (L - 1), H, np.random.default_rng(3).normal(size=(L - 1, H)).astype(np.float32))
    clf = _always_fires(gate=gate)
    seen, handle = _head_rows(ada)
    try:
        with torch.no_grad():
            out = ada.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               exit_policy=clf, exit_cache="exact", return_dict_in_generate=True, output_scores=True)
    finally:
        handle.remove()
    exits = out.exit_layers
    # steps where rows exit after different layers: the earlier ones ran on for the cache
    assert any(len(set(exits[:, t].tolist())) > 1 and int(exits[:, t].min()) < L for t in range(exits.shape[1]))
    assert seen == [ids.shape[0]] * exits.shape[1]  # one head per step, exited rows' frozen states included
    assert_scores_are_the_no_cache_lens(stock, out, ids, mask)


def test_which_classifiers_exit_wherever_their_gate_passes():
    gate = _gate([0.0] * (L - 1), 7)
    assert _always_fires(gate=gate).exits_where_gate_passes()
    assert not _always_fires().exits_where_gate_passes()  # no gate: every check fires
    assert _always_fires(gate=gate, threshold=0.5).exits_where_gate_passes()  # margin 1 >= 0.5
    assert not _always_fires(gate=gate, threshold=1.5).exits_where_gate_passes()  # margin 1 < 1.5: never fires
    # gate_only classifiers saved before AlwaysExit hold GapThresholdRule(threshold=-1): gap + 1 > 0 everywhere
    gap_plus_one = GapThresholdRule(threshold=-1.0).fit(np.zeros((1, 2)))
    assert ExitClassifier(gap_plus_one, gate=gate).exits_where_gate_passes()
    assert ExitClassifier(gap_plus_one, gate=gate, threshold=0.5).exits_where_gate_passes()  # gap + 1 >= 0.5
    assert not ExitClassifier(gap_plus_one, gate=gate, threshold=1.5).exits_where_gate_passes()  # gap >= 0.5
    rule = GapThresholdRule(threshold=0.2).fit(np.zeros((1, 2)))
    assert not ExitClassifier(rule, gate=gate).exits_where_gate_passes()
    on_top_prob = GapThresholdRule(feature_index=1, threshold=-0.1).fit(np.zeros((1, 2)))
    assert ExitClassifier(on_top_prob, gate=gate).exits_where_gate_passes()
    on_cosine = GapThresholdRule(threshold=-0.5).fit(np.zeros((1, 2)))  # a cosine can be below -0.5
    assert not ExitClassifier(on_cosine, features=("cos_hidden", "gap"), gate=gate).exits_where_gate_passes()
    assert not ScriptedExit(2).exits_where_gate_passes()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_gate_that_never_passes_is_the_stock_model_and_computes_one_head(variant):
    stock, ada = make_pair(variant)
    ids, mask = batch("left")
    clf = _always_fires(gate=_gate([np.inf] * (L - 1), stock.config.hidden_size))
    seen, handle = _head_rows(ada)
    try:
        with torch.no_grad():
            out = ada(ids, attention_mask=mask, use_cache=False, logits_to_keep=1, exit_policy=clf)
    finally:
        handle.remove()
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    assert seen == [ids.shape[0]]  # the final head only
    assert out.exit_layers.tolist() == [L] * ids.shape[0]
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    for mode in ("propagate", "exact"):
        got = generate_greedy(ada, ids, mask, max_new_tokens=5, exit_policy=clf, exit_cache=mode)
        assert torch.equal(got, generate_greedy(stock, ids, mask, max_new_tokens=5))


def test_features_of_the_previous_lens_and_stateful_policies_are_refused_with_a_gate():
    gate = _gate([0.0] * (L - 1), 7)
    est = GapThresholdRule(threshold=0.5).fit(np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"\['delta_gap'\].*previous layer"):
        ExitClassifier(est, features=("gap", "delta_gap"), gate=gate)
    with pytest.raises(TypeError, match="LinearGate"):
        ExitClassifier(est, gate="linear")
    with pytest.raises(ValueError, match="probe after layer 3.*3 layers"):
        ExitClassifier(est, gate=gate, num_layers=3)
    _, ada = make_pair("llama_gqa")
    with pytest.raises(ValueError, match="hidden states of size 7.*hidden_size is 32"):
        ExitClassifier(est, gate=gate).validate_for(ada)

    class SequencePolicy(ScriptedExit):  # keeps per-call state, as a live CRF does
        def begin_run(self, batch_size):
            return {"seen": []}

        def decide(self, features, layer, rows, state=None):
            return torch.zeros(features.shape[0], dtype=torch.bool)

    policy = SequencePolicy(2)
    policy.gate = _gate([0.0] * (L - 1), 32)
    ids, mask = batch("left")
    with pytest.raises(ValueError, match="per-call state"), torch.no_grad():
        ada(ids, attention_mask=mask, exit_policy=policy)


def test_the_gate_survives_replace_save_and_load_and_a_changed_gate_is_refused(tmp_path):
    stock, ada = make_pair("llama_gqa")
    H = stock.config.hidden_size
    gate = _gate([np.inf, 0.0, -np.inf], H, np.random.default_rng(1).normal(size=(3, H)).astype(np.float32))
    clf = _always_fires(gate=gate).replace(threshold=-0.5)
    assert clf.gate is gate and clf.gate_fingerprint == gate.fingerprint()
    with pytest.raises(ValueError, match="read-only"):  # the fingerprint describes the arrays for good
        gate.weight[0, 0] = 1.0
    assert clf.replace(gate=None).gate_fingerprint is None
    clf.save_pretrained(tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "exit_classifier_config.json").read_text())
    assert config["gate_fingerprint"] == gate.fingerprint()
    back = ExitClassifier.from_pretrained(tmp_path / "clf")
    for name, value in gate.to_tensors().items():
        np.testing.assert_array_equal(back.gate.to_tensors()[name], value)
    ids, mask = batch("left")
    with torch.no_grad():
        a = ada(ids, attention_mask=mask, use_cache=False, exit_policy=clf)
        b = ada(ids, attention_mask=mask, use_cache=False, exit_policy=back)
    assert a.exit_layers.tolist() == b.exit_layers.tolist() and torch.equal(a.logits, b.logits)
    # a gate whose arrays do not match the config's fingerprint
    other = _gate([0.0, 0.0, 0.0], H).to_tensors()
    with pytest.raises(ValueError, match="fingerprint"):
        ExitClassifier._from_artifact(back.config, back.estimator, other)
    # a config naming a gate whose file is gone (the manifest lists the file too)
    (tmp_path / "clf" / CLASSIFIER_GATE_NAME).unlink()
    with pytest.raises((FileNotFoundError, ValueError), match=CLASSIFIER_GATE_NAME):
        ExitClassifier.from_pretrained(tmp_path / "clf")
    # re-saving without a gate removes the stale gate file
    clf.save_pretrained(tmp_path / "again")
    clf.replace(gate=None).save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again" / CLASSIFIER_GATE_NAME).exists()
    assert ExitClassifier.from_pretrained(tmp_path / "again").gate is None


def test_calibrated_gated_rule_on_the_table_is_what_the_model_runs():
    _, model = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(4)
    table = collect_features(model, tok, prompts, features=("gap", "top_prob"), progress=False, hidden_states=True)
    half = table.num_prompts // 2
    train, calib = table.select_prompts(range(half)), table.select_prompts(range(half, table.num_prompts))
    config = TrainingConfig(method="logistic", gate=GateConfig(kind="linear", recall=0.9),
                            schedule=ScheduleConfig(check_cost=None),
                            calibration=CalibrationConfig(target_agreement=0.5, delta=0.5))
    clf = train_on_tables(model, train, calib, config)
    assert clf.gate is not None and clf.gate_fingerprint == clf.gate.fingerprint()
    passed = clf.gate.passes_table(table.hidden, table.layer)
    assert 0 < passed.sum() < len(table)
    assert np.isneginf(exit_scores(clf, table)[~passed]).all()  # a gated-out row cannot fire
    # a rule that fires often, so that the gate is what stops some rows
    scores = exit_scores(clf, table)
    clf = clf.replace(threshold=float(np.quantile(scores[np.isfinite(scores)], 0.3)), min_layer=1, check_layers=None)
    expected, _ = simulate_exits(clf, table)
    ungated, _ = simulate_exits(clf.replace(gate=None), table)
    assert (expected >= ungated).all() and (expected > ungated).any()
    tok.padding_side = "left"
    enc = tok([p.text for p in prompts], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, use_cache=False, exit_policy=clf)
    assert out.exit_layers.tolist() == expected.tolist()


def test_a_gate_without_hidden_states_in_the_table_is_a_clear_error():
    _, model = tiny_pair()
    table = collect_features(model, task_tokenizer(), tiny_prompts(2), features=("gap", "top_prob"), progress=False)
    half = table.num_prompts // 2
    with pytest.raises(ValueError, match="hidden states"):
        train_on_tables(model, table.select_prompts(range(half)), table.select_prompts(range(half, table.num_prompts)),
                        TrainingConfig(method="logistic", gate=GateConfig(kind="linear"),
                                       schedule=ScheduleConfig(check_cost=None)))
    with pytest.raises(ValueError, match="gate kind='mlp' is not supported"):
        GateConfig(kind="mlp")


def test_schedule_cost_charges_the_gate_everywhere_and_the_head_where_it_passes():
    # two prompts, L = 4, checks after layers 1 and 2
    fires = np.array([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    agrees = np.ones_like(fires)
    passes = np.array([[0, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    exits, cost, _ = schedule_cost(fires, agrees, (1, 2), check_cost=5.0, passes=passes, gate_cost=0.1)
    assert exits.tolist() == [2, 4]
    # prompt 0: 2 layers + 2 gates + the head at layer 2 (its logits are the output)
    # prompt 1: 4 layers + 2 gates + the head at layer 1 + the final head
    assert cost.tolist() == pytest.approx([2 + 0.2 + 5.0, 4 + 0.2 + 5.0 + 5.0])
    _, ungated, _ = schedule_cost(fires, agrees, (1, 2), check_cost=5.0)
    assert ungated.tolist() == pytest.approx([2 + 10.0, 4 + 10.0 + 5.0])
