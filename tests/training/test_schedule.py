"""Check schedules: cost accounting, the quality guarantee, and the measured check cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TABLE_LAYERS, llama_config, make_pair, settling_table

from adainfer_hf import AdaInferLlamaForCausalLM
from adainfer_hf.compat import output_cache
from adainfer_hf.training.check_cost import measure_check_cost
from adainfer_hf.training.schedule import choose_schedule, schedule_cost
from adainfer_hf.utils.stats import binomial_upper_bound


def test_schedule_cost_by_hand():
    L = 5
    fires = np.zeros((3, L), dtype=bool)
    fires[0, 1] = True  # prompt 0 fires after layer 2
    fires[1, 3] = True  # prompt 1 fires after layer 4
    agrees = np.ones((3, L), dtype=bool)
    agrees[1, 3] = False
    exits, cost, agree = schedule_cost(fires, agrees, (2, 4), check_cost=0.5)
    assert exits.tolist() == [2, 4, 5]
    # prompt 0: 2 layers + 1 check; prompt 1: 4 layers + 2 checks; prompt 2: 5 layers + 2 checks + final head
    assert cost.tolist() == [2.5, 5.0, 6.5]
    assert agree.tolist() == [True, False, True]
    exits, cost, _ = schedule_cost(fires, agrees, (3,), check_cost=0.5)
    assert exits.tolist() == [5, 5, 5]  # nobody fires at layer 3: checking there only costs


@pytest.mark.parametrize("errors,n,delta", [(0, 50, 0.1), (3, 200, 0.05), (10, 30, 0.2)])
def test_binomial_bound_is_clopper_pearson(errors, n, delta):
    from scipy.stats import beta

    assert binomial_upper_bound(errors, n, delta) == pytest.approx(beta.ppf(1 - delta, errors + 1, n - errors), abs=1e-6)


def _synthetic(n=400, L=12, seed=0, misleading=False):
    rng = np.random.default_rng(seed)
    settle = rng.integers(6, 11, size=n)  # layer where each prompt's answer settles
    layers = np.arange(1, L + 1)
    agrees = layers[None, :] >= settle[:, None]
    fires = layers[None, :] >= settle[:, None] + 1  # a good classifier fires one layer after settling
    if misleading:
        fires = np.ones_like(agrees)  # fires everywhere, e.g. on an early blank-token prediction
        fires[:, 6:] = False
    return fires, agrees


def test_expensive_checks_give_sparse_schedule_and_cheap_checks_dense_one():
    fires, agrees = _synthetic()
    cheap = choose_schedule(fires, agrees, check_cost=0.05, target_agreement=0.95)
    dear = choose_schedule(fires, agrees, check_cost=3.0, target_agreement=0.95)
    assert len(cheap.check_layers) > len(dear.check_layers) >= 1
    assert cheap.relative_cost < 1 and dear.relative_cost < 1
    for choice in (cheap, dear):
        assert choice.agreement >= 0.95 and choice.risk_bound <= 0.05


def test_misleading_classifier_ends_at_no_checks():
    fires, agrees = _synthetic(misleading=True)
    choice = choose_schedule(fires, agrees, check_cost=0.2, target_agreement=0.99)
    assert choice.check_layers == () and choice.relative_cost == pytest.approx(1.0)


def test_very_expensive_checks_leave_at_most_one():
    """A check includes the LM head, so the one that fires replaces the final head: one check can still pay."""
    fires, agrees = _synthetic()
    choice = choose_schedule(fires, agrees, check_cost=50.0, target_agreement=0.95)
    assert len(choice.check_layers) <= 1


def _with_vocab(vocab: int):
    torch.manual_seed(0)
    return AdaInferLlamaForCausalLM(llama_config(vocab_size=vocab)).eval()


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_measure_check_cost_grows_with_the_head(phase):
    """Same layers, a head 500x larger: the measured check must cost clearly more layers."""
    small = measure_check_cost(_with_vocab(99), seq_len=16, phase=phase, repeats=5)
    large = measure_check_cost(_with_vocab(49_500), seq_len=16, phase=phase, repeats=5)
    assert small > 0 and large > 2 * small
    with pytest.raises(ValueError, match="'warmup'"):
        measure_check_cost(_with_vocab(99), phase="warmup")


def test_schedule_classifier_on_a_calibrated_classifier():
    """Scheduling keeps the certified agreement, and with dear checks uses fewer of them than every layer."""
    L = TABLE_LAYERS

    from adainfer_hf.training.calibrate import calibrate, simulate_exits
    from adainfer_hf.training.schedule import schedule_classifier
    from adainfer_hf.training.train import train_exit_classifier

    train, calib, fresh = (settling_table(600, seed) for seed in (0, 1, 2))
    clf = calibrate(train_exit_classifier(train, method="logistic"), calib, target_agreement=0.95)
    assert clf.check_layers is None  # every layer from min_layer
    every = len(clf.layers_to_check(L))
    choice = schedule_classifier(clf, calib, check_cost=2.0)
    assert clf.check_layers == choice.check_layers and 0 < len(choice.check_layers) < every
    assert clf.calibration["schedule"]["check_layers"] == list(choice.check_layers)
    assert choice.risk_bound <= 0.05
    _, summary = simulate_exits(clf, fresh)  # held-out prompts from the same distribution
    assert summary["agreement"] >= 0.95 and summary["mean_exit_layer"] < L


def test_prompts_and_decode_steps_get_their_own_schedules(tmp_path):
    """A check that is cheap in a prompt and dear in a single-token step: the prompt schedule keeps checks, the
    decode one drops them (or keeps fewer); both survive a save/load, and the loop applies each to its phase."""
    import torch

    from adainfer_hf.policy.classifier import ExitClassifier
    from adainfer_hf.training.calibrate import calibrate
    from adainfer_hf.training.schedule import schedule_classifier
    from adainfer_hf.training.train import train_exit_classifier

    train, calib = settling_table(600, 0), settling_table(600, 1)
    clf = calibrate(train_exit_classifier(train, method="logistic"), calib, target_agreement=0.95)
    schedule_classifier(clf, calib, check_cost=0.1, decode_check_cost=1000.0)
    assert len(clf.check_layers) > len(clf.decode_check_layers)
    assert len(clf.decode_check_layers) <= 1  # at 1000 layers a check pays only as the one that replaces the head
    assert clf.calibration["decode_schedule"]["check_cost_layers"] == 1000.0
    clf.save_pretrained(tmp_path)
    back = ExitClassifier.from_pretrained(tmp_path)
    assert back.decode_check_layers == clf.decode_check_layers and back.check_layers == clf.check_layers
    L = int(calib.num_layers.max())
    assert back.layers_to_check(L, decode=True) == list(clf.decode_check_layers)
    with pytest.raises(ValueError, match="decode_check_layers"):
        ExitClassifier(clf.estimator, decode_check_layers=[3, 2])

    # the loop: prompt steps use check_layers, cached single-token steps decode_check_layers
    from tiny_models import batch

    from adainfer_hf import ScriptedExit

    _, ada = make_pair("llama_gqa")
    policy = ScriptedExit(2)
    policy.decode_check_layers = ()  # prompts exit after layer 2; generated tokens are never checked
    ids, mask = batch("left")
    with torch.no_grad():
        out = ada.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=4,
                           exit_policy=policy, return_dict_in_generate=True)
    assert out.exit_layers[:, 0].tolist() == [2, 2, 2]
    assert (out.exit_layers[:, 1:] == 4).all()


def test_exact_cache_catches_up_when_decode_steps_are_not_checked():
    """Exact option, prompt exits at 2, decode steps unchecked: the unchecked steps still run the owed layers for
    the prompt first, so they equal a dense no-cache forward over the whole prefix (the independent reference)."""
    import torch
    from tiny_models import batch

    from adainfer_hf import ScriptedExit

    stock, ada = make_pair("llama_gqa")
    policy = ScriptedExit(2)
    policy.decode_check_layers = ()
    ids, mask = batch("none")
    with torch.no_grad():
        out = ada.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=4,
                           exit_policy=policy, exit_cache="exact", return_dict_in_generate=True, output_scores=True)
        n = ids.shape[1]
        for step in range(1, 4):
            prefix = out.sequences[:, : n + step]
            ref = stock(prefix, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.scores[step], ref, atol=1e-4, rtol=1e-4)
    assert [layer.keys.shape[-2] for layer in output_cache(out).layers] == [out.sequences.shape[1] - 1] * 4


def test_exact_cache_catches_up_when_a_step_runs_without_a_policy():
    """`exit_policy=None` for one cached step after an exact-option prompt exit: the owed layers still run."""
    import torch
    from tiny_models import batch

    from adainfer_hf import ScriptedExit
    from adainfer_hf.cache.exact import ExactExitCache

    stock, ada = make_pair("llama_gqa")
    ids, mask = batch("none")
    cache = ExactExitCache(config=ada.config)
    with torch.no_grad():
        first = ada(ids, past_key_values=cache, use_cache=True, exit_policy=ScriptedExit(1))
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        out = ada(nxt, past_key_values=cache, use_cache=True, exit_policy=None)
        ref = stock(torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
    assert first.exit_layers.tolist() == [1, 1, 1] and out.exit_layers.tolist() == [4, 4, 4]
    torch.testing.assert_close(out.logits[:, -1], ref, atol=1e-4, rtol=1e-4)
