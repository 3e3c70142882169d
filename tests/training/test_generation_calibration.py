"""Calibrating exits for generation: tables of generated tokens, sequences as the draws, the gate as the knob.

References: the stock model's own greedy `generate` and a no-cache recompute of its logit lens on each prefix; the
Hoeffding-Bentkus formula written out with scipy and checked for validity by simulation; the live model running
the calibrated rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom
from tiny_models import WINDOW, gemma3_config, qwen2_config, task_tokenizer, tiny_pair, tiny_prompts
from transformers import Gemma3ForCausalLM, Qwen2ForCausalLM

from adainfer_hf import AdaInferGemma3ForCausalLM, AdaInferQwen2ForCausalLM
from adainfer_hf.architectures import core as arch
from adainfer_hf.policy.gate import LinearGate
from adainfer_hf.training import FeatureTable, calibrate, collect_generation_features, simulate_exits
from adainfer_hf.training.calibrate import exit_scores
from adainfer_hf.training.config import (
    CalibrationConfig,
    GateConfig,
    GenerationCalibrationConfig,
    ScheduleConfig,
    TrainingConfig,
)
from adainfer_hf.training.schedule import schedule_classifier
from adainfer_hf.training.train import train_and_calibrate, train_exit_classifier, train_on_tables
from adainfer_hf.utils.stats import hb_p_value, hb_upper_bound, risk_p_value, risk_upper_bound

T = 4


def _pair(variant):
    """A stock model and its AdaInfer twin on the tiny tokenizer's vocabulary (Qwen2 with sliding-window layers
    past the prompts' length, Gemma3 with local/global layers and softcapping)."""
    if variant in ("llama", "opt"):
        return tiny_pair(variant)
    vocab = len(task_tokenizer())
    if variant == "qwen2_sliding":
        config = qwen2_config(vocab_size=vocab, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                              initializer_range=0.3)
        classes = Qwen2ForCausalLM, AdaInferQwen2ForCausalLM
    else:
        config = gemma3_config(vocab_size=vocab, initializer_range=0.3)
        classes = Gemma3ForCausalLM, AdaInferGemma3ForCausalLM
    torch.manual_seed(0)
    stock = classes[0](config).eval()
    ada = classes[1](config).eval()
    ada.load_state_dict(stock.state_dict())
    return stock, ada


@pytest.mark.parametrize("variant", ["llama", "opt", "qwen2_sliding", "gemma3"])
def test_generation_rows_are_the_stock_greedy_tokens_and_their_logit_lens(variant):
    stock, ada = _pair(variant)
    tok = task_tokenizer()
    prompts = tiny_prompts(2, (0, 2))[:5]
    L = arch.spec_of(ada).num_layers(ada)
    table = collect_generation_features(ada, tok, prompts, new_tokens=T, features=("gap", "top_prob"),
                                        batch_size=3, progress=False, hidden_states=True, first_layer=2)
    assert table.num_prompts == len(prompts) * T and table.is_generation and table.num_sequences == len(prompts)
    assert table.meta["phase"] == "generation" and (table.gold_token == -1).all()
    assert sorted(set(table.layer.tolist())) == list(range(2, L))  # layers below first_layer have no rows
    for s, prompt in enumerate(prompts):
        ids = tok(prompt.text, return_tensors="pt")["input_ids"]  # unpadded: independent of the batch
        with torch.no_grad():
            ref = stock.generate(ids, max_new_tokens=T, min_new_tokens=T, do_sample=False, pad_token_id=0)
        units = np.flatnonzero(table.sequence == s)
        assert table.step[units].tolist() == list(range(T))
        assert table.final_token[units].tolist() == ref[0, ids.shape[1]:].tolist()
        for unit, t in zip(units, range(T), strict=True):
            with torch.no_grad():  # a no-cache recompute of the prefix the step saw
                hs = stock(ref[:, : ids.shape[1] + t], output_hidden_states=True, use_cache=False).hidden_states
            for row in np.flatnonzero(table.prompt_id == unit):
                k = int(table.layer[row])
                probs = arch.ExitHead(stock).logits(hs[k][0, -1]).detach().float().softmax(-1).topk(2).values
                assert abs(table.X[row, 1] - float(probs[0])) < 2e-4
                assert abs(table.X[row, 0] - float(probs[0] - probs[1])) < 2e-4
                np.testing.assert_allclose(table.hidden[row].astype(np.float32), hs[k][0, -1].numpy(), rtol=3e-3,
                                           atol=3e-3)


def test_generation_collection_checks_its_arguments():
    _, ada = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(1, (0,))
    with pytest.raises(ValueError, match=r"first_layer must be an int in \[1, 3\].*got 4"):
        collect_generation_features(ada, tok, prompts, first_layer=4, progress=False)
    with pytest.raises(ValueError, match="new_tokens must be an int >= 1; got 0"):
        collect_generation_features(ada, tok, prompts, new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        collect_generation_features(ada, tok, [], progress=False)


def test_table_sequences_and_steps_survive_files_selection_and_concat(tmp_path):
    _, ada = tiny_pair()
    table = collect_generation_features(ada, task_tokenizer(), tiny_prompts(1, (0,)), new_tokens=3,
                                        features=("gap",), progress=False)
    table.save(tmp_path / "g.npz")
    back = FeatureTable.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(back.sequence, table.sequence)
    np.testing.assert_array_equal(back.step, table.step)
    both = FeatureTable.concat([table, back])
    assert both.num_sequences == 2 * table.num_sequences  # sequence ids are shifted, not merged
    picked = table.select_prompts([4, 5])
    assert picked.sequence.tolist() == table.sequence[[4, 5]].tolist() and picked.step.tolist() == [1, 2]


# ------------------------------------------------------------------------------------------------ statistics
def test_hoeffding_bentkus_p_value_is_the_published_formula():
    for n, mean, alpha in [(100, 0.01, 0.05), (400, 0.02, 0.05), (50, 0.3, 0.1), (30, 0.0, 0.2), (80, 0.5, 0.1)]:
        a = min(mean, alpha)
        kl = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
        expected = min(1.0, math.exp(-n * kl), math.e * binom.cdf(math.ceil(n * mean), n, alpha))
        assert hb_p_value(mean, n, alpha) == pytest.approx(expected, rel=1e-9)
    bound = hb_upper_bound(0.02, 400, 0.0125)
    assert 0.02 < bound < 0.05
    assert hb_p_value(0.02, 400, bound) <= 0.0125 < hb_p_value(0.02, 400, bound - 1e-3)


def test_hoeffding_bentkus_test_is_valid_for_token_shares():
    # per-sequence losses = share of 8 dependent tokens that disagree, risk exactly alpha: H0 holds, so the test
    # may reject at level delta at most a delta share of the time
    rng = np.random.default_rng(0)
    alpha, delta, n, reps = 0.1, 0.1, 60, 3000
    bad_sequence = rng.random((reps, n)) < 0.25  # dependence: a bad sequence disagrees on 40% of its tokens
    losses = np.where(bad_sequence, rng.binomial(8, 0.4, (reps, n)), 0) / 8  # E = 0.25 * 0.4 = alpha
    rejected = np.mean([hb_p_value(float(m), n, alpha) <= delta for m in losses.mean(1)])
    assert rejected <= delta
    # treating the tokens as independent draws would not be: the binomial test on all 480 tokens rejects a true H0
    # far more often than delta
    tokens = np.repeat(losses[..., None], 8, -1) * 8 >= np.arange(1, 9)  # per-token 0/1 losses, same totals
    naive = np.mean([risk_p_value(tok.reshape(-1), None, alpha) <= delta for tok in tokens[:500]])
    assert naive > 2 * delta


def test_grouped_risk_bound_counts_sequences_not_tokens():
    losses = np.zeros(400, dtype=bool)
    losses[:8] = True
    groups = np.repeat(np.arange(40), 10)  # 40 sequences of 10 tokens
    per_token = risk_upper_bound(losses, None, 0.1)
    grouped = risk_upper_bound(losses, groups, 0.1)
    assert per_token < grouped  # 400 draws bound tighter than 40
    assert grouped == pytest.approx(hb_upper_bound(8 / 400, 40, 0.1))


# ------------------------------------------------------------------------------------------------ calibration
def _generation_table(n_seq, steps, L=6, seed=0, hidden_size=8):
    """A synthetic generation table: every unit settles at a random layer; the gap grows with depth and barely
    with settling; the hidden state's first coordinate says "settled", noisily (what a probe reads better than the
    gap, though a recall-0.99 gate still passes many unsettled rows)."""
    rng = np.random.default_rng(seed)
    P = n_seq * steps
    settle = rng.integers(2, L + 1, P)
    layer = np.tile(np.arange(1, L), P)
    pid = np.repeat(np.arange(P), L - 1)
    agree = layer >= settle[pid]
    gap = np.clip(0.1 * layer + 0.05 * agree + rng.normal(0, 0.15, P * (L - 1)), 0, 1)
    hidden = rng.normal(0, 1, (P * (L - 1), hidden_size))
    hidden[:, 0] = np.where(agree, 1.5, -1.5) + rng.normal(0, 1.0, P * (L - 1))
    final = rng.integers(10, 20, P)
    top = np.where(agree, final[pid], 99)
    return FeatureTable(X=np.stack([gap, gap], 1), feature_names=("gap", "top_prob"), layer=layer, prompt_id=pid,
                        top_token=top, task=["t"] * P, shots=[0] * P, example_index=np.arange(P),
                        final_token=final, gold_token=[-1] * P, num_layers=[L] * P, hidden=hidden,
                        sequence=np.repeat(np.arange(n_seq), steps), step=np.tile(np.arange(steps), n_seq))


def test_generation_calibration_certifies_the_per_sequence_share_of_agreeing_tokens():
    train, calib = _generation_table(60, 6, seed=1), _generation_table(150, 6, seed=2)
    clf = train_exit_classifier(train, method="logistic")
    cal = calibrate(clf, calib, target_agreement=0.9, delta=0.1)
    figures = cal.calibration
    assert figures["n_sequences"] == 150 and "Hoeffding-Bentkus" in figures["p_value"]
    assert not figures["never_exit"]
    # the chosen rule replayed on the table: its per-sequence disagreement passes the HB test at delta / grid
    exit_layer, summary = simulate_exits(cal, calib)
    L = 6
    top = np.full((calib.num_prompts, L - 1), -1)
    top[calib.prompt_id, calib.layer - 1] = calib.top_token
    wrong = np.array([e < L and top[u, e - 1] != calib.final_token[u] for u, e in enumerate(exit_layer)])
    per_seq = np.bincount(calib.sequence, weights=wrong) / np.bincount(calib.sequence)
    n_grid = len(figures["min_layer_grid"])
    assert hb_p_value(per_seq.mean(), 150, 0.1) <= 0.1 / n_grid
    assert summary["agreement"] == pytest.approx(1 - wrong.mean())
    assert "tokens of 150 calibration generations" in figures["conclusion"]
    # the same units counted as independent prompts certify at least as many exits: grouping is the cautious side
    as_prompts = FeatureTable(**{**calib.__dict__, "sequence": None, "step": None})
    loose = calibrate(clf, as_prompts, target_agreement=0.9, delta=0.1)
    assert simulate_exits(loose, as_prompts)[1]["mean_exit_layer"] <= summary["mean_exit_layer"]


def _gated(clf, table, recall=0.99):
    from adainfer_hf.policy.gate import fit_linear_gate

    return clf.replace(gate=fit_linear_gate(table.hidden, table.layer, table.labels("final"), recall=recall))


def test_the_gate_knob_shifts_the_gate_and_keeps_the_classifier_decision():
    train, calib = _generation_table(60, 6, seed=1), _generation_table(150, 6, seed=2)
    clf = _gated(train_exit_classifier(train, method="logistic"), train)
    by_classifier = calibrate(clf, calib, target_agreement=0.9, delta=0.1)
    by_gate = calibrate(clf, calib, target_agreement=0.9, delta=0.1, knob="gate")
    offset = by_gate.calibration["gate_offset"]
    assert by_gate.threshold == clf.threshold and by_gate.calibration["knob"] == "gate"
    finite = np.isfinite(clf.gate.threshold)
    np.testing.assert_allclose(by_gate.gate.threshold[finite], clf.gate.threshold[finite] + offset, rtol=1e-6)
    assert by_gate.gate_fingerprint == by_gate.gate.fingerprint() != clf.gate_fingerprint
    # the probe reads what the gap cannot: with it as the knob, generations exit earlier at the same target
    assert simulate_exits(by_gate, calib)[1]["mean_exit_layer"] < simulate_exits(by_classifier, calib)[1][
        "mean_exit_layer"]
    assert simulate_exits(by_gate, calib)[1]["agreement"] >= 0.9
    with pytest.raises(ValueError, match="knob='gate' calibrates the gate's thresholds, but the classifier has no"):
        calibrate(train_exit_classifier(train, method="logistic"), calib, knob="gate")
    with pytest.raises(ValueError, match="knob='probe' is not supported"):
        calibrate(clf, calib, knob="probe")


def test_shifted_gate_and_margins():
    gate = LinearGate([1, 2, 3], np.eye(3, 4), [0.0, 0.0, 0.0], [0.5, np.inf, -np.inf])
    hidden = np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [1.0, 1, 1, 1]])
    layer = np.array([1, 2, 3, 4])
    margins = gate.margins(hidden, layer)
    score_1 = 2.0 / math.sqrt(1.0 + 1e-6)  # the probe reads h / rms(h); rms = 1 here
    assert margins[0] == pytest.approx(score_1 - 0.5, rel=1e-5)
    assert margins[1] == -np.inf and margins[2] == np.inf and margins[3] == np.inf  # never / always / ungated
    stricter = gate.shifted(score_1)
    assert stricter.threshold[0] == pytest.approx(0.5 + score_1) and np.isinf(stricter.threshold[1:]).all()
    assert gate.passes_table(hidden, layer).tolist() == [True, False, True, True]
    assert stricter.passes_table(hidden, layer).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="offset must be a finite number; got inf"):
        gate.shifted(float("inf"))


def test_generation_schedules_use_first_tokens_for_prompts_and_decode_steps_for_decode():
    train, calib = _generation_table(60, 6, seed=1), _generation_table(150, 6, seed=2)
    clf = calibrate(train_exit_classifier(train, method="logistic"), train, target_agreement=0.9, delta=0.1)
    clf = calibrate(clf, calib, target_agreement=0.9, delta=0.1)
    schedule_classifier(clf, calib, check_cost=0.5, decode_check_cost=0.5)
    figures = clf.calibration
    assert figures["schedule"]["procedure"].startswith("exact binomial")  # first tokens: one per sequence
    assert figures["decode_schedule"]["procedure"].startswith("Hoeffding-Bentkus")
    # an independent replay of the decode schedule on the decode steps alone
    decode = calib.select_prompts(np.flatnonzero(calib.step > 0))
    replay = simulate_exits(clf.replace(check_layers=clf.decode_check_layers), decode)[1]
    assert replay["agreement"] == pytest.approx(figures["decode_schedule"]["agreement"])
    assert replay["mean_exit_layer"] == pytest.approx(figures["decode_schedule"]["mean_layers"])


def test_gate_knob_rule_on_a_generation_table_is_what_generate_runs():
    _, model = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(4, (0,))
    table = collect_generation_features(model, tok, prompts, new_tokens=T, features=("gap", "top_prob"),
                                        progress=False, hidden_states=True)
    half = table.num_sequences // 2
    train = table.select_prompts(np.flatnonzero(table.sequence < half))
    calib = table.select_prompts(np.flatnonzero(table.sequence >= half))
    config = TrainingConfig(method="logistic", gate=GateConfig(kind="linear", recall=0.9),
                            schedule=ScheduleConfig(check_cost=None),
                            calibration=CalibrationConfig(target_agreement=0.5, delta=0.5, knob="gate"))
    clf = train_on_tables(model, train, calib, config)
    assert clf.calibration["knob"] == "gate"
    scores = clf.gate.margins(table.hidden, table.layer)
    # a gate offset that passes some rows and stops others, so that the live run has exits to reproduce
    clf = clf.replace(gate=clf.gate.shifted(float(np.quantile(scores[np.isfinite(scores)], 0.5))), min_layer=1,
                      check_layers=None)
    expected, _ = simulate_exits(clf, table)
    assert (expected < 4).any() and (expected == 4).any()
    assert np.isneginf(exit_scores(clf, table)[~clf.gate.passes_table(table.hidden, table.layer)]).all()
    # teacher-forced on the dense continuation, each step's exit layer is what the table predicts
    for s, prompt in enumerate(prompts):
        ids = tok(prompt.text, return_tensors="pt")["input_ids"]
        dense = table.final_token[table.sequence == s]
        for t in range(T):
            prefix = torch.cat([ids, torch.tensor([dense[:t].tolist()], dtype=torch.long)], 1)
            with torch.no_grad():
                out = model(prefix, use_cache=False, exit_policy=clf, logits_to_keep=1)
            assert int(out.exit_layers[0]) == expected[np.flatnonzero(table.sequence == s)[t]]


def test_gate_only_exits_where_its_probe_passes_on_the_stock_hidden_state():
    stock, model = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(4, (0,))
    table = collect_generation_features(model, tok, prompts, new_tokens=T, features=("gap", "top_prob"),
                                        progress=False, hidden_states=True)
    half = table.num_sequences // 2
    train = table.select_prompts(np.flatnonzero(table.sequence < half))
    calib = table.select_prompts(np.flatnonzero(table.sequence >= half))
    config = TrainingConfig(method="gate_only", schedule=ScheduleConfig(check_cost=None),
                            calibration=CalibrationConfig(target_agreement=0.5, delta=0.5))
    clf = train_on_tables(model, train, calib, config)
    assert clf.gate is not None and clf.calibration["knob"] == "gate"
    # an offset halfway between two table scores (no ties), so that the live run both exits and runs on
    margins = np.unique(clf.gate.margins(table.hidden, table.layer))
    margins = margins[np.isfinite(margins)]
    mid = len(margins) // 2
    clf = clf.replace(gate=clf.gate.shifted(float(margins[mid - 1] + margins[mid]) / 2), min_layer=1,
                      check_layers=None)
    L = model.config.num_hidden_layers
    w, b, t = clf.gate.weight, clf.gate.bias, clf.gate.threshold
    exits = []
    for s, prompt in enumerate(prompts):
        ids = tok(prompt.text, return_tensors="pt")["input_ids"]
        dense = table.final_token[table.sequence == s]
        for step in range(T):
            prefix = torch.cat([ids, torch.tensor([dense[:step].tolist()], dtype=torch.long)], 1)
            with torch.no_grad():
                hs = stock(prefix, use_cache=False, output_hidden_states=True).hidden_states
                out = model(prefix, use_cache=False, exit_policy=clf, logits_to_keep=1)
            expected = L  # the first layer whose probe, written out on the stock model's state, passes
            for layer in range(1, L):
                h = hs[layer][0, -1].float().numpy()
                x = h / np.sqrt((h * h).mean() + 1e-6)
                i = clf.gate.layers.index(layer)
                if x @ w[i] + b[i] >= t[i]:
                    expected = layer
                    break
            assert int(out.exit_layers[0]) == expected
            exits.append(expected)
            if expected < L:  # the exit's logits: the stock final norm and head on that layer's state
                ref = stock.lm_head(stock.model.norm(hs[expected][:, -1:]))
                torch.testing.assert_close(out.logits[:, -1:], ref, rtol=1e-4, atol=1e-5)
    assert min(exits) < L and max(exits) == L
    with pytest.raises(ValueError, match="knob must be 'gate' \\(or None\\); got knob='classifier'"):
        train_on_tables(model, train, calib, TrainingConfig(method="gate_only", schedule=ScheduleConfig(check_cost=None),
                                                            calibration=CalibrationConfig(knob="classifier")))


def test_train_and_calibrate_on_generated_tokens_splits_by_example():
    _, model = tiny_pair()
    tok = task_tokenizer()
    config = TrainingConfig(method="logistic", gate=GateConfig(kind="linear"), schedule=ScheduleConfig(check_cost=None),
                            calibration=CalibrationConfig(target_agreement=0.5, delta=0.5, knob="gate"),
                            generation=GenerationCalibrationConfig(generation_tokens=3, first_layer=2))
    clf, train, calib = train_and_calibrate(model, tok, tiny_prompts(3, (0, 2)), config, progress=False)
    assert train.is_generation and calib.is_generation and set(train.step.tolist()) == {0, 1, 2}
    keys = lambda t: {(t.task[u], int(t.example_index[u])) for u in range(t.num_prompts)}  # noqa: E731
    assert not keys(train) & keys(calib)
    assert clf.calibration["knob"] == "gate" and clf.calibration["n_sequences"] == calib.num_sequences


def test_one_schedule_for_every_step_of_a_generation_table_uses_all_its_tokens():
    train, calib = _generation_table(60, 6, seed=1), _generation_table(150, 6, seed=2)
    clf = calibrate(train_exit_classifier(train, method="logistic"), calib, target_agreement=0.9, delta=0.1)
    schedule_classifier(clf, calib, check_cost=0.5)  # no decode cost: one schedule for prompts and decode steps
    figures = clf.calibration
    assert clf.decode_check_layers is None and "decode_schedule" not in figures
    assert figures["schedule"]["procedure"].startswith("Hoeffding-Bentkus")
    replay = simulate_exits(clf, calib)[1]  # every token of the table, replayed independently
    assert replay["agreement"] == pytest.approx(figures["schedule"]["agreement"])
    assert replay["mean_exit_layer"] == pytest.approx(figures["schedule"]["mean_layers"])
