"""Free-running calibration: candidates tested by generating with them, against the dense model's own text.

References: the stock model's greedy `generate` (the dense continuation) and, for each candidate, a step-by-step
greedy loop without a cache (`use_cache=False`: every step recomputes the whole prefix, so with the exact KV option
the cached generation must produce the same tokens); prefix losses and the fixed-sequence decision are recomputed
here in plain Python.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import task_tokenizer, tiny_pair, tiny_prompts

from adainfer_hf import ExitClassifier
from adainfer_hf.estimators.rules import GapThresholdRule
from adainfer_hf.policy.gate import fit_linear_gate
from adainfer_hf.training import (
    FreeRunning,
    calibrate,
    calibrate_free_running,
    candidate_ladder,
    collect_generation_features,
    prefix_losses,
)
from adainfer_hf.training.train import train_exit_classifier
from adainfer_hf.utils.stats import hb_p_value

N = 5


def _gap_rule(threshold, L):
    rule = GapThresholdRule(threshold=threshold).fit(np.zeros((1, 2)))
    return ExitClassifier(rule, features=("gap", "top_prob"), num_layers=L, min_layer=1)


def _no_cache_continuation(model, ids, policy):
    """Greedy tokens, one full-prefix forward per step (no KV cache at all)."""
    out = []
    with torch.no_grad():
        for _ in range(N):
            logits = model(ids, use_cache=False, exit_policy=policy, logits_to_keep=1).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(tok))
            ids = torch.cat([ids, tok], 1)
    return out


def test_free_running_calibration_keeps_the_last_candidate_whose_generations_pass():
    stock, model = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(3, (0,))
    L = model.config.num_hidden_layers
    table = collect_generation_features(model, tok, prompts, new_tokens=N, progress=False)
    gaps = table.columns(("gap",))[:, 0]
    # strict -> loose: never fires, then gap thresholds that fire more and more often
    candidates = [_gap_rule(t, L) for t in (2.0, *np.quantile(gaps, [0.95, 0.8, 0.5, 0.2, 0.0]))]
    target, delta = 0.6, 0.3
    model.exit_classifier = candidates[-1].bind(model)  # a classifier on the model must not become the reference
    result = calibrate_free_running(model, tok, prompts, candidates, target_agreement=target, delta=delta,
                                    new_tokens=N, exit_cache="exact", batch_size=4)
    figures = result.calibration["free_running"]
    # the reference: dense tokens from the stock model's generate, each candidate's from the no-cache loop
    expected_losses, expected_chosen = [], None
    for i, cand in enumerate(candidates):
        losses = []
        for p in prompts:
            ids = tok(p.text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                dense = stock.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                       pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            got = _no_cache_continuation(model, ids, cand.bind(model))
            prefix = next((j for j in range(N) if got[j] != dense[j]), N)
            losses.append(1 - prefix / N)
        expected_losses.append(float(np.mean(losses)))
        if hb_p_value(float(np.mean(losses)), len(prompts), 1 - target) > delta:
            break
        expected_chosen = i
    assert [t["mean_loss"] for t in figures["tests"]] == pytest.approx(expected_losses)
    assert figures["chosen"] == expected_chosen
    # a non-trivial case: some candidate passed after exits, and the ladder stopped at one that changed text
    assert expected_chosen is not None and expected_chosen >= 1 and max(expected_losses) > 0
    assert result.estimator.threshold == candidates[expected_chosen].estimator.threshold
    assert "Free-running" in result.calibration["conclusion"] and figures["n_generations"] == len(prompts)


def test_free_running_calibration_never_exits_when_the_first_candidate_fails():
    stock, model = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(2, (0,))
    L = model.config.num_hidden_layers
    always = _gap_rule(-1.0, L)  # exits after layer 1 on every token
    result = calibrate_free_running(model, tok, prompts, [always], target_agreement=0.95, delta=0.1, new_tokens=N,
                                    exit_cache="exact")
    assert result.calibration["free_running"]["chosen"] is None and "never exits" in result.calibration["conclusion"]
    assert result.layers_to_check(L) == [] and result.layers_to_check(L, decode=True) == []
    # a candidate without checks passes, the exiting one after it fails: the result says why it never exits
    after = calibrate_free_running(model, tok, prompts, [always.replace(check_layers=[]), always], target_agreement=0.5,
                                   delta=0.5, new_tokens=N, exit_cache="exact")
    assert after.calibration["free_running"]["chosen"] == 0 and after.layers_to_check(L, decode=True) == []
    assert "the first that exits (candidate 2 of 2" in after.calibration["conclusion"]
    ids = tok(prompts[0].text, return_tensors="pt")["input_ids"]
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model.generate(ids, exit_policy=result, **gen), stock.generate(ids, **gen))


def _unit_best(table, unit_scores, min_layer):
    """Per unit (token), its highest score at layers >= min_layer, in plain numpy."""
    best = np.full(table.num_prompts, -np.inf)
    for unit, layer, score in zip(table.prompt_id, table.layer, unit_scores, strict=True):
        if layer >= min_layer:
            best[unit] = max(best[unit], score)
    return best


def test_candidate_ladder_goes_from_strict_to_loose_and_arguments_are_checked():
    _, model = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(3, (0,))
    table = collect_generation_features(model, tok, prompts, new_tokens=N, progress=False, hidden_states=True)
    clf = train_exit_classifier(table, method="logistic")
    ladder = candidate_ladder(clf, table, target_agreement=0.6, levels=3, delta=0.3)
    # the loosest rung is the per-token calibration itself
    base = calibrate(clf, table, target_agreement=0.6, delta=0.3)
    assert ladder[-1].threshold == base.threshold and ladder[-1].min_layer == base.min_layer
    assert not base.calibration["never_exit"]
    # the stricter ones: the same rule at higher thresholds, exiting on ~1/4 and ~1/2 of its exiting tokens, where
    # a token exits iff scikit-learn's probability reaches the threshold at some layer >= min_layer
    proba = clf.estimator.predict_proba(table.columns(clf.features).astype(np.float64))[:, 1]
    best = _unit_best(table, proba, base.min_layer)
    n_base = int((best >= base.threshold).sum())
    assert len(ladder) == 3 and n_base >= 4
    thresholds = [c.threshold for c in ladder]
    assert thresholds == sorted(thresholds, reverse=True) and thresholds[0] > thresholds[-1]
    for rung, share in zip(ladder[:2], (0.25, 0.5), strict=True):
        assert rung.min_layer == base.min_layer
        assert int((best >= rung.threshold).sum()) == round(n_base * share)
        assert rung.calibration["early_exits"] == round(n_base * share)
        assert rung.calibration["ladder"]["certified_per_token"] is False
    # a gate as the knob: the probe's offset is raised the same way
    gated = clf.replace(gate=fit_linear_gate(table.hidden, table.layer, table.labels("final"), recall=0.9))
    gate_ladder = candidate_ladder(gated, table, target_agreement=0.6, levels=2, delta=0.3, knob="gate")
    gate_base = calibrate(gated, table, target_agreement=0.6, delta=0.3, knob="gate")
    fires = gated.exit_mask(table.columns(gated.features).astype(np.float64))
    probe = gated.gate.scores(table.hidden, table.layer).astype(np.float64)
    threshold = np.array([gated.gate.threshold[list(gated.gate.layers).index(k)] for k in table.layer])
    best = _unit_best(table, np.where(fires, probe - threshold, -np.inf), gate_base.min_layer)
    offsets = [c.calibration["gate_offset"] for c in gate_ladder]
    assert offsets[-1] == gate_base.calibration["gate_offset"] and offsets[0] > offsets[1]
    n_gate = int((best >= offsets[-1]).sum())
    assert int((best >= offsets[0]).sum()) == round(n_gate / 2) == gate_ladder[0].calibration["early_exits"]
    losses = prefix_losses(torch.tensor([[1, 2, 3, 4]] * 3), torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [0, 2, 3, 4]]))
    np.testing.assert_array_equal(losses, [0.0, 0.75, 1.0])  # identical; first change at 2 of 4; at once
    bad = [(dict(candidates=[]), "candidates must be a non-empty sequence of ExitClassifier"),
           (dict(target_agreement=1.0), "target_agreement must lie in \\(0, 1\\); got 1.0"),
           (dict(new_tokens=0), "new_tokens must be an int >= 1; got 0"),
           (dict(exit_cache="lazy"), "exit_cache='lazy' is not supported; expected one of \\['propagate', 'exact'\\]")]
    for change, message in bad:
        kwargs = dict(candidates=ladder, target_agreement=0.6, new_tokens=N)
        kwargs.update(change)
        with pytest.raises(ValueError, match=message):
            calibrate_free_running(model, tok, prompts, **kwargs)
    with pytest.raises(ValueError, match="levels must be an int >= 1; got 0"):
        candidate_ladder(clf, table, 0.6, levels=0)
    with pytest.raises(ValueError, match="FreeRunning exit_cache='lazy' is not supported"):
        FreeRunning(tok, prompts, exit_cache="lazy")
    with pytest.raises(ValueError, match="FreeRunning new_tokens must be an int >= 1; got 0"):
        FreeRunning(tok, prompts, new_tokens=0)


def test_free_running_reference_is_the_dense_text_generated_once_per_model(monkeypatch):
    from adainfer_hf.training import free_running as fr
    from adainfer_hf.training.config import CalibrationConfig, ScheduleConfig, TrainingConfig
    from adainfer_hf.training.train import train_on_tables
    from adainfer_hf.utils.tokenizers import left_padding

    stock, model = tiny_pair()
    tok = task_tokenizer()
    prompts = tiny_prompts(3, (0,))
    setting = FreeRunning(tok, prompts, new_tokens=N, exit_cache="exact", batch_size=2, levels=2)
    model.exit_classifier = _gap_rule(-1.0, model.config.num_hidden_layers).bind(model)  # must not leak in
    # the reference: the stock model's own batched greedy generate, left-padded, in the same batches
    expected = []
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=tok.pad_token_id)
    with left_padding(tok), torch.no_grad():
        for i in range(0, len(prompts), 2):
            enc = tok([p.text for p in prompts[i:i + 2]], return_tensors="pt", padding=True)
            expected.append(stock.generate(**enc, **gen)[:, enc["input_ids"].shape[1]:])
    torch.testing.assert_close(setting.reference(model), torch.cat(expected))
    dense_calls = []
    real = fr._continuations
    monkeypatch.setattr(fr, "_continuations", lambda *a: dense_calls.append(a[5]) or real(*a))
    table = collect_generation_features(model, tok, tiny_prompts(4, (0,)), new_tokens=N, progress=False)
    config = TrainingConfig(method="gap_rule", calibration=CalibrationConfig(target_agreement=0.6, delta=0.3),
                            schedule=ScheduleConfig(check_cost=0.0))
    first = train_on_tables(model, table, None, config, free_running=setting)
    second = train_on_tables(model, table, None, config, free_running=setting)
    assert dense_calls and None not in dense_calls  # candidates generated; the dense text was not regenerated
    assert first.calibration["free_running"] == second.calibration["free_running"]
    with pytest.raises(ValueError, match=rf"reference has shape \(2, 5\); expected \({len(prompts)}, 5\)"):
        calibrate_free_running(model, tok, prompts, [first], new_tokens=N, reference=torch.zeros(2, N, dtype=torch.long))
